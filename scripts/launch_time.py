"""Time `launch()` (config → serving cluster) and `shutdown()` for a few cluster shapes, medians over repeats.

`scripts/launch_time.py [repeats]` from the repository root with `.venv/bin/python`. To compare two revisions
side by side on the same machine, run it twice with PYTHONPATH pointing at a checkout of each (Ray's workers
inherit PYTHONPATH, so the actors run that revision's code too; make the checkout's expertray/actors and
expertray/policies symlinks to ../actors and ../policies first).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import ray  # noqa: E402
import torch  # noqa: E402

import expertray  # noqa: E402
from expertray.api import launch, random_model  # noqa: E402
from expertray.config import ClusterConfig, GateConfig, MoELayerConfig  # noqa: E402

SHAPES = (("object_store", 1, 1), ("object_store", 2, 1), ("object_store", 4, 1), ("collective", 4, 1),
          ("object_store", 2, 2))  # transport, expert actors, routers


def main(repeats: int) -> None:
    ray.init(num_cpus=16, include_dashboard=False, namespace="expertray", logging_level="WARNING",
             log_to_driver=False)
    time.sleep(3)  # let the raylet's own start-up settle
    rows = {}
    for transport, actors, routers in SHAPES:
        cfg = ClusterConfig(layer=MoELayerConfig(d_model=32, d_ff=48, gate=GateConfig("mixtral", 6, 2)), num_layers=2,
                            num_expert_actors=actors, num_routers=routers, transport=transport, actor_num_cpus=0.25,
                            router_num_cpus=0.25, metrics_port=-1)
        layers = random_model(cfg)
        launch_s, shutdown_s = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            cluster = launch(cfg, layers, detached=False)
            t1 = time.perf_counter()
            torch.testing.assert_close(cluster.forward(0, torch.ones(4, 32)), layers[0](torch.ones(4, 32)))
            t2 = time.perf_counter()
            cluster.shutdown()
            launch_s.append(t1 - t0)
            shutdown_s.append(time.perf_counter() - t2)
        name = f"{transport} {actors} actors {routers} router(s)"
        rows[name] = {"launch_s_median": statistics.median(launch_s), "shutdown_s_median": statistics.median(shutdown_s)}
        print(f"{name}: launch {rows[name]['launch_s_median']:.2f} s, shutdown {rows[name]['shutdown_s_median']:.2f} s "
              f"(median of {repeats})", flush=True)
    print(json.dumps({"expertray": os.path.dirname(expertray.__file__), "repeats": repeats, "shapes": rows}))
    ray.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
