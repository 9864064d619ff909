"""One routed batch through a transport, Ray-free: gate → policy → plan → `transport.exchange` → combine.

The RouterActor's `run_batch` is this function plus bookkeeping; tests run it with an in-process transport
(`InProcessTransport`) and compare with MoELayer.forward.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from expertray.config import MoELayerConfig
from expertray.experts import ExpertWeights, SharedExpert, swiglu
from expertray.gating import GateWeights
from expertray.pipeline import PreparedBatch, ReplicaSelector, RoutingPolicy, finish, prepare
from expertray.placement_table import PlacementTable


@dataclass
class LayerParams:
    """What a router holds per layer: the gate, and the shared expert (computed at the router)."""

    gate: GateWeights
    shared: SharedExpert | None

    def to(self, device: torch.device) -> LayerParams:
        """The same parameters on `device` (once, when a router starts on its GPU): gate math then runs
        where the hidden states are."""
        return LayerParams(_tensors_to(self.gate, device), None if self.shared is None
                           else _tensors_to(self.shared, device))


def _tensors_to(obj: Any, device: torch.device) -> Any:
    """A copy of dataclass `obj` with every tensor field moved to `device` (None fields stay None)."""
    return dataclasses.replace(obj, **{f.name: getattr(obj, f.name).to(device) for f in dataclasses.fields(obj)
                                       if isinstance(getattr(obj, f.name), torch.Tensor)})


class Exchange(Protocol):
    """What the data path needs of a transport: rows [N, D] out in plan order, outputs [N, D] back."""

    async def exchange(self, batch: PreparedBatch) -> tuple[torch.Tensor, Any]: ...


@dataclass
class BatchResult:
    """A finished batch: output [T, D], the prepared batch, the transport's stats, and the four timestamps
    (start, prepared, exchanged, combined; perf_counter seconds)."""

    output: torch.Tensor
    batch: PreparedBatch
    transport_stats: Any
    times: tuple[float, float, float, float]


async def run_layer(hidden: torch.Tensor, layer: int, cfg: MoELayerConfig, params: LayerParams,
                    policy: RoutingPolicy, selector: ReplicaSelector, table: PlacementTable, transport: Exchange,
                    expert_load: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> BatchResult:
    """Route hidden [T, D] through `layer` on `table`, exchange the buckets, combine.

    The gate sees `hidden` (and computes in float32); rows go out, and the combine and shared expert run,
    in the serving `dtype` (None: hidden's), as MoELayer.forward does; output [T, D] is in that dtype."""
    t0 = time.perf_counter()
    route = table.route(layer)
    batch = prepare(hidden, layer, cfg, params.gate, policy, selector, route, len(table.actors),
                    expert_load=expert_load, rows_dtype=dtype)
    t1 = time.perf_counter()
    rows_out, tstats = await transport.exchange(batch)
    t2 = time.perf_counter()
    out = finish(batch, rows_out, hidden if dtype is None else hidden.to(dtype), params.shared)
    return BatchResult(out, batch, tstats, (t0, t1, t2, time.perf_counter()))


@dataclass
class InProcessStats:
    """TransportStats-shaped stats of the in-process transport."""

    bytes_out: list[int] = field(default_factory=list)
    compute_ms: dict[int, float] = field(default_factory=dict)

    @property
    def max_compute_ms(self) -> float:
        return max(self.compute_ms.values(), default=0.0)


class InProcessTransport:
    """Computes every bucket in this process from full expert weights per layer (tests, simulation)."""

    name = "in_process"

    def __init__(self, experts: list[ExpertWeights]) -> None:
        self.experts = experts

    async def exchange(self, batch: PreparedBatch) -> tuple[torch.Tensor, InProcessStats]:
        out = torch.empty_like(batch.rows)
        weights = self.experts[batch.layer]
        for b in batch.buckets:
            start = b.row_start
            for e, n in zip(b.experts, b.counts):
                swiglu(batch.rows[start:start + n], weights.gate_up[e], weights.down[e], out=out[start:start + n])
                start += n
        per_row = batch.rows.shape[1] * batch.rows.element_size()
        return out, InProcessStats([b.num_rows * per_row for b in batch.buckets], {})

    async def close(self) -> None:
        return None
