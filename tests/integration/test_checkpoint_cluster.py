"""A Ray cluster launched from a checkpoint serves the same tokens as the unmodified transformers model, with
routed experts loaded only where they are served (expert actors read their slots from the shards, routers
their gates), in the serving dtype end to end, and slots created after start (replicate, migrate, heal)
serving identical outputs."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import ray
import torch

from expertray.api import from_pretrained, launch, to_wire
from expertray.models.pretrained import cluster_config
from expertray.models.source import WeightSource
from expertray.models.synthetic import write_tiny_checkpoint
from expertray.runtime.snapshot import load_controller_snapshot

tf = pytest.importorskip("transformers")
pytestmark = pytest.mark.ray

SMALL = {"num_expert_actors": 2, "actor_num_cpus": 0.25, "router_num_cpus": 0.25, "max_wait_ms": 1.0}


def _ids() -> torch.Tensor:
    return torch.randint(2, 96, (2, 6), generator=torch.Generator().manual_seed(0))


def _routed_bytes(cluster, row_bytes: int) -> tuple[int, int]:
    """(bytes sent to actors, routed rows × row_bytes) over the cluster's life so far: by the routers, and by
    this process's direct layers (from_pretrained's model calls the cluster directly)."""
    status = cluster.status()
    k = cluster.cfg.layer.top_k
    direct = cluster.direct().counters
    sent = sum(sum(r["bytes_out"].values()) for r in status["routers"]) + direct["bytes_out"]
    rows = sum(r["tokens"] * k - r["dropped"] for r in status["routers"]) + direct["rows"]
    return sent, rows * row_bytes


@pytest.mark.parametrize("family", ["deepseek_v3", "gpt_oss", "qwen2_moe", "mixtral"])
def test_ray_cluster_from_checkpoint_generates_reference_tokens(ray_session, tmp_path, family) -> None:
    path = write_tiny_checkpoint(family, tmp_path / family, seed=3)
    ref = tf.AutoModelForCausalLM.from_pretrained(path).eval()
    model, cluster = from_pretrained(str(path), backend="ray", **SMALL)
    try:
        assert cluster.cfg.model == str(path.resolve()) and cluster.cfg.dtype == "float32"
        ids = _ids()
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=1e-5, rtol=0)
        out = model.generate(ids, max_new_tokens=6, do_sample=False)
        assert torch.equal(out, ref.generate(ids, max_new_tokens=6, do_sample=False))
        controller = cluster.status()["controller"]
        assert controller["weights"] == "checkpoint" and controller["expert_bytes_held"] == 0
        sent, expected = _routed_bytes(cluster, cluster.cfg.layer.d_model * 4)  # float32 rows
        assert sent == expected > 0
    finally:
        cluster.shutdown()


def test_bf16_checkpoint_serves_bf16_end_to_end(ray_session, tmp_path) -> None:
    """bf16 slots, bf16 rows on the wire (half of float32's bytes), logits within the reference's own bf16
    error of a float32 run."""
    path = write_tiny_checkpoint("qwen3_moe", tmp_path / "qwen3_moe", dtype=torch.bfloat16, seed=3)
    exact_ref = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    bf16_ref = tf.AutoModelForCausalLM.from_pretrained(path).eval()
    model, cluster = from_pretrained(str(path), backend="ray", **SMALL)
    try:
        assert cluster.cfg.dtype == "bfloat16" and model.lm_head.weight.dtype == torch.bfloat16
        ids = _ids()
        with torch.no_grad():
            exact = exact_ref(ids).logits
            ref_err = (bf16_ref(ids).logits.float() - exact).abs()
            err = (model(ids).logits.float() - exact).abs()
        assert err.mean() <= 1.25 * ref_err.mean()
        status = cluster.status()
        D = cluster.cfg.layer.d_model
        sent, expected = _routed_bytes(cluster, D * 2)  # bf16 rows: 2 bytes per value
        assert sent == expected > 0
        slots = sum(len(cluster.table().slots_of(a)) for a in cluster.table().actors)
        held = sum(a["memory_bytes"] for a in status["actors"].values())
        assert held == slots * 3 * D * cluster.cfg.layer.d_ff * 2  # slots kept in bf16
        x = torch.randn(5, D).to(torch.bfloat16)
        assert to_wire(x)[0].nbytes == to_wire(x.float())[0].nbytes // 2 and to_wire(x)[1] == "bfloat16"
        out = cluster.forward(0, x)
        assert out.dtype == torch.bfloat16 and out.shape == x.shape
    finally:
        cluster.shutdown()


def _outputs(cluster, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    return [cluster.forward(i % cluster.cfg.num_layers, x) for i, x in enumerate(xs)]


def test_slots_created_after_start_serve_identical_outputs(ray_session, tmp_path) -> None:
    """GPT-OSS (expert biases, clamped SwiGLU): a replica copied from a live actor, a migrated expert, and an
    actor re-reading the checkpoint after the only holder was killed all give the same outputs."""
    path = write_tiny_checkpoint("gpt_oss", tmp_path / "gpt_oss", seed=5)
    _, cluster = from_pretrained(str(path), backend="ray", num_expert_actors=2, actor_num_cpus=0.25,
                                 router_num_cpus=0.25, max_wait_ms=1.0, transport="object_store",
                                 control_timeout_s=60.0)
    try:
        D, E = cluster.cfg.layer.d_model, cluster.cfg.layer.num_experts
        xs = [torch.randn(16, D, generator=torch.Generator().manual_seed(i)) for i in range(4)]
        before = _outputs(cluster, xs)
        table = cluster.table()
        a0, a1 = table.actors
        layer0 = [s.expert for s in table.slots_of(a0) if s.layer == 0]
        cluster.replicate(0, layer0[0], a1)  # copied from a live replica (export → load)
        cluster.migrate(1, [s.expert for s in table.slots_of(a1) if s.layer == 1][0], a0)
        for layer in range(cluster.cfg.num_layers):  # a0 becomes the only holder of every expert...
            for e in range(E):
                if all(s.actor != a0 for s in cluster.table().replicas(layer, e)):
                    cluster.migrate(layer, e, a0)
        for x, y in zip(before, _outputs(cluster, xs)):
            torch.testing.assert_close(y, x)  # replicas may split an expert's rows: fp32 rounding
        held_before = cluster.status()["actors"][a0]["memory_bytes"]
        ray.kill(ray.get_actor(f"expertray-{a0}", namespace="expertray"), no_restart=True)
        deadline = time.monotonic() + 60  # ...so its replacement must re-read the checkpoint
        while a0 in cluster.table().actors and time.monotonic() < deadline:
            time.sleep(0.5)
        new = [a for a in cluster.table().actors if a not in (a0, a1)]
        assert new, "the killed actor was not replaced within 60 s"
        status = cluster.status()
        assert status["actors"][new[0]]["memory_bytes"] == held_before
        assert status["controller"]["expert_bytes_held"] == 0
        for x, y in zip(before, _outputs(cluster, xs)):
            torch.testing.assert_close(y, x)  # replicas may split an expert's rows: fp32 rounding
    finally:
        cluster.shutdown()


def test_restarted_controller_serves_the_checkpoint_its_snapshot_records(ray_session, tmp_path, until,
                                                                        controller_info) -> None:
    """The snapshot records the checkpoint (path, shard digests), never weights; a restarted controller heals
    a dead actor whose experts have no other replica by having the new actor re-read the checkpoint."""
    path = write_tiny_checkpoint("mixtral", tmp_path / "mixtral", seed=7)
    snapshot = tmp_path / "snap.msgpack"
    cfg = cluster_config(str(path), num_expert_actors=2, actor_num_cpus=0.25, router_num_cpus=0.25, max_wait_ms=1.0,
                         transport="object_store", metrics_port=-1, ping_timeout_s=2.0, snapshot_path=str(snapshot))
    source = WeightSource.open(str(path))
    ref = [source.layer(layer) for layer in range(source.num_layers)]
    cluster = launch(cfg, detached=True)
    try:
        xs = [torch.randn(12, cfg.layer.d_model, generator=torch.Generator().manual_seed(i)) for i in range(2)]
        for layer, x in enumerate(xs):
            torch.testing.assert_close(cluster.forward(layer, x), ref[layer](x), atol=1e-5, rtol=0)
        recorded = load_controller_snapshot(snapshot)[1].checkpoint
        assert recorded["path"] == str(path.resolve()) and recorded["shards"]
        ray.kill(cluster.controller, no_restart=False)
        info = until(lambda: (i := controller_info(cluster)) and i["restored"] and i, 60, "controller restarted")
        assert info["weights"] == "checkpoint" and not info["degraded"] and info["expert_bytes_held"] == 0
        assert not (Path(info["state_dir"]) / "weights.safetensors").exists()  # no weight store written
        ray.kill(ray.get_actor("expertray-expert-0", namespace="expertray"), no_restart=True)
        for layer, x in enumerate(xs):  # requests wait for the heal, then get the same answers
            torch.testing.assert_close(cluster.forward(layer, x), ref[layer](x), atol=1e-5, rtol=0)
        assert "expert-0" not in cluster.table().actors
    finally:
        cluster.shutdown()
