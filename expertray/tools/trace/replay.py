"""Offline replay of a routing trace through any routing policy + replica selector + placement table, as
a live router would route it."""

from __future__ import annotations

from typing import Any

import torch

from expertray.config import CapacityConfig
from expertray.errors import ConfigError, TraceFormatError
from expertray.layer.capacity import CapacityResult
from expertray.layer.gating import GateOutput
from expertray.policies.replica import REPLICA
from expertray.seams import ReplicaSelector, RoutingPolicy
from expertray.state.loadstats import BATCH_MEASURES, LoadStats, batch_measures
from expertray.state.placement_table import PlacementTable
from expertray.wire.trace import Trace


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
    # as the router does: per-layer parameters, then the live placement (device-aware pricing per actor)
    policies = [policy.for_layer(layer).for_route(placement.route(layer)) for layer in range(h.num_layers)]
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
