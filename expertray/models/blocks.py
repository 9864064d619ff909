"""Loaders between transformers MoE blocks and expertray's MoELayer (weights copied, numerics compared).

Supported blocks: one per row of models/families.py (FAMILIES): the row says the block's gating family, its
router's name, its experts' layout and any activation parameters the block carries. Weights keep the block's
dtype. transformers is imported lazily.
"""

from __future__ import annotations

import torch
from torch import nn

from expertray.config import CapacityConfig, GateConfig, MoELayerConfig
from expertray.errors import ConfigError
from expertray.layer.experts import ExpertBiases, ExpertWeights, SharedExpert, deinterleave_gpt_oss
from expertray.layer.gating import GateWeights
from expertray.layer.reference import MoELayer
from expertray.models import families


def supported_blocks() -> list[str]:
    """The transformers MoE block class names expertray loads (one per FAMILIES row)."""
    return [f.block for f in families.FAMILIES]


def _mlp_to_shared(mlp: nn.Module, gate: nn.Linear | None) -> SharedExpert:
    gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], dim=0).detach().clone()
    return SharedExpert(gate_up, mlp.down_proj.weight.detach().clone(),
                        None if gate is None else gate.weight.detach().clone())


def _detach(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().clone()


def _experts(block: nn.Module, fused: str) -> tuple[ExpertWeights, ExpertBiases | None]:
    """The block's routed experts in expertray's layout (GPT-OSS's interleaved [E, D, 2F] reordered)."""
    ex = block.experts
    if fused != "gpt_oss":
        return ExpertWeights(_detach(ex.gate_up_proj), _detach(ex.down_proj)), None
    gate_up, gate_up_bias = deinterleave_gpt_oss(ex.gate_up_proj.detach(), ex.gate_up_proj_bias.detach())
    return (ExpertWeights(gate_up, ex.down_proj.detach().transpose(1, 2).contiguous()),
            ExpertBiases(gate_up_bias, _detach(ex.down_proj_bias)))


def from_hf_block(block: nn.Module, capacity: CapacityConfig | None = None) -> MoELayer:
    """Build a MoELayer with the same weights and gating as a transformers sparse-MoE block."""
    name = type(block).__name__
    family = families.by_block(name)
    if family is None:
        raise ConfigError(f"unsupported transformers MoE block {name} (supported: {', '.join(supported_blocks())})")
    router = getattr(block, family.router)
    E, D = router.weight.shape
    gate_cfg = GateConfig(
        family=family.gating, num_experts=E, top_k=router.top_k,
        normalize=bool(getattr(router, "norm_topk_prob", True)),
        num_groups=getattr(router, "num_group", 1), topk_groups=getattr(router, "topk_group", 1),
        routed_scaling_factor=float(getattr(router, "routed_scaling_factor", 1.0)))
    gw = GateWeights(_detach(router.weight), bias=_detach(getattr(router, "bias", None)),
                     correction_bias=_detach(getattr(router, "e_score_correction_bias", None)))
    ew, biases = _experts(block, family.fused)
    shared = None
    if hasattr(block, "shared_expert"):
        shared = _mlp_to_shared(block.shared_expert, getattr(block, "shared_expert_gate", None))
    elif hasattr(block, "shared_experts"):
        shared = _mlp_to_shared(block.shared_experts, None)
    act = family.block_kwargs(block) if family.block_kwargs is not None else {}
    cfg = MoELayerConfig(d_model=D, d_ff=ew.d_ff, gate=gate_cfg, capacity=capacity or CapacityConfig(),
                         shared_d_ff=0 if shared is None else shared.down.shape[1],
                         shared_gated=shared is not None and shared.gate is not None, **act)
    return MoELayer(cfg, gw, ew, shared, biases)


def to_hf_block(layer: MoELayer) -> nn.Module:
    """A transformers block of the layer's gating family carrying the layer's weights (reference numerics)."""
    import importlib

    import transformers as tf

    cfg = layer.cfg
    family = families.reference_family(cfg.gate.family)
    if family is None:
        raise ConfigError(f"no transformers block for gating family {cfg.gate.family!r}")
    hf_cfg = getattr(tf, family.tiny[0])(**family.hf_kwargs(cfg))
    hf_cfg._experts_implementation = "eager"  # the reference loop; a standalone block has no dispatch set
    module = importlib.import_module(f"transformers.models.{family.name}.modeling_{family.name}")
    Block = getattr(module, family.block)
    block = Block(hf_cfg)
    with torch.no_grad():
        getattr(block, family.router).weight.copy_(layer.gate_weights.weight)
        if layer.gate_weights.correction_bias is not None:
            getattr(block, family.router).e_score_correction_bias.copy_(layer.gate_weights.correction_bias)
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
