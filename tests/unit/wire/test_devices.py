"""Backend choice by what the ranks own, and the device named by EXPERTRAY_DEVICE."""

from __future__ import annotations

import pytest
import torch

from expertray.errors import ConfigError
from expertray.wire.devices import choose_backend, host_staging, resolve_device


def test_nccl_when_every_rank_owns_a_distinct_gpu() -> None:
    choice = choose_backend(["n1/GPU-a", "n1/GPU-b", "n2/GPU-a"])
    assert choice.backend == "nccl"
    assert "distinct GPU" in choice.reason


def test_gloo_when_ranks_share_a_gpu() -> None:
    choice = choose_backend(["n1/GPU-a", "n1/GPU-a", "n1/GPU-b"])
    assert choice.backend == "gloo"
    assert "share a GPU" in choice.reason


@pytest.mark.parametrize("devices", [[None, "n1/GPU-a"], ["n1/GPU-a", None, None], [None]])
def test_gloo_when_any_rank_has_no_gpu(devices: list[str | None]) -> None:
    choice = choose_backend(devices)
    assert choice.backend == "gloo"
    assert f"{devices.count(None)} of {len(devices)} ranks have no GPU" in choice.reason


def test_a_group_needs_ranks() -> None:
    with pytest.raises(ValueError, match="at least one rank"):
        choose_backend([])


def test_gloo_stages_cuda_rows_through_the_host_and_nccl_does_not() -> None:
    assert host_staging("gloo", torch.device("cuda", 0))
    assert not host_staging("gloo", torch.device("cpu"))
    assert not host_staging("nccl", torch.device("cuda", 0))


def test_resolve_device_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXPERTRAY_DEVICE", "cpu")
    assert resolve_device() == torch.device("cpu")
    monkeypatch.setenv("EXPERTRAY_DEVICE", "tpu-ish")
    with pytest.raises(ConfigError, match="EXPERTRAY_DEVICE"):
        resolve_device()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_without_a_gpu_is_an_error_not_a_fallback() -> None:
    with pytest.raises(ConfigError, match="no CUDA"):
        resolve_device("cuda")
