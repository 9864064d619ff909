"""`expertray bench routing`: routing policies (topk, capacity, laser) on synthetic traffic.

For an OLMoE-like gate (E=64, k=8, no renormalisation) and a Mixtral-like gate (E=8, k=2, renormalised),
on flat-score and peaked-score Zipf-skewed traffic (plus measured C4 popularity when the counts file is
there): balance per device (a balanced placement over `actors`) and per expert, drop rate, gate mass
retained, top-k agreement, and the policy's own cost per token. Each batch comes from its own workload
seed, so the hot experts land on different devices from batch to batch; measures are means over batches.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any

import torch
import typer

from expertray.bench.report import emit, median, time_ms
from expertray.config import CapacityConfig, GateConfig
from expertray.gating import gate_from_logits
from expertray.loadstats import BATCH_MEASURES, batch_measures
from expertray.placement import PlacementTable
from expertray.policies.routing import ROUTING
from expertray.workload import Workload, WorkloadConfig, default_counts_file, popularity_from_counts

COUNTS_FILE = default_counts_file()
MODELS = {"olmoe": (GateConfig("qwen_moe", 64, 8, normalize=False), "olmoe_c4"),
          "mixtral": (GateConfig("mixtral", 8, 2, normalize=True), "mixtral_c4")}
FLAT, PEAKED = 2.0, 0.5  # logit temperatures: OLMoE top-8 share of gate mass ~0.42 vs ~0.98
POLICIES = {"topk": ("topk", CapacityConfig(overflow="dropless")),
            "capacity cf=1.0": ("capacity", CapacityConfig(factor=1.0, min_capacity=0, overflow="drop")),
            "capacity cf=1.25": ("capacity", CapacityConfig(factor=1.25, min_capacity=0, overflow="drop")),
            "laser": ("laser", CapacityConfig(overflow="dropless")),
            "laser cf=1.25": ("laser", CapacityConfig(factor=1.25, min_capacity=0, overflow="drop")),
            "laser device-aware": ("laser", CapacityConfig(overflow="dropless"))}
# Device-aware laser prices load per actor (as the router does with `device_aware=True`); its per-model
# parameters: a per-device price needs a stronger weight and a larger per-token guard to move whole devices.
DEVICE_AWARE = {"olmoe": {"balance_weight": 0.7, "max_mass_loss": 0.25},
                "mixtral": {"balance_weight": 0.35, "max_mass_loss": 0.25}}
GOAL_IMPROVEMENT, GOAL_MASS, GOAL_US_PER_TOKEN = 1.4, 0.97, 1.0


def _traffic(model: str, counts_file: Path | None) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {"flat_skewed": {"zipf_exponent": 1.0, "temperature": FLAT},
                                      "peaked_skewed": {"zipf_exponent": 1.0, "temperature": PEAKED}}
    if counts_file is not None and counts_file.exists():
        out["flat_c4"] = {"popularity": popularity_from_counts(counts_file, MODELS[model][1]), "temperature": FLAT}
    return out


def _measure(name: str, params: dict[str, Any], gates: list[Any], cfg: GateConfig, dest_actor: torch.Tensor,
             actors: int, repeats: int) -> dict[str, float]:
    policy_name, capacity = POLICIES[name]
    policy = ROUTING.create(policy_name, **params.get(name, params.get(policy_name, {})))
    sums = dict.fromkeys(BATCH_MEASURES, 0.0)
    for g in gates:
        r = policy.route(g, capacity)
        per_expert = torch.bincount(r.experts[r.experts >= 0], minlength=cfg.num_experts).to(torch.float64)
        per_device = torch.zeros(actors, dtype=torch.float64).index_add_(0, dest_actor, per_expert)
        for name, value in batch_measures(per_device, per_expert, g.probs, r.experts, g.experts).items():
            sums[name] += value
    out = {k: v / len(gates) for k, v in sums.items()}
    ms = median(time_ms(lambda: policy.route(gates[0], capacity), repeats))
    out["us_per_token"] = ms * 1e3 / gates[0].experts.shape[0]
    return out


def run(tokens: int = 4096, batches: int = 4, actors: int = 8, repeats: int = 7, threads: int = 1,
        counts_file: Path | None = COUNTS_FILE, laser_params: dict[str, Any] | None = None) -> dict:
    """All models x traffic x policies; `laser_params` override the laser's defaults."""
    torch.set_num_threads(threads)
    params = {"laser": dict(laser_params or {})}
    results: dict[str, Any] = {}
    goals: dict[str, Any] = {}
    for model, (cfg, _) in MODELS.items():
        dest_actor = PlacementTable.balanced(1, cfg.num_experts, [f"a{i}" for i in range(actors)]).route(0).dest_actor
        params["laser device-aware"] = {**DEVICE_AWARE[model], "expert_groups": tuple(dest_actor.tolist())}
        results[model] = {}
        for traffic, knobs in _traffic(model, counts_file).items():
            gates = [gate_from_logits(Workload(WorkloadConfig(num_experts=cfg.num_experts, tokens_per_batch=tokens,
                                                              seed=b, **knobs)).batch(0).logits, cfg)
                     for b in range(batches)]
            results[model][traffic] = {name: _measure(name, params, gates, cfg, dest_actor, actors, repeats)
                                       for name in POLICIES}
        flat = results[model]["flat_skewed"]
        top, laser, dev = flat["topk"], flat["laser"], flat["laser device-aware"]
        goals[model] = {
            "imbalance_improvement_device": top["imbalance_device"] / laser["imbalance_device"],
            "imbalance_improvement_expert": top["imbalance_expert"] / laser["imbalance_expert"],
            "gate_mass_retained": laser["gate_mass_retained"],
            "laser_us_per_token": laser["us_per_token"],
            "device_aware_improvement_device": top["imbalance_device"] / dev["imbalance_device"],
            "device_aware_gate_mass_retained": dev["gate_mass_retained"],
            "device_aware_us_per_token": dev["us_per_token"],
        }
        g = goals[model]
        g["met_device"] = g["imbalance_improvement_device"] >= GOAL_IMPROVEMENT and g["gate_mass_retained"] >= GOAL_MASS
        g["met_expert"] = g["imbalance_improvement_expert"] >= GOAL_IMPROVEMENT and g["gate_mass_retained"] >= GOAL_MASS
        g["met_cost"] = g["laser_us_per_token"] <= GOAL_US_PER_TOKEN
        g["met_device_aware"] = (g["device_aware_improvement_device"] >= GOAL_IMPROVEMENT
                                 and g["device_aware_gate_mass_retained"] >= GOAL_MASS
                                 and g["device_aware_us_per_token"] <= GOAL_US_PER_TOKEN)
    return {
        "config": {"tokens": tokens, "batches": batches, "actors": actors, "repeats": repeats,
                   "threads": torch.get_num_threads(), "flat_temperature": FLAT, "peaked_temperature": PEAKED,
                   "laser": dataclasses.asdict(ROUTING.create("laser", **params["laser"])),
                   "laser_device_aware": DEVICE_AWARE,
                   "counts_file": str(counts_file) if counts_file and counts_file.exists() else None},
        "goals": {"laser_over_topk_imbalance_at_least": GOAL_IMPROVEMENT, "gate_mass_at_least": GOAL_MASS,
                  "us_per_token_at_most": GOAL_US_PER_TOKEN, **goals},
        "results": results,
    }


def cli(tokens: int = 4096, batches: int = 4, actors: int = 8, repeats: int = 7, threads: int = 1,
        counts_file: Annotated[Path, typer.Option(help="measured expert counts (skipped if absent)")] = COUNTS_FILE,
        as_json: Annotated[bool, typer.Option("--json")] = False, out: Path | None = None) -> None:
    """Balance, drops, gate mass and cost of the routing policies on synthetic traffic."""
    r = run(tokens, batches, actors, repeats, threads, counts_file)
    rows = [[model, traffic, name, m["imbalance_device"], m["imbalance_expert"], m["drop_rate"],
             m["gate_mass_retained"], m["topk_agreement"], m["us_per_token"]]
            for model, per_traffic in r["results"].items() for traffic, per_policy in per_traffic.items()
            for name, m in per_policy.items()]
    emit("routing", r, rows, ["model", "traffic", "policy", "imbalance (device)", "imbalance (expert)",
                              "drop rate", "gate mass kept", "top-k agreement", "µs/token"], as_json, out)
