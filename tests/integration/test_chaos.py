"""Chaos under load, 60 s (slow set: `pytest -m slow tests/integration/test_chaos.py`): overlapping faults on a
seeded schedule while every interface sends requests. Asserted: 0 wrong, 0 hung, 0 leaked actors, errors
only where no live copy of a needed expert existed, and with shadows 0 errors.

`expertray bench chaos` runs in a process of its own: it starts its own Ray (this session already holds one)
and counts the actors left alive after its shutdown, which the session's other actors would blur.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow
SECONDS = 60
BUDGET_S = SECONDS + 240  # start, Serve, shutdown and the leak check's settle time


def _chaos(tmp_path: Path, *args: str) -> dict[str, Any]:
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    out = tmp_path / "chaos.json"
    proc = subprocess.run([sys.executable, "-m", "expertray.cli", "bench", "chaos", "--seconds", str(SECONDS),
                           "--out", str(out), "--plot", str(tmp_path / "chaos.png"), *args],
                          capture_output=True, text=True, env=env, timeout=BUDGET_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def _check(result: dict[str, Any]) -> dict[str, Any]:
    s = result["summary"]
    assert s["requests"] > 0 and s["correct"] > 0
    assert s["faults_applied"] >= 3, result["faults"]
    assert s["wrong"] == 0 and s["hung"] == 0, s
    assert s["leaked"] == [], s["leaked"]
    assert s["errors_other"] == 0, s["error_kinds"]
    assert s["requests"] == s["correct"] + s["errors"]  # every request answered or failed clearly
    return s


def test_chaos_with_shadows_serves_every_request(tmp_path: Path) -> None:
    s = _check(_chaos(tmp_path, "--seed", "1", "--transport", "object_store"))
    assert s["errors"] == 0, s["error_kinds"]


def test_chaos_without_shadows_errs_only_where_nothing_could_serve(tmp_path: Path) -> None:
    _check(_chaos(tmp_path, "--seed", "2", "--no-shadows", "--faults", "kill_expert,hang_expert,kill_router,"
                  "kill_controller,slow_expert", "--clients", "blocking,future,async,direct"))
