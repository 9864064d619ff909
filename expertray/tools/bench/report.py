"""Shared benchmark plumbing: timing with medians over repeats, JSON + table output."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def time_ms(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> list[float]:
    """Wall time of `fn()` in milliseconds for each of `repeats` runs after `warmup` untimed runs."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def quantile(xs: Sequence[float], q: float) -> float:
    """Nearest-rank quantile (q in [0, 1])."""
    s = sorted(xs)
    return float(s[min(len(s) - 1, max(0, int(round(q * (len(s) - 1)))))])


def emit(name: str, results: dict[str, Any], rows: Sequence[Sequence[Any]], columns: Sequence[str],
         as_json: bool, out: Path | None) -> None:
    """Print results as JSON (for scripts) or a table (for people); optionally also write the JSON file."""
    doc = {"benchmark": name, **results}
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=2) + "\n")
    if as_json:
        print(json.dumps(doc, indent=2))
        return
    table = Table(title=f"expertray bench {name}")
    for c in columns:
        table.add_column(c)
    for r in rows:
        table.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in r])
    Console().print(table)
