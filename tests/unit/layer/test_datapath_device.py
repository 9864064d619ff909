"""The router's whole data path (gate → policy → plan → exchange → combine) on the test device
(EXPERTRAY_DEVICE: a GPU in `make gpu-check`), against the in-process layer on the CPU."""

from __future__ import annotations

import asyncio

import pytest
import torch

from expertray.config import GateConfig, MoELayerConfig
from expertray.layer.datapath import InProcessTransport, LayerParams, run_layer
from expertray.layer.experts import ExpertWeights
from expertray.layer.reference import MoELayer
from expertray.policies.replica import REPLICA
from expertray.policies.routing import ROUTING
from expertray.state.placement_table import PlacementTable

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
