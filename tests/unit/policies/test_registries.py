"""The policy seams: each registry holds exactly the names its config field accepts, rejects unknown names
and bad parameters the same way, and takes a new implementation that its consumer then runs by name."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from subprocess import run

import numpy as np
import pytest
import torch

import expertray
from expertray.config import (
    AUTOSCALE_POLICIES,
    PLACEMENT_POLICIES,
    REPLICA_POLICIES,
    ROUTING_POLICIES,
    CapacityConfig,
    ClusterConfig,
    MoELayerConfig,
    check_policy_names,
)
from expertray.errors import ConfigError
from expertray.layer.capacity import CapacityResult
from expertray.layer.gating import GateOutput
from expertray.layer.reference import MoELayer
from expertray.layer.route import prepare
from expertray.policies.autoscale import AUTOSCALE, Action, AutoscalePolicy, Signals
from expertray.policies.placement import PLACEMENT, PlacementPlan, PlacementPolicy, check_inputs, finish_plan
from expertray.policies.replica import REPLICA
from expertray.policies.routing import ROUTING
from expertray.registry import Registry
from expertray.seams import ReplicaSelector, RoutingPolicy
from expertray.state.placement_table import LayerRoute, PlacementTable, Slot
from expertray.state.topology import Topology

# registry, a registered name, parameters that name does not take
REGISTRIES = [(ROUTING, "topk", {"widen": 3}), (REPLICA, "round_robin", {"nope": 1}),
              (PLACEMENT, "balanced", {"nope": 1}), (AUTOSCALE, "hysteresis", {"nope": 1})]


@pytest.fixture
def scratch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let a test register into the global registries; its entries are gone afterwards."""
    for registry, _, _ in REGISTRIES:
        monkeypatch.setattr(registry, "_entries", dict(registry._entries))


DECLARED = [(ROUTING, ROUTING_POLICIES), (REPLICA, REPLICA_POLICIES), (PLACEMENT, PLACEMENT_POLICIES),
            (AUTOSCALE, AUTOSCALE_POLICIES)]


@pytest.mark.parametrize("registry,declared", DECLARED, ids=[r.kind for r, _ in DECLARED])
def test_each_registry_holds_exactly_the_names_config_accepts(registry: Registry, declared: tuple) -> None:
    assert registry.names() == sorted(declared)


@pytest.mark.parametrize("field_name", ["routing_policy", "replica_policy", "autoscale_policy"])
def test_config_rejects_an_unregistered_policy_name_by_field(field_name: str) -> None:
    check_policy_names(ClusterConfig())
    with pytest.raises(ConfigError, match=rf"cluster.{field_name}: 'nope' is unknown \(known: "):
        check_policy_names(ClusterConfig(**{field_name: "nope"}))


@pytest.mark.parametrize("registry,name,bad_params", REGISTRIES, ids=[r.kind for r, _, _ in REGISTRIES])
def test_registry_errors(scratch: None, registry: Registry, name: str, bad_params: dict) -> None:
    known = ", ".join(registry.names())
    with pytest.raises(ConfigError, match=rf"{registry.kind} policy 'nope' is unknown \(known: {known}\)"):
        registry.create("nope")
    with pytest.raises(ConfigError, match=rf"{registry.kind} policy '{name}': bad parameters"):
        registry.create(name, **bad_params)
    with pytest.raises(ValueError, match=f"{registry.kind} policy '{name}' registered twice"):
        registry.register(name)(object)


def test_a_new_routing_policy_and_replica_selector_run_in_the_pipeline_by_name(scratch: None) -> None:
    @ROUTING.register("everyone_to_expert")
    @dataclass(frozen=True)
    class EveryoneTo(RoutingPolicy):
        expert: int = 0

        def route(self, gate: GateOutput, capacity: CapacityConfig,
                  expert_load: torch.Tensor | None = None) -> CapacityResult:
            experts = torch.full_like(gate.experts[:, :1], self.expert)
            return CapacityResult(experts, torch.ones(experts.shape), None, 0, 0)

    @REPLICA.register("last_replica")
    class LastReplica(ReplicaSelector):
        def select(self, experts: torch.Tensor, route: LayerRoute, dest_load: torch.Tensor | None = None,
                   local_actors: set[int] | None = None) -> torch.Tensor:
            last = torch.tensor([r[-1] for r in route.replicas])
            return torch.where(experts >= 0, last[experts.clamp(min=0)], -1)

    cfg = MoELayerConfig(d_model=8, d_ff=16)
    layer = MoELayer.random(cfg)
    table = PlacementTable.balanced(1, cfg.num_experts, ["a", "b"]).replicate(0, 2, "b")
    policy = ROUTING.create("everyone_to_expert", expert=2)
    batch = prepare(torch.randn(5, 8), 0, cfg, layer.gate_weights, policy, REPLICA.create("last_replica"),
                    table.route(0), num_actors=2)
    assert batch.routing.experts.flatten().tolist() == [2] * 5
    assert [(b.actor, b.num_rows, b.experts) for b in batch.buckets] == [(0, 0, []), (1, 5, [2])]


def test_a_new_placement_policy_plans_by_name(scratch: None) -> None:
    @PLACEMENT.register("all_on_first")
    class AllOnFirst(PlacementPolicy):
        """Every expert of every layer on the first device (a single-device layout)."""

        def plan(self, load: np.ndarray, topology: Topology, current: PlacementTable | None = None,
                 expert_bytes: int = 0) -> PlacementPlan:
            arr = check_inputs(load, topology, current, expert_bytes)
            first = topology.devices[0]
            return finish_plan("all_on_first", [Slot(first, *le) for le in np.ndindex(*arr.shape)], arr,
                               topology, current, expert_bytes)

    from expertray.tools.sim.coactivation import Coactivation
    from expertray.tools.sim.simulator import SimConfig, plan_tables

    counts = Coactivation.empty(2, 4)
    counts.load[:] = 1
    tables = plan_tables(["all_on_first"], counts, Topology.single_node(["d0", "d1"], 4), SimConfig())
    table, _ = tables["all_on_first"]
    assert table.actors == ("d0", "d1") and {s.actor for s in table.slots} == {"d0"}


def test_a_new_autoscale_policy_decides_actions_the_table_takes(scratch: None) -> None:
    @AUTOSCALE.register("replicate_hottest")
    @dataclass
    class ReplicateHottest(AutoscalePolicy):
        dst: str = "b"

        def decide(self, signals: Signals, table: PlacementTable, now_s: float) -> list[Action]:
            layer, expert = np.unravel_index(int(signals.load.argmax()), signals.load.shape)
            return [Action("replicate", "hottest", int(layer), int(expert), dst=self.dst)]

    policy = AUTOSCALE.create("replicate_hottest", dst="b")
    table = PlacementTable.balanced(1, 4, ["a", "b"])
    (action,) = policy.decide(Signals(np.array([[1.0, 9.0, 1.0, 1.0]]), 0.0, 0), table, 0.0)
    assert [s.actor for s in action.apply(table).replicas(0, 1)] == ["a", "b"]


def test_importing_expertray_imports_neither_ray_nor_torch() -> None:
    code = "import sys, expertray; print(sorted({'ray', 'torch'} & set(sys.modules)))"
    out = run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_public_surface() -> None:
    """The Ray-free part of the surface (a GPU box without Ray runs it); the Ray entry points are checked
    by test_public_surface_entry_points_come_from_api."""
    import inspect

    from expertray import config, errors

    assert len(set(expertray.__all__)) == len(expertray.__all__)
    # every error class and every config class is part of the surface
    errors_ = {n for n, c in vars(errors).items() if inspect.isclass(c) and issubclass(c, errors.ExpertRayError)}
    configs = {n for n, c in vars(config).items() if inspect.isclass(c) and n.endswith("Config")}
    assert not (errors_ | configs) - set(expertray.__all__)
    assert all(getattr(expertray, name) is not None for name in expertray.__all__
               if expertray._LAZY.get(name) != "expertray.api")
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        expertray.nope  # noqa: B018


@pytest.mark.ray
def test_public_surface_entry_points_come_from_api() -> None:
    """The rest of the surface: every name resolves, and the Ray entry points are expertray.api's."""
    from expertray import api

    assert all(getattr(expertray, name) is not None for name in expertray.__all__)
    assert (expertray.launch, expertray.connect, expertray.Cluster) == (api.launch, api.connect, api.Cluster)
