"""`expertray bench stall`'s figures of one placement change, on hand-made request records (Ray-free)."""

from __future__ import annotations

import pytest

from expertray.tools.bench.stall import change_figures


def _steady(n: int, latency_s: float, until: float) -> list[tuple[float, float, str]]:
    """n requests answered one after another, each `latency_s`, the last one at `until`."""
    return [(until - (n - i) * latency_s, until - (n - 1 - i) * latency_s, "ok") for i in range(n)]


def test_a_request_stalled_by_the_change_counts_in_batch_times() -> None:
    records = _steady(20, 0.05, until=10.0)  # 50 ms each, answered in the second before t = 10
    records += [(9.99, 10.30, "ok"), (10.1, 10.15, "ok"), (10.5, 10.55, "ok")]  # 310 ms over the change
    f = change_figures(records, t_start=10.0, t_end=10.2, steady_s=1.0, batch_ms=20.0, swaps=[10.12])
    assert f["steady_p50_ms"] == pytest.approx(50.0) and f["steady_p99_ms"] == pytest.approx(50.0)
    assert f["in_flight"] == 2 and f["max_latency_ms"] == pytest.approx(310.0)
    assert f["added_ms"] == pytest.approx(260.0) and f["added_batches"] == pytest.approx(13.0)
    assert f["worst_done_after_s"] == pytest.approx(0.30) and f["change_s"] == pytest.approx(0.2)
    assert f["at_swap"] == 2 and f["max_at_swap_ms"] == pytest.approx(310.0)
    assert f["added_at_swap_batches"] == pytest.approx(13.0) and f["not_ok"] == 0


def test_requests_outside_the_change_are_not_in_flight_and_errors_are_counted() -> None:
    records = _steady(10, 0.05, until=5.0) + [(5.0, 5.04, "error:RequestTimeoutError"), (6.0, 6.9, "ok")]
    f = change_figures(records, t_start=5.0, t_end=5.1, steady_s=0.5, batch_ms=10.0)
    assert f["in_flight"] == 1 and f["max_latency_ms"] == pytest.approx(40.0) and f["not_ok"] == 1
    assert f["added_batches"] == pytest.approx(-1.0)
    assert f["at_swap"] == 0 and f["max_at_swap_ms"] is None and f["added_at_swap_batches"] is None


def test_no_stream_or_no_batch_time_is_refused() -> None:
    with pytest.raises(ValueError, match="before the change"):
        change_figures([(11.0, 11.1, "ok")], 10.0, 10.5, 1.0, 5.0)
    with pytest.raises(ValueError, match="during the change"):
        change_figures(_steady(5, 0.05, until=10.0), 10.0, 10.5, 1.0, 5.0)
    with pytest.raises(ValueError, match="batch time"):
        change_figures(_steady(5, 0.05, until=10.0), 10.0, 10.5, 1.0, 0.0)
