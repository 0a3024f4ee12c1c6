"""Real clients: tritonclient[http] for OIP v2, openai for /v1/embeddings (the real model)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from http_pipelines import make_double, make_echo
from httphelpers import ThreadServer, serve_in_thread

import flowbatch as fb
from flowbatch.http import ServeConfig, Signature, TensorSpec, create_app

KEY = "proto-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def auth() -> dict[str, str]:
    """A fresh dict each call: tritonclient adds its own headers to the one it is given."""
    return dict(AUTH)


@pytest.fixture(scope="module")
def server() -> Iterator[ThreadServer]:
    from flowbatch.models import SentenceEmbedder

    embed = fb.Pipeline(
        [fb.stage(SentenceEmbedder(torch_threads=1), name="embed", batch=fb.Batch(max_size=64))],
        name="embed",
    )
    signatures = {
        "embed": Signature(inputs=(TensorSpec("text", "BYTES"),),
                           outputs=(TensorSpec("embedding", "FP32", (-1, 384)),)),
    }
    app = create_app({"embed": embed, "double": make_double(), "echo": make_echo()},
                     config=ServeConfig(api_key=KEY), signatures=signatures)
    with serve_in_thread(app) as srv:
        yield srv


# ------------------------------------------------------------------ OIP v2


@pytest.fixture
def triton(server: ThreadServer) -> Iterator[object]:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url=f"127.0.0.1:{server.port}")
    yield client
    client.close()


def test_oip_health_and_metadata(triton: object, server: ThreadServer) -> None:
    import tritonclient.http as httpclient

    c: httpclient.InferenceServerClient = triton  # type: ignore[assignment]
    assert c.is_server_live()
    assert c.is_server_ready()
    assert c.is_model_ready("embed", headers=auth())
    assert not c.is_model_ready("nope", headers=auth())
    meta = c.get_model_metadata("embed", headers=auth())
    assert meta["name"] == "embed"
    assert meta["outputs"] == [{"name": "embedding", "datatype": "FP32", "shape": [-1, 384]}]
    assert c.get_server_metadata(headers=auth())["name"] == "flowbatch"


def test_oip_bytes_to_fp32_embeddings(triton: object) -> None:
    import tritonclient.http as httpclient

    c: httpclient.InferenceServerClient = triton  # type: ignore[assignment]
    texts = np.array([b"a cat sat on the mat", b"the stock market fell", b"a kitten on a rug"],
                     dtype=object)
    for binary in (True, False):
        inp = httpclient.InferInput("text", [3], "BYTES")
        inp.set_data_from_numpy(texts, binary_data=binary)
        out = httpclient.InferRequestedOutput("embedding", binary_data=binary)
        result = c.infer("embed", [inp], outputs=[out], headers=auth())
        emb = result.as_numpy("embedding")
        assert emb.shape == (3, 384) and emb.dtype == np.float32
        assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)
        # the two sentences about cats are closer to each other than to the market
        assert emb[0] @ emb[2] > emb[0] @ emb[1]


@pytest.mark.parametrize("binary", [True, False])
def test_oip_numeric_tensors(triton: object, binary: bool) -> None:
    import tritonclient.http as httpclient

    c: httpclient.InferenceServerClient = triton  # type: ignore[assignment]
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    inp = httpclient.InferInput("x", [4, 3], "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    result = c.infer("double", [inp], headers=auth(),
                     outputs=[httpclient.InferRequestedOutput("output", binary_data=binary)])
    assert result.as_numpy("output").dtype == np.float32
    assert np.array_equal(result.as_numpy("output"), x * 2)

    ids = np.array([1, -2, 3 << 40], dtype=np.int64)
    inp = httpclient.InferInput("ids", [3], "INT64")
    inp.set_data_from_numpy(ids, binary_data=binary)
    result = c.infer("double", [inp], headers=auth())  # no outputs named: all, binary
    got = result.as_numpy("output")
    assert got.dtype == np.int64 and list(got) == [2, -4, 6 << 40]


def test_oip_several_inputs_give_several_outputs(triton: object) -> None:
    import tritonclient.http as httpclient

    c: httpclient.InferenceServerClient = triton  # type: ignore[assignment]
    a = httpclient.InferInput("a", [2], "INT64")
    a.set_data_from_numpy(np.array([1, 2], dtype=np.int64))
    b = httpclient.InferInput("b", [2, 2], "FP64")
    b.set_data_from_numpy(np.array([[0.5, 1.0], [1.5, 2.0]]))
    result = c.infer("double", [a, b], headers=auth(), request_id="req-7")
    assert list(result.as_numpy("a")) == [2, 4]
    assert result.as_numpy("b").tolist() == [[1.0, 2.0], [3.0, 4.0]]
    assert result.get_response()["id"] == "req-7"


def test_oip_errors(triton: object) -> None:
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    c: httpclient.InferenceServerClient = triton  # type: ignore[assignment]
    inp = httpclient.InferInput("x", [2], "BYTES")
    inp.set_data_from_numpy(np.array([b"ok", b"bad"], dtype=object))
    with pytest.raises(InferenceServerException, match="row 1") as info:
        c.infer("echo", [inp], headers=auth())
    assert info.value.status() == "422"
    with pytest.raises(InferenceServerException, match="not served") as info:
        c.infer("nope", [inp], headers=auth())
    assert info.value.status() == "404"
    with pytest.raises(InferenceServerException, match="API key"):
        c.infer("echo", [inp])


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"inputs": []}, "non-empty list"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [1]}]}, "1 values"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": ["a"]}]},
         "FP32 numbers"),
        ({"inputs": [{"name": "x", "datatype": "INT64", "shape": [1], "data": [1.5]}]},
         "INT64 numbers"),
        ({"inputs": [{"name": "x", "datatype": "BF16", "shape": [1], "data": [1]}]},
         "not supported"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [], "data": [1]}]}, "shape"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1]}]}, "no \"data\""),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]},
                     {"name": "y", "datatype": "FP32", "shape": [2], "data": [1, 2]}]},
         "batch size"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}],
          "parameters": {"timeout": -5}}, "microseconds"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}],
          "outputs": [{"name": "nope"}]}, "do not exist"),
    ],
)
def test_oip_bad_requests(server: ThreadServer, body: dict[str, object], needle: str) -> None:
    r = httpx.post(f"{server.url}/v2/models/double/infer", json=body, headers=auth())
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]


def test_oip_binary_size_mismatch(server: ThreadServer) -> None:
    header = b'{"inputs":[{"name":"x","datatype":"FP32","shape":[2],"parameters":{"binary_data_size":8}}]}'
    r = httpx.post(f"{server.url}/v2/models/double/infer", content=header + b"\x00" * 4,
                   headers={**AUTH, "Inference-Header-Content-Length": str(len(header))})
    assert r.status_code == 400 and "binary_data_size" in r.json()["error"]


def test_oip_timeout_parameter(server: ThreadServer) -> None:
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}],
            "parameters": {"timeout": 60_000_000}}
    r = httpx.post(f"{server.url}/v2/models/double/infer", json=body, headers=auth())
    assert r.status_code == 200
    assert r.json()["outputs"][0] == {"name": "output", "datatype": "FP32", "shape": [1],
                                      "data": [2.0]}


# ------------------------------------------------------------------ OpenAI


@pytest.fixture
def openai_client(server: ThreadServer) -> Iterator[object]:
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    yield client
    client.close()


def test_openai_embeddings(openai_client: object) -> None:
    import openai

    c: openai.OpenAI = openai_client  # type: ignore[assignment]
    res = c.embeddings.create(model="embed", input=["a cat sat on the mat", "a kitten on a rug",
                                                     "interest rates rose"])
    assert [d.index for d in res.data] == [0, 1, 2]
    vecs = np.array([d.embedding for d in res.data])
    assert vecs.shape == (3, 384)
    assert vecs[0] @ vecs[1] > vecs[0] @ vecs[2]
    one = c.embeddings.create(model="embed", input="a cat sat on the mat", encoding_format="float")
    assert np.allclose(one.data[0].embedding, vecs[0], atol=1e-5)
    assert res.model == "embed" and res.object == "list"
    # Usage counts the tokens the model saw: [CLS] ... [SEP] per input.
    assert res.usage.prompt_tokens == res.usage.total_tokens == 8 + 7 + 5
    assert one.usage.prompt_tokens == 8


def test_openai_errors(openai_client: object, server: ThreadServer) -> None:
    import openai

    c: openai.OpenAI = openai_client  # type: ignore[assignment]
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        c.embeddings.create(model="gpt-nope", input="x")
    with pytest.raises(openai.BadRequestError, match="token-id"):
        c.embeddings.create(model="embed", input=[[1, 2, 3]])
    with pytest.raises(openai.BadRequestError, match="does not produce embeddings"):
        c.embeddings.create(model="echo", input="x")
    with pytest.raises(openai.BadRequestError, match="dimensions"):
        c.embeddings.create(model="embed", input="x", dimensions=10)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong",
                      max_retries=0).embeddings.create(model="embed", input="x")
    r = httpx.post(f"{server.url}/v1/embeddings", content=b"{", headers=auth())
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"
