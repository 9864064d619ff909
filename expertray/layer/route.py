"""One routed batch, Ray-free, in order: gate → routing policy → replica selection → dispatch plan → buckets per
actor (`prepare`), the transport's exchange, then combine (`finish`); `run_layer` is the three together.

The RouterActor's `run_batch` is `run_layer` plus bookkeeping; tests run it with the in-process transport
(`InProcessTransport`) and compare with the reference MoELayer.forward.
T tokens, k choices, D = d_model, N routed rows, S_l destinations (physical slots) of the layer.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from expertray.config import MoELayerConfig
from expertray.layer.capacity import CapacityResult
from expertray.layer.dispatch import DispatchPlan, build_plan, combine, permute
from expertray.layer.experts import ExpertWeights, SharedExpert, swiglu
from expertray.layer.gating import GateOutput, GateWeights, gate
from expertray.seams import ReplicaSelector, RoutingPolicy, Transport, TransportStats
from expertray.state.placement_table import LayerRoute, PlacementTable


@dataclass(frozen=True)
class ActorBucket:
    """The rows one expert actor gets: rows[row_start : row_start + num_rows], grouped by `experts`."""

    actor: int
    row_start: int
    num_rows: int
    experts: list[int]
    counts: list[int]


@dataclass(frozen=True)
class PreparedBatch:
    """Everything decided before the transport. rows: [N, D] in plan order (contiguous per actor)."""

    layer: int
    gate: GateOutput
    routing: CapacityResult
    dests: torch.Tensor
    plan: DispatchPlan
    rows: torch.Tensor
    buckets: list[ActorBucket]
    expert_counts: torch.Tensor
    timings_ms: dict[str, float] = field(default_factory=dict)

    @property
    def split_sizes(self) -> list[int]:
        """Rows per actor, in table actor order (the all-to-all's split sizes)."""
        return [b.num_rows for b in self.buckets]


@dataclass
class LayerParams:
    """What a router holds per layer: the gate, and the shared expert (computed at the router)."""

    gate: GateWeights
    shared: SharedExpert | None

    def in_dtype(self, dtype: torch.dtype) -> LayerParams:
        """The shared expert in the serving dtype (it runs on the serving-dtype rows); the gate stays float32."""
        s = self.shared
        if s is None:
            return self
        return LayerParams(self.gate, SharedExpert(s.gate_up.to(dtype), s.down.to(dtype),
                                                   None if s.gate is None else s.gate.to(dtype)))

    def to(self, device: torch.device) -> LayerParams:
        """The same parameters on `device` (once, when a router starts on its GPU): gate math then runs
        where the hidden states are."""
        return LayerParams(_tensors_to(self.gate, device), None if self.shared is None
                           else _tensors_to(self.shared, device))


def _tensors_to(obj: Any, device: torch.device) -> Any:
    """A copy of dataclass `obj` with every tensor field moved to `device` (None fields stay None)."""
    return dataclasses.replace(obj, **{f.name: getattr(obj, f.name).to(device) for f in dataclasses.fields(obj)
                                       if isinstance(getattr(obj, f.name), torch.Tensor)})


@dataclass
class BatchResult:
    """A finished batch: output [T, D], the prepared batch, the transport's stats, and the four timestamps
    (start, prepared, exchanged, combined; perf_counter seconds)."""

    output: torch.Tensor
    batch: PreparedBatch
    transport_stats: Any
    times: tuple[float, float, float, float]


async def run_layer(hidden: torch.Tensor, layer: int, cfg: MoELayerConfig, params: LayerParams,
                    policy: RoutingPolicy, selector: ReplicaSelector, table: PlacementTable, transport: Transport,
                    expert_load: torch.Tensor | None = None, dtype: torch.dtype | None = None,
                    suspects: frozenset[str] = frozenset(),
                    on_prepared: Callable[[PreparedBatch], None] | None = None) -> BatchResult:
    """Route hidden [T, D] through `layer` on `table`, exchange the buckets, combine.

    The gate sees `hidden` (and computes in float32); rows go out, and the combine and shared expert run,
    in the serving `dtype` (None: hidden's), as MoELayer.forward does; output [T, D] is in that dtype.
    suspects: actor ids to avoid wherever an expert has another replica (`Failover.suspects`).
    on_prepared: told the planned batch before its rows go out (the router learns which actors it waits on)."""
    t0 = time.perf_counter()
    route = table.masked_route(layer, suspects)
    batch = prepare(hidden, layer, cfg, params.gate, policy, selector, route, len(table.actors),
                    expert_load=expert_load, rows_dtype=dtype)
    if on_prepared is not None:
        on_prepared(batch)
    t1 = time.perf_counter()
    rows_out, tstats = await transport.exchange(batch)
    t2 = time.perf_counter()
    out = finish(batch, rows_out, hidden if dtype is None else hidden.to(dtype), params.shared)
    return BatchResult(out, batch, tstats, (t0, t1, t2, time.perf_counter()))


def prepare(hidden: torch.Tensor, layer: int, cfg: MoELayerConfig, gate_weights: GateWeights,
            policy: RoutingPolicy, selector: ReplicaSelector, route: LayerRoute, num_actors: int,
            expert_load: torch.Tensor | None = None, dest_load: torch.Tensor | None = None,
            local_actors: set[int] | None = None, rows_dtype: torch.dtype | None = None) -> PreparedBatch:
    """Route hidden [T, D] through the layer's gate and policies and cut the rows into per-actor buckets
    (rows in `rows_dtype`, None: hidden's; the gate computes in float32 either way)."""
    t0 = time.perf_counter()
    g = gate(hidden, cfg.gate, gate_weights)
    t1 = time.perf_counter()
    routing = policy.route(g, cfg.capacity, expert_load)
    dests = selector.select(routing.experts, route, dest_load, local_actors)
    plan = build_plan(dests, route.num_dests)  # the batch's one device→host transfer: the slot counts
    rows = permute(hidden, plan)
    if rows_dtype is not None:
        rows = rows.to(rows_dtype)
    buckets = _buckets(plan.host_counts, route.dest_actor.tolist(), route.dest_expert.tolist(), num_actors)
    expert_counts = _expert_counts(routing.experts, cfg.num_experts)
    timings = {"gate": (t1 - t0) * 1e3, "plan": (time.perf_counter() - t1) * 1e3}
    return PreparedBatch(layer, g, routing, dests, plan, rows, buckets, expert_counts, timings)


def _buckets(counts: tuple[int, ...], dest_actor: list[int], dest_expert: list[int], num_actors: int
             ) -> list[ActorBucket]:
    """Cut the plan's rows (grouped by destination, destinations contiguous per actor) into per-actor
    buckets, from host lists only."""
    buckets, start, dest = [], 0, 0
    for actor in range(num_actors):
        experts, ecounts, rows = [], [], 0
        while dest < len(dest_actor) and dest_actor[dest] == actor:
            if counts[dest]:
                experts.append(dest_expert[dest])
                ecounts.append(counts[dest])
                rows += counts[dest]
            dest += 1
        buckets.append(ActorBucket(actor, start, rows, experts, ecounts))
        start += rows
    return buckets


def _expert_counts(experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[E] kept assignments per logical expert from experts [T, k] (-1 = dropped), on experts' device.
    A scatter-add into E + 1 bins (the last takes the drops) instead of masking and `bincount`, both of
    which wait for the device on CUDA."""
    flat = experts.reshape(-1)
    bins = torch.zeros(num_experts + 1, dtype=torch.long, device=flat.device)
    ones = torch.ones(flat.numel(), dtype=torch.long, device=flat.device)
    return bins.index_add_(0, torch.where(flat >= 0, flat, num_experts), ones)[:num_experts]


def finish(batch: PreparedBatch, expert_rows: torch.Tensor, hidden: torch.Tensor,
           shared: SharedExpert | None) -> torch.Tensor:
    """Combine expert outputs [N, D] (plan order) into [T, D], plus the shared expert if any."""
    if expert_rows.shape != batch.rows.shape:
        raise RuntimeError(f"transport returned {tuple(expert_rows.shape)} rows for a batch of "
                           f"{tuple(batch.rows.shape)}; refusing to combine a partial answer")
    out = combine(expert_rows, batch.plan, batch.routing.weights)
    if shared is not None:
        out += shared(hidden)
    return out


def waits_on(batch: PreparedBatch, actors: tuple[str, ...], every_member: bool) -> frozenset[str]:
    """The actor ids a batch in flight waits for: those its plan sends rows to, or every actor when the
    transport is a collective group (`every_member`: an all-to-all stalls while any member is missing)."""
    if every_member:
        return frozenset(actors)
    return frozenset(actors[b.actor] for b in batch.buckets if b.num_rows)


class InProcessTransport(Transport):
    """Computes every bucket in this process from full expert weights per layer (tests, simulation)."""

    name = "in_process"
    every_member = False

    def __init__(self, experts: list[ExpertWeights]) -> None:
        self.experts = experts

    async def exchange(self, batch: PreparedBatch) -> tuple[torch.Tensor, TransportStats]:
        out = torch.empty_like(batch.rows)
        weights = self.experts[batch.layer]
        for b in batch.buckets:
            start = b.row_start
            for e, n in zip(b.experts, b.counts):
                swiglu(batch.rows[start:start + n], weights.gate_up[e], weights.down[e], out=out[start:start + n])
                start += n
        per_row = batch.rows.shape[1] * batch.rows.element_size()
        return out, TransportStats([b.num_rows * per_row for b in batch.buckets], {})

    async def close(self) -> None:
        return None
