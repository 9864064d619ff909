"""recovery_figures: first correct answer, steady latency, worst latency, p99 before a fault."""

from __future__ import annotations

import pytest

from expertray.tools.bench.multinode import recovery_figures


def test_figures_of_a_stall_then_recovery() -> None:
    before = [(t * 0.1, t * 0.1 + 0.01, "ok") for t in range(100)]  # p99 10 ms until t = 10 s
    fault = 10.0
    after = [(9.995, 13.0, "ok"),  # in flight across the fault: stalled 3 s
             (10.5, 12.0, "error:RequestTimeoutError"), (12.0, 12.5, "ok"),  # sent after: first ok ends at 12.5
             (12.5, 12.51, "ok"), (13.0, 13.01, "ok")]
    f = recovery_figures(before + after, fault)
    assert f["p99_before_s"] == pytest.approx(0.01)
    assert f["first_ok_s"] == pytest.approx(2.5)
    assert f["steady_s"] == pytest.approx(3.0)  # the last slow request (latency > 2 x p99 and > p99 + 20 ms)
    assert f["max_latency_s"] == pytest.approx(3.005)


def test_figures_without_slow_requests_or_answers() -> None:
    records = [(0.0, 0.01, "ok"), (0.01, 0.02, "ok"), (1.0, 1.01, "wrong")]
    f = recovery_figures(records, 0.5)
    assert f["steady_s"] == 0.0 and f["first_ok_s"] is None
    assert recovery_figures([(1.0, 1.1, "ok")], 0.5)["p99_before_s"] is None
