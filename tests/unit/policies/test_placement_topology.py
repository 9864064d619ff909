"""The `topology_aware` placement policy: valid tables, its balance cap, locality and affinity."""

import numpy as np
import pytest

import expertray.tools.sim  # noqa: F401  (registers topology_aware until policies/placement/__init__.py imports it)
from expertray.errors import ConfigError
from expertray.policies.placement import PLACEMENT
from expertray.policies.placement.topology import excess
from expertray.state.topology import Topology


def _zipf_load(layers: int, experts: int, s: float = 1.0, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation((np.arange(experts) + 1.0) ** -s) * 1e4 for _ in range(layers)])


@pytest.mark.parametrize("nodes, per_node, slots, experts", [(2, 4, 3, 16), (4, 2, 2, 16), (3, 4, 1, 12)])
def test_tables_are_valid_and_under_the_cap(nodes: int, per_node: int, slots: int, experts: int) -> None:
    topo = Topology.uniform(nodes, per_node, slots)
    load = _zipf_load(2, experts)
    plan = PLACEMENT.create("topology_aware", balance_slack=0.2).plan(load, topo)
    for device in topo.devices:
        for layer in range(2):
            held = [s.expert for s in plan.table.slots_of(device) if s.layer == layer]
            assert len(held) == len(set(held)) <= slots
    assert plan.table.version == 0 and plan.slots_moved == len(plan.table.slots)  # every expert has a replica


def test_planned_loads_stay_under_the_cap() -> None:
    topo = Topology.uniform(2, 4, 3)
    for slack in (0.05, 0.2):
        plan = PLACEMENT.create("topology_aware", balance_slack=slack).plan(_zipf_load(3, 16), topo)
        # placement.py's load model (an expert's tokens split evenly over its copies) is the policy's own
        assert plan.balancedness_after.per_layer.min() >= 1 / (1 + slack) - 1e-9


def test_extra_copies_spread_over_nodes() -> None:
    topo = Topology.uniform(4, 2, 4)
    load = np.full((1, 4), 100.0)
    plan = PLACEMENT.create("topology_aware").plan(load, topo)
    for e in range(4):  # 32 slots for 4 equal experts: a copy on every node, then more
        assert {topo.node_of(s.actor) for s in plan.table.replicas(0, e)} == {0, 1, 2, 3}
    lean = PLACEMENT.create("topology_aware", extra_copies=False).plan(load, topo)
    assert len(lean.table.slots) < len(plan.table.slots)


def test_co_selected_experts_share_a_device() -> None:
    topo = Topology.uniform(1, 2, 2)  # four equal experts fill two devices of two slots
    load = np.full((1, 4), 100.0)
    coselect = np.zeros((1, 4, 4))
    coselect[0, 0, 3] = coselect[0, 3, 0] = coselect[0, 1, 2] = coselect[0, 2, 1] = 100.0
    plan = PLACEMENT.create("topology_aware", coselection=coselect).plan(load, topo)
    device_of = {s.expert: s.actor for s in plan.table.slots}
    assert device_of[0] == device_of[3] != device_of[1] == device_of[2]
    plain = {s.expert: s.actor for s in PLACEMENT.create("topology_aware").plan(load, topo).table.slots}
    assert plain[0] == plain[1] != plain[2] == plain[3]  # best fit, in expert order


def test_excess_removes_what_independence_explains() -> None:
    counts = np.array([[5.0, 2, 2], [2, 5, 2], [2, 2, 5]])
    x = excess(counts, symmetric=True)
    np.testing.assert_allclose(x, np.zeros((3, 3)) + np.where(np.eye(3) > 0, -4 / 3, 2 / 3))
    np.testing.assert_allclose(x.sum(axis=1), 0.0, atol=1e-12)


def test_bad_parameters() -> None:
    with pytest.raises(ConfigError, match="balance_slack"):
        PLACEMENT.create("topology_aware", balance_slack=-0.1)
    with pytest.raises(ConfigError, match="coselection: expected shape"):
        PLACEMENT.create("topology_aware", coselection=np.zeros((2, 3, 3))).plan(np.ones((1, 3)),
                                                                                 Topology.uniform(1, 3, 1))
