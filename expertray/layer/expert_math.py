"""Expert MLPs beyond plain SwiGLU: GPT-OSS's clamped SwiGLU with expert biases.

Weights keep expertray's stacked layout (expertray/layer/experts.py): gate_up [S, 2F, D] with gate rows first,
then up rows (GPT-OSS's interleaved [E, D, 2F] is reordered once, at load), down [S, D, F]. Biases:
gate_up [S, 2F] (same row order), down [S, D]. Plain-SwiGLU layers without biases keep using
`expertray.layer.experts.fused_experts_combine`; this module adds what a layer config with
`expert_activation="clamped_swiglu"` or `expert_bias=True` needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from expertray.config import MoELayerConfig
from expertray.layer.dispatch import DispatchPlan
from expertray.layer.experts import ExpertWeights


@dataclass
class ExpertBiases:
    """Biases of S expert slots: gate_up [S, 2F] (gate entries first, then up), down [S, D]."""

    gate_up: torch.Tensor
    down: torch.Tensor

    def __post_init__(self) -> None:
        if self.gate_up.dim() != 2 or self.down.dim() != 2 or self.gate_up.shape[0] != self.down.shape[0]:
            raise ValueError(f"expert biases must be gate_up [S, 2F] and down [S, D], got "
                             f"{tuple(self.gate_up.shape)} and {tuple(self.down.shape)}")

    @property
    def nbytes(self) -> int:
        return self.gate_up.numel() * self.gate_up.element_size() + self.down.numel() * self.down.element_size()

    def select(self, slots: Sequence[int]) -> ExpertBiases:
        """A copy holding only `slots`, in that order."""
        idx = torch.as_tensor(list(slots), dtype=torch.long)
        return ExpertBiases(self.gate_up.index_select(0, idx).contiguous(), self.down.index_select(0, idx).contiguous())

    def check(self, experts: ExpertWeights) -> None:
        """Raise unless these biases fit `experts` (same slots, 2F and D)."""
        want = ((experts.num_slots, 2 * experts.d_ff), (experts.num_slots, experts.d_model))
        if (tuple(self.gate_up.shape), tuple(self.down.shape)) != want:
            raise ValueError(f"expert biases must be {want[0]} and {want[1]}, got {tuple(self.gate_up.shape)} "
                             f"and {tuple(self.down.shape)}")


def clamped_swiglu_act(gate: torch.Tensor, up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """GPT-OSS activation on [n, F] halves: clamp, gate·sigmoid(alpha·gate)·(up + 1)."""
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return gate * torch.sigmoid(gate * alpha) * (up + 1)


def expert_mlp(x: torch.Tensor, cfg: MoELayerConfig, gate_up: torch.Tensor, down: torch.Tensor,
               gate_up_bias: torch.Tensor | None = None, down_bias: torch.Tensor | None = None) -> torch.Tensor:
    """One expert on rows x [n, D] (gate_up [2F, D], down [D, F], optional biases [2F], [D]) → [n, D],
    with the activation `cfg.expert_activation` names."""
    gate, up = F.linear(x, gate_up, gate_up_bias).chunk(2, dim=-1)
    if cfg.expert_activation == "clamped_swiglu":
        h = clamped_swiglu_act(gate, up, cfg.swiglu_alpha, cfg.swiglu_limit)
    else:
        h = F.silu(gate) * up
    return F.linear(h, down, down_bias)


def fused_experts_combine_general(hidden: torch.Tensor, plan: DispatchPlan, weights: torch.Tensor,
                                  experts: ExpertWeights, biases: ExpertBiases | None,
                                  cfg: MoELayerConfig) -> torch.Tensor:
    """`experts.fused_experts_combine` for any activation and optional biases: hidden [T, D] → [T, D].

    weights: [T, k] combine weights; plan rows grouped by slot (slot s = logical expert s in-process).
    """
    out = torch.zeros(plan.num_tokens, hidden.shape[1], dtype=hidden.dtype, device=hidden.device)
    row_weight = weights[plan.token_index, plan.k_index].to(hidden.dtype)
    start = 0
    for slot, n in enumerate(plan.counts.tolist()):
        if n:
            idx = plan.token_index[start:start + n]
            y = expert_mlp(hidden.index_select(0, idx), cfg, experts.gate_up[slot], experts.down[slot],
                           None if biases is None else biases.gate_up[slot],
                           None if biases is None else biases.down[slot])
            out.index_add_(0, idx, y.mul_(row_weight[start:start + n].unsqueeze(1)))
            start += n
    return out


def deinterleave_gpt_oss(gate_up_EDF2: torch.Tensor, bias_EF2: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """GPT-OSS's gate_up [E, D, 2F] (gate at even, up at odd columns) and bias [E, 2F] → expertray's
    gate_up [E, 2F, D] (gate rows first) and bias [E, 2F] in the same row order."""
    gate_up = torch.cat([gate_up_EDF2[..., ::2], gate_up_EDF2[..., 1::2]], dim=-1).transpose(1, 2).contiguous()
    if bias_EF2 is None:
        return gate_up, None
    return gate_up, torch.cat([bias_EF2[..., ::2], bias_EF2[..., 1::2]], dim=-1).contiguous()
