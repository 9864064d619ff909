"""RouterActor: a thin Ray shell over the Ray-free batcher (expertray/runtime/batcher.py) and data path
(expertray/layer/route.py).

Rows travel in the serving dtype (`cluster.dtype`): requests may arrive in any float dtype (bf16 in the
object store's raw-bits wire format, see `forward`), gate math runs in float32, rows to the experts and the
combine in the serving dtype, and the answer goes back in the request's dtype.

Batches run one at a time under the batcher's dispatch lane (so a placement-table switch lands between
batches) while new requests keep queueing. Each request gets exactly its own rows back, or a clear error by
its `request_timeout_s` deadline; never a partial answer, never a hang.

Failover: when a batch fails because actors died or hung (named by the transport's error or by Ray's
RayActorError), the router masks them at once (`Failover`), switches from a broken collective group to the
object store over the same actors, and the batcher retries on the surviving replicas while the controller
heals in the background; the mask clears and the configured transport re-forms when the healed table lands.
The controller's liveness pings (expertray/runtime/liveness.py) push actors that stopped answering
(`suspect`): they are masked the same way at once, and the batch in flight is dropped (and retried on the
survivors) if it waits on one, instead of waiting for its deadline.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections import deque
from typing import Any

import numpy as np
import ray
import torch
from ray.exceptions import RayActorError

from expertray.actors.transport import open_transport
from expertray.config import ClusterConfig
from expertray.errors import InputError, TransportError, UnknownExpertError
from expertray.layer.route import BatchResult, LayerParams, run_layer, waits_on
from expertray.policies.placement import device_loads
from expertray.policies.replica import REPLICA
from expertray.policies.routing import ROUTING
from expertray.runtime.batcher import Batcher, BatchLimits
from expertray.runtime.failover import Failover, failed_actors
from expertray.runtime.rate import RateWindow
from expertray.runtime.switch import TableSwitch, reform_needed
from expertray.runtime.weights import router_params, serving_dtype
from expertray.state.loadstats import LoadStats, balancedness
from expertray.state.placement_table import PlacementTable
from expertray.validation import check_hidden, check_layer
from expertray.wire.collective import from_host_array, to_host_array
from expertray.wire.devices import assigned_device

log = logging.getLogger(__name__)

__all__ = ["LayerParams", "RouterActor"]

OBSERVATION_BUFFER = 4096  # per kind, between two metrics drains by the controller (bounded memory)
RATE_WINDOW_S = 10.0  # tokens_per_s is measured over this recent window


def is_transport_failure(exc: BaseException) -> bool:
    """Failures that mean "an expert actor or the group broke": requeue the batch and heal."""
    return isinstance(exc, (TransportError, RayActorError))


@ray.remote
class RouterActor:
    def __init__(self, router_id: str, cfg: ClusterConfig, layers: list[LayerParams] | dict[str, Any],
                 table: dict[str, Any], handles: dict[str, Any], torch_threads: int = 1) -> None:
        """`layers`: every layer's gate and shared expert, or a checkpoint descriptor (CheckpointDescriptor
        .to_dict) to read them from here (routed experts are never read by a router)."""
        torch.set_num_threads(max(1, torch_threads))
        self.router_id = router_id
        self.cfg = cfg
        self.dtype = getattr(torch, serving_dtype(cfg))
        # the GPU Ray assigned this router (router_num_gpus > 0), else the CPU: gate, plan, permute and combine
        # run there, with the gate and shared experts moved once
        self.device = assigned_device(len(ray.get_gpu_ids()))
        params = router_params(layers, serving_dtype(cfg)) if isinstance(layers, dict) else layers
        self.layers = [p.in_dtype(self.dtype).to(self.device) for p in params]
        self.policy = ROUTING.create(cfg.routing_policy, **cfg.routing_params)
        self.selector = REPLICA.create(cfg.replica_policy)
        self.stats_ = LoadStats(cfg.num_layers, cfg.layer.num_experts, window_batches=cfg.stats_window_batches)
        self.batcher = Batcher(cfg.num_layers, BatchLimits(
            max_batch_tokens=cfg.max_batch_tokens, max_wait_s=cfg.max_wait_ms / 1e3,
            max_queue_tokens=cfg.max_queue_tokens, request_timeout_s=cfg.request_timeout_s,
            batch_timeout_s=cfg.collective_timeout_s, heal_timeout_s=cfg.control_timeout_s),
            self._run_batch, self._heal, is_transport_failure, reroute=self._reroute)
        self.lane = self.batcher.lane
        self.table = PlacementTable.from_dict(table)
        self.handles = handles
        self.transport: Any = None
        self.failover = Failover()
        self.fallback = False  # serving on the object store because the collective group lost a member
        self.closing: set[asyncio.Task] = set()
        # served_masked: batches answered while actors were masked (routed around before a healed table)
        self.counters = {"batches": 0, "requests": 0, "tokens": 0, "dropped": 0, "rerouted": 0, "served_masked": 0}
        self.timing_ms: dict[str, deque[float]] = {k: deque(maxlen=256) for k in
                                                   ("gate", "plan", "transport", "compute", "combine", "batch")}
        self.bytes_out = [0] * len(self.table.actors)
        self.observations: dict[str, deque] = {k: deque(maxlen=OBSERVATION_BUFFER) for k in
                                               ("batches", "actors", "requests")}
        self.trace: Any = None  # a TraceWriter while recording live routing
        self.controller: Any = None
        self.expert_tokens = torch.zeros(cfg.num_layers, cfg.layer.num_experts, dtype=torch.long)
        self.token_rate = RateWindow(RATE_WINDOW_S)
        self.started_at = time.time()
        self.loop_task: asyncio.Task | None = None
        self.batch_dropped = asyncio.Event()  # set by set_table when the controller replaced dead actors
        self.switch = TableSwitch(self.lane, cfg.control_timeout_s, cfg.ping_timeout_s)
        self.in_flight: asyncio.Future | None = None  # the running batch's exchange, and the actors it waits on
        self.in_flight_actors: frozenset[str] = frozenset()
        self.dropped_for: frozenset[str] = frozenset()  # suspects the running batch was dropped for

    # --- lifecycle -----------------------------------------------------------------------------------
    async def start(self, controller: Any = None) -> str:
        """Open the transport and start the batching loop; returns the transport actually used.

        `controller` is asked to heal the cluster when an expert actor fails mid-batch."""
        self.controller = controller
        if self.transport is None:
            self.transport = await self._open_transport(self.table)
        if self.loop_task is None:
            self.loop_task = asyncio.get_running_loop().create_task(self.batcher.run())
        return self.transport.name

    async def get_table(self) -> dict[str, Any]:
        """The table this router serves (a controller that lost its snapshot rebuilds its state from it)."""
        return self.table.to_dict()

    def ping(self) -> str:
        return self.router_id

    def serving(self) -> bool:
        """Whether this router serves: started (transport open, batching loop running). A router whose
        controller died between creating and starting it answers pings but never batches: the controller's
        router check replaces it."""
        return self.transport is not None and self.loop_task is not None and not self.loop_task.done()

    async def _open_transport(self, table: PlacementTable) -> Any:
        """The configured transport over `table`'s actors, opened on this router's device (the GPU Ray
        assigned it, else the CPU); `auto` falls back to the object store when no group can form."""
        transport = await open_transport(self.cfg.transport, [self.handles[a] for a in table.actors],
                                         self.cfg.collective_timeout_s, list(table.actors), self.device)
        log.info("router %s: transport %s", self.router_id, transport.describe())
        return transport

    async def set_table(self, table: dict[str, Any], handles: dict[str, Any], reopen: bool = False) -> int:
        """Switch to a new placement table between batches; returns the version now in use.

        The transport is re-formed when the actor set changes, on `reopen` (after a failure), or when the
        router serves on the object-store fallback and no suspect is left. The new transport forms before
        the lane is taken (expertray/runtime/switch.py), so batches keep flowing on the old one during the
        rendezvous and the switch itself waits for at most the batch in flight; the old transport closes
        after the lane is released. If forming fails, the table and transport in use stay and the error
        goes to the controller, which rolls the change back."""
        new = PlacementTable.from_dict(table)
        self.handles = {**self.handles, **handles}

        def form() -> Any:
            after = dataclasses.replace(self.failover)  # the mask as it will be once `new` is installed
            after.install(new, healed=reopen)
            if not reform_needed(self.table.actors, new.actors, reopen, self.fallback, after.suspects):
                return None
            return self._open_transport(new)

        def before_lane() -> None:
            if reopen and set(self.table.actors) - set(new.actors):  # dead actors replaced: a batch waiting on
                self.batch_dropped.set()  # them would wait for Ray to notice (a killed node: ~15 s) before the lane

        def swap(formed: Any) -> Any:
            self.failover.install(new, healed=reopen)
            old = None
            if formed is not None:
                old, self.transport = self.transport, formed
                self.fallback = False
                self.bytes_out = [0] * len(new.actors)
            self.table = new
            self.batch_dropped.clear()
            return old

        await self.switch.run(form, swap, before_lane)
        if self.batcher.healing and not self.table.stranded(self.failover.suspects):
            self.batcher.resume()  # the new table serves every expert around the masked actors (a stand-in)
        return new.version

    # --- requests ------------------------------------------------------------------------------------
    async def forward(self, layer: int, hidden: np.ndarray, wire_dtype: str = "") -> np.ndarray:
        """Hidden states [T, D] for one MoE layer → that layer's output [T, D] (same dtype, same format).

        wire_dtype "bfloat16": `hidden` is bf16 as its raw bits (exchange.to_host_array) and so is the
        answer; "" (or any other name): a plain numpy float array.

        Every outcome is observed for the metrics (`requests_total{outcome}`); refused requests (bad input,
        unknown layer, full queue) are also counted as `rejected` in stats."""
        t0 = time.perf_counter()
        try:
            out = await self._forward(layer, hidden, wire_dtype)
        except Exception as exc:
            if isinstance(exc, (InputError, UnknownExpertError)):  # BackpressureError: counted by the batcher
                self.batcher.counters.rejected += 1
            self.observations["requests"].append((layer if isinstance(layer, int) else -1,
                                                  time.perf_counter() - t0, type(exc).__name__))
            raise
        self.observations["requests"].append((layer, time.perf_counter() - t0, "ok"))
        self.counters["requests"] += 1
        return out

    async def _forward(self, layer: int, hidden: np.ndarray, wire_dtype: str = "") -> np.ndarray:
        layer = check_layer(layer, self.cfg.num_layers)
        if wire_dtype == "bfloat16":
            if not isinstance(hidden, np.ndarray) or hidden.dtype != np.int16:
                raise InputError(f"bfloat16 hidden states travel as int16 bits, got "
                                 f"{getattr(hidden, 'dtype', type(hidden).__name__)}")
            hidden = from_host_array(hidden, wire_dtype)
        x = check_hidden(hidden, self.cfg.layer.d_model, self.cfg.max_request_tokens)
        out = await self.batcher.submit(layer, x)
        return to_host_array(out.to(x.dtype))[0]

    async def _run_batch(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """The batcher's data path: route, exchange, combine; then record stats (dispatch lane held)."""
        table, transport, suspects = self.table, self.transport, self.failover.suspects
        policy = self.policy.for_layer(layer).for_route(table.masked_route(layer, suspects))
        hidden = hidden.to(self.device, non_blocking=True)  # the batch's one host -> device copy

        def prepared(batch: Any) -> None:
            self.in_flight_actors = waits_on(batch, table.actors, transport.every_member)
            late = self.in_flight_actors & (self.failover.suspects - suspects)  # pushed after the start
            if late:
                self.dropped_for = late
                run.cancel()  # raised at the exchange's first await: no row goes out

        run = asyncio.ensure_future(run_layer(hidden, layer, self.cfg.layer, self.layers[layer], policy,
                                              self.selector, table, transport,
                                              expert_load=self.stats_.window_load(layer).to(self.device),
                                              dtype=self.dtype, suspects=suspects, on_prepared=prepared))
        self.in_flight, self.in_flight_actors, self.dropped_for = run, frozenset(), frozenset()
        dropped = asyncio.ensure_future(self.batch_dropped.wait())
        try:
            await asyncio.wait({run, dropped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.in_flight = None
            dropped.cancel()
            if not run.done():
                run.cancel()  # dropped for a table switch, or the batcher is cancelling this batch
        if self.dropped_for:  # `suspect` cancelled it: retried at once on the survivors
            raise TransportError(f"layer {layer}: batch dropped: {', '.join(sorted(self.dropped_for))} stopped "
                                 f"answering the controller's liveness pings", actors=tuple(self.dropped_for))
        if not run.done() or run.cancelled():
            raise TransportError(f"layer {layer}: batch dropped: the controller replaced dead expert actors; "
                                 f"it is requeued on the new table")
        result = run.result()
        self._record(layer, result)
        if suspects:
            self.counters["served_masked"] += 1
        return result.output

    async def suspect(self, actors: list[str], recovered: list[str] | None = None) -> list[str]:
        """The controller's liveness pings found `actors` silent (dead, hung, or on a lost node): mask them at
        once, leave a collective group that holds one for the object store, and drop the batch in flight if it
        waits on one (the batcher requeues it on the surviving replicas; a stranded expert waits for the
        heal). `recovered` (pushed before, answering again) are un-masked. Returns the actors now masked.

        Does not take the dispatch lane (the batch in flight holds it): it must act while that batch waits."""
        if not isinstance(actors, list) or not all(isinstance(a, str) for a in actors):
            raise InputError(f"suspect: actors must be a list of actor ids, got {actors!r}")
        new = self.failover.suspect(self.table, actors, recovered or ())
        if new and self.transport is not None:
            self._fall_back(new)
            waiting = new & self.in_flight_actors
            if waiting and self.in_flight is not None and not self.in_flight.done():
                self.dropped_for = waiting
                self.in_flight.cancel()
            log.warning("router %s: liveness: avoiding %s until healed (transport %s)%s", self.router_id,
                        ", ".join(sorted(new)), self.transport.name, "; batch in flight dropped" if waiting else "")
        return sorted(self.failover.suspects)

    def _reroute(self, exc: BaseException) -> bool:
        """The batcher's failover (dispatch lane held): mask the actors `exc` names; if the transport is a
        collective group (one dead member breaks it), serve on the object store over the same actors until the
        healed table re-forms it. True when every expert still has a live replica (retry at once)."""
        named = failed_actors(exc)
        if isinstance(exc, RayActorError) and exc.actor_id:
            named += tuple(a for a, h in self.handles.items() if h._actor_id.hex() == exc.actor_id)
        covered = self.failover.mark(self.table, named)
        if not self.failover.suspects:
            return False  # nobody named (e.g. the batch deadline passed): wait for the heal
        self._fall_back(named)
        log.warning("router %s: avoiding %s until healed (transport %s)", self.router_id,
                    ", ".join(sorted(self.failover.suspects)), self.transport.name)
        return covered

    def _fall_back(self, lost: Any) -> None:
        """If the transport cannot serve without the lost members (a collective group: one dead member breaks
        it), serve on its fallback (the object store) over the same actors until the healed table re-forms it;
        the broken transport closes in the background."""
        replacement = self.transport.fallback(f"fallback: group lost {', '.join(sorted(lost))}")
        if replacement is None:
            return
        broken, self.transport = self.transport, replacement
        self.fallback = True
        task = asyncio.get_running_loop().create_task(self.switch.close(broken))  # bounded, a failure logged
        self.closing.add(task)
        task.add_done_callback(self.closing.discard)

    async def _heal(self, exc: BaseException) -> None:
        """Ask the controller to repair the cluster (the batcher bounds this by control_timeout_s)."""
        if self.controller is None:
            raise TransportError(f"router {self.router_id}: no controller to heal ({exc})")
        await self.controller.heal.remote(self.router_id)

    def _record(self, layer: int, result: BatchResult) -> None:
        """Stats of one finished batch; device tensors come to the host in one copy."""
        batch, tstats, t = result.batch, result.transport_stats, result.times
        E = self.cfg.layer.num_experts
        # a dropped assignment counts against the gate's own pick (scatter, not a mask: no device wait)
        dropped_at = torch.where(batch.routing.experts < 0, batch.gate.experts, E).flatten()
        dropped_per_expert = torch.zeros(E + 1, dtype=torch.long, device=dropped_at.device).scatter_add_(
            0, dropped_at, torch.ones_like(dropped_at))[:E]
        expert_counts, dropped_per_expert = torch.stack([batch.expert_counts, dropped_per_expert]).cpu()
        self.stats_.record(layer, expert_counts, batch.routing.num_dropped)
        if self.trace is not None:
            self.trace.write(layer, batch.routing.experts.cpu(), batch.routing.weights.cpu(), batch.gate.probs.cpu())
        self.expert_tokens[layer] += expert_counts
        c = self.counters
        c["batches"] += 1
        c["tokens"] += batch.plan.num_tokens
        c["dropped"] += batch.routing.num_dropped
        c["rerouted"] += batch.routing.num_rerouted
        self.token_rate.add(batch.plan.num_tokens, time.monotonic())
        for i, b in enumerate(tstats.bytes_out):
            self.bytes_out[i] += b
        per_actor = torch.tensor([b.num_rows for b in batch.buckets], dtype=torch.float)
        self.observations["batches"].append((layer, (expert_counts + dropped_per_expert).tolist(),
                                             dropped_per_expert.tolist(), balancedness(per_actor),
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

    def record_load(self, counts: list[list[int]]) -> None:
        """Routed-token counts [L][E] that direct clients (expertray/runtime/direct.py) served without a
        router: added to this router's load window, which the controller's balancing and autoscaling read."""
        L, E = self.cfg.num_layers, self.cfg.layer.num_experts
        if not (isinstance(counts, list) and len(counts) == L and all(
                isinstance(row, list) and len(row) == E and all(isinstance(c, int) and c >= 0 for c in row)
                for row in counts)):
            raise InputError(f"record_load: expected [{L}][{E}] counts >= 0")
        for layer, row in enumerate(counts):
            if any(row):
                tensor = torch.tensor(row, dtype=torch.long)
                self.stats_.record(layer, tensor)
                self.expert_tokens[layer] += tensor

    # --- observability -------------------------------------------------------------------------------
    async def stats(self) -> dict[str, Any]:
        """Counters, per-layer window load and balancedness (per actor, each expert's load split evenly over
        its replicas: policies.placement.device_loads), tokens_per_s over the last RATE_WINDOW_S seconds."""
        load = torch.stack([self.stats_.window_load(layer) for layer in range(self.cfg.num_layers)])  # [L, E]
        per_actor = device_loads(self.table, load.double().numpy())  # [L, A]
        layers = [{"layer": layer, "expert_load": load[layer].tolist(),
                   "balancedness": balancedness(torch.from_numpy(per_actor[layer])),
                   "expert_tokens_total": self.expert_tokens[layer].tolist(),
                   "drop_rate": self.stats_.window_drop_rate(layer)} for layer in range(self.cfg.num_layers)]
        return {"router": self.router_id, "pid": os.getpid(), "table_version": self.table.version,
                "uptime_s": time.time() - self.started_at,
                "tokens_per_s": self.token_rate.rate(time.monotonic()),
                "transport": self.transport.name if self.transport else None,
                "transport_detail": self.transport.describe() if self.transport else None,
                "device": str(self.device), **self.counters,
                "suspects": sorted(self.failover.suspects), "last_switch": dict(self.switch.last),
                **self.batcher.counters.as_dict(), "healing": self.batcher.healing,
                "queued_tokens": self.batcher.queued_tokens, "layers": layers,
                "bytes_out": dict(zip(self.table.actors, self.bytes_out)),
                "timing_ms_p50": {k: float(np.median(v)) if v else 0.0 for k, v in self.timing_ms.items()}}

    async def start_trace(self, path: str) -> str:
        """Record every routed batch (experts, weights, gate probs) to a msgpack trace at `path`."""
        from expertray.wire.trace import TraceWriter

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
        out["queued_tokens"] = self.batcher.queued_tokens
        return out

    async def reset_stats(self) -> None:
        for v in self.timing_ms.values():
            v.clear()
