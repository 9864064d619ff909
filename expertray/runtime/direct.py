"""Direct layers: a caller routes its own tokens and speaks to the expert actors over standing channels (M2N,
as attention nodes do in MegaScale-Infer), with no router hop and no Ray task per layer call. Ray-free: the
cluster is reached through a `ClusterLink` (expertray.api implements it over the controller).

One call, in order: gate → routing policy → replica selection → plan and per-actor buckets (`prepare`) → the
buckets over the actors' channels (`ChannelSet.exchange`) → combine (`finish`), all in the calling thread.

Elastic and fault paths:
- The placement table and the actors' endpoints come from the controller (`ClusterLink.spec`) and are
  refreshed in the background every `REFRESH_S` and at once after a failure; channels to actors that stay in
  the table are kept across versions.
- A dead or hung actor (its channel reset, or no answer by the deadline) is reported to the controller
  (which heals) and avoided wherever its experts have another replica; the call is served again at once on
  the survivors, or, for an expert it held alone, as soon as a healed table arrives. A new table clears the
  avoided set (the controller's liveness loop decides who is dead). The controller's liveness suspects
  (actors silent for `liveness_timeout_s`) are avoided too, and a call waiting on one is ended at the next
  refresh and served again, rather than at its deadline.
- An actor that no longer holds a slot of the caller's table (the controller migrated it) answers so; the
  table is refreshed and the call served again. Nothing is lost: a call returns its full answer or raises
  RequestTimeoutError at `request_timeout_s`.
- Load: each layer's expert counts are kept (the routing policy's `expert_load`) and handed to the link
  every `REPORT_S` so the controller's balancing sees traffic that never passed a router.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from expertray.config import ClusterConfig
from expertray.errors import ExpertRayError, RequestTimeoutError
from expertray.layer.route import LayerParams, finish, prepare
from expertray.runtime.weights import serving_dtype
from expertray.seams import ReplicaSelector, RoutingPolicy
from expertray.state.loadstats import LoadStats
from expertray.state.placement_table import PlacementTable
from expertray.validation import check_hidden, check_layer
from expertray.wire.channel import Channel, ChannelError, ChannelSet, Endpoint

log = logging.getLogger(__name__)

REFRESH_S = 0.5  # the table and endpoints are re-read this often in the background
REPORT_S = 1.0  # expert counts go to the controller this often
RETRY_PAUSE_S = 0.05  # between two tries of a call that waits for a healed table


class ClusterLink(Protocol):
    """What direct layers need of the cluster's control plane (each call bounded by the implementation)."""

    def spec(self) -> dict[str, Any]:
        """{"table": PlacementTable.to_dict(), "endpoints": {actor: Endpoint fields}, "suspects": [actor]}:
        actors that did not answer have no endpoint; suspects stopped answering the liveness pings."""

    def report_failed(self, actors: list[str]) -> None:
        """Tell the controller these actors did not answer (it heals); must not block."""

    def report_load(self, counts: list[list[int]]) -> None:
        """Hand [L][E] routed-token counts since the last report to the controller's balancing; must not block."""


@dataclass(frozen=True)
class _State:
    table: PlacementTable
    channels: ChannelSet
    missing: frozenset[str]  # table actors with no endpoint (did not answer the controller)


class DirectLayers:
    """`forward(layer, hidden)` for every MoE layer of a cluster, routed in this process with the cluster's
    routing `policy` and replica `selector` (thread-safe: calls run one at a time)."""

    def __init__(self, cfg: ClusterConfig, params: list[LayerParams], link: ClusterLink, policy: RoutingPolicy,
                 selector: ReplicaSelector) -> None:
        if len(params) != cfg.num_layers:
            raise ExpertRayError(f"{len(params)} layers of gate parameters for a {cfg.num_layers}-layer cluster")
        self.cfg = cfg
        self.params = params
        self.link = link
        self.dtype = getattr(torch, serving_dtype(cfg))
        self.policy, self.selector = policy, selector  # the cluster's, made from its config by the caller
        self.stats = LoadStats(cfg.num_layers, cfg.layer.num_experts, window_batches=cfg.stats_window_batches)
        # rows / bytes_out: routed rows (and their bytes, in the serving dtype) sent to the actors
        self.counters = {"calls": 0, "tokens": 0, "rows": 0, "bytes_out": 0, "retries": 0, "refreshes": 0}
        self._channels: dict[tuple[str, str, int], Channel] = {}
        self._retired: list[Channel] = []  # channels of actors no longer in the table, closed between calls
        self._avoid: set[str] = set()
        self._waiting_on: set[str] = set()  # the actors the call in flight waits for
        self._suspects: frozenset[str] = frozenset()  # the controller's liveness suspects, as last read
        self._unreported = torch.zeros(cfg.num_layers, cfg.layer.num_experts, dtype=torch.long)
        self._reported_at = time.monotonic()
        self._lock = threading.Lock()  # one call at a time
        self._counts_lock = threading.Lock()
        self._state_lock = threading.Condition()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._state = self._build(link.spec())
        self._refresher = threading.Thread(target=self._refresh_loop, name="expertray-direct-refresh", daemon=True)
        self._refresher.start()

    # --- table and channels ----------------------------------------------------------------------------
    def _build(self, spec: dict[str, Any]) -> _State:
        table = PlacementTable.from_dict(spec["table"])
        endpoints = {a: Endpoint(**e) for a, e in spec["endpoints"].items()}
        channels, missing = [], set()
        for a in table.actors:
            e = endpoints.get(a)
            if e is None:
                missing.add(a)
                e = Endpoint.unknown(a)  # never connects: the actor is avoided until it answers
            key = (a, e.host, e.port)
            channel = self._channels.get(key)
            if channel is None:
                channel = self._channels[key] = Channel(e)
            channels.append(channel)
        keep = {(a, c.endpoint.host, c.endpoint.port) for a, c in zip(table.actors, channels)}
        for key in [k for k in self._channels if k not in keep]:  # closed between calls: one may be in use
            self._retired.append(self._channels.pop(key))
        return _State(table, ChannelSet(channels), frozenset(missing))

    def _refresh_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(REFRESH_S)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.refresh()
            except Exception as exc:  # noqa: BLE001 - the controller may be restarting; calls go on
                log.debug("direct layers: table not refreshed: %s", exc)
            self._report_load()

    def refresh(self) -> None:
        """Read the table and endpoints now; a newer table (or new endpoints) replaces the current one. A call
        waiting on an actor the controller now suspects (silent: hung, or on a lost node) is ended at once
        and served again around it, instead of waiting for its deadline or the actor's heal."""
        spec = self.link.spec()
        self._suspects = frozenset(spec.get("suspects", ()))
        late = self._suspects & self._waiting_on
        if late:
            self._state.channels.abort(late)
        with self._state_lock:
            old = self._state
            version = spec["table"].get("version")
            if version == old.table.version and set(spec["endpoints"]) >= set(old.table.actors) - old.missing \
                    and not (old.missing & set(spec["endpoints"])):
                return
            self._state = self._build(spec)
            if version != old.table.version:
                self._avoid.clear()  # the controller healed or changed the placement: start trusting again
            self.counters["refreshes"] += 1
            self._state_lock.notify_all()

    def _await_newer(self, version: int, deadline: float) -> None:
        """Ask for a refresh and wait (until `deadline`, at most RETRY_PAUSE_S × 4) for a table newer than
        `version`."""
        self._wake.set()
        with self._state_lock:
            self._state_lock.wait_for(lambda: self._state.table.version != version,
                                      timeout=max(0.0, min(deadline - time.monotonic(), 4 * RETRY_PAUSE_S)))

    def _report_load(self) -> None:
        with self._counts_lock:
            counts, self._unreported = self._unreported, torch.zeros_like(self._unreported)
        if counts.any():
            try:
                self.link.report_load(counts.tolist())
            except Exception as exc:  # noqa: BLE001 - balancing is best effort; serving is not
                log.debug("direct layers: load not reported: %s", exc)

    # --- the data path ---------------------------------------------------------------------------------
    def forward(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """One MoE layer: [..., D] in, same shape and dtype out, or RequestTimeoutError by request_timeout_s."""
        layer = check_layer(layer, self.cfg.num_layers)
        x = check_hidden(hidden, self.cfg.layer.d_model, self.cfg.max_request_tokens)
        deadline = time.monotonic() + self.cfg.request_timeout_s
        with self._lock:
            while self._retired:
                self._retired.pop().close()
            while True:
                state = self._state
                try:
                    out = self._once(layer, x, state, deadline)
                    break
                except ChannelError as exc:
                    if not exc.actors and not exc.unknown_slot:
                        raise  # an actor's own error computing the rows: trying again would only repeat it
                    self.counters["retries"] += 1
                    new = set(exc.actors) - self._avoid
                    if new:  # each failed actor once per table version
                        self._avoid.update(new)
                        self.link.report_failed(sorted(new))
                    if time.monotonic() >= deadline:
                        raise RequestTimeoutError(f"layer {layer}: no answer within request_timeout_s="
                                                  f"{self.cfg.request_timeout_s:g} s (last: {exc})") from exc
                    if exc.unknown_slot or self._stranded(state, layer):
                        self._await_newer(state.table.version, deadline)
                    else:
                        self._wake.set()
        return out.to(x.dtype).reshape(hidden.shape)

    def _stranded(self, state: _State, layer: int) -> bool:
        avoid = frozenset(self._avoid | self._suspects | state.missing)
        return any(lay == layer for lay, _ in state.table.stranded(avoid))

    def _once(self, layer: int, x: torch.Tensor, state: _State, deadline: float) -> torch.Tensor:
        table = state.table
        avoid = frozenset(self._avoid | self._suspects | state.missing)
        route = table.masked_route(layer, avoid)
        policy = self.policy.for_layer(layer).for_route(route)
        batch = prepare(x, layer, self.cfg.layer, self.params[layer].gate, policy, self.selector, route,
                        len(table.actors), expert_load=self.stats.window_load(layer), rows_dtype=self.dtype)
        timeout_s = max(1e-3, min(self.cfg.collective_timeout_s, deadline - time.monotonic()))
        self._waiting_on = {table.actors[b.actor] for b in batch.buckets if b.num_rows}
        try:
            rows_out, _ = state.channels.exchange(layer, batch.rows, batch.buckets, timeout_s)
        finally:
            self._waiting_on = set()
        out = finish(batch, rows_out, x.to(self.dtype), self.params[layer].shared)
        self.stats.record(layer, batch.expert_counts, batch.routing.num_dropped)
        with self._counts_lock:
            self._unreported[layer] += batch.expert_counts
        c = self.counters
        c["calls"] += 1
        c["tokens"] += x.shape[0]
        c["rows"] += batch.rows.shape[0]
        c["bytes_out"] += batch.rows.numel() * batch.rows.element_size()
        return out

    def close(self) -> None:
        """Stop the refresher, hand over the last counts, close every channel."""
        self._stop.set()
        self._wake.set()
        self._refresher.join(timeout=5.0)
        self._report_load()
        with self._lock:
            for channel in [*self._channels.values(), *self._retired]:
                channel.close()
            self._channels.clear()
            self._retired.clear()
