"""RouterActor: micro-batches requests per layer, routes them, moves buckets through a transport, combines.

Async actor with a single dispatch lane: batches are processed one at a time (so a placement-table switch
lands between batches), while new requests keep queueing. Each request gets exactly its own rows back,
or an exception; never a partial answer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch
from ray.exceptions import RayActorError

from expertray.actors.transport import CollectiveTransport, ObjectStoreTransport
from expertray.config import ClusterConfig
from expertray.errors import BackpressureError, ExpertUnavailableError, TransportError
from expertray.experts import SharedExpert
from expertray.gating import GateWeights
from expertray.loadstats import LoadStats, balancedness
from expertray.pipeline import finish, prepare
from expertray.placement import PlacementTable
from expertray.policies.replica import REPLICA
from expertray.policies.routing import ROUTING
from expertray.validation import check_hidden, check_layer

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    hidden: torch.Tensor
    future: asyncio.Future
    arrived: float
    attempts: int = 0


MAX_ATTEMPTS = 3
OBSERVATION_BUFFER = 4096  # per kind, between two metrics drains by the controller (bounded memory)


@dataclass
class LayerParams:
    """What a router holds per layer: the gate, and the shared expert (computed at the router)."""

    gate: GateWeights
    shared: SharedExpert | None


@ray.remote
class RouterActor:
    def __init__(self, router_id: str, cfg: ClusterConfig, layers: list[LayerParams], table: dict[str, Any],
                 handles: dict[str, Any], torch_threads: int = 1) -> None:
        torch.set_num_threads(max(1, torch_threads))
        self.router_id = router_id
        self.cfg = cfg
        self.layers = layers
        self.policy = ROUTING.create(cfg.routing_policy, **cfg.routing_params)
        self.selector = REPLICA.create(cfg.replica_policy)
        self.stats_ = LoadStats(cfg.num_layers, cfg.layer.num_experts, window_batches=cfg.stats_window_batches)
        self.queues: list[deque[_Pending]] = [deque() for _ in range(cfg.num_layers)]
        self.queued_tokens = 0
        self.arrival = asyncio.Event()
        self.lane = asyncio.Lock()
        self.table = PlacementTable.from_dict(table)
        self.handles = handles
        self.transport: Any = None
        self.counters = {"batches": 0, "requests": 0, "tokens": 0, "dropped": 0, "rerouted": 0, "errors": 0,
                         "retries": 0}
        self.timing_ms: dict[str, deque[float]] = {k: deque(maxlen=256) for k in
                                                   ("gate", "plan", "transport", "compute", "combine", "batch")}
        self.bytes_out = [0] * len(self.table.actors)
        self.observations: dict[str, deque] = {k: deque(maxlen=OBSERVATION_BUFFER) for k in
                                               ("batches", "actors", "requests")}
        self.trace: Any = None  # a TraceWriter while recording live routing
        self.controller: Any = None
        self.healthy = asyncio.Event()
        self.healthy.set()
        self.expert_tokens = torch.zeros(cfg.num_layers, cfg.layer.num_experts, dtype=torch.long)
        self.started_at = time.time()
        self.loop_task: asyncio.Task | None = None

    # --- lifecycle -----------------------------------------------------------------------------------
    async def start(self, controller: Any = None) -> str:
        """Open the transport and start the batching loop; returns the transport actually used.

        `controller` is asked to heal the cluster when an expert actor fails mid-batch."""
        self.controller = controller
        self.transport = await self._open_transport(self.table)
        self.loop_task = asyncio.get_running_loop().create_task(self._batch_loop())
        return self.transport.name

    async def _open_transport(self, table: PlacementTable) -> Any:
        handles = [self.handles[a] for a in table.actors]
        mode = self.cfg.transport
        if mode == "object_store":
            return ObjectStoreTransport(handles)
        backend = "nccl" if self.cfg.actor_num_gpus > 0 and torch.cuda.is_available() else "gloo"
        transport = CollectiveTransport(handles, backend, self.cfg.collective_timeout_s)
        try:
            await transport.open()
            return transport
        except Exception:
            if mode == "collective":
                raise
            log.warning("router %s: collective group failed to form; using the object store", self.router_id,
                        exc_info=True)
            return ObjectStoreTransport(handles)

    async def set_table(self, table: dict[str, Any], handles: dict[str, Any], reopen: bool = False) -> int:
        """Switch to a new placement table between batches; returns the version now in use.

        The transport is re-formed when the actor set changes or `reopen` (after a failure)."""
        new = PlacementTable.from_dict(table)
        async with self.lane:
            self.handles = {**self.handles, **handles}
            if reopen or new.actors != self.table.actors:
                old = self.transport
                self.transport = await self._open_transport(new)
                await old.close()
                self.bytes_out = [0] * len(new.actors)
            self.table = new
        return new.version

    # --- requests ------------------------------------------------------------------------------------
    async def forward(self, layer: int, hidden: np.ndarray) -> np.ndarray:
        """Hidden states [T, D] for one MoE layer → that layer's output [T, D] (same dtype)."""
        layer = check_layer(layer, self.cfg.num_layers)
        x = check_hidden(hidden, self.cfg.layer.d_model, self.cfg.max_request_tokens)
        if self.queued_tokens + x.shape[0] > self.cfg.max_queue_tokens:
            raise BackpressureError(f"router {self.router_id} queue is full ({self.queued_tokens} tokens queued, "
                                    f"limit {self.cfg.max_queue_tokens}); retry later")
        fut = asyncio.get_running_loop().create_future()
        t0 = time.perf_counter()
        self.queues[layer].append(_Pending(x, fut, t0))
        self.queued_tokens += x.shape[0]
        self.arrival.set()
        try:
            out: torch.Tensor = await fut
        except Exception as exc:
            self.observations["requests"].append((layer, time.perf_counter() - t0, type(exc).__name__))
            raise
        self.observations["requests"].append((layer, time.perf_counter() - t0, "ok"))
        return out.to(x.dtype).numpy() if out.dtype != x.dtype else out.numpy()

    async def _batch_loop(self) -> None:
        max_wait = self.cfg.max_wait_ms / 1e3
        while True:
            if not any(self.queues):
                self.arrival.clear()
                await self.arrival.wait()
            layer = min((q[0].arrived, i) for i, q in enumerate(self.queues) if q)[1]
            queue = self.queues[layer]
            deadline = queue[0].arrived + max_wait
            while sum(p.hidden.shape[0] for p in queue) < self.cfg.max_batch_tokens:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                self.arrival.clear()
                try:
                    await asyncio.wait_for(self.arrival.wait(), left)
                except asyncio.TimeoutError:
                    break
            batch = [queue.popleft()]
            tokens = batch[0].hidden.shape[0]
            while queue and tokens + queue[0].hidden.shape[0] <= self.cfg.max_batch_tokens:
                batch.append(queue.popleft())
                tokens += batch[-1].hidden.shape[0]
            self.queued_tokens -= tokens
            await self.healthy.wait()
            async with self.lane:
                await self._process(layer, batch)

    async def _process(self, layer: int, reqs: list[_Pending]) -> None:
        t0 = time.perf_counter()
        try:
            hidden = reqs[0].hidden if len(reqs) == 1 else torch.cat([r.hidden for r in reqs])
            hidden = hidden.float()
            route = self.table.route(layer)
            policy = self.policy.for_layer(layer)
            if getattr(policy, "device_aware", False):  # price load per actor holding each expert (first replica)
                policy = policy.with_expert_groups(route.home_actor)
            batch = prepare(hidden, layer, self.cfg.layer, self.layers[layer].gate, policy,
                            self.selector,
                            route, len(self.table.actors), expert_load=self.stats_.window_load(layer))
            t1 = time.perf_counter()
            try:
                rows_out, tstats = await self.transport.exchange(batch)
            except (RayActorError, TransportError) as exc:
                self._retry_after_heal(layer, reqs, exc)
                return
            t2 = time.perf_counter()
            out = finish(batch, rows_out, hidden, self.layers[layer].shared)
            t3 = time.perf_counter()
        except Exception as exc:  # every waiting request gets the error, none is left hanging
            self.counters["errors"] += len(reqs)
            for r in reqs:
                if not r.future.done():
                    r.future.set_exception(exc)
            return
        start = 0
        for r in reqs:
            n = r.hidden.shape[0]
            if not r.future.done():
                r.future.set_result(out[start:start + n])
            start += n
        self._record(layer, len(reqs), batch, tstats, (t0, t1, t2, t3))

    def _retry_after_heal(self, layer: int, reqs: list[_Pending], exc: Exception) -> None:
        """An expert actor failed mid-batch: put the requests back (in order) and ask the controller to heal.

        After MAX_ATTEMPTS a request fails with ExpertUnavailableError; it never gets a partial answer."""
        log.warning("router %s: batch on layer %d failed in transport (%s); healing", self.router_id, layer, exc)
        self.counters["retries"] += 1
        for r in reversed(reqs):
            r.attempts += 1
            if r.attempts >= MAX_ATTEMPTS:
                self.counters["errors"] += 1
                r.future.set_exception(ExpertUnavailableError(
                    f"layer {layer}: expert actors failed {r.attempts} times while serving this request ({exc})"))
            else:
                self.queues[layer].appendleft(r)
                self.queued_tokens += r.hidden.shape[0]
        if self.healthy.is_set():
            self.healthy.clear()
            asyncio.get_running_loop().create_task(self._heal())

    async def _heal(self) -> None:
        try:
            if self.controller is not None:
                await self.controller.heal.remote(self.router_id)
        except Exception:  # noqa: BLE001 - the retry will fail cleanly if the cluster is still broken
            log.exception("router %s: controller heal failed", self.router_id)
        finally:
            self.healthy.set()
            self.arrival.set()

    def _record(self, layer: int, num_requests: int, batch: Any, tstats: Any, t: tuple[float, ...]) -> None:
        self.stats_.record(layer, batch.expert_counts, batch.routing.num_dropped)
        if self.trace is not None:
            self.trace.write(layer, batch.routing.experts, batch.routing.weights, batch.gate.probs)
        self.expert_tokens[layer] += batch.expert_counts
        c = self.counters
        c["batches"] += 1
        c["requests"] += num_requests
        c["tokens"] += batch.plan.num_tokens
        c["dropped"] += batch.routing.num_dropped
        c["rerouted"] += batch.routing.num_rerouted
        for i, b in enumerate(tstats.bytes_out):
            self.bytes_out[i] += b
        dropped = batch.gate.experts[batch.routing.experts < 0]
        dropped_per_expert = torch.bincount(dropped, minlength=self.cfg.layer.num_experts)
        per_actor = batch.plan.group_counts(self.table.route(layer).dest_actor, len(self.table.actors))
        self.observations["batches"].append((layer, (batch.expert_counts + dropped_per_expert).tolist(),
                                             dropped_per_expert.tolist(), balancedness(per_actor.float()),
                                             max(0.0, t[2] - t[0] - tstats.max_compute_ms / 1e3),
                                             t[3] - t[2]))
        for actor, ms in tstats.compute_ms.items():
            self.observations["actors"].append((self.table.actors[actor], ms / 1e3))
        tm = self.timing_ms
        tm["gate"].append(batch.timings_ms["gate"])
        tm["plan"].append(batch.timings_ms["plan"])
        tm["compute"].append(tstats.max_compute_ms)
        tm["transport"].append(max(0.0, (t[2] - t[1]) * 1e3 - tstats.max_compute_ms))
        tm["combine"].append((t[3] - t[2]) * 1e3)
        tm["batch"].append((t[3] - t[0]) * 1e3)

    # --- observability -------------------------------------------------------------------------------
    async def stats(self) -> dict[str, Any]:
        per_actor_tokens = {}
        layers = []
        for layer in range(self.cfg.num_layers):
            load = self.stats_.window_load(layer)
            route = self.table.route(layer)
            counts = self.table.replica_counts(layer)
            dest_share = load[route.dest_expert] / torch.tensor(counts, dtype=load.dtype)[route.dest_expert]
            dev = torch.zeros(len(self.table.actors), dtype=load.dtype).index_add_(0, route.dest_actor, dest_share)
            for a, v in zip(self.table.actors, dev.tolist()):
                per_actor_tokens[a] = per_actor_tokens.get(a, 0.0) + v
            layers.append({"layer": layer, "expert_load": load.tolist(), "balancedness": balancedness(dev),
                           "expert_tokens_total": self.expert_tokens[layer].tolist(),
                           "drop_rate": self.stats_.window_drop_rate(layer)})
        return {"router": self.router_id, "table_version": self.table.version,
                "uptime_s": time.time() - self.started_at,
                "transport": self.transport.name if self.transport else None, **self.counters,
                "queued_tokens": self.queued_tokens, "layers": layers,
                "bytes_out": dict(zip(self.table.actors, self.bytes_out)),
                "timing_ms_p50": {k: float(np.median(v)) if v else 0.0 for k, v in self.timing_ms.items()}}

    async def start_trace(self, path: str) -> str:
        """Record every routed batch (experts, weights, gate probs) to a msgpack trace at `path`."""
        from expertray.trace import TraceWriter

        async with self.lane:
            if self.trace is not None:
                self.trace.close()
            self.trace = TraceWriter(path, self.cfg.num_layers, self.cfg.layer.num_experts, self.cfg.layer.top_k,
                                     {"source": "live", "router": self.router_id, "policy": self.cfg.routing_policy,
                                      "family": self.cfg.layer.gate.family})
        return path

    async def stop_trace(self) -> int:
        """Stop recording; returns the trace file's size in bytes (0 if none was recording)."""
        async with self.lane:
            if self.trace is None:
                return 0
            self.trace.close()
            size = self.trace.path.stat().st_size
            self.trace = None
            return size

    async def drain_observations(self) -> dict[str, Any]:
        """Hand the buffered per-batch / per-actor / per-request observations to the controller's metrics."""
        out = {k: list(v) for k, v in self.observations.items()}
        for v in self.observations.values():
            v.clear()
        out["queued_tokens"] = self.queued_tokens
        return out

    async def reset_stats(self) -> None:
        for v in self.timing_ms.values():
            v.clear()
