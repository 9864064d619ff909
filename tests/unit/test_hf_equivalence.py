"""The in-process MoELayer reproduces transformers' MoE blocks exactly (fp32)."""

import pytest
import torch

tf = pytest.importorskip("transformers")

from expertray.config import GateConfig, MoELayerConfig  # noqa: E402
from expertray.gating import GateWeights, gate  # noqa: E402
from expertray.hf import from_hf_block, to_hf_block  # noqa: E402
from expertray.layer import MoELayer  # noqa: E402

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
