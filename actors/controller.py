"""Controller: owns the versioned placement table, creates expert actors and routers, applies changes.

A placement change is applied in three steps so no token is lost: (1) new slots get their weights
(copied from an actor that holds them, else from the weight store), (2) every router switches to the new
table between two batches, (3) only then are slots that left the table unloaded and removed actors killed.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any

import numpy as np
import ray
import torch

from expertray.actors.expert import ExpertActor
from expertray.actors.router import LayerParams, RouterActor
from expertray.config import ClusterConfig
from expertray.errors import ConfigError
from expertray.layer import MoELayer
from expertray.metrics import Metrics, MetricsConfig
from expertray.placement import PlacementTable, Slot
from expertray.snapshot import load_snapshot, save_snapshot

log = logging.getLogger(__name__)


def _expert_blob(layers: list[MoELayer], slots: list[Slot]) -> dict[tuple[int, int], tuple[np.ndarray, np.ndarray]]:
    return {(s.layer, s.expert): (layers[s.layer].experts.gate_up[s.expert].numpy(),
                                  layers[s.layer].experts.down[s.expert].numpy()) for s in slots}


@ray.remote
class Controller:
    def __init__(self, cfg: ClusterConfig, layers: list[MoELayer] | None, detached: bool = False,
                 weights_path: str = "") -> None:
        if layers is None:  # persistent clusters keep the weight store on disk so a restart can reload it
            layers = torch.load(weights_path, weights_only=False)
        if len(layers) != cfg.num_layers:
            raise ConfigError(f"cluster.num_layers={cfg.num_layers} but {len(layers)} layers of weights given")
        self.cfg = cfg
        self.layers = layers  # the weight store: source of truth when no live replica holds an expert
        self.detached = detached  # detached children outlive a controller restart and keep serving
        self.actors: dict[str, Any] = {}
        self.routers: list[Any] = []
        self.table: PlacementTable | None = None
        self.transport: str | None = None
        self.lock = asyncio.Lock()
        self.next_actor = 0
        self.history: list[dict[str, Any]] = []
        self.restored = False
        self.metrics = Metrics(MetricsConfig(per_expert_top_n=cfg.metrics_top_n))
        self.metrics_port: int | None = None
        self.background: list[asyncio.Task] = []
        self.autoscaler: Any = None
        self.autoscale_task: asyncio.Task | None = None
        self.autoscale_log: list[dict[str, Any]] = []
        if cfg.snapshot_path and ray.get_runtime_context().was_current_actor_reconstructed:
            self._restore()

    # --- persistence ---------------------------------------------------------------------------------
    def _save(self) -> None:
        if self.cfg.snapshot_path:
            save_snapshot(self.cfg.snapshot_path, self.table,
                          {"next_actor": self.next_actor, "history": self.history[-200:],
                           "transport": self.transport, "num_routers": len(self.routers)})

    def _restore(self) -> None:
        """After a restart: reload the table and state, re-attach to the (detached) actors and routers."""
        table, state = load_snapshot(self.cfg.snapshot_path)
        self.actors = {a: ray.get_actor(f"expertray-{a}", namespace="expertray") for a in table.actors}
        self.routers = [ray.get_actor(f"expertray-router-{i}", namespace="expertray")
                        for i in range(state["num_routers"])]
        self.table, self.next_actor = table, state["next_actor"]
        self.history, self.transport = list(state["history"]), state["transport"]
        self.restored = True
        self._start_background()
        log.info("controller restored placement v%d from %s", table.version, self.cfg.snapshot_path)

    def _child_options(self, name: str, num_cpus: float, num_gpus: float = 0.0) -> dict[str, Any]:
        opts: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": num_gpus, "name": name, "namespace": "expertray"}
        if self.detached:
            opts["lifetime"] = "detached"
        return opts

    # --- start-up ------------------------------------------------------------------------------------
    def _new_actor(self) -> str:
        actor_id = f"expert-{self.next_actor}"
        self.next_actor += 1
        c = self.cfg
        self.actors[actor_id] = ExpertActor.options(
            **self._child_options(f"expertray-{actor_id}", c.actor_num_cpus, c.actor_num_gpus)).remote(
            actor_id, max(1, math.floor(c.actor_num_cpus)))
        return actor_id

    async def start(self) -> dict[str, Any]:
        async with self.lock:
            ids = [self._new_actor() for _ in range(self.cfg.num_expert_actors)]
            table = PlacementTable.balanced(self.cfg.num_layers, self.cfg.layer.num_experts, ids)
            await asyncio.gather(*[self.actors[a].load.remote(_expert_blob(self.layers, table.slots_of(a)))
                                   for a in ids])
            params = [LayerParams(m.gate_weights, m.shared) for m in self.layers]
            self.routers = [RouterActor.options(**self._child_options(f"expertray-router-{i}",
                                                                      self.cfg.router_num_cpus)).remote(
                f"router-{i}", self.cfg, params, table.to_dict(), self.actors,
                max(1, math.floor(self.cfg.router_num_cpus))) for i in range(self.cfg.num_routers)]
            me = ray.get_actor("controller", namespace="expertray")
            transports = await asyncio.gather(*[r.start.remote(me) for r in self.routers])
            self.transport = transports[0]
            self.table = table
            self._save()
            self._start_background()
            log.info("expertray: %d expert actors, %d routers, transport %s", len(ids), len(self.routers),
                     self.transport)
            return {"actors": ids, "routers": len(self.routers), "transport": self.transport}

    # --- metrics ---------------------------------------------------------------------------------------
    def _start_background(self) -> None:
        if self.cfg.metrics_port >= 0:
            try:
                self.metrics_port = self.metrics.serve(self.cfg.metrics_port)
            except OSError as exc:  # serving must not depend on a free metrics port
                log.warning("metrics endpoint on 127.0.0.1:%d not started: %s", self.cfg.metrics_port, exc)
        self.background.append(asyncio.get_event_loop().create_task(self._metrics_loop()))
        self.background.append(asyncio.get_event_loop().create_task(self._liveness_loop()))
        if self.cfg.autoscale:
            self._set_autoscale(True)

    async def _metrics_loop(self, interval_s: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.collect_metrics()
            except Exception:  # noqa: BLE001 - a failed scrape of a router must not stop the loop
                log.warning("metrics collection failed", exc_info=True)

    async def _liveness_loop(self, interval_s: float = 2.0) -> None:
        """Heal dead expert actors even when no request notices (an idle cluster stays whole)."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                if not self.lock.locked() and await self._dead_actors():
                    await self.heal("liveness check")
            except Exception:  # noqa: BLE001 - retried next round
                log.warning("liveness check failed", exc_info=True)

    async def collect_metrics(self) -> None:
        """Drain every router's buffered observations into the Prometheus registry."""
        drained = await asyncio.gather(*[r.drain_observations.remote() for r in self.routers])
        m = self.metrics
        for i, obs in enumerate(drained):
            for layer, counts, dropped, bal, dispatch_s, combine_s in obs["batches"]:
                m.observe_batch(layer, counts, dropped, bal, dispatch_s, combine_s)
            for actor, seconds in obs["actors"]:
                m.observe_actor(actor, seconds)
            for layer, seconds, outcome in obs["requests"]:
                m.observe_request(layer, seconds, outcome)
            m.set_queue_depth(f"router-{i}", obs["queued_tokens"])
        for layer in range(self.table.num_layers):
            m.set_replicas(layer, self.table.replica_counts(layer))

    def metrics_text(self) -> bytes:
        return self.metrics.render()

    # --- autoscaling -----------------------------------------------------------------------------------
    def _set_autoscale(self, on: bool) -> None:
        from expertray.policies.autoscale import AUTOSCALE

        if on and self.autoscale_task is None:
            self.autoscaler = AUTOSCALE.create(self.cfg.autoscale_policy, **self.cfg.autoscale_params)
            self.autoscale_task = asyncio.get_event_loop().create_task(self._autoscale_loop())
        elif not on and self.autoscale_task is not None:
            self.autoscale_task.cancel()
            self.autoscale_task = None

    async def autoscale(self, on: bool | None = None) -> dict[str, Any]:
        """Turn the autoscaler on/off (None: leave as is); returns its state and recent decisions."""
        if on is not None:
            self._set_autoscale(on)
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
        """What the autoscale policy sees: window load per logical expert, per-actor speed and memory."""
        from expertray.policies.autoscale import Signals

        routers = await asyncio.gather(*[r.stats.remote() for r in self.routers])
        ids = list(self.table.actors)
        actors = dict(zip(ids, await asyncio.gather(*[self.actors[a].stats.remote() for a in ids])))
        load = np.zeros((self.table.num_layers, self.table.num_experts))
        tokens_per_s = 0.0
        for r in routers:
            for layer in r["layers"]:
                load[layer["layer"]] += np.asarray(layer["expert_load"])
            tokens_per_s += r["tokens"] / max(r["uptime_s"], 1e-9)
        budget = self.cfg.actor_memory_budget_bytes
        # speed per 1k rows, not per call: an actor holding hot experts is busy, not slow
        speed = {a: s["ms_per_krow_p50"] for a, s in actors.items() if s["ms_per_krow_p50"] > 0}
        return Signals(load=load, tokens_per_s=tokens_per_s,
                       free_capacity=max(0, self.cfg.max_expert_actors - len(ids)),
                       latency_p50_ms=speed, latency_p99_ms={a: s["compute_ms_p99"] for a, s in actors.items()},
                       memory_used_bytes={a: s["memory_bytes"] for a, s in actors.items()},
                       memory_budget_bytes={a: budget for a in ids} if budget else {},
                       expert_bytes=self.layers[0].experts.nbytes // self.table.num_experts)

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
        async with self.lock:
            if a.kind == "add_actor":
                await self._add_actor(f"autoscale: {a.reason}")
            elif a.kind == "request_resources":
                from ray.autoscaler.sdk import request_resources

                bundle = {"CPU": self.cfg.actor_num_cpus}
                if self.cfg.actor_num_gpus:
                    bundle["GPU"] = self.cfg.actor_num_gpus
                request_resources(bundles=[bundle] * (len(self.table.actors) + 1))
            else:
                await self._apply(a.apply(self.table), f"autoscale: {a.reason}")

    # --- queries -------------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        return {"restored": self.restored, "version": self.table.version, "detached": self.detached,
                "metrics_port": self.metrics_port}

    def get_table(self) -> dict[str, Any]:
        return self.table.to_dict()

    def get_routers(self) -> list[Any]:
        return self.routers

    def get_config(self) -> ClusterConfig:
        return self.cfg

    async def status(self) -> dict[str, Any]:
        """Table, per-actor and per-router stats; a dead actor shows as {"alive": False} (it is being healed)."""
        actor_ids = list(self.table.actors)
        replies = await asyncio.gather(*[self.actors[a].stats.remote() for a in actor_ids], return_exceptions=True)
        actor_stats = [{"alive": False, "error": str(r).splitlines()[0]} if isinstance(r, BaseException)
                       else {"alive": True, **r} for r in replies]
        router_stats = await asyncio.gather(*[r.stats.remote() for r in self.routers])
        return {"table": self.table.to_dict(), "transport": self.transport,
                "actors": dict(zip(actor_ids, actor_stats)), "routers": router_stats,
                "history": self.history[-50:]}

    # --- placement changes ---------------------------------------------------------------------------
    async def apply_table(self, new: PlacementTable, reason: str = "") -> dict[str, Any]:
        async with self.lock:
            return await self._apply(new, reason)

    async def _apply(self, new: PlacementTable, reason: str, dead: frozenset[str] = frozenset()
                     ) -> dict[str, Any]:
        old = self.table
        new = new.bump(old.version + 1)
        for a in new.actors:
            if a not in self.actors:
                raise ConfigError(f"placement names actor {a!r} that the controller has not created")
        added = sorted(set(new.slots) - set(old.slots))
        removed = sorted(set(old.slots) - set(new.slots))
        await self._load_slots(added, old, dead)
        versions = await asyncio.gather(*[r.set_table.remote(new.to_dict(), self.actors, bool(dead))
                                          for r in self.routers])
        assert all(v == new.version for v in versions), versions
        self.table = new
        by_actor: dict[str, list[tuple[int, int]]] = {}
        for s in removed:
            by_actor.setdefault(s.actor, []).append((s.layer, s.expert))
        await asyncio.gather(*[self.actors[a].unload.remote(keys) for a, keys in by_actor.items()
                               if a in new.actors and a not in dead])
        for a in [a for a in old.actors if a not in new.actors]:
            ray.kill(self.actors.pop(a))
        event = {"version": new.version, "reason": reason, "added": [[s.actor, s.layer, s.expert] for s in added],
                 "removed": [[s.actor, s.layer, s.expert] for s in removed]}
        self.history.append(event)
        self._save()
        log.info("placement v%d: +%d slots, -%d slots (%s)", new.version, len(added), len(removed), reason)
        return event

    async def _load_slots(self, slots: list[Slot], source: PlacementTable, dead: frozenset[str]) -> None:
        """Give every new slot its weights: from a live actor holding the expert, else the weight store."""
        loads = []
        for s in slots:
            holders = [h.actor for h in source.replicas(s.layer, s.expert)
                       if h.actor in self.actors and h.actor not in dead]
            if holders:
                blob_ref = self.actors[holders[0]].export.remote([(s.layer, s.expert)])
            else:
                blob_ref = ray.put(_expert_blob(self.layers, [s]))
            loads.append(self.actors[s.actor].load.remote(blob_ref))
        await asyncio.gather(*loads)

    async def _dead_actors(self, timeout_s: float = 5.0) -> set[str]:
        async def alive(a: str) -> bool:
            try:
                await asyncio.wait_for(self.actors[a].ping.remote(), timeout_s)
                return True
            except Exception:  # noqa: BLE001 - any failure to answer counts as dead
                return False
        ids = list(self.table.actors)
        return {a for a, ok in zip(ids, await asyncio.gather(*[alive(a) for a in ids])) if not ok}

    async def heal(self, reporter: str = "") -> dict[str, Any]:
        """Replace dead expert actors (weights reloaded from live replicas or the weight store) and make
        every router re-form its transport; called by a router whose batch failed in transport."""
        async with self.lock:
            dead = await self._dead_actors()
            if not dead:  # a broken collective with live peers: re-form the groups on the same table
                await asyncio.gather(*[r.set_table.remote(self.table.to_dict(), self.actors, True)
                                       for r in self.routers])
                return {"replaced": {}, "version": self.table.version}
            replaced = {a: self._new_actor() for a in sorted(dead)}
            actors = tuple(replaced.get(a, a) for a in self.table.actors)
            slots = [Slot(replaced.get(s.actor, s.actor), s.layer, s.expert) for s in self.table.slots]
            new = PlacementTable(self.table.version, self.table.num_layers, self.table.num_experts, actors,
                                 tuple(slots))
            event = await self._apply(new, f"heal: replaced {replaced} (reported by {reporter})",
                                      frozenset(dead))
            return {"replaced": replaced, "version": event["version"]}

    async def replicate(self, layer: int, expert: int, actor: str | None = None) -> dict[str, Any]:
        async with self.lock:
            self.table.check_expert(layer, expert)
            if actor is None:
                held = {s.actor for s in self.table.replicas(layer, expert)}
                free = [a for a in self.table.actors if a not in held]
                if not free:
                    raise ConfigError(f"every actor already holds expert {layer}:{expert}")
                actor = min(free, key=lambda a: len(self.table.slots_of(a)))
            return await self._apply(self.table.replicate(layer, expert, actor), f"replicate {layer}:{expert}")

    async def migrate(self, layer: int, expert: int, dst: str, src: str | None = None) -> dict[str, Any]:
        async with self.lock:
            reps = self.table.replicas(layer, expert)
            src = src or reps[0].actor
            return await self._apply(self.table.migrate(layer, expert, src, dst), f"migrate {layer}:{expert}")

    async def drain(self, actor: str) -> dict[str, Any]:
        async with self.lock:
            return await self._apply(self.table.drain(actor), f"drain {actor}")

    async def rebalance(self, policy: str = "balanced", slots_per_actor: int = 0) -> dict[str, Any]:
        """Re-plan the whole placement from the window load with a placement policy (replica counts and
        packing, keeping slots in place where it costs no balance) and apply it between batches."""
        from expertray.policies.placement import PLACEMENT
        from expertray.topology import Topology

        signals = await self.signals()
        async with self.lock:
            actors = list(self.table.actors)
            per_layer = math.ceil(self.table.num_experts / len(actors))
            topo = Topology.single_node(actors, slots_per_actor or per_layer + 1)
            plan = PLACEMENT.create(policy).plan(signals.load, topo, self.table, signals.expert_bytes)
            event = await self._apply(plan.table, f"rebalance ({policy}): balancedness "
                                      f"{plan.balancedness_before.mean:.3f} -> {plan.balancedness_after.mean:.3f}")
            return {**event, "balancedness_before": plan.balancedness_before.mean,
                    "balancedness_after": plan.balancedness_after.mean, "bytes_moved": plan.bytes_moved}

    async def set_actor_slowdown(self, actor: str, factor: float) -> None:
        """Fault injection (tests, benchmarks): make one expert actor a `factor`x straggler."""
        self.table.check_actor(actor)
        await self.actors[actor].set_slowdown.remote(factor)

    async def add_actor(self) -> str:
        """Start a new (empty) expert actor and add it to the table; policies then move slots onto it."""
        async with self.lock:
            return await self._add_actor("add actor")

    async def _add_actor(self, reason: str) -> str:
        """Start an empty expert actor, wait until it answers, and put it in the table (lock held)."""
        actor_id = self._new_actor()
        await self.actors[actor_id].ping.remote()
        await self._apply(self.table.with_actor(actor_id), f"{reason}: {actor_id}")
        return actor_id

    async def shutdown(self) -> None:
        self._set_autoscale(False)
        for task in self.background:
            task.cancel()
        self.metrics.stop()
        for r in self.routers:
            ray.kill(r)
        for a in self.actors.values():
            ray.kill(a)
        self.routers, self.actors = [], {}
