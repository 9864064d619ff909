"""The controller's liveness loop, Ray-free: rounds of pings, suspects pushed to routers, repairs in the
background with back-off.

Every `interval_s` every expert actor of the table is pinged at once (the probe bounds each ping by the short
liveness timeout); `Liveness` (expertray/runtime/liveness.py) decides. Suspects go to every router at once,
so they mask those actors and retry the batch waiting on them on the survivors. A repair (heal dead actors,
else replace routers that do not answer, checked every ROUTER_CHECK_S) runs as a task of its own, so pings
and pushes go on while it loads weights; a failed repair doubles the wait before the next one, up to
BACKOFF_MAX_S. Replaces dead or hung actors and routers even when no request notices. Suspects that hold the
only copies of some experts get a stand-in at once (a copy of those experts on live actors), so a hung sole
copy is served again after a weight load, not after `dead_after_s` of silence plus a heal.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Protocol

from expertray.runtime.changes import PlacementControl
from expertray.runtime.liveness import Liveness, Reply, Verdict
from expertray.runtime.node_choice import ActorNodes

log = logging.getLogger(__name__)

ROUTER_CHECK_S = 2.0  # routers are pinged (and dead ones replaced) this often
STAND_IN_AFTER_S = 1.0  # a suspect silent this long gets a stand-in (a loaded host delays pings by less, mostly)
BACKOFF_MAX_S = 30.0


class Probe(Protocol):
    """The cluster as the liveness loop reaches it; every call bounded by the liveness timeout."""

    def has(self, actor: str) -> bool:
        """Whether the controller still holds the actor (the heal has not killed it)."""

    async def ping(self, actor: str) -> Reply: ...

    async def push(self, suspects: list[str], recovered: list[str]) -> tuple[int, list[str]]:
        """Tell every router; returns (how many routers were told or tried, ids of those that failed)."""


class LivenessLoop:
    """One per controller, over its PlacementControl; `known_dead` feeds heals reported by routers."""

    def __init__(self, control: PlacementControl, probe: Probe, nodes: ActorNodes, dead_after_s: float,
                 interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.control = control
        self.probe = probe
        self.nodes = nodes
        self.liveness = Liveness(dead_after_s)
        self.interval_s = interval_s
        self.clock = clock
        self.known_dead: frozenset[str] = frozenset()  # actors the latest round found dead
        self.logged: tuple = ()  # the last push logged
        self.repair_task: asyncio.Task | None = None
        self.repair_wait_s = ROUTER_CHECK_S  # doubles while repairs fail (up to BACKOFF_MAX_S)
        self.repair_after = 0.0  # clock time before which no repair starts (backing off)
        self.stood_in: frozenset[str] = frozenset()  # suspects whose stranded experts a stand-in now holds

    async def run(self) -> None:
        """Rounds forever; a repair when an actor is dead, and every ROUTER_CHECK_S for the routers."""
        next_router_check = self.clock() + ROUTER_CHECK_S
        while True:
            started = self.clock()
            try:
                verdict = await self.round()
                if (verdict.dead or started >= next_router_check) and self.start_repair(verdict.dead):
                    next_router_check = started + ROUTER_CHECK_S
                elif not verdict.dead:
                    self.start_stand_in(frozenset(verdict.suspects))
            except Exception:  # noqa: BLE001 - one bad round must not end liveness checking
                log.warning("liveness round failed", exc_info=True)
            await asyncio.sleep(max(0.0, self.interval_s - (self.clock() - started)))

    async def round(self) -> Verdict:
        """Ping every actor of the table at once; push the verdict's suspects to every router."""
        ids = list(self.control.table.actors)
        sent = self.clock()
        replies = dict(zip(ids, await asyncio.gather(*[self.probe.ping(a) for a in ids])))
        verdict = self.liveness.observe(replies, sent, self.clock())
        self.known_dead = verdict.dead
        self.nodes.liveness_replies(replies, sent, {a for a in ids if self.probe.has(a)})
        if verdict.push:
            await self._push(verdict)
        return verdict

    async def _push(self, verdict: Verdict) -> None:
        suspects, recovered = sorted(verdict.suspects), sorted(verdict.recovered)
        told, failed = await self.probe.push(suspects, recovered)
        seen = (verdict.suspects, verdict.recovered, verdict.dead, tuple(failed))
        if seen != self.logged:  # pushed every round while an actor is silent: logged when it changes
            self.logged = seen
            log.log(logging.WARNING if suspects else logging.INFO, "liveness: suspects %s, recovered %s, dead %s; "
                    "pushed to %d router(s)%s", suspects, recovered, sorted(verdict.dead),
                    told - len(failed), f", not to {failed}" if failed else "")

    def _may_start(self) -> bool:
        """No repair or stand-in runs, no placement change (or router's heal) holds the lock, and repairs are
        not backing off."""
        return ((self.repair_task is None or self.repair_task.done()) and not self.control.lock.locked()
                and self.clock() >= self.repair_after)

    def _back_off(self, what: str) -> None:
        """After a failed repair or stand-in: double the wait before the next one (up to BACKOFF_MAX_S)."""
        self.repair_wait_s = min(2 * self.repair_wait_s, BACKOFF_MAX_S)
        self.repair_after = self.clock() + self.repair_wait_s
        log.warning("liveness %s failed; next try in %.0f s", what, self.repair_wait_s, exc_info=True)

    def start_repair(self, dead: frozenset[str]) -> bool:
        """Start a background repair unless `_may_start` says no; True when one started."""
        if not self._may_start():
            return False
        self.repair_task = asyncio.get_running_loop().create_task(self.repair(dead))
        return True

    def start_stand_in(self, suspects: frozenset[str]) -> bool:
        """When suspects (silent, one of them for STAND_IN_AFTER_S, not yet dead) hold the only copies of some
        experts, start a background stand-in (PlacementControl.stand_in) unless a repair runs or the lock is
        held; once per suspect set."""
        self.stood_in &= suspects  # forget those that recovered or were healed
        new = suspects - self.stood_in
        now, since = self.clock(), self.liveness.silent_since  # first unanswered ping of each silence
        if not any(now - since.get(a, now) >= STAND_IN_AFTER_S for a in new):
            return False  # silent too briefly: a busy host, not yet a hung actor
        if not self.control.table.stranded(suspects) or not self._may_start():
            return False
        self.stood_in = suspects
        self.repair_task = asyncio.get_running_loop().create_task(self.stand_in(suspects))
        return True

    async def stand_in(self, suspects: frozenset[str]) -> None:
        try:
            async with self.control.lock:
                event = await self.control.stand_in(suspects)
            if event is not None:
                log.warning("liveness: %s", event["reason"])
        except Exception:  # noqa: BLE001 - the heal at ping_timeout_s still comes; back off like a repair
            self.stood_in = frozenset()
            self._back_off("stand-in")

    async def repair(self, dead: frozenset[str]) -> None:
        """Heal `dead` actors (not pinged again), else replace routers that do not answer; back off on failure."""
        try:
            async with self.control.lock:
                if dead & set(self.control.table.actors):
                    await self.control.heal("liveness check", known_dead=dead)
                elif routers := await self.control.heal_routers():
                    log.info("liveness: replaced routers %s", routers)
            self.repair_wait_s = ROUTER_CHECK_S
        except Exception:  # noqa: BLE001 - retried later; nothing created for the failed repair is left
            self._back_off("repair")

    def stop(self) -> None:
        if self.repair_task is not None:
            self.repair_task.cancel()
