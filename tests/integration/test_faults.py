"""Killing an expert actor mid-stream loses nothing: every request gets its exact answer or a clear error."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import pytest
import ray
import torch

from expertray.api import launch, random_model
from expertray.config import ClusterConfig, GateConfig, MoELayerConfig
from expertray.errors import RequestTimeoutError, RouterUnavailableError
from expertray.validation import tensor_view

pytestmark = pytest.mark.ray
D = 32


def _stream_killing(cluster, layers, victim: str, n: int = 240) -> tuple[int, int]:
    """n requests over both layers, `victim` killed after the 81st; (lost, wrong) against in-process.
    A clear error would count as lost; silence (no answer within 120 s) fails the get."""
    xs = [torch.randn(4 + i % 13, D, generator=torch.Generator().manual_seed(i)) for i in range(n)]
    refs = []
    for i, x in enumerate(xs):
        refs.append(cluster.forward_ref(i % 2, x))
        if i == 80:
            ray.kill(ray.get_actor(f"expertray-{victim}", namespace="expertray"), no_restart=True)
        time.sleep(0.004)
    lost = wrong = 0
    for i, (x, ref) in enumerate(zip(xs, refs)):
        try:
            out = tensor_view(ray.get(ref, timeout=120))
        except Exception:  # noqa: BLE001 - counted: a clear error is allowed, silence is not
            lost += 1
            continue
        wrong += not torch.allclose(out, layers[i % 2](x), atol=1e-5, rtol=0)
    return lost, wrong


@pytest.mark.parametrize("transport", ["object_store", "collective"])
def test_kill_expert_actor_under_concurrent_stream(ray_session, transport: str) -> None:
    cfg = ClusterConfig(layer=MoELayerConfig(d_model=D, d_ff=48, gate=GateConfig("mixtral", 8, 2)), num_layers=2,
                        num_expert_actors=3, transport=transport, actor_num_cpus=0.25, collective_timeout_s=10)
    layers = random_model(cfg)
    cluster = launch(cfg, layers, detached=False)
    try:
        lost, wrong = _stream_killing(cluster, layers, "expert-1")
        status = cluster.status()
        assert (lost, wrong) == (0, 0)
        assert "expert-1" not in status["table"]["actors"], "dead actor was not replaced"
    finally:
        cluster.shutdown()


def test_kill_replicated_actor_serves_from_replicas_before_the_heal(ray_session) -> None:
    """Every expert of the victim has a replica elsewhere: the router masks the dead actor (a failed batch names
    it, or the controller's liveness push does, whichever comes first) and answers from the replicas at once
    (object-store fallback while the collective group re-forms), before the heal ends."""
    from expertray.tools.bench.faults import replicate_elsewhere

    cfg = ClusterConfig(layer=MoELayerConfig(d_model=D, d_ff=48, gate=GateConfig("mixtral", 8, 2)), num_layers=2,
                        num_expert_actors=3, transport="collective", actor_num_cpus=0.25, collective_timeout_s=10)
    layers = random_model(cfg)
    cluster = launch(cfg, layers, detached=False)
    try:
        cluster.apply_table(replicate_elsewhere(cluster.table(), "expert-1"), "test: replicate expert-1")
        # ~2.5 s of stream after the kill: the liveness round that masks the dead actor must find requests
        # still coming on a loaded machine (the whole test suite beside it), not only the heal's aftermath
        lost, wrong = _stream_killing(cluster, layers, "expert-1", n=700)
        deadline = time.monotonic() + 60  # the heal runs in the background: wait for it to land
        while "expert-1" in (status := cluster.status())["table"]["actors"] and time.monotonic() < deadline:
            time.sleep(0.5)
        stats = ray.get(cluster.routers[0].stats.remote())
        stats.pop("layers")
        assert (lost, wrong) == (0, 0)
        # masked by a failed batch (masked_retries) or by the controller's liveness push, whichever came first
        assert stats["served_masked"] >= 1, f"no batch was answered around the dead actor before the heal: {stats}"
        assert stats["errors"] == 0
        assert "expert-1" not in status["table"]["actors"], "dead actor was not replaced"
        assert any(e["reason"].startswith("heal") for e in status["history"])
        assert stats["suspects"] == [] and stats["transport"] == "collective", "the mask or fallback outlived the heal"
    finally:
        cluster.shutdown()


def test_controller_restart_restores_table_while_routers_keep_serving(ray_session, tmp_path) -> None:
    cfg = ClusterConfig(layer=MoELayerConfig(d_model=D, d_ff=48, gate=GateConfig("mixtral", 8, 2)), num_layers=2,
                        num_expert_actors=3, actor_num_cpus=0.25, snapshot_path=str(tmp_path / "snap.msgpack"))
    layers = random_model(cfg)
    cluster = launch(cfg, layers, detached=True)
    try:
        cluster.replicate(0, 3)
        cluster.migrate(1, 2, "expert-2")
        before = cluster.table()
        ray.kill(cluster.controller, no_restart=False)
        x = torch.randn(20, D)
        torch.testing.assert_close(cluster.forward(0, x), layers[0](x), atol=1e-5, rtol=0)
        deadline = time.time() + 60
        while True:
            try:
                info = ray.get(cluster.controller.info.remote(), timeout=10)
                break
            except Exception:  # noqa: BLE001 - restarting
                if time.time() > deadline:
                    raise
                time.sleep(0.5)
        assert info["restored"] is True
        assert cluster.table() == before
        cluster.replicate(1, 5)  # the restored controller is fully operational
        assert cluster.table().version == before.version + 1
        torch.testing.assert_close(cluster.forward(1, x), layers[1](x), atol=1e-5, rtol=0)
    finally:
        cluster.shutdown()


def _small(**kw) -> ClusterConfig:
    base = {"layer": MoELayerConfig(d_model=D, d_ff=48, gate=GateConfig("mixtral", 8, 2)), "num_layers": 2,
            "num_expert_actors": 3, "actor_num_cpus": 0.25, "router_num_cpus": 0.25, "metrics_port": -1,
            "transport": "object_store", "ping_timeout_s": 2.0}
    return ClusterConfig(**{**base, **kw})


def _exact(cluster, layers, n: int = 6) -> None:
    for i in range(n):
        x = torch.randn(3 + i, D, generator=torch.Generator().manual_seed(1000 + i))
        torch.testing.assert_close(cluster.forward(i % 2, x), layers[i % 2](x), atol=1e-5, rtol=0)


def test_router_loop_survives_a_request_that_used_up_its_retries(ray_session) -> None:
    """An actor slow past the batch deadline three times used to end the router's batch loop."""
    from expertray.errors import ExpertUnavailableError

    cfg = _small(collective_timeout_s=0.5, request_timeout_s=20.0)
    layers = random_model(cfg)
    cluster = launch(cfg, layers, detached=False)
    try:
        for a in cluster.table().actors:
            ray.get(cluster.controller.set_actor_slowdown.remote(a, 1e5))
        with pytest.raises(ExpertUnavailableError, match="failed 3 times"):
            cluster.forward(0, torch.randn(4, D))
        for a in cluster.table().actors:
            ray.get(cluster.controller.set_actor_slowdown.remote(a, 1.0))
        _exact(cluster, layers)  # the loop still runs
        router = cluster.status()["routers"][0]
        assert router["loop_errors"] == 0 and router["errors"] == 1 and router["retries"] >= 3
        # a refused request is counted in status and in requests_total{outcome}
        from expertray.errors import InputError

        with pytest.raises(InputError):
            ray.get(cluster.routers[0].forward.remote(0, np.full((2, D), np.nan, dtype=np.float32)))
        assert cluster.status()["requests"]["rejected"] == 1
        ray.get(cluster.controller.collect_metrics.remote())
        text = ray.get(cluster.controller.metrics_text.remote()).decode()
        assert 'expertray_requests_total{outcome="InputError"} 1.0' in text
        assert 'expertray_requests_total{outcome="ExpertUnavailableError"} 1.0' in text
    finally:
        cluster.shutdown()


def test_dead_router_is_replaced_and_clients_retry_on_a_live_one(ray_session, until) -> None:
    """A dead router was never replaced, status()/replicate() raised, actors leaked."""
    cfg = _small(num_routers=2)
    layers = random_model(cfg)
    cluster = launch(cfg, layers, detached=False)
    try:
        ray.kill(cluster.routers[0], no_restart=True)
        for i in range(4):  # the async client path (Serve ingress) retries the same way
            x = torch.randn(5, D, generator=torch.Generator().manual_seed(i))
            out = asyncio.run(cluster.forward_wire(i % 2, x.numpy()))
            torch.testing.assert_close(tensor_view(out), layers[i % 2](x), atol=1e-5, rtol=0)
        _exact(cluster, layers, 8)  # requests that hit the dead router go to the live one
        status = cluster.status()  # never raises because a router died
        assert len(status["routers"]) + len(status["routers_down"]) == 2
        cluster.replicate(0, 3)  # a change with a router down replaces it instead of failing half-way
        status = until(lambda: (s := cluster.status()) and not s["routers_down"] and len(s["routers"]) == 2 and s,
                        30, "router replaced")
        assert {r["table_version"] for r in status["routers"]} == {cluster.table().version}
        names = [n for n in ray.util.list_named_actors() if n.startswith("expertray-expert-")]
        assert sorted(names) == sorted(f"expertray-{a}" for a in cluster.table().actors), "leaked actors"
        cluster.refresh_routers()
        assert len(cluster.routers) == 2
        _exact(cluster, layers)
    finally:
        cluster.shutdown()


def test_non_blocking_calls_survive_a_router_killed_mid_stream(ray_session, until) -> None:
    """forward_ref kept sending to a dead router for good (916 of 3,000 requests of a 4-thread stream failed).
    forward_future retries on a live router: every request of a 4-thread stream is answered exactly; a handle
    whose forward_ref refs failed on the dead router stops choosing it."""
    from expertray.api import Cluster

    cfg = _small(num_routers=2)
    layers = random_model(cfg)
    cluster = launch(cfg, layers, detached=False)
    ref_client = Cluster(cluster.controller)  # another handle, still listing the router about to die
    xs = [torch.randn(2 + i % 7, D, generator=torch.Generator().manual_seed(i)) for i in range(40)]
    stream_end = time.monotonic() + 4.0

    def stream(worker: int) -> list[tuple[int, Future]]:
        sent, i = [], worker
        while time.monotonic() < stream_end:
            sent.append((i, cluster.forward_future(i % 2, xs[i % len(xs)])))
            i += 4
            time.sleep(0.02)
        return sent

    try:
        with ThreadPoolExecutor(4) as pool:
            streams = [pool.submit(stream, w) for w in range(4)]
            time.sleep(1.5)
            victim = cluster.routers[0]
            ray.kill(victim, no_restart=True)
            sent = [call for s in streams for call in s.result()]
        errors = []
        for i, answer in sent:
            try:
                out = answer.result(timeout=cfg.request_timeout_s + 5)
            except (RouterUnavailableError, RequestTimeoutError) as exc:  # allowed, but none expected
                errors.append(exc)
                continue
            torch.testing.assert_close(out, layers[i % 2](xs[i % len(xs)]), atol=1e-5, rtol=0)
        assert len(sent) > 200 and errors == []
        assert victim not in cluster.routers

        refs = [ref_client.forward_ref(0, xs[0]) for _ in range(2)]  # round robin: one lands on the dead router
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(refs, timeout=30)
        until(lambda: victim not in ref_client.routers, 10, "forward_ref's failed ref dropped the dead router")
        outs = ray.get([ref_client.forward_ref(i % 2, xs[i]) for i in range(8)], timeout=30)
        for i, out in enumerate(outs):
            torch.testing.assert_close(tensor_view(out), layers[i % 2](xs[i]), atol=1e-5, rtol=0)
    finally:
        cluster.shutdown()


def test_hung_actor_is_killed_and_replaced_while_status_answers(ray_session, until) -> None:
    """A SIGSTOPped actor stalled the object-store path with no timeout and status() timed out. Its experts
    (their only copies) are served by a stand-in on the live actors before it is declared dead."""
    import os
    import signal

    cfg = _small(collective_timeout_s=5.0, request_timeout_s=30.0)
    layers = random_model(cfg)
    cluster = launch(cfg, layers, detached=False)
    pid = cluster.status()["actors"]["expert-1"]["pid"]
    try:
        os.kill(pid, signal.SIGSTOP)
        refs = [cluster.forward_ref(i % 2, torch.randn(8, D, generator=torch.Generator().manual_seed(i)))
                for i in range(10)]
        t0 = time.monotonic()
        status = cluster.status()  # answers although an actor is hung
        assert time.monotonic() - t0 < cfg.control_timeout_s
        assert status["actors"]["expert-1"]["alive"] is False or "expert-1" not in status["table"]["actors"]
        for i, ref in enumerate(refs):
            x = torch.randn(8, D, generator=torch.Generator().manual_seed(i))
            torch.testing.assert_close(tensor_view(ray.get(ref, timeout=60)), layers[i % 2](x),
                                       atol=1e-5, rtol=0)
        assert any("stand-in for silent expert-1" in h["reason"] for h in cluster.status()["history"])
        until(lambda: "expert-1" not in cluster.table().actors, 60, "hung expert-1 killed and replaced")
    finally:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
        cluster.shutdown()


def test_a_hung_actor_whose_experts_have_replicas_is_routed_around_before_any_heal(ray_session, until) -> None:
    """The controller's liveness pings find a SIGSTOPped actor silent and push it to the
    router, which leaves the collective group for the object store and serves from the replicas while the
    actor is still stopped and still in the table (its heal deadline, ping_timeout_s, is far off); answering
    again (SIGCONT) un-masks it, with no heal at all."""
    import os
    import signal

    from expertray.tools.bench.faults import replicate_elsewhere

    cfg = _small(transport="collective", ping_timeout_s=20.0, collective_timeout_s=20.0, liveness_timeout_s=0.5)
    layers = random_model(cfg)
    cluster = launch(cfg, layers, detached=False)
    pid = cluster.status()["actors"]["expert-1"]["pid"]
    stopped = False
    try:
        cluster.apply_table(replicate_elsewhere(cluster.table(), "expert-1"), "test: replicate expert-1")
        _exact(cluster, layers, 2)
        before = cluster.table()
        os.kill(pid, signal.SIGSTOP)
        stopped = True
        _exact(cluster, layers, 8)  # answered while expert-1 is stopped: without the push, not before its heal
        router = ray.get(cluster.routers[0].stats.remote(), timeout=10)
        assert cluster.table() == before, "the answers came after a heal, not from routing around"
        assert router["suspects"] == ["expert-1"] and router["transport"] == "object_store"
        assert router["errors"] == 0
        os.kill(pid, signal.SIGCONT)
        stopped = False
        until(lambda: ray.get(cluster.routers[0].stats.remote(), timeout=10)["suspects"] == [], 60,
              "expert-1 un-masked once it answers again")
        assert "expert-1" in cluster.table().actors
        _exact(cluster, layers)
    finally:
        if stopped:
            os.kill(pid, signal.SIGCONT)
        cluster.shutdown()


def test_default_detached_controller_restarts_and_a_bad_snapshot_keeps_serving_and_healing(
        ray_session, until, controller_info) -> None:
    """The default launch() (no snapshot_path) could not restart its controller; a corrupted
    snapshot left nothing to heal an expert death with."""
    from pathlib import Path

    cfg = _small()
    layers = random_model(cfg)
    cluster = launch(cfg, layers, detached=True)
    try:
        cluster.replicate(0, 3)
        cluster.autoscale(True)
        before = cluster.table()
        ray.kill(cluster.controller, no_restart=False)
        info = until(lambda: (i := controller_info(cluster)) and i["restored"] and i, 60, "controller restarted")
        assert info["restored"] and not info["degraded"] and cluster.table() == before
        assert cluster.autoscale()["on"] is True  # the autoscaler's on/off and its state were persisted
        cluster.autoscale(False)
        # now corrupt the snapshot and restart again: loud, degraded, but serving and healable
        state_dir = Path(info["state_dir"])
        (state_dir / "snapshot.msgpack").write_bytes(b"\x00 not msgpack")
        ray.kill(cluster.controller, no_restart=False)
        info = until(lambda: (i := controller_info(cluster)) and i["degraded"] and i, 60, "restarted on a bad snapshot")
        assert "corrupted msgpack" in info["snapshot_error"]
        assert cluster.table() == before  # rebuilt from the routers
        assert cluster.status()["controller"]["snapshot_error"] == info["snapshot_error"]
        ray.kill(ray.get_actor("expertray-expert-0", namespace="expertray"), no_restart=True)
        _exact(cluster, layers)
        until(lambda: "expert-0" not in cluster.table().actors, 30, "dead actor replaced")
    finally:
        cluster.shutdown()




def test_a_hung_controller_never_hangs_the_client(ray_session) -> None:
    """Every Cluster call to the controller has a deadline: control_timeout_s for queries, CHANGE_STEPS times
    that for placement changes; past it the caller gets GetTimeoutError, not a hang."""
    from expertray.api import CHANGE_STEPS, Cluster

    cfg = _small(control_timeout_s=0.5)

    @ray.remote(num_cpus=0)
    class HungController:
        def get_config(self) -> ClusterConfig:
            return cfg

        def get_routers(self) -> list:
            return []

        def status(self) -> dict:
            time.sleep(60)
            return {}

        def replicate(self, layer: int, expert: int, actor: str | None) -> dict:
            time.sleep(60)
            return {}

    fake = HungController.remote()
    try:
        cluster = Cluster(fake)
        # without a deadline each call would block 60 s and then return {}: the timeout error is the proof
        assert CHANGE_STEPS * cfg.control_timeout_s < 60
        for call in (cluster.status, lambda: cluster.replicate(0, 1)):
            with pytest.raises(ray.exceptions.GetTimeoutError):
                call()
    finally:
        ray.kill(fake)
