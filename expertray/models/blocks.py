"""Loaders between transformers MoE blocks and expertray's MoELayer (weights copied, numerics compared).

Supported blocks: MixtralSparseMoeBlock (mixtral gating), Qwen2MoeSparseMoeBlock / Qwen3MoeSparseMoeBlock /
Qwen3NextSparseMoeBlock / OlmoeSparseMoeBlock (qwen_moe gating, optional renorm, optional gated shared expert), DeepseekV3MoE and
Glm4MoeMoE (deepseek_v3 gating + ungated shared experts), GptOssMLP (gpt_oss gating with router bias,
biased experts with clamped SwiGLU). Weights keep the block's dtype. transformers is imported lazily.
"""

from __future__ import annotations

import torch
from torch import nn

from expertray.config import CapacityConfig, GateConfig, MoELayerConfig
from expertray.errors import ConfigError
from expertray.layer.experts import ExpertBiases, ExpertWeights, SharedExpert, deinterleave_gpt_oss
from expertray.layer.gating import GateWeights
from expertray.layer.reference import MoELayer

SUPPORTED_BLOCKS: dict[str, str] = {  # transformers block class name -> gating family
    "MixtralSparseMoeBlock": "mixtral",
    "Qwen2MoeSparseMoeBlock": "qwen_moe",
    "Qwen3MoeSparseMoeBlock": "qwen_moe",
    "Qwen3NextSparseMoeBlock": "qwen_moe",
    "OlmoeSparseMoeBlock": "qwen_moe",
    "DeepseekV3MoE": "deepseek_v3",
    "Glm4MoeMoE": "deepseek_v3",
    "GptOssMLP": "gpt_oss",
}


def _mlp_to_shared(mlp: nn.Module, gate: nn.Linear | None) -> SharedExpert:
    gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], dim=0).detach().clone()
    return SharedExpert(gate_up, mlp.down_proj.weight.detach().clone(),
                        None if gate is None else gate.weight.detach().clone())


def _detach(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().clone()


def _experts(block: nn.Module) -> tuple[ExpertWeights, ExpertBiases | None]:
    """The block's routed experts in expertray's layout (GPT-OSS's interleaved [E, D, 2F] reordered)."""
    ex = block.experts
    if type(block).__name__ != "GptOssMLP":
        return ExpertWeights(_detach(ex.gate_up_proj), _detach(ex.down_proj)), None
    gate_up, gate_up_bias = deinterleave_gpt_oss(ex.gate_up_proj.detach(), ex.gate_up_proj_bias.detach())
    return (ExpertWeights(gate_up, ex.down_proj.detach().transpose(1, 2).contiguous()),
            ExpertBiases(gate_up_bias, _detach(ex.down_proj_bias)))


def from_hf_block(block: nn.Module, capacity: CapacityConfig | None = None) -> MoELayer:
    """Build a MoELayer with the same weights and gating as a transformers sparse-MoE block."""
    name = type(block).__name__
    if name not in SUPPORTED_BLOCKS:
        raise ConfigError(f"unsupported transformers MoE block {name} (supported: {', '.join(SUPPORTED_BLOCKS)})")
    family = SUPPORTED_BLOCKS[name]
    router = block.router if family == "gpt_oss" else block.gate
    E, D = router.weight.shape
    gate_cfg = GateConfig(
        family=family, num_experts=E, top_k=router.top_k,
        normalize=bool(getattr(router, "norm_topk_prob", True)),
        num_groups=getattr(router, "num_group", 1), topk_groups=getattr(router, "topk_group", 1),
        routed_scaling_factor=float(getattr(router, "routed_scaling_factor", 1.0)))
    gw = GateWeights(_detach(router.weight), bias=_detach(getattr(router, "bias", None)),
                     correction_bias=_detach(getattr(router, "e_score_correction_bias", None)))
    ew, biases = _experts(block)
    shared = None
    if hasattr(block, "shared_expert"):
        shared = _mlp_to_shared(block.shared_expert, getattr(block, "shared_expert_gate", None))
    elif hasattr(block, "shared_experts"):
        shared = _mlp_to_shared(block.shared_experts, None)
    act = {}
    if family == "gpt_oss":
        act = {"expert_activation": "clamped_swiglu", "swiglu_alpha": float(block.experts.alpha),
               "swiglu_limit": float(block.experts.limit), "expert_bias": True}
    cfg = MoELayerConfig(d_model=D, d_ff=ew.d_ff, gate=gate_cfg, capacity=capacity or CapacityConfig(),
                         shared_d_ff=0 if shared is None else shared.down.shape[1],
                         shared_gated=shared is not None and shared.gate is not None, **act)
    return MoELayer(cfg, gw, ew, shared, biases)


def _hf_config(cfg: MoELayerConfig):  # noqa: ANN202 - a transformers PretrainedConfig
    import transformers as tf

    g = cfg.gate
    common = {"hidden_size": cfg.d_model, "num_experts_per_tok": g.top_k, "hidden_act": "silu"}
    if g.family == "mixtral":
        return tf.MixtralConfig(intermediate_size=cfg.d_ff, num_local_experts=g.num_experts, **common)
    if g.family == "qwen_moe":
        return tf.Qwen2MoeConfig(moe_intermediate_size=cfg.d_ff, num_experts=g.num_experts,
                                 norm_topk_prob=g.normalize, shared_expert_intermediate_size=cfg.shared_d_ff or 1,
                                 **common)
    if g.family == "deepseek_v3":
        return tf.DeepseekV3Config(moe_intermediate_size=cfg.d_ff, n_routed_experts=g.num_experts,
                                   n_group=g.num_groups, topk_group=g.topk_groups, norm_topk_prob=g.normalize,
                                   routed_scaling_factor=g.routed_scaling_factor,
                                   n_shared_experts=max(1, cfg.shared_d_ff // cfg.d_ff), **common)
    raise ConfigError(f"no transformers block for gating family {g.family!r}")


def to_hf_block(layer: MoELayer) -> nn.Module:
    """A transformers block of the layer's family carrying the layer's weights (for reference numerics)."""
    cfg = layer.cfg
    hf_cfg = _hf_config(cfg)
    hf_cfg._experts_implementation = "eager"  # the reference loop; a standalone block has no dispatch set
    if cfg.gate.family == "mixtral":
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock as Block
    elif cfg.gate.family == "qwen_moe":
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock as Block
    else:
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE as Block
    block = Block(hf_cfg)
    with torch.no_grad():
        block.gate.weight.copy_(layer.gate_weights.weight)
        if layer.gate_weights.correction_bias is not None:
            block.gate.e_score_correction_bias.copy_(layer.gate_weights.correction_bias)
        block.experts.gate_up_proj.copy_(layer.experts.gate_up)
        block.experts.down_proj.copy_(layer.experts.down)
        mlp = getattr(block, "shared_expert", None) or getattr(block, "shared_experts", None)
        if mlp is not None:
            if layer.shared is None:
                raise ConfigError(f"{type(block).__name__} always has a shared expert; the layer has none")
            F = layer.shared.down.shape[1]
            mlp.gate_proj.weight.copy_(layer.shared.gate_up[:F])
            mlp.up_proj.weight.copy_(layer.shared.gate_up[F:])
            mlp.down_proj.weight.copy_(layer.shared.down)
            if hasattr(block, "shared_expert_gate"):
                if layer.shared.gate is None:
                    raise ConfigError("Qwen2-MoE's shared expert is gated; the layer's is not")
                block.shared_expert_gate.weight.copy_(layer.shared.gate)
    return block.eval()
