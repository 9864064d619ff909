"""Sampling parameters of one request and the next-token choice from its logits."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from expertray.errors import require

_need = functools.partial(require, prefix="request")


@dataclass(frozen=True)
class SamplingParams:
    """max_tokens: new tokens at most; temperature 0 is greedy (argmax, transformers' `do_sample=False`);
    top_p: nucleus mass kept (1 keeps all); seed: a per-request generator (None: random); stop_ids: tokens that
    end the sequence besides the model's end-of-sequence ids (they are not part of the output)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        _need(isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens",
              f"must be an integer >= 1, got {self.max_tokens!r}")
        _need(0.0 <= self.temperature <= 2.0, "temperature", f"must be in [0, 2], got {self.temperature!r}")
        _need(0.0 < self.top_p <= 1.0, "top_p", f"must be in (0, 1], got {self.top_p!r}")
        _need(self.seed is None or (isinstance(self.seed, int) and 0 <= self.seed < 2**63), "seed",
              f"must be an integer in [0, 2**63), got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def generator(self) -> torch.Generator | None:
        """The request's own random stream (None for greedy decoding)."""
        if self.greedy:
            return None
        g = torch.Generator()
        if self.seed is None:
            g.seed()
        else:
            g.manual_seed(self.seed)
        return g


def next_token(logits_V: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token id from the last position's logits [V] (float32 math)."""
    if params.greedy:
        return int(torch.argmax(logits_V))
    probs = torch.softmax(logits_V.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        outside = torch.cumsum(sorted_p, 0) - sorted_p >= params.top_p
        sorted_p[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=generator))
