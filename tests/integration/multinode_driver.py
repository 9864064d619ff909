"""The multi-node scenarios' driver (expertray/tools/bench/multinode.py) as a process of its own.

It runs a Ray cluster of its own (head + worker raylets), so nothing ties it to the session's Ray: the
integration conftest starts it as soon as collection shows a multi-node test will run, and the suite's other
tests run while it works (the driver spends much of its minute waiting on node starts, losses and heals);
test_multinode.py then waits for its result.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from typing import Any

import pytest


class Driver:
    """`python -m expertray.tools.bench.multinode --budget-s BUDGET ARGS` started now; `result()` waits for it."""

    def __init__(self, args: list[str], budget_s: int) -> None:
        env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
        env.pop("RAY_ADDRESS", None)
        self.timeout_s = budget_s + 60
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "expertray.tools.bench.multinode", "--budget-s", str(budget_s), *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
        self._scenarios: dict[str, Any] | None = None

    def result(self) -> dict[str, Any]:
        """The scenarios' results (waiting up to the budget + 60 s); a failed or late driver fails the test."""
        if self._scenarios is None:
            self._scenarios = self._wait()
        return self._scenarios

    def _wait(self) -> dict[str, Any]:
        try:
            out, err = self.proc.communicate(timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            self.stop()
            out, err = self.proc.communicate()
            pytest.fail(f"multi-node driver did not finish within {self.timeout_s} s; stderr tail: {err[-3000:]}")
        lines = [line for line in out.splitlines() if line.startswith('{"scenarios"')]
        assert self.proc.returncode == 0 and lines, f"driver exited {self.proc.returncode}; stderr tail: {err[-3000:]}"
        result = json.loads(lines[-1])
        assert "_run" not in result["scenarios"], result["scenarios"]["_run"]
        return result["scenarios"]

    def stop(self) -> None:
        """SIGTERM (the driver shuts its cluster down in `finally`), then SIGKILL to its process group (its
        raylets share it) if it has not exited within 60 s."""
        if self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
