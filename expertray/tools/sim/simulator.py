"""Cluster simulator: plan a placement with each policy from a calibration window of routing, replay routing
over the topology, and report per layer the all-to-all bytes within and across nodes, the estimated
dispatch and combine times, balancedness (mean / max tokens per device) and memory per device.

Tokens start evenly on all devices (data-parallel attention, as in DeepSeek's and vLLM's expert parallel
serving): token t of T on device t · D // T. With origin="follow" a token's next layer starts instead on the
device that served its first-choice expert and its combine goes there (ExFlow's context-coherent layout),
which is where consecutive-layer affinity pays. Traffic model: expertray.tools.sim.traffic. Pure numpy, no Ray.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import expertray.policies.placement.topology  # noqa: F401  (registers `topology_aware` in PLACEMENT)
from expertray.errors import ConfigError
from expertray.policies.placement import PLACEMENT
from expertray.state.loadstats import balancedness
from expertray.state.placement_table import PlacementTable
from expertray.state.topology import Topology
from expertray.tools.sim.coactivation import Coactivation
from expertray.tools.sim.routing import RoutingSource, Step
from expertray.tools.sim.traffic import (
    DISPATCH_MODES,
    SELECTORS,
    PlacementArrays,
    TopologyArrays,
    fanout_pairs,
    link_load,
    pair_bytes,
)

ORIGINS = ("even", "follow")
DEFAULT_POLICIES = ("round_robin", "balanced", "topology_aware")


@dataclass(frozen=True)
class SimConfig:
    """d_model × bytes_per_elem bytes move per token transfer; expert_bytes is one expert's weights
    (DeepSeek-V3: 3 matrices of 7168 × 2048 in bf16 = 88 MB)."""

    d_model: int = 7168
    bytes_per_elem: int = 2
    expert_bytes: int = 3 * 7168 * 2048 * 2
    selector: str = "locality"
    dispatch: str = "flat"
    origin: str = "even"

    def __post_init__(self) -> None:
        for name in ("d_model", "bytes_per_elem"):
            if getattr(self, name) < 1:
                raise ConfigError(f"sim.{name}: must be >= 1, got {getattr(self, name)}")
        if self.expert_bytes < 0:
            raise ConfigError(f"sim.expert_bytes: must be >= 0, got {self.expert_bytes}")
        for name, known in (("selector", SELECTORS), ("dispatch", DISPATCH_MODES), ("origin", ORIGINS)):
            if getattr(self, name) not in known:
                raise ConfigError(f"sim.{name}: {getattr(self, name)!r} is unknown (known: {', '.join(known)})")


@dataclass(frozen=True)
class PolicyResult:
    """Per layer [L], means over the replayed steps: intra/inter-node bytes of dispatch + combine,
    dispatch/combine time (s) and balancedness. slots_per_device [D]: expert slots over all layers."""

    policy: str
    plan_s: float
    replay_s: float
    intra_node_bytes: np.ndarray
    inter_node_bytes: np.ndarray
    dispatch_time_s: np.ndarray
    combine_time_s: np.ndarray
    balancedness: np.ndarray
    slots_per_device: np.ndarray
    expert_bytes: int

    def summary(self) -> dict[str, float]:
        return {
            "inter_node_bytes_per_layer": float(self.inter_node_bytes.mean()),
            "intra_node_bytes_per_layer": float(self.intra_node_bytes.mean()),
            "dispatch_time_s_per_layer": float(self.dispatch_time_s.mean()),
            "combine_time_s_per_layer": float(self.combine_time_s.mean()),
            "balancedness_mean": float(self.balancedness.mean()),
            "balancedness_min": float(self.balancedness.min()),
            "slots_per_device_max": int(self.slots_per_device.max()),
            "memory_bytes_per_device_max": int(self.slots_per_device.max()) * self.expert_bytes,
            "memory_bytes_per_device_mean": float(self.slots_per_device.mean()) * self.expert_bytes,
            "plan_s": self.plan_s,
            "replay_s": self.replay_s,
        }

    def to_dict(self) -> dict[str, Any]:
        return {"policy": self.policy, "summary": self.summary(),
                "per_layer": {name: getattr(self, name).tolist() for name in
                              ("intra_node_bytes", "inter_node_bytes", "dispatch_time_s", "combine_time_s",
                               "balancedness")}}


@dataclass(frozen=True)
class SimResult:
    devices: int
    nodes: int
    layers: int
    experts: int
    top_k: int
    steps: int
    tokens_per_step: float
    config: SimConfig
    routing: dict[str, Any]
    policies: list[PolicyResult]
    calibration_s: float
    total_s: float

    def to_dict(self) -> dict[str, Any]:
        head = {k: getattr(self, k) for k in ("devices", "nodes", "layers", "experts", "top_k", "steps",
                                                "tokens_per_step", "calibration_s", "total_s")}
        return {**head, "config": asdict(self.config), "routing": self.routing,
                "policies": [p.to_dict() for p in self.policies]}


@dataclass
class _Totals:
    """Sums over steps of the per-layer measures of one policy."""

    num_layers: int
    intra: np.ndarray = field(init=False)
    inter: np.ndarray = field(init=False)
    dispatch_s: np.ndarray = field(init=False)
    combine_s: np.ndarray = field(init=False)
    balance: np.ndarray = field(init=False)
    replay_s: float = 0.0

    def __post_init__(self) -> None:
        for name in ("intra", "inter", "dispatch_s", "combine_s", "balance"):
            setattr(self, name, np.zeros(self.num_layers))


Progress = Callable[[str], None]  # receives one line per finished stage (e.g. to print on stderr)


def plan_tables(policies: Sequence[str], coactivation: Coactivation, topology: Topology, config: SimConfig,
                policy_params: dict[str, dict[str, Any]] | None = None,
                progress: Progress | None = None) -> dict[str, tuple[PlacementTable, float]]:
    """{policy: (table, seconds to plan)} from the calibration counts. `topology_aware` also gets the
    co-selection counts, and the layer affinity when tokens follow their experts (origin="follow")."""
    out = {}
    load = coactivation.load.astype(np.float64)
    for name in policies:
        params = dict((policy_params or {}).get(name, {}))
        if name == "topology_aware":
            params.setdefault("coselection", coactivation.coselection)
            if config.origin == "follow":
                params.setdefault("layer_affinity", coactivation.layer_affinity)
        policy = PLACEMENT.create(name, **params)
        start = time.perf_counter()
        table = policy.plan(load, topology, None, config.expert_bytes).table
        out[name] = (table, time.perf_counter() - start)
        if progress is not None:
            progress(f"planned {name} ({load.shape[0]} layers) in {out[name][1]:.1f} s")
    return out


def _replay_step(step: Step, arrays: PlacementArrays, topo: TopologyArrays, topology: Topology,
                config: SimConfig, totals: _Totals) -> None:
    """Add one step's per-layer measures to `totals`."""
    D = topo.num_devices
    T = step[0].shape[0]
    row_bytes = config.d_model * config.bytes_per_elem
    origin = np.arange(T, dtype=np.int64) * D // max(T, 1)
    for layer, experts in enumerate(step):
        dest = arrays.choose(experts, layer, origin, topo.node_of, config.selector)
        totals.balance[layer] += balancedness(torch.from_numpy(np.bincount(dest[dest >= 0], minlength=D)))
        dispatch = pair_bytes(*fanout_pairs(dest, origin, topo, config.dispatch), D, row_bytes)
        if config.origin == "even":
            target, combine = origin, dispatch.T
        else:
            target = np.where(dest[:, 0] >= 0, dest[:, 0], origin)
            combine = pair_bytes(*fanout_pairs(dest, target, topo, config.dispatch), D, row_bytes).T
        for phase, pairs in (("dispatch_s", dispatch), ("combine_s", combine)):
            load = link_load(pairs, topo, topology)
            totals.intra[layer] += load.intra_node_bytes
            totals.inter[layer] += load.inter_node_bytes
            getattr(totals, phase)[layer] += load.time_s
        origin = target


def simulate(source: RoutingSource, topology: Topology, policies: Sequence[str] = DEFAULT_POLICIES,
             config: SimConfig | None = None, policy_params: dict[str, dict[str, Any]] | None = None,
             progress: Progress | None = None) -> SimResult:
    """Plan with every policy from source.calibration(), replay source.evaluation() through each table;
    `progress` (optional) gets a line after calibration, each policy's plan and each replayed step."""
    config = config or SimConfig()
    if not policies or len(set(policies)) != len(policies):
        raise ConfigError(f"sim.policies: name at least one placement policy, each once (got {list(policies)})")
    start = time.perf_counter()
    L, E = source.num_layers, source.num_experts
    coactivation = Coactivation.from_steps(source.calibration(), L, E)
    if coactivation.tokens == 0:
        raise ConfigError("sim: the routing source's calibration window holds no tokens")
    calibration_s = time.perf_counter() - start
    if progress is not None:
        progress(f"calibrated on {coactivation.tokens} tokens in {calibration_s:.1f} s")
    tables = plan_tables(policies, coactivation, topology, config, policy_params, progress)
    topo = TopologyArrays.of(topology)
    arrays = {name: PlacementArrays.of(table, topology) for name, (table, _) in tables.items()}
    totals = {name: _Totals(L) for name in policies}
    steps, tokens = 0, 0
    for step in source.evaluation():
        steps += 1
        tokens += step[0].shape[0]
        for name in policies:
            t0 = time.perf_counter()
            _replay_step(step, arrays[name], topo, topology, config, totals[name])
            totals[name].replay_s += time.perf_counter() - t0
            if progress is not None:
                progress(f"replayed step {steps} through {name} ({time.perf_counter() - start:.1f} s so far)")
    if steps == 0:
        raise ConfigError("sim: the routing source's evaluation stream holds no steps")
    results = [PolicyResult(name, tables[name][1], t.replay_s, t.intra / steps, t.inter / steps,
                            t.dispatch_s / steps, t.combine_s / steps, t.balance / steps,
                            arrays[name].slots_per_device, config.expert_bytes)
               for name, t in totals.items()]
    return SimResult(topology.num_devices, topology.num_nodes, L, E, source.top_k, steps, tokens / steps, config,
                     source.describe(), results, calibration_s, time.perf_counter() - start)


def write_plot(result: SimResult, path: str | Path) -> None:
    """PNG: inter-node bytes (dispatch + combine) and balancedness per layer, one line per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    layers = np.arange(result.layers)
    for p in result.policies:
        top.plot(layers, p.inter_node_bytes / 2**20, marker=".", label=p.policy)
        bottom.plot(layers, p.balancedness, marker=".", label=p.policy)
    top.set_ylabel("inter-node MiB per step\n(dispatch + combine)")
    top.set_title(f"{result.devices} devices on {result.nodes} nodes, {result.experts} experts top-{result.top_k}, "
                  f"{result.tokens_per_step:.0f} tokens/step\n{result.config.dispatch} dispatch, "
                  f"{result.config.selector} replicas, {result.config.origin} origin", fontsize=10)
    bottom.set_ylabel("balancedness (mean / max\ntokens per device)")
    bottom.set_xlabel("layer")
    top.set_ylim(bottom=0)
    bottom.set_ylim(0, 1.05)
    for ax in (top, bottom):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def default_slots_per_device(num_experts: int, num_devices: int) -> int:
    """ceil(E / D) + 1: every expert fits and each device keeps one slot for a redundant copy (DeepSeek's
    decode units hold 256 + 32 copies on 144 GPUs, 2 per GPU)."""
    return math.ceil(num_experts / num_devices) + 1
