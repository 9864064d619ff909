"""LoadStats (window, EMA, drops, slots, latency, snapshots) and the pure balance measures, checked by hand."""

import math

import msgpack
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from expertray.errors import ConfigError, TraceFormatError, UnknownExpertError
from expertray.state.loadstats import (
    LoadStats,
    balancedness,
    drop_rate,
    gate_mass_retained,
    imbalance,
    topk_agreement,
)


def test_window_keeps_the_last_batches_and_ema_starts_at_the_first() -> None:
    s = LoadStats(2, 2, window_batches=2, ema_alpha=0.5)
    s.record(1, torch.tensor([1, 0]))
    s.record(1, torch.tensor([3, 0]))
    s.record(1, torch.tensor([5, 2]), dropped=1)
    assert s.window_load(1).tolist() == [4.0, 1.0]  # mean of the last two batches
    assert s.ema_load(1).tolist() == [(1 * 0.5 + 3 * 0.5) * 0.5 + 5 * 0.5, 1.0]
    assert s.num_batches(1) == 3 and s.num_batches(0) == 0
    assert s.window_load(0).tolist() == [0.0, 0.0]
    # window: routed 8 + 2 = 10 assignments, dropped 1 → 1 / 11
    assert s.window_drop_rate(1) == pytest.approx(1 / 11)


def test_bad_inputs_name_the_problem() -> None:
    s = LoadStats(1, 3)
    with pytest.raises(UnknownExpertError, match="unknown layer 1"):
        s.record(1, torch.zeros(3))
    with pytest.raises(ConfigError, match="expected 3 entries"):
        s.record(0, torch.zeros(4))
    with pytest.raises(ConfigError, match="ema_alpha"):
        LoadStats(1, 3, ema_alpha=0.0)
    with pytest.raises(UnknownExpertError, match="no latency samples for actor 'x'"):
        s.latency_quantiles("x")
    with pytest.raises(UnknownExpertError, match="no slot counts"):
        s.slot_load(0)


def test_slot_window_restarts_on_a_new_table_version() -> None:
    s = LoadStats(1, 2, window_batches=4)
    s.record_slot_counts(0, torch.tensor([2, 4, 6]), table_version=3)
    s.record_slot_counts(0, torch.tensor([4, 4, 0]), table_version=3)
    version, load = s.slot_load(0)
    assert version == 3 and load.tolist() == [3.0, 4.0, 3.0]
    with pytest.raises(ConfigError, match="has 3 slots"):
        s.record_slot_counts(0, torch.tensor([1, 1]), table_version=3)
    s.record_slot_counts(0, torch.tensor([1, 1]), table_version=4)
    version, load = s.slot_load(0)
    assert version == 4 and load.tolist() == [1.0, 1.0]


def test_latency_window_is_bounded_and_quantiles_interpolate() -> None:
    s = LoadStats(1, 1, latency_window=10)
    for ms in range(1, 101):
        s.record_latency("a", float(ms))
    p50, p99 = s.latency_quantiles("a")
    assert (p50, p99) == (pytest.approx(95.5), pytest.approx(99.91))  # only 91..100 are kept
    s.forget_actor("a")
    assert s.actors() == []


def test_snapshot_round_trips_through_msgpack_and_keeps_counting_the_same() -> None:
    s = LoadStats(2, 3, window_batches=3, ema_alpha=0.25, latency_window=4)
    gen = torch.Generator().manual_seed(0)
    for i in range(5):
        s.record(i % 2, torch.randint(0, 50, (3,), generator=gen), dropped=i)
    s.record_slot_counts(1, torch.tensor([1, 2, 3, 4]), table_version=7)
    for ms in (1.0, 2.0, 9.0):
        s.record_latency("actor0", ms)
    r = LoadStats.from_snapshot(msgpack.unpackb(msgpack.packb(s.snapshot())))
    for layer in (0, 1):
        assert torch.equal(s.window_load(layer), r.window_load(layer))
        assert torch.equal(s.ema_load(layer), r.ema_load(layer))
        assert s.window_drop_rate(layer) == r.window_drop_rate(layer)
        assert s.num_batches(layer) == r.num_batches(layer)
    assert s.latency_quantiles("actor0") == r.latency_quantiles("actor0")
    assert s.slot_load(1)[0] == r.slot_load(1)[0] and torch.equal(s.slot_load(1)[1], r.slot_load(1)[1])
    for stats in (s, r):
        stats.record(0, torch.tensor([7, 8, 9]))
        stats.record(0, torch.tensor([1, 1, 1]))
    assert torch.equal(s.window_load(0), r.window_load(0)) and torch.equal(s.ema_load(0), r.ema_load(0))


def test_bad_snapshots_are_rejected() -> None:
    snap = LoadStats(1, 2).snapshot()
    with pytest.raises(TraceFormatError, match="version 2 is not supported"):
        LoadStats.from_snapshot({**snap, "version": 2})
    with pytest.raises(TraceFormatError, match="missing format"):
        LoadStats.from_snapshot({"version": 1})
    with pytest.raises(TraceFormatError, match="malformed"):
        LoadStats.from_snapshot({**snap, "window": [[[1.0, 2.0]]]})  # a row of 2, expected E + 1 = 3


def test_measures_by_hand() -> None:
    assert balancedness(torch.tensor([1, 1, 1, 1])) == 1.0
    assert balancedness(torch.tensor([4, 0, 0, 0])) == 0.25
    assert balancedness(torch.zeros(3)) == 1.0 and imbalance(torch.zeros(3)) == 1.0
    assert imbalance(torch.tensor([2, 1, 1, 0])) == 2.0
    assert drop_rate(torch.tensor([[0, -1], [-1, -1]])) == 0.75
    probs = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.1, 0.2, 0.3, 0.4]])
    baseline = torch.tensor([[0, 1], [3, 2]])  # mass 0.8 + 0.7
    chosen = torch.tensor([[1, 2], [3, -1]])  # mass 0.5 + 0.4
    assert gate_mass_retained(probs, chosen, baseline) == pytest.approx(0.9 / 1.5)
    # set-wise per token: token 0 keeps {1} of {0, 1}; token 1 keeps {3} of {3, 2}
    assert topk_agreement(chosen, baseline) == 0.5
    assert topk_agreement(baseline.flip(1), baseline) == 1.0


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 1000), min_size=1, max_size=16))
def test_balancedness_and_imbalance_are_reciprocal(load: list[int]) -> None:
    x = torch.tensor(load)
    b = balancedness(x)
    assert 0.0 < b <= 1.0
    if sum(load):
        assert math.isclose(b * imbalance(x), 1.0, rel_tol=1e-12)
        assert (b == 1.0) == (len(set(load)) == 1)
