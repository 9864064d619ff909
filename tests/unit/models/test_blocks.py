"""The in-process MoELayer reproduces transformers' MoE blocks exactly (fp32)."""

import pytest
import torch

tf = pytest.importorskip("transformers")

from expertray.config import GateConfig, MoELayerConfig  # noqa: E402
from expertray.layer.gating import GateWeights, gate  # noqa: E402
from expertray.layer.reference import MoELayer  # noqa: E402
from expertray.models.blocks import from_hf_block, to_hf_block  # noqa: E402

TOKENS = [1, 3, 7, 64]  # 1 token and tokens < experts included


def _init(block: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(0)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.05)
    if hasattr(block.gate, "e_score_correction_bias"):
        block.gate.e_score_correction_bias.normal_(std=0.1)
    return block.eval()


def _blocks():
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    return {
        "mixtral": MixtralSparseMoeBlock(tf.MixtralConfig(hidden_size=32, intermediate_size=64,
                                                          num_local_experts=8, num_experts_per_tok=2)),
        "qwen2_moe": Qwen2MoeSparseMoeBlock(tf.Qwen2MoeConfig(
            hidden_size=32, moe_intermediate_size=48, num_experts=12, num_experts_per_tok=4,
            shared_expert_intermediate_size=40, norm_topk_prob=False)),
        "qwen2_moe_renorm": Qwen2MoeSparseMoeBlock(tf.Qwen2MoeConfig(
            hidden_size=32, moe_intermediate_size=48, num_experts=6, num_experts_per_tok=2,
            shared_expert_intermediate_size=40, norm_topk_prob=True)),
        "olmoe": OlmoeSparseMoeBlock(tf.OlmoeConfig(hidden_size=32, intermediate_size=48, num_experts=16,
                                                    num_experts_per_tok=4)),
        "deepseek_v3": DeepseekV3MoE(tf.DeepseekV3Config(
            hidden_size=32, moe_intermediate_size=24, n_routed_experts=16, num_experts_per_tok=4, n_group=4,
            topk_group=2, routed_scaling_factor=2.5, n_shared_experts=1)),
    }


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "qwen2_moe_renorm", "olmoe", "deepseek_v3"])
@pytest.mark.parametrize("tokens", TOKENS)
def test_layer_matches_transformers_block(name: str, tokens: int) -> None:
    block = _init(_blocks()[name])
    layer = from_hf_block(block)
    x = torch.randn(2, tokens, 32, generator=torch.Generator().manual_seed(tokens))
    with torch.no_grad():
        ref = block(x)
    out = layer(x)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["mixtral", "qwen_moe"])
def test_to_hf_block_round_trip(family: str) -> None:
    cfg = MoELayerConfig(d_model=16, d_ff=24, gate=GateConfig(family, 8, 2), shared_d_ff=20,
                         shared_gated=family == "qwen_moe")
    if family == "mixtral":
        cfg = MoELayerConfig(d_model=16, d_ff=24, gate=GateConfig(family, 8, 2))
    layer = MoELayer.random(cfg, seed=3)
    block = to_hf_block(layer)
    back = from_hf_block(block)
    torch.testing.assert_close(back.experts.gate_up, layer.experts.gate_up, atol=0, rtol=0)
    x = torch.randn(1, 9, 16)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), block(x), atol=1e-5, rtol=0)


def test_gpt_oss_gating_matches_router() -> None:
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssTopKRouter

    router = GptOssTopKRouter(tf.GptOssConfig(hidden_size=32, num_local_experts=8, num_experts_per_tok=3))
    _init_router = torch.Generator().manual_seed(5)
    with torch.no_grad():
        router.weight.copy_(torch.randn(8, 32, generator=_init_router))
        router.bias.copy_(torch.randn(8, generator=_init_router))
    x = torch.randn(11, 32)
    _, ref_w, ref_i = router(x)
    g = gate(x, GateConfig("gpt_oss", 8, 3), GateWeights(router.weight.detach(), bias=router.bias.detach()))
    assert torch.equal(g.experts, ref_i)
    torch.testing.assert_close(g.weights, ref_w, atol=1e-6, rtol=0)


def _whole_blocks():
    from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeMoE
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP

    return {
        "gpt_oss": GptOssMLP(tf.GptOssConfig(hidden_size=32, intermediate_size=40, num_local_experts=8,
                                             num_experts_per_tok=3, swiglu_limit=0.3)),
        "glm4_moe": Glm4MoeMoE(tf.Glm4MoeConfig(hidden_size=32, moe_intermediate_size=24, n_routed_experts=16,
                                                num_experts_per_tok=4, n_group=4, topk_group=2,
                                                routed_scaling_factor=1.5, n_shared_experts=2)),
    }


@pytest.mark.parametrize("name", ["gpt_oss", "glm4_moe"])
@pytest.mark.parametrize("tokens", TOKENS)
def test_whole_block_matches_transformers(name: str, tokens: int) -> None:
    """GPT-OSS: router bias, top-k on logits then softmax, expert biases, clamped SwiGLU (a limit small
    enough that the clamp is active) on the interleaved gate/up layout. GLM-4.5: DeepSeek-V3 gating."""
    block = _whole_blocks()[name]
    torch.manual_seed(0)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(std=0.3)
        if name == "glm4_moe":
            block.gate.e_score_correction_bias.normal_(std=0.1)
    layer = from_hf_block(block.eval())
    x = torch.randn(2, tokens, 32, generator=torch.Generator().manual_seed(tokens))
    with torch.no_grad():
        ref = block(x)
    ref = ref[0] if isinstance(ref, tuple) else ref
    if name == "gpt_oss":
        gu = x.reshape(-1, 32) @ block.experts.gate_up_proj[0] + block.experts.gate_up_proj_bias[0]
        assert (gu[..., ::2] > 0.3).any(), "the clamp must be exercised"
    torch.testing.assert_close(layer(x), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["mixtral", "deepseek_v3"])
def test_bfloat16_layer_within_bf16_error(name: str) -> None:
    """A bf16 layer (experts in bf16, gate in fp32) stays within the bf16 block's own error of the fp32 block."""
    block = _init(_blocks()[name])
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        exact = block(x[None])[0]
        ref_err = (block.to(torch.bfloat16)(x[None].bfloat16())[0].float() - exact).abs()
    layer = from_hf_block(block)
    assert layer.dtype == torch.bfloat16 and layer.gate_weights.weight.dtype in (torch.bfloat16, torch.float32)
    out = layer(x.bfloat16())
    assert out.dtype == torch.bfloat16
    err = (out.float() - exact).abs()
    assert err.mean() <= 1.25 * ref_err.mean() and err.max() <= 2 * ref_err.max()
    fp32 = layer.to(torch.float32)
    assert fp32.dtype == torch.float32 and layer.dtype == torch.bfloat16
