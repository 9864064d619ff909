"""The router's data path on the device EXPERTRAY_DEVICE names (cpu by default, cuda in `make gpu-check`):
gating families against transformers' blocks in fp32 and bf16, dispatch/combine and capacity on the
device, and the outputs staying on the device in the input's dtype."""

from __future__ import annotations

import pytest
import torch

from expertray.config import CapacityConfig, GateConfig
from expertray.layer.capacity import apply_capacity
from expertray.layer.dispatch import build_plan, combine, permute
from expertray.layer.gating import GateWeights, gate

tf = pytest.importorskip("transformers")

from expertray.models.blocks import from_hf_block  # noqa: E402

FAMILIES = ["mixtral", "qwen2_moe", "olmoe", "deepseek_v3"]


def _block(name: str) -> torch.nn.Module:
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    make = {
        "mixtral": lambda: MixtralSparseMoeBlock(tf.MixtralConfig(hidden_size=32, intermediate_size=64,
                                                                  num_local_experts=8, num_experts_per_tok=2)),
        "qwen2_moe": lambda: Qwen2MoeSparseMoeBlock(tf.Qwen2MoeConfig(
            hidden_size=32, moe_intermediate_size=48, num_experts=12, num_experts_per_tok=4,
            shared_expert_intermediate_size=40, norm_topk_prob=False)),
        "olmoe": lambda: OlmoeSparseMoeBlock(tf.OlmoeConfig(hidden_size=32, intermediate_size=48, num_experts=16,
                                                            num_experts_per_tok=4)),
        "deepseek_v3": lambda: DeepseekV3MoE(tf.DeepseekV3Config(
            hidden_size=32, moe_intermediate_size=24, n_routed_experts=16, num_experts_per_tok=4, n_group=4,
            topk_group=2, routed_scaling_factor=2.5, n_shared_experts=1)),
    }
    torch.manual_seed(0)
    block = make[name]()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.05)
    if hasattr(block.gate, "e_score_correction_bias"):
        block.gate.e_score_correction_bias.normal_(std=0.1)
    return block.eval()


@pytest.mark.parametrize("name", FAMILIES)
def test_layer_matches_transformers_block_on_the_device_fp32(name: str, device: torch.device) -> None:
    block = _block(name).to(device)
    layer = from_hf_block(block)
    x = torch.randn(2, 24, 32, generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        ref = block(x)
    out = layer(x)
    assert out.device == x.device and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", FAMILIES)
def test_layer_in_bf16_on_the_device_chooses_the_fp32_experts_and_stays_close(name: str, device: torch.device
                                                                             ) -> None:
    """bf16 serving: gate math stays fp32, so the experts chosen are the fp32 reference's own (same
    bf16-rounded weights and inputs); outputs agree to bf16 precision and keep bf16 and the device."""
    block = _block(name).to(device, torch.bfloat16)
    layer = from_hf_block(block)
    reference = _block(name).to(device)
    reference.load_state_dict({k: v.float() for k, v in block.state_dict().items()})
    x = torch.randn(48, 32, generator=torch.Generator().manual_seed(2)).to(device, torch.bfloat16)
    with torch.no_grad():
        ref = reference(x.float().unsqueeze(0))[0]
    result = layer.forward_with_stats(x)
    assert result.output.dtype == torch.bfloat16 and result.output.device == x.device
    ref_gate = gate(x.float(), layer.cfg.gate, GateWeights(layer.gate_weights.weight.float(),
                                                          correction_bias=layer.gate_weights.correction_bias))
    assert torch.equal(result.experts.sort(dim=1).values, ref_gate.experts.sort(dim=1).values)
    scale = float(ref.abs().max())
    torch.testing.assert_close(result.output.float(), ref, atol=3e-2 * scale, rtol=3e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dispatch_combine_round_trip_on_the_device(device: torch.device, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(3)
    T, S, k = 40, 6, 2
    dest = torch.stack([torch.randperm(S, generator=gen)[:k] for _ in range(T)]).to(device)
    w = torch.rand(T, k, generator=gen).to(device) + 0.1
    w = w / w.sum(dim=1, keepdim=True)
    x = torch.randn(T, 8, generator=gen).to(device, dtype)
    plan = build_plan(dest, S)
    rows = permute(x, plan)
    out = combine(rows.clone(), plan, w)
    assert out.device == x.device and out.dtype == dtype and plan.offsets.device == x.device
    torch.testing.assert_close(out, x, **({} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}))


@pytest.mark.parametrize("overflow", ["drop", "reroute", "dropless"])
def test_capacity_on_the_device_equals_the_cpu(overflow: str, device: torch.device) -> None:
    cfg = GateConfig("mixtral", 8, 2)
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(4))
    gw = GateWeights(torch.randn(8, 16, generator=torch.Generator().manual_seed(5)))
    cap = CapacityConfig(factor=1.0, min_capacity=1, overflow=overflow)
    on_cpu = apply_capacity(gate(x, cfg, gw), cap)
    on_dev = apply_capacity(gate(x.to(device), cfg, GateWeights(gw.weight.to(device))), cap)
    assert on_dev.experts.device.type == device.type
    assert torch.equal(on_dev.experts.cpu(), on_cpu.experts)
    assert (on_dev.num_dropped, on_dev.num_rerouted, on_dev.capacity) == \
        (on_cpu.num_dropped, on_cpu.num_rerouted, on_cpu.capacity)
