"""Bounded soak: concurrent HTTP and Python-API clients for EXPERTRAY_SOAK_S seconds (default 20; the
`-m slow` variant runs at least 60 s). Every answer is compared with the in-process layer.

Asserted: 0 lost (every request got an answer or a clear error before its timeout), 0 wrong, 0 errors (the
limits are far above the offered load; the fault variant's killed actor is healed within the retries), and
no object-store growth once the clients are done. Recorded and printed (run with -s): requests, p50/p99 latency per interface, router queue
depth samples, RSS of the router and expert processes, object-store bytes before / peak / after.
"""

from __future__ import annotations

import gc
import json
import os
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray
import torch
from ray._private.internal_api import get_memory_info_reply, get_state_from_address, global_gc

from expertray.api import launch, random_model
from expertray.config import ClusterConfig, GateConfig, MoELayerConfig
from expertray.wire.http_codec import decode_tensor, encode_tensor, pack, unpack

pytestmark = pytest.mark.ray
D = 64
SOAK_S = float(os.environ.get("EXPERTRAY_SOAK_S", "20"))
REQUEST_TIMEOUT_S = 60.0
# Objects over Ray's inline limit (100 KiB) go through the plasma store: the 512-token requests and answers
# (512 x 64 x 4 B = 128 KiB) do, so a leak of either would show up in the store's byte count.
TOKEN_SIZES = (1, 7, 64, 200, 512)
# Ray frees plasma objects asynchronously after their last reference drops, and a worker may still hold
# its most recent argument buffer: allow up to two of the largest objects to linger after the soak.
STORE_TOLERANCE_BYTES = 2 * max(TOKEN_SIZES) * D * 4


@dataclass
class Tally:
    """Outcomes of one interface's requests (shared by its client threads)."""

    latencies_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    lost: int = 0
    wrong: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def summary(self) -> dict[str, Any]:
        lat = np.array(self.latencies_ms or [0.0])
        return {"requests": len(self.latencies_ms) + len(self.errors) + self.lost, "ok": len(self.latencies_ms),
                "errors": len(self.errors), "error_kinds": sorted(set(self.errors)), "lost": self.lost,
                "wrong": self.wrong, "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99))}


def _store_bytes() -> tuple[int, int]:
    """(bytes used, objects) in the node's plasma store, from the raylet (what `ray memory --stats-only` shows)."""
    stats = get_memory_info_reply(get_state_from_address(ray.get_runtime_context().gcs_address)).store_stats
    return int(stats.object_store_bytes_used), int(stats.num_local_objects)


def _rss_mib(pid: int) -> float:
    """Resident set size of a local process (Linux /proc; includes plasma pages the process touched)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


@pytest.fixture(scope="module")
def served(ray_session, serve_port):
    from ray import serve

    from expertray.serve.layers import run_app

    cfg = ClusterConfig(layer=MoELayerConfig(d_model=D, d_ff=128, gate=GateConfig("mixtral", 8, 2)), num_layers=2,
                        num_expert_actors=3, actor_num_cpus=0.25, router_num_cpus=0.25, max_wait_ms=2.0,
                        metrics_port=-1)
    layers = random_model(cfg)
    cluster = launch(cfg, layers, detached=False)
    yield cluster, layers, run_app(serve_port, name="expertray-soak", quiet=True)
    serve.delete("expertray-soak")
    cluster.shutdown()


def _pool(layers) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """(layer, input [T, D], in-process answer) for every size and layer: clients draw from it."""
    rng = np.random.default_rng(0)
    pool = []
    for tokens in TOKEN_SIZES:
        for layer in range(len(layers)):
            x = rng.standard_normal((tokens, D)).astype(np.float32)
            pool.append((layer, x, layers[layer](torch.from_numpy(x)).numpy()))
    return pool


def _http_client(base: str, pool, deadline: float, tally: Tally, seed: int) -> None:
    rng = np.random.default_rng(seed)
    while time.monotonic() < deadline:
        layer, x, ref = pool[rng.integers(len(pool))]
        use_json = x.shape[0] <= 7 and rng.random() < 0.5
        body = json.dumps({"hidden": x.tolist()}).encode() if use_json else pack({"hidden": encode_tensor(x)})
        req = urllib.request.Request(f"{base}/v1/layers/{layer}/forward", data=body, headers={
            "content-type": "application/json" if use_json else "application/msgpack"})
        t0 = time.perf_counter()
        try:
            with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT_S) as r:
                payload = r.read()
        except urllib.error.HTTPError as e:  # a clear error: status + message
            with tally.lock:
                tally.errors.append(f"HTTP {e.code}: {e.read()[:120]!r}")
            continue
        except OSError:  # timeout, reset, refused: the request got no answer
            with tally.lock:
                tally.lost += 1
            continue
        ms = (time.perf_counter() - t0) * 1e3
        out = np.asarray(json.loads(payload)["output"], np.float32) if use_json else decode_tensor(unpack(payload)["output"])
        with tally.lock:
            tally.latencies_ms.append(ms)
            tally.wrong += not np.allclose(out, ref, atol=1e-5, rtol=0)


def _api_client(cluster, pool, deadline: float, tally: Tally, seed: int) -> None:
    rng = np.random.default_rng(seed)
    while time.monotonic() < deadline:
        layer, x, ref = pool[rng.integers(len(pool))]
        t0 = time.perf_counter()
        try:
            out = ray.get(cluster.forward_ref(layer, x), timeout=REQUEST_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            with tally.lock:
                tally.lost += 1
            continue
        except Exception as exc:  # noqa: BLE001 - a clear error, counted by kind
            with tally.lock:
                tally.errors.append(type(exc).__name__)
            continue
        ms = (time.perf_counter() - t0) * 1e3
        with tally.lock:
            tally.latencies_ms.append(ms)
            tally.wrong += not np.allclose(out, ref, atol=1e-5, rtol=0)


def _settled_store(baseline: int | None = None, timeout_s: float = 20.0) -> tuple[int, int]:
    """Store usage after garbage collection everywhere; with a baseline, poll until usage is back to it
    (or `timeout_s` passed): Ray frees objects asynchronously."""
    deadline = time.monotonic() + timeout_s
    while True:
        gc.collect()
        global_gc()  # drop cyclic garbage holding object refs in every worker
        time.sleep(0.5)
        used, objects = _store_bytes()
        if baseline is None or used <= baseline or time.monotonic() > deadline:
            return used, objects


def soak(served, seconds: float, http_threads: int = 3, api_threads: int = 2,
         kill_at_s: float | None = None) -> dict[str, Any]:
    """Run the clients for `seconds`; with `kill_at_s`, kill one expert actor that long after the start."""
    cluster, layers, base = served
    pool = _pool(layers)
    for layer, x, _ in pool[:4]:  # warm up both paths before taking the baseline
        ray.get(cluster.forward_ref(layer, x))
        urllib.request.urlopen(urllib.request.Request(f"{base}/v1/layers/{layer}/forward",
                                                      data=pack({"hidden": encode_tensor(x)}),
                                                      headers={"content-type": "application/msgpack"})).read()
    pids = {a: s["pid"] for a, s in cluster.status()["actors"].items()}
    pids.update({f"router-{i}": ray.get(r.__ray_call__.remote(lambda self: os.getpid()))
                 for i, r in enumerate(cluster.routers)})
    rss_before = {name: _rss_mib(pid) for name, pid in pids.items()}
    store_before, objects_before = _settled_store()

    http, api = Tally(), Tally()
    deadline = time.monotonic() + seconds
    threads = [threading.Thread(target=_http_client, args=(base, pool, deadline, http, i)) for i in range(http_threads)]
    threads += [threading.Thread(target=_api_client, args=(cluster, pool, deadline, api, 100 + i))
                for i in range(api_threads)]
    for t in threads:
        t.start()
    queue_samples: list[int] = []
    store_peak = store_before
    killed = None
    status_failures = 0
    while any(t.is_alive() for t in threads):
        if kill_at_s is not None and killed is None and time.monotonic() > deadline - seconds + kill_at_s:
            killed = sorted(cluster.table().actors)[-1]
            ray.kill(ray.get_actor(f"expertray-{killed}", namespace="expertray"), no_restart=True)
        try:
            queue_samples += [r["queued_tokens"] for r in cluster.status()["routers"]]
        except ray.exceptions.RayError:  # counted and asserted 0: status() reports dead pieces, never raises
            status_failures += 1
        store_peak = max(store_peak, _store_bytes()[0])
        time.sleep(1.0)
    for t in threads:
        t.join(REQUEST_TIMEOUT_S + 5)
    assert not any(t.is_alive() for t in threads), "a client thread hung past its request timeout"

    store_after, objects_after = _settled_store(store_before)
    status = cluster.status()
    routers = status["routers"]
    return {"seconds": seconds, "killed": killed, "heals": [e["reason"] for e in status["history"]
                                                           if e["reason"].startswith("heal")],
            "http": http.summary(), "api": api.summary(),
            "status_failures": status_failures, "router_errors": sum(r["errors"] for r in routers), "router_retries": sum(r["retries"] for r in routers),
            "queue_depth_tokens": {"samples": len(queue_samples), "max": max(queue_samples, default=0),
                                   "mean": float(np.mean(queue_samples or [0]))},
            "rss_mib": {name: [round(rss_before[name], 1), round(_rss_mib(pid), 1) if name != killed else None]
                        for name, pid in pids.items()},
            "object_store": {"before_bytes": store_before, "peak_bytes": store_peak, "after_bytes": store_after,
                             "objects_before": objects_before, "objects_after": objects_after}}


def _check(report: dict[str, Any]) -> None:
    print("soak report:", json.dumps(report))
    for name in ("http", "api"):
        part = report[name]
        assert part["ok"] > 0, f"{name}: no request succeeded"
        assert (part["lost"], part["wrong"], part["errors"]) == (0, 0, 0), f"{name}: {part}"
    assert report["router_errors"] == 0
    assert report["status_failures"] == 0, "status() raised while the cluster was serving"
    assert report["killed"] is None or len(report["heals"]) >= 1, "the killed actor was not replaced"
    store = report["object_store"]
    assert store["after_bytes"] <= store["before_bytes"] + STORE_TOLERANCE_BYTES, store


def test_soak(served) -> None:
    _check(soak(served, SOAK_S))


@pytest.mark.slow
def test_soak_long(served) -> None:
    _check(soak(served, max(60.0, SOAK_S), http_threads=4, api_threads=3))


@pytest.mark.slow
def test_soak_with_an_expert_actor_killed(served) -> None:
    """The fault path under sustained load: requeue → controller heal → group re-formed; still 0 lost,
    0 wrong, 0 errors (a request is retried up to 3 times before it fails with ExpertUnavailableError)."""
    seconds = max(30.0, SOAK_S)
    _check(soak(served, seconds, kill_at_s=seconds / 3))
