"""The placement table: which actor hosts which physical copy (slot) of each logical expert.

One table for every consumer (router, controller, simulator, CLI, metrics). Logical experts are
(layer, expert) pairs; a *slot* is one physical replica of one logical expert on one actor. Slots are kept
sorted by actor, so a layer's destinations sorted by slot id are also grouped by actor (one contiguous
segment per actor in a dispatch plan). Tables are immutable; every change yields version + 1.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch

from expertray.errors import ConfigError, UnknownExpertError

ExpertKey = tuple[int, int]  # (layer, logical expert): what a slot holds, whichever actor it is on


@dataclass(frozen=True, order=True)
class Slot:
    """One physical replica: actor `actor` holds logical expert `expert` of layer `layer`."""

    actor: str
    layer: int
    expert: int


@dataclass(frozen=True)
class LayerRoute:
    """One layer's view of a table, compiled for the router's hot path.

    dest_actor: [S_l] actor index (into table.actors) of each destination; contiguous per actor.
    dest_expert: [S_l] logical expert each destination serves.
    replicas: per logical expert, its destination indices (into the S_l destinations).
    """

    layer: int
    dest_actor: torch.Tensor
    dest_expert: torch.Tensor
    replicas: tuple[tuple[int, ...], ...]

    @property
    def num_dests(self) -> int:
        """S_l: the layer's destinations (its slots over all actors)."""
        return int(self.dest_actor.numel())

    @cached_property
    def home_actor(self) -> tuple[int, ...]:
        """[E] actor index of each logical expert's first replica (compiled once per table version)."""
        return tuple(int(self.dest_actor[r[0]]) for r in self.replicas)

    def stranded(self, avoid: frozenset[int]) -> tuple[int, ...]:
        """Logical experts whose every replica is on an actor index in `avoid` (no live copy to fall back on)."""
        on = self.dest_actor.tolist()
        return tuple(e for e, r in enumerate(self.replicas) if all(on[d] in avoid for d in r))

    def masked(self, avoid: frozenset[int]) -> LayerRoute:
        """This route with every replica on an actor index in `avoid` withheld from replica selection.

        Destinations (dest_actor, dest_expert) stay as they are, so plans and buckets index the same slots and
        an avoided actor simply gets no rows. An expert whose every replica is avoided keeps them all: its
        tokens still go there and wait for the heal (see `stranded`)."""
        if not avoid:
            return self
        on = self.dest_actor.tolist()
        replicas = tuple(tuple(d for d in r if on[d] not in avoid) or r for r in self.replicas)
        return LayerRoute(self.layer, self.dest_actor, self.dest_expert, replicas)


@dataclass(frozen=True)
class PlacementTable:
    """Every slot of every layer: which actor holds which replica of each logical expert.

    version: bumped by every change, so routers and the controller can tell which table they hold.
    actors: the expert actor ids, in the order actor indices (LayerRoute.dest_actor) refer to.
    slots: sorted by (actor index, layer, expert) on construction. Construction rejects duplicate actors,
    slots on unknown actors or outside num_layers × num_experts, a slot held twice, and a logical expert
    without any replica.
    """

    version: int
    num_layers: int
    num_experts: int
    actors: tuple[str, ...]
    slots: tuple[Slot, ...] = field(default=())

    def __post_init__(self) -> None:
        if len(set(self.actors)) != len(self.actors):
            raise ConfigError(f"placement.actors: duplicate actor ids in {self.actors}")
        rank = {a: i for i, a in enumerate(self.actors)}
        for s in self.slots:
            if s.actor not in rank:
                raise UnknownExpertError(f"slot {s} names unknown actor {s.actor!r}")
            if not (0 <= s.layer < self.num_layers and 0 <= s.expert < self.num_experts):
                raise UnknownExpertError(f"slot {s} is outside {self.num_layers} layers x {self.num_experts} experts")
        if len(set(self.slots)) != len(self.slots):
            raise ConfigError("placement.slots: an actor holds the same expert twice")
        ordered = tuple(sorted(self.slots, key=lambda s: (rank[s.actor], s.layer, s.expert)))
        object.__setattr__(self, "slots", ordered)
        missing = [(layer, e) for layer in range(self.num_layers) for e in range(self.num_experts)
                   if not self._replica_map.get((layer, e))]
        if missing:
            raise ConfigError(f"placement: logical experts without any replica, e.g. layer:expert "
                              f"{missing[0][0]}:{missing[0][1]} ({len(missing)} in all)")

    # --- construction -------------------------------------------------------------------------------
    @classmethod
    def balanced(cls, num_layers: int, num_experts: int, actors: Sequence[str], version: int = 0) -> PlacementTable:
        """Each layer's experts split into contiguous, near-equal blocks over the actors (uneven allowed)."""
        if not actors:
            raise ConfigError("placement.actors: need at least one expert actor")
        n = len(actors)
        slots = [Slot(actors[e * n // num_experts], layer, e)
                 for layer in range(num_layers) for e in range(num_experts)]
        return cls(version, num_layers, num_experts, tuple(actors), tuple(slots))

    # --- queries ------------------------------------------------------------------------------------
    @cached_property
    def _replica_map(self) -> dict[tuple[int, int], list[int]]:
        """(layer, expert) → indices into `slots` of its replicas."""
        out: dict[tuple[int, int], list[int]] = {}
        for i, s in enumerate(self.slots):
            out.setdefault((s.layer, s.expert), []).append(i)
        return out

    def check_expert(self, layer: int, expert: int) -> None:
        """Raise UnknownExpertError unless (layer, expert) is inside the table's layers × experts."""
        if not (0 <= layer < self.num_layers):
            raise UnknownExpertError(f"unknown expert {layer}:{expert}: no layer {layer} "
                                     f"(table has layers 0..{self.num_layers - 1})")
        if not (0 <= expert < self.num_experts):
            raise UnknownExpertError(f"unknown expert {layer}:{expert} (layer has experts 0..{self.num_experts - 1})")

    def check_actor(self, actor: str) -> None:
        """Raise UnknownExpertError unless `actor` is one of the table's actors."""
        if actor not in self.actors:
            raise UnknownExpertError(f"unknown actor {actor!r} (actors: {', '.join(self.actors)})")

    def replicas(self, layer: int, expert: int) -> list[Slot]:
        """The slots holding logical expert (layer, expert), in actor order (at least one)."""
        self.check_expert(layer, expert)
        return [self.slots[i] for i in self._replica_map[(layer, expert)]]

    def slots_of(self, actor: str) -> list[Slot]:
        """The slots `actor` holds, all layers, sorted by (layer, expert); empty for an actor with none."""
        self.check_actor(actor)
        return [s for s in self.slots if s.actor == actor]

    def replica_counts(self, layer: int) -> list[int]:
        """[E] replicas of each logical expert of `layer` (each >= 1)."""
        return [len(self._replica_map[(layer, e)]) for e in range(self.num_experts)]

    @cached_property
    def _routes(self) -> dict[int, LayerRoute]:
        rank = {a: i for i, a in enumerate(self.actors)}
        routes = {}
        for layer in range(self.num_layers):
            dests = [s for s in self.slots if s.layer == layer]
            replicas: list[list[int]] = [[] for _ in range(self.num_experts)]
            for j, s in enumerate(dests):
                replicas[s.expert].append(j)
            routes[layer] = LayerRoute(layer, torch.tensor([rank[s.actor] for s in dests], dtype=torch.long),
                                       torch.tensor([s.expert for s in dests], dtype=torch.long),
                                       tuple(tuple(r) for r in replicas))
        return routes

    def route(self, layer: int) -> LayerRoute:
        """Layer `layer` compiled for the router (built once per table, for every layer, on first use)."""
        if not (0 <= layer < self.num_layers):
            raise UnknownExpertError(f"unknown layer {layer} (table has layers 0..{self.num_layers - 1})")
        return self._routes[layer]

    def masked_route(self, layer: int, suspects: frozenset[str]) -> LayerRoute:
        """`route(layer)` with replicas on `suspects` (actor ids; unknown ones ignored) withheld where the expert
        has another replica (LayerRoute.masked); cached per suspect set, so selectors' per-route caches hold."""
        avoid = frozenset(i for i, a in enumerate(self.actors) if a in suspects)
        if not avoid:
            return self.route(layer)
        key = (layer, avoid)
        hit = self._masked.get(key)
        if hit is None:
            if len(self._masked) >= 4 * self.num_layers:  # suspect sets of a long-lived table: forget the oldest
                del self._masked[next(iter(self._masked))]
            hit = self._masked[key] = self.route(layer).masked(avoid)
        return hit

    def stranded(self, suspects: frozenset[str]) -> list[tuple[int, int]]:
        """(layer, expert) pairs whose every replica is on one of `suspects`: requests touching them must wait
        for a heal; every other expert can be served at once from a surviving replica."""
        avoid = frozenset(i for i, a in enumerate(self.actors) if a in suspects)
        if not avoid:
            return []
        return [(layer, e) for layer in range(self.num_layers) for e in self.route(layer).stranded(avoid)]

    @cached_property
    def _masked(self) -> dict[tuple[int, frozenset[int]], LayerRoute]:
        return {}

    # --- changes (each returns a new version) -------------------------------------------------------
    def with_slots(self, slots: Iterable[Slot], actors: Sequence[str] | None = None) -> PlacementTable:
        """A table of version + 1 holding exactly `slots` (over `actors`, default the same actors)."""
        return PlacementTable(self.version + 1, self.num_layers, self.num_experts,
                              tuple(actors) if actors is not None else self.actors, tuple(slots))

    def replicate(self, layer: int, expert: int, actor: str) -> PlacementTable:
        """Version + 1 with one more replica of (layer, expert), on `actor`, which must not hold it yet."""
        self.check_expert(layer, expert)
        self.check_actor(actor)
        new = Slot(actor, layer, expert)
        if new in self.slots:
            raise ConfigError(f"actor {actor!r} already holds expert {layer}:{expert}")
        return self.with_slots(self.slots + (new,))

    def remove(self, layer: int, expert: int, actor: str) -> PlacementTable:
        """Version + 1 without `actor`'s replica of (layer, expert); removing the last replica is an error."""
        self.check_expert(layer, expert)
        slot = Slot(actor, layer, expert)
        if slot not in self.slots:
            raise UnknownExpertError(f"actor {actor!r} holds no replica of expert {layer}:{expert}")
        return self.with_slots(s for s in self.slots if s != slot)

    def migrate(self, layer: int, expert: int, src: str, dst: str) -> PlacementTable:
        """Version + 1 (one change, not two) with `src`'s replica of layer:expert moved to `dst`; src must hold
        it, dst must not."""
        self.check_expert(layer, expert)
        if src == dst:
            raise ConfigError(f"migrate {layer}:{expert}: source and destination are both {src!r}")
        if Slot(src, layer, expert) not in self.slots:
            holders = ", ".join(s.actor for s in self.replicas(layer, expert))
            raise UnknownExpertError(f"actor {src!r} holds no replica of expert {layer}:{expert} "
                                     f"(held by {holders})")
        return self.replicate(layer, expert, dst).remove(layer, expert, src).bump(self.version + 1)

    def drain(self, actor: str) -> PlacementTable:
        """Move every slot off `actor` to the least-loaded (fewest slots) other actors, then drop the actor."""
        self.check_actor(actor)
        others = [a for a in self.actors if a != actor]
        if not others:
            raise ConfigError(f"cannot drain {actor!r}: it is the only expert actor")
        count = {a: 0 for a in others}
        kept = [s for s in self.slots if s.actor != actor]
        for s in kept:
            count[s.actor] += 1
        held = set(kept)
        moved = []
        for s in self.slots:
            if s.actor != actor:
                continue
            if any(Slot(a, s.layer, s.expert) in held for a in others):
                continue  # another replica survives: just drop this copy
            target = min(others, key=lambda a: (count[a], others.index(a)))
            count[target] += 1
            moved.append(Slot(target, s.layer, s.expert))
        return self.with_slots(kept + moved, others)

    def with_min_replicas(self, n: int, node_of: Mapping[str, str | None] | None = None) -> PlacementTable:
        """This table with every logical expert held by at least min(n, actors) actors: each missing copy (a
        *shadow*) goes to an actor not holding the expert, preferring a node that holds no copy yet (so a lost
        node leaves one), then the actor with the fewest slots of that layer, then of all layers, then the
        next actor after its first holder (a rotation, so a balanced table stays balanced). Version + 1 when anything was
        added; the same table otherwise."""
        if n < 1:
            raise ConfigError(f"min_replicas must be >= 1, got {n}")
        want = min(n, len(self.actors))
        node_of = node_of or {}
        count = {a: 0 for a in self.actors}
        in_layer = {(a, layer): 0 for a in self.actors for layer in range(self.num_layers)}
        for slot in self.slots:
            count[slot.actor] += 1
            in_layer[(slot.actor, slot.layer)] += 1
        added: list[Slot] = []
        n_actors = len(self.actors)
        for (layer, expert), idx in sorted(self._replica_map.items()):
            holders = {self.slots[i].actor for i in idx}
            first = self.actors.index(self.slots[idx[0]].actor)
            while len(holders) < want:
                nodes = {node_of.get(a) for a in holders}
                target = min((a for a in self.actors if a not in holders),
                             key=lambda a: (node_of.get(a) in nodes, in_layer[(a, layer)], count[a],
                                            (self.actors.index(a) - first) % n_actors))
                holders.add(target)
                count[target] += 1
                in_layer[(target, layer)] += 1
                added.append(Slot(target, layer, expert))
        return self.with_slots(self.slots + tuple(added)) if added else self

    def with_actor(self, actor: str) -> PlacementTable:
        """Version + 1 with a new, empty actor appended (its index is the old number of actors)."""
        if actor in self.actors:
            raise ConfigError(f"actor {actor!r} already in the table")
        return self.with_slots(self.slots, self.actors + (actor,))

    def bump(self, version: int) -> PlacementTable:
        """The same slots under `version` (the controller numbers each table it applies after its own)."""
        return PlacementTable(version, self.num_layers, self.num_experts, self.actors, self.slots)

    # --- serialisation ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/msgpack form (slots as [actor, layer, expert]), as actors and snapshots carry it."""
        return {"version": self.version, "num_layers": self.num_layers, "num_experts": self.num_experts,
                "actors": list(self.actors), "slots": [[s.actor, s.layer, s.expert] for s in self.slots]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PlacementTable:
        """The table `to_dict` wrote, validated as on construction; malformed input is a ConfigError."""
        try:
            return cls(int(d["version"]), int(d["num_layers"]), int(d["num_experts"]), tuple(d["actors"]),
                       tuple(Slot(str(a), int(layer), int(e)) for a, layer, e in d["slots"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"placement table: malformed ({exc!r})") from exc
