"""The Ray head `expertray up` starts on this machine, and the record that lets `expertray down` stop it alone.

`up` runs `ray start --head --block` as its own process session, bound to 127.0.0.1 on free ports (GCS, client
server, agents) with a per-user temp dir, so it never collides with — or is found by — other Ray instances on
the machine (no /tmp/ray/ray_current_cluster). It records the head in a small JSON state file:

    <state dir>/head.json  {"address": "127.0.0.1:PORT", "pid": PID, "temp_dir": ..., "dashboard": URL | null,
                            "log": PATH, "started_at": UNIX_S}

state dir: $EXPERTRAY_STATE_DIR, else $XDG_STATE_HOME/expertray, else ~/.local/state/expertray.
`down` signals exactly that pid (after checking /proc that it is still that `ray start` on that port): Ray's
SIGTERM handler stops the head's own processes; never `ray stop`, which would stop every Ray on the machine.
The head is a child process driven through Ray's CLI; only `use_head` touches Ray in this process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from expertray.client import free_port
from expertray.errors import ConfigError

STATE_FILE = "head.json"
READY_LINE = "Ray runtime started"


class HeadError(ConfigError):
    """The local head cannot be started, found or stopped; the message says what to do."""


@dataclass(frozen=True)
class HeadState:
    """What `expertray up` set up: the head's address and the pid of its `ray start --block` process (None when
    `up --address` launched expertray on a Ray cluster it did not start)."""

    address: str
    pid: int | None
    temp_dir: str
    log: str
    dashboard: str | None = None
    started_at: float = 0.0
    auth: str = "disabled"

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])


def state_dir() -> Path:
    if os.environ.get("EXPERTRAY_STATE_DIR"):
        return Path(os.environ["EXPERTRAY_STATE_DIR"])
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "expertray"


def read_state() -> HeadState | None:
    """The recorded head, or None when `up` recorded none. A malformed record raises HeadError naming it."""
    path = state_dir() / STATE_FILE
    try:
        doc = json.loads(path.read_text())
        return HeadState(**doc)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as exc:
        raise HeadError(f"{path}: unreadable expertray state ({exc}); delete it if no `expertray up` head runs") \
            from None


def write_state(state: HeadState) -> None:
    path = state_dir() / STATE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(dataclasses.asdict(state)))
    tmp.replace(path)


def clear_state() -> None:
    (state_dir() / STATE_FILE).unlink(missing_ok=True)


def is_running(state: HeadState) -> bool:
    """Whether the recorded pid is still the `ray start --head` process on the recorded port (a recycled pid
    running anything else is not ours)."""
    if state.pid is None:
        return False
    if Path("/proc/self").exists():
        try:
            args = Path(f"/proc/{state.pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        return b"start" in args and f"--port={state.port}".encode() in args
    try:  # no /proc (macOS): the pid alone
        os.kill(state.pid, 0)
    except OSError:
        return False
    return True


def use_head(state: HeadState) -> str:
    """Prepare this process to drive the recorded head (its auth mode, before `ray.init`); returns its address.

    Ray turns token auth on in a driver only for a local cluster it found itself, not for an explicit address,
    and caches the mode at import: do what it does for the clusters it finds (set the variable, refresh its
    config) unless the user set RAY_AUTH_MODE.
    """
    if state.auth == "token" and "RAY_AUTH_MODE" not in os.environ:
        from ray._private.authentication.authentication_token_setup import _enable_token_auth

        _enable_token_auth()
    return state.address


def start_head(num_cpus: float, dashboard: bool = False, timeout_s: float = 90.0,
               progress: Callable[[str], None] = lambda _: None) -> HeadState:
    """Start a loopback Ray head in its own session and wait (with a deadline) until it serves."""
    port, client_port = free_port(), free_port()
    temp_dir = Path(tempfile.gettempdir()) / f"expertray-{os.getuid() if hasattr(os, 'getuid') else 'user'}"
    log_path = state_dir() / f"head-{port}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", f"--port={port}",
           "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus:g}", "--disable-usage-stats",
           f"--temp-dir={temp_dir}", f"--ray-client-server-port={client_port}",
           f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
           f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]
    # Ray runs a minimal dashboard process even without the UI: give it a free loopback port too. With
    # `dashboard`, the full one also serves Serve's REST API (what `serve deploy` talks to).
    dash_port = free_port()
    cmd += [f"--include-dashboard={'true' if dashboard else 'false'}", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash_port}"]
    url = f"http://127.0.0.1:{dash_port}" if dashboard else None
    auth = os.environ.get("RAY_AUTH_MODE", "token")
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": auth}
    env.pop("RAY_ADDRESS", None)
    if auth == "token":  # Ray's own token file; the token is never printed
        subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "get-auth-token", "--generate"], env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, timeout=60)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)
    state = HeadState(f"127.0.0.1:{port}", proc.pid, str(temp_dir), str(log_path), url, time.time(), auth)
    write_state(state)  # before waiting: a failed or interrupted `up` can still be cleaned up by `down`
    deadline = time.monotonic() + timeout_s
    last = time.monotonic()
    while READY_LINE not in log_path.read_text(errors="replace"):
        if proc.poll() is not None:
            clear_state()
            raise HeadError(f"the Ray head exited with status {proc.returncode} while starting; see {log_path}")
        if time.monotonic() > deadline:
            stop_head(state)
            raise HeadError(f"the Ray head did not start within {timeout_s:g} s; see {log_path}")
        if time.monotonic() - last >= 2.0:
            last = time.monotonic()
            progress(f"waiting for the Ray head on {state.address} ({time.monotonic() - deadline + timeout_s:.0f} s)")
        time.sleep(0.2)
    return state


def stop_head(state: HeadState, timeout_s: float = 30.0) -> bool:
    """Stop the recorded head (SIGTERM: Ray stops its own processes; SIGKILL to its process group after the
    deadline) and forget it. Returns False when it was no longer running."""
    running = state.pid is not None and is_running(state)
    if running:
        with contextlib.suppress(ProcessLookupError):
            os.kill(state.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while is_running(state) and time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(state.pid, os.WNOHANG)  # reap it when this process started it (tests)
            time.sleep(0.2)
        if is_running(state):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(state.pid, signal.SIGKILL)  # its own session: only the head's processes
    clear_state()
    if state.log and not is_running(state):
        Path(state.log).unlink(missing_ok=True)
    return running
