"""Synthetic routing workload: router logits [T, E] and token arrival times, deterministic given a seed.

Logits are (log popularity + Gumbel noise) / temperature. By the Gumbel-max trick a token's top-1 expert is
then distributed exactly as the popularity (top-k follows Plackett-Luce), whatever the temperature; the
temperature only shapes the scores: high = flat gate distributions, low = peaked ones.
Knobs: Zipf-skewed popularity (or a measured load vector), hot spots that rotate every `hotspot_period`
batches, on/off bursty Poisson arrivals, and an adversarial repetition pattern (a share of each batch
repeats one token, collapsing its routing onto that token's k experts).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from expertray.errors import ConfigError, require


@dataclass(frozen=True)
class WorkloadConfig:
    """zipf_exponent: popularity of the expert at popularity rank r is ∝ (r + 1)^-s (0 = uniform).
    popularity: a measured [E] load vector to use instead of Zipf (see `popularity_from_counts`).
    hotspot_period / hotspot_shift: every `period` batches the ranking rotates by `shift` experts (0 = never).
    repetition: share of each batch's tokens that repeat one token (same logits + tiny noise).
    arrival_rate: tokens/s while a burst is on; burst_on_s / burst_off_s: mean on / off durations
    (burst_off_s = 0: plain Poisson arrivals)."""

    num_experts: int = 64
    tokens_per_batch: int = 4096
    zipf_exponent: float = 1.0
    popularity: tuple[float, ...] | None = None
    temperature: float = 1.0
    hotspot_period: int = 0
    hotspot_shift: int = 1
    repetition: float = 0.0
    arrival_rate: float = 50_000.0
    burst_on_s: float = 0.05
    burst_off_s: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        need = partial(require, prefix="workload")
        need(self.num_experts >= 1, "num_experts", f"must be >= 1, got {self.num_experts}")
        need(self.tokens_per_batch >= 1, "tokens_per_batch", f"must be >= 1, got {self.tokens_per_batch}")
        need(math.isfinite(self.zipf_exponent) and self.zipf_exponent >= 0, "zipf_exponent",
             f"must be >= 0, got {self.zipf_exponent}")
        if self.popularity is not None:
            need(len(self.popularity) == self.num_experts, "popularity",
                 f"needs {self.num_experts} entries, got {len(self.popularity)}")
            need(all(math.isfinite(p) and p > 0 for p in self.popularity), "popularity",
                 "entries must be positive and finite")
        need(math.isfinite(self.temperature) and self.temperature > 0, "temperature",
             f"must be > 0, got {self.temperature}")
        need(self.hotspot_period >= 0, "hotspot_period", f"must be >= 0, got {self.hotspot_period}")
        need(0.0 <= self.repetition <= 1.0, "repetition", f"must be in [0, 1], got {self.repetition}")
        need(math.isfinite(self.arrival_rate) and self.arrival_rate > 0, "arrival_rate",
             f"must be > 0, got {self.arrival_rate}")
        need(self.burst_on_s > 0, "burst_on_s", f"must be > 0, got {self.burst_on_s}")
        need(self.burst_off_s >= 0, "burst_off_s", f"must be >= 0, got {self.burst_off_s}")


@dataclass(frozen=True)
class WorkloadBatch:
    """index: batch number; logits: [T, E] float32; arrival_s: [T] float64 seconds since the start;
    popularity: [E] the routing distribution this batch was drawn from."""

    index: int
    logits: torch.Tensor
    arrival_s: torch.Tensor
    popularity: torch.Tensor


class Workload:
    """An endless, reproducible stream of batches; batch i depends only on (config, i)."""

    def __init__(self, cfg: WorkloadConfig) -> None:
        self.cfg = cfg
        E = cfg.num_experts
        if cfg.popularity is not None:
            base = torch.tensor(cfg.popularity, dtype=torch.float64)
            self._by_rank = base.sort(descending=True).values
        else:
            self._by_rank = (torch.arange(E, dtype=torch.float64) + 1) ** -cfg.zipf_exponent
        self._by_rank = self._by_rank / self._by_rank.sum()
        # which expert holds popularity rank r: a seeded permutation, so hot experts are not 0, 1, 2, ...
        g = torch.Generator().manual_seed(cfg.seed)
        self._rank_to_expert = torch.randperm(E, generator=g)

    def popularity(self, index: int) -> torch.Tensor:
        """[E] float64 routing distribution of batch `index` (hot spots rotated as configured)."""
        shift = 0
        if self.cfg.hotspot_period:
            shift = (index // self.cfg.hotspot_period) * self.cfg.hotspot_shift
        experts = torch.roll(self._rank_to_expert, shift)
        return torch.zeros(self.cfg.num_experts, dtype=torch.float64).index_copy_(0, experts, self._by_rank)

    def batch(self, index: int, start_s: float = 0.0) -> WorkloadBatch:
        """Batch `index` with arrivals starting after `start_s`."""
        cfg = self.cfg
        T, E = cfg.tokens_per_batch, cfg.num_experts
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + index + 1)
        pop = self.popularity(index)
        gumbel = -torch.log(-torch.log(torch.rand(T, E, generator=g, dtype=torch.float64).clamp_min(1e-300)))
        logits = pop.log().unsqueeze(0) + gumbel
        repeated = int(round(cfg.repetition * T))
        if repeated:
            rows = torch.randperm(T, generator=g)[:repeated]
            noise = 1e-3 * torch.randn(repeated, E, generator=g, dtype=torch.float64)
            logits[rows] = logits[rows[0]].unsqueeze(0) + noise
        return WorkloadBatch(index, (logits / cfg.temperature).float(), start_s + self._gaps(T, g).cumsum(0), pop)

    def _gaps(self, n: int, g: torch.Generator) -> torch.Tensor:
        """[n] inter-arrival gaps (s): exponential at `arrival_rate`; after each token the burst ends with
        probability 1 / (burst_on_s · rate), i.e. geometric bursts of mean length burst_on_s, and an
        exponential silence of mean burst_off_s follows."""
        cfg = self.cfg
        gaps = torch.empty(n, dtype=torch.float64).exponential_(cfg.arrival_rate, generator=g)
        if cfg.burst_off_s > 0:
            ends = torch.rand(n, generator=g, dtype=torch.float64) < 1.0 / max(cfg.burst_on_s * cfg.arrival_rate, 1.0)
            silence = torch.empty(n, dtype=torch.float64).exponential_(1.0 / cfg.burst_off_s, generator=g)
            gaps = gaps + ends * silence
        return gaps

    def batches(self, num_batches: int) -> Iterator[WorkloadBatch]:
        """Batches 0..num_batches-1 with continuous arrival times."""
        clock = 0.0
        for i in range(num_batches):
            b = self.batch(i, clock)
            clock = float(b.arrival_s[-1])
            yield b


def popularity_from_counts(path: str | Path, model: str = "olmoe_c4", layer: int = 0) -> tuple[float, ...]:
    """A routing distribution [E] from measured per-expert counts (e.g. expertray.data.counts_file()).

    The file maps model → {"layers": [...], "counts": [[per-expert counts] per layer]}; `layer` indexes
    the measured layers list. Zero counts get half a token so every expert stays reachable.
    """
    try:
        data = json.loads(Path(path).read_text())
        entry = data[model]
        counts = entry["counts"][layer]
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise ConfigError(f"popularity file {path}: no counts for model {model!r} layer index {layer} ({exc!r})") from exc
    total = float(sum(max(float(c), 0.5) for c in counts))
    return tuple(max(float(c), 0.5) / total for c in counts)


def gumbel_logits(popularity: torch.Tensor, tokens: int, temperature: float, g: torch.Generator) -> torch.Tensor:
    """[tokens, E] float32 logits (log popularity [E] + Gumbel noise) / temperature: each token's top-1 expert
    is distributed as `popularity`, the temperature only shapes the scores (as `Workload.batch`)."""
    E = popularity.numel()
    gumbel = -torch.log(-torch.log(torch.rand(tokens, E, generator=g, dtype=torch.float64).clamp_min(1e-300)))
    return ((popularity.double().clamp_min(1e-300).log().unsqueeze(0) + gumbel) / temperature).float()


class TopicalTraffic:
    """Router logits of hidden states drawn from a mixture of topical clusters, through a fixed random gate.

    The model (seeded): `topics` cluster centres [topics, d_model] of Zipf(topic_zipf) popularity and a gate
    [E, d_model]. A token is its topic's centre plus isotropic noise of relative size `spread`; its logits are
    the gate's scores scaled to the spread of Gumbel noise (std π/√6) and divided by the temperature. Expert
    popularity thus comes from the geometry (which experts the popular topics point at), not from a prior.
    """

    def __init__(self, num_experts: int, d_model: int = 64, topics: int = 16, topic_zipf: float = 1.0,
                 spread: float = 0.7, seed: int = 0) -> None:
        if num_experts < 1 or d_model < 1 or topics < 1:
            raise ConfigError(f"topical traffic: num_experts, d_model and topics must be >= 1, "
                              f"got {num_experts}, {d_model}, {topics}")
        if not (math.isfinite(spread) and spread >= 0 and math.isfinite(topic_zipf) and topic_zipf >= 0):
            raise ConfigError(f"topical traffic: spread and topic_zipf must be >= 0, got {spread}, {topic_zipf}")
        g = torch.Generator().manual_seed(seed)
        self.seed, self.spread, self.num_experts = seed, spread, num_experts
        self.centres = torch.randn(topics, d_model, generator=g, dtype=torch.float64)
        self.gate = torch.randn(num_experts, d_model, generator=g, dtype=torch.float64) / math.sqrt(d_model)
        weights = (torch.arange(topics, dtype=torch.float64) + 1) ** -topic_zipf
        self.topic_popularity = weights[torch.randperm(topics, generator=g)] / weights.sum()

    def logits(self, batch: int, tokens: int, temperature: float) -> torch.Tensor:
        """[tokens, E] float32 logits of batch `batch` (deterministic in the seed and batch)."""
        if tokens < 1 or not (math.isfinite(temperature) and temperature > 0):
            raise ConfigError(f"topical traffic: tokens must be >= 1 and temperature > 0, got {tokens}, {temperature}")
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + batch + 1)
        topic = torch.multinomial(self.topic_popularity, tokens, replacement=True, generator=g)
        hidden = self.centres[topic] + self.spread * torch.randn(tokens, self.centres.shape[1], generator=g,
                                                                 dtype=torch.float64)
        scores = hidden @ self.gate.T
        scores = scores / scores.std().clamp_min(1e-12) * (math.pi / math.sqrt(6))
        return (scores / temperature).float()


class HotspotTraffic:
    """Bursty, shifting hot spots over a mild Zipf(`zipf_exponent`) background: every `period` batches a new
    random set of `hot` experts is drawn; each batch is a burst with probability `burst_probability`, during
    which the hot set's popularity is multiplied by a factor drawn from [boost / 2, boost]. Logits as
    `gumbel_logits`."""

    def __init__(self, num_experts: int, hot: int = 4, period: int = 2, boost: float = 12.0,
                 burst_probability: float = 0.7, zipf_exponent: float = 0.3, seed: int = 0) -> None:
        if not 1 <= hot <= num_experts:
            raise ConfigError(f"hotspot traffic: hot must be in [1, {num_experts}], got {hot}")
        if period < 1 or not boost >= 1 or not 0 <= burst_probability <= 1:
            raise ConfigError(f"hotspot traffic: period >= 1, boost >= 1, burst_probability in [0, 1]; "
                              f"got {period}, {boost}, {burst_probability}")
        self.num_experts, self.hot, self.period, self.boost = num_experts, hot, period, boost
        self.burst_probability, self.zipf_exponent, self.seed = burst_probability, zipf_exponent, seed

    def popularity(self, batch: int) -> torch.Tensor:
        """[E] float64 routing distribution of batch `batch`."""
        E = self.num_experts
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + batch // self.period)
        base = ((torch.arange(E, dtype=torch.float64) + 1) ** -self.zipf_exponent)[torch.randperm(E, generator=g)]
        hot = torch.randperm(E, generator=g)[: self.hot]
        b = torch.Generator().manual_seed(self.seed * 7_919 + batch + 1)
        draw = torch.rand(2, generator=b, dtype=torch.float64)
        if float(draw[0]) < self.burst_probability:
            base[hot] *= self.boost * (0.5 + 0.5 * float(draw[1]))
        return base / base.sum()

    def logits(self, batch: int, tokens: int, temperature: float) -> torch.Tensor:
        """[tokens, E] float32 logits of batch `batch`."""
        g = torch.Generator().manual_seed(self.seed * 1_000_033 + batch + 1)
        return gumbel_logits(self.popularity(batch), tokens, temperature, g)
