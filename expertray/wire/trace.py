"""The routing-trace format: a versioned, streamable msgpack file of per-batch routing decisions
(TraceWriter writes it, read_trace / Trace stream it back).

File layout: one header map {"format": "expertray-trace", "version": 1, "num_layers", "num_experts", "top_k",
"meta"}, then one map per (layer, batch): {"layer", "t" (seconds), "tokens": T, "experts": int16 [T, k]
(-1 = dropped), "scores": float16 [T, k] combine weights, "gate": float16 [T, E] gate probs or nil}, tensors
as raw little-endian bytes. Writing and reading both hold one record at a time.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import torch

from expertray.errors import ConfigError, InputError, TraceFormatError

FORMAT = "expertray-trace"
VERSION = 1
MAX_RECORD_BYTES = 64 << 20


@dataclass(frozen=True)
class TraceHeader:
    """meta: free-form provenance; `normalize` (bool) says whether the gate renormalised its top-k weights,
    which replay needs to rebuild combine weights from gate probs."""

    num_layers: int
    num_experts: int
    top_k: int
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_layers < 1:
            raise ConfigError(f"trace.num_layers: must be >= 1, got {self.num_layers}")
        if not 1 <= self.num_experts <= 32767:  # expert ids are stored as int16
            raise ConfigError(f"trace.num_experts: must be in [1, 32767], got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(f"trace.top_k: must be in [1, num_experts={self.num_experts}], got {self.top_k}")


@dataclass(frozen=True)
class TraceRecord:
    """One layer's routing of one batch. experts [T, k] int64 (-1 = dropped); weights [T, k] float32;
    gate_probs [T, E] float32 or None; offset: the record's byte offset in the file."""

    layer: int
    t: float
    experts: torch.Tensor
    weights: torch.Tensor
    gate_probs: torch.Tensor | None
    offset: int

    @property
    def tokens(self) -> int:
        return int(self.experts.shape[0])


class TraceWriter:
    """Context manager that streams records to `path` as they are written (nothing is buffered in memory
    beyond the file's own buffer). `t` defaults to seconds since the writer opened."""

    def __init__(self, path: str | Path, num_layers: int, num_experts: int, top_k: int,
                 meta: dict[str, Any] | None = None) -> None:
        self.header = TraceHeader(num_layers, num_experts, top_k, dict(meta or {}))
        self.path = Path(path)
        self._packer = msgpack.Packer(use_bin_type=True)
        self._file = open(self.path, "wb")  # held open across writes; close() / __exit__ closes it
        self._start = time.monotonic()
        h = self.header
        self._file.write(self._packer.pack({"format": FORMAT, "version": VERSION, "num_layers": h.num_layers,
                                            "num_experts": h.num_experts, "top_k": h.top_k, "meta": h.meta}))

    def write(self, layer: int, experts: torch.Tensor, weights: torch.Tensor,
              gate_probs: torch.Tensor | None = None, t: float | None = None) -> None:
        """Append one batch: experts [T, k] (-1 = dropped), weights [T, k], optional gate probs [T, E]."""
        h = self.header
        if not 0 <= layer < h.num_layers:
            raise InputError(f"trace write: layer {layer} outside 0..{h.num_layers - 1}")
        if experts.dim() != 2 or experts.shape[1] != h.top_k or tuple(weights.shape) != tuple(experts.shape):
            raise InputError(f"trace write: experts and weights must both be [T, {h.top_k}], "
                             f"got {tuple(experts.shape)} and {tuple(weights.shape)}")
        T = int(experts.shape[0])
        if T and (int(experts.min()) < -1 or int(experts.max()) >= h.num_experts):
            raise InputError(f"trace write: expert ids must be in [-1, {h.num_experts}), "
                             f"got [{int(experts.min())}, {int(experts.max())}]")
        if gate_probs is not None and tuple(gate_probs.shape) != (T, h.num_experts):
            raise InputError(f"trace write: gate_probs must be [{T}, {h.num_experts}], got {tuple(gate_probs.shape)}")
        record = {"layer": layer, "t": float(time.monotonic() - self._start if t is None else t), "tokens": T,
                  "experts": _pack(experts, "<i2"), "scores": _pack(weights, "<f2"),
                  "gate": None if gate_probs is None else _pack(gate_probs, "<f2")}
        self._file.write(self._packer.pack(record))

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _pack(x: torch.Tensor, dtype: str) -> bytes:
    return np.ascontiguousarray(x.detach().cpu().numpy().astype(dtype)).tobytes()


def _unpack(buf: Any, dtype: str, shape: tuple[int, int], what: str, where: str) -> np.ndarray:
    if not isinstance(buf, bytes):
        raise TraceFormatError(f"{where}: {what!r} must be bytes, got {type(buf).__name__}")
    need = shape[0] * shape[1] * 2
    if len(buf) != need:
        raise TraceFormatError(f"{where}: {what!r} has {len(buf)} bytes, expected {need} for shape {list(shape)}")
    return np.frombuffer(buf, dtype=dtype).reshape(shape)


class Trace:
    """A trace file: `header` is read and checked on open; iterating streams the records (re-iterable).

    max_record_bytes bounds the reader's buffer, i.e. the largest tensor field a record may hold.
    """

    def __init__(self, path: str | Path, max_record_bytes: int = MAX_RECORD_BYTES) -> None:
        self.path = Path(path)
        self.max_record_bytes = max_record_bytes
        self.header = self._read_header()

    def _unpacker(self, f: Any) -> msgpack.Unpacker:
        return msgpack.Unpacker(f, raw=False, max_buffer_size=self.max_record_bytes)

    def _next(self, u: msgpack.Unpacker, f: Any) -> tuple[int, Any] | None:
        """(offset, object) of the next record; None at a clean end of file."""
        offset = u.tell()
        try:
            return offset, u.unpack()
        except msgpack.OutOfData:
            size = os.fstat(f.fileno()).st_size
            if offset >= size:
                return None
            raise TraceFormatError(f"{self.path}: truncated record at byte {offset} "
                                   f"(file ends at byte {size})") from None
        except msgpack.BufferFull:
            raise TraceFormatError(f"{self.path}: record at byte {offset} holds a field larger than "
                                   f"max_record_bytes={self.max_record_bytes}") from None
        except (msgpack.UnpackException, ValueError) as exc:
            raise TraceFormatError(f"{self.path}: malformed msgpack at byte {offset} ({exc!r})") from None

    def _read_header(self) -> TraceHeader:
        with open(self.path, "rb") as f:
            first = self._next(self._unpacker(f), f)
        if first is None:
            raise TraceFormatError(f"{self.path}: empty file, expected an {FORMAT} header at byte 0")
        obj = first[1]
        if not isinstance(obj, dict):
            raise TraceFormatError(f"{self.path}: not an {FORMAT} file (byte 0 holds a msgpack "
                                   f"{type(obj).__name__}, not the header map)")
        if obj.get("format") != FORMAT:
            raise TraceFormatError(f"{self.path}: not an {FORMAT} file (header format is {obj.get('format')!r})")
        if obj.get("version") != VERSION:
            raise TraceFormatError(f"{self.path}: trace version {obj.get('version')!r} is not supported "
                                   f"(this reader supports version {VERSION})")
        try:
            meta = obj.get("meta") or {}
            if not isinstance(meta, dict):
                raise ConfigError(f"meta must be a map, got {type(meta).__name__}")
            return TraceHeader(int(obj["num_layers"]), int(obj["num_experts"]), int(obj["top_k"]), meta)
        except (KeyError, TypeError, ValueError) as exc:
            raise TraceFormatError(f"{self.path}: bad header at byte 0 ({exc})") from None

    def __iter__(self) -> Iterator[TraceRecord]:
        h = self.header
        with open(self.path, "rb") as f:
            u = self._unpacker(f)
            self._next(u, f)  # the header, checked on open
            while (item := self._next(u, f)) is not None:
                yield self._decode(item[1], item[0], h)

    def _decode(self, obj: Any, offset: int, h: TraceHeader) -> TraceRecord:
        where = f"{self.path}: record at byte {offset}"
        if not isinstance(obj, dict):
            raise TraceFormatError(f"{where}: expected a map, got {type(obj).__name__}")
        missing = sorted({"layer", "t", "tokens", "experts", "scores"} - set(obj))
        if missing:
            raise TraceFormatError(f"{where}: missing fields {missing}")
        layer, T, t = obj["layer"], obj["tokens"], obj["t"]
        if not isinstance(layer, int) or not 0 <= layer < h.num_layers:
            raise TraceFormatError(f"{where}: layer {layer!r} outside 0..{h.num_layers - 1}")
        if not isinstance(T, int) or T < 0:
            raise TraceFormatError(f"{where}: tokens must be a non-negative integer, got {T!r}")
        if not isinstance(t, (int, float)) or not math.isfinite(t):
            raise TraceFormatError(f"{where}: t must be a finite number, got {t!r}")
        experts = torch.from_numpy(_unpack(obj["experts"], "<i2", (T, h.top_k), "experts", where).astype(np.int64))
        if T and (int(experts.min()) < -1 or int(experts.max()) >= h.num_experts):
            raise TraceFormatError(f"{where}: expert ids outside [-1, {h.num_experts})")
        weights = torch.from_numpy(_unpack(obj["scores"], "<f2", (T, h.top_k), "scores", where).astype(np.float32))
        gate = obj.get("gate")
        probs = None if gate is None else torch.from_numpy(
            _unpack(gate, "<f2", (T, h.num_experts), "gate", where).astype(np.float32))
        return TraceRecord(layer, float(t), experts, weights, probs, offset)


def read_trace(path: str | Path, max_record_bytes: int = MAX_RECORD_BYTES) -> Trace:
    """Open a trace: the header is checked now, records are streamed on iteration."""
    return Trace(path, max_record_bytes)
