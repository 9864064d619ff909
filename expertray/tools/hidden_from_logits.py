"""Hidden states that realise a target routing: the bridge from the workload generator to a live cluster.

Given router logits [T, E] (e.g. from expertray.tools.workload) and a gate weight W [E, D] with D ≥ E, the
minimum-norm x with W·x = logits is x = pinv(W)·logits; a random component in W's null space makes the
tokens look less synthetic to the experts without changing their routing.
"""

from __future__ import annotations

import torch

from expertray.errors import ConfigError


class LogitInverter:
    """Precomputes pinv(W) [D, E] and the null-space projector for one gate."""

    def __init__(self, gate_weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        E, D = gate_weight.shape
        if D < E:
            raise ConfigError(f"cannot realise arbitrary logits: d_model={D} < num_experts={E}")
        w = gate_weight.double()
        self.pinv = torch.linalg.pinv(w)  # [D, E]
        self.null_proj = torch.eye(D, dtype=torch.float64) - self.pinv @ w  # [D, D]
        self.bias = None if bias is None else bias.double()

    def hidden(self, logits: torch.Tensor, noise: float = 1.0, seed: int = 0) -> torch.Tensor:
        """[T, E] target logits → [T, D] float32 hidden states whose router logits equal them."""
        target = logits.double() - (0 if self.bias is None else self.bias)
        x = target @ self.pinv.t()
        if noise:
            g = torch.Generator().manual_seed(seed)
            x = x + noise * torch.randn(x.shape, generator=g, dtype=torch.float64) @ self.null_proj.t()
        return x.float()
