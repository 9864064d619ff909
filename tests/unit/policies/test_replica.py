"""Replica selectors: round robin by token, power-of-two least loaded, locality; always a replica of the
right expert, and -1 stays -1."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from expertray.errors import ConfigError, InputError
from expertray.policies.replica import REPLICA, replica_table
from expertray.state.placement_table import PlacementTable


def _table() -> PlacementTable:
    # layer 0: experts 0..3 on a, a, b, c; expert 0 also on b and c.
    return PlacementTable.balanced(1, 4, ["a", "b", "c"]).replicate(0, 0, "b").replicate(0, 0, "c")


def test_registry() -> None:
    assert REPLICA.names() == ["least_loaded", "locality", "round_robin"]
    with pytest.raises(ConfigError, match="chunk_tokens"):
        REPLICA.create("least_loaded", chunk_tokens=0)


def test_round_robin_by_token_position() -> None:
    route = _table().route(0)
    reps = route.replicas[0]
    assert len(reps) == 3
    experts = torch.tensor([[0, 1], [0, -1], [0, 2], [0, 3]])
    d = REPLICA.create("round_robin").select(experts, route)
    assert d[:, 0].tolist() == [reps[0], reps[1], reps[2], reps[0]]
    assert d[1, 1] == -1
    assert route.dest_expert[d[[0, 2, 3], 1]].tolist() == [1, 2, 3]


def test_locality_prefers_local_replicas_and_falls_back() -> None:
    t = _table()
    route = t.route(0)
    c = t.actors.index("c")
    experts = torch.tensor([[0], [0], [1], [2], [3]])
    d = REPLICA.create("locality").select(experts, route, local_actors={c})
    assert route.dest_actor[d[:, 0]].tolist() == [c, c, 0, 1, c]  # 1 and 2 have no replica on c
    assert route.dest_expert[d[:, 0]].tolist() == [0, 0, 1, 2, 3]


def test_least_loaded_avoids_a_loaded_replica_and_is_seeded() -> None:
    route = PlacementTable.balanced(1, 2, ["a", "b"]).replicate(0, 0, "b").route(0)
    hot = route.replicas[0][0]
    dest_load = torch.zeros(route.num_dests)
    dest_load[hot] = 1e6
    experts = torch.zeros(4000, 1, dtype=torch.long)
    d = REPLICA.create("least_loaded", seed=3).select(experts, route, dest_load)
    # two draws both land on the hot replica 1/4 of the time; otherwise the cold one wins
    assert 0.2 < float((d == hot).float().mean()) < 0.3
    again = REPLICA.create("least_loaded", seed=3).select(experts, route, dest_load)
    assert torch.equal(d, again)
    # without a prior load, in-batch counts keep the two replicas even (refreshed every chunk)
    even = REPLICA.create("least_loaded", chunk_tokens=100).select(experts, route)
    share = float((even == hot).float().mean())
    assert 0.45 < share < 0.55
    with pytest.raises(InputError, match="dest_load must have"):
        REPLICA.create("least_loaded").select(experts, route, torch.zeros(1))


def test_out_of_range_expert_is_rejected() -> None:
    with pytest.raises(InputError, match="expert id 9"):
        REPLICA.create("round_robin").select(torch.tensor([[9]]), _table().route(0))


def test_replica_table_is_cached_per_route() -> None:
    route = _table().route(0)
    assert replica_table(route) is replica_table(route)
    assert replica_table(route, frozenset({0})) is not replica_table(route)


@settings(max_examples=40, deadline=None)
@given(E=st.integers(1, 12), actors=st.integers(1, 5), data=st.data(),
       name=st.sampled_from(["round_robin", "least_loaded", "locality"]))
def test_selection_returns_a_replica_of_the_right_expert(E: int, actors: int, data: st.DataObject,
                                                         name: str) -> None:
    names = [f"a{i}" for i in range(actors)]
    t = PlacementTable.balanced(1, E, names)
    for _ in range(data.draw(st.integers(0, 10))):
        e, a = data.draw(st.integers(0, E - 1)), data.draw(st.sampled_from(names))
        if all(s.actor != a for s in t.replicas(0, e)):
            t = t.replicate(0, e, a)
    route = t.route(0)
    T, k = data.draw(st.integers(1, 50)), data.draw(st.integers(1, 3))
    experts = torch.tensor(data.draw(st.lists(st.lists(st.integers(-1, E - 1), min_size=k, max_size=k),
                                              min_size=T, max_size=T)))
    local = set(data.draw(st.lists(st.integers(0, actors - 1), max_size=actors)))
    d = REPLICA.create(name).select(experts, route, torch.rand(route.num_dests) * 10, local)
    assert torch.equal(d < 0, experts < 0)
    assert torch.equal(route.dest_expert[d[d >= 0]], experts[experts >= 0])
    if name == "locality":
        for e, dest in zip(experts.reshape(-1).tolist(), d.reshape(-1).tolist(), strict=True):
            if e >= 0 and any(int(route.dest_actor[r]) in local for r in route.replicas[e]):
                assert int(route.dest_actor[dest]) in local
