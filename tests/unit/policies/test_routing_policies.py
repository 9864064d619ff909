"""Routing policies: topk, capacity, laser (hand-checked swaps, the mass guard, family normalisation)."""

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from expertray.config import CapacityConfig, GateConfig
from expertray.errors import ConfigError, InputError
from expertray.layer.capacity import apply_capacity, expert_capacity
from expertray.layer.gating import GateOutput, gate_from_logits
from expertray.policies.routing import ROUTING
from expertray.policies.routing.laser import LaserRouting, next_best
from expertray.state.loadstats import gate_mass_retained, imbalance
from expertray.tools.workload import Workload, WorkloadConfig

DROP = CapacityConfig(factor=1.0, min_capacity=0, overflow="drop")


def _gate(probs: list[list[float]], k: int, normalize: bool) -> GateOutput:
    p = torch.tensor(probs)
    top, idx = p.topk(k, dim=1)
    w = top / top.sum(dim=1, keepdim=True) if normalize else top
    return GateOutput(p.log(), p, p, idx, w)


def test_registry_names_and_errors() -> None:
    assert {"topk", "capacity", "laser"} <= set(ROUTING.names())
    with pytest.raises(ConfigError, match="routing.laser.max_mass_loss"):
        ROUTING.create("laser", max_mass_loss=1.5)


def test_topk_ignores_capacity_and_capacity_is_apply_capacity() -> None:
    g = _gate([[0.7, 0.2, 0.1]] * 6, 1, normalize=True)
    r = ROUTING.create("topk").route(g, DROP)
    assert r.experts.squeeze(1).tolist() == [0] * 6 and r.num_dropped == 0 and r.capacity is None
    c = ROUTING.create("capacity").route(g, DROP)
    ref = apply_capacity(g, DROP)
    assert torch.equal(c.experts, ref.experts) and c.capacity == ref.capacity == 2 and c.num_dropped == 4


def test_laser_swaps_a_flat_token_off_a_hot_expert_within_the_guard() -> None:
    # One flat token, k=1, candidates {0, 1}. Prior load + its own demand put expert 0 at 101 of mean 25.25.
    # The swap's price: mass given up in units of the top-1 mass over the load gap in units of the mean:
    #   (1 - 0.28 / 0.3) / ((101 - 0) / 25.25) = 0.0167 < the fixed price 0.12 → swap, losing 0.02 of 0.3.
    g = _gate([[0.3, 0.28, 0.22, 0.2]], 1, normalize=False)
    load = torch.tensor([100.0, 0.0, 0.0, 0.0])
    fixed = LaserRouting(widen=1, balance_weight=0.12, mass_threshold=0.6)
    r = fixed.route(g, CapacityConfig(), load)
    assert r.experts.tolist() == [[1]]
    assert r.weights.tolist() == [[pytest.approx(0.28)]]  # unnormalised family: the raw prob
    # a normalising family gets the same per-token sum (1.0)
    rn = fixed.route(_gate([[0.3, 0.28, 0.22, 0.2]], 1, normalize=True), CapacityConfig(), load)
    assert rn.experts.tolist() == [[1]] and rn.weights.tolist() == [[pytest.approx(1.0)]]
    # the guard: giving up 0.02 of 0.3 (6.7%) is more than 5% → keep expert 0
    assert dataclasses.replace(fixed, max_mass_loss=0.05).route(g, CapacityConfig(), load).experts.tolist() == [[0]]
    # a price below the swap's (0.0167) keeps expert 0
    assert dataclasses.replace(fixed, balance_weight=0.01).route(g, CapacityConfig(), load).experts.tolist() == [[0]]
    # a peaked token keeps its choice whatever the load
    peaked = _gate([[0.9, 0.05, 0.03, 0.02]], 1, normalize=False)
    assert fixed.route(peaked, CapacityConfig(), load).experts.tolist() == [[0]]


def test_laser_mass_budget_buys_the_cheapest_swaps_first() -> None:
    # The swap above costs 6.7% of the batch's top-k mass: a 3% budget cannot pay for it, a 7% one can.
    g = _gate([[0.3, 0.28, 0.22, 0.2]], 1, normalize=False)
    load = torch.tensor([100.0, 0.0, 0.0, 0.0])
    assert LaserRouting(widen=1, mass_budget=0.03).route(g, CapacityConfig(), load).experts.tolist() == [[0]]
    assert LaserRouting(widen=1, mass_budget=0.07).route(g, CapacityConfig(), load).experts.tolist() == [[1]]
    # Two tokens on hot expert 0, each able to move to expert 1: token 0 would give up 0.02 of 0.3, token 1
    # 0.1 of 0.3. A budget of 0.03 / 0.6 = 5% buys token 0's swap only (the cheaper price), not both.
    g2 = _gate([[0.3, 0.28, 0.22, 0.2], [0.3, 0.2, 0.26, 0.24]], 1, normalize=False)
    r = LaserRouting(widen=1, mass_budget=0.05).route(g2, CapacityConfig(), load)
    assert r.experts.tolist() == [[1], [0]]
    # a zero budget is top-k
    r0 = LaserRouting(widen=1, mass_budget=0.0).route(g2, CapacityConfig(), load)
    assert torch.equal(r0.experts, g2.experts)


def test_laser_never_moves_load_past_the_mean() -> None:
    # 8 identical flat tokens on expert 0 (k=1, E=2, no prior): demand [8, 0], mean 4. Every token could move
    # to expert 1 for almost nothing, but moving more than 4 would only make expert 1 the hot one.
    g = _gate([[0.5, 0.49]] * 8, 1, normalize=False)
    r = LaserRouting(widen=1, mass_budget=1.0, max_mass_loss=1.0, mass_threshold=2.0).route(g, CapacityConfig())
    assert torch.bincount(r.experts.reshape(-1), minlength=2).tolist() == [4, 4]


def test_laser_per_layer_overrides() -> None:
    p = ROUTING.create("laser", layer_overrides={"2": {"mass_threshold": 2.0, "widen": 1}})
    assert p.for_layer(2).mass_threshold == 2.0 and p.for_layer(2).widen == 1
    assert p.for_layer(0).mass_threshold == LaserRouting().mass_threshold
    with pytest.raises(ConfigError, match="layer_overrides.1: unknown parameters"):
        LaserRouting(layer_overrides={1: {"temperature": 1.0}})
    with pytest.raises(ConfigError, match="routing.laser.widen"):
        LaserRouting(layer_overrides={1: {"widen": -1}})


def test_laser_rejects_a_wrong_load_vector() -> None:
    g = _gate([[0.3, 0.3, 0.4]], 1, normalize=True)
    with pytest.raises(InputError, match="expert_load must have 3 entries"):
        LaserRouting().route(g, CapacityConfig(), torch.zeros(4))


def test_laser_balances_flat_skewed_traffic_and_leaves_peaked_traffic_alone() -> None:
    """A fixed price with LASER's own flatness split (0.6): peaked traffic is not touched at all."""
    policy = LaserRouting(balance_weight=0.12, max_mass_loss=0.1, mass_threshold=0.6)
    cfg = GateConfig("qwen_moe", 32, 4, normalize=False)
    flat = gate_from_logits(Workload(WorkloadConfig(32, 2048, temperature=2.0, seed=3)).batch(0).logits, cfg)
    top = torch.bincount(flat.experts.reshape(-1), minlength=32)
    r = policy.route(flat, CapacityConfig())
    mine = torch.bincount(r.experts.reshape(-1), minlength=32)
    assert imbalance(mine) < imbalance(top) / 1.2
    assert gate_mass_retained(flat.probs, r.experts, flat.experts) > 0.95
    peaked = gate_from_logits(Workload(WorkloadConfig(32, 2048, temperature=0.3, seed=3)).batch(0).logits, cfg)
    rp = policy.route(peaked, CapacityConfig())
    assert torch.equal(rp.experts, peaked.experts) and torch.equal(rp.weights, peaked.weights)


@pytest.mark.parametrize("seed", [11, 12])
@pytest.mark.parametrize(("E", "k", "family", "devices"), [(64, 8, "qwen_moe", 8), (8, 2, "mixtral", 4),
                                                            (128, 8, "qwen_moe", 16)])
def test_laser_defaults_spend_at_most_the_budget_on_any_shape(seed: int, E: int, k: int, family: str,
                                                               devices: int) -> None:
    """Defaults on shapes and seeds the benchmark does not use: the batch keeps >= 1 - mass_budget of its
    gate mass, device-aware laser balances flat traffic better than top-k, and peaked tokens never move."""
    cfg = GateConfig(family, E, k, normalize=family == "mixtral")
    groups = tuple(e * devices // E for e in range(E))
    policy = LaserRouting(expert_groups=groups)
    device = torch.tensor(groups)
    for temperature in (2.0, 1.0, 0.3):
        g = gate_from_logits(Workload(WorkloadConfig(E, 2048, temperature=temperature, seed=seed)).batch(0).logits, cfg)
        r = policy.route(g, CapacityConfig(overflow="dropless"))
        assert gate_mass_retained(g.probs, r.experts, g.experts) >= 1 - policy.mass_budget - 1e-6
        peaked = ~policy.flat_tokens(g.probs, g.experts)
        assert torch.equal(r.experts[peaked], g.experts[peaked])

        def per_device(experts: torch.Tensor) -> torch.Tensor:
            counts = torch.bincount(experts.reshape(-1), minlength=E).double()
            return torch.zeros(devices, dtype=torch.float64).index_add_(0, device, counts)

        if temperature >= 1.0:
            assert imbalance(per_device(r.experts)) < imbalance(per_device(g.experts)) / 1.1


def test_laser_then_capacity_respects_capacity() -> None:
    cfg = GateConfig("mixtral", 8, 2)
    g = gate_from_logits(Workload(WorkloadConfig(8, 512, temperature=2.0, seed=1)).batch(0).logits, cfg)
    r = LaserRouting().route(g, DROP)
    cap = expert_capacity(512, 8, 2, 1.0, 0)
    kept = r.experts[r.experts >= 0]
    assert r.capacity == cap and torch.bincount(kept, minlength=8).max() <= cap
    assert kept.numel() + r.num_dropped == 512 * 2


def test_laser_never_uses_experts_a_group_limited_gate_masked() -> None:
    cfg = GateConfig("deepseek_v3", 16, 2, num_groups=4, topk_groups=1)
    g = gate_from_logits(torch.randn(256, 16, generator=torch.Generator().manual_seed(0)) * 0.1, cfg)
    r = LaserRouting(mass_threshold=2.0, widen=8).route(g, CapacityConfig(), torch.arange(16.0) * 100)
    assert bool(torch.isfinite(g.scores.gather(1, r.experts)).all())
    assert not torch.equal(r.experts, g.experts)  # it did move tokens, within each token's group


@settings(max_examples=40, deadline=None)
@given(T=st.integers(1, 60), E=st.integers(2, 24), data=st.data(),
       family=st.sampled_from(["mixtral", "qwen_moe", "gpt_oss"]), guard=st.floats(0.0, 0.5),
       price=st.floats(0.0, 2.0), widen=st.integers(1, 8), temperature=st.floats(0.2, 5.0))
def test_laser_invariants(T: int, E: int, data: st.DataObject, family: str, guard: float, price: float,
                          widen: int, temperature: float) -> None:
    k = data.draw(st.integers(1, E))
    seed = data.draw(st.integers(0, 10_000))
    gen = torch.Generator().manual_seed(seed)
    cfg = GateConfig(family, E, k, normalize=family != "qwen_moe")
    g = gate_from_logits(torch.randn(T, E, generator=gen) / temperature, cfg)
    load = torch.rand(E, generator=gen) * 100
    policy = LaserRouting(widen=widen, balance_weight=price, max_mass_loss=guard, chunk_tokens=7)
    r = policy.route(g, CapacityConfig(), load)
    top_mass = g.probs.gather(1, g.experts).sum(1)
    kept_mass = g.probs.gather(1, r.experts).sum(1)
    assert bool((kept_mass >= (1 - guard) * top_mass - 1e-5).all())  # the mass guard, per token
    allowed = torch.cat([g.experts, next_best(g.scores, g.experts, min(widen, E - k))], dim=1)
    for row, cand in zip(r.experts.tolist(), allowed.tolist(), strict=True):
        assert len(set(row)) == k and set(row) <= set(cand)
    peaked = ~policy.flat_tokens(g.probs, g.experts)
    assert torch.equal(r.experts[peaked], g.experts[peaked])
    # weights: the gate's probs of the picked experts, normalised the way the family normalises
    picked = g.probs.gather(1, r.experts)
    if cfg.normalize:
        torch.testing.assert_close(r.weights, picked / picked.sum(1, keepdim=True), rtol=1e-4, atol=1e-5)
    else:
        torch.testing.assert_close(r.weights, picked)
    # best first: scores never increase along a token's choice
    s = g.scores.gather(1, r.experts)
    assert bool((s[:, 1:] <= s[:, :-1]).all())


@settings(max_examples=40, deadline=None)
@given(T=st.integers(1, 30), E=st.integers(2, 40), data=st.data(), shift=st.floats(-3.0, 3.0))
def test_next_best_matches_topk_outside_the_excluded(T: int, E: int, data: st.DataObject, shift: float) -> None:
    k = data.draw(st.integers(1, E - 1))
    n = data.draw(st.integers(1, E - k))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 10_000)))
    scores = torch.randn(T, E, generator=gen) + shift  # negative scores too (gpt_oss ranks by logits)
    top = scores.topk(k, dim=1).indices
    want = scores.scatter(1, top, float("-inf")).topk(n, dim=1).values
    got = next_best(scores, top, n)
    # scores closer than the packed key's resolution (2^-17 relative here) may swap places: compare values
    torch.testing.assert_close(scores.gather(1, got), want, rtol=2e-5, atol=1e-6)
    for row, excluded in zip(got.tolist(), top.tolist(), strict=True):
        assert len(set(row)) == n and not set(row) & set(excluded)


def test_device_aware_laser_dominates_expert_pricing_on_devices() -> None:
    """With 8 experts per device, pricing load per device (expert_groups) buys device balance with less gate
    mass: the device-aware setting used by the benchmark beats the per-expert default on both device
    imbalance and mass kept; the per-token mass guard still holds."""
    cfg = GateConfig("qwen_moe", 64, 8, normalize=False)
    groups = tuple(e // 8 for e in range(64))
    device = torch.tensor(groups)
    g = gate_from_logits(Workload(WorkloadConfig(64, 4096, temperature=2.0, seed=5)).batch(0).logits, cfg)
    dropless = CapacityConfig(overflow="dropless")

    def measure(policy: LaserRouting) -> tuple[float, float]:
        r = policy.route(g, dropless)
        per_expert = torch.bincount(r.experts[r.experts >= 0], minlength=64).double()
        per_device = torch.zeros(8, dtype=torch.float64).index_add_(0, device, per_expert)
        return imbalance(per_device), gate_mass_retained(g.probs, r.experts, g.experts)

    aware = LaserRouting(balance_weight=0.7, max_mass_loss=0.25, mass_threshold=0.6, expert_groups=groups)
    aware_imbalance, aware_mass = measure(aware)
    plain_imbalance, plain_mass = measure(LaserRouting(balance_weight=0.12, max_mass_loss=0.1, mass_threshold=0.6))
    assert aware_imbalance < plain_imbalance - 0.02 and aware_mass > plain_mass
    r = aware.route(g, dropless)
    kept = g.probs.gather(1, r.experts.clamp(min=0)).sum(dim=1)
    top = g.probs.gather(1, g.experts).sum(dim=1)
    assert bool((kept >= (1 - 0.25) * top - 1e-6).all())
    assert LaserRouting(balance_weight=0.7, max_mass_loss=0.25, mass_threshold=0.6).with_expert_groups(groups) == aware


def test_device_aware_laser_rejects_wrong_groups() -> None:
    g = gate_from_logits(torch.randn(4, 8), GateConfig("mixtral", 8, 2))
    with pytest.raises(InputError, match="expert_groups has 3 entries for 8 experts"):
        LaserRouting(expert_groups=(0, 1, 2)).route(g, CapacityConfig(overflow="dropless"))
    with pytest.raises(ConfigError, match="expert_groups"):
        LaserRouting(expert_groups=(0, -1))


def test_for_route_hook_prices_per_actor_only_when_device_aware() -> None:
    """The router calls `policy.for_layer(layer).for_route(route)`: the base policy ignores the placement,
    device-aware laser takes each expert's first-replica actor from the live route."""
    from expertray.state.placement_table import PlacementTable

    route = PlacementTable.balanced(1, 8, ["a", "b", "c"]).route(0)
    topk = ROUTING.create("topk")
    assert topk.for_route(route) is topk
    plain = LaserRouting()
    assert plain.for_route(route) is plain
    aware = LaserRouting(device_aware=True).for_route(route)
    assert aware.expert_groups == route.home_actor and len(set(route.home_actor)) == 3
