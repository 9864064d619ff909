"""Every integration test runs on the session's local Ray cluster: mark them all `ray`. Fixtures: `until`
(poll a condition with a deadline) and `controller_info` (the controller's info, None while it restarts)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.ray)


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
