"""The simulator's transport estimate against the bytes the real runtime moved, on the same live trace.

The runtime sends one row per (token, expert) assignment; the simulator models dispatch as one row per
(token, destination device) (a token picking two experts on one actor is sent once, as DeepEP does).
So measured bytes = simulated bytes + the duplicate (token, actor) rows, exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from expertray.api import launch, random_model
from expertray.config import ClusterConfig, GateConfig, MoELayerConfig
from expertray.state.topology import Topology
from expertray.tools.sim.traffic import simulate_layer_bytes
from expertray.tools.trace import read_trace

pytestmark = pytest.mark.ray
D = 32


@pytest.mark.parametrize("transport", ["collective", "object_store"])
def test_simulated_bytes_match_measured_transport(ray_session, tmp_path, transport: str) -> None:
    cfg = ClusterConfig(layer=MoELayerConfig(d_model=D, d_ff=48, gate=GateConfig("mixtral", 8, 2)), num_layers=1,
                        num_expert_actors=4, actor_num_cpus=0.25, metrics_port=-1, transport=transport,
                        max_wait_ms=0.0)
    cluster = launch(cfg, random_model(cfg), detached=False)
    try:
        cluster.replicate(0, 2, "expert-3")  # a replicated expert: round-robin replica choice must agree too
        cluster.start_trace(str(tmp_path / "t.msgpack"))
        before = cluster.status()["routers"][0]["bytes_out"]
        for i in range(6):
            cluster.forward(0, torch.randn(10 + 7 * i, D, generator=torch.Generator().manual_seed(i)))
        cluster.stop_trace()
        after = cluster.status()["routers"][0]["bytes_out"]
        table = cluster.table()
    finally:
        cluster.shutdown()
    actors = list(table.actors)
    measured = np.array([after[a] - before[a] for a in actors])
    # the router is one more device on the same node; every token starts there
    topo = Topology.single_node(actors + ["router"], slots_per_device=8)
    simulated = np.zeros(len(actors), dtype=np.int64)
    duplicate_rows = np.zeros(len(actors), dtype=np.int64)
    for rec in read_trace(tmp_path / "t.msgpack"):
        experts = rec.experts.numpy()
        origin = np.full(experts.shape[0], len(actors))
        pair = simulate_layer_bytes(experts, table, topo, D, 4, origin, selector="round_robin")
        simulated += pair[len(actors), : len(actors)]
        # rows per (token, actor) beyond the first: the runtime sends them, the simulator does not
        dest_actor = np.array([[_actor_of(table, e, t) for e in row] for t, row in enumerate(experts)])
        for row in dest_actor:
            vals, counts = np.unique(row, return_counts=True)
            duplicate_rows[vals] += counts - 1
    assert measured.sum() > 0
    np.testing.assert_array_equal(measured, simulated + duplicate_rows * D * 4)


def _actor_of(table, expert: int, token: int) -> int:
    """The actor index round-robin replica selection sends (token, expert) to."""
    reps = table.route(0).replicas[expert]
    return int(table.route(0).dest_actor[reps[token % len(reps)]])
