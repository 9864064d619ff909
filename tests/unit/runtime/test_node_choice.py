"""Node choice for new expert actors: suspect and silent nodes steer replacements away from a node just lost."""

from __future__ import annotations

import pytest

from expertray.errors import ConfigError, ExpertRayError
from expertray.runtime.liveness import Reply
from expertray.runtime.node_choice import SUSPECT_NODE_S, ActorNodes
from expertray.state.placement_table import PlacementTable

DEMAND = {"CPU": 1.0}


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _node(node_id: str, cpus: float = 4.0):
    from expertray.state.ray_nodes import NodeInfo

    return NodeInfo(node_id, f"10.0.0.{len(node_id)}", {"CPU": cpus})


def _nodes(*nodes):
    return lambda: list(nodes)


def test_a_new_actor_goes_to_the_node_with_most_room_and_counts_our_actors_there() -> None:
    nodes = ActorNodes()
    nodes.of = {"expert-0": "a", "expert-1": "a"}
    assert nodes.choose(DEMAND, _nodes(_node("a"), _node("b")), ["expert-0", "expert-1"]) == "b"
    # an actor we no longer run holds no room
    assert nodes.choose(DEMAND, _nodes(_node("a"), _node("b", cpus=3.0)), []) == "a"


def test_a_suspect_node_is_avoided_while_another_has_room_then_forgotten() -> None:
    clock = Clock()
    nodes = ActorNodes(clock)
    nodes.of = {"expert-0": "a"}
    nodes.ping_result("expert-0", failed=True)
    assert nodes.suspect == {"a": 100.0}
    assert nodes.choose(DEMAND, _nodes(_node("a", 8.0), _node("b", 2.0)), []) == "b"
    assert nodes.choose(DEMAND, _nodes(_node("a", 8.0)), []) == "a"  # the only node with room
    clock.now += SUSPECT_NODE_S
    assert nodes.choose(DEMAND, _nodes(_node("a", 8.0), _node("b", 2.0)), []) == "a"
    assert nodes.suspect == {}


def test_a_ping_that_succeeds_clears_the_suspicion_and_an_unknown_node_tells_nothing() -> None:
    nodes = ActorNodes()
    nodes.of = {"expert-0": "a", "expert-1": None}
    nodes.ping_result("expert-0", failed=True)
    nodes.ping_result("expert-1", failed=True)
    assert set(nodes.suspect) == {"a"}
    nodes.ping_result("expert-0", failed=False)
    assert nodes.suspect == {}


def test_a_silent_node_is_used_only_when_no_other_node_has_room_even_a_suspect_one() -> None:
    clock = Clock()
    nodes = ActorNodes(clock)
    nodes.of = {"expert-0": "a", "expert-1": "b"}
    nodes.liveness_replies({"expert-0": Reply.SILENT, "expert-1": Reply.ANSWERED}, sent_at=99.0, held={"expert-0"})
    assert nodes.silent == {"a": 99.0} and set(nodes.suspect) == {"a"}
    nodes.suspect["c"] = clock.now  # c is merely suspect: still preferred over the silent node
    assert nodes.choose(DEMAND, _nodes(_node("a", 8.0), _node("c", 1.0)), []) == "c"
    assert nodes.choose(DEMAND, _nodes(_node("a", 8.0), _node("c", 0.5)), []) == "a"
    nodes.liveness_replies({"expert-0": Reply.ANSWERED}, sent_at=101.0, held={"expert-0"})
    assert nodes.silent == {} and "a" not in nodes.suspect


def test_liveness_replies_one_silent_actor_keeps_its_node_suspect_whatever_the_order() -> None:
    nodes = ActorNodes()
    nodes.of = {"expert-0": "a", "expert-1": "a"}
    nodes.liveness_replies({"expert-0": Reply.SILENT, "expert-1": Reply.ANSWERED}, 1.0, {"expert-0", "expert-1"})
    assert "a" in nodes.suspect and "a" in nodes.silent


def test_liveness_replies_a_death_clears_the_node_only_while_we_hold_the_actor() -> None:
    nodes = ActorNodes()
    nodes.of = {"expert-0": "a", "expert-1": "b"}
    nodes.suspect = {"a": 1.0, "b": 1.0}
    # expert-0 died while held (its node answered for it); expert-1 was already killed by a heal
    nodes.liveness_replies({"expert-0": Reply.DIED, "expert-1": Reply.DIED}, 2.0, held={"expert-0"})
    assert nodes.suspect == {"b": 1.0}


def test_no_node_list_leaves_the_node_to_ray(caplog) -> None:
    def broken():
        raise ExpertRayError("GCS unreachable")

    assert ActorNodes().choose(DEMAND, broken, []) is None
    assert "GCS unreachable" in caplog.text
    assert ActorNodes().report(broken, []) == [{"error": "GCS unreachable"}]


def test_no_node_with_room_is_none() -> None:
    assert ActorNodes().choose({"GPU": 1.0}, _nodes(_node("a")), []) is None


def test_observed_locations_replace_chosen_ones_and_report_groups_actors_by_node() -> None:
    nodes = ActorNodes()
    nodes.of = {"expert-0": None, "expert-1": "a"}
    nodes.observed({"expert-0": {"node_id": "b"}, "expert-1": None, "router-0": {"node_id": "a"}},
                   ["expert-0", "expert-1"])
    assert nodes.of == {"expert-0": "b", "expert-1": "a"}
    report = nodes.report(_nodes(_node("a"), _node("b")), ["expert-0", "expert-1"])
    assert [(r["node_id"], r["actors"]) for r in report] == [("a", ["expert-1"]), ("b", ["expert-0"])]


def test_keeping_leaves_out_actors_on_suspect_nodes() -> None:
    nodes = ActorNodes()
    nodes.of = {"expert-0": "a", "expert-1": "b", "expert-2": None}
    nodes.suspect = {"a": 0.0}
    assert nodes.keeping(["expert-0", "expert-1", "expert-2"]) == 2


def test_a_replica_goes_to_a_node_without_one_then_to_the_emptiest_actor() -> None:
    table = PlacementTable.balanced(1, 4, ["expert-0", "expert-1", "expert-2"])
    nodes = ActorNodes()
    holder = table.replicas(0, 0)[0].actor
    others = [a for a in table.actors if a != holder]
    nodes.of = {holder: "a", others[0]: "a", others[1]: "b"}
    assert nodes.replica_destination(table, 0, 0) == others[1]
    nodes.of[others[1]] = "a"
    fewest = min(others, key=lambda a: (len(table.slots_of(a)), table.actors.index(a)))
    assert nodes.replica_destination(table, 0, 0) == fewest
    full = table.replicate(0, 0, others[0]).replicate(0, 0, others[1])
    with pytest.raises(ConfigError, match="every actor already holds expert 0:0"):
        nodes.replica_destination(full, 0, 0)
