"""laser on a gate output that lives on an accelerator: the chunk steps run on one packed host copy."""

import dataclasses

import numpy as np
import pytest
import torch

from expertray.config import CapacityConfig, GateConfig
from expertray.layer.gating import GateOutput, gate_from_logits
from expertray.policies.routing import ROUTING
from expertray.policies.routing import laser as routing_laser
from expertray.policies.routing.laser import _host, next_best
from expertray.state.loadstats import gate_mass_retained, imbalance
from expertray.tools.workload import Workload, WorkloadConfig

DROPLESS = CapacityConfig(overflow="dropless")
CFG = GateConfig("qwen_moe", 64, 8, normalize=False)
GROUPS = tuple(e // 8 for e in range(64))


def _gate(device: torch.device) -> GateOutput:
    logits = Workload(WorkloadConfig(num_experts=64, tokens_per_batch=2000, temperature=2.0, seed=3)).batch(0).logits
    return gate_from_logits(logits.to(device), CFG)


def test_the_packed_host_copy_is_exact() -> None:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 2 ** 20, (50, 12), generator=g)
    flags = torch.rand(50, 4, generator=g) < 0.5
    probs = torch.rand(50, 12, generator=g) ** 30  # tiny values too
    sums = probs.sum(dim=1, keepdim=True)
    tensors = [ids, flags, probs, sums]
    for packed, view, t in zip(_host(tensors, pack=True), _host(tensors, pack=False), tensors, strict=True):
        assert packed.dtype == view.dtype == t.numpy().dtype
        assert np.array_equal(packed, view)


def test_routing_through_the_packed_copy_decides_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a gate on an accelerator goes through (one packed host copy), forced on CPU tensors."""
    gate, policy = _gate(torch.device("cpu")), ROUTING.create("laser", expert_groups=GROUPS)
    ref = policy.route(gate, DROPLESS)
    host = routing_laser._host
    monkeypatch.setattr(routing_laser, "_host", lambda tensors, pack: host(tensors, pack=True))
    out = policy.route(gate, DROPLESS)
    assert not torch.equal(ref.experts, gate.experts)  # laser moved tokens
    assert torch.equal(out.experts, ref.experts) and torch.equal(out.weights, ref.weights)


def test_laser_routes_a_gate_output_on_the_test_device(device: torch.device) -> None:
    gate, policy = _gate(device), ROUTING.create("laser", expert_groups=GROUPS)
    load = torch.arange(64, dtype=torch.float32, device=device)
    out = policy.route(gate, DROPLESS, expert_load=load)
    assert out.experts.device == out.weights.device == gate.probs.device
    ref = policy.route(GateOutput(*(t.cpu() for t in dataclasses.astuple(gate))), DROPLESS, expert_load=load.cpu())
    if device.type == "cpu":
        assert torch.equal(out.experts, ref.experts) and torch.equal(out.weights, ref.weights)
        return
    # the device's sums may round differently in the last bit: check what laser promises instead
    on_cpu = GateOutput(*(t.cpu() for t in dataclasses.astuple(gate)))
    experts = out.experts.cpu()
    assert gate_mass_retained(on_cpu.probs, experts, on_cpu.experts) >= 1 - policy.mass_budget - 1e-6
    allowed = torch.cat([on_cpu.experts, next_best(on_cpu.scores, on_cpu.experts, policy.widen)], dim=1)
    assert (experts.unsqueeze(2) == allowed.unsqueeze(1)).any(dim=2).all()
    prior = load.cpu().double().reshape(8, 8).sum(dim=1)  # per device (8 experts each)

    def device_load(chosen: torch.Tensor) -> torch.Tensor:
        return prior + torch.bincount(chosen.reshape(-1) // 8, minlength=8).double()

    assert imbalance(device_load(experts)) < imbalance(device_load(on_cpu.experts))
