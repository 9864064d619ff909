"""Shared fixtures: one local Ray cluster for the whole test session (integration tests only)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray with oversubscribed logical CPUs (2 real cores here), no dashboard, loopback only."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=16, include_dashboard=False, namespace="expertray", logging_level="WARNING",
                 log_to_driver=False)
    yield ray
    ray.shutdown()
