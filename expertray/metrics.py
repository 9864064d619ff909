"""Prometheus metrics for one process: routing load, drops, balance, timings, queue depth, replicas.

`Metrics` owns its own `CollectorRegistry`, so several instances (tests, a router and a controller in
one process) never collide. Methods take plain numbers and lists; nothing here imports Ray or torch.

Per-expert cardinality is bounded: for each layer only the `per_expert_top_n` experts with the most
tokens routed so far get their own `expert` series; the rest are summed into `expert="other"`. When an
expert leaves the top-N its series is removed rather than folded into "other", so every series stays
monotonic and `rate()` never sees a spurious jump.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from expertray.errors import ConfigError

DEFAULT_METRICS_PORT = 9464
OTHER_EXPERT = "other"
# Actor round trips are ~1 ms and layer calls up to seconds: resolve 100 µs .. 10 s.
TIME_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                  1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True)
class MetricsConfig:
    """per_expert_top_n: experts per layer with their own series; per_expert_series: one series for all."""

    per_expert_top_n: int = 16
    per_expert_series: bool = False

    def __post_init__(self) -> None:
        if self.per_expert_top_n < 1:
            raise ConfigError(f"metrics.per_expert_top_n: must be >= 1, got {self.per_expert_top_n}")


@dataclass
class _LayerExperts:
    """Cumulative tokens routed per logical expert (for ranking) and which experts have a series."""

    routed: list[int]
    tracked: frozenset[int] = frozenset()
    replicas: list[int] | None = None
    has_other: bool = False


STOP_POLL_S = 0.02


class _QuietHandler(WSGIRequestHandler):
    """Serves the metrics without a log line per scrape."""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's signature
        return None


@dataclass
class _Endpoint:
    server: WSGIServer
    thread: threading.Thread


class Metrics:
    """Every expertray metric, registered in a private registry; see `render` and `serve`."""

    def __init__(self, config: MetricsConfig | None = None) -> None:
        self.config = config or MetricsConfig()
        self.registry = CollectorRegistry()
        r = self.registry
        self.tokens_routed = Counter("expertray_tokens_routed", "Token-expert assignments routed by the gate, "
                                     "dropped ones included.", ["layer", "expert"], registry=r)
        self.tokens_dropped = Counter("expertray_tokens_dropped", "Token-expert assignments dropped for capacity.",
                                      ["layer", "expert"], registry=r)
        self.balancedness = Gauge("expertray_balancedness", "Mean / max tokens per device in the last batch "
                                  "(1.0 is perfect).", ["layer"], registry=r)
        self.actor_compute = Histogram("expertray_actor_compute_seconds", "Expert compute time per actor call.",
                                       ["actor"], buckets=TIME_BUCKETS_S, registry=r)
        self.dispatch = Histogram("expertray_dispatch_seconds", "Dispatch time per layer batch (plan + send).",
                                  ["layer"], buckets=TIME_BUCKETS_S, registry=r)
        self.combine = Histogram("expertray_combine_seconds", "Combine time per layer batch.",
                                 ["layer"], buckets=TIME_BUCKETS_S, registry=r)
        self.queue_depth = Gauge("expertray_queue_depth", "Tokens waiting in a router queue.", ["router"], registry=r)
        self.replicas = Gauge("expertray_replicas", "Physical replicas per logical expert "
                              "(expert=\"other\": summed over untracked experts).", ["layer", "expert"], registry=r)
        self.autoscale_actions = Counter("expertray_autoscale_actions", "Autoscale actions applied, by kind.",
                                         ["kind"], registry=r)
        self.request_seconds = Histogram("expertray_request_seconds", "End-to-end request latency, all outcomes.",
                                         ["layer"], buckets=TIME_BUCKETS_S, registry=r)
        self.requests = Counter("expertray_requests", "Requests by outcome: ok or the error kind.",
                                ["outcome"], registry=r)
        self._layers: dict[int, _LayerExperts] = {}
        self._lock = threading.Lock()
        self._endpoint: _Endpoint | None = None

    # -- observations --------------------------------------------------------------------------------

    def observe_batch(self, layer: int, expert_counts: Sequence[int], dropped: Sequence[int],
                      balancedness: float, dispatch_s: float, combine_s: float) -> None:
        """Record one routed batch of `layer`. Both lists have one entry per logical expert (length E):
        expert_counts[e] token-expert assignments the gate sent to e, dropped ones included, so that
        dropped / routed is the drop rate; dropped[e] those not computed for lack of capacity."""
        if len(dropped) != len(expert_counts):
            raise ValueError(f"dropped has {len(dropped)} entries, expert_counts has {len(expert_counts)}")
        _check_counts("expert_counts", expert_counts)
        _check_counts("dropped", dropped)
        if not (math.isfinite(balancedness) and 0.0 <= balancedness <= 1.0):
            raise ValueError(f"balancedness must be in [0, 1], got {balancedness}")
        _check_seconds("dispatch_s", dispatch_s)
        _check_seconds("combine_s", combine_s)
        label = str(layer)
        with self._lock:
            state = self._layer(layer, len(expert_counts))
            state.routed = [a + int(b) for a, b in zip(state.routed, expert_counts, strict=True)]
            self._rerank(layer, state)
            other_routed = other_dropped = 0
            for expert, (count, drop) in enumerate(zip(expert_counts, dropped, strict=True)):
                if expert in state.tracked:
                    self.tokens_routed.labels(label, str(expert)).inc(int(count))
                    self.tokens_dropped.labels(label, str(expert)).inc(int(drop))
                else:
                    other_routed += int(count)
                    other_dropped += int(drop)
            if state.has_other:
                self.tokens_routed.labels(label, OTHER_EXPERT).inc(other_routed)
                self.tokens_dropped.labels(label, OTHER_EXPERT).inc(other_dropped)
        self.balancedness.labels(label).set(balancedness)
        self.dispatch.labels(label).observe(dispatch_s)
        self.combine.labels(label).observe(combine_s)

    def observe_actor(self, actor: str, compute_s: float) -> None:
        """Record one expert actor call's compute time."""
        _check_seconds("compute_s", compute_s)
        self.actor_compute.labels(str(actor)).observe(compute_s)

    def set_queue_depth(self, router: str, depth: int) -> None:
        """Set the number of tokens waiting in `router`'s queue."""
        if depth < 0:
            raise ValueError(f"queue depth must be >= 0, got {depth}")
        self.queue_depth.labels(str(router)).set(depth)

    def set_replicas(self, layer: int, counts: Sequence[int]) -> None:
        """Set physical replicas per logical expert of `layer` (length E, from the placement table)."""
        _check_counts("counts", counts)
        with self._lock:
            state = self._layer(layer, len(counts))
            state.replicas = [int(c) for c in counts]
            self._publish_replicas(layer, state, state.replicas)

    def count_action(self, kind: str) -> None:
        """Count one applied autoscale action (replicate, migrate, consolidate, drain, ...)."""
        if not kind:
            raise ValueError("autoscale action kind must be a non-empty string")
        self.autoscale_actions.labels(kind).inc()

    def observe_request(self, layer: int, seconds: float, outcome: str = "ok") -> None:
        """Record one request: its latency and its outcome ("ok" or an error kind, e.g. "backpressure")."""
        _check_seconds("seconds", seconds)
        if not outcome:
            raise ValueError("request outcome must be a non-empty string")
        self.request_seconds.labels(str(layer)).observe(seconds)
        self.requests.labels(outcome).inc()

    def observe_router(self, router: str, drained: Mapping[str, Any]) -> None:
        """Record what one router buffered since its last drain (`RouterActor.drain_observations`): batches
        (layer, counts, dropped, balancedness, dispatch_s, combine_s), actor calls (actor, seconds), requests
        (layer, seconds, outcome) and its queue depth in tokens."""
        for layer, counts, dropped, balancedness, dispatch_s, combine_s in drained["batches"]:
            self.observe_batch(layer, counts, dropped, balancedness, dispatch_s, combine_s)
        for actor, seconds in drained["actors"]:
            self.observe_actor(actor, seconds)
        for layer, seconds, outcome in drained["requests"]:
            self.observe_request(layer, seconds, outcome)
        self.set_queue_depth(router, drained["queued_tokens"])

    # -- exposition ----------------------------------------------------------------------------------

    def render(self) -> bytes:
        """The registry in Prometheus text exposition format."""
        return generate_latest(self.registry)

    def serve(self, port: int = DEFAULT_METRICS_PORT, host: str = "127.0.0.1") -> int:
        """Serve `render()` over HTTP from a daemon thread; port 0 picks a free port. Returns the bound port."""
        if self._endpoint is not None:
            raise RuntimeError(f"metrics endpoint already serving on {self.address}; call stop() first")
        # The server binds `port` itself, so port 0 needs no probe socket (and has no probe-then-bind race).
        server = make_server(host, port, make_wsgi_app(self.registry), ThreadingWSGIServer,
                             handler_class=_QuietHandler)
        # a short poll interval: stop() waits for the serving loop to notice (prometheus_client's own server
        # polls every 0.5 s, which every cluster shutdown then waited for)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": STOP_POLL_S},
                                  name="metrics-http", daemon=True)
        thread.start()
        self._endpoint = _Endpoint(server, thread)
        return server.server_port

    @property
    def address(self) -> tuple[str, int] | None:
        """(host, port) the HTTP endpoint is bound to, or None when not serving."""
        if self._endpoint is None:
            return None
        host, port = self._endpoint.server.server_address[:2]
        return str(host), int(port)

    def stop(self) -> None:
        """Shut the HTTP endpoint down, if one is running."""
        if self._endpoint is None:
            return
        self._endpoint.server.shutdown()
        self._endpoint.server.server_close()
        self._endpoint.thread.join(timeout=5)
        self._endpoint = None

    # -- cardinality ---------------------------------------------------------------------------------

    def _layer(self, layer: int, num_experts: int) -> _LayerExperts:
        state = self._layers.get(layer)
        if state is None:
            state = self._layers[layer] = _LayerExperts(routed=[0] * num_experts)
            self._rerank(layer, state)
        elif len(state.routed) != num_experts:
            raise ValueError(f"layer {layer} has {len(state.routed)} experts, got {num_experts} values")
        return state

    def _rerank(self, layer: int, state: _LayerExperts) -> None:
        """Track the top-N experts by tokens routed; ties keep the incumbent, so equal loads cause no churn."""
        n = len(state.routed)
        if self.config.per_expert_series or n <= self.config.per_expert_top_n:
            tracked = frozenset(range(n))
        else:
            ranked = sorted(range(n), key=lambda e: (-state.routed[e], e not in state.tracked, e))
            tracked = frozenset(ranked[:self.config.per_expert_top_n])
        if tracked == state.tracked:
            return
        label = str(layer)
        for expert in state.tracked - tracked:
            self.tokens_routed.remove(label, str(expert))
            self.tokens_dropped.remove(label, str(expert))
            if state.replicas is not None:
                self.replicas.remove(label, str(expert))
        for expert in tracked - state.tracked:
            # Create the series at 0 so a tracked expert is visible before it receives tokens.
            self.tokens_routed.labels(label, str(expert))
            self.tokens_dropped.labels(label, str(expert))
        state.tracked = tracked
        state.has_other = len(tracked) < n
        if state.has_other:
            self.tokens_routed.labels(label, OTHER_EXPERT)
            self.tokens_dropped.labels(label, OTHER_EXPERT)
        if state.replicas is not None:
            self._publish_replicas(layer, state, state.replicas)

    def _publish_replicas(self, layer: int, state: _LayerExperts, replicas: list[int]) -> None:
        label = str(layer)
        for expert in state.tracked:
            self.replicas.labels(label, str(expert)).set(replicas[expert])
        if state.has_other:
            other = sum(c for e, c in enumerate(replicas) if e not in state.tracked)
            self.replicas.labels(label, OTHER_EXPERT).set(other)


def _check_counts(name: str, values: Sequence[int]) -> None:
    for i, v in enumerate(values):
        if v < 0:
            raise ValueError(f"{name}[{i}] must be >= 0, got {v}")


def _check_seconds(name: str, seconds: float) -> None:
    if not (math.isfinite(seconds) and seconds >= 0):
        raise ValueError(f"{name} must be a finite number of seconds >= 0, got {seconds}")
