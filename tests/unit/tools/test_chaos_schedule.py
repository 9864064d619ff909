"""The chaos bench's fault schedule: deterministic by seed, overlapping, and within its constraints."""

from __future__ import annotations

import pytest

from expertray.tools.bench.chaos_schedule import (
    DESTRUCTIVE,
    MULTI_NODE_KINDS,
    SINGLE_NODE_KINDS,
    ScheduleParams,
    make_schedule,
    overlapping_pairs,
)

MINUTES_10 = 600.0


def _schedule(seed: int = 0, shadows: bool = True, nodes: int = 0, duration_s: float = MINUTES_10):
    kinds = MULTI_NODE_KINDS if nodes else SINGLE_NODE_KINDS
    return make_schedule(seed, duration_s, kinds, shadows, actors=4, nodes=nodes)


def test_same_seed_same_schedule_other_seed_other_schedule() -> None:
    assert _schedule(seed=3) == _schedule(seed=3)
    assert _schedule(seed=3) != _schedule(seed=4)


@pytest.mark.parametrize("shadows", [True, False])
def test_faults_overlap_and_every_kind_appears(shadows: bool) -> None:
    events = _schedule(shadows=shadows)
    assert overlapping_pairs(events), "no two faults are ever in effect at once"
    assert {e.kind for e in events} == set(SINGLE_NODE_KINDS)
    assert [e.at_s for e in events] == sorted(e.at_s for e in events)


@pytest.mark.parametrize("seed", range(5))
def test_with_shadows_destructive_faults_never_overlap(seed: int) -> None:
    destructive = [e for e in _schedule(seed=seed, nodes=2) if e.kind in DESTRUCTIVE]
    assert len(destructive) >= 3
    assert not overlapping_pairs(destructive)


@pytest.mark.parametrize("shadows", [True, False])
def test_router_kills_never_overlap(shadows: bool) -> None:
    kills = [e for e in _schedule(shadows=shadows) if e.kind == "kill_router"]
    assert len(kills) >= 3
    assert not overlapping_pairs(kills)


def test_without_shadows_destructive_faults_may_overlap() -> None:
    destructive = [e for e in _schedule(seed=0, shadows=False) if e.destructive]
    assert overlapping_pairs(destructive)


@pytest.mark.parametrize("seed", range(5))
def test_events_stay_in_the_window_and_counts_in_bounds(seed: int) -> None:
    p = ScheduleParams()
    events = _schedule(seed=seed, nodes=2)
    assert all(p.lead_in_s < e.at_s < MINUTES_10 - p.quiet_tail_s for e in events)
    actors, nodes = 4, 2
    for e in events:
        actors += {"add_actor": 1, "drain_actor": -1}.get(e.kind, 0)
        nodes += {"add_node": 1, "remove_node": -1}.get(e.kind, 0)
        assert actors >= p.min_actors and nodes >= p.min_nodes
    for e in events:
        assert (e.hold_s > 0) == (e.kind in ("hang_expert", "slow_expert"))
        assert e.duration_s >= e.hold_s


def test_node_faults_need_multi_node_mode_and_kinds_are_checked() -> None:
    with pytest.raises(ValueError, match="remove_node"):
        make_schedule(0, 60.0, ("remove_node",), True, actors=4, nodes=0)
    with pytest.raises(ValueError, match="none"):
        make_schedule(0, 60.0, (), True, actors=4)
    with pytest.raises(ValueError, match="min_gap_s"):
        ScheduleParams(min_gap_s=0.0)


def test_a_short_run_has_faults() -> None:
    assert len(_schedule(duration_s=60.0)) >= 3
