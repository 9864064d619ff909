"""Cluster topology: nodes holding devices (one expert actor per device), and expert slots per device."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from expertray.errors import ConfigError


@dataclass(frozen=True)
class Topology:
    """nodes[i] lists the device (= expert actor) ids on node i; `slots_per_device` bounds experts per device."""

    nodes: tuple[tuple[str, ...], ...]
    slots_per_device: int

    def __post_init__(self) -> None:
        if not self.nodes or any(not n for n in self.nodes):
            raise ConfigError("topology.nodes: need at least one node, each with at least one device")
        devs = [d for n in self.nodes for d in n]
        if len(set(devs)) != len(devs):
            raise ConfigError("topology.nodes: a device id appears twice")
        if self.slots_per_device < 1:
            raise ConfigError(f"topology.slots_per_device: must be >= 1, got {self.slots_per_device}")

    @classmethod
    def uniform(cls, num_nodes: int, devices_per_node: int, slots_per_device: int, prefix: str = "dev"
                ) -> Topology:
        return cls(tuple(tuple(f"{prefix}-{n}-{d}" for d in range(devices_per_node)) for n in range(num_nodes)),
                   slots_per_device)

    @classmethod
    def single_node(cls, devices: Sequence[str], slots_per_device: int) -> Topology:
        return cls((tuple(devices),), slots_per_device)

    @property
    def devices(self) -> list[str]:
        return [d for n in self.nodes for d in n]

    @property
    def num_devices(self) -> int:
        return sum(len(n) for n in self.nodes)

    def node_of(self, device: str) -> int:
        for i, n in enumerate(self.nodes):
            if device in n:
                return i
        raise ConfigError(f"topology: unknown device {device!r}")
