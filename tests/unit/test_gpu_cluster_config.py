"""cluster/expertray-gpu.yaml: a valid ClusterConfig whose routers take GPUs beside their expert actors,
fitting one GPU worker of cluster/gpu-aws.yaml, with one GPU per rank (NCCL)."""

from __future__ import annotations

from pathlib import Path

import yaml

from expertray.config import ClusterConfig, from_dict
from expertray.wire.devices import choose_backend

CLUSTER = Path(__file__).resolve().parents[2] / "cluster"


def test_gpu_cluster_config_puts_routers_on_gpus_beside_their_actors() -> None:
    cfg = from_dict(ClusterConfig, yaml.safe_load((CLUSTER / "expertray-gpu.yaml").read_text()), "cluster")
    assert cfg.actor_num_gpus > 0 and cfg.router_num_gpus > 0
    gpus = cfg.num_routers * cfg.router_num_gpus + cfg.max_expert_actors * cfg.actor_num_gpus
    workers = yaml.safe_load((CLUSTER / "gpu-aws.yaml").read_text())["available_node_types"]
    assert any(t["resources"].get("GPU", 0) >= gpus for t in workers.values()), \
        f"{gpus} GPUs for routers and actors do not fit one worker node"
    ranks = [f"node/GPU-{i}" for i in range(1 + cfg.num_expert_actors)]  # whole GPUs: one each
    assert cfg.actor_num_gpus == cfg.router_num_gpus == 1 and choose_backend(ranks).backend == "nccl"
