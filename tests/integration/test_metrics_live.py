"""A live cluster's Prometheus endpoint (127.0.0.1) reports what the routers and actors did."""

from __future__ import annotations

import urllib.request

import pytest
import ray
import torch
from prometheus_client.parser import text_string_to_metric_families

from expertray.api import launch, random_model
from expertray.config import ClusterConfig, GateConfig, MoELayerConfig

pytestmark = pytest.mark.ray


def test_scrape_live_cluster(ray_session) -> None:
    cfg = ClusterConfig(layer=MoELayerConfig(d_model=32, d_ff=48, gate=GateConfig("mixtral", 6, 2)), num_layers=2,
                        num_expert_actors=2, actor_num_cpus=0.25, metrics_port=0)
    cluster = launch(cfg, random_model(cfg), detached=False)
    try:
        for i in range(6):
            cluster.forward(i % 2, torch.randn(10, 32))
        cluster.replicate(0, 1)
        ray.get(cluster.controller.collect_metrics.remote())
        port = ray.get(cluster.controller.info.remote())["metrics_port"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            text = r.read().decode()
        samples = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                samples.setdefault(s.name, []).append(s)
        routed = sum(s.value for s in samples["expertray_tokens_routed_total"])
        assert routed == 6 * 10 * 2  # every token-expert assignment, top-2, no drops
        reqs = [s for s in samples["expertray_requests_total"] if s.labels["outcome"] == "ok"]
        assert sum(s.value for s in reqs) == 6
        reps = {s.labels["expert"]: s.value for s in samples["expertray_replicas"] if s.labels["layer"] == "0"}
        assert reps["1"] == 2
        assert sum(s.value for s in samples["expertray_actor_compute_seconds_count"]) >= 6
    finally:
        cluster.shutdown()
