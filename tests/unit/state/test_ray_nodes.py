"""Ray node records -> live nodes, node choice for new expert actors, actors grouped into a Topology."""

from __future__ import annotations

import pytest

from expertray.config import ClusterConfig
from expertray.errors import ConfigError
from expertray.state.ray_nodes import NodeInfo, choose_node, fits, nodes_from_ray, topology_from_nodes


def _record(node_id: str, ip: str, alive: bool = True, **resources: float) -> dict:
    return {"NodeID": node_id, "Alive": alive, "NodeManagerAddress": ip,
            "Resources": {"CPU": 2.0, f"node:{ip}": 1.0, **resources}, "Labels": {"ray.io/node-id": node_id}}


def test_live_nodes_parsed_dead_excluded_markers_dropped() -> None:
    head = _record("aa", "10.0.0.1")
    head["Resources"]["node:__internal_head__"] = 1.0
    records = [head, _record("bb", "10.0.0.2", alive=False, GPU=8.0), _record("cc", "10.0.0.3", GPU=8.0)]
    records[2]["Labels"]["ray.io/accelerator-type"] = "H100"
    nodes = nodes_from_ray(records)
    assert [n.node_id for n in nodes] == ["aa", "cc"]
    assert nodes[0].is_head and not nodes[1].is_head
    assert nodes[1].resources == {"CPU": 2.0, "GPU": 8.0}
    assert nodes[1].labels["ray.io/accelerator-type"] == "H100"
    assert nodes[1].ip == "10.0.0.3"


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda r: r.pop("NodeID"), "missing 'NodeID'"),
    (lambda r: r.update(Alive="yes"), "Alive must be bool"),
    (lambda r: r.update(NodeManagerAddress=5), "NodeManagerAddress must be str"),
    (lambda r: r["Resources"].update(GPU=-1), "resource 'GPU'"),
    (lambda r: r["Resources"].update(GPU=float("nan")), "resource 'GPU'"),
    (lambda r: r.update(Labels=["x"]), "Labels must be a mapping"),
])
def test_malformed_record_names_the_problem(mutate, message) -> None:
    bad = _record("bb", "10.0.0.2")
    mutate(bad)
    with pytest.raises(ConfigError, match=r"ray node record 1.*" + message.replace("(", r"\(")):
        nodes_from_ray([_record("aa", "10.0.0.1"), bad])


def test_no_live_node_and_duplicate_ids_are_errors() -> None:
    with pytest.raises(ConfigError, match="no live node"):
        nodes_from_ray([_record("aa", "10.0.0.1", alive=False)])
    with pytest.raises(ConfigError, match="appears twice"):
        nodes_from_ray([_record("aa", "10.0.0.1"), _record("aa", "10.0.0.2")])


def _node(node_id: str, **resources: float) -> NodeInfo:
    return NodeInfo(node_id, f"ip-{node_id}", resources)


def test_choose_node_most_room_then_spread_then_id() -> None:
    nodes = [_node("a", CPU=4, expert_slot=2), _node("b", CPU=4, expert_slot=3), _node("c", CPU=4)]
    demand = {"CPU": 0.5, "expert_slot": 1}
    assert choose_node(nodes, {}, demand).node_id == "b"  # 3 slots free beats 2; c has none
    used = {"b": {"CPU": 0.5, "expert_slot": 1}}
    assert choose_node(nodes, used, demand, {"b": 1}).node_id == "a"  # 2 vs 2: fewer of our actors
    assert choose_node(nodes, used, demand, {"a": 1, "b": 1}).node_id == "a"  # tie: lowest id
    full = {"a": {"expert_slot": 2}, "b": {"expert_slot": 3}}
    assert choose_node(nodes, full, demand) is None  # no room: Ray queues it until a node joins
    assert fits(nodes[1], {"expert_slot": 1}, demand) == 2


def test_placing_actors_one_by_one_spreads_and_grows_onto_a_new_node() -> None:
    nodes = [_node("a", CPU=2, expert_slot=2), _node("b", CPU=2, expert_slot=2)]
    demand = {"CPU": 0.25, "expert_slot": 1}
    placed: list[str] = []
    used: dict[str, dict[str, float]] = {}
    for _ in range(4):
        n = choose_node(nodes, used, demand, {x: placed.count(x) for x in placed})
        placed.append(n.node_id)
        for k, v in demand.items():
            used.setdefault(n.node_id, {})[k] = used.get(n.node_id, {}).get(k, 0.0) + v
    assert sorted(placed) == ["a", "a", "b", "b"] and placed[:2] != ["a", "a"]
    assert choose_node(nodes, used, demand) is None
    assert choose_node([*nodes, _node("c", CPU=2, expert_slot=1)], used, demand).node_id == "c"


def test_bad_demand_rejected() -> None:
    with pytest.raises(ConfigError, match="asks for nothing"):
        choose_node([_node("a", CPU=1)], {}, {"CPU": 0.0})
    with pytest.raises(ConfigError, match="GPU must be a finite number"):
        choose_node([_node("a", CPU=1)], {}, {"GPU": float("inf")})


def test_topology_groups_actors_by_node_in_actor_order() -> None:
    topo = topology_from_nodes({"e0": "n1", "e1": "n2", "e2": "n1", "e3": None}, ["e0", "e1", "e2", "e3"], 3)
    assert topo.nodes == (("e0", "e2"), ("e1",), ("e3",))
    assert topo.node_of("e2") == 0 and topo.slots_per_device == 3
    with pytest.raises(ConfigError, match="no actors"):
        topology_from_nodes({}, [], 3)


def test_actor_resources_config_checked() -> None:
    assert ClusterConfig(actor_resources={"expert_slot": 1}).actor_resources == {"expert_slot": 1}
    for bad in ({"GPU": 1}, {"expert_slot": -1}, {"": 1}, {"expert_slot": "one"}):
        with pytest.raises(ConfigError, match="cluster.actor_resources"):
            ClusterConfig(actor_resources=bad)


def test_avoided_nodes_are_used_only_when_no_other_has_room() -> None:
    nodes = [_node("a", CPU=2, expert_slot=4), _node("b", CPU=2, expert_slot=1)]
    demand = {"CPU": 0.25, "expert_slot": 1}
    assert choose_node(nodes, {}, demand).node_id == "a"
    assert choose_node(nodes, {}, demand, avoid={"a"}).node_id == "b"  # a just lost an actor: maybe dead
    assert choose_node(nodes, {"b": {"expert_slot": 1}}, demand, avoid={"a"}).node_id == "a"  # only a has room
