"""Where tensors live and how ranks talk: the device an actor computes on and the collective backend a
group of ranks can use. Pure functions (no Ray), so the decision is unit-tested apart from the actors.

A rank's *device identity* is a string naming the physical GPU it holds (node + GPU UUID), or None for a
CPU-only rank. NCCL needs every rank of a communicator on its own GPU; gloo works for any mix (it stages
CUDA tensors through host memory); the object store works whenever the group cannot form at all.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from expertray.errors import ConfigError

DEVICE_ENV = "EXPERTRAY_DEVICE"


@dataclass(frozen=True)
class BackendChoice:
    """The collective backend for one group and the reason, as `expertray status` reports it."""

    backend: str  # "nccl" | "gloo"
    reason: str


def choose_backend(rank_devices: Sequence[str | None]) -> BackendChoice:
    """NCCL when every rank (router first, then each expert actor) owns a distinct GPU, else gloo."""
    if not rank_devices:
        raise ValueError("a group needs at least one rank")
    cpu_ranks = [r for r, dev in enumerate(rank_devices) if dev is None]
    if cpu_ranks:
        return BackendChoice("gloo", f"{len(cpu_ranks)} of {len(rank_devices)} ranks have no GPU "
                                     f"(ranks {cpu_ranks[:8]}{'…' if len(cpu_ranks) > 8 else ''})")
    if len(set(rank_devices)) < len(rank_devices):
        shared = sorted({d for d in rank_devices if rank_devices.count(d) > 1})
        return BackendChoice("gloo", f"ranks share a GPU ({len(shared)} GPU(s) held by more than one rank); "
                                     "NCCL needs one GPU per rank, gloo stages through host memory")
    return BackendChoice("nccl", f"each of the {len(rank_devices)} ranks owns a distinct GPU")


def host_staging(backend: str, device: torch.device) -> bool:
    """Whether rows must be copied to host memory for this backend (gloo moves CPU tensors only)."""
    return backend == "gloo" and device.type != "cpu"


def assigned_device(num_gpu_ids: int) -> torch.device:
    """The device of an actor Ray gave `num_gpu_ids` GPUs (it sets CUDA_VISIBLE_DEVICES, so cuda:0)."""
    return torch.device("cuda", 0) if num_gpu_ids > 0 and torch.cuda.is_available() else torch.device("cpu")


def device_identity(device: torch.device) -> str | None:
    """Node + GPU UUID of a CUDA device (two actors on one GPU get the same string); None on CPU."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    return f"{socket.gethostname()}/{getattr(props, 'uuid', device.index)}"


def resolve_device(name: str | None = None) -> torch.device:
    """The device named by `name` or the EXPERTRAY_DEVICE environment variable (default cpu).

    Asking for CUDA on a machine without it is an error, not a silent fallback to the CPU."""
    name = name if name is not None else os.environ.get(DEVICE_ENV, "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"{DEVICE_ENV}: {name!r} is not a torch device ({exc})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{DEVICE_ENV}: {name!r} asked for, but torch sees no CUDA device")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"{DEVICE_ENV}: {name!r}: only cpu and cuda are supported")
    return device


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels on `device` (a no-op on CPU); for timing, not in the data path."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
