"""Controller: the Ray actor that holds the cluster's handles, serves its commands and runs its lifecycle.

The logic lives Ray-free in expertray/runtime/: placement changes and heals (changes.py), the liveness loop
and its repairs (liveness_loop.py), the autoscale loop (autoscaling.py), node choice (node_choice.py), the
autoscaler request (resource_request.py) and restart (restore.py). This actor creates the expert actors and
routers and hands those classes thin adapters over the handles (actors/pools.py, every call bounded), and
persists its snapshot (table + typed state) in a per-cluster state directory.

Weights (expertray/runtime/weights.py): a checkpoint cluster (`cfg.model`) is started with the checkpoint's
descriptor only; the controller never holds a routed expert: actors read their slots from the shards,
routers their gates and shared experts, and the snapshot records the descriptor. A random-weight cluster
is started with its layers, which the controller keeps as its weight store (safetensors, next to the
snapshot).

Restart: the constructor takes only the config, so Ray can re-run it; `start(...)` hands over the weights
(or descriptor) once. A restarted controller resumes from the snapshot (or, if it is bad, from what is
running) and re-attaches to its detached routers and actors, so serving and healing go on.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any

import ray

from expertray.actors import pools
from expertray.actors.expert import ExpertActor
from expertray.actors.pools import RayActorPool, RayRouterPool, bounded, default_state_dir
from expertray.actors.router import LayerParams, RouterActor
from expertray.config import ClusterConfig
from expertray.errors import ConfigError, ExpertRayError, ExpertUnavailableError
from expertray.layer.reference import MoELayer
from expertray.metrics import Metrics, MetricsConfig
from expertray.policies.autoscale import AUTOSCALE, Signals
from expertray.runtime import restore
from expertray.runtime.autoscaling import Autoscaler, signals_from
from expertray.runtime.changes import PlacementControl
from expertray.runtime.liveness_loop import LivenessLoop
from expertray.runtime.node_choice import ActorNodes, actor_demand
from expertray.runtime.periodic import every
from expertray.runtime.resource_request import ResourceRequests
from expertray.runtime.snapshot import ControllerState, save_snapshot
from expertray.runtime.weights import held_bytes, save_weights, serving_dtype, slot_bytes
from expertray.state.actor_names import CONTROLLER, NAMESPACE, expert_actor_id, ray_name, router_id
from expertray.state.placement_table import PlacementTable

log = logging.getLogger(__name__)

METRICS_INTERVAL_S = 1.0
ENGINE_STALE_S = 10.0  # an engine replica not heard from for this long is left out of status


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
        self.starting: set[str] = set()  # expert actors created here whose process has not answered yet
        self.endpoints: dict[str, dict[str, Any]] = {}  # expert actor id -> its channel endpoint (direct clients)
        self.engines: dict[str, tuple[float, dict[str, Any]]] = {}  # engine replica -> (reported at, its stats)
        self.routers: dict[str, Any] = {}  # router id -> handle, in order
        self.next_actor = 0
        self.next_router = 0
        self.control: PlacementControl | None = None
        self.watch: LivenessLoop | None = None
        self.actor_pool, self.router_pool = RayActorPool(self), RayRouterPool(self)
        self.nodes = ActorNodes()
        self.demand = actor_demand(cfg)  # what one expert actor asks of a node
        self.requests = ResourceRequests(pools.request_resources)
        self.autoscaler = Autoscaler(cfg.autoscale_policy, cfg.autoscale_params, cfg.autoscale_interval_s,
                                     cfg.max_expert_actors, pools.RayScaling(self), AUTOSCALE.create)
        self.transport: str | None = None
        self.restored = False
        self.snapshot_error: str | None = None
        self.weights_error: str | None = None
        self.metrics = Metrics(MetricsConfig(per_expert_top_n=cfg.metrics_top_n))
        self.metrics_port: int | None = None
        self.background: list[asyncio.Task] = []
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
        self.requests.settle(self.control.table.actors)

    def _save(self, event: dict[str, Any] | None = None) -> None:
        if self.control is None:
            return
        state = ControllerState(self.next_actor, tuple(self.routers), self.next_router, self.transport,
                                tuple(self.control.history[-200:]), self.autoscaler.state(), self.checkpoint)
        try:
            save_snapshot(self.snapshot_path, self.control.table, state)
        except OSError as exc:  # serving goes on; a restart would then find an older snapshot
            self.snapshot_error = f"saving {self.snapshot_path} failed: {exc}"
            log.error("controller: %s", self.snapshot_error)

    def _restore(self) -> None:
        """After a restart: the weight store (or the checkpoint), the snapshot (or what is running), re-attach,
        resume (expertray/runtime/restore.py)."""
        self.restored = True
        if not self.cfg.model:
            self.layers, self.weights_error = restore.weight_store(self.weights_path, self.cfg.layer,
                                                                   self.cfg.num_layers)
        resumed = restore.resume(self.snapshot_path, pools.RayRunningCluster(self.cfg.ping_timeout_s))
        self.snapshot_error = resumed.snapshot_error
        self.routers, self.transport = resumed.routers, resumed.transport
        self.next_actor, self.next_router = resumed.next_actor, resumed.next_router
        self.autoscaler.saved, self.checkpoint = resumed.autoscaler, resumed.checkpoint
        if self.cfg.model:
            self.checkpoint, self.weights_error = restore.checkpoint(self.checkpoint, self.cfg.model)
        table = resumed.table
        self.handles = {a: h for a in table.actors if (h := pools.lookup(ray_name(a))) is not None}
        self._locate()  # which node each re-attached actor runs on (new actors are placed by it)
        self._serve(table, resumed.history)
        self._start_background()
        log.info("controller restored placement v%d (%d routers)", table.version, len(self.routers))

    # --- start-up ------------------------------------------------------------------------------------
    def _choose_node(self) -> str | None:
        """The node for the next expert actor (expertray/runtime/node_choice.py); None: left to Ray."""
        return self.nodes.choose(self.demand, pools.live_nodes, self.handles)

    def _new_actor(self) -> str:
        actor_id = expert_actor_id(self.next_actor)
        self.next_actor += 1
        c = self.cfg
        node = self._choose_node()
        if node is None:
            self._ask_for_room(f"no node has room for {actor_id}")
        self.handles[actor_id] = ExpertActor.options(
            **pools.child_options(ray_name(actor_id), c.actor_num_cpus, c.actor_num_gpus, self.detached),
            resources=dict(c.actor_resources), **pools.affinity_options(node)).remote(
            actor_id, max(1, math.floor(c.actor_num_cpus)), self.dtype, c.layer)
        self.starting.add(actor_id)
        self.nodes.of[actor_id] = node
        return actor_id

    def _ask_for_room(self, why: str) -> list[dict[str, float]]:
        """Ask the autoscaler for room for one more expert actor than those keeping their place
        (expertray/runtime/resource_request.py); [] when sending failed (the actor still waits for a node)."""
        actors = self.control.table.actors if self.control is not None else ()
        return self.requests.ask(self.demand, self.nodes.keeping(self.handles), why, actors)

    def _locate(self) -> dict[str, dict[str, str] | None]:
        """Where each expert actor and router runs, as the GCS says (None: not placed yet); refreshes the
        actors' nodes with what Ray actually did."""
        where = {a: pools.actor_location(h) for a, h in list(self.handles.items()) + list(self.routers.items())
                 if h is not None}
        self.nodes.observed(where, self.handles)
        return where

    async def _start_router(self, table: PlacementTable) -> tuple[str, Any]:
        """Create a router serving `table` and start it (transport open, batching); killed if it fails."""
        new_id, handle = self._create_router(table)
        await self._open_router(new_id, handle)
        return new_id, handle

    def _create_router(self, table: PlacementTable) -> tuple[str, Any]:
        """A new router actor for `table`: its process starts now; it serves once `_open_router` returns."""
        missing = [a for a in table.actors if a not in self.handles]
        if missing:  # died while this controller was down: the heal replaces them first, then the router
            raise ExpertUnavailableError(f"cannot start a router: no live handle for {', '.join(missing)} (not found "
                                         "after the controller restarted; replaced by the heal)")
        params = self.layer_params()  # a checkpoint's router reads its gates and shared experts itself
        new_id = router_id(self.next_router)
        self.next_router += 1
        options = pools.child_options(ray_name(new_id), self.cfg.router_num_cpus, self.cfg.router_num_gpus,
                                      self.detached)
        handle = RouterActor.options(**options).remote(new_id, self.cfg, params, table.to_dict(), self.handles,
                                                       max(1, math.floor(self.cfg.router_num_cpus)))
        return new_id, handle

    async def _open_router(self, new_id: str, handle: Any) -> None:
        """Start a created router (its transport opens over the actors, then it batches); killed if it fails."""
        try:
            await bounded(handle.ping.remote(), self.cfg.start_timeout_s, f"starting {new_id}'s process")
            transport = await bounded(handle.start.remote(ray.get_actor(CONTROLLER, namespace=NAMESPACE)),
                                       self.cfg.control_timeout_s, f"starting {new_id}")
        except BaseException:
            ray.kill(handle, no_restart=True)
            raise
        self.transport = self.transport or transport

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
        table = PlacementTable.balanced(self.cfg.num_layers, self.cfg.layer.num_experts, ids).with_min_replicas(
            self.cfg.min_replicas_per_expert, self.nodes.of).bump(0)  # shadows on other actors (nodes) first
        # the routers' processes start beside the expert actors' (each process start is mostly imports); a
        # router opens its transport only once every actor holds its slots
        routers = [self._create_router(table) for _ in range(self.cfg.num_routers)]
        self.routers.update(routers)  # a failed start's shutdown kills them too
        await asyncio.gather(*[self.actor_pool.load(a, [(s.layer, s.expert) for s in table.slots_of(a)], None)
                               for a in ids])
        for new_id, handle in routers:
            await self._open_router(new_id, handle)
        self._serve(table, [])
        self._changed()
        self._start_background()
        log.info("expertray: %d expert actors, %d routers, transport %s", len(ids), len(self.routers),
                 self.transport)
        return {"actors": ids, "routers": len(self.routers), "transport": self.transport}

    def _serve(self, table: PlacementTable, history: list[dict[str, Any]]) -> None:
        """The placement state machine over `table` and the liveness loop that watches it."""
        self.control = PlacementControl(table, self.actor_pool, self.router_pool, self._changed,
                                        self.cfg.min_replicas_per_expert, lambda: self.nodes.of)
        self.control.history = history
        self.watch = LivenessLoop(self.control, pools.RayProbe(self), self.nodes, self.cfg.ping_timeout_s,
                                  self.cfg.liveness_interval_s)

    # --- background loops ------------------------------------------------------------------------------
    def _start_background(self) -> None:
        if self.cfg.metrics_port >= 0:
            try:
                self.metrics_port = self.metrics.serve(self.cfg.metrics_port)
            except OSError as exc:  # serving must not depend on a free metrics port
                log.warning("metrics endpoint on 127.0.0.1:%d not started: %s", self.cfg.metrics_port, exc)
        loop = asyncio.get_event_loop()
        self.background.append(loop.create_task(every(METRICS_INTERVAL_S, self.collect_metrics,
                                                      "metrics collection")))
        self.background.append(loop.create_task(self.watch.run()))
        if self.cfg.autoscale or self.autoscaler.saved.get("on"):
            self.autoscaler.turn(True)

    async def collect_metrics(self) -> None:
        """Drain every answering router's buffered observations into the Prometheus registry."""
        drained, _ = await self.router_pool.call_all("drain_observations")
        for router, observations in drained:
            self.metrics.observe_router(router, observations)
        for layer in range(self.table.num_layers):
            self.metrics.set_replicas(layer, self.table.replica_counts(layer))

    def metrics_text(self) -> bytes:
        return self.metrics.render()

    # --- autoscaling -----------------------------------------------------------------------------------
    async def autoscale(self, on: bool | None = None) -> dict[str, Any]:
        """Turn the autoscaler on/off (None: leave as is); returns its state and recent decisions."""
        if on is not None:
            self.autoscaler.turn(on)
            self._save()  # on/off survives a controller restart
        return self.autoscaler.report()

    async def autoscale_step(self) -> list[dict[str, Any]]:
        """One decision round now (expertray/runtime/autoscaling.py)."""
        return await self.autoscaler.step()

    async def signals(self) -> Signals:
        """What the autoscale policy sees (expertray/runtime/autoscaling.py's signals_from); actors that do
        not answer are left out."""
        routers, _ = await self.router_pool.call_all("stats")
        actors = {a: s for a, s in (await self.actor_pool.stats()).items() if s["alive"]}
        return signals_from([r for _, r in routers], actors, self.table, await self._free_capacity(),
                            self.cfg.actor_memory_budget_bytes, self._expert_bytes(),
                            self.cfg.min_replicas_per_expert)

    async def _free_capacity(self) -> int:
        """How many more expert actors may start now: the room under `max_expert_actors`, or 0 when no live
        node has room for another actor's demand (the policy then asks for resources, not for an actor)."""
        room = max(0, self.cfg.max_expert_actors - len(self.table.actors))
        if room and await asyncio.to_thread(self._choose_node) is None:
            return 0
        return room

    def _expert_bytes(self) -> int:
        return slot_bytes(self.cfg.layer, self.checkpoint, self.dtype)

    # --- queries -------------------------------------------------------------------------------------
    def _health(self) -> dict[str, Any]:
        return {"restored": self.restored, "snapshot_error": self.snapshot_error,
                "weights_error": self.weights_error, "degraded": bool(self.snapshot_error or self.weights_error),
                "state_dir": str(self.state_dir), "weights": "checkpoint" if self.checkpoint else "weight_store",
                "checkpoint": self.checkpoint.get("path"), "dtype": self.dtype,
                "expert_bytes_held": held_bytes(self.layers)}

    def info(self) -> dict[str, Any]:
        return {**self._health(), "version": self.table.version, "detached": self.detached, "pid": os.getpid(),
                "metrics_port": self.metrics_port, "resource_request": self.requests.last}

    def get_table(self) -> dict[str, Any]:
        return self.table.to_dict()

    async def direct_spec(self) -> dict[str, Any]:
        """What a client routing for itself (expertray/runtime/direct.py) needs each refresh: the table,
        every table actor's channel endpoint (an actor that does not answer within ping_timeout_s is left
        out; the client avoids it) and the liveness loop's suspects (silent actors, not yet healed)."""
        table = self.table

        async def endpoint(a: str) -> dict[str, Any]:
            if a not in self.endpoints:
                handle = self.handles.get(a)
                if handle is None:
                    raise ExpertRayError(f"{a} is not running")
                self.endpoints[a] = await bounded(handle.channel_endpoint.remote(), self.cfg.ping_timeout_s,
                                                  f"{a}.channel_endpoint")
            return self.endpoints[a]

        found = await asyncio.gather(*[endpoint(a) for a in table.actors], return_exceptions=True)
        return {"table": table.to_dict(), "endpoints": {a: e for a, e in zip(table.actors, found)
                                                        if not isinstance(e, BaseException)},
                "suspects": sorted(self.watch.liveness.pushed) if self.watch is not None else []}

    def layer_params(self) -> list[LayerParams] | dict[str, Any]:
        """Every layer's gate and shared expert (random-weight clusters), or the checkpoint's descriptor to
        read them from: what a client routing for itself holds."""
        if self.checkpoint:
            return self.checkpoint
        if self.layers is None:
            raise ExpertRayError(f"cannot start a router or direct client: the gate weights are unavailable "
                                 f"({self.weights_error})")
        return [LayerParams(m.gate_weights, m.shared) for m in self.layers]

    def get_routers(self) -> list[Any]:
        """Handles of the routers in service (replaced ones are swapped in as they start; a router a restarted
        controller could not find is left out until it is replaced)."""
        return [h for h in self.routers.values() if h is not None]

    def get_config(self) -> ClusterConfig:
        return self.cfg

    def report_engine(self, replica: str, stats: dict[str, Any]) -> None:
        """An engine replica's periodic stats (Serve's engines, expertray.serve.engines), shown by `status`."""
        self.engines[replica] = (time.monotonic(), stats)

    def _engines(self) -> list[dict[str, Any]]:
        """Engine replicas heard from within ENGINE_STALE_S (older reports are dropped)."""
        now = time.monotonic()
        self.engines = {r: (t, s) for r, (t, s) in self.engines.items() if now - t <= ENGINE_STALE_S}
        return [{**s, "replica": r, "reported_s_ago": round(now - t, 1)} for r, (t, s) in sorted(self.engines.items())]

    async def status(self) -> dict[str, Any]:
        """Table, per-actor and per-router stats; never raises because a piece is dead or hung: a dead or
        hung actor shows as {"alive": False} (being healed), a router that does not answer is listed in
        `routers_down`. `requests` sums every router's outcomes (rejected: refused before queueing)."""
        actor_stats = await self.actor_pool.stats()
        answered, down = await self.router_pool.call_all("stats")
        routers = [r for _, r in answered]
        totals = {k: sum(r.get(k, 0) for r in routers) for k in ("requests", "errors", "rejected", "timeouts",
                                                                 "retries")}
        where = await asyncio.to_thread(self._locate)
        for a, stats in actor_stats.items():
            stats["node"] = where.get(a)
        for r, stats in answered:
            stats["node"] = where.get(r)
        nodes = await asyncio.to_thread(self.nodes.report, pools.live_nodes, self.handles)
        return {"table": self.table.to_dict(), "transport": self.transport, "actors": actor_stats,
                "routers": routers, "routers_down": down, "requests": totals, "controller": self._health(),
                "liveness": {"suspects": sorted(self.watch.liveness.pushed), "dead": sorted(self.watch.known_dead)},
                "nodes": nodes, "history": self.control.history[-50:], "engines": self._engines()}

    # --- placement changes ---------------------------------------------------------------------------
    async def apply_table(self, new: PlacementTable, reason: str = "") -> dict[str, Any]:
        async with self.control.lock:
            return await self.control.apply(new, reason)

    async def heal(self, reporter: str = "") -> dict[str, Any]:
        """Replace dead or hung expert actors and dead routers, and make routers re-form their transports;
        called by a router whose batch failed in transport (actors the liveness loop found dead are not
        pinged again; its silent suspects are not pinged either: a stand-in serves their sole copies)."""
        async with self.control.lock:
            return await self.control.heal(reporter, known_dead=self.watch.known_dead,
                                           silent=self.watch.liveness.pushed)

    async def replicate(self, layer: int, expert: int, actor: str | None = None) -> dict[str, Any]:
        async with self.control.lock:
            self.table.check_expert(layer, expert)
            if actor is None:
                actor = self.nodes.replica_destination(self.table, layer, expert)
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
            topo = topology_from_nodes(self.nodes.of, actors, slots_per_actor or per_layer + 1)
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
        waited_for_room = self.nodes.of.get(actor_id) is None
        try:
            await self.actor_pool.started(actor_id)
        except TimeoutError as exc:
            self.actor_pool.kill(actor_id)
            if waited_for_room:
                raise ExpertRayError(
                    f"{actor_id} did not start within start_timeout_s={self.cfg.start_timeout_s:g} s: no node "
                    f"had room for {self.demand} and none joined; asked the autoscaler (request_resources: "
                    f"{(self.requests.last or {}).get('bundles')} bundles), which stands: add the actor again "
                    f"once a node has joined") from exc
            raise
        except BaseException:
            self.actor_pool.kill(actor_id)
            raise
        await self.control.apply(self.table.with_actor(actor_id), f"{reason}: {actor_id}", created=(actor_id,))
        return actor_id

    async def shutdown(self) -> None:
        """Stop loops, routers and actors; remove the state files this cluster wrote."""
        self.autoscaler.turn(False)
        for task in self.background:
            task.cancel()
        if self.watch is not None:
            self.watch.stop()
        self.metrics.stop()
        strays = pools.strays(set(self.routers) | set(self.handles))
        for h in list(self.routers.values()) + list(self.handles.values()) + strays:
            if h is not None:
                ray.kill(h, no_restart=True)
        self.routers, self.handles = {}, {}
        for path in (self.weights_path, None if self.cfg.snapshot_path else self.snapshot_path):
            if path is not None:
                path.unlink(missing_ok=True)
