"""Controller: a thin Ray shell over the placement state machine (expertray/runtime/changes.py).

It creates expert actors and routers, implements the control logic's ActorPool / RouterPool with actor
handles (every call bounded: `ping_timeout_s` for pings and stats, `control_timeout_s` for loads and table
switches), persists its snapshot (table + typed state) in a per-cluster state directory, and runs the
metrics, liveness and autoscale loops.

Liveness (expertray/runtime/liveness.py decides): every `liveness_interval_s` every expert actor is pinged
at once, each ping bounded by `liveness_timeout_s`; actors that do not answer are pushed to every router at
once (`RouterActor.suspect`: masked, the batch waiting on them dropped and retried on the survivors), and a
repair (heal dead actors, replace dead routers) runs in the background so that pings and pushes go on while
it loads weights. Dead: reported dead by Ray, or silent for `ping_timeout_s`.

Weights (expertray/runtime/weights.py): a checkpoint cluster (`cfg.model`) is started with the checkpoint's
descriptor only; the controller never holds a routed expert: actors read their slots from the shards,
routers their gates and shared experts, and the snapshot records the descriptor. A random-weight cluster
is started with its layers, which the controller keeps as its weight store (safetensors, next to the
snapshot).

Restart: the constructor takes only the config, so Ray can re-run it; `start(...)` hands over the
weights (or descriptor) once. A restarted controller reloads the snapshot (and weight store) from the state
directory and re-attaches to its detached routers and actors. A bad snapshot is reported loudly (log + `status()`'s
`controller.snapshot_error`) and the state is rebuilt from what is running: routers found by name tell the
table they serve, actors are found by name, so serving and healing go on.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import re
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from ray.exceptions import ActorDiedError

from expertray.actors import pools
from expertray.actors.expert import ExpertActor
from expertray.actors.pools import RayActorPool, RayRouterPool, bounded, default_state_dir
from expertray.actors.router import LayerParams, RouterActor
from expertray.config import ClusterConfig
from expertray.errors import ConfigError, ExpertRayError
from expertray.layer.reference import MoELayer
from expertray.metrics import Metrics, MetricsConfig
from expertray.policies.autoscale import resource_request_settled
from expertray.runtime.changes import PlacementControl
from expertray.runtime.liveness import Liveness, Reply, Verdict
from expertray.runtime.snapshot import ControllerState, SnapshotError, load_controller_snapshot, save_snapshot
from expertray.runtime.weights import load_weights, save_weights, serving_dtype
from expertray.state.actor_names import CONTROLLER, NAMESPACE, expert_actor_id, ray_name, router_id
from expertray.state.placement_table import PlacementTable

log = logging.getLogger(__name__)

ROUTER_CHECK_S = 2.0  # the liveness loop pings routers (ping_timeout_s) and replaces dead ones this often
LIVENESS_BACKOFF_MAX_S = 30.0
SUSPECT_NODE_S = 60.0  # a node where an actor stopped answering gets no new actor for this long (if others can)


def _request_resources(bundles: list[dict[str, float]], what: str) -> bool:
    """Send `bundles` as the cluster's standing request_resources ([]: withdraw it); advisory, so a failure is
    logged as `what` failed and False returned. Without an autoscaler the request does nothing."""
    try:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=bundles)
    except Exception as exc:  # noqa: BLE001 - the request is a hint to the autoscaler, never required
        log.warning("%s failed: %s", what, exc)
        return False
    return True


@ray.remote
class Controller:
    def __init__(self, cfg: ClusterConfig, detached: bool = False) -> None:
        self.cfg = cfg
        self.detached = detached  # detached children outlive a controller restart and keep serving
        self.state_dir = Path(cfg.state_dir) if cfg.state_dir else default_state_dir()
        self.snapshot_path = Path(cfg.snapshot_path) if cfg.snapshot_path else self.state_dir / "snapshot.msgpack"
        self.weights_path = self.state_dir / "weights.safetensors"
        self.dtype = serving_dtype(cfg)
        self.checkpoint: dict[str, Any] = {}  # the served checkpoint's descriptor (checkpoint clusters)
        self.layers: list[MoELayer] | None = None  # random-weight clusters' weight store
        self.handles: dict[str, Any] = {}  # expert actor id -> handle
        self.actor_nodes: dict[str, str | None] = {}  # expert actor id -> Ray node id (chosen, then observed)
        self.suspect_nodes: dict[str, float] = {}  # node id -> when an actor there stopped answering
        self.silent_nodes: dict[str, float] = {}  # node id -> when an actor there last missed a liveness ping
        self.routers: dict[str, Any] = {}  # router id -> handle, in order
        self.next_actor = 0
        self.next_router = 0
        self.control: PlacementControl | None = None
        self.transport: str | None = None
        self.restored = False
        self.snapshot_error: str | None = None
        self.weights_error: str | None = None
        self.metrics = Metrics(MetricsConfig(per_expert_top_n=cfg.metrics_top_n))
        self.metrics_port: int | None = None
        self.background: list[asyncio.Task] = []
        self.autoscaler: Any = None
        self.autoscale_task: asyncio.Task | None = None
        self.autoscale_log: list[dict[str, Any]] = []
        self.resource_request: dict[str, Any] | None = None  # the last request_resources sent (bundles, why, t)
        self.request_asked_with: frozenset[str] = frozenset()  # the table's actors when it was sent
        self.liveness = Liveness(cfg.ping_timeout_s)
        self.known_dead: frozenset[str] = frozenset()  # actors the latest liveness round found dead
        self.liveness_logged: tuple = ()  # the last push logged
        self.repair_task: asyncio.Task | None = None
        self.repair_wait_s = ROUTER_CHECK_S  # doubles while repairs fail (up to LIVENESS_BACKOFF_MAX_S)
        self.repair_after = 0.0  # monotonic time before which no repair starts (backing off)
        self.restored_autoscaler: dict[str, Any] = {}  # {"on", "policy", "state"} from the snapshot
        with warnings.catch_warnings():  # Ray 2.60 warns about its own internal use of a deprecated property
            warnings.simplefilter("ignore", DeprecationWarning)
            restarted = ray.get_runtime_context().was_current_actor_reconstructed
        if restarted:
            self._restore()

    @property
    def table(self) -> PlacementTable:
        if self.control is None:
            raise ExpertRayError("the controller has not started a cluster yet")
        return self.control.table

    # --- persistence ---------------------------------------------------------------------------------
    def _changed(self, event: dict[str, Any] | None = None) -> None:
        """After every placement change (and the first table): persist, and withdraw a resource request the
        change met or made moot."""
        self._save()
        standing = self.resource_request is not None and "withdrawn" not in self.resource_request
        if standing and resource_request_settled(self.request_asked_with, self.control.table.actors):
            self._withdraw_resource_request()

    def _withdraw_resource_request(self) -> None:
        """Replace the standing request_resources by an empty one."""
        if _request_resources([], "withdrawing request_resources"):
            assert self.resource_request is not None
            self.resource_request["withdrawn"] = time.time()
            log.info("request_resources withdrawn (%d actors in the table)", len(self.control.table.actors))

    def _save(self, event: dict[str, Any] | None = None) -> None:
        if self.control is None:
            return
        autoscaler: dict[str, Any] = {"on": self.autoscale_task is not None}
        if self.autoscaler is not None:
            autoscaler.update(policy=self.cfg.autoscale_policy, state=self.autoscaler.export_state(time.monotonic()))
        state = ControllerState(self.next_actor, tuple(self.routers), self.next_router, self.transport,
                                tuple(self.control.history[-200:]), autoscaler, self.checkpoint)
        try:
            save_snapshot(self.snapshot_path, self.control.table, state)
        except OSError as exc:  # serving goes on; a restart would then find an older snapshot
            self.snapshot_error = f"saving {self.snapshot_path} failed: {exc}"
            log.error("controller: %s", self.snapshot_error)

    def _restore(self) -> None:
        """After a restart: snapshot (or, if it is bad, what is running), the checkpoint it names or the weight
        store, re-attach, resume."""
        self.restored = True
        if not self.cfg.model:
            try:
                self.layers = load_weights(self.weights_path, self.cfg.layer, self.cfg.num_layers)
            except SnapshotError as exc:
                self.weights_error = str(exc)
                log.error("controller restart: weight store unusable: %s (experts with no live replica cannot be "
                          "restored)", exc)
        try:
            table, state = load_controller_snapshot(self.snapshot_path)
            self.routers = {r: self._lookup(ray_name(r)) for r in state.routers}
            history = list(state.history)
            self.next_actor, self.next_router, self.transport = state.next_actor, state.next_router, state.transport
            self.restored_autoscaler = state.autoscaler
            self.checkpoint = state.checkpoint
        except SnapshotError as exc:
            self.snapshot_error = str(exc)
            log.error("controller restart: SNAPSHOT UNUSABLE (%s); rebuilding state from the running routers "
                      "and actors", exc)
            table, history = self._discover(), []
        if self.cfg.model:
            self._restore_checkpoint()
        self.handles = {a: h for a in table.actors if (h := self._lookup(ray_name(a))) is not None}
        self._locate()  # which node each re-attached actor runs on (new actors are placed by it)
        self.control = PlacementControl(table, RayActorPool(self), RayRouterPool(self), self._changed)
        self.control.history = history
        self._start_background()
        log.info("controller restored placement v%d (%d routers)", table.version, len(self.routers))

    def _restore_checkpoint(self) -> None:
        """The checkpoint to re-read experts from after a restart: the snapshot's descriptor, checked against
        the shards (a changed checkpoint is reported, not served); without one, the configured path described
        afresh (its digests can then not be compared with what the actors loaded)."""
        from expertray.errors import CheckpointError
        from expertray.models.files import CheckpointDescriptor, describe

        try:
            if self.checkpoint:
                CheckpointDescriptor.from_dict(self.checkpoint).verify()
            else:
                log.error("controller restart: no checkpoint descriptor in the snapshot; describing %s again",
                          self.cfg.model)
                self.checkpoint = describe(self.cfg.model).to_dict()
        except CheckpointError as exc:
            self.weights_error = str(exc)
            self.checkpoint = {}
            log.error("controller restart: checkpoint unusable: %s (experts with no live replica cannot be "
                      "restored)", exc)

    @staticmethod
    def _lookup(name: str) -> Any:
        try:
            return ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            return None

    def _discover(self) -> PlacementTable:
        """Rebuild the table and id counters from the running routers and actors (named in the namespace)."""
        names = ray.util.list_named_actors()
        numbers = {kind: [int(m.group(1)) for n in names if (m := re.fullmatch(rf"{ray_name(kind)}-(\d+)", n))]
                   for kind in ("router", "expert")}
        self.routers = {router_id(i): self._lookup(ray_name(router_id(i))) for i in sorted(numbers["router"])}
        tables = []
        for r, h in self.routers.items():
            try:
                tables.append(PlacementTable.from_dict(ray.get(h.get_table.remote(),
                                                               timeout=self.cfg.ping_timeout_s)))
                self.transport = self.transport or ray.get(h.stats.remote(), timeout=self.cfg.ping_timeout_s
                                                           )["transport"]
            except Exception as exc:  # noqa: BLE001 - that router is healed later
                log.warning("controller restart: router %s did not answer: %s", r, exc)
        if not tables:
            raise SnapshotError(f"{self.snapshot_error}; and no running router could tell its table: "
                                f"relaunch the cluster")
        self.next_router = max(numbers["router"], default=-1) + 1
        self.next_actor = max(numbers["expert"], default=-1) + 1
        return max(tables, key=lambda t: t.version)

    def _child_options(self, name: str, num_cpus: float, num_gpus: float = 0.0) -> dict[str, Any]:
        opts: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": num_gpus, "name": name, "namespace": NAMESPACE}
        if self.detached:
            opts["lifetime"] = "detached"
        return opts

    # --- start-up ------------------------------------------------------------------------------------
    def _actor_demand(self) -> dict[str, float]:
        """Resources one expert actor asks for: its CPU/GPU shares and `actor_resources` (e.g. expert_slot)."""
        c = self.cfg
        return {k: v for k, v in {"CPU": c.actor_num_cpus, "GPU": c.actor_num_gpus, **c.actor_resources}.items()
                if v > 0}

    def _node_suspect(self, actor: str, failed: bool) -> None:
        """An actor's ping failed (its node may be gone: Ray lists a killed node as alive for ~15 s, until its
        health checks fail) or succeeded (its node works)."""
        node = self.actor_nodes.get(actor)
        if node is not None and failed:
            self.suspect_nodes.setdefault(node, time.monotonic())
        elif node is not None:
            self.suspect_nodes.pop(node, None)

    def _node_choice(self) -> tuple[str | None, dict[str, Any]]:
        """The node for the next expert actor (expertray/state/ray_nodes.py): most room for `_actor_demand`, fewest of
        our actors, avoiding nodes where an actor just stopped answering (SUSPECT_NODE_S) while another node
        has room; ({} options: no node has room, Ray queues it until one joins). Nodes where an actor missed
        its latest liveness ping (a node just lost: Ray still lists it, with its slots free) are used only
        when no other node has room at all, even one that is merely suspect."""
        now = time.monotonic()
        self.suspect_nodes = {n: t for n, t in self.suspect_nodes.items() if now - t < SUSPECT_NODE_S}
        self.silent_nodes = {n: t for n, t in self.silent_nodes.items() if now - t < SUSPECT_NODE_S}
        demand = self._actor_demand()
        used: dict[str, dict[str, float]] = {}
        actors_on: dict[str, int] = {}
        for a in self.handles:
            node = self.actor_nodes.get(a)
            if node is not None:
                actors_on[node] = actors_on.get(node, 0) + 1
                for k, v in demand.items():
                    used.setdefault(node, {})[k] = used.get(node, {}).get(k, 0.0) + v
        try:
            nodes = pools.live_nodes()
            quiet = [n for n in nodes if n.node_id not in self.silent_nodes]
            choice = pools.node_affinity(demand, quiet, used, actors_on, set(self.suspect_nodes))
            return choice if choice[0] is not None else pools.node_affinity(demand, nodes, used, actors_on,
                                                                             set(self.suspect_nodes))
        except ExpertRayError as exc:  # no node list: let Ray place it
            log.warning("expert actor placement: %s; leaving the node to Ray", exc)
            return None, {}

    def _new_actor(self) -> str:
        actor_id = expert_actor_id(self.next_actor)
        self.next_actor += 1
        c = self.cfg
        node, placement = self._node_choice()
        if node is None:
            self._ask_for_room(f"no node has room for {actor_id}")
        self.handles[actor_id] = ExpertActor.options(
            **self._child_options(ray_name(actor_id), c.actor_num_cpus, c.actor_num_gpus),
            resources=dict(c.actor_resources), **placement).remote(
            actor_id, max(1, math.floor(c.actor_num_cpus)), self.dtype, c.layer)
        self.actor_nodes[actor_id] = node
        return actor_id

    def _ask_for_room(self, why: str) -> list[dict[str, float]]:
        """Ask the cluster's autoscaler for room for one more expert actor than those that are keeping their
        place (actors on a node suspected gone are left out): `request_resources` with one bundle of
        `_actor_demand` per actor. The request is a floor on the cluster's size, not an addition to what runs,
        and it bypasses the autoscaler's upscaling speed; it stands until the next one. Without an autoscaler
        it does nothing. Advisory: a failure to send it is logged, and the actor still waits for a node."""
        keeping = sum(self.actor_nodes.get(a) not in self.suspect_nodes for a in self.handles)
        bundles = [self._actor_demand()] * (keeping + 1)
        if not _request_resources(bundles, f"request_resources ({len(bundles)} bundles of {bundles[0]})"):
            return []
        self.resource_request = {"bundles": len(bundles), "bundle": bundles[0], "why": why, "t": time.time()}
        self.request_asked_with = frozenset(self.control.table.actors) if self.control is not None else frozenset()
        log.info("request_resources: %d bundles of %s (%s)", len(bundles), bundles[0], why)
        return bundles

    def _locate(self) -> dict[str, dict[str, str] | None]:
        """Where each expert actor and router runs, as the GCS says (None: not placed yet); refreshes
        `actor_nodes` with what Ray actually did."""
        where = {a: pools.actor_location(h) for a, h in list(self.handles.items()) + list(self.routers.items())
                 if h is not None}
        for a in self.handles:
            if where.get(a) is not None:
                self.actor_nodes[a] = where[a]["node_id"]
        return where

    async def _start_router(self, table: PlacementTable) -> tuple[str, Any]:
        """Create a router serving `table` and start it (transport open, batching); killed if it fails."""
        if self.checkpoint:  # the router reads its gates and shared experts from the checkpoint itself
            params: list[LayerParams] | dict[str, Any] = self.checkpoint
        elif self.layers is not None:
            params = [LayerParams(m.gate_weights, m.shared) for m in self.layers]
        else:
            raise ExpertRayError(f"cannot start a router: the weights are unavailable ({self.weights_error})")
        new_id = router_id(self.next_router)
        self.next_router += 1
        options = self._child_options(ray_name(new_id), self.cfg.router_num_cpus, self.cfg.router_num_gpus)
        handle = RouterActor.options(**options).remote(new_id, self.cfg, params, table.to_dict(), self.handles,
                                                       max(1, math.floor(self.cfg.router_num_cpus)))
        try:
            transport = await bounded(handle.start.remote(ray.get_actor(CONTROLLER, namespace=NAMESPACE)),
                                       self.cfg.control_timeout_s, f"starting {new_id}")
        except BaseException:
            ray.kill(handle, no_restart=True)
            raise
        self.transport = self.transport or transport
        return new_id, handle

    async def start(self, layers: list[MoELayer] | None = None, checkpoint: dict[str, Any] | None = None
                    ) -> dict[str, Any]:
        """Start the expert actors and routers and begin serving: from `layers` (a random-weight cluster,
        persisted as the weight store) or, for `cfg.model`, from `checkpoint` (its descriptor: every actor
        reads its own slots, every router its gates)."""
        if bool(self.cfg.model) != (checkpoint is not None) or (layers is None) == (checkpoint is None):
            raise ConfigError("start: give the checkpoint descriptor for a config with cluster.model, else the "
                              "layers' weights (exactly one of the two)")
        if layers is not None and len(layers) != self.cfg.num_layers:
            raise ConfigError(f"cluster.num_layers={self.cfg.num_layers} but {len(layers)} layers of weights given")
        self.layers, self.checkpoint = layers, checkpoint or {}
        try:
            return await self._start()
        except BaseException:
            await self.shutdown()  # nothing half-started is left running
            raise

    async def _start(self) -> dict[str, Any]:
        if self.layers is not None:
            await asyncio.to_thread(save_weights, self.weights_path, self.layers)
        ids = [self._new_actor() for _ in range(self.cfg.num_expert_actors)]
        table = PlacementTable.balanced(self.cfg.num_layers, self.cfg.layer.num_experts, ids)
        pool = RayActorPool(self)
        await asyncio.gather(*[pool.load(a, [(s.layer, s.expert) for s in table.slots_of(a)], None) for a in ids])
        for _ in range(self.cfg.num_routers):
            new_id, handle = await self._start_router(table)
            self.routers[new_id] = handle
        self.control = PlacementControl(table, RayActorPool(self), RayRouterPool(self), self._changed)
        self._changed()
        self._start_background()
        log.info("expertray: %d expert actors, %d routers, transport %s", len(ids), len(self.routers),
                 self.transport)
        return {"actors": ids, "routers": len(self.routers), "transport": self.transport}

    # --- background loops ------------------------------------------------------------------------------
    def _start_background(self) -> None:
        if self.cfg.metrics_port >= 0:
            try:
                self.metrics_port = self.metrics.serve(self.cfg.metrics_port)
            except OSError as exc:  # serving must not depend on a free metrics port
                log.warning("metrics endpoint on 127.0.0.1:%d not started: %s", self.cfg.metrics_port, exc)
        loop = asyncio.get_event_loop()
        self.background.append(loop.create_task(self._metrics_loop()))
        self.background.append(loop.create_task(self._liveness_loop()))
        if self.cfg.autoscale or self.restored_autoscaler.get("on"):
            self._set_autoscale(True)

    async def _metrics_loop(self, interval_s: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.collect_metrics()
            except Exception:  # noqa: BLE001 - a failed scrape must not stop the loop
                log.warning("metrics collection failed", exc_info=True)

    async def _liveness_loop(self) -> None:
        """Every liveness_interval_s: a liveness round (pings, suspects pushed to routers); a repair when an
        actor is dead, and every ROUTER_CHECK_S for the routers, in the background (see the module docstring).
        Replaces dead or hung actors and routers even when no request notices."""
        next_router_check = time.monotonic() + ROUTER_CHECK_S
        while True:
            started = time.monotonic()
            try:
                verdict = await self._liveness_round()
                if (verdict.dead or started >= next_router_check) and self._start_repair(verdict.dead):
                    next_router_check = started + ROUTER_CHECK_S
            except Exception:  # noqa: BLE001 - one bad round must not end liveness checking
                log.warning("liveness round failed", exc_info=True)
            await asyncio.sleep(max(0.0, self.cfg.liveness_interval_s - (time.monotonic() - started)))

    async def _liveness_ping(self, actor: str) -> Reply:
        """One expert actor's liveness ping, bounded by liveness_timeout_s (it answers on a thread of its own)."""
        handle = self.handles.get(actor)
        if handle is None:
            return Reply.DIED
        try:
            await asyncio.wait_for(handle.ping.remote(), self.cfg.liveness_timeout_s)
            return Reply.ANSWERED
        except ActorDiedError:
            return Reply.DIED
        except Exception:  # noqa: BLE001 - no answer in time, or unreachable for now (a lost node): silent
            return Reply.SILENT

    async def _liveness_round(self) -> Verdict:
        """Ping every actor of the table at once; push the verdict's suspects to every router."""
        ids = list(self.table.actors)
        sent = time.monotonic()
        replies = dict(zip(ids, await asyncio.gather(*[self._liveness_ping(a) for a in ids])))
        verdict = self.liveness.observe(replies, sent, time.monotonic())
        self.known_dead = verdict.dead
        # a silent actor marks its node suspect (a lost node looks like this), silent ones last; one that
        # answers, or that Ray reports dead while we still hold it (killed or crashed: its node answered for it),
        # clears it; one the heal already killed (no handle) tells nothing about its node
        for a in sorted(ids, key=lambda a: replies[a] is Reply.SILENT):
            if replies[a] is Reply.SILENT or replies[a] is Reply.ANSWERED or a in self.handles:
                self._node_suspect(a, replies[a] is Reply.SILENT)
            node = self.actor_nodes.get(a)
            if node is not None and replies[a] is Reply.SILENT:
                self.silent_nodes[node] = sent
            elif node is not None and replies[a] is Reply.ANSWERED:
                self.silent_nodes.pop(node, None)
        if verdict.push:
            await self._push_suspects(verdict)
        return verdict

    async def _push_suspects(self, verdict: Verdict) -> None:
        """Tell every router which actors stopped answering (and which answer again), all at once; each call
        bounded by liveness_timeout_s (a late one is still delivered; a router that misses one gets the next)."""
        suspects, recovered = sorted(verdict.suspects), sorted(verdict.recovered)
        routers = [(r, h) for r, h in self.routers.items() if h is not None]
        replies = await asyncio.gather(*[bounded(h.suspect.remote(suspects, recovered), self.cfg.liveness_timeout_s,
                                                 f"{r}.suspect") for r, h in routers], return_exceptions=True)
        failed = [r for (r, _), x in zip(routers, replies) if isinstance(x, BaseException)]
        seen = (verdict.suspects, verdict.recovered, verdict.dead, tuple(failed))
        if seen != self.liveness_logged:  # pushed every round while an actor is silent: logged when it changes
            self.liveness_logged = seen
            log.log(logging.WARNING if suspects else logging.INFO, "liveness: suspects %s, recovered %s, dead %s; "
                    "pushed to %d router(s)%s", suspects, recovered, sorted(verdict.dead),
                    len(routers) - len(failed), f", not to {failed}" if failed else "")

    def _start_repair(self, dead: frozenset[str]) -> bool:
        """Start a background repair unless one runs, a placement change (or a router's heal) holds the lock,
        or repairs are backing off; True when one started."""
        if ((self.repair_task is not None and not self.repair_task.done()) or self.control.lock.locked()
                or time.monotonic() < self.repair_after):
            return False
        self.repair_task = asyncio.get_running_loop().create_task(self._repair(dead))
        return True

    async def _repair(self, dead: frozenset[str]) -> None:
        """Heal `dead` actors (not pinged again) and replace routers that do not answer; back off on failure."""
        try:
            async with self.control.lock:
                if dead & set(self.table.actors):
                    await self.control.heal("liveness check", known_dead=dead)
                elif routers := await self.control.heal_routers():
                    log.info("liveness: replaced routers %s", routers)
            self.repair_wait_s = ROUTER_CHECK_S
        except Exception:  # noqa: BLE001 - retried later; nothing created for the failed repair is left
            self.repair_wait_s = min(2 * self.repair_wait_s, LIVENESS_BACKOFF_MAX_S)
            self.repair_after = time.monotonic() + self.repair_wait_s
            log.warning("liveness repair failed; next try in %.0f s", self.repair_wait_s, exc_info=True)

    async def _router_calls(self, method: str) -> tuple[list[tuple[str, Any]], list[dict[str, Any]]]:
        """Call `method` on every router (ping_timeout_s each): (id, reply) of those that answered, and
        {"router", "error"} for those that did not."""
        ids = list(self.routers)
        replies = await asyncio.gather(*[bounded(getattr(self.routers[r], method).remote(),
                                                  self.cfg.ping_timeout_s, f"{r}.{method}") for r in ids],
                                       return_exceptions=True)
        ok = [(r, x) for r, x in zip(ids, replies) if not isinstance(x, BaseException)]
        down = [{"router": r, "alive": False, "error": str(x).splitlines()[0] if str(x) else type(x).__name__}
                for r, x in zip(ids, replies) if isinstance(x, BaseException)]
        return ok, down

    async def _actor_stats(self) -> dict[str, dict[str, Any]]:
        ids = list(self.table.actors)

        async def one(a: str) -> Any:
            handle = self.handles.get(a)
            if handle is None:
                raise ExpertRayError(f"{a} is not running")
            return await bounded(handle.stats.remote(), self.cfg.ping_timeout_s, f"{a}.stats")

        replies = await asyncio.gather(*[one(a) for a in ids], return_exceptions=True)
        return {a: {"alive": False, "error": str(r).splitlines()[0]} if isinstance(r, BaseException)
                else {"alive": True, **r} for a, r in zip(ids, replies)}

    async def collect_metrics(self) -> None:
        """Drain every answering router's buffered observations into the Prometheus registry."""
        drained, _ = await self._router_calls("drain_observations")
        m = self.metrics
        for router, obs in drained:
            for layer, counts, dropped, bal, dispatch_s, combine_s in obs["batches"]:
                m.observe_batch(layer, counts, dropped, bal, dispatch_s, combine_s)
            for actor, seconds in obs["actors"]:
                m.observe_actor(actor, seconds)
            for layer, seconds, outcome in obs["requests"]:
                m.observe_request(layer, seconds, outcome)
            m.set_queue_depth(router, obs["queued_tokens"])
        for layer in range(self.table.num_layers):
            m.set_replicas(layer, self.table.replica_counts(layer))

    def metrics_text(self) -> bytes:
        return self.metrics.render()

    # --- autoscaling -----------------------------------------------------------------------------------
    def _set_autoscale(self, on: bool) -> None:
        from expertray.policies.autoscale import AUTOSCALE

        if on and self.autoscale_task is None:
            self.autoscaler = AUTOSCALE.create(self.cfg.autoscale_policy, **self.cfg.autoscale_params)
            saved = self.restored_autoscaler
            if saved.get("policy") == self.cfg.autoscale_policy and isinstance(saved.get("state"), dict):
                try:  # streaks and cooldowns carry over a restart: no early or repeated action
                    self.autoscaler.restore_state(saved["state"], time.monotonic())
                except ExpertRayError as exc:
                    log.error("autoscaler state in the snapshot not used: %s", exc)
            self.autoscale_task = asyncio.get_event_loop().create_task(self._autoscale_loop())
        elif not on and self.autoscale_task is not None:
            self.autoscale_task.cancel()
            self.autoscale_task = None

    async def autoscale(self, on: bool | None = None) -> dict[str, Any]:
        """Turn the autoscaler on/off (None: leave as is); returns its state and recent decisions."""
        if on is not None:
            self._set_autoscale(on)
            self._save()  # on/off survives a controller restart
        return {"on": self.autoscale_task is not None, "policy": self.cfg.autoscale_policy,
                "interval_s": self.cfg.autoscale_interval_s, "recent_actions": self.autoscale_log[-20:]}

    async def _autoscale_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.autoscale_interval_s)
            try:
                await self.autoscale_step()
            except Exception:  # noqa: BLE001 - one bad step must not end autoscaling
                log.warning("autoscale step failed", exc_info=True)

    async def signals(self) -> Any:
        """What the autoscale policy sees: window load per logical expert, the current tokens/s (windowed,
        summed over routers), per-actor speed and memory (actors that do not answer are left out)."""
        from expertray.policies.autoscale import Signals

        routers, _ = await self._router_calls("stats")
        actors = {a: s for a, s in (await self._actor_stats()).items() if s["alive"]}
        load = np.zeros((self.table.num_layers, self.table.num_experts))
        for _, r in routers:
            for layer in r["layers"]:
                load[layer["layer"]] += np.asarray(layer["expert_load"])
        budget = self.cfg.actor_memory_budget_bytes
        # speed per 1k rows, not per call: an actor holding hot experts is busy, not slow
        speed = {a: s["ms_per_krow_p50"] for a, s in actors.items() if s["ms_per_krow_p50"] > 0}
        return Signals(load=load, tokens_per_s=sum(r["tokens_per_s"] for _, r in routers),
                       free_capacity=await self._free_capacity(),
                       latency_p50_ms=speed, latency_p99_ms={a: s["compute_ms_p99"] for a, s in actors.items()},
                       memory_used_bytes={a: s["memory_bytes"] for a, s in actors.items()},
                       memory_budget_bytes={a: budget for a in self.table.actors} if budget else {},
                       expert_bytes=self._expert_bytes())

    async def _free_capacity(self) -> int:
        """How many more expert actors may start now: the room under `max_expert_actors`, or 0 when no live
        node has room for another actor's demand (the policy then asks for resources, not for an actor)."""
        room = max(0, self.cfg.max_expert_actors - len(self.table.actors))
        if room and (await asyncio.to_thread(self._node_choice))[0] is None:
            return 0
        return room

    def _expert_bytes(self) -> int:
        """Bytes of one expert slot as actors hold it (checkpoint: from the shard headers only)."""
        if self.checkpoint:
            from expertray.models.source import cached_source

            return cached_source(self.checkpoint, self.dtype).slot_bytes(1)
        c = self.cfg.layer
        per = 3 * c.d_model * c.d_ff + (2 * c.d_ff + c.d_model if c.expert_bias else 0)
        return per * torch.empty(0, dtype=getattr(torch, self.dtype)).element_size()

    def _held_expert_bytes(self) -> int:
        """Routed-expert bytes this controller holds (its weight store; 0 for a checkpoint cluster)."""
        return sum(m.experts.nbytes + (m.biases.nbytes if m.biases is not None else 0) for m in self.layers or [])

    async def autoscale_step(self) -> list[dict[str, Any]]:
        """One decision round: observe, decide (pure policy), apply each action as a table change."""
        actions = self.autoscaler.decide(await self.signals(), self.table, time.monotonic())
        done = []
        for a in actions:
            entry = {"kind": a.kind, "layer": a.layer, "expert": a.expert, "src": a.src, "dst": a.dst,
                     "reason": a.reason, "t": time.time()}
            try:
                await self._execute(a)
                entry["ok"] = True
            except Exception as exc:  # noqa: BLE001 - logged with the decision; the next round re-decides
                entry["ok"] = False
                entry["error"] = str(exc)
            self.metrics.count_action(a.kind)
            self.autoscale_log.append(entry)
            done.append(entry)
            log.info("autoscale %s: %s", a.kind, a.reason)
        return done

    async def _execute(self, a: Any) -> None:
        async with self.control.lock:
            if a.kind == "add_actor":
                await self._add_actor(f"autoscale: {a.reason}")
            elif a.kind == "request_resources":
                if len(self.table.actors) >= self.cfg.max_expert_actors:
                    raise ExpertRayError(f"request_resources not sent: {len(self.table.actors)} expert actors is "
                                         f"max_expert_actors ({self.cfg.max_expert_actors}); raise it to grow")
                if not self._ask_for_room(f"autoscale: {a.reason}"):
                    raise ExpertRayError("request_resources failed (see the controller log)")
            else:
                await self.control.apply(a.apply(self.table), f"autoscale: {a.reason}")

    # --- queries -------------------------------------------------------------------------------------
    def _health(self) -> dict[str, Any]:
        return {"restored": self.restored, "snapshot_error": self.snapshot_error,
                "weights_error": self.weights_error, "degraded": bool(self.snapshot_error or self.weights_error),
                "state_dir": str(self.state_dir), "weights": "checkpoint" if self.checkpoint else "weight_store",
                "checkpoint": self.checkpoint.get("path"), "dtype": self.dtype,
                "expert_bytes_held": self._held_expert_bytes()}

    def info(self) -> dict[str, Any]:
        return {**self._health(), "version": self.table.version, "detached": self.detached, "pid": os.getpid(),
                "metrics_port": self.metrics_port, "resource_request": self.resource_request}

    def get_table(self) -> dict[str, Any]:
        return self.table.to_dict()

    def get_routers(self) -> list[Any]:
        """Handles of the routers in service (replaced ones are swapped in as they start)."""
        return list(self.routers.values())

    def get_config(self) -> ClusterConfig:
        return self.cfg

    async def status(self) -> dict[str, Any]:
        """Table, per-actor and per-router stats; never raises because a piece is dead or hung: a dead or
        hung actor shows as {"alive": False} (being healed), a router that does not answer is listed in
        `routers_down`. `requests` sums every router's outcomes (rejected: refused before queueing)."""
        actor_stats = await self._actor_stats()
        answered, down = await self._router_calls("stats")
        routers = [r for _, r in answered]
        totals = {k: sum(r.get(k, 0) for r in routers) for k in ("requests", "errors", "rejected", "timeouts",
                                                                 "retries")}
        where = await asyncio.to_thread(self._locate)
        for a, stats in actor_stats.items():
            stats["node"] = where.get(a)
        for r, stats in answered:
            stats["node"] = where.get(r)
        return {"table": self.table.to_dict(), "transport": self.transport, "actors": actor_stats,
                "routers": routers, "routers_down": down, "requests": totals, "controller": self._health(),
                "liveness": {"suspects": sorted(self.liveness.pushed), "dead": sorted(self.known_dead)},
                "nodes": await asyncio.to_thread(self._nodes), "history": self.control.history[-50:]}

    def _nodes(self) -> list[dict[str, Any]]:
        """Ray's live nodes with the expert actors and routers on each (`expertray status` shows them)."""
        try:
            nodes = pools.live_nodes()
        except ExpertRayError as exc:
            return [{"error": str(exc)}]
        where = {a: self.actor_nodes.get(a) for a in self.handles}
        return [{"node_id": n.node_id, "ip": n.ip, "head": n.is_head, "resources": dict(n.resources),
                 "labels": dict(n.labels), "actors": sorted(a for a, node in where.items() if node == n.node_id)}
                for n in nodes]

    # --- placement changes ---------------------------------------------------------------------------
    async def apply_table(self, new: PlacementTable, reason: str = "") -> dict[str, Any]:
        async with self.control.lock:
            return await self.control.apply(new, reason)

    async def heal(self, reporter: str = "") -> dict[str, Any]:
        """Replace dead or hung expert actors and dead routers, and make routers re-form their transports;
        called by a router whose batch failed in transport (actors the liveness loop found dead are not
        pinged again)."""
        async with self.control.lock:
            return await self.control.heal(reporter, known_dead=self.known_dead)

    async def replicate(self, layer: int, expert: int, actor: str | None = None) -> dict[str, Any]:
        async with self.control.lock:
            self.table.check_expert(layer, expert)
            if actor is None:
                held = {s.actor for s in self.table.replicas(layer, expert)}
                free = [a for a in self.table.actors if a not in held]
                if not free:
                    raise ConfigError(f"every actor already holds expert {layer}:{expert}")
                held_nodes = {self.actor_nodes.get(a) for a in held}  # replicas prefer a node without one
                actor = min(free, key=lambda a: (self.actor_nodes.get(a) in held_nodes,
                                                 len(self.table.slots_of(a))))
            return await self.control.apply(self.table.replicate(layer, expert, actor),
                                            f"replicate {layer}:{expert}")

    async def migrate(self, layer: int, expert: int, dst: str, src: str | None = None) -> dict[str, Any]:
        async with self.control.lock:
            src = src or self.table.replicas(layer, expert)[0].actor
            return await self.control.apply(self.table.migrate(layer, expert, src, dst),
                                            f"migrate {layer}:{expert} {src} -> {dst}")

    async def drain(self, actor: str) -> dict[str, Any]:
        async with self.control.lock:
            return await self.control.apply(self.table.drain(actor), f"drain {actor}")

    async def rebalance(self, policy: str = "balanced", slots_per_actor: int = 0) -> dict[str, Any]:
        """Re-plan the whole placement from the window load with a placement policy (replica counts and
        packing, keeping slots in place where it costs no balance) and apply it between batches."""
        from expertray.policies.placement import PLACEMENT
        from expertray.state.ray_nodes import topology_from_nodes

        signals = await self.signals()
        async with self.control.lock:
            actors = list(self.table.actors)
            per_layer = math.ceil(self.table.num_experts / len(actors))
            topo = topology_from_nodes(self.actor_nodes, actors, slots_per_actor or per_layer + 1)
            plan = PLACEMENT.create(policy).plan(signals.load, topo, self.table, signals.expert_bytes)
            event = await self.control.apply(plan.table, f"rebalance ({policy}): balancedness "
                                             f"{plan.balancedness_before.mean:.3f} -> "
                                             f"{plan.balancedness_after.mean:.3f}")
            return {**event, "balancedness_before": plan.balancedness_before.mean,
                    "balancedness_after": plan.balancedness_after.mean, "bytes_moved": plan.bytes_moved}

    async def set_actor_slowdown(self, actor: str, factor: float) -> None:
        """Fault injection (tests, benchmarks): make one expert actor a `factor`x straggler."""
        self.table.check_actor(actor)
        await bounded(self.handles[actor].set_slowdown.remote(factor), self.cfg.control_timeout_s,
                       f"{actor}.set_slowdown")

    async def add_actor(self) -> str:
        """Start a new (empty) expert actor and add it to the table; policies then move slots onto it."""
        async with self.control.lock:
            return await self._add_actor("add actor")

    async def _add_actor(self, reason: str) -> str:
        """Start an empty expert actor, wait until it answers, and put it in the table (lock held)."""
        actor_id = self._new_actor()
        waited_for_room = self.actor_nodes.get(actor_id) is None
        try:
            await bounded(self.handles[actor_id].ping.remote(), self.cfg.control_timeout_s, f"starting {actor_id}")
        except TimeoutError as exc:
            RayActorPool(self).kill(actor_id)
            if waited_for_room:
                raise ExpertRayError(
                    f"{actor_id} did not start within control_timeout_s={self.cfg.control_timeout_s:g} s: no node "
                    f"had room for {self._actor_demand()} and none joined; asked the autoscaler (request_resources: "
                    f"{(self.resource_request or {}).get('bundles')} bundles), which stands: add the actor again "
                    f"once a node has joined") from exc
            raise
        except BaseException:
            RayActorPool(self).kill(actor_id)
            raise
        await self.control.apply(self.table.with_actor(actor_id), f"{reason}: {actor_id}", created=(actor_id,))
        return actor_id

    async def shutdown(self) -> None:
        """Stop loops, routers and actors; remove the state files this cluster wrote."""
        if self.autoscale_task is not None:
            self._set_autoscale(False)
        for task in [*self.background, self.repair_task]:
            if task is not None:
                task.cancel()
        self.metrics.stop()
        for h in list(self.routers.values()) + list(self.handles.values()):
            if h is not None:
                ray.kill(h, no_restart=True)
        self.routers, self.handles = {}, {}
        for path in (self.weights_path, None if self.cfg.snapshot_path else self.snapshot_path):
            if path is not None:
                path.unlink(missing_ok=True)

