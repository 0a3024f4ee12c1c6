"""OIP v2 model metadata tells the truth: a client that builds its request from it works.

Pipelines served without output specs are probed on the first metadata request;
the test client (tritonclient) knows nothing but the metadata.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from httphelpers import ThreadServer, serve_in_thread

import flowbatch as fb
from flowbatch.http import Signature, TensorSpec, create_app


async def vectorize(text: str) -> Any:
    return np.array([len(text), 1.0, 0.0], dtype=np.float32)


async def per_char(text: str) -> Any:
    """A vector per character: the second size varies with the input."""
    return np.array([[ord(ch), 1] for ch in text], dtype=np.float32)


async def classify(text: str) -> dict[str, Any]:
    return {"label": text.upper(), "score": float(len(text))}


def scale(row: Any) -> Any:
    return row * 2


async def ints_only(x: Any) -> int:
    if not isinstance(x, np.integer):
        raise TypeError("this model takes integers")
    return int(x)


@pytest.fixture(scope="module")
def server() -> Iterator[ThreadServer]:
    pipes = {
        "vec": fb.Pipeline([vectorize], name="vec"),
        "chars": fb.Pipeline([per_char], name="chars"),
        "classify": fb.Pipeline([classify], name="classify"),
        "scale": fb.Pipeline([fb.stage(scale, executor="thread")], name="scale"),
        "ints": fb.Pipeline([ints_only], name="ints"),
    }
    signatures = {"scale": Signature(inputs=(TensorSpec("x", "FP32", (-1, 3)),))}
    with serve_in_thread(create_app(pipes, signatures=signatures)) as srv:
        yield srv


@pytest.fixture
def triton(server: ThreadServer) -> Iterator[Any]:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url=f"127.0.0.1:{server.port}")
    yield client
    client.close()


def sample(datatype: str, shape: list[int]) -> Any:
    from tritonclient.utils import triton_to_np_dtype

    if datatype == "BYTES":
        words = np.array([b"a cat", b"sat on", b"the mat"], dtype=object)
        return np.resize(words, shape)
    return np.ones(shape, dtype=triton_to_np_dtype(datatype))


def fits(shape: list[int], spec: list[int]) -> bool:
    return len(shape) == len(spec) and all(s in (-1, n) for n, s in zip(shape, spec, strict=True))


@pytest.mark.parametrize("model", ["vec", "classify", "scale"])
def test_a_request_built_from_the_metadata_works(triton: Any, model: str) -> None:
    import tritonclient.http as httpclient
    from tritonclient.utils import triton_to_np_dtype

    meta = triton.get_model_metadata(model)
    inputs = []
    for spec in meta["inputs"]:
        shape = [3 if d == -1 else d for d in spec["shape"]]
        inp = httpclient.InferInput(spec["name"], shape, spec["datatype"])
        inp.set_data_from_numpy(sample(spec["datatype"], shape))
        inputs.append(inp)
    for binary in (False, True):
        outputs = [httpclient.InferRequestedOutput(o["name"], binary_data=binary)
                   for o in meta["outputs"]]
        result = triton.infer(model, inputs, outputs=outputs)
        for spec in meta["outputs"]:
            got = result.get_output(spec["name"])
            assert got["datatype"] == spec["datatype"], (model, got, spec)
            assert fits(got["shape"], spec["shape"]), (model, got, spec)
            arr = result.as_numpy(spec["name"])
            assert arr.dtype == triton_to_np_dtype(spec["datatype"])


def test_learned_outputs(triton: Any) -> None:
    assert triton.get_model_metadata("vec")["outputs"] == [
        {"name": "output", "datatype": "FP32", "shape": [-1, 3]}]
    # a size that follows the input is -1
    assert triton.get_model_metadata("chars")["outputs"] == [
        {"name": "output", "datatype": "FP32", "shape": [-1, -1, 2]}]
    assert triton.get_model_metadata("classify")["outputs"] == [
        {"name": "label", "datatype": "BYTES", "shape": [-1]},
        {"name": "score", "datatype": "FP64", "shape": [-1]}]
    meta = triton.get_model_metadata("scale")
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}]
    assert meta["outputs"] == [{"name": "output", "datatype": "FP32", "shape": [-1, 3]}]


def test_a_probe_that_fails_is_logged_and_metadata_still_answers(
    triton: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "flowbatch.http")
    meta = triton.get_model_metadata("ints")
    assert meta["outputs"] == [{"name": "output", "datatype": "BYTES", "shape": [-1]}]
    assert any("metadata probe failed" in r.getMessage() and "signatures=" in r.getMessage()
               for r in caplog.records)


def test_tensor_spec_is_checked() -> None:
    with pytest.raises(ValueError, match="datatype"):
        TensorSpec("x", "FLOAT32")
    with pytest.raises(ValueError, match="shape"):
        TensorSpec("x", "FP32", ())
