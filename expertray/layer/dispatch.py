"""Dispatch plan (rows sorted by destination slot) and combine (unpermute, weight, sum over k).

T tokens, k choices each; N ≤ T·k routed rows (dropped assignments are not routed); S destination slots.
Both run on whatever device their inputs are on. Building a plan moves exactly one small tensor to the
host (the slot boundaries, S + 1 integers: the host needs N and the per-slot counts to size buffers and
split the all-to-all); combine moves nothing to the host and, on CUDA, uses no atomics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DispatchPlan:
    """Where every routed row goes.

    token_index: [N] int64 source token of each routed row, rows grouped by destination slot (ascending).
    k_index:     [N] int64 which of the token's k choices the row is.
    counts:      [S] int64 rows per destination slot (on the plan's device).
    host_counts: the same counts as a host tuple (copied once when the plan is built).
    top_k:       k, the choices per token.
    """

    token_index: torch.Tensor
    k_index: torch.Tensor
    counts: torch.Tensor
    num_tokens: int
    host_counts: tuple[int, ...]
    top_k: int

    @property
    def num_rows(self) -> int:
        return int(self.token_index.numel())

    @property
    def offsets(self) -> torch.Tensor:
        """[S + 1] start row of each slot's segment."""
        return torch.cat([torch.zeros(1, dtype=torch.long, device=self.counts.device), torch.cumsum(self.counts, 0)])


def build_plan(destinations: torch.Tensor, num_slots: int) -> DispatchPlan:
    """Plan from per-assignment destination slots [T, k] (-1 = dropped, not routed).

    One stable sort of all T·k assignments with dropped ones keyed past the last slot (so they sort to the
    end, and routed rows keep (token, k) order within a slot), then a binary search for the slot
    boundaries: no `nonzero`, no `bincount` (both synchronise with the host on CUDA), one host transfer."""
    T, k = destinations.shape
    flat = destinations.reshape(-1)
    # int32 keys: a CUDA radix sort makes one pass per key byte, so half the passes of int64
    key = torch.where(flat >= 0, flat, num_slots).to(torch.int32)
    order = torch.argsort(key, stable=True)
    slots = torch.arange(num_slots + 1, dtype=key.dtype, device=key.device)
    bounds = torch.searchsorted(key[order], slots)  # [S + 1]: first row of each slot; bounds[S] = N
    host_bounds = bounds.tolist()
    sel = order[:host_bounds[-1]]
    host_counts = tuple(b - a for a, b in zip(host_bounds, host_bounds[1:]))
    return DispatchPlan(sel // k, sel % k, bounds.diff(), T, host_counts, k)


def permute(hidden: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """[T, D] → [N, D] rows in dispatch order."""
    return hidden.index_select(0, plan.token_index)


def combine(rows: torch.Tensor, plan: DispatchPlan, weights: torch.Tensor) -> torch.Tensor:
    """[N, D] expert outputs → [T, D]: weight each row by its gate weight and sum a token's rows.

    A token with every assignment dropped gets a zero row (its drops are counted by the caller); a dropped
    assignment contributes nothing. `rows` is a transient buffer owned by the caller: it may be scaled in
    place. On CUDA the atomic-free `combine_by_gather`; on a CPU `combine_by_scatter_add`, which has no
    atomics there and needs no [T·k, D] buffer (allocating one costs a CPU more than the whole add).
    """
    if weights.shape != (plan.num_tokens, plan.top_k):
        raise ValueError(f"weights must be [T, k] = {(plan.num_tokens, plan.top_k)}, got {tuple(weights.shape)}")
    if rows.shape[0] != plan.num_rows:
        raise ValueError(f"combine got {rows.shape[0]} rows for a plan of {plan.num_rows}")
    if rows.device.type == "cpu":
        return combine_by_scatter_add(rows, plan, weights)
    return combine_by_gather(rows, plan, weights)


def combine_by_scatter_add(rows: torch.Tensor, plan: DispatchPlan, weights: torch.Tensor) -> torch.Tensor:
    """Scale `rows` in place by their gate weights, then index_add_ them into their tokens' rows."""
    w = weights[plan.token_index, plan.k_index].to(rows.dtype)
    out = torch.zeros(plan.num_tokens, rows.shape[1], dtype=rows.dtype, device=rows.device)
    return out.index_add_(0, plan.token_index, rows.mul_(w.unsqueeze(1)))


def combine_by_gather(rows: torch.Tensor, plan: DispatchPlan, weights: torch.Tensor) -> torch.Tensor:
    """Atomic-free combine (no scatter-add into shared rows): the rows are a permutation of (token, k)
    assignments, so each is copied to its assignment's place in a [T, k, D] buffer (distinct
    destinations; zeros where an assignment was dropped) and a token's k rows are reduced by one batched
    [1, k] @ [k, D] product (fp32 accumulation, one rounding to the rows' dtype; TF32 if the caller
    enabled TF32 matmuls). Reads `rows` once, writes the buffer once, reads it once: ~3·N·D elements of
    traffic, deterministic. `rows` is not modified. With nothing dropped the rows are a full permutation
    of the assignments, so the buffer is one `index_select` through the inverse permutation (a row-wise
    gather, CUDA's fastest indexed copy) instead of an `index_copy_` scatter; with drops, the scatter
    into a zeroed buffer."""
    T, k, D = plan.num_tokens, plan.top_k, rows.shape[1]
    place = plan.token_index * k + plan.k_index  # [N] assignment index of each row, all distinct
    w = weights.reshape(-1).to(rows.dtype)
    if plan.num_rows == T * k:
        source = torch.empty_like(place).scatter_(0, place, torch.arange(T * k, device=place.device))
        per_assignment = rows.index_select(0, source)  # [T·k, D]: row of each assignment
    else:
        per_assignment = rows.new_zeros(T * k, D).index_copy_(0, place, rows)
        w = torch.zeros_like(w).index_copy_(0, place, w.index_select(0, place))
    return torch.bmm(w.view(T, 1, k), per_assignment.view(T, k, D)).view(T, D)
