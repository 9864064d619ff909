"""Cluster topology: nodes holding devices (one expert actor per device), expert slots per device, and the
links between devices (a fast intra-node fabric, a slower network between nodes)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

from expertray.errors import ConfigError


@dataclass(frozen=True)
class Links:
    """Per-device link model, each direction on its own (links are full duplex).

    Defaults are an H100 SXM node with one 400 Gb/s NIC per GPU:
    - intra-node: NVLink 4 gives each H100 900 GB/s bidirectional, i.e. 450 GB/s per direction (NVIDIA H100
      datasheet). Measured all-to-all reaches less: DeepEP's intranode dispatch runs at 153 GB/s on H800,
      whose NVLink is cut to ~160 GB/s (DeepEP README; DeepSeek-V3 report §3.2.2).
    - inter-node: InfiniBand NDR, 400 Gb/s = 50 GB/s per direction per GPU (ConnectX-7); DeepEP measures
      43-58 GB/s of RDMA bottleneck bandwidth across 16-64 GPUs on that NIC.
    - latency: order-of-magnitude one-way message latencies, ~2 us over NVLink and ~5 us host-to-host over
      IB including the NIC (a switch hop alone is < 1 us); they matter only for small decode batches.
    """

    intra_node_bandwidth_bytes_per_s: float = 450e9
    inter_node_bandwidth_bytes_per_s: float = 50e9
    intra_node_latency_s: float = 2e-6
    inter_node_latency_s: float = 5e-6

    def __post_init__(self) -> None:
        for name in ("intra_node_bandwidth_bytes_per_s", "inter_node_bandwidth_bytes_per_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"topology.links.{name}: must be a finite number > 0, got {value}")
        for name in ("intra_node_latency_s", "inter_node_latency_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"topology.links.{name}: must be a finite number >= 0, got {value}")


@dataclass(frozen=True)
class Topology:
    """nodes[i] lists the device (= expert actor) ids on node i; `slots_per_device` bounds experts per device;
    `links` the bandwidth and latency within and between nodes."""

    nodes: tuple[tuple[str, ...], ...]
    slots_per_device: int
    links: Links = field(default_factory=Links)

    def __post_init__(self) -> None:
        if not self.nodes or any(not n for n in self.nodes):
            raise ConfigError("topology.nodes: need at least one node, each with at least one device")
        devs = [d for n in self.nodes for d in n]
        if len(set(devs)) != len(devs):
            raise ConfigError("topology.nodes: a device id appears twice")
        if self.slots_per_device < 1:
            raise ConfigError(f"topology.slots_per_device: must be >= 1, got {self.slots_per_device}")

    @classmethod
    def uniform(cls, num_nodes: int, devices_per_node: int, slots_per_device: int, prefix: str = "dev",
                links: Links | None = None) -> Topology:
        if num_nodes < 1 or devices_per_node < 1:
            raise ConfigError(f"topology: need >= 1 node and >= 1 device per node, got {num_nodes} x "
                              f"{devices_per_node}")
        return cls(tuple(tuple(f"{prefix}-{n}-{d}" for d in range(devices_per_node)) for n in range(num_nodes)),
                   slots_per_device, links or Links())

    @classmethod
    def single_node(cls, devices: Sequence[str], slots_per_device: int, links: Links | None = None) -> Topology:
        return cls((tuple(devices),), slots_per_device, links or Links())

    @property
    def devices(self) -> list[str]:
        return [d for n in self.nodes for d in n]

    @property
    def num_devices(self) -> int:
        return sum(len(n) for n in self.nodes)

    @property
    def num_nodes(self) -> int:
        return len(self.nodes)

    @cached_property
    def device_nodes(self) -> tuple[int, ...]:
        """Node index of each device, in `devices` order."""
        return tuple(i for i, n in enumerate(self.nodes) for _ in n)

    @cached_property
    def device_index(self) -> dict[str, int]:
        """Position of each device id in `devices`."""
        return {d: i for i, d in enumerate(self.devices)}

    def node_of(self, device: str) -> int:
        index = self.device_index.get(device)
        if index is None:
            raise ConfigError(f"topology: unknown device {device!r}")
        return self.device_nodes[index]
