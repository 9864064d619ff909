"""msgpack wire format for tensors: {"dtype": "float32", "shape": [T, D], "data": <raw little-endian bytes>}.

Used by the HTTP API (application/msgpack) and its clients; decoding checks everything it is sent.
"""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np

from expertray.errors import InputError, OversizeError

WIRE_DTYPES = {"float32": np.float32, "float16": np.float16, "float64": np.float64}
MAX_WIRE_BYTES = 512 * 2**20


def encode_tensor(array: np.ndarray) -> dict[str, Any]:
    a = np.ascontiguousarray(array)
    if a.dtype.name not in WIRE_DTYPES:
        raise InputError(f"dtype {a.dtype} cannot go on the wire (use one of {sorted(WIRE_DTYPES)})")
    return {"dtype": a.dtype.name, "shape": list(a.shape), "data": a.astype(a.dtype.newbyteorder("<")).tobytes()}


def decode_tensor(obj: Any, field: str = "hidden") -> np.ndarray:
    """A wire tensor back to a numpy array; every malformed part is named."""
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
    return np.frombuffer(data, dtype=np.dtype(WIRE_DTYPES[dtype]).newbyteorder("<")).astype(
        WIRE_DTYPES[dtype], copy=False).reshape(shape)


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
