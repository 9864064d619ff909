"""Routing for the simulator: steps of experts [T, k] per layer for the same T tokens, from a trace, from the
workload generator, or from a synthetic model with expert affinity drawn here.

Every source gives a calibration stream (what the placement planner sees, like the controller's window) and
an evaluation stream (what the simulator replays). Synthetic and generator sources draw them independently
from one distribution (planned on one batch, measured on the next); a trace serves both with its records.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from functools import partial
from typing import Protocol

import numpy as np
import torch

from expertray.errors import require
from expertray.tools.sim.coactivation import trace_steps
from expertray.tools.trace import Trace
from expertray.tools.workload import Workload, WorkloadConfig

Step = list[np.ndarray]  # per layer, experts [T, k] integers (-1 = dropped), the same T tokens at every layer


class RoutingSource(Protocol):
    num_layers: int
    num_experts: int
    top_k: int

    def calibration(self) -> Iterator[Step]: ...

    def evaluation(self) -> Iterator[Step]: ...

    def describe(self) -> dict[str, object]: ...


@dataclass(frozen=True)
class SyntheticRouting:
    """Zipf-popular experts with topic affinity, in and across layers.

    Per layer, expert popularity is Zipf over a seeded permutation of the experts (the popularity of rank r
    is ∝ (r + 1)^-zipf_exponent), and the experts are split into `topics` near-equal groups (another
    seeded permutation). Every token has one topic, uniform, for all layers. Each of its k picks comes with
    probability `topic_affinity` from its topic's group, otherwise from all experts, weighted by popularity;
    a token's picks are distinct (repeats are redrawn). The planner's window is a separate draw of
    calibration_tokens tokens (co-activation counts converge long before the replayed batch's size). Tokens of one topic therefore pick the same groups
    together within a layer and from one layer to the next, as inter-layer affinity studies find in trained
    MoEs (ExFlow, arXiv 2401.08383). zipf_exponent 0.25 puts the busiest of 256 experts near 3× the mean
    load, as OLMoE measures on C4 (expertray/data/expert_counts_c4.json: 2.5-3.0).
    """

    num_layers: int = 60
    num_experts: int = 256
    top_k: int = 8
    tokens: int = 8192
    zipf_exponent: float = 0.25
    topics: int = 16
    topic_affinity: float = 0.5
    seed: int = 0
    calibration_tokens: int = 16384

    def __post_init__(self) -> None:
        need = partial(require, prefix="sim.routing")
        need(self.num_layers >= 1, "num_layers", f"must be >= 1, got {self.num_layers}")
        need(1 <= self.num_experts <= 32767, "num_experts", f"must be in [1, 32767], got {self.num_experts}")
        need(1 <= self.top_k <= self.num_experts, "top_k", f"must be in [1, {self.num_experts}], got {self.top_k}")
        need(self.tokens >= 1, "tokens", f"must be >= 1, got {self.tokens}")
        need(self.calibration_tokens >= 1, "calibration_tokens", f"must be >= 1, got {self.calibration_tokens}")
        need(math.isfinite(self.zipf_exponent) and self.zipf_exponent >= 0, "zipf_exponent",
             f"must be >= 0, got {self.zipf_exponent}")
        need(1 <= self.topics <= self.num_experts, "topics", f"must be in [1, {self.num_experts}], got {self.topics}")
        need(0.0 <= self.topic_affinity <= 1.0, "topic_affinity", f"must be in [0, 1], got {self.topic_affinity}")
        need(self.topic_affinity < 1.0 or self.num_experts // self.topics >= self.top_k, "topic_affinity",
             f"1 draws only from a topic's {self.num_experts // self.topics} experts, fewer than top_k={self.top_k}")

    def _cdfs(self, layer: int) -> np.ndarray:
        """[topics, E] cumulative pick distribution of a token of each topic at `layer`."""
        E, G = self.num_experts, self.topics
        rng = np.random.default_rng([self.seed, layer, 0])
        popularity = np.empty(E)
        popularity[rng.permutation(E)] = (np.arange(E) + 1.0) ** -self.zipf_exponent
        popularity /= popularity.sum()
        topic_of = np.empty(E, dtype=np.int64)
        topic_of[rng.permutation(E)] = np.arange(E) * G // E
        in_topic = np.where(topic_of[None, :] == np.arange(G)[:, None], popularity[None, :], 0.0)
        in_topic /= in_topic.sum(axis=1, keepdims=True)
        mix = (1.0 - self.topic_affinity) * popularity[None, :] + self.topic_affinity * in_topic
        cdf = np.cumsum(mix, axis=1)
        return cdf / cdf[:, -1:]

    def step(self, index: int, tokens: int | None = None) -> Step:
        """Step `index`: every layer's experts [T, k] for the same T = tokens (default self.tokens) tokens,
        deterministic in (seed, index, T)."""
        T, k, G = tokens or self.tokens, self.top_k, self.topics
        topic = np.random.default_rng([self.seed, index, 1]).integers(0, G, size=T)
        out = []
        for layer in range(self.num_layers):
            sampler = _Sampler(self._cdfs(layer))
            rng = np.random.default_rng([self.seed, index, 2, layer])

            def draw(rows: np.ndarray, sampler: _Sampler = sampler, rng: np.random.Generator = rng) -> np.ndarray:
                return sampler.draw(topic[rows], rng.random(rows.size))

            experts = draw(np.repeat(np.arange(T), k)).reshape(T, k)
            pending = np.arange(T)  # rows that may still repeat an expert
            while pending.size:
                repeat = _repeats(experts[pending])
                keep = repeat.any(axis=1)
                pending, repeat = pending[keep], repeat[keep]
                rows, cols = np.nonzero(repeat)
                experts[pending[rows], cols] = draw(pending[rows])
            out.append(experts.astype(np.int16))  # E <= 32767, as in traces: a quarter of the memory
        return out

    def calibration(self) -> Iterator[Step]:
        yield self.step(0, min(self.tokens, self.calibration_tokens))

    def evaluation(self) -> Iterator[Step]:
        yield self.step(1)

    def describe(self) -> dict[str, object]:
        return {"source": "synthetic", "tokens": self.tokens,
                "calibration_tokens": min(self.tokens, self.calibration_tokens), "zipf_exponent": self.zipf_exponent,
                "topics": self.topics, "topic_affinity": self.topic_affinity, "seed": self.seed}


class _Sampler:
    """Inverse-CDF draws from per-row distributions, cdfs [G, E], with a guide table: the rows are stacked
    on one axis (row g shifted by g) and guide[j] is the first entry above j / resolution, so a draw starts
    there and steps forward over the few entries left (Chen's method; ~3x faster than a binary search)."""

    resolution = 4096

    def __init__(self, cdfs: np.ndarray) -> None:
        G, self.num_experts = cdfs.shape
        self.flat = (cdfs + np.arange(G)[:, None]).ravel()
        self.guide = np.searchsorted(self.flat, np.arange(G * self.resolution) / self.resolution, side="right")

    def draw(self, rows: np.ndarray, uniform: np.ndarray) -> np.ndarray:
        """[n] column drawn from row rows[i] with uniform[i] in [0, 1)."""
        u = rows + uniform * (1.0 - 1e-9)  # stays below the row's last entry, rows + 1, after rounding
        at = self.guide[(u * self.resolution).astype(np.int64)]
        while (step := self.flat[at] <= u).any():
            at = at + step
        return at - rows * self.num_experts


def _repeats(experts: np.ndarray) -> np.ndarray:
    """[T, k] bool: the entry repeats an expert already picked to its left in the row."""
    k = experts.shape[1]
    out = np.zeros_like(experts, dtype=bool)
    for j in range(1, k):
        out[:, j] = (experts[:, :j] == experts[:, j:j + 1]).any(axis=1)
    return out


@dataclass(frozen=True)
class GeneratorRouting:
    """expertray.tools.workload's Zipf generator, one Workload per layer (seed + layer, as `trace record` does):
    top-k of its logits, i.e. Plackett-Luce draws from the popularity, independent across layers (no
    affinity). It draws [T, E] Gumbel noise per layer: slow for large T · E."""

    num_layers: int
    top_k: int
    workload: WorkloadConfig

    @property
    def num_experts(self) -> int:
        return self.workload.num_experts

    def step(self, index: int) -> Step:
        out = []
        for layer in range(self.num_layers):
            cfg = replace(self.workload, seed=self.workload.seed + layer)
            logits = Workload(cfg).batch(index).logits
            out.append(torch.topk(logits, self.top_k, dim=1).indices.numpy().astype(np.int64))
        return out

    def calibration(self) -> Iterator[Step]:
        yield self.step(0)

    def evaluation(self) -> Iterator[Step]:
        yield self.step(1)

    def describe(self) -> dict[str, object]:
        w = self.workload
        return {"source": "generator", "tokens": w.tokens_per_batch, "zipf_exponent": w.zipf_exponent,
                "seed": w.seed}


@dataclass(frozen=True)
class TraceRouting:
    """A recorded trace: every batch (the n-th record of each layer) is one step, for both streams, so the
    planner sees the very traffic it is measured on (an optimistic, in-sample comparison)."""

    trace: Trace

    @property
    def num_layers(self) -> int:
        return self.trace.header.num_layers

    @property
    def num_experts(self) -> int:
        return self.trace.header.num_experts

    @property
    def top_k(self) -> int:
        return self.trace.header.top_k

    def calibration(self) -> Iterator[Step]:
        return trace_steps(self.trace)

    def evaluation(self) -> Iterator[Step]:
        return trace_steps(self.trace)

    def describe(self) -> dict[str, object]:
        return {"source": "trace", "path": str(self.trace.path), "meta": self.trace.header.meta}
