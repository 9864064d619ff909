"""The router's pure data path: gate → routing policy → replica selection → dispatch plan → buckets per
actor, and, after the transport, combine. No Ray here: the RouterActor calls `prepare` and `finish`.

T tokens, k choices, D = d_model, N routed rows, S_l destinations (physical slots) of the layer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from expertray.config import MoELayerConfig
from expertray.layer.capacity import CapacityResult
from expertray.layer.dispatch import DispatchPlan, build_plan, combine, permute
from expertray.layer.experts import SharedExpert
from expertray.layer.gating import GateOutput, GateWeights, gate
from expertray.seams import ReplicaSelector, RoutingPolicy
from expertray.state.placement_table import LayerRoute


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
