"""Server faults: the client gets "internal error" and a request id, the log gets the rest.

Every route that can answer a 500 is tried with ``ServeConfig(expose_errors=...)``
off (the default) and on. The ``echo`` stage raises ``RuntimeError("the stage
broke")`` for ``"boom"``: that text is what must not leak.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
from http_pipelines import make_echo
from httphelpers import ThreadServer, serve_in_thread
from test_http_jobs import poll_job

import flowbatch as fb
from flowbatch.http import ServeConfig, create_app

SECRET = "the stage broke"


def _opaque(x: Any) -> Any:
    return object()  # neither JSON nor msgpack can carry it


@pytest.fixture(scope="module", params=[False, True], ids=["concealed", "exposed"])
def server(request: pytest.FixtureRequest) -> Iterator[ThreadServer]:
    pipes = {"echo": make_echo(), "opaque": fb.Pipeline([_opaque], name="opaque")}
    app = create_app(pipes, config=ServeConfig(expose_errors=request.param))
    with serve_in_thread(app) as srv:
        yield srv


@pytest.fixture
def c(server: ThreadServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


def exposed(server: ThreadServer) -> bool:
    return bool(server.app.service.config.expose_errors)


def check_fault(server: ThreadServer, text: str, rid: str, caplog: pytest.LogCaptureFixture,
                detail: str = SECRET) -> None:
    """The answer ``text`` tells ``rid``; the detail is in it only when exposed; the log has both."""
    assert rid and rid in text
    assert "Traceback" not in text
    if exposed(server):
        assert detail in text
    else:
        assert detail not in text and "internal error" in text
    logged = [r for r in caplog.records if rid in r.getMessage()]
    assert logged, f"no log record names request id {rid}"
    assert any(detail in r.getMessage() for r in logged)


def test_native_route(server: ThreadServer, c: httpx.Client,
                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, "flowbatch.http")
    r = c.post("/v1/pipelines/echo", json={"input": "boom"})
    assert r.status_code == 500
    err = r.json()["error"]
    assert err["type"] == "item_failed" and err["request_id"] == r.headers["x-request-id"]
    check_fault(server, r.text, err["request_id"], caplog)
    # the traceback of the stage's exception is logged with it
    record = next(rec for rec in caplog.records if err["request_id"] in rec.getMessage())
    assert record.exc_info is not None and isinstance(record.exc_info[1], RuntimeError)

    r = c.post("/v1/pipelines/echo", json={"inputs": ["a", "boom", "bad", "boom"]})
    assert r.status_code == 200
    errors = {e["index"]: e for e in r.json()["errors"]}
    assert errors[1]["request_id"] == errors[3]["request_id"]  # one id per request
    check_fault(server, r.text, errors[1]["request_id"], caplog)
    assert "not a valid input" in errors[2]["message"]  # a 4xx still says what is wrong
    assert "request_id" not in errors[2]

    r = c.post("/v1/pipelines/echo", json={"inputs": ["boom", "boom"]})
    assert r.status_code == 500
    check_fault(server, r.text, r.json()["error"]["request_id"], caplog)


def test_unencodable_output(server: ThreadServer, c: httpx.Client,
                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, "flowbatch.http")
    r = c.post("/v1/pipelines/opaque", json={"input": 1})
    assert r.status_code == 500 and r.json()["error"]["type"] == "unencodable_output"
    check_fault(server, r.text, r.headers["x-request-id"], caplog, detail="cannot be sent")


def test_jobs(server: ThreadServer, c: httpx.Client, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, "flowbatch.http")
    r = c.post("/v1/pipelines/echo/jobs", json={"input": "boom"})
    doc = poll_job(c, r.json()["status_url"])
    assert doc["status"] == "failed" and doc["error"]["request_id"] == doc["id"]
    check_fault(server, orjson.dumps(doc).decode(), doc["id"], caplog)
    r = c.post("/v1/pipelines/echo/jobs", json={"inputs": ["a", "boom"]})
    doc = poll_job(c, r.json()["status_url"])
    assert doc["status"] == "succeeded"
    assert doc["result"]["errors"][0]["request_id"] == doc["id"]
    check_fault(server, orjson.dumps(doc).decode(), doc["id"], caplog)


def test_stream(server: ThreadServer, c: httpx.Client, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, "flowbatch.http")
    r = c.post("/v1/pipelines/echo/stream", content=b'"a"\n"boom"\n"boom"\n')
    lines = {d["index"]: d for d in map(orjson.loads, r.content.splitlines())}
    assert lines[0] == {"index": 0, "output": "a"}
    assert lines[1]["error"]["request_id"] == lines[2]["error"]["request_id"]
    check_fault(server, r.text, lines[1]["error"]["request_id"], caplog)


def test_oip(server: ThreadServer, c: httpx.Client, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, "flowbatch.http")
    body = {"inputs": [{"name": "x", "datatype": "BYTES", "shape": [2], "data": ["a", "boom"]}]}
    r = c.post("/v2/models/echo/infer", json=body)
    assert r.status_code == 500
    check_fault(server, r.json()["error"], r.headers["x-request-id"], caplog)
    body = {"inputs": [{"name": "x", "datatype": "INT64", "shape": [1], "data": [1]}]}
    r = c.post("/v2/models/opaque/infer", json=body)
    assert r.status_code == 500
    check_fault(server, r.json()["error"], r.headers["x-request-id"], caplog,
                detail="not numbers or text")


def test_embeddings(server: ThreadServer, c: httpx.Client,
                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, "flowbatch.http")
    r = c.post("/v1/embeddings", json={"model": "echo", "input": ["boom"]})
    assert r.status_code == 500
    err = r.json()["error"]
    assert err["type"] == "server_error"
    check_fault(server, err["message"], r.headers["x-request-id"], caplog)


def test_expose_errors_is_a_flag() -> None:
    with pytest.raises(TypeError, match="expose_errors"):
        ServeConfig(expose_errors="yes")  # type: ignore[arg-type]
