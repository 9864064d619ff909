"""Wire formats of the HTTP API, decoded with limits and errors that name the problem.

application/msgpack: {"hidden": {"dtype": "float32", "shape": [..., D], "data": <raw little-endian bytes>}};
                     dtype float16 / float32 / float64 / bfloat16 (bf16: its 16-bit patterns, little-endian;
                     it decodes to a torch bf16 tensor, numpy having no bf16). The answer comes in the same dtype.
application/json:    {"hidden": [...[[x, ...], ...]...]} — nested lists of numbers, shape [..., D]; for small
                     inputs (at most MAX_JSON_BYTES, MAX_JSON_TOKENS tokens, MAX_JSON_DEPTH levels of nesting).
Anything else is refused (`media_type`). Used by the Serve app and its clients (expertray.client).
"""

from __future__ import annotations

import json
import re
from typing import Any

import msgpack
import numpy as np
import torch

from expertray.errors import InputError, OversizeError

WIRE_DTYPES = {"float32": np.float32, "float16": np.float16, "float64": np.float64, "bfloat16": np.uint16}
MAX_WIRE_BYTES = 512 * 2**20
MSGPACK = "application/msgpack"
JSON = "application/json"
MAX_JSON_BYTES = 64 * 2**20
MAX_JSON_TOKENS = 4096
MAX_JSON_DEPTH = 32  # the whole document; json.loads itself recurses (RecursionError near depth 1000)
_JSON_ESCAPE = re.compile(rb"\\.", re.DOTALL)
_JSON_STRING = re.compile(rb'"[^"]*"')
_NOT_STRUCTURE = bytes(sorted(set(range(256)) - set(b'[]{}"')))


class MediaTypeError(InputError):
    """A request body in a content type the API does not speak (HTTP 415)."""


def media_type(content_type: str | None) -> str:
    """The documented media type a Content-Type header names (parameters such as charset ignored)."""
    name = (content_type or "").split(";", 1)[0].strip().lower()
    if name not in (JSON, MSGPACK):
        shown = repr(name) if name else "none"
        raise MediaTypeError(f"content type {shown} is not supported: send {JSON} or {MSGPACK}")
    return name


def encode_tensor(array: np.ndarray | torch.Tensor) -> dict[str, Any]:
    """A numpy array, or a CPU tensor (bf16 included), as a wire tensor."""
    name = ""
    if isinstance(array, torch.Tensor):
        if array.dtype == torch.bfloat16:
            array, name = array.detach().cpu().contiguous().view(torch.int16).numpy().view(np.uint16), "bfloat16"
        else:
            array = array.detach().cpu().numpy()
    a = np.ascontiguousarray(array)
    name = name or a.dtype.name
    if name not in WIRE_DTYPES:
        raise InputError(f"dtype {a.dtype} cannot go on the wire (use one of {sorted(WIRE_DTYPES)})")
    return {"dtype": name, "shape": list(a.shape), "data": a.astype(a.dtype.newbyteorder("<")).tobytes()}


def decode_tensor(obj: Any, field: str = "hidden") -> np.ndarray | torch.Tensor:
    """A wire tensor back to a numpy array (bfloat16: a torch bf16 tensor); every malformed part is named."""
    if not isinstance(obj, dict):
        raise InputError(f"{field}: expected a map with dtype, shape, data; got {type(obj).__name__}")
    missing = [k for k in ("dtype", "shape", "data") if k not in obj]
    if missing:
        raise InputError(f"{field}: missing key(s) {missing}")
    dtype, shape, data = obj["dtype"], obj["shape"], obj["data"]
    if dtype not in WIRE_DTYPES:
        raise InputError(f"{field}.dtype: {dtype!r} not supported (use one of {sorted(WIRE_DTYPES)})")
    if not isinstance(shape, list | tuple) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise InputError(f"{field}.shape: must be a list of non-negative integers, got {shape!r}")
    if not isinstance(data, bytes | bytearray):
        raise InputError(f"{field}.data: must be raw bytes, got {type(data).__name__}")
    expected = np.dtype(WIRE_DTYPES[dtype]).itemsize
    for dim in shape:  # python ints: no int64 wrap-around on absurd shapes
        expected *= dim
    if len(data) != expected:
        raise InputError(f"{field}.data: {len(data)} bytes do not match shape {list(shape)} of {dtype} "
                         f"({expected} bytes)")
    array = np.frombuffer(data, dtype=np.dtype(WIRE_DTYPES[dtype]).newbyteorder("<")).astype(
        WIRE_DTYPES[dtype], copy=False).reshape(shape)
    if dtype == "bfloat16":  # a copy owns writable memory (frombuffer's view of the body is read-only)
        return torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16)
    return array


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack(payload: bytes) -> Any:
    """Decode one msgpack document; malformed input raises InputError naming the problem."""
    if len(payload) > MAX_WIRE_BYTES:
        raise OversizeError(f"request body of {len(payload)} bytes is over the {MAX_WIRE_BYTES}-byte limit")
    try:
        return msgpack.unpackb(payload, raw=False, max_bin_len=MAX_WIRE_BYTES, strict_map_key=True)
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError, TypeError) as exc:
        raise InputError(f"malformed msgpack body ({type(exc).__name__}: {exc})") from exc


def json_depth(body: bytes) -> int:
    """Deepest nesting of arrays/objects in a JSON text, brackets inside strings ignored.

    Escapes go first (so an escaped quote cannot end a string), then everything but brackets and quotes, then
    strings: what is left is the bracket skeleton, small enough to scan with numpy even for a 64 MiB body.
    """
    skeleton = _JSON_STRING.sub(b"", _JSON_ESCAPE.sub(b"", body).translate(None, _NOT_STRUCTURE))
    text = np.frombuffer(skeleton, dtype=np.uint8)
    step = ((text == ord("[")) | (text == ord("{"))).astype(np.int32) - ((text == ord("]")) | (text == ord("}")))
    return int(np.cumsum(step).max(initial=0))


def decode_json_hidden(body: bytes) -> np.ndarray:
    """A JSON request body to its hidden states, float32 of shape [..., D] (at least 2-D)."""
    if len(body) > MAX_JSON_BYTES:
        raise OversizeError(f"JSON body of {len(body)} bytes is over the {MAX_JSON_BYTES}-byte limit for JSON; "
                            f"send {MSGPACK}")
    depth = json_depth(body)
    if depth > MAX_JSON_DEPTH:
        raise InputError(f"JSON body is nested {depth} levels deep, over the limit of {MAX_JSON_DEPTH}")
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise InputError(f"malformed JSON body: {exc}") from exc
    if not isinstance(doc, dict) or "hidden" not in doc:
        raise InputError("JSON body must be an object with key 'hidden' (a [tokens][d_model] array)")
    rows = doc["hidden"]
    if not isinstance(rows, list) or not rows or not all(isinstance(r, list) for r in rows):
        raise InputError("hidden must be a non-empty list of rows, each a list of numbers")
    try:
        hidden = np.asarray(rows, dtype=np.float32)
    except ValueError as exc:
        if "inhomogeneous" in str(exc):
            raise InputError("hidden rows have different lengths") from exc
        raise InputError(f"hidden must contain only numbers: {exc}") from exc
    except TypeError as exc:
        raise InputError(f"hidden must contain only numbers: {exc}") from exc
    tokens = int(np.prod(hidden.shape[:-1]))
    if tokens > MAX_JSON_TOKENS:
        raise OversizeError(f"JSON request of {tokens} tokens is over the {MAX_JSON_TOKENS}-token limit for JSON; "
                            f"send {MSGPACK}")
    return hidden
