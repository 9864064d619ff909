"""Standing channels under faults: a stream over the channel transport (router path) and over the direct path
(this process routing and speaking to the actors) keeps every answer exact while an expert actor and a router
are killed, a hung actor is replaced, and the placement changes under it."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import ray
import torch

from expertray.api import launch, random_model
from expertray.config import ClusterConfig, GateConfig, MoELayerConfig
from expertray.errors import ExpertRayError

pytestmark = pytest.mark.ray
D = 32


def _cfg(**kw) -> ClusterConfig:  # noqa: ANN003
    base = dict(layer=MoELayerConfig(d_model=D, d_ff=48, gate=GateConfig("mixtral", 8, 2)), num_layers=2,
                num_expert_actors=3, num_routers=2, transport="channel", actor_num_cpus=0.25,
                router_num_cpus=0.25, metrics_port=-1, collective_timeout_s=10.0, request_timeout_s=40.0)
    return ClusterConfig(**{**base, **kw})


def _stream(forward, layers, stop: threading.Event, seed: int) -> tuple[int, int, list[str]]:  # noqa: ANN001
    """Requests until `stop`: (answered exactly, wrong, clear errors)."""
    ok = wrong = 0
    errors: list[str] = []
    i = seed
    while not stop.is_set():
        x = torch.randn(1 + i % 9, D, generator=torch.Generator().manual_seed(i))
        try:
            out = forward(i % 2, x)
        except ExpertRayError as exc:  # a clear error is allowed (counted), silence is not
            errors.append(f"{type(exc).__name__}: {exc}")
        else:
            if torch.allclose(out, layers[i % 2](x), atol=1e-5, rtol=0):
                ok += 1
            else:
                wrong += 1
        i += 2
    return ok, wrong, errors


def test_streams_over_channels_survive_killing_an_expert_actor_and_a_router(ray_session, until) -> None:
    cfg = _cfg()
    layers = random_model(cfg)
    cluster = launch(cfg, layers, detached=False)
    direct = cluster.direct()
    assert cluster.status()["transport"] == "channel"
    stop = threading.Event()
    results: dict[str, tuple[int, int, list[str]]] = {}
    streams = [threading.Thread(target=lambda n=n, f=f, s=s: results.__setitem__(n, _stream(f, layers, stop, s)))
               for s, (n, f) in enumerate([("router", cluster.forward), ("direct", direct.forward)])]
    try:
        for t in streams:
            t.start()
        time.sleep(1.5)
        ray.kill(ray.get_actor("expertray-expert-1", namespace="expertray"), no_restart=True)
        time.sleep(1.0)
        ray.kill(cluster.routers[0], no_restart=True)
        until(lambda: "expert-1" not in cluster.table().actors, 60, "expert-1 replaced")
        time.sleep(2.0)  # both streams serve on the healed table
        stop.set()
        for t in streams:
            t.join(cfg.request_timeout_s + 10)
        assert not any(t.is_alive() for t in streams), "a stream hung"
        for name, (ok, wrong, errors) in results.items():
            assert wrong == 0 and errors == [], (name, ok, wrong, errors[:3])
            assert ok > 20, (name, ok)
        assert direct.counters["retries"] >= 1  # the direct stream met the dead actor and was served again
        assert "expert-1" not in direct._state.table.actors
    finally:
        stop.set()
        cluster.shutdown()


def test_direct_calls_survive_a_hung_actor_and_a_migration(ray_session, until) -> None:
    cfg = _cfg(num_routers=1, ping_timeout_s=2.0, liveness_timeout_s=0.5)
    layers = random_model(cfg)
    cluster = launch(cfg, layers, detached=False)
    direct = cluster.direct()
    pid = cluster.status()["actors"]["expert-2"]["pid"]
    try:
        x = torch.randn(12, D, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(direct.forward(0, x), layers[0](x), atol=1e-5, rtol=0)
        # a migration: expert 0 of layer 1 moves; the direct client's old table asks the old actor once
        src = cluster.table().replicas(1, 0)[0].actor
        dst = next(a for a in cluster.table().actors if a != src)
        cluster.migrate(1, 0, dst, src)
        for i in range(6):
            xi = torch.randn(16, D, generator=torch.Generator().manual_seed(i))
            torch.testing.assert_close(direct.forward(1, xi), layers[1](xi), atol=1e-5, rtol=0)
        os.kill(pid, signal.SIGSTOP)  # hung: its channel stays open but never answers
        t0 = time.monotonic()
        for i in range(4):  # 32 tokens x top-2 of 8: every actor is asked
            xi = torch.randn(32, D, generator=torch.Generator().manual_seed(10 + i))
            torch.testing.assert_close(direct.forward(i % 2, xi), layers[i % 2](xi), atol=1e-5, rtol=0)
        assert time.monotonic() - t0 < cfg.request_timeout_s  # served after the heal, not at a deadline
        until(lambda: "expert-2" not in cluster.table().actors, 30, "hung expert-2 replaced")
    finally:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
        cluster.shutdown()


def test_shadow_replicas_serve_a_killed_actor_at_once_and_are_restored(ray_session, until) -> None:
    """min_replicas_per_expert=2: every expert starts on two actors; a killed actor's experts are answered
    from their shadows before any heal lands (the table version has not moved), then the heal restores two
    copies of each."""
    cfg = _cfg(num_routers=1, min_replicas_per_expert=2)
    layers = random_model(cfg)
    cluster = launch(cfg, layers, detached=False)
    direct = cluster.direct()
    try:
        before = cluster.table()
        assert all(c == 2 for layer in range(cfg.num_layers) for c in before.replica_counts(layer))
        ray.kill(ray.get_actor("expertray-expert-1", namespace="expertray"), no_restart=True)
        x = torch.randn(32, D, generator=torch.Generator().manual_seed(0))  # asks every actor (top-2 of 8)
        torch.testing.assert_close(direct.forward(0, x), layers[0](x), atol=1e-5, rtol=0)
        assert direct._state.table.version == before.version, "answered from a healed table, not the shadows"
        for i in range(4):
            xi = torch.randn(32, D, generator=torch.Generator().manual_seed(1 + i))
            torch.testing.assert_close(cluster.forward(i % 2, xi), layers[i % 2](xi), atol=1e-5, rtol=0)
        healed = until(lambda: (t := cluster.table()) and "expert-1" not in t.actors and t, 60, "expert-1 healed")
        assert all(c == 2 for layer in range(cfg.num_layers) for c in healed.replica_counts(layer))
    finally:
        cluster.shutdown()
