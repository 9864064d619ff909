"""Which experts tokens use together: within a layer (co-selection) and from one layer to the next (affinity).

Both are counts of tokens over expert pairs, built with one bincount over flattened pair indices per chunk of
tokens (memory: O(chunk · k² + E²) whatever the number of tokens). Input rows are one token's routing,
experts [T, k] int (-1 = dropped, ignored); a layer "step" is the same T tokens routed at every layer.

- co-selection C [E, E]: C[i, j] = tokens that picked both i and j (i != j); C[i, i] = tokens that picked i,
  so C[i, j] / C[i, i] is P(j | i) within the layer.
- layer affinity A [E, E] for layers (l, l + 1): A[i, j] = tokens that picked i at l and j at l + 1.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from expertray.errors import InputError, TraceFormatError
from expertray.tools.trace import Trace

_PAIRS_PER_CHUNK = 1 << 22  # bounds the flattened pair buffer (~32 MiB of int64)


def _check(experts: np.ndarray, num_experts: int, what: str) -> np.ndarray:
    arr = np.asarray(experts)
    if arr.ndim != 2:
        raise InputError(f"{what}: expected experts [tokens, k], got shape {list(arr.shape)}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise InputError(f"{what}: expert ids must be integers, got {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if arr.size and (arr.min() < -1 or arr.max() >= num_experts):
        raise InputError(f"{what}: expert ids must be in [-1, {num_experts}), got [{arr.min()}, {arr.max()}]")
    ordered = np.sort(arr, axis=1)
    twice = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)
    if twice.any():
        row, col = (int(i) for i in np.argwhere(twice)[0])
        raise InputError(f"{what}: token {row} picks expert {int(ordered[row, col])} twice ({arr[row].tolist()})")
    return arr


def _pair_counts(left: np.ndarray, right: np.ndarray, num_experts: int, columns_above_diagonal: bool
                 ) -> np.ndarray:
    """[E, E] counts of (left[t, a], right[t, b]) over tokens t and column pairs (a, b) (only a < b when
    columns_above_diagonal), -1 ignored."""
    T, ka = left.shape
    kb = right.shape[1]
    out = np.zeros(num_experts * num_experts, dtype=np.int64)
    a_idx, b_idx = np.meshgrid(np.arange(ka), np.arange(kb), indexing="ij")
    if columns_above_diagonal:
        a_idx, b_idx = a_idx[a_idx < b_idx], b_idx[a_idx < b_idx]
    a_idx, b_idx = a_idx.ravel(), b_idx.ravel()
    chunk = max(1, _PAIRS_PER_CHUNK // max(a_idx.size, 1))
    for start in range(0, T, chunk):
        li = left[start:start + chunk][:, a_idx]
        ri = right[start:start + chunk][:, b_idx]
        valid = (li >= 0) & (ri >= 0)
        out += np.bincount((li * num_experts + ri)[valid], minlength=num_experts * num_experts)
    return out.reshape(num_experts, num_experts)


def coselection_counts(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """[E, E] int64 co-selection counts of one layer's routing experts [T, k] (diagonal: tokens per expert)."""
    arr = _check(experts, num_experts, "coselection")
    upper = _pair_counts(arr, arr, num_experts, columns_above_diagonal=True)
    counts = upper + upper.T  # a token's experts are distinct, so no pair lands on the diagonal
    counts[np.diag_indices(num_experts)] = np.bincount(arr[arr >= 0], minlength=num_experts)
    return counts


def layer_affinity_counts(experts: np.ndarray, experts_next: np.ndarray, num_experts: int) -> np.ndarray:
    """[E, E] int64: A[i, j] = tokens routed to i by experts [T, k] and to j by experts_next [T, k']."""
    arr = _check(experts, num_experts, "layer affinity (layer l)")
    nxt = _check(experts_next, num_experts, "layer affinity (layer l + 1)")
    if arr.shape[0] != nxt.shape[0]:
        raise InputError(f"layer affinity: both layers must route the same tokens, got {arr.shape[0]} and "
                         f"{nxt.shape[0]} rows")
    return _pair_counts(arr, nxt, num_experts, columns_above_diagonal=False)


@dataclass
class Coactivation:
    """Running counts over steps. load: [L, E] tokens per expert; coselection: [L, E, E];
    layer_affinity: [L - 1, E, E] (pair l holds layers l -> l + 1); tokens: tokens seen per layer."""

    load: np.ndarray
    coselection: np.ndarray
    layer_affinity: np.ndarray
    tokens: int = 0

    @classmethod
    def empty(cls, num_layers: int, num_experts: int) -> Coactivation:
        E = num_experts
        return cls(np.zeros((num_layers, E), dtype=np.int64), np.zeros((num_layers, E, E), dtype=np.int64),
                   np.zeros((max(num_layers - 1, 0), E, E), dtype=np.int64))

    @property
    def num_layers(self) -> int:
        return int(self.load.shape[0])

    @property
    def num_experts(self) -> int:
        return int(self.load.shape[1])

    def add_step(self, layers: Sequence[np.ndarray]) -> None:
        """Count one step: layers[l] = experts [T, k] of the same T tokens at layer l."""
        if len(layers) != self.num_layers:
            raise InputError(f"coactivation: a step needs all {self.num_layers} layers, got {len(layers)}")
        E = self.num_experts
        for layer, experts in enumerate(layers):
            c = coselection_counts(experts, E)
            self.coselection[layer] += c
            self.load[layer] += np.diagonal(c)
        for layer in range(self.num_layers - 1):
            self.layer_affinity[layer] += layer_affinity_counts(layers[layer], layers[layer + 1], E)
        self.tokens += int(np.asarray(layers[0]).shape[0])

    @classmethod
    def from_steps(cls, steps: Iterable[Sequence[np.ndarray]], num_layers: int, num_experts: int) -> Coactivation:
        out = cls.empty(num_layers, num_experts)
        for step in steps:
            out.add_step(step)
        return out

    @classmethod
    def from_trace(cls, trace: Trace) -> Coactivation:
        h = trace.header
        return cls.from_steps(trace_steps(trace), h.num_layers, h.num_experts)


def trace_steps(trace: Trace) -> Iterator[list[np.ndarray]]:
    """A trace's records regrouped into steps: the n-th record of every layer routes the same n-th batch.

    A step is yielded as soon as all its layers have arrived, so a trace written batch by batch holds one
    step in memory. Raises TraceFormatError when one batch has different token counts across layers or
    when layers hold different numbers of batches.
    """
    h = trace.header
    seen = [0] * h.num_layers
    pending: dict[int, dict[int, tuple[np.ndarray, int]]] = {}
    for rec in trace:
        n = seen[rec.layer]
        seen[rec.layer] += 1
        step = pending.setdefault(n, {})
        step[rec.layer] = (rec.experts.numpy(), rec.offset)
        if len(step) == h.num_layers:
            del pending[n]
            sizes = {layer: arr.shape[0] for layer, (arr, _) in step.items()}
            if len(set(sizes.values())) != 1:
                where = ", ".join(f"layer {layer} at byte {step[layer][1]}: {sizes[layer]} tokens"
                                  for layer in sorted(step))
                raise TraceFormatError(f"{trace.path}: batch {n} routes different tokens per layer ({where})")
            yield [step[layer][0] for layer in range(h.num_layers)]
    if pending:
        n = min(pending)
        missing = sorted(set(range(h.num_layers)) - set(pending[n]))
        raise TraceFormatError(f"{trace.path}: batch {n} has no record for layers {missing} (layers hold "
                               f"{min(seen)}..{max(seen)} batches)")
