"""Results of `expertray bench chaos`: the summary (with every error judged can't-serve or not), the per-second
timeline and its plot. Ray-free: it reads the load's records, the coverage samples and the fault log.

Can't-serve: an error is genuine when, at some moment between the request's send and its error, an expert
its tokens needed had no live copy (every actor holding it killed, stopped or on a removed node and not yet
replaced: the coverage samples, taken from the placement table and the injected faults).
"""

from __future__ import annotations

import bisect
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from expertray.tools.bench.chaos_load import Record
from expertray.tools.bench.report import quantile

log = logging.getLogger(__name__)

Uncovered = frozenset[tuple[int, int]]  # (layer, expert) pairs with no live copy


def cant_serve(record: Record, times: Sequence[float], uncovered: Sequence[Uncovered]) -> bool:
    """Whether some expert `record` needed had no live copy while it was in flight. `times` (sorted) and
    `uncovered` are the coverage samples: each holds from its time until the next one."""
    first = max(0, bisect.bisect_right(times, record.sent_s) - 1)
    last = bisect.bisect_right(times, record.done_s)
    needed = {(record.layer, e) for e in record.experts}
    return any(needed & uncovered[i] for i in range(first, last))


def summarize(records: list[Record], times: Sequence[float], uncovered: Sequence[Uncovered]) -> dict[str, Any]:
    """requests, correct, wrong, hung, errors by kind (each split into can't-serve and other), per client."""
    errors: dict[str, dict[str, int]] = {}
    clients: dict[str, dict[str, int]] = {}
    for r in records:
        per = clients.setdefault(r.client, {"requests": 0, "correct": 0, "wrong": 0, "error": 0, "hung": 0})
        per["requests"] += 1
        per[r.outcome] += 1
        if r.outcome == "error":
            kind = errors.setdefault(r.error, {"cant_serve": 0, "other": 0})
            kind["cant_serve" if cant_serve(r, times, uncovered) else "other"] += 1
    lat = [(r.done_s - r.sent_s) * 1e3 for r in records if r.outcome == "correct"]
    return {"requests": len(records), "correct": sum(c["correct"] for c in clients.values()),
            "wrong": sum(c["wrong"] for c in clients.values()), "hung": sum(c["hung"] for c in clients.values()),
            "errors": sum(c["error"] for c in clients.values()),
            "errors_cant_serve": sum(k["cant_serve"] for k in errors.values()),
            "errors_other": sum(k["other"] for k in errors.values()), "error_kinds": errors,
            "p50_ms": quantile(lat, 0.5) if lat else None, "p99_ms": quantile(lat, 0.99) if lat else None,
            "clients": clients,
            "seconds_without_a_live_copy": _uncovered_seconds(times, uncovered)}


def _uncovered_seconds(times: Sequence[float], uncovered: Sequence[Uncovered]) -> float:
    """How long some expert had no live copy (sum over the samples that found one)."""
    return round(sum(b - a for a, b, u in zip(times, times[1:], uncovered) if u), 2)


def timeline(records: list[Record], duration_s: float) -> list[dict[str, Any]]:
    """Per second (by completion): requests finished, errors (incl. hung), p99 latency of the answered ones."""
    n = max(1, math.ceil(duration_s))
    buckets: list[list[Record]] = [[] for _ in range(n)]
    for r in records:
        buckets[min(n - 1, max(0, int(r.done_s)))].append(r)
    out = []
    for s, b in enumerate(buckets):
        lat = [(r.done_s - r.sent_s) * 1e3 for r in b if r.outcome in ("correct", "wrong")]
        out.append({"t_s": s, "requests": len(b), "errors": sum(r.outcome in ("error", "hung") for r in b),
                    "p99_ms": quantile(lat, 0.99) if lat else None})
    return out


def plot(series: list[dict[str, Any]], faults: list[dict[str, Any]], path: Path, title: str) -> str | None:
    """The timeline as a PNG at `path` (requests/s, errors/s, p99 latency; each fault a labelled vertical line).
    Returns the path, or None (with a log line) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no timeline plot (pip install matplotlib)")
        return None
    t = [p["t_s"] for p in series]
    fig, (ax_rate, ax_lat) = plt.subplots(2, 1, figsize=(14, 7), sharex=True)
    ax_rate.plot(t, [p["requests"] for p in series], label="requests/s", lw=0.8)
    ax_rate.plot(t, [p["errors"] for p in series], label="errors/s", lw=0.8, color="red")
    ax_lat.plot(t, [p["p99_ms"] if p["p99_ms"] is not None else math.nan for p in series], label="p99 ms",
                lw=0.8, color="purple")
    ax_lat.set_yscale("log")
    top = max([p["requests"] for p in series] + [1])
    for i, f in enumerate(faults):
        for ax in (ax_rate, ax_lat):
            ax.axvline(f["at_s"], color="grey", lw=0.6, ls="--")
        ax_rate.text(f["at_s"], top * (1.0 - 0.09 * (i % 6)), f["kind"], rotation=90, fontsize=6, va="top")
    ax_rate.set_ylabel("per second")
    ax_lat.set_ylabel("latency p99 (ms)")
    ax_lat.set_xlabel("seconds since start")
    ax_rate.legend(loc="lower left", fontsize=8)
    ax_lat.legend(loc="lower left", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
