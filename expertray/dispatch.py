"""Dispatch plan (rows sorted by destination slot) and combine (unpermute, weight, sum over k).

T tokens, k choices each; N ≤ T·k routed rows (dropped assignments are not routed); S destination slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DispatchPlan:
    """Where every routed row goes.

    token_index: [N] int64 source token of each routed row, rows grouped by destination slot (ascending).
    k_index:     [N] int64 which of the token's k choices the row is.
    counts:      [S] int64 rows per destination slot.
    """

    token_index: torch.Tensor
    k_index: torch.Tensor
    counts: torch.Tensor
    num_tokens: int

    @property
    def num_rows(self) -> int:
        return int(self.token_index.numel())

    @property
    def offsets(self) -> torch.Tensor:
        """[S + 1] start row of each slot's segment."""
        return torch.cat([torch.zeros(1, dtype=torch.long, device=self.counts.device), torch.cumsum(self.counts, 0)])

    def group_counts(self, slot_group: torch.Tensor, num_groups: int) -> torch.Tensor:
        """Rows per group (e.g. per actor) given each slot's group id [S]; slots of a group must be contiguous."""
        return torch.zeros(num_groups, dtype=torch.long, device=self.counts.device).index_add_(
            0, slot_group.to(self.counts.device), self.counts)


def build_plan(destinations: torch.Tensor, num_slots: int) -> DispatchPlan:
    """Plan from per-assignment destination slots [T, k] (-1 = dropped, not routed)."""
    T, k = destinations.shape
    flat = destinations.reshape(-1)
    routed = (flat >= 0).nonzero().squeeze(1)
    order = torch.argsort(flat[routed], stable=True)
    sel = routed[order]
    counts = torch.bincount(flat[routed], minlength=num_slots)
    return DispatchPlan(sel // k, sel % k, counts, T)


def permute(hidden: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """[T, D] → [N, D] rows in dispatch order."""
    return hidden.index_select(0, plan.token_index)


def combine(rows: torch.Tensor, plan: DispatchPlan, weights: torch.Tensor) -> torch.Tensor:
    """[N, D] expert outputs → [T, D]: weight each row by its gate weight and sum a token's rows.

    A token with every assignment dropped gets a zero row (its drops are counted by the caller).
    `rows` is scaled in place: it is a transient buffer owned by the caller.
    """
    w = weights[plan.token_index, plan.k_index].to(rows.dtype)
    out = torch.zeros(plan.num_tokens, rows.shape[1], dtype=rows.dtype, device=rows.device)
    return out.index_add_(0, plan.token_index, rows.mul_(w.unsqueeze(1)))
