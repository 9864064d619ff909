"""Synthetic workload: determinism, popularity → routing, temperature → score shape, hot spots, repetition,
bursty arrivals, measured popularity."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from expertray.config import GateConfig
from expertray.data import counts_file
from expertray.errors import ConfigError
from expertray.layer.gating import gate_from_logits
from expertray.state.loadstats import imbalance
from expertray.tools.workload import (
    HotspotTraffic,
    TopicalTraffic,
    Workload,
    WorkloadConfig,
    popularity_from_counts,
)

SHARED_COUNTS = counts_file()


def test_deterministic_in_the_seed_and_batch_index() -> None:
    cfg = WorkloadConfig(num_experts=8, tokens_per_batch=64, seed=4, burst_off_s=0.01)
    a, b = Workload(cfg), Workload(cfg)
    assert torch.equal(a.batch(3).logits, b.batch(3).logits)
    assert torch.equal(a.batch(3, start_s=1.0).arrival_s, b.batch(3, start_s=1.0).arrival_s)
    assert not torch.equal(a.batch(3).logits, a.batch(4).logits)
    other = Workload(WorkloadConfig(num_experts=8, tokens_per_batch=64, seed=5)).batch(3).logits
    assert not torch.equal(a.batch(3).logits, other)
    stream = list(a.batches(3))
    assert float(stream[1].arrival_s[0]) > float(stream[0].arrival_s[-1])  # continuous clock


def test_top1_routing_follows_the_popularity_whatever_the_temperature() -> None:
    for temperature in (0.3, 3.0):
        wl = Workload(WorkloadConfig(num_experts=8, tokens_per_batch=20_000, zipf_exponent=1.0,
                                     temperature=temperature, seed=1))
        b = wl.batch(0)
        freq = torch.bincount(b.logits.argmax(dim=1), minlength=8).double() / 20_000
        assert float((freq - b.popularity).abs().max()) < 0.015
    pop = Workload(WorkloadConfig(num_experts=8, zipf_exponent=1.0, seed=1)).popularity(0)
    assert sorted(pop.tolist(), reverse=True) == pytest.approx([1 / (r * sum(1 / i for i in range(1, 9)))
                                                                for r in range(1, 9)])


def test_temperature_shapes_the_scores() -> None:
    cfg = GateConfig("qwen_moe", 64, 8, normalize=False)

    def topk_share(temperature: float) -> float:
        g = gate_from_logits(Workload(WorkloadConfig(temperature=temperature, tokens_per_batch=512)).batch(0).logits,
                             cfg)
        return float(g.probs.gather(1, g.experts).sum(1).median())

    assert topk_share(0.5) > 0.9 > 0.6 > topk_share(2.0) > 0.3


def test_hot_spots_rotate_every_period() -> None:
    wl = Workload(WorkloadConfig(num_experts=16, hotspot_period=5, hotspot_shift=3, seed=2))
    p0, p4, p5 = wl.popularity(0), wl.popularity(4), wl.popularity(5)
    assert torch.equal(p0, p4) and not torch.equal(p0, p5)
    assert sorted(p0.tolist()) == sorted(p5.tolist())  # same distribution, other experts
    assert int(p0.argmax()) != int(p5.argmax())


def test_repetition_collapses_routing_onto_few_experts() -> None:
    cfg = GateConfig("mixtral", 16, 2)
    base = WorkloadConfig(num_experts=16, tokens_per_batch=1000, zipf_exponent=0.0, seed=3)
    plain = gate_from_logits(Workload(base).batch(0).logits, cfg)
    rep = gate_from_logits(Workload(dataclasses.replace(base, repetition=0.5)).batch(0).logits, cfg)
    _, counts = torch.unique(rep.experts.sort(dim=1).values, dim=0, return_counts=True)
    assert int(counts.max()) >= 500
    load = lambda g: torch.bincount(g.experts.reshape(-1), minlength=16)  # noqa: E731
    assert imbalance(load(rep)) > 2 * imbalance(load(plain))


def test_arrivals_poisson_rate_and_bursts() -> None:
    poisson = Workload(WorkloadConfig(num_experts=4, tokens_per_batch=20_000, arrival_rate=1000.0)).batch(0)
    gaps = poisson.arrival_s.diff()
    assert bool((gaps > 0).all())
    assert float(gaps.mean()) == pytest.approx(1e-3, rel=0.05)
    bursty = Workload(WorkloadConfig(num_experts=4, tokens_per_batch=20_000, arrival_rate=1000.0,
                                     burst_on_s=0.05, burst_off_s=0.5)).batch(0)
    bgaps = bursty.arrival_s.diff()
    # ~1 in 50 tokens ends a burst and waits 0.5 s on average
    assert float((bgaps > 0.05).float().mean()) == pytest.approx(0.02, abs=0.006)
    assert float(bgaps.max()) > 10 * float(gaps.max())


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match="workload.temperature"):
        WorkloadConfig(temperature=0.0)
    with pytest.raises(ConfigError, match="workload.popularity: needs 4 entries"):
        WorkloadConfig(num_experts=4, popularity=(0.5, 0.5))
    with pytest.raises(ConfigError, match="workload.repetition"):
        WorkloadConfig(repetition=1.5)


def test_popularity_from_counts(tmp_path: Path) -> None:
    (tmp_path / "c.json").write_text(json.dumps({"m": {"layers": [0, 5], "counts": [[1, 1], [3, 0]]}}))
    assert popularity_from_counts(tmp_path / "c.json", "m", 1) == (3 / 3.5, 0.5 / 3.5)
    with pytest.raises(ConfigError, match="no counts for model 'x'"):
        popularity_from_counts(tmp_path / "c.json", "x")
    wl = Workload(WorkloadConfig(num_experts=2, popularity=popularity_from_counts(tmp_path / "c.json", "m", 1)))
    assert sorted(wl.popularity(0).tolist()) == pytest.approx([0.5 / 3.5, 3 / 3.5])


def test_measured_olmoe_popularity_matches_its_published_imbalance() -> None:
    pop = popularity_from_counts(SHARED_COUNTS, "olmoe_c4", 0)
    assert len(pop) == 64 and sum(pop) == pytest.approx(1.0)
    assert imbalance(torch.tensor(pop)) == pytest.approx(3.02, abs=0.01)  # the data README's max/mean


def test_topical_traffic_popularity_comes_from_the_topics() -> None:
    """Same seed and batch → same logits; one topic → tokens crowd onto the experts its centre points at;
    the temperature only shapes the scores (top-k unchanged, top-k share of the gate mass rises as it falls)."""
    t = TopicalTraffic(32, topics=8, seed=4)
    assert torch.equal(t.logits(3, 64, 1.0), TopicalTraffic(32, topics=8, seed=4).logits(3, 64, 1.0))
    assert not torch.equal(t.logits(3, 64, 1.0), t.logits(4, 64, 1.0))
    single = TopicalTraffic(32, topics=1, spread=0.1, seed=4).logits(0, 2048, 1.0)
    top1 = torch.bincount(single.argmax(1), minlength=32)
    assert int(top1.topk(2).values.sum()) > 0.95 * 2048  # one topic, little spread: its one or two experts
    cfg = GateConfig("qwen_moe", 32, 4)
    hot, cold = (gate_from_logits(t.logits(0, 1024, temp), cfg) for temp in (0.5, 2.0))
    assert torch.equal(hot.experts, cold.experts)
    assert float(hot.probs.gather(1, hot.experts).sum(1).mean()) > float(cold.probs.gather(1, cold.experts).sum(1).mean())
    with pytest.raises(ConfigError, match="topical traffic"):
        TopicalTraffic(0)
    with pytest.raises(ConfigError, match="temperature"):
        t.logits(0, 8, 0.0)


def test_hotspot_traffic_bursts_on_a_set_that_moves() -> None:
    h = HotspotTraffic(64, hot=4, period=2, boost=12.0, burst_probability=1.0, seed=1)
    p0, p1, p2 = h.popularity(0), h.popularity(1), h.popularity(2)
    hot0, hot2 = set(p0.topk(4).indices.tolist()), set(p2.topk(4).indices.tolist())
    assert set(p1.topk(4).indices.tolist()) == hot0 != hot2  # the set holds for `period` batches, then moves
    assert float(p0.topk(4).values.sum()) > 0.3  # 4 of 64 experts carry a burst's share
    calm = HotspotTraffic(64, hot=4, burst_probability=0.0, seed=1).popularity(0)
    assert float(calm.max() / calm.min()) < 64 ** 0.3 + 1e-9  # only the mild Zipf background
    top1 = torch.bincount(h.logits(0, 4096, 1.0).argmax(1), minlength=64).double() / 4096
    assert float((top1 - p0).abs().max()) < 0.03  # Gumbel-max: top-1 follows the popularity
    with pytest.raises(ConfigError, match="hotspot traffic"):
        HotspotTraffic(8, hot=9)
