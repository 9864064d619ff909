"""Gating families: router logits → (top-k expert ids, combine weights).

Shapes: hidden [T, D], logits/scores [T, E], experts/weights [T, k]. Weights are float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from expertray.config import GateConfig


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


def _mixtral(logits: torch.Tensor, cfg: GateConfig, gw: GateWeights) -> GateOutput:
    probs = torch.softmax(logits, dim=-1)
    top, idx = torch.topk(probs, cfg.top_k, dim=-1)
    if cfg.normalize:
        top = top / top.sum(dim=-1, keepdim=True)
    return GateOutput(logits, probs, probs, idx, top)


def _deepseek_v3(logits: torch.Tensor, cfg: GateConfig, gw: GateWeights) -> GateOutput:
    scores = logits.sigmoid()
    choice = scores if gw.correction_bias is None else scores + gw.correction_bias.float()
    if cfg.num_groups > 1:
        T = logits.shape[0]
        grouped = choice.view(T, cfg.num_groups, -1)
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
        group_idx = group_scores.topk(cfg.topk_groups, dim=-1, sorted=False).indices
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
        score_mask = group_mask.unsqueeze(-1).expand_as(grouped).reshape(T, -1)
        choice = choice.masked_fill(~score_mask, float("-inf"))
    idx = choice.topk(cfg.top_k, dim=-1).indices
    top = scores.gather(1, idx)
    if cfg.normalize:
        top = top / (top.sum(dim=-1, keepdim=True) + 1e-20)
    top = top * cfg.routed_scaling_factor
    return GateOutput(logits, choice, scores * cfg.routed_scaling_factor, idx, top)


def _gpt_oss(logits: torch.Tensor, cfg: GateConfig, gw: GateWeights) -> GateOutput:
    top, idx = torch.topk(logits, cfg.top_k, dim=-1)
    return GateOutput(logits, logits, torch.softmax(logits, dim=-1), idx, torch.softmax(top, dim=-1))


_FAMILIES = {"mixtral": _mixtral, "qwen_moe": _mixtral, "deepseek_v3": _deepseek_v3, "gpt_oss": _gpt_oss}


def gate(hidden: torch.Tensor, cfg: GateConfig, gw: GateWeights) -> GateOutput:
    """Score T tokens and choose their top-k experts with the family's own rule."""
    return gate_from_logits(router_logits(hidden, gw), cfg, gw)


def gate_from_logits(logits: torch.Tensor, cfg: GateConfig, gw: GateWeights | None = None) -> GateOutput:
    """The family's rule on router logits [T, E] already computed (e.g. replayed or synthetic);
    `gw` supplies DeepSeek-V3's correction bias when there is one."""
    return _FAMILIES[cfg.family](logits.float(), cfg, gw or GateWeights(torch.empty(0)))
