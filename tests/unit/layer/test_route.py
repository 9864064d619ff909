"""The router's data path on the test device (EXPERTRAY_DEVICE: a GPU in `make gpu-check`): prepare's buckets and
counts from the plan's one host transfer equal a direct count, replica selection runs where the gate ran, finish
combines what prepare cut, and the whole `run_layer` equals the in-process layer on the CPU."""

from __future__ import annotations

import asyncio

import pytest
import torch

from expertray.config import CapacityConfig, GateConfig, MoELayerConfig
from expertray.layer.experts import ExpertWeights
from expertray.layer.gating import GateWeights
from expertray.layer.reference import MoELayer
from expertray.layer.route import InProcessTransport, LayerParams, finish, prepare, run_layer
from expertray.policies.replica import REPLICA
from expertray.policies.routing import ROUTING
from expertray.state.placement_table import PlacementTable


@pytest.mark.parametrize("overflow", ["drop", "dropless"])
def test_prepare_buckets_and_counts_match_a_direct_count(overflow: str, device: torch.device) -> None:
    E, D, T = 8, 16, 40
    cfg = MoELayerConfig(d_model=D, d_ff=8, gate=GateConfig("mixtral", E, 2),
                         capacity=CapacityConfig(factor=0.5, min_capacity=1, overflow=overflow))
    table = PlacementTable.balanced(1, E, ["a", "b", "c"]).replicate(0, 3, "c")
    route = table.route(0)
    gen = torch.Generator().manual_seed(11)
    gw = GateWeights(torch.randn(E, D, generator=gen).to(device))
    hidden = torch.randn(T, D, generator=gen).to(device)
    batch = prepare(hidden, 0, cfg, gw, ROUTING.create("capacity"), REPLICA.create("round_robin"), route, 3)

    assert batch.dests.device.type == device.type and batch.expert_counts.device.type == device.type
    experts, dests = batch.routing.experts.cpu(), batch.dests.cpu()
    assert (overflow == "drop") == bool((experts < 0).any())
    assert batch.expert_counts.cpu().tolist() == torch.bincount(experts[experts >= 0], minlength=E).tolist()
    per_dest = torch.bincount(dests[dests >= 0], minlength=route.num_dests).tolist()
    dest_actor, dest_expert = route.dest_actor.tolist(), route.dest_expert.tolist()
    start = 0
    for bucket in batch.buckets:
        mine = [d for d in range(route.num_dests) if dest_actor[d] == bucket.actor and per_dest[d]]
        assert bucket.experts == [dest_expert[d] for d in mine]
        assert bucket.counts == [per_dest[d] for d in mine]
        assert (bucket.row_start, bucket.num_rows) == (start, sum(bucket.counts))
        start += bucket.num_rows
    assert start == batch.rows.shape[0] == int((dests >= 0).sum())

    # identity experts: finish gives back each token scaled by its kept gate mass
    out = finish(batch, batch.rows.clone(), hidden, None)
    mass = torch.where(experts >= 0, batch.routing.weights.cpu(), 0.0).sum(dim=1, keepdim=True)
    torch.testing.assert_close(out.cpu(), hidden.cpu() * mass)


GATES = [GateConfig("mixtral", 8, 2), GateConfig("deepseek_v3", 16, 4, num_groups=4, topk_groups=2,
                                                  routed_scaling_factor=2.5)]


@pytest.mark.parametrize("gate", GATES, ids=lambda g: g.family)
@pytest.mark.parametrize("policy", ["topk", "capacity"])
def test_run_layer_on_device_equals_moe_layer(device: torch.device, gate: GateConfig, policy: str) -> None:
    cfg = MoELayerConfig(d_model=32, d_ff=48, gate=gate, shared_d_ff=24 if gate.family == "deepseek_v3" else 0)
    layer = MoELayer.random(cfg, seed=5)
    params = LayerParams(layer.gate_weights, layer.shared).to(device)
    assert params.gate.weight.device.type == device.type
    transport = InProcessTransport([ExpertWeights(layer.experts.gate_up.to(device), layer.experts.down.to(device))])
    table = PlacementTable.balanced(1, gate.num_experts, ["a", "b", "c"]).replicate(0, 1, "c")
    x = torch.randn(37, 32, generator=torch.Generator().manual_seed(2))
    result = asyncio.run(run_layer(x.to(device), 0, cfg, params, ROUTING.create(policy), REPLICA.create("round_robin"),
                                   table, transport))
    assert result.output.device.type == device.type
    torch.testing.assert_close(result.output.cpu(), layer(x), atol=2e-5, rtol=1e-4)
