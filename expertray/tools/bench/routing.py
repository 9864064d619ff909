"""`expertray bench routing`: routing policies (topk, capacity, laser) on four traffic families.

Models: an OLMoE-like gate (E=64, k=8, no renormalisation) and a Mixtral-like gate (E=8, k=2, renormalised),
experts over 8 devices as `PlacementTable.balanced` places them. Traffic families, each at score
temperatures 2.0 and 1.0 (not sharply peaked) and 0.5 (sharply peaked): `zipf` (Zipf popularity + Gumbel
noise), `topical` (hidden states from a mixture of topical clusters through a gate: popularity from the
geometry), `hotspot` (bursty hot spots that move every 2 batches) and, when the counts file is there, `c4`
(measured C4 popularity; temperatures 2.0 and 1.0). Per family: device and expert imbalance, drop rate,
gate mass retained, top-k agreement, mean top-k share of the gate mass and the share of tokens laser may
move. Each batch has its own seed; measures are means over batches.

Also: the Pareto front (device imbalance vs gate mass kept) of `capacity` at several factors and
device-aware `laser` at several budgets; the cost per token of laser side by side with the top-k gate on
one thread; a held-out check (other seeds, other model shapes: Qwen3-like 128 experts on 16 devices,
DeepSeek-V3-like 256 sigmoid experts in 8 groups on 32 devices) with default parameters; and, with
--accuracy, how far laser-routed outputs of tiny real-architecture models move (routing_accuracy.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import torch
import typer

from expertray import data
from expertray.config import CapacityConfig, GateConfig
from expertray.layer.gating import GateOutput, gate_from_logits
from expertray.policies.routing import ROUTING, RoutingPolicy
from expertray.policies.routing.laser import LaserRouting
from expertray.state.loadstats import BATCH_MEASURES, batch_measures
from expertray.state.placement_table import PlacementTable
from expertray.tools.bench.report import emit, median
from expertray.tools.workload import (
    HotspotTraffic,
    TopicalTraffic,
    Workload,
    WorkloadConfig,
    popularity_from_counts,
)

# name: (gate, C4 counts entry or None, devices)
MODELS = {"olmoe": (GateConfig("qwen_moe", 64, 8, normalize=False), "olmoe_c4", 8),
          "mixtral": (GateConfig("mixtral", 8, 2, normalize=True), "mixtral_c4", 8)}
HELD_OUT_MODELS = {"qwen3": (GateConfig("qwen_moe", 128, 8, normalize=True), None, 16),
                   "deepseek_v3": (GateConfig("deepseek_v3", 256, 8, normalize=True, num_groups=8, topk_groups=4,
                                              routed_scaling_factor=2.5), None, 32)}
TEMPERATURES = (2.0, 1.0, 0.5)
PEAKED = 0.5  # the temperature whose scores are sharply peaked (top-k holds ~0.83-0.97 of the gate mass)
DROPLESS = CapacityConfig(overflow="dropless")
POLICIES: dict[str, tuple[str, CapacityConfig]] = {
    "topk": ("topk", DROPLESS),
    "capacity cf=1.0": ("capacity", CapacityConfig(factor=1.0, min_capacity=0, overflow="drop")),
    "capacity cf=1.25": ("capacity", CapacityConfig(factor=1.25, min_capacity=0, overflow="drop")),
    "laser": ("laser", DROPLESS),
    "laser device-aware": ("laser", DROPLESS),
}
CAPACITY_FACTORS = (1.0, 1.1, 1.25, 1.5, 2.0)
LASER_BUDGETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.08, 0.12)
GOAL_IMPROVEMENT, GOAL_MASS, GOAL_US_PER_TOKEN = 1.3, 0.97, 1.0
FLOOR = 1.05  # device imbalance counted as balanced (max within 5 % of the mean)

Batches = list[GateOutput]


def families(model: str, counts_file: Path | None, seed: int = 0) -> dict[str, Callable[[int, int, float], torch.Tensor]]:
    """{family: logits(batch, tokens, temperature) -> [tokens, E]} for `model`'s expert count."""
    E = {**MODELS, **HELD_OUT_MODELS}[model][0].num_experts

    def zipf(b: int, tokens: int, t: float, popularity: tuple[float, ...] | None = None) -> torch.Tensor:
        cfg = WorkloadConfig(num_experts=E, tokens_per_batch=tokens, temperature=t, seed=seed * 1000 + b,
                             popularity=popularity)
        return Workload(cfg).batch(0).logits

    topical = TopicalTraffic(E, seed=seed)
    hotspot = HotspotTraffic(E, hot=max(1, E // 16), seed=seed)
    out: dict[str, Callable[[int, int, float], torch.Tensor]] = {
        "zipf": zipf, "topical": topical.logits, "hotspot": hotspot.logits}
    entry = {**MODELS, **HELD_OUT_MODELS}[model][1]
    if entry is not None and counts_file is not None:
        c4 = popularity_from_counts(counts_file, entry)
        out["c4"] = lambda b, tokens, t: zipf(b, tokens, t, c4)
    return out


def _batches(logits: Callable[[int, int, float], torch.Tensor], cfg: GateConfig, temperature: float, tokens: int,
             batches: int, first: int = 0) -> Batches:
    return [gate_from_logits(logits(b, tokens, temperature), cfg) for b in range(first, first + batches)]


def measure(policy: RoutingPolicy, capacity: CapacityConfig, gates: Batches, device_of: torch.Tensor,
            devices: int) -> dict[str, float]:
    """Means over batches of BATCH_MEASURES, plus the top-k share of gate mass and (laser) the flat share."""
    E = gates[0].probs.shape[1]
    sums = dict.fromkeys(BATCH_MEASURES, 0.0)
    share = flat = 0.0
    for g in gates:
        r = policy.route(g, capacity)
        per_expert = torch.bincount(r.experts[r.experts >= 0], minlength=E).to(torch.float64)
        per_device = torch.zeros(devices, dtype=torch.float64).index_add_(0, device_of, per_expert)
        for name, value in batch_measures(per_device, per_expert, g.probs, r.experts, g.experts).items():
            sums[name] += value
        share += float((g.probs.gather(1, g.experts).sum(1) / g.probs.sum(1)).mean())
        if isinstance(policy, LaserRouting):
            flat += float(policy.flat_tokens(g.probs, g.experts).float().mean())
    out = {k: v / len(gates) for k, v in sums.items()}
    out["topk_share"] = share / len(gates)
    if isinstance(policy, LaserRouting):
        out["flat_share"] = flat / len(gates)
    return out


def _device_of(cfg: GateConfig, devices: int) -> torch.Tensor:
    """[E] device of each expert under PlacementTable.balanced (what the runtime starts from)."""
    table = PlacementTable.balanced(1, cfg.num_experts, [f"a{i}" for i in range(devices)])
    return torch.tensor(table.route(0).home_actor)


def _policies(laser: dict[str, Any], device_of: torch.Tensor) -> dict[str, tuple[RoutingPolicy, CapacityConfig]]:
    out = {}
    for name, (policy, capacity) in POLICIES.items():
        params = laser if policy == "laser" else {}
        if name == "laser device-aware":
            params = {**laser, "expert_groups": tuple(device_of.tolist())}
        out[name] = (ROUTING.create(policy, **params), capacity)
    return out


def _pareto(gates: Batches, laser: dict[str, Any], device_of: torch.Tensor, devices: int) -> dict[str, Any]:
    capacity = {f"{f}": measure(ROUTING.create("capacity"), CapacityConfig(factor=f, min_capacity=0, overflow="drop"),
                                gates, device_of, devices) for f in CAPACITY_FACTORS}
    groups = tuple(device_of.tolist())
    budgets = {f"{b}": measure(ROUTING.create("laser", **{**laser, "mass_budget": b, "expert_groups": groups}),
                               DROPLESS, gates, device_of, devices) for b in LASER_BUDGETS}
    keep = ("imbalance_device", "imbalance_expert", "gate_mass_retained", "drop_rate")
    return {"capacity": {f: {k: m[k] for k in keep} for f, m in capacity.items()},
            "laser device-aware": {b: {k: m[k] for k in keep} for b, m in budgets.items()}}


def us_per_token_in_turn(runs: dict[str, Callable[[], object]], repeats: int, tokens: int
                         ) -> tuple[dict[str, float], dict[str, float]]:
    """Median µs/token of each of `runs` (each call handles `tokens` tokens), timed in turn each repeat after one
    warm-up call: (wall time, the calling thread's CPU time — on a shared machine it leaves out the time other
    processes hold the core), both around the same calls."""
    import time

    wall: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    for fn in runs.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in runs.items():
            t0, c0 = time.perf_counter(), time.thread_time()
            fn()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.thread_time() - c0)
    return ({name: median(ts) * 1e6 / tokens for name, ts in wall.items()},
            {name: median(ts) * 1e6 / tokens for name, ts in cpu.items()})


def _cost(cfg: GateConfig, logits: torch.Tensor, device_of: torch.Tensor, laser: dict[str, Any],
          repeats: int) -> dict[str, float]:
    """Median µs/token of the top-k gate and of laser (both variants) on one batch (us_per_token_in_turn):
    wall time (`us_per_token`) and thread CPU time (`cpu_us_per_token`)."""
    g = gate_from_logits(logits, cfg)
    policies = {"laser": ROUTING.create("laser", **laser),
                "laser device-aware": ROUTING.create("laser", **laser, expert_groups=tuple(device_of.tolist()))}
    runs: dict[str, Callable[[], object]] = {"topk gate": lambda: gate_from_logits(logits, cfg)}
    runs.update({name: (lambda p=p: p.route(g, DROPLESS)) for name, p in policies.items()})
    wall, cpu = us_per_token_in_turn(runs, repeats, logits.shape[0])
    out = {f"{name} us_per_token": us for name, us in wall.items()}
    out.update({f"{name} cpu_us_per_token": us for name, us in cpu.items()})
    out["laser / topk gate"] = out["laser device-aware us_per_token"] / out["topk gate us_per_token"]
    out["laser / topk gate (cpu)"] = out["laser device-aware cpu_us_per_token"] / out["topk gate cpu_us_per_token"]
    return out


def _goal(top: dict[str, float], dev: dict[str, float]) -> dict[str, Any]:
    """The done criterion on one family: >= 1.3x less device imbalance than top-k at >= 97 % gate mass, or,
    where top-k is itself within 1.3x of perfect balance (no 1.3x cut exists), laser within FLOOR of it."""
    improvement = top["imbalance_device"] / dev["imbalance_device"]
    at_floor = top["imbalance_device"] < GOAL_IMPROVEMENT and dev["imbalance_device"] <= FLOOR
    return {"topk_imbalance_device": top["imbalance_device"], "laser_imbalance_device": dev["imbalance_device"],
            "improvement_device": improvement, "gate_mass_retained": dev["gate_mass_retained"],
            "excess_cut": (top["imbalance_device"] - 1) / max(dev["imbalance_device"] - 1, 1e-9),
            "at_floor": at_floor,
            "met": (improvement >= GOAL_IMPROVEMENT or at_floor) and dev["gate_mass_retained"] >= GOAL_MASS}


def run(tokens: int = 4096, batches: int = 4, repeats: int = 7, threads: int = 1,
        counts_file: Path | None = None, laser_params: dict[str, Any] | None = None,
        held_out: bool = True, accuracy: bool = False) -> dict[str, Any]:
    """All models x families x temperatures x policies; `laser_params` override laser's defaults.

    counts_file: measured per-expert counts for the c4 family (None: the C4 counts shipped in the package)."""
    shipped = counts_file is None
    counts_file = data.counts_file() if shipped else counts_file
    torch.set_num_threads(threads)
    laser = dict(laser_params or {})
    results: dict[str, Any] = {}
    pareto: dict[str, Any] = {}
    goals: dict[str, Any] = {}
    cost: dict[str, Any] = {}
    for model, (cfg, _, devices) in MODELS.items():
        device_of = _device_of(cfg, devices)
        policies = _policies(laser, device_of)
        results[model], pareto[model], goals[model] = {}, {}, {}
        for family, logits in families(model, counts_file).items():
            for t in TEMPERATURES if family != "c4" else TEMPERATURES[:2]:
                key = f"{family} T={t}"
                gates = _batches(logits, cfg, t, tokens, batches)
                results[model][key] = {name: measure(p, c, gates, device_of, devices) for name, (p, c) in policies.items()}
                if t == 1.0:
                    pareto[model][family] = _pareto(gates, laser, device_of, devices)
                if t != PEAKED:
                    goals[model][key] = _goal(results[model][key]["topk"], results[model][key]["laser device-aware"])
        cost[model] = _cost(cfg, families(model, None)["zipf"](0, tokens, 2.0), device_of, laser, repeats)
        cost[model]["met"] = cost[model]["laser device-aware us_per_token"] <= GOAL_US_PER_TOKEN
        cost[model]["met (cpu)"] = cost[model]["laser device-aware cpu_us_per_token"] <= GOAL_US_PER_TOKEN
    out: dict[str, Any] = {
        "config": {"tokens": tokens, "batches": batches, "repeats": repeats, "threads": torch.get_num_threads(),
                   "temperatures": TEMPERATURES, "peaked_temperature": PEAKED,
                   "laser": {k: v for k, v in dataclasses.asdict(ROUTING.create("laser", **laser)).items()
                             if k not in ("layer_overrides", "expert_groups")},
                   "counts_file": f"expertray/data/{data.COUNTS_NAME}" if shipped else str(counts_file)},
        "goals": {"improvement_device_at_least": GOAL_IMPROVEMENT, "gate_mass_at_least": GOAL_MASS,
                  "us_per_token_at_most": GOAL_US_PER_TOKEN, "balanced_floor": FLOOR, "not_peaked": goals,
                  "all_met": all(g["met"] for per in goals.values() for g in per.values())},
        "results": results, "pareto": pareto, "cost": cost,
    }
    if held_out:
        out["held_out"] = held_out_check(tokens, batches, laser)
    if accuracy:
        from expertray.tools.bench import routing_accuracy

        out["accuracy"] = routing_accuracy.run()
    return out


def held_out_check(tokens: int, batches: int, laser: dict[str, Any], seed: int = 7) -> dict[str, Any]:
    """Device-aware laser with `laser` parameters on seeds and model shapes the defaults were not chosen on."""
    out: dict[str, Any] = {}
    for model, (cfg, _, devices) in {**MODELS, **HELD_OUT_MODELS}.items():
        device_of = _device_of(cfg, devices)
        policies = {name: _policies(laser, device_of)[name] for name in ("topk", "laser device-aware")}
        out[model] = {}
        for family, logits in families(model, None, seed=seed).items():
            for t in TEMPERATURES:
                gates = _batches(logits, cfg, t, tokens, batches, first=100)
                m = {name: measure(p, c, gates, device_of, devices) for name, (p, c) in policies.items()}
                out[model][f"{family} T={t}"] = {**_goal(m["topk"], m["laser device-aware"]),
                                                 "topk_share": m["topk"]["topk_share"], "peaked": t == PEAKED}
    return out


def write_pareto_plot(result: dict[str, Any], path: Path) -> None:
    """PNG: device imbalance vs gate mass kept, capacity factors vs laser budgets, per model and family (T=1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pareto = result["pareto"]
    fams = sorted({f for per in pareto.values() for f in per}, key=["zipf", "topical", "hotspot", "c4"].index)
    fig, axes = plt.subplots(len(pareto), len(fams), figsize=(3.6 * len(fams), 3.3 * len(pareto)), squeeze=False)
    for row, (model, per_family) in zip(axes, pareto.items(), strict=True):
        for ax, family in zip(row, fams, strict=True):
            front = per_family.get(family)
            if front is None:
                ax.axis("off")
                continue
            top = result["results"][model][f"{family} T=1.0"]["topk"]
            for label, curve, marker in (("capacity (factor)", front["capacity"], "s"),
                                         ("laser device-aware (budget)", front["laser device-aware"], "o")):
                xs = [m["gate_mass_retained"] for m in curve.values()]
                ys = [m["imbalance_device"] for m in curve.values()]
                ax.plot(xs, ys, marker=marker, label=label)
                for knob, x, y in zip(curve, xs, ys, strict=True):
                    ax.annotate(knob, (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
            ax.plot([1.0], [top["imbalance_device"]], "k*", markersize=10, label="top-k")
            ax.axvline(GOAL_MASS, color="grey", linestyle=":", linewidth=1)
            ax.set_title(f"{model} · {family} (T=1)", fontsize=9)
            ax.set_xlabel("gate mass kept", fontsize=8)
            ax.set_ylabel("device imbalance (max / mean)", fontsize=8)
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def cli(tokens: int = 4096, batches: int = 4, repeats: int = 7, threads: int = 1,
        counts_file: Annotated[Path | None, typer.Option(
            help="measured expert counts for the c4 family (default: the C4 counts shipped in expertray/data)")] = None,
        held_out: Annotated[bool, typer.Option(help="also check other seeds and model shapes")] = True,
        accuracy: Annotated[bool, typer.Option(help="also measure output change on tiny transformers models")] = False,
        plot: Annotated[Path | None, typer.Option(help="PNG of the Pareto fronts")] = None,
        as_json: Annotated[bool, typer.Option("--json")] = False, out: Path | None = None) -> None:
    """Balance, drops, gate mass and cost of the routing policies on four traffic families."""
    r = run(tokens, batches, repeats, threads, counts_file, held_out=held_out, accuracy=accuracy)
    if plot is not None:
        write_pareto_plot(r, plot)
    rows = [[model, traffic, name, m["imbalance_device"], m["imbalance_expert"], m["drop_rate"],
             m["gate_mass_retained"], m["topk_agreement"], m["topk_share"]]
            for model, per_traffic in r["results"].items() for traffic, per_policy in per_traffic.items()
            for name, m in per_policy.items()]
    emit("routing", r, rows, ["model", "traffic", "policy", "imbalance (device)", "imbalance (expert)",
                              "drop rate", "gate mass kept", "top-k agreement", "top-k share"], as_json, out)
