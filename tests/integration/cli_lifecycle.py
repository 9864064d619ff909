"""`expertray up → status → load → down` as a user runs them, each a process of its own, against a Ray head that
`up` starts (not the session's).

Nothing in it touches the session's Ray, and it spends its ~40 s mostly waiting on those processes, so the
integration conftest starts it in a thread as soon as collection shows its test will run; the test then checks
every step's recorded result in order.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

CONFIG = ("layer: {d_model: 32, d_ff: 48, gate: {family: mixtral, num_experts: 4, top_k: 2}}\n"
          "num_expert_actors: 2\nactor_num_cpus: 0.25\nrouter_num_cpus: 0.25\nmetrics_port: -1\n")
KILL_CONTROLLER = "import ray, expertray.api as ex; ray.kill(ex.connect().controller, no_restart=True)"


class CliLifecycle:
    """The steps, run in order on a thread started now; `result()` waits for them. `steps[name]` is each step's
    finished process; `head` is head.json as `up` wrote it. `down` runs whatever happened before it."""

    def __init__(self, timeout_s: float = 600.0) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="expertray-cli-"))
        self.state_dir = self.dir / "state"
        self.env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
        self.env["EXPERTRAY_STATE_DIR"] = str(self.state_dir)
        self.config = self.dir / "cluster.yaml"
        self.config.write_text(CONFIG)
        self.timeout_s = timeout_s
        self.steps: dict[str, subprocess.CompletedProcess] = {}
        self.head: dict[str, Any] | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="cli-lifecycle", daemon=True)
        self.thread.start()

    def _cli(self, name: str, args: list[str]) -> subprocess.CompletedProcess:
        return self._step(name, [sys.executable, "-m", "expertray.cli", *args])

    def _step(self, name: str, argv: list[str]) -> subprocess.CompletedProcess:
        self.steps[name] = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=240)
        return self.steps[name]

    def _run(self) -> None:
        try:
            self._cli("status before up", ["status"])
            self._cli("down before up", ["down"])
            self._cli("status of nothing", ["status", "--address", "127.0.0.1:1"])
            if self._cli("up", ["up", "--config", str(self.config)]).returncode != 0:
                return
            self.head = json.loads((self.state_dir / "head.json").read_text())
            try:
                self._cli("second up", ["up", "--config", str(self.config)])
                self._cli("load", ["load", "--seconds", "2", "--tokens", "16", "--check", "--json"])
                self._cli("status", ["status", "--json"])
                self._step("kill controller", [sys.executable, "-c", KILL_CONTROLLER])
                self._cli("status without controller", ["status"])
            finally:
                self._cli("down", ["down"])
            self._cli("status after down", ["status"])
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test by result()
            self.error = exc

    def result(self) -> CliLifecycle:
        """This, once every step ran (a step that raised, e.g. past its timeout, is raised here)."""
        self.thread.join(self.timeout_s)
        if self.thread.is_alive():
            raise TimeoutError(f"the CLI lifecycle did not finish within {self.timeout_s:g} s: ran {list(self.steps)}")
        if self.error is not None:
            raise self.error
        return self

    def stop(self) -> None:
        """Wait for the steps (they end with `down`), then remove the scratch directory."""
        self.thread.join(self.timeout_s)
        shutil.rmtree(self.dir, ignore_errors=True)
