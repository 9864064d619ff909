"""Gating families: router logits → (top-k expert ids, combine weights), registered by name in GATING.

A new family is one GatingRule (expertray.seams) here, registered under its name, plus that name in
config.GATING_FAMILIES.

Shapes: hidden [T, D], logits/scores [T, E], experts/weights [T, k]. Weights are float32.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from expertray.config import GATING_FAMILIES, GateConfig
from expertray.registry import Registry
from expertray.seams import GatingRule


@dataclass(frozen=True)
class GateOutput:
    """The gate's decision for T tokens.

    logits:  [T, E] raw router logits (float32).
    scores:  [T, E] the scores experts are ranked by (probabilities, sigmoid+bias, or logits); a policy
             that picks other experts than the top-k (reroute, laser) ranks alternatives by these.
    probs:   [T, E] the per-expert combine weight an expert would get if chosen (before renormalisation).
    experts: [T, k] int64 chosen logical experts, best first.
    weights: [T, k] float32 combine weights.
    """

    logits: torch.Tensor
    scores: torch.Tensor
    probs: torch.Tensor
    experts: torch.Tensor
    weights: torch.Tensor


@dataclass
class GateWeights:
    """Router parameters: weight [E, D]; bias [E] (gpt_oss); correction_bias [E] (deepseek_v3)."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    correction_bias: torch.Tensor | None = None


def router_logits(hidden: torch.Tensor, gw: GateWeights) -> torch.Tensor:
    """[T, D] → [T, E] float32 logits."""
    return torch.nn.functional.linear(hidden.float(), gw.weight.float(),
                                      None if gw.bias is None else gw.bias.float())


GATING: Registry[GatingRule] = Registry("gating family")


@GATING.register("mixtral")
class SoftmaxTopK(GatingRule):
    """Mixtral: softmax over all experts → top-k → renormalise over the k (when cfg.normalize)."""

    def __call__(self, logits: torch.Tensor, cfg: GateConfig, gw: GateWeights) -> GateOutput:
        probs = torch.softmax(logits, dim=-1)
        top, idx = torch.topk(probs, cfg.top_k, dim=-1)
        if cfg.normalize:
            top = top / top.sum(dim=-1, keepdim=True)
        return GateOutput(logits, probs, probs, idx, top)


@GATING.register("qwen_moe")
class QwenSoftmaxTopK(SoftmaxTopK):
    """Qwen2/3-MoE and OLMoE: Mixtral's rule with renormalisation off by default (norm_topk_prob)."""


@GATING.register("deepseek_v3")
class SigmoidGroupTopK(GatingRule):
    """DeepSeek-V3 / GLM-4.5: sigmoid scores; selection on scores + correction bias, limited to the
    `topk_groups` best of `num_groups` groups (group score = sum of its top-2); weights are the unbiased
    scores, renormalised (cfg.normalize) and scaled by routed_scaling_factor."""

    def __call__(self, logits: torch.Tensor, cfg: GateConfig, gw: GateWeights) -> GateOutput:
        scores = logits.sigmoid()
        choice = scores if gw.correction_bias is None else scores + gw.correction_bias.float()
        if cfg.num_groups > 1:
            T = logits.shape[0]
            grouped = choice.view(T, cfg.num_groups, -1)
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
            group_idx = group_scores.topk(cfg.topk_groups, dim=-1, sorted=False).indices
            # the groups left out, broadcast over their experts (no [T, E] mask is materialised)
            dropped = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, False)
            choice = grouped.masked_fill(dropped.unsqueeze(-1), float("-inf")).view(T, -1)
        idx = choice.topk(cfg.top_k, dim=-1).indices
        top = scores.gather(1, idx)
        if cfg.normalize:
            top = top / (top.sum(dim=-1, keepdim=True) + 1e-20)
        top = top * cfg.routed_scaling_factor
        return GateOutput(logits, choice, scores * cfg.routed_scaling_factor, idx, top)

    def random_router_extras(self, num_experts: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return {"correction_bias": torch.randn(num_experts, generator=generator) * 0.01}


@GATING.register("gpt_oss")
class LogitTopKSoftmax(GatingRule):
    """GPT-OSS: top-k on the (biased) logits, then softmax over those k."""

    def __call__(self, logits: torch.Tensor, cfg: GateConfig, gw: GateWeights) -> GateOutput:
        top, idx = torch.topk(logits, cfg.top_k, dim=-1)
        return GateOutput(logits, logits, torch.softmax(logits, dim=-1), idx, torch.softmax(top, dim=-1))

    def random_router_extras(self, num_experts: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return {"bias": torch.randn(num_experts, generator=generator) * 0.1}


GATING.check(GATING_FAMILIES)


@functools.cache
def gating_rule(family: str) -> GatingRule:
    """The registered rule of `family` (ConfigError listing the known families when unknown)."""
    return GATING.create(family)


def gate(hidden: torch.Tensor, cfg: GateConfig, gw: GateWeights) -> GateOutput:
    """Score T tokens and choose their top-k experts with the family's own rule."""
    return gate_from_logits(router_logits(hidden, gw), cfg, gw)


def gate_from_logits(logits: torch.Tensor, cfg: GateConfig, gw: GateWeights | None = None) -> GateOutput:
    """The family's rule on router logits [T, E] already computed (e.g. replayed or synthetic);
    `gw` supplies DeepSeek-V3's correction bias when there is one."""
    return gating_rule(cfg.family)(logits.float(), cfg, gw or GateWeights(torch.empty(0)))
