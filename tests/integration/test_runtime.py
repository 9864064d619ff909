"""The distributed runtime equals the in-process MoELayer, for both transports and several actor counts."""

from __future__ import annotations

import concurrent.futures as cf

import pytest
import ray
import torch

from expertray.api import launch, random_model
from expertray.config import CapacityConfig, ClusterConfig, GateConfig, MoELayerConfig
from expertray.validation import tensor_view

pytestmark = pytest.mark.ray

D = 32


def _cfg(transport: str, actors: int, **kw) -> ClusterConfig:
    layer = kw.pop("layer", MoELayerConfig(d_model=D, d_ff=48, gate=GateConfig("mixtral", 6, 2)))
    return ClusterConfig(layer=layer, num_layers=2, num_expert_actors=actors, transport=transport,
                         actor_num_cpus=0.25, router_num_cpus=0.25, **kw)


@pytest.fixture(scope="class", params=[("object_store", 1), ("object_store", 4), ("collective", 2), ("collective", 4)],
                ids=lambda p: f"{p[0]}-{p[1]}actors")
def cluster(request, ray_session):
    """One cluster per shape, shared by the tests of TestShapes (they only send it requests), torn down when
    the class ends: the module's other tests launch clusters of their own, and one is served at a time."""
    transport, actors = request.param
    cfg = _cfg(transport, actors, max_wait_ms=20.0)
    layers = random_model(cfg)
    c = launch(cfg, layers, detached=False)
    yield c, layers
    c.shutdown()


class TestShapes:
    """Each transport and actor count answers exactly as the in-process layer, alone and micro-batched."""

    def test_distributed_equals_in_process(self, cluster) -> None:
        c, layers = cluster
        status = c.status()
        assert status["transport"] == c.cfg.transport
        if c.cfg.num_expert_actors == 4:  # 6 experts on 4 actors: uneven blocks 2,1,2,1
            per_actor = [len(c.table().slots_of(a)) for a in c.table().actors]
            assert sorted(per_actor) == [2, 2, 4, 4]
        gen = torch.Generator().manual_seed(0)
        for layer in (0, 1):
            for tokens in (1, 5, 64):
                x = torch.randn(tokens, D, generator=gen)
                torch.testing.assert_close(c.forward(layer, x), layers[layer](x), atol=1e-5, rtol=0)


    def test_concurrent_requests_are_batched_and_answered_exactly(self, cluster) -> None:
        c, layers = cluster
        gen = torch.Generator().manual_seed(1)
        reqs = [(i % 2, torch.randn(n, D, generator=gen)) for i, n in enumerate([1, 3, 17, 40, 2, 9, 33, 5])]
        before = c.status()["routers"][0]["batches"]
        refs = [c.forward_ref(layer, x) for layer, x in reqs]
        outs = ray.get(refs)
        for (layer, x), out in zip(reqs, outs):
            torch.testing.assert_close(tensor_view(out), layers[layer](x), atol=1e-5, rtol=0)
        router = c.status()["routers"][0]
        assert router["batches"] - before < len(reqs), "concurrent requests were not micro-batched"
        assert router["errors"] == 0


@pytest.mark.parametrize("transport", ["object_store", "collective"])
@pytest.mark.parametrize("overflow,priority", [("drop", "first_come"), ("drop", "score"), ("reroute", "first_come")])
def test_capacity_drops_match_in_process(ray_session, transport: str, overflow: str, priority: str) -> None:
    layer_cfg = MoELayerConfig(d_model=D, d_ff=48, gate=GateConfig("mixtral", 6, 2),
                               capacity=CapacityConfig(factor=0.5, min_capacity=1, overflow=overflow,
                                                       drop_priority=priority))
    cfg = _cfg(transport, 3, layer=layer_cfg, max_wait_ms=0.0)
    layers = random_model(cfg)
    c = launch(cfg, layers, detached=False)
    try:
        x = torch.randn(48, D, generator=torch.Generator().manual_seed(2))
        ref = layers[0].forward_with_stats(x)
        assert ref.num_dropped > 0 or ref.num_rerouted > 0
        torch.testing.assert_close(c.forward(0, x), ref.output, atol=1e-5, rtol=0)
        router = c.status()["routers"][0]
        assert router["dropped"] == ref.num_dropped
        assert router["rerouted"] == ref.num_rerouted
    finally:
        c.shutdown()


def test_several_routers_and_threads_of_clients(ray_session) -> None:
    cfg = _cfg("collective", 2, num_routers=2, max_wait_ms=5.0)
    layers = random_model(cfg)
    c = launch(cfg, layers, detached=False)
    try:
        xs = [torch.randn(n, D, generator=torch.Generator().manual_seed(n)) for n in range(1, 25)]
        with cf.ThreadPoolExecutor(6) as pool:
            outs = list(pool.map(lambda x: c.forward(len(x) % 2, x), xs))
        for x, out in zip(xs, outs):
            torch.testing.assert_close(out, layers[len(x) % 2](x), atol=1e-5, rtol=0)
        assert all(r["requests"] > 0 for r in c.status()["routers"])
    finally:
        c.shutdown()


def test_routing_policy_by_config_name_changes_live_routing(ray_session) -> None:
    """The device-aware laser, chosen by name in the cluster config, moves flat tokens off the hot actor."""
    from expertray.tools.hidden_from_logits import LogitInverter

    results = {}
    for policy, params in (("topk", {}), ("laser", {"device_aware": True, "balance_weight": 0.7,
                                                   "max_mass_loss": 0.25})):
        cfg = _cfg("object_store", 4, layer=MoELayerConfig(d_model=D, d_ff=48, gate=GateConfig("mixtral", 8, 2)),
                   routing_policy=policy, routing_params=params, max_wait_ms=0.0)
        layers = random_model(cfg)
        c = launch(cfg, layers, detached=False)
        try:
            inv = LogitInverter(layers[0].gate_weights.weight)
            gen = torch.Generator().manual_seed(3)
            for _ in range(4):
                logits = 0.5 * torch.randn(256, 8, generator=gen)  # flat scores ...
                logits[:, :2] += 0.6  # ... leaning to experts 0 and 1, both on expert-0
                out = c.forward(0, inv.hidden(logits, noise=0.0))
                assert torch.isfinite(out).all()
            router = c.status()["routers"][0]
            assert router["errors"] == 0
            results[policy] = router["layers"][0]["balancedness"]
        finally:
            c.shutdown()
    assert results["laser"] > results["topk"] + 0.05, results
