"""Numbers a client sends: beyond 64 bits a 400 that says so on every JSON route, never a float.

Also the other number checks of the OIP v2 decoder (a value that overflows its
datatype, booleans for numbers, a header of non-ASCII digits): each a 400, not
a 500 and not a silently changed value.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
from http_pipelines import make_double, make_echo
from httphelpers import ThreadServer, serve_in_thread
from test_http_jobs import poll_job

from flowbatch.http import create_app

HUGE = 1 << 70  # 1180591620717411303424
U64_MAX = (1 << 64) - 1
I64_MIN = -(1 << 63)


@pytest.fixture(scope="module")
def server() -> Iterator[ThreadServer]:
    app = create_app({"echo": make_echo(), "double": make_double()})
    with serve_in_thread(app) as srv:
        yield srv


@pytest.fixture
def c(server: ThreadServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


def post(c: httpx.Client, path: str, doc: Any) -> httpx.Response:
    # orjson cannot write 2**70; the standard library writes it exactly
    import json

    return c.post(path, content=json.dumps(doc), headers={"Content-Type": "application/json"})


def says_64_bits(text: str) -> bool:
    return str(HUGE) in text and "64 bits" in text


@pytest.mark.parametrize("doc", [{"input": HUGE}, {"inputs": [1, {"id": -HUGE}]},
                                 {"input": [1, 2, HUGE]}])
def test_native_route(c: httpx.Client, doc: Any) -> None:
    r = post(c, "/v1/pipelines/echo", doc)
    assert r.status_code == 400, r.text
    assert says_64_bits(r.json()["error"]["message"].replace("-", ""))


def test_64_bit_integers_pass_exactly(c: httpx.Client) -> None:
    for value in (U64_MAX, I64_MIN, 12345678901234567890):
        r = post(c, "/v1/pipelines/echo", {"input": value})
        assert r.status_code == 200 and r.json() == {"output": value}
    # digits in a string are text, not a number
    r = post(c, "/v1/pipelines/echo", {"input": str(HUGE)})
    assert r.json() == {"output": str(HUGE)}


def test_jobs(c: httpx.Client) -> None:
    r = post(c, "/v1/pipelines/echo/jobs", {"input": HUGE})
    assert r.status_code == 400 and says_64_bits(r.json()["error"]["message"])
    r = post(c, "/v1/pipelines/echo/jobs", {"input": U64_MAX})
    assert poll_job(c, r.json()["status_url"])["result"] == {"output": U64_MAX}


def test_stream(c: httpx.Client) -> None:
    body = f'1\n{HUGE}\n{U64_MAX}\n'.encode()
    r = c.post("/v1/pipelines/echo/stream", content=body)
    lines = {d["index"]: d for d in map(orjson.loads, r.content.splitlines())}
    assert lines[0] == {"index": 0, "output": 1}
    assert lines[1]["error"]["status"] == 400 and says_64_bits(lines[1]["error"]["message"])
    assert lines[2] == {"index": 2, "output": U64_MAX}


def oip(c: httpx.Client, datatype: str, data: list[Any], **extra: Any) -> httpx.Response:
    doc = {"inputs": [{"name": "x", "datatype": datatype, "shape": [len(data)], "data": data}],
           **extra}
    return post(c, "/v2/models/double/infer", doc)


@pytest.mark.parametrize("datatype", ["INT64", "UINT64", "FP64"])
def test_oip_data(c: httpx.Client, datatype: str) -> None:
    r = oip(c, datatype, [1, HUGE])
    assert r.status_code == 400 and says_64_bits(r.json()["error"])
    r = oip(c, "INT64", [1], parameters={"timeout": HUGE})
    assert r.status_code == 400 and says_64_bits(r.json()["error"])


@pytest.mark.parametrize(
    ("datatype", "data", "needle"),
    [
        ("FP32", [1.0, 1e300], "does not fit FP32"),  # was inf
        ("FP16", [70000.0], "does not fit FP16"),
        ("INT8", [300], "does not fit INT8"),
        ("INT64", [True], "INT64 numbers"),
        ("FP32", [False], "FP32 numbers"),
        ("BOOL", [1], "true or false"),
    ],
)
def test_oip_values_that_do_not_fit(c: httpx.Client, datatype: str, data: list[Any],
                                    needle: str) -> None:
    r = oip(c, datatype, data)
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]


def test_oip_header_and_shape_numbers(c: httpx.Client) -> None:
    header = b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1],"parameters":{"binary_data_size":4}}]}'
    body = header + struct.pack("<f", 1.0)
    r = c.post("/v2/models/double/infer", content=body,
               headers={"Inference-Header-Content-Length": b"\xb2"})  # "²"
    assert r.status_code == 400 and "Inference-Header-Content-Length" in r.json()["error"]
    # a BYTES shape far larger than its data: refused before anything is allocated for it
    header = (b'{"inputs":[{"name":"x","datatype":"BYTES","shape":[1000000000000],'
              b'"parameters":{"binary_data_size":5}}]}')
    body = header + struct.pack("<I", 1) + b"a"
    r = c.post("/v2/models/double/infer", content=body,
               headers={"Inference-Header-Content-Length": str(len(header))})
    assert r.status_code == 400 and "BYTES elements" in r.json()["error"]


def test_embeddings(c: httpx.Client) -> None:
    r = post(c, "/v1/embeddings", {"model": "echo", "input": "x", "dimensions": HUGE})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and says_64_bits(err["message"])
