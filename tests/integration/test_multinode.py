"""expertray on a real multi-node Ray (head + worker raylets on this machine, each worker with a node address
of its own, `expert_slot` standing in for GPUs): placement by node, a second driver, growing onto a joining
node, losing a node under a stream; then the same model with the collective transport (gloo), its group
spanning raylets: correct answers, and losing a node under a stream.

The scenarios run in expertray/tools/bench/multinode.py, in a process of its own (this process already
holds the session's Ray connection), started as soon as collection shows these tests will run (the integration
conftest's `multinode_driver`), so the rest of the suite runs meanwhile; each test checks one scenario's JSON
result.
"""

from __future__ import annotations

from typing import Any

import pytest
from multinode_driver import Driver

AUTOSCALE_BUDGET_S = 300
CLEAR_ERRORS = {"RequestTimeoutError", "ExpertUnavailableError", "RouterUnavailableError"}


@pytest.fixture(scope="module")
def scenarios(multinode_driver: Driver) -> dict[str, Any]:
    return multinode_driver.result()


def _scenario(scenarios: dict[str, Any], name: str) -> dict[str, Any]:
    got = scenarios.get(name)
    assert got is not None, f"scenario {name} did not run"
    assert "error" not in got, f"scenario {name} failed: {got['error']}\n{got.get('trace', '')}"
    return got


def test_actors_spread_by_node_and_replicas_prefer_another_node(scenarios) -> None:
    s = _scenario(scenarios, "spread")
    assert s["actors_per_worker"] == [2, 2]  # 4 actors, two 2-slot workers
    assert s["actors_on_head"] == 0  # the head has no expert_slot
    assert s["replica_nodes"][0] != s["replica_nodes"][1] and None not in s["replica_nodes"]
    assert s["controller_on_head"] and s["router_node_known"]
    assert s["nodes_listed"] == 3
    assert s["correct"]


def test_connect_from_a_second_driver(scenarios) -> None:
    s = _scenario(scenarios, "connect")
    assert s == {**s, "actors": 4, "correct": True}


def _no_loss(stream: dict[str, Any]) -> None:
    assert stream["wrong"] == 0 and stream["hung"] == 0
    assert set(stream["errors"]) <= CLEAR_ERRORS, stream["errors"]
    assert stream["requests"] == stream["ok"] + sum(stream["errors"].values())  # nothing lost
    assert stream["ok"] > 0


def test_grows_onto_a_node_that_joins_mid_stream(scenarios) -> None:
    s = _scenario(scenarios, "grow")
    assert s["new_actor_on_new_node"]
    _no_loss(s["stream"])
    assert s["correct"]


def test_losing_a_node_under_a_stream_loses_nothing(scenarios) -> None:
    s = _scenario(scenarios, "remove_node")
    assert len(s["removed_actors"]) == 2 and s["replaced_on_live_nodes"]
    _no_loss(s["stream"])
    assert s["first_ok_s"] is not None  # answers flowed again after the loss
    assert s["correct_after"]


def test_collective_group_spans_raylets_and_answers_correctly(scenarios) -> None:
    s = _scenario(scenarios, "collective")
    assert s["cfg_transport"] == "collective"
    assert s["transports"] == [["collective", "gloo"]] * s["routers"] and s["routers"] >= 1
    assert s["actors_on_head"] == 0 and "127.0.0.1" not in s["actor_ips"] and len(s["actor_ips"]) >= 2
    assert s["routers_with_actors_elsewhere"] == s["routers"]  # every router's group crosses raylets
    assert s["correct"]


def test_collective_losing_a_node_under_a_stream_loses_nothing_and_regroups(scenarios) -> None:
    s = _scenario(scenarios, "collective_remove_node")
    assert len(s["removed_actors"]) == 2 and s["replaced_on_live_nodes"]
    _no_loss(s["stream"])
    assert s["first_ok_s"] is not None
    assert s["correct_after"]
    assert s["transports_after"] and all(t == ["collective", "gloo"] for t in s["transports_after"])
    assert s["correct_regrouped"]


@pytest.mark.slow
def test_the_autoscaler_starts_a_node_for_a_new_actor_and_a_node_that_never_comes_is_a_clear_error() -> None:
    """Ray's fake multi-node autoscaler (worker raylets started as local processes) answers the
    controller's request_resources, for add_actor and for the autoscale policy: ~2 min on 2 cores, so slow."""
    driver = Driver(["--scenarios", "autoscale"], AUTOSCALE_BUDGET_S)
    try:
        s = _scenario(driver.result(), "autoscale")
    finally:
        driver.stop()
    assert s["resource_request"]["bundles"] == 3  # two actors kept + the new one
    assert s["resource_request"]["bundle"] == {"CPU": 0.1, "expert_slot": 1}
    assert s["resource_request"]["withdrawn"] >= s["resource_request"]["t"]  # met: no floor left standing
    assert s["new_actor_node_new"] and s["expert_nodes"] == 2
    _no_loss(s["stream"])
    assert s["filler_node"]
    p = s["policy"]  # the autoscale policy: request_resources while no node has room, then add_actor there
    assert p["decisions"][0] == ["request_resources", True] and ["add_actor", True] in p["decisions"]
    assert len(p["added"]) == 1 and p["on_new_node"] and p["request_to_serving_s"] is not None
    assert p["request"]["withdrawn"] >= p["request"]["t"]
    _no_loss(p["stream"])
    assert s["no_room"].get("error") and "did not start within" in s["no_room"]["error"]
    assert "request_resources" in s["no_room"]["error"]
    assert s["actors_after"] == 6 and s["all_alive_after"]  # the pending actor is gone, the rest serve
    assert s["correct_after"]
