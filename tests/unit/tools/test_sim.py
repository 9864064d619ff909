"""The cluster simulator: hand-computed traffic on a 2 x 2 cluster, replica choice identical to the runtime's
selectors, link times, origins, sources (trace, synthetic) and the `sim` CLI."""

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from expertray.cli.main import app
from expertray.errors import ConfigError, InputError
from expertray.policies.replica import REPLICA
from expertray.state.placement_table import PlacementTable, Slot
from expertray.state.topology import Links, Topology
from expertray.tools.sim.routing import SyntheticRouting, TraceRouting
from expertray.tools.sim.simulator import SimConfig, simulate
from expertray.tools.sim.traffic import PlacementArrays, TopologyArrays, link_load, simulate_layer_bytes
from expertray.tools.trace import TraceWriter, read_trace

TOPO = Topology.uniform(2, 2, 2)  # node 0: devices 0, 1; node 1: devices 2, 3
ONE_EACH = PlacementTable(0, 1, 4, tuple(TOPO.devices), tuple(Slot(TOPO.devices[e], 0, e) for e in range(4)))
ROW = 4 * 2  # d_model 4, 2 bytes per element
# token t starts on device t; expert e lives on device e
EXPERTS = np.array([[0, 1],    # dev 0 -> itself and dev 1 (same node)
                    [2, 3],    # dev 1 -> devs 2 and 3 (other node)
                    [0, 2],    # dev 2 -> dev 0 (other node) and itself
                    [1, -1]])  # dev 3 -> dev 1 (other node); second pick dropped
ORIGIN = np.arange(4)


@pytest.mark.parametrize("dispatch,rows,intra,inter", [
    ("flat", [(0, 0), (0, 1), (1, 2), (1, 3), (2, 0), (2, 2), (3, 1)], 1, 4),
    # hierarchical crosses the network once per node: dev 1 reaches node 1 through dev 3 (same in-node
    # index 1), which forwards to dev 2 over NVLink; dev 2 reaches node 0 through dev 0 (index 0), dev 3
    # through dev 1 (index 1): both are the targets
    ("hierarchical", [(0, 0), (0, 1), (1, 3), (3, 2), (2, 0), (2, 2), (3, 1)], 2, 3),
])
def test_dispatch_by_hand(dispatch: str, rows: list[tuple[int, int]], intra: int, inter: int) -> None:
    got = simulate_layer_bytes(EXPERTS, ONE_EACH, TOPO, 4, 2, ORIGIN, dispatch=dispatch)
    want = np.zeros((4, 4), dtype=np.int64)
    for src, dst in rows:
        want[src, dst] = ROW
    np.testing.assert_array_equal(got, want)
    load = link_load(got, TopologyArrays.of(TOPO), TOPO)
    assert (load.intra_node_bytes, load.inter_node_bytes) == (intra * ROW, inter * ROW)


def test_link_time_is_the_slowest_device() -> None:
    links = Links(intra_node_bandwidth_bytes_per_s=8.0, inter_node_bandwidth_bytes_per_s=4.0,
                  intra_node_latency_s=0.5, inter_node_latency_s=1.0)
    topo = Topology.uniform(2, 2, 2, links=links)
    pairs = simulate_layer_bytes(EXPERTS, ONE_EACH, topo, 4, 2, ORIGIN)
    # dev 1 sends 2 rows (16 B) across: 16 / 4 + 1 = 5 s; its NVLink receives 1 row: 8 / 8 + 0.5 = 1.5 s
    assert link_load(pairs, TopologyArrays.of(topo), topo).time_s == pytest.approx(5.0)


def test_replica_choice_matches_the_runtime_selectors() -> None:
    topo = Topology.uniform(2, 3, 3)
    devices = topo.devices
    actors = tuple(devices[i] for i in (4, 0, 5, 2, 1, 3))  # table order differs from topology order
    replicas = {0: [0, 4], 1: [1, 3, 5], 2: [2], 3: [0, 1, 2, 3, 4]}
    table = PlacementTable(0, 1, 4, actors, tuple(Slot(devices[d], 0, e) for e, ds in replicas.items()
                                                  for d in ds))
    rng = np.random.default_rng(1)
    experts = np.stack([rng.choice(4, 2, replace=False) for _ in range(40)])
    experts[3, 1] = -1
    origin = rng.integers(0, 6, size=40)
    arrays, topo_arrays = PlacementArrays.of(table, topo), TopologyArrays.of(topo)
    route = table.route(0)
    actor_device = np.array([topo.device_index[a] for a in table.actors])

    def runtime(dest: torch.Tensor) -> np.ndarray:
        d = dest.numpy()
        return np.where(d >= 0, actor_device[route.dest_actor.numpy()[np.maximum(d, 0)]], -1)

    rr = REPLICA.create("round_robin").select(torch.from_numpy(experts), route)
    np.testing.assert_array_equal(arrays.choose(experts, 0, origin, topo_arrays.node_of, "round_robin"), runtime(rr))
    ours = arrays.choose(experts, 0, origin, topo_arrays.node_of, "locality")
    for node, members in enumerate(topo.nodes):
        rows = np.flatnonzero(topo_arrays.node_of[origin] == node)  # one router per node, rows in order
        local = {table.actors.index(a) for a in members}
        theirs = REPLICA.create("locality").select(torch.from_numpy(experts[rows]), route, local_actors=local)
        np.testing.assert_array_equal(ours[rows], runtime(theirs))


def test_simulate_layer_bytes_rejects_bad_inputs() -> None:
    with pytest.raises(InputError, match="token_origin"):
        simulate_layer_bytes(EXPERTS, ONE_EACH, TOPO, 4, 2, np.array([0, 1, 2, 9]))
    with pytest.raises(InputError, match=r"expert ids must be in \[-1, 4\)"):
        simulate_layer_bytes(EXPERTS + 1, ONE_EACH, TOPO, 4, 2, ORIGIN)
    with pytest.raises(ConfigError, match="sim.dispatch"):
        simulate_layer_bytes(EXPERTS, ONE_EACH, TOPO, 4, 2, ORIGIN, dispatch="ring")


@dataclass
class _Fixed:
    """A routing source that replays the given steps for both streams."""

    steps: list[list[np.ndarray]]
    num_experts: int = 4
    top_k: int = 1

    @property
    def num_layers(self) -> int:
        return len(self.steps[0])

    def calibration(self) -> Iterator[list[np.ndarray]]:
        return iter(self.steps)

    def evaluation(self) -> Iterator[list[np.ndarray]]:
        return iter(self.steps)

    def describe(self) -> dict[str, object]:
        return {"source": "fixed"}


def test_follow_origin_moves_the_token_to_its_expert() -> None:
    # one token on device 0 picks expert 1 (device 1) at both layers
    source = _Fixed([[np.array([[1]]), np.array([[1]])]])
    cfg = dict(d_model=4, bytes_per_elem=2, expert_bytes=0)
    even = simulate(source, TOPO, ["round_robin"], SimConfig(**cfg, origin="even")).policies[0]
    follow = simulate(source, TOPO, ["round_robin"], SimConfig(**cfg, origin="follow")).policies[0]
    np.testing.assert_array_equal(even.intra_node_bytes, [2 * ROW, 2 * ROW])  # there and back, twice
    np.testing.assert_array_equal(follow.intra_node_bytes, [ROW, 0])  # it stays on device 1
    assert even.inter_node_bytes.sum() == follow.inter_node_bytes.sum() == 0


def test_topology_aware_cuts_network_bytes_on_affinity_routing() -> None:
    topo = Topology.uniform(4, 4, 3)
    source = SyntheticRouting(num_layers=2, num_experts=32, top_k=4, tokens=4096, topics=4, topic_affinity=0.8,
                              seed=3)
    result = simulate(source, topo, ["round_robin", "topology_aware"],
                      SimConfig(d_model=64, expert_bytes=1000, dispatch="hierarchical"),
                      {"topology_aware": {"balance_slack": 0.1}})
    rr, ta = result.policies
    assert ta.inter_node_bytes.sum() < 0.75 * rr.inter_node_bytes.sum()
    assert ta.balancedness.min() > 0.75
    assert ta.balancedness.mean() > rr.balancedness.mean()
    assert ta.slots_per_device.max() <= 2 * 3  # two layers of at most 3 slots
    assert result.to_dict()["policies"][1]["summary"]["memory_bytes_per_device_max"] == \
        ta.slots_per_device.max() * 1000


def test_trace_source(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    with TraceWriter(tmp_path / "t", 2, 8, 2) as w:
        for _ in range(3):
            for layer in range(2):
                experts = torch.from_numpy(np.stack([rng.choice(8, 2, replace=False) for _ in range(16)]))
                w.write(layer, experts, torch.ones(16, 2))
    result = simulate(TraceRouting(read_trace(tmp_path / "t")), Topology.uniform(2, 2, 3),
                      ["round_robin", "topology_aware"], SimConfig(d_model=8))
    assert (result.steps, result.tokens_per_step, result.layers) == (3, 16, 2)
    assert all(p.inter_node_bytes.shape == (2,) for p in result.policies)


def test_synthetic_routing_is_deterministic_and_distinct() -> None:
    source = SyntheticRouting(num_layers=2, num_experts=16, top_k=4, tokens=500, topics=4, topic_affinity=0.9)
    a, b = source.step(7), source.step(7)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
        assert x.shape == (500, 4) and x.min() >= 0 and x.max() < 16
        assert (np.sort(x, axis=1)[:, 1:] != np.sort(x, axis=1)[:, :-1]).all()
    with pytest.raises(ConfigError, match="topic_affinity"):
        SyntheticRouting(num_experts=16, top_k=8, topics=4, topic_affinity=1.0)


def test_sim_cli(tmp_path: Path) -> None:
    runner = CliRunner()
    args = ["sim", "--devices", "8", "--devices-per-node", "4", "--experts", "16", "--layers", "2", "--top-k", "2",
            "--tokens", "256", "--d-model", "32"]
    out = runner.invoke(app, [*args, "--json", "--plot", str(tmp_path / "p.png")])
    assert out.exit_code == 0, out.output
    doc = json.loads(out.stdout)  # progress lines go to stderr
    assert "sim: planned balanced (2 layers)" in out.stderr
    assert [p["policy"] for p in doc["policies"]] == ["round_robin", "balanced", "topology_aware"]
    assert len(doc["policies"][2]["per_layer"]["inter_node_bytes"]) == 2
    assert (tmp_path / "p.png").stat().st_size > 0
    assert runner.invoke(app, args).exit_code == 0
    bad = runner.invoke(app, [*args, "--policies", "nope"])
    assert bad.exit_code == 2 and "placement policy 'nope' is unknown" in bad.output


def test_simulate_reports_progress_per_stage() -> None:
    """Long simulations say what they finished: calibration, each policy's plan, each replayed step."""
    lines: list[str] = []
    source = SyntheticRouting(2, 16, 2, 64, 0.5, 4, 0.5, 0)
    simulate(source, Topology.uniform(2, 2, 5), ["round_robin", "balanced"], progress=lines.append)
    assert lines[0].startswith("calibrated on ")
    assert [line.split()[1] for line in lines[1:3]] == ["round_robin", "balanced"]
    assert any(line.startswith("replayed step 1 through balanced") for line in lines)
