"""KServe Open Inference Protocol v2 (the Triton HTTP API), so existing clients work.

A request of N rows is N items for the batcher: row ``i`` of the input
tensor (or ``{name: row}`` when there are several inputs) is one item, and
the N results are stacked into the output tensor(s). A numeric row is a
numpy scalar (shape ``[N]``) or array (``[N, ...]``), so the datatype
survives the round trip; a BYTES row is a ``str`` (``bytes`` when it is not
UTF-8), and ``[N, 1]`` BYTES rows are single strings too. A result that is a
dict gives one output per key. Tensors: BOOL, INT8-64, UINT8-64, FP16, FP32,
FP64 and BYTES, as JSON ``data`` or in the binary tensor extension
(``Inference-Header-Content-Length``). The ``timeout`` request parameter is
in microseconds, as in Triton. Errors are ``{"error": "message"}``.

Model metadata reports what inference does: a pipeline served without the
outputs of its :class:`Signature` is probed, once, on the first metadata
request: one row made from the input specs (a word for BYTES, zeros for
numbers) goes through the pipeline, and its result gives the outputs'
names, datatypes and shapes, so a client that builds its requests from the
metadata gets what it was told.
"""

from __future__ import annotations

import asyncio
import logging
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from flowbatch import __version__

from .body import read_body
from .codec import JSON, decode_json_object, dump_json
from .errors import ApiError, bad_request, from_engine, not_found
from .service import outcome, parse_timeout

log = logging.getLogger("flowbatch.http")

if TYPE_CHECKING:
    from .service import Endpoint, Service

__all__ = ["OIPRoutes", "Signature", "TensorSpec"]

_NUMERIC: dict[str, str] = {
    "BOOL": "|b1", "UINT8": "|u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8",
    "INT8": "|i1", "INT16": "<i2", "INT32": "<i4", "INT64": "<i8",
    "FP16": "<f2", "FP32": "<f4", "FP64": "<f8",
}
_BY_KIND: dict[tuple[str, int], str] = {
    (np.dtype(v).kind, np.dtype(v).itemsize): k for k, v in _NUMERIC.items()
}
_DATATYPES = (*_NUMERIC, "BYTES")
_LEN = struct.Struct("<I")


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """An input or output as model metadata shows it (``-1``: any size)."""

    name: str
    datatype: str
    shape: tuple[int, ...] = (-1,)

    def __post_init__(self) -> None:
        if self.datatype not in _DATATYPES:
            raise ValueError(
                f"TensorSpec {self.name!r}: datatype {self.datatype!r} is not one of {list(_DATATYPES)}"
            )
        if not self.shape or not all(isinstance(d, int) and d >= -1 for d in self.shape):
            raise ValueError(
                f"TensorSpec {self.name!r}: shape must be sizes (-1: any), the batch first, "
                f"got {self.shape!r}"
            )

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(frozen=True, slots=True)
class Signature:
    """What ``GET /v2/models/{name}`` reports; the first output names a plain result.

    ``outputs=None`` (the default): learned from one probe row made from
    ``inputs`` (see the module docstring). Give the outputs to skip the
    probe, e.g. for a pipeline whose calls have side effects::

        Signature(inputs=(TensorSpec("text", "BYTES"),),
                  outputs=(TensorSpec("embedding", "FP32", (-1, 384)),))
    """

    inputs: tuple[TensorSpec, ...] = (TensorSpec("input", "BYTES"),)
    outputs: tuple[TensorSpec, ...] | None = None


DEFAULT_SIGNATURE = Signature()
#: What metadata reports for the outputs when a probe cannot tell.
_UNKNOWN_OUTPUTS = (TensorSpec("output", "BYTES"),)
#: Seconds a probe may take when ``ServeConfig.default_timeout`` is not set.
_PROBE_TIMEOUT = 60.0
_PROBE_TEXT = "flowbatch"


def oip_error(err: ApiError) -> Response:
    return Response(dump_json({"error": err.message}), err.status, err.headers, media_type=JSON)


# ----------------------------------------------------------------- inputs


def _flatten(data: Any, out: list[Any]) -> None:
    if isinstance(data, list):
        for x in data:
            _flatten(x, out)
    else:
        out.append(data)


def _split_bytes(raw: bytes, count: int, name: str) -> list[bytes]:
    items: list[bytes] = []
    pos = 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise bad_request(f"input {name!r}: BYTES data ends inside a length prefix")
        (n,) = _LEN.unpack_from(raw, pos)
        pos += 4
        if pos + n > len(raw):
            raise bad_request(f"input {name!r}: a BYTES element runs past the end of its data")
        items.append(raw[pos:pos + n])
        pos += n
    if len(items) != count:
        raise bad_request(f"input {name!r}: {len(items)} BYTES elements for a shape of {count}")
    return items


def _text(b: bytes) -> str | bytes:
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return b


def _decode_input(spec: Any, binary: bytes, offset: int) -> tuple[str, npt.NDArray[Any], int]:
    if not isinstance(spec, dict):
        raise bad_request("each entry of \"inputs\" must be an object")
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise bad_request("an input has no \"name\" (a non-empty string)")
    datatype = spec.get("datatype")
    if datatype not in _DATATYPES:
        raise bad_request(
            f"input {name!r}: datatype {datatype!r} is not supported; use one of {list(_DATATYPES)}"
        )
    shape = spec.get("shape")
    if (
        not isinstance(shape, list) or not shape
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise bad_request(
            f"input {name!r}: \"shape\" must be a list of sizes >= 0 with the batch first, "
            f"got {shape!r}"
        )
    count = math.prod(shape)
    params = spec.get("parameters") or {}
    if not isinstance(params, dict):
        raise bad_request(f"input {name!r}: \"parameters\" must be an object")
    size = params.get("binary_data_size")
    if size is not None:
        if (
            not isinstance(size, int) or isinstance(size, bool)
            or size < 0 or offset + size > len(binary)
        ):
            raise bad_request(
                f"input {name!r}: binary_data_size {size!r} does not fit the "
                f"{len(binary) - offset} bytes of binary data left"
            )
        raw = binary[offset:offset + size]
        offset += size
        if datatype == "BYTES":
            # Split first: the elements prove the shape before anything is allocated for it.
            texts = [_text(b) for b in _split_bytes(raw, count, name)]
            arr = np.empty(count, dtype=object)
            arr[:] = texts
            return name, arr.reshape(shape), offset
        dtype = np.dtype(_NUMERIC[datatype])
        if size != count * dtype.itemsize:
            raise bad_request(
                f"input {name!r}: {size} bytes of {datatype} for shape {shape} "
                f"(needs {count * dtype.itemsize})"
            )
        return name, np.frombuffer(raw, dtype=dtype).reshape(shape).copy(), offset
    if "data" not in spec:
        raise bad_request(f"input {name!r}: no \"data\" and no binary_data_size parameter")
    flat: list[Any] = []
    _flatten(spec["data"], flat)
    if len(flat) != count:
        raise bad_request(f"input {name!r}: {len(flat)} values for shape {shape} ({count})")
    if datatype == "BYTES":
        if not all(isinstance(x, str) for x in flat):
            raise bad_request(f"input {name!r}: BYTES data must be strings in JSON")
        arr = np.empty(count, dtype=object)
        arr[:] = flat
        return name, arr.reshape(shape), offset
    if datatype == "BOOL":
        if not all(isinstance(x, bool) for x in flat):
            raise bad_request(f"input {name!r}: BOOL data must be true or false")
    elif any(isinstance(x, bool) for x in flat) or not all(
        isinstance(x, int if datatype[0] in "IU" else int | float) for x in flat
    ):
        raise bad_request(f"input {name!r}: data must be {datatype} numbers")
    try:  # a number too large for FP16/FP32 raises instead of becoming inf
        with np.errstate(over="raise", invalid="raise"):
            arr = np.asarray(flat, dtype=_NUMERIC[datatype])
    except (ValueError, TypeError, OverflowError, FloatingPointError) as exc:
        raise bad_request(f"input {name!r}: data does not fit {datatype}: {exc}") from None
    return name, arr.reshape(shape), offset


def _row(arr: npt.NDArray[Any], i: int) -> Any:
    row = arr[i]
    if arr.dtype == object:
        if arr.ndim == 1 or all(d == 1 for d in arr.shape[1:]):
            return row if arr.ndim == 1 else row.reshape(-1)[0]
        return row.tolist()
    return row  # a numpy scalar or row: the datatype survives the round trip


# ---------------------------------------------------------------- outputs


def _tensor(values: Sequence[Any], name: str) -> tuple[str, npt.NDArray[Any]]:
    """Stack one result per row into a tensor; the datatype follows the values."""
    first = values[0]
    if isinstance(first, str | bytes):
        arr = np.empty(len(values), dtype=object)
        arr[:] = list(values)
        return "BYTES", arr
    try:
        arr = np.asarray(values)
    except ValueError as exc:
        raise ApiError(
            500, "bad_output", f"output {name!r}: rows of different shapes cannot form a tensor ({exc})"
        ) from None
    if arr.dtype.kind in "US" or arr.dtype == object:
        flat = arr.reshape(-1)
        if not all(isinstance(x, str | bytes) for x in flat):
            raise ApiError(500, "bad_output", f"output {name!r}: values are not numbers or text")
        obj = np.empty(arr.shape, dtype=object)
        obj[...] = arr
        return "BYTES", obj
    datatype = _BY_KIND.get((arr.dtype.kind, arr.dtype.itemsize))
    if datatype is None:
        raise ApiError(500, "bad_output", f"output {name!r}: numpy {arr.dtype} has no OIP datatype")
    return datatype, arr


def _bytes_payload(arr: npt.NDArray[Any]) -> bytes:
    parts: list[bytes] = []
    for x in arr.reshape(-1):
        b = x.encode("utf-8") if isinstance(x, str) else bytes(x)
        parts.append(_LEN.pack(len(b)))
        parts.append(b)
    return b"".join(parts)


def _json_data(datatype: str, arr: npt.NDArray[Any]) -> list[Any]:
    flat = arr.reshape(-1)
    if datatype == "BYTES":
        return [x if isinstance(x, str) else bytes(x).decode("utf-8", "backslashreplace")
                for x in flat]
    data: list[Any] = flat.tolist()
    return data


class OIPRoutes:
    """Handlers of the OIP v2 routes, bound to one service."""

    def __init__(self, service: Service, signatures: dict[str, Signature] | None = None) -> None:
        self.service = service
        self.signatures = signatures or {}
        self._probing: dict[str, asyncio.Lock] = {}

    def routes(self) -> list[Route]:
        m = "/v2/models/{name}"
        mv = "/v2/models/{name}/versions/{version}"
        return [
            Route("/v2", self.server_metadata, methods=["GET"]),
            Route("/v2/health/live", self.live, methods=["GET"]),
            Route("/v2/health/ready", self.ready, methods=["GET"]),
            Route(m, self.model_metadata, methods=["GET"]),
            Route(mv, self.model_metadata, methods=["GET"]),
            Route(f"{m}/ready", self.model_ready, methods=["GET"]),
            Route(f"{mv}/ready", self.model_ready, methods=["GET"]),
            Route(f"{m}/infer", self.infer, methods=["POST"]),
            Route(f"{mv}/infer", self.infer, methods=["POST"]),
        ]

    def _endpoint(self, request: Request) -> Endpoint:
        name = request.path_params["name"]
        ep = self.service.endpoints.get(name)
        if ep is None:
            raise not_found(f"model {name!r} is not served here; models: {sorted(self.service.endpoints)}")
        version = request.path_params.get("version")
        if version not in (None, "", "1"):
            raise not_found(f"model {name!r} has no version {version!r}; it has version '1'")
        return ep

    async def server_metadata(self, request: Request) -> Response:
        doc = {"name": "flowbatch", "version": __version__, "extensions": ["binary_tensor_data"]}
        return Response(dump_json(doc), media_type=JSON)

    async def live(self, request: Request) -> Response:
        return Response(b'{"live":true}', media_type=JSON)

    async def ready(self, request: Request) -> Response:
        ok = self.service.ready
        return Response(dump_json({"ready": ok}), 200 if ok else 503, media_type=JSON)

    async def model_metadata(self, request: Request) -> Response:
        ep = self._endpoint(request)
        sig = await self._signature(ep, request)
        assert sig.outputs is not None
        doc = {
            "name": ep.name,
            "versions": ["1"],
            "platform": "flowbatch",
            "inputs": [t.as_dict() for t in sig.inputs],
            "outputs": [t.as_dict() for t in sig.outputs],
        }
        return Response(dump_json(doc), media_type=JSON)

    async def _signature(self, ep: Endpoint, request: Request) -> Signature:
        """``ep``'s signature, its outputs learned by a probe the first time."""
        sig = self.signatures.get(ep.name, DEFAULT_SIGNATURE)
        if sig.outputs is not None:
            return sig
        async with self._probing.setdefault(ep.name, asyncio.Lock()):
            sig = self.signatures.get(ep.name, DEFAULT_SIGNATURE)
            if sig.outputs is not None:
                return sig  # learned while this request waited
            outputs = await self._probe(ep, sig, request)
            if outputs is None:
                return replace(sig, outputs=_UNKNOWN_OUTPUTS)  # try again next time
            learned = replace(sig, outputs=outputs)
            self.signatures[ep.name] = learned
            log.info("model %r: outputs %s, learned from a probe",
                     ep.name, [t.as_dict() for t in outputs])
            return learned

    async def _probe(
        self, ep: Endpoint, sig: Signature, request: Request
    ) -> tuple[TensorSpec, ...] | None:
        """The output specs of two probe rows' results (sizes that differ are -1); None: unknown."""
        service = self.service
        rows = [_probe_row(sig.inputs, 1, _PROBE_TEXT), _probe_row(sig.inputs, 2, _PROBE_TEXT_2)]
        futs = service.admit(ep, rows, service.config.default_timeout or _PROBE_TIMEOUT)
        await service.wait(futs, request.receive)
        try:
            results = []
            for fut in futs:
                value, error = outcome(fut)
                if error is not None:
                    raise error
                results.append(value)
            first, second = (_output_specs(r, sig) for r in results)
        except Exception as exc:  # whatever failed, the answer is "cannot tell"
            log.warning(
                "model %r: the metadata probe failed (%s: %s), so its outputs show as BYTES [-1]; "
                "give them with create_app(signatures={%r: Signature(inputs=..., outputs=...)})",
                ep.name, type(exc).__name__, exc, ep.name,
            )
            return None
        others = {spec.name: spec for spec in second}
        return tuple(_merge_specs(spec, others.get(spec.name, spec)) for spec in first)

    async def model_ready(self, request: Request) -> Response:
        ep = self._endpoint(request)
        ok = self.service.ready and ep.ready
        return Response(dump_json({"name": ep.name, "ready": ok}), 200 if ok else 503, media_type=JSON)

    async def infer(self, request: Request) -> Response:
        service = self.service
        ep = self._endpoint(request)
        timeout = parse_timeout(request.headers.get("x-request-timeout"), service.config.default_timeout)
        body = await read_body(request, service.config.max_body_bytes)
        header_len = request.headers.get("inference-header-content-length")
        binary = b""
        if header_len is not None:
            if not _is_count(header_len) or not 0 < int(header_len) <= len(body):
                raise bad_request(
                    f"Inference-Header-Content-Length {header_len!r} does not fit a body of "
                    f"{len(body)} bytes"
                )
            cut = int(header_len)
            body, binary = body[:cut], body[cut:]
        doc = decode_json_object(
            body, 'send an inference request with "inputs"', what="the inference request"
        )
        request_id = doc.get("id")
        params = doc.get("parameters") or {}
        if not isinstance(params, dict):
            raise bad_request("\"parameters\" must be an object")
        timeout = _min_timeout(timeout, params.get("timeout"))
        specs = doc.get("inputs")
        if not isinstance(specs, list) or not specs:
            raise bad_request("\"inputs\" must be a non-empty list of tensors")
        tensors: dict[str, npt.NDArray[Any]] = {}
        offset = 0
        for spec in specs:
            name, arr, offset = _decode_input(spec, binary, offset)
            if name in tensors:
                raise bad_request(f"input {name!r} is given twice")
            tensors[name] = arr
        rows = {arr.shape[0] for arr in tensors.values()}
        if len(rows) != 1:
            raise bad_request(f"inputs disagree on the batch size (first dimension): {sorted(rows)}")
        n = rows.pop()
        if n == 0:
            raise bad_request("the batch is empty (first dimension 0)")
        service.check_count(ep, n)
        if len(tensors) == 1:
            (arr,) = tensors.values()
            values = [_row(arr, i) for i in range(n)]
        else:
            values = [{k: _row(a, i) for k, a in tensors.items()} for i in range(n)]
        wanted = _requested_outputs(doc.get("outputs"), params)
        futs = service.admit(ep, values, timeout)
        await service.wait(futs, request.receive)
        results = []
        for i, fut in enumerate(futs):
            value, error = outcome(fut)
            if error is not None:
                err = from_engine(error, service.config.retry_after)
                err.message = f"row {i}: {err.message}"
                raise err
            results.append(value)
        return self._answer(ep, request_id, results, wanted)

    def _answer(
        self, ep: Endpoint, request_id: Any, results: list[Any], wanted: dict[str, bool] | bool
    ) -> Response:
        sig = self.signatures.get(ep.name, DEFAULT_SIGNATURE)
        if all(isinstance(r, dict) for r in results):
            names = list(results[0])
            if any(list(r) != names for r in results):
                raise ApiError(500, "bad_output", "rows returned dicts with different keys")
            columns = {k: [r[k] for r in results] for k in names}
        else:
            columns = {sig.outputs[0].name if sig.outputs else "output": results}
        if isinstance(wanted, dict):
            unknown = sorted(set(wanted) - set(columns))
            if unknown:
                raise bad_request(
                    f"requested output(s) {unknown} do not exist; model {ep.name!r} has {list(columns)}"
                )
            plan = [(k, wanted[k]) for k in wanted]
        else:
            plan = [(k, wanted) for k in columns]
        outputs: list[dict[str, Any]] = []
        blobs: list[bytes] = []
        for name, binary in plan:
            datatype, arr = _tensor(columns[name], name)
            out: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(arr.shape)}
            if binary:
                blob = (_bytes_payload(arr) if datatype == "BYTES"
                        else np.ascontiguousarray(arr, dtype=_NUMERIC[datatype]).tobytes())
                out["parameters"] = {"binary_data_size": len(blob)}
                blobs.append(blob)
            else:
                out["data"] = _json_data(datatype, arr)
            outputs.append(out)
        doc: dict[str, Any] = {"model_name": ep.name, "model_version": "1", "outputs": outputs}
        if isinstance(request_id, str) and request_id:
            doc["id"] = request_id
        header = dump_json(doc)
        if not blobs:
            return Response(header, media_type=JSON)
        return Response(
            b"".join([header, *blobs]),
            headers={"Inference-Header-Content-Length": str(len(header))},
            media_type="application/octet-stream",
        )


def _is_count(text: str) -> bool:
    # str.isdigit alone also holds for digits int() refuses, such as "²"
    return text.isascii() and text.isdigit()


_PROBE_TEXT_2 = "a longer probe text, to tell fixed sizes from varying ones"


def _probe_row(inputs: Sequence[TensorSpec], size: int, text: str) -> Any:
    """One row as ``infer`` would make it from the input specs (``-1`` sizes: ``size``)."""
    tensors: dict[str, npt.NDArray[Any]] = {}
    for spec in inputs:
        shape = (1, *(size if d < 0 else d for d in spec.shape[1:]))
        if spec.datatype == "BYTES":
            arr = np.empty(shape, dtype=object)
            arr.fill(text)
        else:
            arr = np.zeros(shape, dtype=_NUMERIC[spec.datatype])
        tensors[spec.name] = arr
    if len(tensors) == 1:
        return _row(next(iter(tensors.values())), 0)
    return {k: _row(a, 0) for k, a in tensors.items()}


def _output_specs(result: Any, sig: Signature) -> list[TensorSpec]:
    """The outputs ``_answer`` makes of ``result`` (one row), the batch size as -1."""
    if isinstance(result, dict):
        columns = {str(k): [v] for k, v in result.items()}
    else:
        columns = {sig.outputs[0].name if sig.outputs else "output": [result]}
    specs = []
    for name, values in columns.items():
        datatype, arr = _tensor(values, name)
        specs.append(TensorSpec(name, datatype, (-1, *arr.shape[1:])))
    return specs


def _merge_specs(a: TensorSpec, b: TensorSpec) -> TensorSpec:
    """``a``, with -1 for every size where ``b`` differs."""
    if len(a.shape) != len(b.shape):
        return replace(a, shape=(-1,) * len(a.shape))
    return replace(a, shape=tuple(x if x == y else -1 for x, y in zip(a.shape, b.shape, strict=True)))


def _min_timeout(timeout: float | None, micros: Any) -> float | None:
    if micros is None:
        return timeout
    if not isinstance(micros, int) or isinstance(micros, bool) or micros <= 0:
        raise bad_request(f"parameter \"timeout\" must be microseconds > 0, got {micros!r}")
    seconds = micros / 1e6
    return seconds if timeout is None else min(timeout, seconds)


def _requested_outputs(specs: Any, params: dict[str, Any]) -> dict[str, bool] | bool:
    """``{name: binary}`` for the outputs asked for, or whether all are binary."""
    default = params.get("binary_data_output", False)
    if not isinstance(default, bool):
        raise bad_request("parameter \"binary_data_output\" must be true or false")
    if specs is None:
        return default
    if not isinstance(specs, list):
        raise bad_request("\"outputs\" must be a list")
    wanted: dict[str, bool] = {}
    for spec in specs:
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise bad_request("each requested output must be an object with a \"name\"")
        p = spec.get("parameters") or {}
        binary = p.get("binary_data", default) if isinstance(p, dict) else default
        if not isinstance(binary, bool):
            raise bad_request(f"output {spec['name']!r}: binary_data must be true or false")
        wanted[spec["name"]] = binary
    return wanted or default
