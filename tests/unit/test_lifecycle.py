"""The pieces of the CLI lifecycle that need no Ray: the local head's record, stopping only the recorded
process, fitting a launched cluster to free CPUs, and the one CLI error wrapper."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import typer

from expertray.cli import localhead
from expertray.cli.common import cli_errors
from expertray.config import ClusterConfig
from expertray.errors import ConfigError, UnknownExpertError


@pytest.fixture
def state_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("EXPERTRAY_STATE_DIR", str(tmp_path))
    return tmp_path


def test_state_round_trips_and_malformed_record_is_named(state_dir) -> None:
    assert localhead.read_state() is None
    state = localhead.HeadState("127.0.0.1:6390", 123, "/tmp/x", str(state_dir / "head.log"), None, 1.0, "token")
    localhead.write_state(state)
    assert localhead.read_state() == state and state.port == 6390
    (state_dir / localhead.STATE_FILE).write_text("{not json")
    with pytest.raises(localhead.HeadError, match="unreadable expertray state"):
        localhead.read_state()
    localhead.clear_state()
    assert localhead.read_state() is None


def _fake_head(port: int) -> subprocess.Popen:
    """A process whose command line looks like `ray start --port=PORT` (returned once it has exec'd)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "start", f"--port={port}"],
                            start_new_session=True)
    deadline = time.monotonic() + 30
    while b"start" not in Path(f"/proc/{proc.pid}/cmdline").read_bytes() and time.monotonic() < deadline:
        time.sleep(0.01)
    return proc


def test_is_running_needs_the_recorded_ray_start_on_the_recorded_port(state_dir) -> None:
    fake = _fake_head(6391)
    try:
        assert localhead.is_running(localhead.HeadState("127.0.0.1:6391", fake.pid, "", ""))
        assert not localhead.is_running(localhead.HeadState("127.0.0.1:6392", fake.pid, "", ""))  # other port
        assert not localhead.is_running(localhead.HeadState("127.0.0.1:6391", None, "", ""))  # not started by us
    finally:
        fake.kill()
        fake.wait()
    assert not localhead.is_running(localhead.HeadState("127.0.0.1:6391", fake.pid, "", ""))  # gone


def test_stop_head_signals_only_the_recorded_process(state_dir) -> None:
    ours, other = _fake_head(6393), _fake_head(6394)
    try:
        state = localhead.HeadState("127.0.0.1:6393", ours.pid, "", "")
        localhead.write_state(state)
        assert localhead.stop_head(state, timeout_s=10) is True
        assert ours.wait(timeout=10) is not None and other.poll() is None
        assert localhead.read_state() is None
        assert localhead.stop_head(state) is False  # already stopped: nothing signalled
    finally:
        for p in (ours, other):
            p.kill()
            p.wait()


def test_fit_to_cpus_shrinks_only_what_does_not_fit() -> None:
    from expertray.serve.layers import fit_to_cpus

    cfg = ClusterConfig()  # 4 actors x 0.5 + 1 router x 0.5 = 2.5 CPUs
    fitted = fit_to_cpus(cfg, free_cpus=1.75, reserve_cpus=0.75)
    asked = fitted.num_expert_actors * fitted.actor_num_cpus + fitted.num_routers * fitted.router_num_cpus
    assert asked <= 1.0 and fitted.actor_num_cpus > 0
    assert fit_to_cpus(cfg, free_cpus=16) == cfg
    assert fit_to_cpus(cfg, free_cpus=0.0).actor_num_cpus == 0.01


@pytest.mark.parametrize("exc", [ConfigError("bad value"), UnknownExpertError("unknown actor 'x'"),
                                 FileNotFoundError("no such file")])
def test_cli_errors_turn_expected_failures_into_exit_2(exc: Exception, capsys) -> None:
    with pytest.raises(typer.Exit) as info, cli_errors():
        raise exc
    assert info.value.exit_code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_cli_errors_let_bugs_keep_their_traceback() -> None:
    with pytest.raises(ZeroDivisionError), cli_errors():
        1 / 0  # noqa: B018
