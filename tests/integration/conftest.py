"""Every integration test runs on the session's local Ray cluster: mark them all `ray`. Fixtures: `until`
(poll a condition with a deadline), `controller_info` (the controller's info, None while it restarts) and
`multinode_driver` and `cli_lifecycle` (work that runs beside the suite, started when collection ends)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cli_lifecycle import CliLifecycle
from multinode_driver import Driver

_HERE = Path(__file__).resolve().parent


MULTINODE_BUDGET_S = 300  # the driver's own budget; it then shuts its cluster down and still prints its result
# Work that runs beside the tests rather than before the test that checks it: each needs nothing of the session's
# Ray and mostly waits, so it starts when collection ends (if a collected test uses its fixture) and the test
# waits for its result.
# In this order: each starts a Ray cluster of its own, so a job starts once the one before it has finished (three
# clusters starting at once beside the session's on 2 cores made `ray start` itself fail in CI).
BACKGROUND: dict[str, Callable[[], Any]] = {"cli_lifecycle": CliLifecycle,
                                            "multinode_driver": lambda: Driver([], MULTINODE_BUDGET_S)}
_STARTED = pytest.StashKey[dict[str, Any]]()


class _After:
    """A background job made once `before` (a job with `result()`) has ended, on a thread of its own."""

    def __init__(self, make: Callable[[], Any], before: Any) -> None:
        self.job: Any = None
        self.thread = threading.Thread(target=self._run, args=(make, before), daemon=True)
        self.thread.start()

    def _run(self, make: Callable[[], Any], before: Any) -> None:
        try:
            before.result()
        except BaseException:  # noqa: BLE001 - its own test reports it; this job starts anyway
            pass
        self.job = make()

    def get(self) -> Any:
        self.thread.join()
        return self.job

    def stop(self) -> None:
        job = self.get()
        if job is not None:
            job.stop()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.ray)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the background work that a collected test will check."""
    if session.config.option.collectonly:
        return
    used = {name for item in session.items for name in getattr(item, "fixturenames", ()) if name in BACKGROUND}
    started = session.config.stash.setdefault(_STARTED, {})
    previous: _Result | None = None
    for name in BACKGROUND:
        if name in used:
            started[name] = BACKGROUND[name]() if previous is None else _After(BACKGROUND[name], previous)
            previous = _Result(started[name])


class _Result:
    """`result()` of a job, or of a job made later (`_After`)."""

    def __init__(self, job: Any) -> None:
        self.job = job

    def result(self) -> Any:
        job = self.job.get() if isinstance(self.job, _After) else self.job
        return job.result()


def _background(config: pytest.Config, name: str) -> Any:
    started = config.stash.setdefault(_STARTED, {})
    if name not in started:
        started[name] = BACKGROUND[name]()
    job = started[name]
    return job.get() if isinstance(job, _After) else job


def pytest_unconfigure(config: pytest.Config) -> None:
    for job in config.stash.get(_STARTED, {}).values():
        job.stop()


@pytest.fixture(scope="session")
def multinode_driver(request: pytest.FixtureRequest) -> Driver:
    """The multi-node scenarios' driver, started when collection ended (or now)."""
    return _background(request.config, "multinode_driver")


@pytest.fixture(scope="session")
def cli_lifecycle(request: pytest.FixtureRequest) -> CliLifecycle:
    """`expertray up → status → load → down` in processes of their own, started when collection ended (or now)."""
    return _background(request.config, "cli_lifecycle")


def _until(pred: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"not within {timeout_s} s: {what}")


def _controller_info(cluster: Any) -> dict[str, Any] | None:
    import ray

    try:
        return ray.get(cluster.controller.info.remote(), timeout=10)
    except Exception:  # noqa: BLE001 - restarting
        return None


@pytest.fixture
def until() -> Callable[[Callable[[], Any], float, str], Any]:
    """until(pred, timeout_s, what): pred's first truthy value, polled every 0.25 s; AssertionError naming
    `what` when none comes within timeout_s."""
    return _until


@pytest.fixture
def controller_info() -> Callable[[Any], dict[str, Any] | None]:
    """controller_info(cluster): the controller's info(), or None while it does not answer (restarting)."""
    return _controller_info


@pytest.fixture(scope="session")
def serve_port(ray_session: Any) -> Iterator[int]:
    """One Serve HTTP proxy for the session, on a free loopback port: each module deploys its app there and
    deletes it after (`serve.delete`), rather than starting and stopping Serve itself (seconds each)."""
    from ray import serve

    from expertray.client import free_port

    yield free_port()
    serve.shutdown()
