"""Replica selection: which physical copy (destination) of its logical expert each assignment goes to.

Input experts [T, k] (logical ids, -1 = dropped); output [T, k] indices into the layer route's destinations
(-1 stays -1). Selectors are vectorised over a padded [E, R] replica table built once per route.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch

from expertray.config import REPLICA_POLICIES
from expertray.errors import ConfigError, InputError
from expertray.registry import Registry
from expertray.seams import ReplicaSelector
from expertray.state.placement_table import LayerRoute


@dataclass(frozen=True)
class ReplicaTable:
    """padded: [E, R] destination indices, row e = e's replicas, padded by repeating the first.
    count: [E] replicas per expert (>= 1)."""

    padded: torch.Tensor
    count: torch.Tensor
    _on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, compare=False,
                                                                      repr=False)

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(padded, count) on `device`, copied there once (routes are long-lived, batches are not)."""
        if device not in self._on:
            self._on[device] = (self.padded.to(device), self.count.to(device))
        return self._on[device]

    @classmethod
    def of(cls, replicas: tuple[tuple[int, ...], ...]) -> ReplicaTable:
        width = max((len(r) for r in replicas), default=1)
        if any(not r for r in replicas):
            raise ConfigError("replica selection: a logical expert has no replica in the route")
        rows = [list(r) + [r[0]] * (width - len(r)) for r in replicas]
        return cls(torch.tensor(rows, dtype=torch.long).reshape(len(replicas), width),
                   torch.tensor([len(r) for r in replicas], dtype=torch.long))


_tables: dict[tuple[int, frozenset[int] | None], tuple[weakref.ref[LayerRoute], ReplicaTable]] = {}


def replica_table(route: LayerRoute, local_actors: frozenset[int] | None = None) -> ReplicaTable:
    """The route's replica table, cached per route object (routes are immutable and long-lived).

    With `local_actors`, each expert's row keeps only replicas on those actors, or all if it has none there.
    """
    key = (id(route), local_actors)
    hit = _tables.get(key)
    if hit is not None and hit[0]() is route:
        return hit[1]
    replicas = route.replicas
    if local_actors is not None:
        on = route.dest_actor.tolist()
        replicas = tuple(tuple(d for d in r if on[d] in local_actors) or r for r in replicas)
    table = ReplicaTable.of(replicas)
    if len(_tables) >= 256:  # routes of superseded placement tables: forget the oldest
        del _tables[next(iter(_tables))]
    _tables[key] = (weakref.ref(route), table)
    return table


def _check(experts: torch.Tensor, table: ReplicaTable) -> None:
    if experts.numel() and int(experts.max()) >= table.count.numel():
        raise InputError(f"expert id {int(experts.max())} is outside the route's "
                         f"{table.count.numel()} logical experts")


def _by_position(experts: torch.Tensor, table: ReplicaTable) -> torch.Tensor:
    """Replica (token index mod the expert's replica count) of each assignment; -1 stays -1."""
    _check(experts, table)
    padded, count = table.on(experts.device)
    e = experts.clamp(min=0)
    tok = torch.arange(experts.shape[0], device=experts.device).unsqueeze(1)
    dest = padded[e, tok % count[e]]
    return torch.where(experts >= 0, dest, -1)


REPLICA: Registry[ReplicaSelector] = Registry("replica")


@REPLICA.register("round_robin")
@dataclass(frozen=True)
class RoundRobin(ReplicaSelector):
    """Token t uses replica t mod n of its expert: an even split with no state and no load signal."""

    def select(self, experts: torch.Tensor, route: LayerRoute, dest_load: torch.Tensor | None = None,
               local_actors: set[int] | None = None) -> torch.Tensor:
        return _by_position(experts, replica_table(route))


@REPLICA.register("locality")
@dataclass(frozen=True)
class Locality(ReplicaSelector):
    """Round-robin over the expert's replicas on `local_actors`; over all replicas if it has none there."""

    def select(self, experts: torch.Tensor, route: LayerRoute, dest_load: torch.Tensor | None = None,
               local_actors: set[int] | None = None) -> torch.Tensor:
        local = frozenset(local_actors) if local_actors is not None else None
        return _by_position(experts, replica_table(route, local))


@REPLICA.register("least_loaded")
@dataclass
class LeastLoaded(ReplicaSelector):
    """Power of two choices: each assignment samples two of its expert's replicas and takes the one with
    less load (dest_load plus this batch's assignments so far, refreshed every `chunk_tokens` tokens)."""

    seed: int = 0
    chunk_tokens: int = 512
    generator: torch.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.chunk_tokens < 1:
            raise ConfigError(f"replica.least_loaded.chunk_tokens: must be >= 1, got {self.chunk_tokens}")
        self.generator = torch.Generator().manual_seed(self.seed)

    def select(self, experts: torch.Tensor, route: LayerRoute, dest_load: torch.Tensor | None = None,
               local_actors: set[int] | None = None) -> torch.Tensor:
        table = replica_table(route)
        _check(experts, table)
        S = route.num_dests
        load = torch.zeros(S) if dest_load is None else dest_load.reshape(-1).to(torch.float32).clone()
        if load.numel() != S:
            raise InputError(f"dest_load must have {S} entries (one per destination), got {load.numel()}")
        e = experts.clamp(min=0)
        n = table.count[e]
        # two independent uniform draws in [0, n) per assignment
        draws = (torch.rand((2, *experts.shape), generator=self.generator) * n).long().clamp(max=n - 1)
        first, second = table.padded[e, draws[0]], table.padded[e, draws[1]]
        out = torch.full_like(experts, -1)
        valid = experts >= 0
        for s in range(0, experts.shape[0], self.chunk_tokens):
            c = slice(s, s + self.chunk_tokens)
            pick = torch.where(load[second[c]] < load[first[c]], second[c], first[c])
            pick = torch.where(valid[c], pick, -1)
            out[c] = pick
            load += torch.bincount(pick[pick >= 0], minlength=S).to(load.dtype)
        return out


REPLICA.check(REPLICA_POLICIES)
