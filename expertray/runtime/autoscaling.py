"""The controller's autoscale loop, Ray-free: observe, decide (a pure policy from policies/autoscale.py),
apply each action as a table change, and keep a log of the decisions.

The policy's streaks and cooldowns carry over a controller restart (`state()` goes into the snapshot,
`saved` comes back from it), so a restart causes no early or repeated action. `signals_from` turns what
routers and actors report into the policy's Signals; the rebalance command uses it too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import numpy as np

from expertray.errors import ExpertRayError
from expertray.runtime.changes import PlacementControl
from expertray.runtime.periodic import every
from expertray.seams import AutoscalePolicy
from expertray.state.decisions import Action, Signals
from expertray.state.placement_table import PlacementTable

log = logging.getLogger(__name__)


class Cluster(Protocol):
    """The cluster as the autoscale loop observes and grows it (the Controller, through thin adapters)."""

    @property
    def control(self) -> PlacementControl: ...

    async def signals(self) -> Signals: ...

    async def add_actor(self, reason: str) -> str:
        """Start an empty expert actor and put it in the table (the caller holds the control's lock)."""

    def ask_for_room(self, why: str) -> bool:
        """Ask the cluster's autoscaler for room for one more expert actor; False when that failed."""

    def count_action(self, kind: str) -> None: ...


class Autoscaler:
    """The autoscale policy `name` (built by `create(name, **params)` when turned on: the policies' registry)
    and the loop that runs it every `interval_s`; an action that would grow past `max_expert_actors` fails with
    a message saying so."""

    def __init__(self, name: str, params: Mapping[str, Any], interval_s: float, max_expert_actors: int,
                 cluster: Cluster, create: Callable[..., AutoscalePolicy],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.create = create
        self.params = dict(params)
        self.interval_s = interval_s
        self.max_expert_actors = max_expert_actors
        self.cluster = cluster
        self.clock = clock
        self.policy: AutoscalePolicy | None = None
        self.task: asyncio.Task | None = None
        self.log: list[dict[str, Any]] = []
        self.saved: dict[str, Any] = {}  # {"on", "policy", "state"} from the snapshot of a restarted controller

    @property
    def on(self) -> bool:
        return self.task is not None

    def turn(self, on: bool) -> None:
        """Start (a fresh policy, given the saved streaks and cooldowns when they are this policy's) or stop
        the loop; turning it on twice keeps the running one."""
        if on and self.task is None:
            self.policy = self.create(self.name, **self.params)
            saved = self.saved
            if saved.get("policy") == self.name and isinstance(saved.get("state"), dict):
                try:
                    self.policy.restore_state(saved["state"], self.clock())
                except ExpertRayError as exc:
                    log.error("autoscaler state in the snapshot not used: %s", exc)
            self.task = asyncio.get_event_loop().create_task(every(self.interval_s, self.step, "autoscale step"))
        elif not on and self.task is not None:
            self.task.cancel()
            self.task = None

    def state(self) -> dict[str, Any]:
        """What the snapshot records: on/off, and the policy's state once it was built."""
        state: dict[str, Any] = {"on": self.on}
        if self.policy is not None:
            state.update(policy=self.name, state=self.policy.export_state(self.clock()))
        return state

    def report(self) -> dict[str, Any]:
        return {"on": self.on, "policy": self.name, "interval_s": self.interval_s, "recent_actions": self.log[-20:]}

    async def step(self) -> list[dict[str, Any]]:
        """One decision round: observe, decide, apply each action; every action is logged with its outcome (a
        failed one is re-decided next round)."""
        if self.policy is None:
            raise ExpertRayError(f"autoscale step: the {self.name!r} autoscaler was never turned on")
        actions = self.policy.decide(await self.cluster.signals(), self.cluster.control.table, self.clock())
        done = []
        for a in actions:
            entry = {"kind": a.kind, "layer": a.layer, "expert": a.expert, "src": a.src, "dst": a.dst,
                     "reason": a.reason, "t": time.time()}
            try:
                await self.execute(a)
                entry["ok"] = True
            except Exception as exc:  # noqa: BLE001 - logged with the decision; the next round re-decides
                entry["ok"] = False
                entry["error"] = str(exc)
            self.cluster.count_action(a.kind)
            self.log.append(entry)
            done.append(entry)
            log.info("autoscale %s: %s", a.kind, a.reason)
        return done

    async def execute(self, a: Action) -> None:
        control = self.cluster.control
        async with control.lock:
            if a.kind == "add_actor":
                await self.cluster.add_actor(f"autoscale: {a.reason}")
            elif a.kind == "request_resources":
                if len(control.table.actors) >= self.max_expert_actors:
                    raise ExpertRayError(f"request_resources not sent: {len(control.table.actors)} expert actors "
                                         f"is max_expert_actors ({self.max_expert_actors}); raise it to grow")
                if not self.cluster.ask_for_room(f"autoscale: {a.reason}"):
                    raise ExpertRayError("request_resources failed (see the controller log)")
            else:
                await control.apply(a.apply(control.table), f"autoscale: {a.reason}")


def signals_from(routers: list[Mapping[str, Any]], actors: Mapping[str, Mapping[str, Any]], table: PlacementTable,
                 free_capacity: int, memory_budget_bytes: int, expert_bytes: int, min_replicas: int = 1) -> Signals:
    """The policy's Signals from router stats (per layer `expert_load` [E], `tokens_per_s`) and the stats of
    the actors that answered: load [L, E] summed over routers, tokens/s summed, per-actor speed (ms per 1k
    rows, not per call: an actor holding hot experts is busy, not slow; actors without samples left out),
    p99 compute and memory; every actor of the table gets the budget (0: no budget)."""
    load = np.zeros((table.num_layers, table.num_experts))
    for r in routers:
        for layer in r["layers"]:
            load[layer["layer"]] += np.asarray(layer["expert_load"])
    speed = {a: s["ms_per_krow_p50"] for a, s in actors.items() if s["ms_per_krow_p50"] > 0}
    return Signals(load=load, tokens_per_s=sum(r["tokens_per_s"] for r in routers), free_capacity=free_capacity,
                   latency_p50_ms=speed, latency_p99_ms={a: s["compute_ms_p99"] for a, s in actors.items()},
                   memory_used_bytes={a: s["memory_bytes"] for a, s in actors.items()},
                   memory_budget_bytes={a: memory_budget_bytes for a in table.actors} if memory_budget_bytes else {},
                   expert_bytes=expert_bytes, min_replicas=min_replicas)
