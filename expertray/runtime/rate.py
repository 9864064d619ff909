"""A current rate over a recent time window (tokens/s), for the autoscaler's signals and router stats."""

from __future__ import annotations

import math
from collections import deque

from expertray.errors import ConfigError


class RateWindow:
    """Sum of amounts added in the last `window_s` seconds, divided by the time they span.

    Until `window_s` has passed since the first sample, the rate is over the time since that first sample,
    so a fresh router reports its real rate rather than an average diluted by idle start-up time.
    """

    def __init__(self, window_s: float = 10.0) -> None:
        if not (math.isfinite(window_s) and window_s > 0):
            raise ConfigError(f"rate.window_s: must be a finite number > 0, got {window_s}")
        self.window_s = window_s
        self._samples: deque[tuple[float, float]] = deque()
        self._sum = 0.0
        self._first: float | None = None

    def add(self, amount: float, now_s: float) -> None:
        if self._first is None:
            self._first = now_s
        self._samples.append((now_s, amount))
        self._sum += amount
        self._trim(now_s)

    def rate(self, now_s: float) -> float:
        """Amount per second over the last window_s (0.0 with no samples)."""
        self._trim(now_s)
        if self._first is None:
            return 0.0
        span = min(self.window_s, now_s - self._first)
        return self._sum / span if span > 0 else 0.0

    def _trim(self, now_s: float) -> None:
        while self._samples and self._samples[0][0] <= now_s - self.window_s:
            self._sum -= self._samples.popleft()[1]
