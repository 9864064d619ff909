"""Engine replicas: a Serve deployment whose replicas each hold the model's dense weights (embeddings, attention,
norms, dense MLPs, LM head), the KV caches and an iteration-level scheduler (expertray.serving.engine); every MoE
layer goes to the shared expert actors over the direct path, one set of channels per ping-pong lane. Serve scales
the replicas on their queue length; expertray's controller scales the expert actors apart from them.

`generate` streams {"token_ids": [...], "finish_reason": None | "stop" | "length"} for one request; the ingress
(expertray.serve.openai_routes) turns it into OpenAI responses and re-runs a request on another replica when its
replica dies. Timings and occupancy go to Prometheus through Ray's metrics, tagged by replica.
"""

import asyncio
import logging
import os
import socket
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from ray import serve

from expertray.errors import ConfigError
from expertray.serving.engine import EngineConfig, Event
from expertray.serving.loader import load_engine
from expertray.serving.sampling import SamplingParams

log = logging.getLogger(__name__)
ENGINE_NUM_CPUS = 0.5
ENGINE_MAX_REPLICAS = 4
ENGINE_MAX_ONGOING = 64
ENGINE_TARGET_ONGOING = 16  # Serve adds a replica when the replicas average more requests than this
CONNECT_TIMEOUT_S = 600.0  # the ingress launches the expert cluster; engines wait this long for it
IDLE_TIMEOUT_S = 300.0  # the most a request waits for its next event from the engine
REPORT_S = 2.0  # stats to the controller this often
# What an engine replica exports (name → kind), as Ray metrics: Prometheus sees them prefixed "ray_".
ENGINE_METRICS = {"expertray_engine_ttft_seconds": "histogram", "expertray_engine_tpot_seconds": "histogram",
                  "expertray_engine_e2e_seconds": "histogram", "expertray_engine_prompt_tokens": "counter",
                  "expertray_engine_output_tokens": "counter", "expertray_engine_running": "gauge",
                  "expertray_engine_waiting": "gauge", "expertray_engine_kv_used_tokens": "gauge",
                  "expertray_engine_kv_budget_tokens": "gauge"}
_LATENCY_BUCKETS_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]


class PrometheusObserver:
    """expertray.serving.engine.EngineObserver over Ray's metrics (exported with Ray's, tagged by replica)."""

    def __init__(self, replica: str) -> None:
        from ray.util.metrics import Counter, Gauge, Histogram

        tags = ("replica",)

        def hist(name: str, what: str) -> Any:
            return Histogram(name, what, boundaries=_LATENCY_BUCKETS_S, tag_keys=tags)

        self.ttft = hist("expertray_engine_ttft_seconds", "Time to first token of finished requests.")
        self.tpot = hist("expertray_engine_tpot_seconds", "Time per output token after the first.")
        self.e2e = hist("expertray_engine_e2e_seconds", "End-to-end latency of finished requests.")
        self.tokens_in = Counter("expertray_engine_prompt_tokens", "Prompt tokens of finished requests.", tag_keys=tags)
        self.tokens_out = Counter("expertray_engine_output_tokens", "Output tokens of finished requests.",
                                  tag_keys=tags)
        self.running = Gauge("expertray_engine_running", "Sequences prefilling or decoding.", tag_keys=tags)
        self.waiting = Gauge("expertray_engine_waiting", "Requests queued in the engine.", tag_keys=tags)
        self.kv_used = Gauge("expertray_engine_kv_used_tokens", "KV cells held (padding included).", tag_keys=tags)
        self.kv_budget = Gauge("expertray_engine_kv_budget_tokens", "KV cells the engine may hold.", tag_keys=tags)
        self.tags = {"replica": replica}

    def request_done(self, ttft_s: float, tpot_s: float | None, e2e_s: float, prompt_tokens: int,
                     output_tokens: int) -> None:
        self.ttft.observe(ttft_s, self.tags)
        if tpot_s is not None:
            self.tpot.observe(tpot_s, self.tags)
        self.e2e.observe(e2e_s, self.tags)
        self.tokens_in.inc(prompt_tokens, self.tags)
        if output_tokens:
            self.tokens_out.inc(output_tokens, self.tags)

    def occupancy(self, running: int, waiting: int, kv_used: int, kv_budget: int) -> None:
        self.running.set(running, self.tags)
        self.waiting.set(waiting, self.tags)
        self.kv_used.set(kv_used, self.tags)
        self.kv_budget.set(kv_budget, self.tags)


def await_cluster(model: str, timeout_s: float) -> Any:
    """The running expertray cluster serving checkpoint `model`, waited for up to `timeout_s` (the ingress may
    still be launching it); ConfigError when it serves something else or never comes."""
    from expertray.api import connect

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            cluster = connect(None)
            break
        except ConfigError:
            if time.monotonic() > deadline:
                raise ConfigError(f"engine: no expertray cluster came up within {timeout_s:.0f} s to serve "
                                  f"{model}") from None
            time.sleep(1.0)
    served = cluster.cfg.model
    if not served or Path(served).resolve() != Path(model).resolve():
        raise ConfigError(f"engine: the running expertray cluster serves {served or 'random weights'}, not {model}: "
                          "stop it first or serve its checkpoint")
    return cluster


@serve.deployment(name="ExpertRayEngine", ray_actor_options={"num_cpus": ENGINE_NUM_CPUS},
                  max_ongoing_requests=ENGINE_MAX_ONGOING, max_queued_requests=4 * ENGINE_MAX_ONGOING,
                  autoscaling_config={"min_replicas": 1, "max_replicas": ENGINE_MAX_REPLICAS,
                                      "target_ongoing_requests": ENGINE_TARGET_ONGOING})
class EngineReplica:
    def __init__(self, model: str, engine: dict[str, Any] | None = None,
                 connect_timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        """Wait for the expert cluster serving `model`, load the dense weights, start the engine
        (`engine`: EngineConfig fields)."""
        cfg = EngineConfig(**(engine or {}))
        cluster = await_cluster(model, connect_timeout_s)
        limit = cluster.cfg.max_request_tokens
        for name in ("max_running", "prefill_chunk_tokens"):
            if getattr(cfg, name) > limit:
                raise ConfigError(f"engine.{name}={getattr(cfg, name)} is over the cluster's max_request_tokens="
                                  f"{limit} (one MoE call carries that many tokens at most)")
        self.replica = f"{socket.gethostname()}:{os.getpid()}"
        self.engine = load_engine(model, lambda d, c: [cluster.new_direct() for _ in range(cfg.micro_batches)],
                                  cfg, PrometheusObserver(self.replica), dtype=cluster.cfg.dtype)
        self._cluster = cluster
        self._reporting = threading.Event()
        threading.Thread(target=self._report, name="engine-report", daemon=True).start()
        log.info("engine %s serving %s with %d micro-batch lane(s)", self.replica, model, cfg.micro_batches)

    def _report(self) -> None:
        """Hand this replica's stats to the expertray controller every REPORT_S (`expertray status` shows them)."""
        while not self._reporting.wait(REPORT_S):
            try:
                self._cluster.controller.report_engine.remote(self.replica, self.stats())
            except Exception as exc:  # noqa: BLE001 - a missed report only ages this replica's line in status
                log.debug("engine report failed: %s", exc)

    async def generate(self, prompt_ids: list[int], params: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Stream one request's tokens. Raises InputError (never servable), BackpressureError (queue full) or
        the cluster's error; a cancelled stream (client gone) frees its sequence at once."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        sid = self.engine.submit(list(prompt_ids), SamplingParams(**params),
                                 lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        finished = False
        try:
            while not finished:
                try:
                    event = await asyncio.wait_for(events.get(), IDLE_TIMEOUT_S)
                except asyncio.TimeoutError:
                    raise TimeoutError(f"engine {self.replica}: no token for {IDLE_TIMEOUT_S:.0f} s") from None
                if event.error is not None:
                    finished = True
                    raise event.error
                finished = event.finish_reason is not None
                yield {"token_ids": event.token_ids, "finish_reason": event.finish_reason}
        finally:
            if not finished:
                self.engine.cancel(sid)

    def stats(self) -> dict[str, Any]:
        """This replica's engine counters, occupancy and stage times; `actor`: its Ray actor's name."""
        import ray

        return {"replica": self.replica, "actor": ray.get_runtime_context().get_actor_name(), **self.engine.stats()}

    def check_health(self) -> None:
        if not self.engine.alive():
            raise RuntimeError(f"engine {self.replica}: its step thread is not running")

    def __del__(self) -> None:
        if hasattr(self, "_reporting"):
            self._reporting.set()
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.stop(timeout_s=2.0)
            engine.lanes.shutdown()
