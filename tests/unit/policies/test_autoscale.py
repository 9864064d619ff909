"""Autoscale `hysteresis`: sustain checks and cooldowns, hot/cold replication, straggler migration, memory
budgets, scaling and resource requests, action limits, and the validation of signals and actions."""

import logging

import numpy as np
import pytest

from expertray.errors import ConfigError, UnknownExpertError
from expertray.policies.autoscale import (
    AUTOSCALE,
    Action,
    Hysteresis,
    HysteresisParams,
    Signals,
)
from expertray.state.placement_table import PlacementTable


def _table(experts: int = 4, actors: tuple[str, ...] = ("a", "b"), empty: tuple[str, ...] = ("c",)
           ) -> PlacementTable:
    table = PlacementTable.balanced(1, experts, list(actors))
    for a in empty:
        table = table.with_actor(a)
    return table


def _signals(load: list[float], **kw) -> Signals:
    kw.setdefault("tokens_per_s", 0.0)
    kw.setdefault("free_capacity", 1)
    return Signals(np.array([load], dtype=float), **kw)


def _policy(**params) -> Hysteresis:
    policy = AUTOSCALE.create("hysteresis", **params)
    assert isinstance(policy, Hysteresis)
    return policy


def test_registry_and_parameter_errors() -> None:
    assert "hysteresis" in AUTOSCALE.names()
    assert _policy().params == HysteresisParams()
    with pytest.raises(ConfigError, match=r"cold_ratio: must be in \[0, hot_ratio / 2 = 1.0\)"):
        AUTOSCALE.create("hysteresis", cold_ratio=1.5)
    with pytest.raises(ConfigError, match="scale_down_tokens_per_s"):
        AUTOSCALE.create("hysteresis", scale_up_tokens_per_s=10, scale_down_tokens_per_s=20)


def test_hot_expert_waits_for_sustain_checks_then_replicates_to_the_least_loaded() -> None:
    # a: e0, e1 (1000 tokens), b: e2, e3 (200), c: empty. Mean per slot 1200 / 4 = 300; e0 at 3.0 x.
    table, policy = _table(), _policy(sustain_checks=3)
    sig = _signals([900, 100, 100, 100])
    assert policy.decide(sig, table, 0.0) == []
    assert policy.decide(sig, table, 1.0) == []
    [action] = policy.decide(sig, table, 2.0)
    assert (action.kind, action.layer, action.expert, action.dst) == ("replicate", 0, 0, "c")
    assert "3.00 x the layer mean per slot (300.0)" in action.reason and "for 3 checks" in action.reason
    assert [s.actor for s in action.apply(table).replicas(0, 0)] == ["a", "c"]


def test_a_broken_streak_starts_over() -> None:
    table, policy = _table(), _policy(sustain_checks=3)
    hot, calm = _signals([900, 100, 100, 100]), _signals([100, 100, 100, 100])
    for t, sig in enumerate([hot, hot, calm, hot, hot]):
        assert policy.decide(sig, table, float(t)) == []
    assert [a.kind for a in policy.decide(hot, table, 5.0)] == ["replicate"]


def test_cooldown_holds_the_same_expert_back() -> None:
    # still hot with two replicas: 2000 / 2 = 1000 vs mean 2300 / 5 = 460, 2.17 x
    table, policy = _table(), _policy(sustain_checks=1, cooldown_s=10.0)
    sig = _signals([2000, 100, 100, 100])
    [first] = policy.decide(sig, table, 0.0)
    table = first.apply(table)
    assert policy.decide(sig, table, 5.0) == []  # due again, but 5 s < 10 s
    [second] = policy.decide(sig, table, 10.0)
    assert (second.kind, second.expert, second.dst) == ("replicate", 0, "b")


def test_cold_expert_loses_a_replica_but_never_its_last() -> None:
    # e0 on a and b: 10 tokens, 5 per replica; mean per slot 310 / 5 = 62 -> 0.08 x < 0.25. e1 has no load
    # but only one replica: left alone.
    table = PlacementTable.balanced(1, 4, ["a", "b"]).replicate(0, 0, "b")
    policy = _policy(sustain_checks=2, hot_ratio=4.0)  # e3 (200 / 62 = 3.2 x) is not hot here
    sig = _signals([10, 0, 100, 200])
    assert policy.decide(sig, table, 0.0) == []
    [action] = policy.decide(sig, table, 1.0)
    # a carries 5 + 0, b carries 5 + 100 + 200: drop the copy on the busier b
    assert (action.kind, action.expert, action.src) == ("dereplicate", 0, "b")
    table = action.apply(table)
    assert table.replica_counts(0) == [1, 1, 1, 1]
    assert policy.decide(sig, table, 100.0) == [] and policy.decide(sig, table, 101.0) == []


def test_a_cold_expert_keeps_its_shadows() -> None:
    """min_replicas 2: the same cold e0 on a and b is at its minimum and keeps both copies."""
    table = PlacementTable.balanced(1, 4, ["a", "b"]).replicate(0, 0, "b")
    policy = _policy(sustain_checks=1, hot_ratio=4.0)
    assert policy.decide(_signals([10, 0, 100, 200], min_replicas=2), table, 0.0) == []
    assert [a.kind for a in policy.decide(_signals([10, 0, 100, 200]), table, 1.0)] == ["dereplicate"]


def test_overflow_counts_as_demand() -> None:
    table, policy = _table(), _policy(sustain_checks=1)
    assert policy.decide(_signals([300, 100, 100, 100]), table, 0.0) == []  # 1.5 x
    sig = _signals([300, 100, 100, 100], overflow=np.array([[500, 0, 0, 0]]))  # 800 / (1100 / 4) = 2.9 x
    assert [a.kind for a in policy.decide(sig, table, 1.0)] == ["replicate"]


def test_straggler_hands_its_hottest_slot_to_the_least_loaded_healthy_actor() -> None:
    # a: e0, e1; b: e2, e3; c: e4, e5. c's p50 is 3 x the median (10 ms).
    table = PlacementTable.balanced(1, 6, ["a", "b", "c"])
    policy = _policy(sustain_checks=2, straggler_ratio=1.5)
    sig = _signals([50, 50, 10, 10, 40, 80], latency_p50_ms={"a": 10.0, "b": 9.0, "c": 30.0},
                   latency_p99_ms={"c": 90.0})
    assert policy.decide(sig, table, 0.0) == []
    [action] = policy.decide(sig, table, 1.0)
    assert (action.kind, action.layer, action.expert, action.src, action.dst) == ("migrate", 0, 5, "c", "b")
    assert "p50 30.00 ms >= 1.5 x the median 10.00 ms (p99 90.00 ms)" in action.reason
    assert [s.actor for s in action.apply(table).replicas(0, 5)] == ["b"]
    assert policy.decide(sig, action.apply(table), 2.0) == []  # its streak starts over


def test_memory_budget_is_respected() -> None:
    table, policy = _table(), _policy(sustain_checks=1)
    full = {"c": 1000, "b": 900}  # c: 1000 + 100 > 1000; b: 900 + 100 fits exactly
    sig = _signals([900, 100, 100, 100], memory_used_bytes=full, memory_budget_bytes={"b": 1000, "c": 1000},
                   expert_bytes=100)
    [action] = policy.decide(sig, table, 0.0)
    assert action.dst == "b"
    sig = _signals([900, 100, 100, 100], memory_used_bytes={"b": 901, "c": 1000},
                   memory_budget_bytes={"b": 1000, "c": 1000}, expert_bytes=100)
    assert _policy(sustain_checks=1).decide(sig, table, 0.0) == []  # nobody has room


def test_scaling_adds_requests_and_removes_actors() -> None:
    table = _table()  # 3 actors
    up = dict(sustain_checks=2, scale_up_tokens_per_s=100.0, scale_down_tokens_per_s=30.0)
    busy = _signals([100, 100, 100, 100], tokens_per_s=450.0, free_capacity=1)  # 150 per actor
    policy = _policy(**up)
    assert policy.decide(busy, table, 0.0) == []
    [action] = policy.decide(busy, table, 1.0)
    assert action.kind == "add_actor" and "150.0 tokens/s per actor (3 actors) > scale_up_tokens_per_s 100" in action.reason
    policy = _policy(**up)
    no_room = _signals([100, 100, 100, 100], tokens_per_s=450.0, free_capacity=0)
    policy.decide(no_room, table, 0.0)
    [action] = policy.decide(no_room, table, 1.0)
    assert action.kind == "request_resources" and "free_capacity 0" in action.reason
    # 60 tokens/s over 3 actors = 20 < 30: drain the least-loaded (c, empty); 60 / 2 = 30 is not over 100
    policy = _policy(**up)
    idle = _signals([100, 100, 100, 100], tokens_per_s=60.0)
    policy.decide(idle, table, 0.0)
    [action] = policy.decide(idle, table, 1.0)
    assert (action.kind, action.src) == ("remove_actor", "c")
    assert action.apply(table).actors == ("a", "b")
    # never below min_actors, and never so low that one fewer actor is over the scale-up line
    policy = _policy(**up, min_actors=3)
    assert policy.decide(idle, table, 0.0) == [] and policy.decide(idle, table, 1.0) == []
    policy = _policy(sustain_checks=1, scale_up_tokens_per_s=25.0, scale_down_tokens_per_s=24.0)
    assert policy.decide(_signals([1, 1, 1, 1], tokens_per_s=60.0), table, 0.0) == []  # 20 < 24, 30 > 25


def test_max_actions_keeps_the_hottest(caplog: pytest.LogCaptureFixture) -> None:
    # a: e0, e1; b: e2, e3; c: e4, e5; d: e6, e7. Mean per slot 3000 / 8 = 375: e0 (2.67 x), e1 (2.4 x) and
    # e2 (2.13 x) are hot; two actions allowed. e0 goes to c (100 tokens), then c carries 600, so e1 goes to d.
    table = PlacementTable.balanced(1, 8, ["a", "b", "c", "d"])
    policy = _policy(sustain_checks=1, max_actions=2)
    with caplog.at_level(logging.INFO, logger="expertray.policies.autoscale"):
        actions = policy.decide(_signals([1000, 900, 800, 50, 50, 50, 50, 100]), table, 0.0)
    assert [(a.kind, a.expert, a.dst) for a in actions] == [("replicate", 0, "c"), ("replicate", 1, "d")]
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("autoscale replicate: ")]
    assert [m.split()[3] for m in logged] == ["0:0", "0:1"]  # every action logged with its reason; e2 waits


def test_signals_and_actions_are_validated() -> None:
    with pytest.raises(ConfigError, match="signals.load"):
        Signals(np.ones(3), 0.0, 0)
    with pytest.raises(ConfigError, match="signals.overflow"):
        Signals(np.ones((1, 3)), 0.0, 0, overflow=np.ones((1, 2)))
    with pytest.raises(ConfigError, match="signals.tokens_per_s"):
        Signals(np.ones((1, 3)), float("nan"), 0)
    with pytest.raises(ConfigError, match=r"signals.latency_p50_ms\['a'\]"):
        Signals(np.ones((1, 3)), 0.0, 0, latency_p50_ms={"a": -1.0})
    table = _table()
    with pytest.raises(ConfigError, match="does not match the table's 1 layers x 4 experts"):
        _policy().decide(Signals(np.ones((1, 3)), 0.0, 0), table, 0.0)
    with pytest.raises(UnknownExpertError, match="signals.latency_p50_ms names actor 'zz'"):
        _policy().decide(_signals([1, 1, 1, 1], latency_p50_ms={"zz": 1.0}), table, 0.0)
    with pytest.raises(ConfigError, match="action.kind: 'grow'"):
        Action("grow", "why")
    with pytest.raises(ConfigError, match="action migrate: needs src, dst"):
        Action("migrate", "why", layer=0, expert=1)
    assert Action("add_actor", "why").apply(table) is table


def test_straggler_slots_moves_several_slots_in_one_decision() -> None:
    """The actor's cooldown starts after the decision: with straggler_slots=2 both of c's slots move at once
    (the cooldown set by the first migration used to hold the second back until the next decision)."""
    table = PlacementTable.balanced(1, 6, ["a", "b", "c"])
    policy = _policy(sustain_checks=1, straggler_ratio=1.5, straggler_slots=2)
    sig = _signals([50, 50, 10, 10, 40, 80], latency_p50_ms={"a": 10.0, "b": 9.0, "c": 30.0})
    actions = policy.decide(sig, table, 0.0)
    assert [(a.kind, a.expert, a.src) for a in actions] == [("migrate", 5, "c"), ("migrate", 4, "c")]
    after = actions[1].apply(actions[0].apply(table))
    assert after.slots_of("c") == []
    assert policy.decide(sig, after, 1.0) == []  # c holds nothing more to move, and it is cooling down



def test_state_survives_export_and_restore_with_another_clock() -> None:
    """The controller persists the policy's streaks and cooldowns: a restarted controller
    neither acts early (cooldown kept) nor forgets a streak."""
    table = PlacementTable.balanced(1, 6, ["a", "b", "c"])
    sig = _signals([50, 50, 10, 10, 40, 80], latency_p50_ms={"a": 10.0, "b": 9.0, "c": 30.0})
    policy = _policy(sustain_checks=1, cooldown_s=10.0)
    [action] = policy.decide(sig, table, 100.0)
    state = policy.export_state(103.0)  # 3 s after the action
    restored = _policy(sustain_checks=1, cooldown_s=10.0)
    restored.restore_state(state, 5.0)  # a new process: its clock reads 5 s
    table = action.apply(table)
    assert restored.decide(sig, table, 8.0) == []  # 6 s after the action: c is still cooling down
    assert [a.kind for a in restored.decide(sig, table, 13.0)] == ["migrate"]  # 11 s after


@pytest.mark.parametrize("state", [{"streaks": "x"}, {"streaks": [[["hot", 0, 1], -1]]},
                                   {"cooldown_ages_s": [[["actor", "c"], "NaN"]]}])
def test_bad_policy_state_is_refused(state: dict) -> None:
    with pytest.raises(ConfigError, match="autoscale.hysteresis state"):
        _policy().restore_state(state, 0.0)
