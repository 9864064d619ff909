"""The fault side of `expertray bench chaos`: the injector that plays a schedule, and the coverage monitor that
knows which experts have a live copy.

Each fault runs on a thread of its own when its time comes (so a slow placement change or a controller restart
does not delay the next fault: faults overlap as scheduled); a hang or slowdown is undone on that thread after
its hold. Targets are drawn from the live actors with a seeded generator. The injection helpers are those of
`expertray bench faults`.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import os
import queue
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any, TypeVar

import ray
import ray._private.state as gcs_state

from expertray.api import Cluster
from expertray.state.actor_names import ray_name
from expertray.state.placement_table import PlacementTable
from expertray.tools.bench.chaos_report import Uncovered
from expertray.tools.bench.chaos_schedule import FaultEvent
from expertray.tools.bench.faults import (
    corrupt_snapshot,
    kill_expert_actor,
    restart_controller,
    resume_process,
)

COVERAGE_INTERVAL_S = 0.25
QUERY_S = 2.0  # bound on the monitor's table query (a restarting controller answers later)
SLOWDOWN = 3.0
SLOTS_PER_NODE = 2
MAIN_CALL_S = 120.0  # bound on a node start run by the main thread
EXPERT_PREFIX = ray_name("expert-")
T = TypeVar("T")


def expert_processes() -> dict[str, dict[str, Any]]:
    """Live expert actors from Ray's GCS (no controller call): actor id -> {"pid", "node"}."""
    out = {}
    for a in gcs_state.actors(actor_state_name="ALIVE").values():
        if (a.get("Name") or "").startswith(EXPERT_PREFIX):
            out[a["Name"][len(ray_name("")):]] = {"pid": a["Pid"], "node": a["Address"]["NodeID"]}
    return out


class Coverage:
    """Which (layer, expert) pairs have no live copy, sampled every COVERAGE_INTERVAL_S from the placement
    table and the actors this bench took down (until the table drops them or they are resumed)."""

    def __init__(self, cluster: Cluster, t0: float) -> None:
        self.cluster, self.t0 = cluster, t0
        self.table: PlacementTable = cluster.table()
        self.down: set[str] = set()
        self.times: list[float] = []
        self.uncovered: list[Uncovered] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="chaos-coverage", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def mark_down(self, actors: list[str]) -> None:
        with self.lock:
            self.down.update(actors)
        self.sample(query=False)

    def mark_up(self, actor: str) -> None:
        with self.lock:
            self.down.discard(actor)

    def live_actors(self) -> list[str]:
        with self.lock:
            return sorted(a for a in self.table.actors if a not in self.down)

    def sample(self, query: bool = True) -> None:
        if query:
            try:
                got = ray.get(self.cluster.controller.get_table.remote(), timeout=QUERY_S)
                table = PlacementTable.from_dict(got)
            except Exception:  # noqa: BLE001 - a restarting controller: keep the last table
                table = None
        with self.lock:
            if query and table is not None:
                self.table = table
            self.down &= set(self.table.actors)  # replaced by the heal (or drained): no longer counted
            gone = {(s.layer, s.expert) for s in self.table.slots} - {
                (s.layer, s.expert) for s in self.table.slots if s.actor not in self.down}
            self.times.append(time.monotonic() - self.t0)
            self.uncovered.append(frozenset(gone))

    def _run(self) -> None:
        while not self.stop.wait(COVERAGE_INTERVAL_S):
            self.sample()

    def finish(self) -> tuple[list[float], list[Uncovered]]:
        self.stop.set()
        self.thread.join(timeout=QUERY_S + 1)
        with self.lock:
            return list(self.times), list(self.uncovered)


class Injector:
    """Plays `events` against the cluster (and, in multi-node mode, the ray.cluster_utils.Cluster `nodes`)."""

    def __init__(self, cluster: Cluster, events: list[FaultEvent], coverage: Coverage, t0: float, seed: int,
                 nodes: Any = None) -> None:
        self.cluster, self.events, self.coverage, self.t0, self.nodes = cluster, events, coverage, t0, nodes
        self.rng = random.Random(seed + 1)
        self.rng_lock = threading.Lock()
        self.log: list[dict[str, Any]] = []
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.stopped_pids: dict[int, str] = {}
        self._ips = itertools.count(100)
        self.main_calls: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="chaos-injector", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        for event in self.events:
            if self.stop.wait(max(0.0, self.t0 + event.at_s - time.monotonic())):
                return
            t = threading.Thread(target=self._play, args=(event,), name=f"chaos-{event.kind}", daemon=True)
            t.start()
            self.threads.append(t)

    def finish(self, timeout_s: float) -> None:
        """Stop starting faults, wait (bounded) for those running, and resume any process still stopped."""
        self.stop.set()
        self.thread.join(timeout=timeout_s)
        end = time.monotonic() + timeout_s
        for t in self.threads:
            t.join(timeout=max(0.0, end - time.monotonic()))
        for pid in list(self.stopped_pids):
            resume_process(pid)

    def _pick(self, choices: list[T]) -> T:
        if not choices:
            raise RuntimeError("no live target")
        with self.rng_lock:
            return self.rng.choice(choices)

    def _play(self, event: FaultEvent) -> None:
        entry: dict[str, Any] = {"at_s": round(time.monotonic() - self.t0, 2), "kind": event.kind,
                                 "scheduled_s": event.at_s}
        try:
            entry.update(getattr(self, f"_{event.kind}")(event))
            entry["ok"] = True
        except Exception as exc:  # noqa: BLE001 - recorded: a fault that could not be applied is not a request error
            entry.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:300])
        entry["took_s"] = round(time.monotonic() - self.t0 - entry["at_s"], 2)
        self.log.append(entry)

    def _hold(self, event: FaultEvent) -> None:
        self.stop.wait(event.hold_s)

    def _kill_expert(self, event: FaultEvent) -> dict[str, Any]:
        victim = self._pick(self.coverage.live_actors())
        self.coverage.mark_down([victim])
        kill_expert_actor(victim)
        return {"target": victim}

    def _hang_expert(self, event: FaultEvent) -> dict[str, Any]:
        victim = self._pick(self.coverage.live_actors())
        pid = expert_processes()[victim]["pid"]
        self.coverage.mark_down([victim])
        os.kill(pid, signal.SIGSTOP)
        self.stopped_pids[pid] = victim
        self._hold(event)
        resumed = resume_process(pid)
        self.stopped_pids.pop(pid, None)
        self.coverage.mark_up(victim)
        return {"target": victim, "pid": pid, "resumed": resumed}

    def _slow_expert(self, event: FaultEvent) -> dict[str, Any]:
        victim = self._pick(self.coverage.live_actors())
        ray.get(self.cluster.controller.set_actor_slowdown.remote(victim, SLOWDOWN), timeout=QUERY_S * 5)
        self._hold(event)
        try:
            ray.get(self.cluster.controller.set_actor_slowdown.remote(victim, 1.0), timeout=QUERY_S * 5)
        except Exception as exc:  # noqa: BLE001 - the actor may have been killed or drained meanwhile
            return {"target": victim, "undo": f"{type(exc).__name__}"}
        return {"target": victim}

    def _kill_router(self, event: FaultEvent) -> dict[str, Any]:
        routers = ray.get(self.cluster.controller.get_routers.remote(), timeout=QUERY_S * 5)
        if len(routers) < 2:
            raise RuntimeError(f"{len(routers)} router(s) in service: not killing the last one")
        victim = self._pick(list(range(len(routers))))
        ray.kill(routers[victim], no_restart=True)
        return {"target": f"router #{victim} of {len(routers)}"}

    def _kill_controller(self, event: FaultEvent) -> dict[str, Any]:
        ray.kill(self.cluster.controller, no_restart=False)
        return {"target": "controller"}

    def _corrupt_snapshot(self, event: FaultEvent) -> dict[str, Any]:
        path = corrupt_snapshot(self.cluster)
        info = restart_controller(self.cluster)
        return {"target": Path(path).name, "restored": bool(info), "degraded": bool(info.get("degraded"))}

    def _add_actor(self, event: FaultEvent) -> dict[str, Any]:
        return {"target": self.cluster.add_actor()}

    def _drain_actor(self, event: FaultEvent) -> dict[str, Any]:
        victim = self._pick(self.coverage.live_actors())
        self.cluster.drain(victim)
        return {"target": victim}

    def _rebalance(self, event: FaultEvent) -> dict[str, Any]:
        event_info = self.cluster.rebalance()
        return {"moved": len(event_info.get("added", []))}

    def _remove_node(self, event: FaultEvent) -> dict[str, Any]:
        procs = expert_processes()
        live = [n for n in self.nodes.worker_nodes if any(p["node"] == n.node_id for p in procs.values())]
        node = self._pick(live)
        doomed = sorted(a for a, p in procs.items() if p["node"] == node.node_id)
        self.coverage.mark_down(doomed)
        self.nodes.remove_node(node, allow_graceful=False)
        return {"target": node.node_id[:8], "actors": doomed}

    def _add_node(self, event: FaultEvent) -> dict[str, Any]:
        done: concurrent.futures.Future = concurrent.futures.Future()
        self.main_calls.put((lambda: self.nodes.add_node(num_cpus=1, resources={"expert_slot": SLOTS_PER_NODE},
                                                         node_ip_address=f"127.0.0.{next(self._ips)}"), done))
        return {"target": done.result(timeout=MAIN_CALL_S).node_id[:8]}

    def serve_main_calls(self, timeout_s: float) -> None:
        """Run the calls that must happen on the main thread (starting a raylet installs signal handlers),
        waiting up to `timeout_s` for one."""
        try:
            call, done = self.main_calls.get(timeout=timeout_s)
        except queue.Empty:
            return
        try:
            done.set_result(call())
        except Exception as exc:  # noqa: BLE001 - handed to the fault's thread, which records it
            done.set_exception(exc)
