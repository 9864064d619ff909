"""Expert capacity and overflow handling (drop by first-come or by score, reroute, dropless).

An *assignment* is one (token, k-rank) pair. First-come priority follows GShard/DeepSpeed: every token's
first choice is placed before any second choice, and within a rank, earlier tokens first.
Dropped assignments are marked with expert id -1 and counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from expertray.config import CapacityConfig
from expertray.layer.gating import GateOutput


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, factor: float, min_capacity: int) -> int:
    """Tokens one expert may take in a batch: ceil(factor · T·k / E), at least `min_capacity`."""
    return max(math.ceil(factor * num_tokens * top_k / num_experts), min_capacity)


@dataclass(frozen=True)
class CapacityResult:
    """experts: [T, k] int64, -1 where the assignment was dropped. weights: [T, k] (unchanged)."""

    experts: torch.Tensor
    weights: torch.Tensor
    capacity: int | None
    num_dropped: int
    num_rerouted: int


def _priority_order(experts: torch.Tensor, weights: torch.Tensor, by_score: bool) -> torch.Tensor:
    """Flat (k-major) assignment indices in the order they claim capacity."""
    n = experts.numel()
    if not by_score:
        return torch.arange(n, device=experts.device)
    return torch.argsort(-weights.t().reshape(-1), stable=True)


def _rank_within_expert(expert_in_order: torch.Tensor, num_experts: int) -> torch.Tensor:
    """For a sequence of expert ids, the 0-based position of each entry among entries of the same expert.

    Each expert's first position in the sorted ids comes from a binary search, not `bincount` (which
    waits for the device on CUDA)."""
    by_expert = torch.argsort(expert_in_order, stable=True)
    sorted_ids = expert_in_order[by_expert]
    starts = torch.searchsorted(sorted_ids, torch.arange(num_experts, dtype=sorted_ids.dtype,
                                                         device=sorted_ids.device))
    rank = torch.empty_like(expert_in_order)
    rank[by_expert] = torch.arange(expert_in_order.numel(), device=expert_in_order.device) - starts[sorted_ids]
    return rank


def apply_capacity(g: GateOutput, cfg: CapacityConfig) -> CapacityResult:
    """Enforce per-expert capacity on the gate's choices according to `cfg.overflow`."""
    experts, weights = g.experts, g.weights
    if cfg.overflow == "dropless":
        return CapacityResult(experts, weights, None, 0, 0)
    T, k = experts.shape
    E = g.scores.shape[1]
    cap = expert_capacity(T, E, k, cfg.factor, cfg.min_capacity)
    order = _priority_order(experts, weights, cfg.drop_priority == "score")
    flat = experts.t().reshape(-1)
    rank = _rank_within_expert(flat[order], E)
    keep_flat = torch.empty_like(flat, dtype=torch.bool)
    keep_flat[order] = rank < cap
    kept_experts = torch.where(keep_flat, flat, -1).view(k, T).t().contiguous()
    overflowed = int((~keep_flat).sum())  # the one scalar the host needs (CapacityResult counts drops)
    if cfg.overflow == "drop" or overflowed == 0:
        return CapacityResult(kept_experts, weights, cap, overflowed, 0)
    overflow_in_order = order[~keep_flat[order]]
    rerouted = _reroute(kept_experts, g.scores, overflow_in_order, cap, E)
    dropped = int((rerouted < 0).sum())
    return CapacityResult(rerouted, weights, cap, dropped, int(overflow_in_order.numel()) - dropped)


def _reroute(experts: torch.Tensor, scores: torch.Tensor, pending_flat: torch.Tensor, cap: int,
             num_experts: int) -> torch.Tensor:
    """Move overflowed assignments to each token's next-best expert that still has room.

    Works in rounds; in each round every token's first pending assignment proposes its next candidate and
    experts accept proposals in priority order up to their remaining room. A rerouted assignment keeps its
    original combine weight, so the token's total gate mass is unchanged. Candidates a group-limited gate
    masked out (score -inf) are never used.
    """
    T, k = experts.shape
    out = experts.clone()
    room = cap - torch.bincount(out[out >= 0], minlength=num_experts)
    ranked = torch.argsort(scores, dim=-1, descending=True, stable=True)
    ranked_scores = scores.gather(1, ranked)
    held = torch.zeros(T, num_experts, dtype=torch.bool, device=experts.device)
    tok, col = (experts >= 0).nonzero(as_tuple=True)
    held[tok, experts[tok, col]] = True
    # An overflowed assignment's own expert is full (room 0), so it is never proposed again.
    pend_tok, pend_k = pending_flat % T, pending_flat // T
    pointer = torch.zeros(pending_flat.numel(), dtype=torch.long, device=experts.device)
    alive = torch.ones(pending_flat.numel(), dtype=torch.bool, device=experts.device)
    while bool(alive.any()):
        idx = alive.nonzero().squeeze(1)
        # only each token's first pending assignment is active this round (no double-booking)
        tok = pend_tok[idx]
        order_tok = torch.argsort(tok, stable=True)
        sorted_tok = tok[order_tok]
        lead = torch.ones_like(sorted_tok, dtype=torch.bool)
        lead[1:] = sorted_tok[1:] != sorted_tok[:-1]
        first = torch.zeros_like(lead)
        first[order_tok[lead]] = True
        idx, tok = idx[first], tok[first]
        ptr = pointer[idx]
        exhausted = ptr >= num_experts
        cand = ranked[tok, ptr.clamp(max=num_experts - 1)]
        cand_score = ranked_scores[tok, ptr.clamp(max=num_experts - 1)]
        exhausted |= torch.isinf(cand_score) & (cand_score < 0)
        alive[idx[exhausted]] = False
        ok = ~exhausted & ~held[tok, cand] & (room[cand] > 0)
        prop_idx, prop_cand = idx[ok], cand[ok]
        accept = torch.zeros_like(ok)
        if prop_idx.numel():
            # idx is ascending, i.e. in priority order: earlier proposals claim room first
            rank = _rank_within_expert(prop_cand, num_experts)
            won = rank < room[prop_cand]
            winners, win_cand = prop_idx[won], prop_cand[won]
            room -= torch.bincount(win_cand, minlength=num_experts)
            out[pend_tok[winners], pend_k[winners]] = win_cand
            held[pend_tok[winners], win_cand] = True
            alive[winners] = False
            accept[ok.nonzero().squeeze(1)[won]] = True
        pointer[idx[~accept & ~exhausted]] += 1
    return out
