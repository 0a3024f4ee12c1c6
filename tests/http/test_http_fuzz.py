"""Fuzz the OpenAPI schema with schemathesis: never a 5xx, answers as documented."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
import schemathesis
from http_pipelines import make_double, make_echo, make_vec
from httphelpers import ThreadServer, serve_in_thread
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from flowbatch.http import ServeConfig, create_app

KEY = "fuzz-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@schemathesis.serializer("application/x-ndjson")
def _ndjson(ctx: object, value: Any) -> bytes:
    return value.encode() if isinstance(value, str) else json.dumps(value).encode() + b"\n"


@schemathesis.serializer("application/msgpack")
def _msgpack(ctx: object, value: Any) -> bytes:
    try:
        return msgspec.msgpack.encode(value)
    except OverflowError:  # msgpack has no integers past 64 bits
        return msgspec.msgpack.encode(json.dumps(value))


@pytest.fixture(scope="module")
def fuzz_server() -> Iterator[ThreadServer]:
    app = create_app({"echo": make_echo(), "double": make_double(), "vec": make_vec()},
                     config=ServeConfig(api_key=KEY, max_body_bytes=64 * 1024),
                     embedding_models=["vec"])
    with serve_in_thread(app) as srv:
        yield srv


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_fuzz_the_openapi_schema(fuzz_server: ThreadServer, mode: GenerationMode) -> None:
    schema = schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json", headers=AUTH)

    # A deadline of 1e-300 s gets its documented 504 (tested on its own); the
    # fuzzer, which counts every 5xx as a failure, gets a fixed, generous one.
    # The key is fixed too: a mutated key answered 401 would only test the key.
    strategy = schema.as_strategy(generation_mode=mode,
                                  headers={"X-Request-Timeout": "60", **AUTH})

    @given(case=strategy)
    @settings(max_examples=150, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    def check(case: schemathesis.Case) -> None:
        # Inputs are whatever each pipeline takes, so the schema leaves them open
        # ({}): a schema-valid input that the pipeline refuses gets a documented
        # 422. That is right here, so "positive data is accepted" is not checked.
        case.call_and_validate(base_url=fuzz_server.url, timeout=60,
                               excluded_checks=[positive_data_acceptance])

    check()
