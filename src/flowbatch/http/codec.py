"""Bodies in and out: JSON (orjson) and msgpack (msgspec), chosen per request.

A request says ``Content-Type: application/msgpack`` to send msgpack; the
answer is msgpack when ``Accept`` names it, or when the request was msgpack
and ``Accept`` names nothing else. Pipeline outputs may hold numpy arrays and
scalars; they are written as lists and numbers. Nothing here unpickles.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable
from typing import Any

import msgspec
import orjson

from .errors import ApiError, bad_request

__all__ = [
    "JSON",
    "JSON_CODEC",
    "MSGPACK",
    "NDJSON",
    "Codec",
    "decode_body",
    "dump_json",
    "dump_msgpack",
    "loads_json",
    "pick_codec",
]

JSON = "application/json"
MSGPACK = "application/msgpack"
NDJSON = "application/x-ndjson"
_MSGPACK_TYPES = ("application/msgpack", "application/x-msgpack", "application/vnd.msgpack")
_JSON_OPTS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS


class Unencodable(TypeError):
    """A pipeline output that neither JSON nor msgpack can carry."""


def _to_plain(obj: Any) -> Any:
    """Fallback for values the encoders do not know (numpy, sets, bytes)."""
    tolist = getattr(obj, "tolist", None)
    if callable(tolist):
        return tolist()
    if isinstance(obj, set | frozenset):
        return list(obj)
    raise Unencodable(f"a value of type {type(obj).__name__} cannot be encoded")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(obj)).decode("ascii")
    return _to_plain(obj)


def dump_json(doc: Any) -> bytes:
    """Encode ``doc`` as JSON; raises :class:`Unencodable` for unknown types."""
    try:
        return orjson.dumps(doc, default=_json_default, option=_JSON_OPTS)
    except orjson.JSONEncodeError as exc:
        if "64-bit" not in str(exc):
            raise Unencodable(str(exc)) from exc
    # Integers past 64 bits: the standard library writes them, slower.
    try:
        return json.dumps(doc, default=_json_default, separators=(",", ":")).encode()
    except (TypeError, ValueError) as exc:
        raise Unencodable(str(exc)) from exc


_msgpack_encoder = msgspec.msgpack.Encoder(enc_hook=_to_plain)


def dump_msgpack(doc: Any) -> bytes:
    """Encode ``doc`` as msgpack; raises :class:`Unencodable` for unknown types."""
    try:
        return _msgpack_encoder.encode(doc)
    except (TypeError, ValueError, OverflowError) as exc:
        raise Unencodable(str(exc)) from exc


def _is_msgpack(content_type: str | None) -> bool:
    if not content_type:
        return False
    base = content_type.split(";", 1)[0].strip().lower()
    return base in _MSGPACK_TYPES


class Codec:
    """How one request's body is read and its answer written."""

    __slots__ = ("dump", "media_type", "msgpack_in")

    def __init__(self, msgpack_in: bool, msgpack_out: bool) -> None:
        self.msgpack_in = msgpack_in
        self.dump: Callable[[Any], bytes] = dump_msgpack if msgpack_out else dump_json
        self.media_type = MSGPACK if msgpack_out else JSON


JSON_CODEC = Codec(msgpack_in=False, msgpack_out=False)


def pick_codec(content_type: str | None, accept: str | None) -> Codec:
    """The codec for a request with these headers (415 for an unknown type)."""
    if not content_type and not accept:
        return JSON_CODEC
    msgpack_in = _is_msgpack(content_type)
    if not msgpack_in and content_type:
        base = content_type.split(";", 1)[0].strip().lower()
        if base not in (JSON, "text/json") and not base.endswith("+json"):
            raise ApiError(
                415, "unsupported_media_type",
                f"Content-Type {base!r} is not supported; send {JSON} or {MSGPACK}",
            )
    if accept and "msgpack" in accept:
        msgpack_out = True
    elif accept and ("json" in accept):
        msgpack_out = False
    else:
        msgpack_out = msgpack_in
    if not msgpack_in and not msgpack_out:
        return JSON_CODEC
    return Codec(msgpack_in, msgpack_out)


#: A run of digits as long as the shortest integer that orjson reads as a float.
_LONG_NUMBER = re.compile(rb"\d{19}")
_INT_MIN = -(1 << 63)
_INT_MAX = (1 << 64) - 1


class _TooBig(ValueError):
    pass


def _exact_int(text: str) -> int:
    value = int(text)
    if not _INT_MIN <= value <= _INT_MAX:
        raise _TooBig(text)
    return value


def loads_json(body: bytes, what: str = "the body") -> Any:
    """``orjson.loads``, except that an integer beyond 64 bits is a 400, not a float.

    orjson reads integers past the 64-bit range as floats, silently losing
    digits (an id of 2**70 would reach the stage rounded). Raises
    ``orjson.JSONDecodeError`` for text that is not JSON.
    """
    doc = orjson.loads(body)
    if _LONG_NUMBER.search(body) is not None:  # rare: look again, exactly
        try:
            json.loads(body, parse_int=_exact_int)
        except _TooBig as exc:
            digits = str(exc)
            shown = digits if len(digits) <= 40 else f"{digits[:20]}...{digits[-8:]}"
            raise bad_request(
                f"{what} holds the integer {shown}, which does not fit in 64 bits "
                f"({_INT_MIN} to {_INT_MAX}); send it as a string"
            ) from None
        except RecursionError:
            raise bad_request(f"{what} is nested too deeply") from None
    return doc


def decode_body(body: bytes, msgpack_in: bool) -> Any:
    """Parse a request body; a 400 that says what is wrong when it cannot."""
    if not body:
        raise bad_request("the request body is empty; send a JSON object such as {\"input\": ...}")
    if msgpack_in:
        try:
            return msgspec.msgpack.decode(body)
        except msgspec.DecodeError as exc:
            raise bad_request(f"the body is not valid msgpack: {exc}") from None
    try:
        return loads_json(body)
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"the body is not valid JSON: {exc}") from None


def decode_json_object(body: bytes, empty_hint: str, what: str = "the body") -> dict[str, Any]:
    """Parse a body that must be one JSON object; a 400 that says what is wrong."""
    if not body:
        raise bad_request(f"{what} is empty; {empty_hint}")
    try:
        doc = loads_json(body, what)
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise bad_request(f"{what} must be a JSON object")
    return doc
