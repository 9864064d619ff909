"""Cluster's non-blocking client calls with fake routers (no Ray cluster): forward_future answers in the
request's shape and dtype, retries on a live router when one dies, and shutdown() cancels what is in flight."""

from __future__ import annotations

import asyncio
import concurrent.futures
from types import SimpleNamespace

import pytest
import ray
import torch

from expertray import api
from expertray.config import ClusterConfig, GateConfig, MoELayerConfig

pytestmark = pytest.mark.ray  # imports Ray; starts none
D = 8


class _Router:
    """Answers with its input (the wire array), after `delay_s`; a dead one raises RayActorError."""

    def __init__(self, dead: bool = False, delay_s: float = 0.0) -> None:
        self.dead, self.delay_s, self.calls = dead, delay_s, 0
        self.forward = SimpleNamespace(remote=self._remote)

    def _remote(self, layer, wire, wire_dtype):
        self.calls += 1

        async def answer():
            await asyncio.sleep(self.delay_s)
            if self.dead:
                raise ray.exceptions.RayActorError()
            return wire
        return answer()


def _cluster(monkeypatch, routers: list[_Router]) -> api.Cluster:
    """A Cluster whose controller lists `routers` (less those marked dead once it has "noticed")."""
    cfg = ClusterConfig(layer=MoELayerConfig(d_model=D, d_ff=16, gate=GateConfig("mixtral", 4, 2)), num_layers=2,
                        request_timeout_s=5.0)
    controller = SimpleNamespace(get_config=SimpleNamespace(remote=lambda: cfg),
                                 get_routers=SimpleNamespace(remote=lambda: list(routers)),
                                 shutdown=SimpleNamespace(remote=lambda: None))
    monkeypatch.setattr(api.ray, "get", lambda value, timeout=None: value)
    monkeypatch.setattr(api.ray, "kill", lambda actor, no_restart=True: None)
    return api.Cluster(controller)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_future_answers_in_the_request_shape_and_dtype(monkeypatch, dtype) -> None:
    cluster = _cluster(monkeypatch, [_Router()])
    x = torch.randn(2, 3, D).to(dtype)
    try:
        out = cluster.forward_future(1, x).result(timeout=5)
        assert out.shape == x.shape and out.dtype == dtype and torch.equal(out, x)
    finally:
        cluster.shutdown()


def test_a_request_whose_router_died_is_answered_by_a_live_one(monkeypatch) -> None:
    dead, live = _Router(dead=True), _Router()
    cluster = _cluster(monkeypatch, [live, dead])  # the controller still lists the dead router
    x = torch.randn(4, D)
    try:
        outs = [f.result(timeout=5) for f in [cluster.forward_future(0, x) for _ in range(6)]]
        assert all(torch.equal(out, x) for out in outs)
        assert 1 <= dead.calls <= 3 and cluster.routers == [live]  # only those sent before one failed
        calls = dead.calls
        cluster.refresh_routers()  # seen dead: left out although the controller lists it
        assert cluster.routers == [live]
        assert torch.equal(cluster.forward_future(1, x).result(timeout=5), x) and dead.calls == calls
    finally:
        cluster.shutdown()


def test_shutdown_cancels_requests_in_flight(monkeypatch) -> None:
    cluster = _cluster(monkeypatch, [_Router(delay_s=60)])
    answer = cluster.forward_future(0, torch.randn(1, D))
    cluster.shutdown()
    with pytest.raises(concurrent.futures.CancelledError):
        answer.result(timeout=5)
