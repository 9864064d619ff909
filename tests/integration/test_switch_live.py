"""Placement switches that form a new collective group under a live stream: the routers
form the group while batches keep flowing on the old one and swap between batches; nothing is lost or wrong,
and every router ends on a collective group over the final actor set."""

from __future__ import annotations

import threading
import time

import pytest
import ray
import torch

from expertray.api import launch, random_model
from expertray.config import ClusterConfig, GateConfig, MoELayerConfig
from expertray.validation import tensor_view

pytestmark = pytest.mark.ray
D = 32


def test_replicate_onto_a_new_actor_under_a_stream_with_the_collective_transport(ray_session) -> None:
    cfg = ClusterConfig(layer=MoELayerConfig(d_model=D, d_ff=48, gate=GateConfig("mixtral", 8, 2)), num_layers=2,
                        num_expert_actors=3, num_routers=2, transport="collective", actor_num_cpus=0.25,
                        router_num_cpus=0.25, metrics_port=-1, max_expert_actors=6, collective_timeout_s=20)
    layers = random_model(cfg)
    cluster = launch(cfg, layers, detached=False)
    try:
        stop = threading.Event()
        results: list[tuple[int, torch.Tensor, object]] = []

        def client(seed: int) -> None:
            i = 0
            while not stop.is_set():
                x = torch.randn(3 + (i * 5 + seed) % 17, D, generator=torch.Generator().manual_seed(seed * 10_000 + i))
                results.append((i % 2, x, cluster.forward_ref(i % 2, x)))
                i += 1
                time.sleep(0.005)

        threads = [threading.Thread(target=client, args=(s,)) for s in range(2)]
        for t in threads:
            t.start()
        try:
            time.sleep(0.5)
            new = cluster.add_actor()  # a new group over four actors
            for layer, expert in ((0, 1), (1, 4), (0, 6)):
                cluster.replicate(layer, expert, new)  # onto the new actor (same actor set: the group stays)
            cluster.drain("expert-0")  # a new group over three actors, the new one among them
            time.sleep(0.5)
        finally:
            stop.set()
            for t in threads:
                t.join()
        lost = wrong = 0
        for layer, x, ref in results:
            try:
                out = tensor_view(ray.get(ref, timeout=60))
            except Exception:  # noqa: BLE001 - counted: any error is a lost request here
                lost += 1
                continue
            wrong += not torch.allclose(out, layers[layer](x), atol=1e-5, rtol=0)
        assert len(results) > 20
        assert (lost, wrong) == (0, 0)
        status = cluster.status()
        table = cluster.table()
        assert table.actors == ("expert-1", "expert-2", new)
        assert all(table.replicas(layer, expert)[-1].actor == new for layer, expert in ((0, 1), (1, 4), (0, 6)))
        assert len(status["routers"]) == 2
        for router in status["routers"]:
            assert router["table_version"] == table.version
            assert router["transport"] == "collective" and router["suspects"] == []
            assert router["transport_detail"]["backend"] == "gloo"
    finally:
        cluster.shutdown()
