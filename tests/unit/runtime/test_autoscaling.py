"""The autoscale loop without Ray: each decided action becomes a table change, an added actor or an
autoscaler request, is logged with its outcome, and the policy's state carries over a restart."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from expertray.errors import ExpertRayError
from expertray.policies.autoscale import AUTOSCALE, Action, AutoscalePolicy
from expertray.runtime.autoscaling import Autoscaler, signals_from
from expertray.state.placement_table import PlacementTable


class FakeControl:
    def __init__(self) -> None:
        self.table = PlacementTable.balanced(1, 4, ["expert-0", "expert-1"])
        self.lock = asyncio.Lock()
        self.applied: list[tuple[PlacementTable, str]] = []

    async def apply(self, new: PlacementTable, reason: str) -> dict:
        assert self.lock.locked(), "changes are applied under the lock"
        self.applied.append((new, reason))
        self.table = new.bump(self.table.version + 1)
        return {"version": self.table.version}


class FakeCluster:
    def __init__(self) -> None:
        self.control = FakeControl()
        self.added: list[str] = []
        self.asked: list[str] = []
        self.room = True
        self.counted: list[str] = []

    async def signals(self) -> str:
        return "signals"

    async def add_actor(self, reason: str) -> str:
        assert self.control.lock.locked()
        self.added.append(reason)
        return "expert-2"

    def ask_for_room(self, why: str) -> bool:
        self.asked.append(why)
        return self.room

    def count_action(self, kind: str) -> None:
        self.counted.append(kind)


class Scripted(AutoscalePolicy):
    def __init__(self, actions: list[Action]) -> None:
        self.actions = actions
        self.seen: list[tuple] = []

    def decide(self, signals, table, now_s):
        self.seen.append((signals, table.version, now_s))
        return self.actions


def _autoscaler(actions: list[Action], max_expert_actors: int = 4) -> tuple[Autoscaler, FakeCluster]:
    cluster = FakeCluster()
    autoscaler = Autoscaler("hysteresis", {}, 0.01, max_expert_actors, cluster, AUTOSCALE.create, clock=lambda: 42.0)
    autoscaler.policy = Scripted(actions)
    return autoscaler, cluster


def test_each_action_is_applied_counted_and_logged_with_its_outcome() -> None:
    actions = [Action("replicate", "hot", layer=0, expert=0, dst="expert-1"),
               Action("migrate", "bad", layer=0, expert=3, src="expert-0", dst="expert-1"),  # expert-0 lacks 0:3
               Action("add_actor", "busy")]
    autoscaler, cluster = _autoscaler(actions)
    done = asyncio.run(autoscaler.step())
    assert autoscaler.policy.seen == [("signals", 0, 42.0)]
    assert [e["ok"] for e in done] == [True, False, True] and "error" in done[1]
    assert cluster.control.applied[0][1] == "autoscale: hot"
    assert cluster.control.table.replicas(0, 0)[-1].actor == "expert-1"
    assert cluster.added == ["autoscale: busy"]
    assert cluster.counted == ["replicate", "migrate", "add_actor"]
    assert autoscaler.log == done and done[0]["kind"] == "replicate" and done[0]["dst"] == "expert-1"


def test_a_resource_request_is_refused_at_the_actor_limit_and_reported_when_it_fails() -> None:
    autoscaler, cluster = _autoscaler([Action("request_resources", "no room")], max_expert_actors=2)
    [entry] = asyncio.run(autoscaler.step())
    assert not entry["ok"] and "max_expert_actors (2)" in entry["error"] and cluster.asked == []
    autoscaler.max_expert_actors = 3
    cluster.room = False
    [entry] = asyncio.run(autoscaler.step())
    assert cluster.asked == ["autoscale: no room"] and entry["error"] == "request_resources failed (see the " \
                                                                          "controller log)"
    cluster.room = True
    assert asyncio.run(autoscaler.step())[0]["ok"]


def test_turning_on_builds_the_policy_restores_its_state_and_runs_the_loop() -> None:
    async def scenario():
        cluster = FakeCluster()
        autoscaler = Autoscaler("hysteresis", {"sustain_checks": 1}, 0.01, 4, cluster, AUTOSCALE.create, clock=lambda: 100.0)
        assert autoscaler.state() == {"on": False}
        saved = {"streaks": [[["hot", 0, 1], 2]], "cooldown_ages_s": [[["actor", "expert-0"], 3.0]]}
        autoscaler.saved = {"on": True, "policy": "hysteresis", "state": saved}
        autoscaler.turn(True)
        task = autoscaler.task
        autoscaler.turn(True)  # already on: the same loop
        assert autoscaler.task is task
        assert autoscaler.state() == {"on": True, "policy": "hysteresis", "state": saved}
        autoscaler.policy = Scripted([Action("add_actor", "loop")])
        for _ in range(100):
            await asyncio.sleep(0.01)
            if cluster.added:
                break
        assert cluster.added and autoscaler.report()["recent_actions"][0]["reason"] == "loop"
        autoscaler.turn(False)
        assert not autoscaler.on and autoscaler.state()["on"] is False and "state" in autoscaler.state()

    asyncio.run(scenario())


def test_state_saved_by_another_policy_or_broken_is_not_used(caplog) -> None:
    async def scenario(saved):
        autoscaler = Autoscaler("hysteresis", {}, 1.0, 4, FakeCluster(), AUTOSCALE.create, clock=lambda: 0.0)
        autoscaler.saved = saved
        autoscaler.turn(True)
        autoscaler.turn(False)
        return autoscaler.state()["state"]

    empty = {"streaks": [], "cooldown_ages_s": []}
    assert asyncio.run(scenario({"policy": "other", "state": {"streaks": [[["hot", 0, 1], 2]]}})) == empty
    assert asyncio.run(scenario({"policy": "hysteresis", "state": {"streaks": "x"}})) == empty
    assert "autoscaler state in the snapshot not used" in caplog.text


def test_signals_sum_routers_and_skip_actors_without_samples() -> None:
    table = PlacementTable.balanced(2, 3, ["expert-0", "expert-1"])
    routers = [{"tokens_per_s": 10.0, "layers": [{"layer": 0, "expert_load": [1, 2, 3]},
                                                 {"layer": 1, "expert_load": [0, 0, 1]}]},
               {"tokens_per_s": 5.0, "layers": [{"layer": 0, "expert_load": [1, 0, 0]}]}]
    actors = {"expert-0": {"ms_per_krow_p50": 2.0, "compute_ms_p99": 9.0, "memory_bytes": 100},
              "expert-1": {"ms_per_krow_p50": 0.0, "compute_ms_p99": 0.0, "memory_bytes": 50}}
    s = signals_from(routers, actors, table, free_capacity=1, memory_budget_bytes=1000, expert_bytes=64)
    np.testing.assert_array_equal(s.load, [[2, 2, 3], [0, 0, 1]])
    assert s.tokens_per_s == 15.0 and s.free_capacity == 1 and s.expert_bytes == 64
    assert s.latency_p50_ms == {"expert-0": 2.0}
    assert s.latency_p99_ms == {"expert-0": 9.0, "expert-1": 0.0}
    assert s.memory_budget_bytes == {"expert-0": 1000, "expert-1": 1000}
    assert signals_from(routers, actors, table, 0, 0, 64).memory_budget_bytes == {}


def test_a_step_before_the_autoscaler_was_ever_on_is_refused() -> None:
    autoscaler = Autoscaler("hysteresis", {}, 1.0, 4, FakeCluster(), AUTOSCALE.create)
    with pytest.raises(ExpertRayError, match="'hysteresis' autoscaler was never turned on"):
        asyncio.run(autoscaler.step())
