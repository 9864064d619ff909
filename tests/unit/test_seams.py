"""Every seam takes a new implementation as one class (or row) plus its registration, and the normal config
path then picks it up by name: a fake transport, gating family, checkpoint family, routing and placement
policy are added here, and removed again so other tests see the registries as they were."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from expertray import config
from expertray.config import CapacityConfig, ClusterConfig, GateConfig, MoELayerConfig, check_policy_names
from expertray.layer.capacity import CapacityResult
from expertray.layer.gating import GATING, GateOutput, GateWeights, gating_rule
from expertray.layer.reference import MoELayer
from expertray.layer.route import InProcessTransport
from expertray.models import families
from expertray.policies.placement import PLACEMENT, PlacementPlan, check_inputs, finish_plan
from expertray.policies.routing import ROUTING
from expertray.registry import Registry
from expertray.seams import GatingRule, PlacementPolicy, RoutingPolicy, Transport, TransportStats
from expertray.state.placement_table import PlacementTable, Slot
from expertray.state.topology import Topology


@pytest.fixture
def declare(monkeypatch: pytest.MonkeyPatch) -> Iterator:
    """declare(registry, config_names, name, impl): register `impl` as `name` and add `name` to the config's
    tuple (the two halves of a registration); both are undone after the test."""
    added: list[tuple[Registry, str]] = []

    def add(registry: Registry, names: str, name: str, impl: object) -> None:
        monkeypatch.setattr(config, names, (*getattr(config, names), name))
        registry.register(name)(impl)
        added.append((registry, name))

    yield add
    for registry, name in added:
        registry.unregister(name)


def test_a_registry_that_drifts_from_its_config_fails_its_check() -> None:
    registry: Registry[object] = Registry("widget")
    registry.register("a")(object)
    registry.check(("a",))
    with pytest.raises(RuntimeError, match=r"registered but not declared \['a'\], declared but not registered "
                                           r"\['b'\]"):
        registry.check(("b",))


def test_a_new_routing_policy_is_picked_up_by_name(declare) -> None:
    @dataclass(frozen=True)
    class FirstExpert(RoutingPolicy):
        def route(self, gate: GateOutput, capacity: CapacityConfig,
                  expert_load: torch.Tensor | None = None) -> CapacityResult:
            experts = torch.zeros_like(gate.experts[:, :1])
            return CapacityResult(experts, torch.ones(experts.shape), None, 0, 0)

    declare(ROUTING, "ROUTING_POLICIES", "first_expert", FirstExpert)
    ROUTING.check(config.ROUTING_POLICIES)
    cfg = config.from_dict(ClusterConfig, {"routing_policy": "first_expert"}, "cluster")
    check_policy_names(cfg)
    assert isinstance(ROUTING.create(cfg.routing_policy, **cfg.routing_params), FirstExpert)


def test_a_new_placement_policy_is_picked_up_by_name(declare) -> None:
    class AllOnLast(PlacementPolicy):
        def plan(self, load: np.ndarray, topology: Topology, current: PlacementTable | None = None,
                 expert_bytes: int = 0) -> PlacementPlan:
            arr = check_inputs(load, topology, current, expert_bytes)
            last = topology.devices[-1]
            return finish_plan("all_on_last", [Slot(last, *le) for le in np.ndindex(*arr.shape)], arr,
                               topology, current, expert_bytes)

    declare(PLACEMENT, "PLACEMENT_POLICIES", "all_on_last", AllOnLast)
    PLACEMENT.check(config.PLACEMENT_POLICIES)
    plan = PLACEMENT.create("all_on_last").plan(np.ones((1, 4)), Topology.single_node(["d0", "d1"], 4))
    assert {s.actor for s in plan.table.slots} == {"d1"}


def test_a_new_gating_family_is_picked_up_by_name(declare) -> None:
    class LowestLogits(GatingRule):
        """The k lowest logits, equal weights; its router carries a bias."""

        def __call__(self, logits: torch.Tensor, cfg: GateConfig, gw: GateWeights) -> GateOutput:
            idx = torch.topk(-logits, cfg.top_k, dim=-1).indices
            weights = torch.full(idx.shape, 1.0 / cfg.top_k)
            return GateOutput(logits, -logits, torch.softmax(logits, -1), idx, weights)

        def random_router_extras(self, num_experts: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
            return {"bias": torch.zeros(num_experts)}

    declare(GATING, "GATING_FAMILIES", "lowest", LowestLogits)
    GATING.check(config.GATING_FAMILIES)
    try:
        cfg = config.from_dict(MoELayerConfig, {"d_model": 8, "d_ff": 16, "gate": {"family": "lowest"}}, "layer")
        layer = MoELayer.random(cfg)
        assert layer.gate_weights.bias is not None
        hidden = torch.randn(5, 8)
        gate, experts, *_ = layer.route(hidden)
        assert torch.equal(experts, torch.topk(-gate.logits, cfg.top_k, dim=-1).indices)
    finally:
        gating_rule.cache_clear()  # the rule was cached by name


def test_a_new_checkpoint_family_is_one_row(monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    from expertray.models.blocks import from_hf_block, supported_blocks
    from expertray.models.synthetic import tiny_model

    class FakeMoeBlock(MixtralSparseMoeBlock):
        """Mixtral's block under another name, as a new architecture's block would be."""

    mixtral = families.by_name("mixtral")
    row = dataclasses.replace(mixtral, name="fake_moe", architectures=("FakeMoeForCausalLM",),
                              block="FakeMoeBlock")
    monkeypatch.setattr(families, "FAMILIES", (*families.FAMILIES, row))

    hf = {"architectures": ["FakeMoeForCausalLM"], "hidden_size": 32, "intermediate_size": 48,
          "num_local_experts": 6, "num_hidden_layers": 2}
    found = families.family_for("ckpt", hf)
    assert found is row and found.layer_config(families.HFConfig("ckpt", hf)).gate.family == "mixtral"
    assert "FakeMoeForCausalLM" in families.supported_architectures() and "FakeMoeBlock" in supported_blocks()

    block = next(m for m in tiny_model("fake_moe").modules() if isinstance(m, MixtralSparseMoeBlock))
    block.__class__ = FakeMoeBlock  # the row's tiny config built it; now it is the new architecture's block
    layer = from_hf_block(block)
    assert layer.cfg.gate.family == "mixtral" and layer.cfg.num_experts == mixtral.tiny[1]["num_local_experts"]


@pytest.mark.ray
def test_a_new_transport_is_picked_up_by_name(declare) -> None:
    pytest.importorskip("ray")
    transport_module = importlib.import_module("expertray.actors.transport")

    class Negate(transport_module.ActorTransport):
        """'Experts' computed in process: the output rows are the input rows negated; a member lost stalls
        every exchange, and there is nothing to fall back to."""

        name = "negate"
        every_member = True

        async def exchange(self, batch):  # noqa: ANN001, ANN202
            return -batch.rows, TransportStats([0] * len(batch.buckets), {})

    declare(transport_module.TRANSPORTS, "TRANSPORTS", "negate", Negate)
    transport_module.TRANSPORTS.check(set(config.TRANSPORTS) - {"auto"})
    cfg = config.from_dict(ClusterConfig, {"transport": "negate"}, "cluster")
    transport = asyncio.run(transport_module.open_transport(cfg.transport, [object()], 1.0, ["a0"],
                                                            torch.device("cpu")))
    assert isinstance(transport, Negate) and transport.fallback("a member was lost") is None


def test_the_in_process_transport_is_a_transport() -> None:
    transport = InProcessTransport([])
    assert isinstance(transport, Transport) and not transport.every_member and transport.fallback("x") is None
