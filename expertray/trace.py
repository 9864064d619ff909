"""Routing traces: a versioned, streamable msgpack file of per-batch routing decisions, with offline replay
through any routing policy + replica selector + placement table, and analysis (load table, heatmap, summary).

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

from expertray.capacity import CapacityResult
from expertray.config import CapacityConfig
from expertray.errors import ConfigError, InputError, TraceFormatError
from expertray.gating import GateOutput
from expertray.loadstats import BATCH_MEASURES, LoadStats, balancedness, batch_measures, imbalance
from expertray.placement import PlacementTable
from expertray.policies.replica import REPLICA, ReplicaSelector
from expertray.policies.routing import RoutingPolicy

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


# --- replay -----------------------------------------------------------------------------------------
def gate_from_probs(probs: torch.Tensor, top_k: int, normalize: bool) -> GateOutput:
    """Rebuild a GateOutput from recorded gate probs [T, E]: top-k by probs, weights renormalised if the
    gate did. (A DeepSeek-V3 gate ranks by bias-corrected scores that the trace does not hold.)"""
    top, idx = probs.topk(top_k, dim=1)
    if normalize:
        top = top / top.sum(dim=1, keepdim=True).clamp_min(1e-30)
    return GateOutput(probs.clamp_min(1e-30).log(), probs, probs, idx, top)


def replay(trace: Trace, policy: RoutingPolicy, placement: PlacementTable,
           selector: ReplicaSelector | None = None, capacity: CapacityConfig | None = None,
           use_load: bool = True) -> dict[str, Any]:
    """Route every recorded batch's gate probs through `policy` (per layer), capacity, `selector` (default
    round_robin) and `placement`, as a live router would; per-layer loads and measures (means over batches).

    capacity defaults to dropless; use_load passes the policy the window load of the batches replayed so
    far, as the router does.
    """
    h = trace.header
    if (placement.num_layers, placement.num_experts) != (h.num_layers, h.num_experts):
        raise ConfigError(f"placement has {placement.num_layers} layers x {placement.num_experts} experts, "
                          f"trace has {h.num_layers} x {h.num_experts}")
    capacity = capacity or CapacityConfig(overflow="dropless")
    selector = selector or REPLICA.create("round_robin")
    normalize = bool(h.meta.get("normalize", True))
    stats = LoadStats(h.num_layers, h.num_experts)
    policies = [policy.for_layer(layer) for layer in range(h.num_layers)]
    A = len(placement.actors)
    expert_tokens = torch.zeros(h.num_layers, h.num_experts, dtype=torch.float64)
    actor_tokens = torch.zeros(h.num_layers, A, dtype=torch.float64)
    sums = {layer: dict.fromkeys(BATCH_MEASURES, 0.0) for layer in range(h.num_layers)}
    batches = [0] * h.num_layers
    for rec in trace:
        if rec.gate_probs is None:
            raise TraceFormatError(f"{trace.path}: record at byte {rec.offset} has no gate probs; replaying "
                                   "through a policy needs a trace recorded with gate probs")
        g = gate_from_probs(rec.gate_probs, h.top_k, normalize)
        load = stats.window_load(rec.layer).float() if use_load and stats.num_batches(rec.layer) else None
        r: CapacityResult = policies[rec.layer].route(g, capacity, load)
        route = placement.route(rec.layer)
        dest = selector.select(r.experts, route)
        kept = r.experts[r.experts >= 0]
        per_expert = torch.bincount(kept, minlength=h.num_experts).to(torch.float64)
        per_actor = torch.zeros(A, dtype=torch.float64).index_add_(
            0, route.dest_actor[dest[dest >= 0]], torch.ones(int((dest >= 0).sum()), dtype=torch.float64))
        stats.record(rec.layer, per_expert, r.num_dropped)
        expert_tokens[rec.layer] += per_expert
        actor_tokens[rec.layer] += per_actor
        for name, value in batch_measures(per_actor, per_expert, g.probs, r.experts, g.experts).items():
            sums[rec.layer][name] += value
        batches[rec.layer] += 1
    return {"layers": {str(layer): {
        "batches": batches[layer],
        "expert_tokens": expert_tokens[layer].tolist(),
        "actor_tokens": dict(zip(placement.actors, actor_tokens[layer].tolist(), strict=True)),
        **{m: v / max(batches[layer], 1) for m, v in sums[layer].items()},
    } for layer in range(h.num_layers)}}


# --- analysis ---------------------------------------------------------------------------------------
class _TimeBins:
    """Per-batch rows [E] summed into at most `max_bins` bins of equal batch counts (doubling as needed),
    so analysis memory stays bounded however long the trace."""

    def __init__(self, max_bins: int) -> None:
        self.max_bins = max_bins
        self.per_bin = 1
        self.rows: list[torch.Tensor] = []
        self.counts: list[int] = []
        self.starts: list[float] = []

    def add(self, row: torch.Tensor, t: float) -> None:
        if self.rows and self.counts[-1] < self.per_bin:
            self.rows[-1] += row
            self.counts[-1] += 1
            return
        if len(self.rows) == self.max_bins:
            self.rows = [sum(self.rows[i:i + 2]) for i in range(0, len(self.rows), 2)]
            self.counts = [sum(self.counts[i:i + 2]) for i in range(0, len(self.counts), 2)]
            self.starts = self.starts[::2]
            self.per_bin *= 2
            if self.counts[-1] < self.per_bin:
                self.add(row, t)
                return
        self.rows.append(row.clone())
        self.counts.append(1)
        self.starts.append(t)


@dataclass
class TraceAnalysis:
    """Per layer: expert_tokens [L, E] routed assignments, dropped [L], batches [L], tokens [L],
    mean per-batch expert imbalance [L], and expert-load time bins (start times, [bins, E] rows)."""

    header: TraceHeader
    expert_tokens: torch.Tensor
    dropped: list[int]
    batches: list[int]
    tokens: list[int]
    imbalance_sum: list[float]
    bins: list[_TimeBins]

    def summary(self) -> dict[str, Any]:
        h = self.header
        layers = {}
        for layer in range(h.num_layers):
            load = self.expert_tokens[layer]
            assigned = float(load.sum()) + self.dropped[layer]
            layers[str(layer)] = {
                "batches": self.batches[layer], "tokens": self.tokens[layer],
                "expert_tokens": load.tolist(), "dropped": self.dropped[layer],
                "drop_rate": self.dropped[layer] / assigned if assigned else 0.0,
                "balancedness_expert_total": balancedness(load), "imbalance_expert_total": imbalance(load),
                "imbalance_expert_mean_per_batch": self.imbalance_sum[layer] / max(self.batches[layer], 1),
                "hottest_experts": load.argsort(descending=True)[:min(8, h.num_experts)].tolist(),
            }
        return {"format": FORMAT, "version": VERSION, "num_layers": h.num_layers, "num_experts": h.num_experts,
                "top_k": h.top_k, "meta": h.meta, "layers": layers}


def analyze(trace: Trace, max_time_bins: int = 128) -> TraceAnalysis:
    """One streaming pass over the recorded choices (no replay): loads, drops and expert-load over time."""
    h = trace.header
    a = TraceAnalysis(h, torch.zeros(h.num_layers, h.num_experts, dtype=torch.float64), [0] * h.num_layers,
                      [0] * h.num_layers, [0] * h.num_layers, [0.0] * h.num_layers,
                      [_TimeBins(max_time_bins) for _ in range(h.num_layers)])
    for rec in trace:
        kept = rec.experts[rec.experts >= 0]
        row = torch.bincount(kept, minlength=h.num_experts).to(torch.float64)
        a.expert_tokens[rec.layer] += row
        a.dropped[rec.layer] += int((rec.experts < 0).sum())
        a.batches[rec.layer] += 1
        a.tokens[rec.layer] += rec.tokens
        a.imbalance_sum[rec.layer] += imbalance(row)
        a.bins[rec.layer].add(row, rec.t)
    return a


def write_heatmap(analysis: TraceAnalysis, path: str | Path) -> None:
    """PNG heatmap per layer: each expert's share of the routed tokens (rows) in each time bin (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    h = analysis.header
    per_layer_in = min(4.0, 1.5 + 0.04 * h.num_experts)
    fig, axes = plt.subplots(h.num_layers, 1, figsize=(10, per_layer_in * h.num_layers), squeeze=False)
    for layer, ax in enumerate(axes[:, 0]):
        bins = analysis.bins[layer]
        if not bins.rows:
            ax.set_title(f"layer {layer}: no batches")
            continue
        grid = torch.stack(bins.rows, dim=1)  # [E, bins]
        share = grid / grid.sum(dim=0, keepdim=True).clamp_min(1.0)
        im = ax.imshow(share.numpy(), aspect="auto", interpolation="nearest", cmap="viridis", origin="lower")
        ticks = list(range(0, len(bins.starts), max(1, len(bins.starts) // 8)))
        ax.set_xticks(ticks, [f"{bins.starts[i]:.3g}" for i in ticks])
        ax.set_xlabel(f"time bin start (s), {bins.per_bin} batch(es) per bin")
        ax.set_ylabel("expert")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"layer {layer}: share of routed tokens per expert")
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
