"""What the placement and autoscale policies take and return, in the core so the seams (expertray.seams), the
controller's Ray-free loops (expertray.runtime) and the policies speak the same types without the core importing
a policy: a PlacementPlan (with its Balancedness) from a placement policy; the Signals an autoscale policy
decides from and the Actions it returns.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from expertray.errors import ConfigError, UnknownExpertError
from expertray.state.placement_table import PlacementTable


@dataclass(frozen=True)
class Balancedness:
    """mean / max tokens per device, per layer ([L], 1.0 is perfect) and its mean over layers."""

    per_layer: np.ndarray

    @property
    def mean(self) -> float:
        return float(self.per_layer.mean()) if self.per_layer.size else 1.0


@dataclass(frozen=True)
class PlacementPlan:
    """A planned table and what it costs and buys.

    replica_counts: [L, E] replicas per logical expert in `table`.
    balancedness_before: of the current table (plus the topology's new devices, empty) under the same load,
        or of PlacementTable.balanced over the topology's devices (what the runtime starts from) without
        one; balancedness_after: of `table`.
    slots_moved: slots of `table` that are new on their device (weights to copy); bytes_moved = that ×
        expert_bytes. Without a current table every slot is new.
    """

    table: PlacementTable
    replica_counts: np.ndarray
    balancedness_before: Balancedness
    balancedness_after: Balancedness
    slots_moved: int
    bytes_moved: int


ACTION_KINDS = ("replicate", "dereplicate", "migrate", "add_actor", "remove_actor", "request_resources")
_NEEDS = {"replicate": ("layer", "expert", "dst"), "dereplicate": ("layer", "expert", "src"),
          "migrate": ("layer", "expert", "src", "dst"), "add_actor": (), "remove_actor": ("src",),
          "request_resources": ()}


@dataclass(frozen=True)
class Signals:
    """What the controller measured over its window.

    load: [L, E] tokens routed to each logical expert over the window.
    tokens_per_s: routed tokens per second, all layers and actors together.
    free_capacity: expert actors the cluster has room to start now (0: adding one needs new resources).
    overflow: [L, E] assignments dropped or rerouted away from each expert over the window: demand it could
        not serve, counted with `load` when judging hot and cold (None: no overflow).
    latency_p50_ms / latency_p99_ms: per actor; an actor without samples is absent.
    memory_used_bytes / memory_budget_bytes: per actor; an actor without a budget has no memory limit.
    expert_bytes: weight bytes of one slot (one replica of one logical expert).
    min_replicas: copies every expert must keep (`min_replicas_per_expert`): a policy never removes one below.
    """

    load: np.ndarray
    tokens_per_s: float
    free_capacity: int
    overflow: np.ndarray | None = None
    latency_p50_ms: Mapping[str, float] = field(default_factory=dict)
    latency_p99_ms: Mapping[str, float] = field(default_factory=dict)
    memory_used_bytes: Mapping[str, int] = field(default_factory=dict)
    memory_budget_bytes: Mapping[str, int] = field(default_factory=dict)
    expert_bytes: int = 0
    min_replicas: int = 1

    def __post_init__(self) -> None:
        load = np.asarray(self.load, dtype=np.float64)
        if load.ndim != 2 or not np.isfinite(load).all() or (load < 0).any():
            raise ConfigError(f"signals.load: expected finite tokens >= 0 of shape [layers, experts], "
                              f"got shape {list(load.shape)}")
        overflow = np.zeros_like(load) if self.overflow is None else np.asarray(self.overflow, dtype=np.float64)
        if overflow.shape != load.shape or not np.isfinite(overflow).all() or (overflow < 0).any():
            raise ConfigError(f"signals.overflow: expected finite counts >= 0 of shape {list(load.shape)}, "
                              f"got shape {list(overflow.shape)}")
        object.__setattr__(self, "load", load)
        object.__setattr__(self, "overflow", overflow)
        if not (math.isfinite(self.tokens_per_s) and self.tokens_per_s >= 0):
            raise ConfigError(f"signals.tokens_per_s: must be a finite number >= 0, got {self.tokens_per_s}")
        if self.free_capacity < 0:
            raise ConfigError(f"signals.free_capacity: must be >= 0, got {self.free_capacity}")
        if self.expert_bytes < 0:
            raise ConfigError(f"signals.expert_bytes: must be >= 0, got {self.expert_bytes}")
        if self.min_replicas < 1:
            raise ConfigError(f"signals.min_replicas: must be >= 1, got {self.min_replicas}")
        for name in ("latency_p50_ms", "latency_p99_ms", "memory_used_bytes", "memory_budget_bytes"):
            for actor, value in getattr(self, name).items():
                if not (math.isfinite(value) and value >= 0):
                    raise ConfigError(f"signals.{name}[{actor!r}]: must be a finite number >= 0, got {value}")

    @property
    def demand(self) -> np.ndarray:
        """[L, E] routed plus overflowed assignments per logical expert."""
        return self.load + self.overflow

    def check(self, table: PlacementTable) -> None:
        """Fail, naming the field, if these signals do not describe `table`."""
        if self.load.shape != (table.num_layers, table.num_experts):
            raise ConfigError(f"signals.load: shape {list(self.load.shape)} does not match the table's "
                              f"{table.num_layers} layers x {table.num_experts} experts")
        for name in ("latency_p50_ms", "latency_p99_ms", "memory_used_bytes", "memory_budget_bytes"):
            for actor in getattr(self, name):
                if actor not in table.actors:
                    raise UnknownExpertError(f"signals.{name} names actor {actor!r}, which table "
                                             f"v{table.version} does not hold (actors: {', '.join(table.actors)})")


@dataclass(frozen=True)
class Action:
    """One change: kind in ACTION_KINDS; layer/expert/src/dst as the kind needs; reason with its numbers."""

    kind: str
    reason: str
    layer: int | None = None
    expert: int | None = None
    src: str | None = None
    dst: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in ACTION_KINDS:
            raise ConfigError(f"action.kind: {self.kind!r} is not one of {ACTION_KINDS}")
        missing = [f for f in _NEEDS[self.kind] if getattr(self, f) is None]
        if missing:
            raise ConfigError(f"action {self.kind}: needs {', '.join(missing)}")

    def apply(self, table: PlacementTable) -> PlacementTable:
        """The table after this action; add_actor and request_resources leave it as it is (the controller
        adds a started actor with PlacementTable.with_actor)."""
        if self.kind == "replicate":
            return table.replicate(self.layer, self.expert, self.dst)
        if self.kind == "dereplicate":
            return table.remove(self.layer, self.expert, self.src)
        if self.kind == "migrate":
            return table.migrate(self.layer, self.expert, self.src, self.dst)
        if self.kind == "remove_actor":
            return table.drain(self.src)
        return table
