"""laser makes exactly the decisions of its previous implementation (laser_reference.py), bit for bit."""

import random

import pytest
import torch
from laser_reference import LaserRouting as ReferenceLaser

from expertray.config import CapacityConfig, GateConfig
from expertray.layer.capacity import CapacityResult
from expertray.layer.gating import gate_from_logits
from expertray.policies.routing import ROUTING
from expertray.tools.workload import HotspotTraffic, TopicalTraffic, Workload, WorkloadConfig

DROPLESS = CapacityConfig(overflow="dropless")
SHAPES = {"olmoe": (GateConfig("qwen_moe", 64, 8, normalize=False), 8),
          "mixtral": (GateConfig("mixtral", 8, 2, normalize=True), 8),
          "qwen3": (GateConfig("qwen_moe", 128, 8, normalize=True), 16),
          "deepseek_v3": (GateConfig("deepseek_v3", 256, 8, normalize=True, num_groups=8, topk_groups=4,
                                     routed_scaling_factor=2.5), 32)}


def _logits(family: str, E: int, seed: int, tokens: int, temperature: float) -> torch.Tensor:
    if family == "zipf":
        cfg = WorkloadConfig(num_experts=E, tokens_per_batch=tokens, temperature=temperature, seed=seed)
        return Workload(cfg).batch(0).logits
    traffic = TopicalTraffic(E, seed=seed) if family == "topical" else HotspotTraffic(E, hot=max(1, E // 16), seed=seed)
    return traffic.logits(seed, tokens, temperature)


def _same(new: CapacityResult, ref: CapacityResult) -> None:
    assert torch.equal(new.experts, ref.experts)
    assert torch.equal(new.weights, ref.weights)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize(("family", "seed", "temperature"),
                         [("zipf", 0, 2.0), ("zipf", 3, 1.0), ("topical", 1, 2.0), ("hotspot", 2, 1.0),
                          ("zipf", 5, 0.5)])
def test_device_aware_defaults_match_the_reference(shape: str, family: str, seed: int, temperature: float) -> None:
    cfg, devices = SHAPES[shape]
    E = cfg.num_experts
    groups = tuple(e * devices // E for e in range(E))
    gate = gate_from_logits(_logits(family, E, seed, 3000, temperature), cfg)
    new = ROUTING.create("laser", expert_groups=groups).route(gate, DROPLESS)
    _same(new, ReferenceLaser(expert_groups=groups).route(gate, DROPLESS))


@pytest.mark.parametrize("params", [{}, {"mass_budget": 0.12}, {"mass_budget": 0.005}, {"chunk_tokens": 257},
                                    {"chunk_tokens": 5000}, {"balance_weight": 0.35}, {"widen": 1},
                                    {"max_mass_loss": 0.05}, {"entropy_threshold": 0.9, "mass_threshold": 0.7}])
@pytest.mark.parametrize("device_aware", [False, True])
def test_parameters_and_prior_load_match_the_reference(params: dict[str, object], device_aware: bool) -> None:
    cfg, devices = SHAPES["olmoe"]
    E = cfg.num_experts
    gate = gate_from_logits(_logits("zipf", E, 11, 2500, 2.0), cfg)
    if device_aware:
        params = {**params, "expert_groups": tuple((7 * e) % devices for e in range(E))}
    prior = torch.arange(E, dtype=torch.float32).flip(0) * 3
    fractional = torch.rand(E, generator=torch.Generator().manual_seed(5)) * 97.3  # as a decayed load window gives
    for load in (None, prior, fractional):
        new = ROUTING.create("laser", **params).route(gate, DROPLESS, expert_load=load)
        _same(new, ReferenceLaser(**params).route(gate, DROPLESS, expert_load=load))


@pytest.mark.parametrize("tokens", [1, 7, 1024, 1025])
def test_small_and_odd_batches_match_the_reference(tokens: int) -> None:
    cfg, devices = SHAPES["mixtral"]
    groups = tuple(range(cfg.num_experts))
    gate = gate_from_logits(_logits("zipf", cfg.num_experts, 4, tokens, 2.0), cfg)
    cap = CapacityConfig(factor=1.0, min_capacity=0, overflow="drop")
    new = ROUTING.create("laser", expert_groups=groups).route(gate, cap)
    ref = ReferenceLaser(expert_groups=groups).route(gate, cap)
    _same(new, ref)
    assert new.num_dropped == ref.num_dropped


@pytest.mark.parametrize("seed", range(60))
def test_random_shapes_and_parameters_match_the_reference(seed: int) -> None:
    """Random gate families, expert counts, k, batch sizes, score spreads, groups (any partition), priors,
    parameters and capacity modes: the same decisions, or the same error."""
    rng = random.Random(seed)
    family = rng.choice(["mixtral", "qwen_moe", "deepseek_v3", "gpt_oss"])
    E = rng.choice([2, 3, 8, 16, 60, 64, 128, 256])
    k = rng.randint(1, min(10, E))
    if family == "deepseek_v3":  # group-limited: masked (-inf) scores
        groups = rng.choice([g for g in (1, 2, 4, 8) if E % g == 0 and E // g >= 2])
        top_groups = max(rng.randint(1, groups), -(-k // (E // groups)))
        cfg = GateConfig(family, E, k, normalize=rng.random() < 0.5, num_groups=groups, topk_groups=top_groups,
                         routed_scaling_factor=2.5)
    else:
        cfg = GateConfig(family, E, k, normalize=rng.random() < 0.5)
    T = rng.choice([1, 5, 300, 1000, 3000, 3000])
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g) * rng.choice([0.3, 1.0, 3.0]) + torch.randn(E, generator=g) * rng.choice([0, 1, 3])
    gate = gate_from_logits(logits, cfg)
    options = {"balance_weight": [0.1, 0.35, 2.0], "mass_budget": [0.0, 0.005, 0.1, 0.5, 0.03], "chunk_tokens": [1, 7, 256, 5000],
               "widen": [0, 1, 2, 6], "max_mass_loss": [0.0, 0.05, 1.0], "mass_threshold": [0.5, 0.99, 1.0]}
    params: dict[str, object] = {name: rng.choice(values) for name, values in options.items() if rng.random() < 0.3}
    if rng.random() < 0.6:
        G = rng.randint(1, E)
        params["expert_groups"] = tuple(rng.randrange(G) for _ in range(E))
    load = rng.choice([None, None, torch.zeros(E), torch.rand(E, generator=g) * rng.choice([1, 100, 1e4])])
    cap = rng.choice([DROPLESS, CapacityConfig(factor=1.0, min_capacity=0, overflow="drop")])
    outcomes = []
    for policy in (ReferenceLaser(**params), ROUTING.create("laser", **params)):
        try:
            outcomes.append(policy.route(gate, cap, expert_load=load))
        except Exception as exc:  # noqa: BLE001 - the same error is the expected outcome then
            outcomes.append(exc)
    ref, new = outcomes
    if isinstance(ref, Exception):
        assert type(new) is type(ref)
    else:
        _same(new, ref)
