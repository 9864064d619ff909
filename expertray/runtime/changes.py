"""The controller's state machine, Ray-free: placement changes in three steps and healing, over two small
interfaces (an expert-actor pool and a router pool) that the Ray Controller implements with actor handles
and per-call deadlines, and that unit tests implement with fakes.

A change (`apply`): (1) every new slot gets its weights (from a live actor holding the expert, else the
weight store), (2) every router switches to the new table between two batches, (3) only then are slots
that left the table unloaded and actors that left it killed. Routers switch concurrently (each forms its new
transport while still serving, expertray/runtime/switch.py), so a change stalls the stream once, not once per
router. If step 1 or 2 fails, the change is undone: every live router is switched back to the old table
(whose slots are all still loaded; one that refused or passed its deadline too, since its switch may still
land late and a router runs switches in arrival order), slots loaded for the change are unloaded, actors
created for it are killed, and the error is raised; the table version is unchanged, so routers and
controller never disagree. A router that is dead (does not answer a ping) during
a switch is replaced by a new one serving the new table instead of failing the change.

Healing (`heal`): actors that do not answer a ping within the pool's deadline are dead *or hung*; both are
killed at once (which also fails any batch stuck on them, so routers requeue it), replaced by new actors
loaded from live replicas or the weight store, and every router switches to the new table (re-forming its
transport). Dead routers are replaced (`heal_routers`). Nothing created for a failed heal is left running.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from expertray.errors import ConfigError, ExpertRayError, NoChangeError
from expertray.state.placement_table import ExpertKey, PlacementTable, Slot

log = logging.getLogger(__name__)



class ActorPool(Protocol):
    """Expert actors as the control logic sees them; every async call is bounded by the pool's deadline."""

    def has(self, actor: str) -> bool: ...

    def create(self) -> str:
        """Start a new, empty expert actor; returns its id (not yet in any table)."""

    async def ping(self, actor: str) -> bool:
        """True when the actor answers within its ping deadline (False: dead or hung)."""

    async def load(self, actor: str, keys: list[ExpertKey], source: str | None) -> None:
        """Give `actor` the weights of `keys`: exported by the live actor `source`, or from the weight store."""

    async def unload(self, actor: str, keys: list[ExpertKey]) -> None: ...

    def kill(self, actor: str) -> None:
        """Stop the actor now and forget it (a hung one included)."""


class RouterPool(Protocol):
    """Routers as the control logic sees them; every async call is bounded by the pool's deadline."""

    def ids(self) -> list[str]: ...

    async def ping(self, router: str) -> bool: ...

    async def set_table(self, router: str, table: PlacementTable, reopen: bool) -> int:
        """Switch `router` to `table` between batches (re-forming its transport if `reopen`); returns the
        version it now serves."""

    async def replace(self, router: str, table: PlacementTable) -> str:
        """Kill `router` and start a new router serving `table` in its place; returns the new id."""


class PlacementControl:
    """The versioned table and the logic that changes it; `lock` serialises changes (callers hold it)."""

    def __init__(self, table: PlacementTable, actors: ActorPool, routers: RouterPool,
                 on_change: Callable[[dict[str, Any]], None] = lambda event: None, min_replicas: int = 1,
                 node_of: Callable[[], Mapping[str, str | None]] = dict) -> None:
        self.table = table
        self.actors = actors
        self.routers = routers
        self.on_change = on_change
        self.min_replicas = min_replicas  # every table applied holds each expert this often (shadows added)
        self.node_of = node_of  # actor -> node now, so shadows go to another node where one exists
        self.lock = asyncio.Lock()
        self.history: list[dict[str, Any]] = []

    # --- the three-step change ---------------------------------------------------------------------------
    async def apply(self, new: PlacementTable, reason: str, dead: frozenset[str] = frozenset(),
                    created: tuple[str, ...] = (), silent: frozenset[str] = frozenset()) -> dict[str, Any]:
        """Apply `new` (its version becomes the current one + 1); the caller holds `lock`.

        dead: actors being replaced (not used as weight sources, not asked to unload, routers re-form their
        transports). created: actors started for this change, killed if it fails. silent: actors that stopped
        answering but are not declared dead yet (not used as weight sources). A table that leaves an
        expert with fewer than `min_replicas` copies (a drain, a rebalance, a replaced node) gets its shadows
        back first (PlacementTable.with_min_replicas)."""
        old = self.table
        new = new.with_min_replicas(self.min_replicas, self.node_of()).bump(old.version + 1)
        try:
            for a in new.actors:
                if not self.actors.has(a):
                    raise ConfigError(f"placement names actor {a!r} that the controller has not created")
            if new.actors == old.actors and new.slots == old.slots and not dead:
                raise NoChangeError(f"{reason or 'change'}: the placement would stay as it is "
                                    f"(v{old.version}); nothing applied")
            added = sorted(set(new.slots) - set(old.slots))
            removed = sorted(set(old.slots) - set(new.slots))
            await self._load(added, old, dead | silent)
            try:
                await self._switch(new, old, reopen=bool(dead))
            except BaseException:
                await self._unload_quietly(added)
                raise
        except BaseException:
            for a in created:
                self.actors.kill(a)
            raise
        self.table = new
        await self._unload_quietly([s for s in removed if s.actor in new.actors and s.actor not in dead])
        for a in old.actors:
            if a not in new.actors:
                self.actors.kill(a)
        event = {"version": new.version, "reason": reason, "t": time.time(),
                 "added": [[s.actor, s.layer, s.expert] for s in added],
                 "removed": [[s.actor, s.layer, s.expert] for s in removed]}
        self.history.append(event)
        self.on_change(event)
        log.info("placement v%d: +%d slots, -%d slots (%s)", new.version, len(added), len(removed), reason)
        return event

    async def _load(self, slots: list[Slot], source: PlacementTable, dead: frozenset[str]) -> None:
        """Step 1: weights for every new slot, one call per (destination, source) pair, all at once."""
        groups: dict[tuple[str, str | None], list[ExpertKey]] = {}
        for s in slots:
            holders = [h.actor for h in source.replicas(s.layer, s.expert) if h.actor not in dead]
            groups.setdefault((s.actor, holders[0] if holders else None), []).append((s.layer, s.expert))
        await asyncio.gather(*[self.actors.load(dst, keys, src) for (dst, src), keys in groups.items()])

    async def _switch(self, new: PlacementTable, old: PlacementTable, reopen: bool) -> None:
        """Step 2: every router serves `new`, or (on failure) every router serves `old` again."""
        ids = self.routers.ids()
        replies = await asyncio.gather(*[self.routers.set_table(r, new, reopen) for r in ids],
                                       return_exceptions=True)
        failed = [(r, x) for r, x in zip(ids, replies) if isinstance(x, BaseException) or x != new.version]
        if not failed:
            return
        alive = await asyncio.gather(*[self.routers.ping(r) for r, _ in failed])
        refused = [(r, x) for (r, x), ok in zip(failed, alive) if ok]
        if not refused:  # only dead routers: replace them, serving the new table
            for r, x in failed:
                log.warning("router %s did not take table v%d (%s): replacing it", r, new.version, x)
                await self.routers.replace(r, new)
            return
        switched = [r for r, x in zip(ids, replies) if x == new.version]
        # Routers that refused are told too (no re-forming unless their actor set differs): one whose switch
        # passed our deadline may still land on `new` later, and a router runs its switches in arrival order
        # (expertray/runtime/switch.py), so this one lands after it and the router ends on `old`.
        back_to = [(r, True) for r in switched] + [(r, False) for r, _ in refused]
        back = await asyncio.gather(*[self.routers.set_table(r, old, reopen) for r, reopen in back_to],
                                    return_exceptions=True)
        stuck = [r for (r, _), x in zip(back_to, back) if isinstance(x, BaseException)]
        for r in stuck:  # a router that can take neither table is replaced with the old one
            await self.routers.replace(r, old)
        raise ExpertRayError(f"routers {[r for r, _ in refused]} refused table v{new.version} "
                             f"({refused[0][1]!r}); the change was rolled back, v{old.version} stays in use")

    async def _unload_quietly(self, slots: list[Slot]) -> None:
        """Step 3 (and undoing step 1): a failed unload leaves spare weights, never a wrong answer."""
        by_actor: dict[str, list[ExpertKey]] = {}
        for s in slots:
            by_actor.setdefault(s.actor, []).append((s.layer, s.expert))
        replies = await asyncio.gather(*[self.actors.unload(a, keys) for a, keys in by_actor.items()],
                                       return_exceptions=True)
        for a, x in zip(by_actor, replies):
            if isinstance(x, BaseException):
                log.warning("unloading slots from %s failed: %r", a, x)

    # --- healing ---------------------------------------------------------------------------------------
    async def dead_actors(self, skip: frozenset[str] = frozenset()) -> set[str]:
        """Actors in the table (but not in `skip`) that do not answer a ping in time (dead or hung)."""
        ids = [a for a in self.table.actors if a not in skip]
        return {a for a, ok in zip(ids, await asyncio.gather(*[self.actors.ping(a) for a in ids])) if not ok}

    async def heal(self, reporter: str = "", known_dead: frozenset[str] = frozenset(),
                   silent: frozenset[str] = frozenset()) -> dict[str, Any]:
        """Replace dead or hung expert actors and dead routers; the caller holds `lock`.

        known_dead: actors the caller already found dead (the liveness loop): not pinged again, so a heal is
        never held up by pings to a lost node. With every actor alive (a broken collective), the reporting
        router (every router when the reporter is not a router) re-forms its transport on the same table;
        the version does not change. silent: suspects not yet dead (the liveness loop's): not pinged here (the
        loop declares them dead in its time); when they hold the only copies of some experts, those get a
        stand-in now, so the reporter is served without waiting for the silent actors' deadline."""
        routers = await self.heal_routers()
        known = frozenset(a for a in known_dead if a in self.table.actors)
        silent = frozenset(a for a in silent if a in self.table.actors) - known
        dead = set(known) | await self.dead_actors(skip=known | silent)
        if not dead and silent:
            # the liveness loop heals the silent actors at their deadline; re-forming the reporter's transport now
            # would clear its mask of them. Their sole copies, if any, get a stand-in.
            event = await self.stand_in(silent) if self.table.stranded(silent) else None
            return {"replaced": {}, "stand_in": event["reason"] if event else None, "routers_replaced": routers,
                    "version": self.table.version}
        if not dead:
            targets = [reporter] if reporter in self.routers.ids() else self.routers.ids()
            await asyncio.gather(*[self.routers.set_table(r, self.table, True) for r in targets])
            return {"replaced": {}, "routers_replaced": routers, "version": self.table.version}
        for a in dead:  # kill first: a hung actor would otherwise hold routers' batches until their deadline
            self.actors.kill(a)
        replaced = {a: self.actors.create() for a in sorted(dead)}
        actors = tuple(replaced.get(a, a) for a in self.table.actors)
        slots = tuple(Slot(replaced.get(s.actor, s.actor), s.layer, s.expert) for s in self.table.slots)
        new = PlacementTable(self.table.version, self.table.num_layers, self.table.num_experts, actors, slots)
        event = await self.apply(new, f"heal: replaced {replaced} (reported by {reporter})", frozenset(dead),
                                 tuple(replaced.values()))
        return {"replaced": replaced, "routers_replaced": routers, "version": event["version"]}

    async def stand_in(self, silent: frozenset[str]) -> dict[str, Any] | None:
        """A copy of every expert whose every copy is on `silent` actors (suspects the liveness loop has not
        declared dead yet) on the live actor with the fewest slots of its layer (on another node than the silent
        ones when there is one), loaded from the weight store or the checkpoint. Routers already avoid the
        silent actors, so those experts are served again as soon as it lands (a load, no process start), long
        before the silent actors could be declared dead and healed; if they recover, the extra copies stay as
        replicas. The caller holds `lock`. None when no expert is stranded or no live actor can take one."""
        live = [a for a in self.table.actors if a not in silent]
        node_of = self.node_of()
        at_risk = {node_of.get(a) for a in silent} - {None}  # a silent node's other actors may be next
        live = [a for a in live if node_of.get(a) not in at_risk] or live
        stranded = self.table.stranded(silent)
        if not stranded or not live:
            return None
        in_layer = {(a, layer): 0 for a in live for layer in range(self.table.num_layers)}
        for slot in self.table.slots:
            if slot.actor in live:
                in_layer[(slot.actor, slot.layer)] += 1
        new = self.table
        for layer, expert in stranded:
            target = min(live, key=lambda a: (in_layer[(a, layer)], live.index(a)))
            in_layer[(target, layer)] += 1
            new = new.replicate(layer, expert, target)
        return await self.apply(new, f"stand-in for silent {', '.join(sorted(silent))}: {len(stranded)} "
                                     f"expert(s) held only there copied to live actors", silent=silent)

    async def heal_routers(self) -> dict[str, str]:
        """Replace every router that does not answer a ping; returns {old id: new id}. A replacement that fails
        to start is logged and left to the next heal, so the expert actors' repair still runs (a router cannot
        start over a table naming an actor that died while the controller was down until that actor is
        replaced)."""
        ids = self.routers.ids()
        alive = await asyncio.gather(*[self.routers.ping(r) for r in ids])
        replaced = {}
        for r, ok in zip(ids, alive):
            if not ok:
                try:
                    replaced[r] = await self.routers.replace(r, self.table)
                except Exception as exc:  # noqa: BLE001 - retried by the next heal; logged with its cause
                    log.warning("router %s did not answer and its replacement failed to start: %s", r, exc)
                    continue
                log.warning("router %s did not answer; replaced by %s", r, replaced[r])
        if replaced:
            event = {"version": self.table.version, "reason": f"heal: replaced routers {replaced}", "t": time.time(),
                     "added": [], "removed": []}
            self.history.append(event)
            self.on_change(event)
        return replaced
