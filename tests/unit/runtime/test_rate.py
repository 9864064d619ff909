"""RateWindow: a windowed rate that forgets old traffic (tokens/uptime does not)."""

import pytest

from expertray.errors import ConfigError
from expertray.runtime.rate import RateWindow


def test_rate_over_window_forgets_old_samples() -> None:
    r = RateWindow(window_s=10.0)
    assert r.rate(0.0) == 0.0
    for t in range(20):
        r.add(100.0, float(t))
    assert r.rate(19.0) == pytest.approx(100.0)  # 10 samples of 100 in the last 10 s
    assert r.rate(40.0) == 0.0  # idle for longer than the window
    r.add(50.0, 41.0)
    assert r.rate(42.0) == pytest.approx(5.0)


def test_young_window_uses_the_time_since_the_first_sample() -> None:
    r = RateWindow(window_s=10.0)
    r.add(10.0, 100.0)
    r.add(10.0, 102.0)
    assert r.rate(104.0) == pytest.approx(20.0 / 4.0)


def test_bad_window() -> None:
    with pytest.raises(ConfigError, match="rate.window_s"):
        RateWindow(0.0)
