"""Shared fixtures and markers.

- `ray_session`: one local Ray cluster for the whole test session (integration tests only).
- `device`: the torch device Ray-free tests run on, from EXPERTRAY_DEVICE (default cpu; `make gpu-check`
  sets cuda).
- Marker `ray`: every test under tests/integration/ (its conftest marks them) and every test module that
  imports Ray or a module that does. Where Ray is not installed those modules are not even collected (they
  would fail to import), so `pytest -m "not ray"` runs cleanly on a machine without Ray.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path

import pytest
import torch
from package_graph import source_needs

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

# Packages that are optional on a bare GPU machine; a test module needing a missing one is not collected. A
# test module needs one when it imports it, or a package module that imports it when imported
# (tests/package_graph.py reads that from the source): which modules may import Ray is the package boundary
# tests/unit/test_layering.py checks, not a list kept here.
_OPTIONAL = ("ray", "prometheus_client", "openai")


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:  # a finder may refuse outright (scripts/block_imports.py does)
        return False


_MISSING = {name for name in _OPTIONAL if not _installed(name)}
_not_collected: list[str] = []


@functools.cache
def _source(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    if collection_path.suffix != ".py" or not collection_path.name.startswith("test_"):
        if "ray" in _MISSING and collection_path.is_dir() and collection_path.name == "integration":
            _not_collected.append(f"{collection_path.name}/ (needs ray)")
            return True
        return None
    text = _source(collection_path)
    missing = sorted(name for name in _MISSING if source_needs(text, name))
    if missing:
        _not_collected.append(f"{collection_path.name} (needs {', '.join(missing)})")
        return True
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if source_needs(_source(Path(str(item.fspath))), "ray"):
            item.add_marker(pytest.mark.ray)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _not_collected:
        terminalreporter.write_line(f"not collected, optional packages missing: {'; '.join(_not_collected)}")


@pytest.fixture(scope="session")
def device() -> torch.device:
    """EXPERTRAY_DEVICE (cpu | cuda | cuda:N); asking for CUDA where there is none fails, never falls back."""
    from expertray.wire.devices import resolve_device

    return resolve_device()


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray with oversubscribed logical CPUs (2 real cores here), no dashboard, loopback only."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=16, include_dashboard=False, namespace="expertray", logging_level="WARNING",
                 log_to_driver=False)
    yield ray
    ray.shutdown()
