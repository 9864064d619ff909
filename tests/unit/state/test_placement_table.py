"""PlacementTable: construction, routes, versioned changes, errors."""

import pytest
import torch

from expertray.errors import ConfigError, UnknownExpertError
from expertray.state.placement_table import PlacementTable, Slot


def test_balanced_uneven_split_and_route() -> None:
    t = PlacementTable.balanced(2, 8, ["a", "b", "c"])
    assert [sum(1 for s in t.slots_of(a) if s.layer == 0) for a in "abc"] == [3, 3, 2]
    r = t.route(1)
    assert r.dest_actor.tolist() == [0, 0, 0, 1, 1, 1, 2, 2]
    assert r.dest_expert.tolist() == list(range(8))


def test_replicate_migrate_drain_versions() -> None:
    t = PlacementTable.balanced(1, 4, ["a", "b"])
    t1 = t.replicate(0, 0, "b")
    assert t1.version == 1 and len(t1.replicas(0, 0)) == 2
    assert t1.route(0).dest_actor.tolist() == [0, 0, 1, 1, 1]  # still contiguous per actor
    t2 = t1.migrate(0, 3, "b", "a")
    assert t2.version == 2 and [s.actor for s in t2.replicas(0, 3)] == ["a"]
    t3 = t2.drain("a")
    assert t3.actors == ("b",) and all(s.actor == "b" for s in t3.slots)
    assert t3.replica_counts(0) == [1, 1, 1, 1]


def test_errors_name_the_problem() -> None:
    t = PlacementTable.balanced(1, 4, ["a", "b"])
    with pytest.raises(UnknownExpertError, match="unknown expert 0:9"):
        t.replicas(0, 9)
    with pytest.raises(UnknownExpertError, match="unknown layer 2"):
        t.route(2)
    with pytest.raises(UnknownExpertError, match="unknown actor 'z'"):
        t.replicate(0, 1, "z")
    with pytest.raises(ConfigError, match="already holds"):
        t.replicate(0, 0, "a")
    with pytest.raises(ConfigError, match="without any replica"):
        t.remove(0, 0, "a")
    with pytest.raises(ConfigError, match="only expert actor"):
        PlacementTable.balanced(1, 2, ["a"]).drain("a")


def test_dict_round_trip() -> None:
    t = PlacementTable.balanced(2, 4, ["a", "b"]).replicate(1, 2, "a")
    assert PlacementTable.from_dict(t.to_dict()) == t
    with pytest.raises(ConfigError, match="malformed"):
        PlacementTable.from_dict({"version": 1})
    assert isinstance(t.route(0).dest_actor, torch.Tensor) and Slot("a", 0, 0) in t.slots


def test_min_replicas_adds_shadows_on_other_actors_and_nodes_first() -> None:
    table = PlacementTable.balanced(2, 4, ["a", "b", "c", "d"])
    assert table.with_min_replicas(1) is table
    node_of = {"a": "n1", "b": "n1", "c": "n2", "d": "n2"}
    shadowed = table.with_min_replicas(2, node_of)
    assert shadowed.version == table.version + 1
    for layer in range(2):
        assert shadowed.replica_counts(layer) == [2, 2, 2, 2]
        for e in range(4):
            holders = [s.actor for s in shadowed.replicas(layer, e)]
            assert len({node_of[a] for a in holders}) == 2, (layer, e, holders)  # a lost node leaves a copy
    for layer in range(2):  # spread evenly within each layer (each layer's compute is one step of a token)
        per_actor = [sum(s.layer == layer for s in shadowed.slots_of(a)) for a in shadowed.actors]
        assert max(per_actor) - min(per_actor) <= 1, per_actor
    five = PlacementTable.balanced(2, 8, ["a", "b", "c", "d", "e"]).with_min_replicas(2)
    for layer in range(2):
        per_actor = [sum(s.layer == layer for s in five.slots_of(a)) for a in five.actors]
        assert max(per_actor) - min(per_actor) <= 1, per_actor
    assert shadowed.with_min_replicas(2, node_of) is shadowed
    assert table.with_min_replicas(9).replica_counts(0) == [4, 4, 4, 4]  # capped at the number of actors
    with pytest.raises(ConfigError, match="min_replicas must be >= 1"):
        table.with_min_replicas(0)
