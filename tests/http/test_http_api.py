"""The native routes over real HTTP: inference, per-item errors, bad input, limits, auth."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import msgspec
import pytest
from http_pipelines import make_double, make_echo
from httphelpers import ThreadServer, serve_in_thread

from flowbatch.http import ServeConfig, create_app

KEY = "test-key-123"


@pytest.fixture(scope="module")
def server() -> Iterator[ThreadServer]:
    app = create_app(
        {"echo": make_echo(), "double": make_double()},
        config=ServeConfig(max_body_bytes=4096, max_inputs=100, max_in_flight=256),
    )
    with serve_in_thread(app) as srv:
        yield srv


@pytest.fixture
def client(server: ThreadServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def test_single_input(client: httpx.Client) -> None:
    r = client.post("/v1/pipelines/echo", json={"input": {"a": [1, 2]}})
    assert r.status_code == 200
    assert r.json() == {"output": {"a": [1, 2]}}


def test_many_inputs_each_batched(client: httpx.Client) -> None:
    r = client.post("/v1/pipelines/double", json={"inputs": [1, 2.5, [1, 2]]})
    assert r.status_code == 200
    assert r.json() == {"outputs": [2, 5.0, [1, 2, 1, 2]]}


def test_empty_inputs(client: httpx.Client) -> None:
    r = client.post("/v1/pipelines/echo", json={"inputs": []})
    assert r.status_code == 200 and r.json() == {"outputs": []}


def test_per_item_errors(client: httpx.Client) -> None:
    r = client.post("/v1/pipelines/echo", json={"inputs": ["a", "bad", "c", "boom"]})
    assert r.status_code == 200
    body = r.json()
    assert body["outputs"] == ["a", None, "c", None]
    errors = {e["index"]: e for e in body["errors"]}
    assert set(errors) == {1, 3}
    assert errors[1]["status"] == 422 and "not a valid input" in errors[1]["message"]
    assert errors[3]["status"] == 500 and "internal error" in errors[3]["message"]
    assert "the stage broke" not in r.text  # a server fault is told by request id only
    assert "Traceback" not in r.text


def test_single_input_errors(client: httpx.Client) -> None:
    r = client.post("/v1/pipelines/echo", json={"input": "bad"})
    assert r.status_code == 422
    assert r.json()["error"]["type"] == "rejected_input"
    r = client.post("/v1/pipelines/echo", json={"input": "boom"})
    assert r.status_code == 500
    assert "internal error" in r.json()["error"]["message"]
    assert "Traceback" not in r.text and "File " not in r.text


def test_every_input_failing_the_same_way(client: httpx.Client) -> None:
    r = client.post("/v1/pipelines/echo", json={"inputs": ["bad", "bad"]})
    assert r.status_code == 422
    assert r.json()["outputs"] == [None, None]
    assert "every input failed" in r.json()["error"]["message"]


def test_msgpack_in_and_out(client: httpx.Client) -> None:
    body = msgspec.msgpack.encode({"inputs": [b"\x00\x01", 3]})
    r = client.post("/v1/pipelines/double", content=body,
                    headers={"Content-Type": "application/msgpack"})
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/msgpack"
    assert msgspec.msgpack.decode(r.content) == {"outputs": [b"\x00\x01", 6]}
    r = client.post("/v1/pipelines/echo", json={"input": 1},
                    headers={"Accept": "application/msgpack"})
    assert msgspec.msgpack.decode(r.content) == {"output": 1}


@pytest.mark.parametrize(
    ("body", "headers", "status", "needle"),
    [
        (b"{not json", {"Content-Type": "application/json"}, 400, "not valid JSON"),
        (b"", {"Content-Type": "application/json"}, 400, "body is empty"),
        (b"[1, 2]", {"Content-Type": "application/json"}, 400, "got array"),
        (b'{"inputs": 5}', {"Content-Type": "application/json"}, 400, "must be an array"),
        (b'{"x": 1}', {"Content-Type": "application/json"}, 400, "unknown field"),
        (b'{}', {"Content-Type": "application/json"}, 400, "missing field"),
        (b'{"input": 1, "inputs": []}', {"Content-Type": "application/json"}, 400, "not both"),
        (b"\xc1", {"Content-Type": "application/msgpack"}, 400, "not valid msgpack"),
        (b"a=1", {"Content-Type": "application/x-www-form-urlencoded"}, 415, "not supported"),
        (b'{"input": 1}', {"X-Request-Timeout": "soon"}, 400, "X-Request-Timeout"),
        (b'{"input": 1}', {"X-Request-Timeout": "-1"}, 400, "X-Request-Timeout"),
    ],
)
def test_client_mistakes_get_4xx_with_a_reason(
    client: httpx.Client, body: bytes, headers: dict[str, str], status: int, needle: str
) -> None:
    r = client.post("/v1/pipelines/echo", content=body, headers=headers)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"]


def test_unknown_routes_and_methods(client: httpx.Client) -> None:
    r = client.post("/v1/pipelines/nope", json={"input": 1})
    assert r.status_code == 404 and "'nope'" in r.json()["error"]["message"]
    assert "echo" in r.json()["error"]["message"]
    r = client.get("/v1/pipelines/echo")
    assert r.status_code == 405 and "GET" in r.json()["error"]["message"]
    r = client.get("/nowhere")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found"


def test_oversize_bodies_get_413(client: httpx.Client) -> None:
    big = b'{"input": "' + b"x" * 5000 + b'"}'
    r = client.post("/v1/pipelines/echo", content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "4096" in r.json()["error"]["message"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield b'{"input": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}'

    r = client.post("/v1/pipelines/echo", content=chunks(),
                    headers={"Content-Type": "application/json"})
    assert r.status_code == 413


def test_too_many_inputs_get_413(client: httpx.Client) -> None:
    r = client.post("/v1/pipelines/echo", json={"inputs": list(range(101))})
    assert r.status_code == 413 and "at most 100" in r.json()["error"]["message"]


def test_health_and_readiness(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200
    assert r.json() == {"status": "ready", "pipelines": {"echo": True, "double": True}}


def test_metrics(client: httpx.Client) -> None:
    client.post("/v1/pipelines/echo", json={"input": 1})
    r = client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert 'flowbatch_http_rejected_total{pipeline="echo"} 0' in text
    assert 'pipeline="echo"' in text and "flowbatch_http_ready 1" in text


def test_dashboard_page_and_its_live_figures(client: httpx.Client) -> None:
    client.post("/v1/pipelines/echo", json={"inputs": [1, 2, 3]})
    page = client.get("/dashboard")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "dashboard/stats" in page.text
    figures = client.get("/dashboard/stats").json()
    echo = figures["pipelines"]["echo"]
    assert echo["completed"] >= 3
    assert echo["stages"]


def test_openapi(client: httpx.Client) -> None:
    doc = client.get("/openapi.json").json()
    assert doc["openapi"].startswith("3.")
    assert "/v1/pipelines/{name}" in doc["paths"]


def test_api_key() -> None:
    app = create_app(make_echo(), config=ServeConfig(api_key=KEY))
    with serve_in_thread(app) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        for path in ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"):
            assert c.get(path).status_code == 200, path
        r = c.post("/v1/pipelines/echo", json={"input": 1})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert "API key" in r.json()["error"]["message"]
        r = c.post("/v1/pipelines/echo", json={"input": 1},
                   headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and "not valid" in r.json()["error"]["message"]
        for method, path in (("GET", "/metrics"), ("GET", "/openapi.json"), ("GET", "/v2"),
                             ("GET", "/v1/jobs/x"), ("POST", "/v1/embeddings"),
                             ("GET", "/v2/models/echo")):
            assert c.request(method, path).status_code == 401, path
        r = c.post("/v1/embeddings", json={})
        assert r.json()["error"]["type"] == "authentication_error"
        auth = {"Authorization": f"Bearer {KEY}"}
        r = c.post("/v1/pipelines/echo", json={"input": 1}, headers=auth)
        assert r.status_code == 200 and r.json() == {"output": 1}
        r = c.post("/v1/pipelines/echo", json={"input": 1},
                   headers={"Authorization": f"bearer {KEY}"})
        assert r.status_code == 200
