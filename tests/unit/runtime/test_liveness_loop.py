"""The liveness loop without Ray: rounds push suspects to routers and mark nodes, dead actors start one repair
at a time, and failed repairs back off."""

from __future__ import annotations

import asyncio
import logging

import pytest

from expertray.runtime.liveness import Reply
from expertray.runtime.liveness_loop import BACKOFF_MAX_S, ROUTER_CHECK_S, STAND_IN_AFTER_S, LivenessLoop
from expertray.runtime.node_choice import ActorNodes
from expertray.state.placement_table import PlacementTable


class Clock:
    def __init__(self) -> None:
        self.now = 10.0

    def __call__(self) -> float:
        return self.now


class FakeControl:
    """PlacementControl's surface the loop uses: table, lock, heal, heal_routers."""

    def __init__(self, actors: list[str]) -> None:
        self.table = PlacementTable.balanced(1, 4, actors)
        self.lock = asyncio.Lock()
        self.heals: list[frozenset[str]] = []
        self.stand_ins: list[frozenset[str]] = []
        self.router_checks = 0
        self.fail = False
        self.gate: asyncio.Event | None = None

    async def heal(self, reporter: str, known_dead: frozenset[str] = frozenset()) -> dict:
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise RuntimeError("no weights")
        self.heals.append(known_dead)
        return {}

    async def stand_in(self, silent: frozenset[str]) -> dict | None:
        self.stand_ins.append(silent)
        for layer, expert in self.table.stranded(silent):  # a copy on a live actor, as the real one does
            live = next(a for a in self.table.actors if a not in silent)
            self.table = self.table.replicate(layer, expert, live)
        return {"reason": f"stand-in for {sorted(silent)}"}

    async def heal_routers(self) -> dict[str, str]:
        self.router_checks += 1
        if self.fail:
            raise RuntimeError("router start failed")
        return {}


class FakeProbe:
    def __init__(self, replies: dict[str, Reply]) -> None:
        self.replies = replies
        self.held = set(replies)
        self.pushes: list[tuple[list[str], list[str]]] = []
        self.failing_routers: list[str] = []

    def has(self, actor: str) -> bool:
        return actor in self.held

    async def ping(self, actor: str) -> Reply:
        return self.replies[actor]

    async def push(self, suspects: list[str], recovered: list[str]) -> tuple[int, list[str]]:
        self.pushes.append((suspects, recovered))
        return 2, self.failing_routers


def _loop(replies: dict[str, Reply], dead_after_s: float = 5.0):
    clock = Clock()
    control, probe, nodes = FakeControl(list(replies)), FakeProbe(replies), ActorNodes(clock)
    nodes.of = {a: f"node-{a}" for a in replies}
    return LivenessLoop(control, probe, nodes, dead_after_s, interval_s=0.01, clock=clock), control, probe, clock


def test_a_silent_actor_is_pushed_every_round_and_dead_after_the_deadline() -> None:
    loop, _, probe, clock = _loop({"expert-0": Reply.ANSWERED, "expert-1": Reply.SILENT})
    verdict = asyncio.run(loop.round())
    assert verdict.suspects == {"expert-1"} and not verdict.dead
    assert probe.pushes == [(["expert-1"], [])]
    assert loop.nodes.silent == {"node-expert-1": 10.0} and "node-expert-1" in loop.nodes.suspect
    clock.now += 5.0
    verdict = asyncio.run(loop.round())
    assert verdict.dead == {"expert-1"} and loop.known_dead == {"expert-1"}
    assert len(probe.pushes) == 2
    probe.replies["expert-1"] = Reply.ANSWERED
    asyncio.run(loop.round())
    assert probe.pushes[-1] == ([], ["expert-1"]) and loop.known_dead == frozenset()
    assert loop.nodes.silent == {}


def test_a_quiet_cluster_pushes_nothing() -> None:
    loop, _, probe, _ = _loop({"expert-0": Reply.ANSWERED})
    asyncio.run(loop.round())
    assert probe.pushes == []


def test_a_push_is_logged_when_it_changes_not_every_round(caplog) -> None:
    loop, _, probe, _ = _loop({"expert-0": Reply.SILENT})
    with caplog.at_level(logging.INFO, "expertray.runtime.liveness_loop"):
        asyncio.run(loop.round())
        asyncio.run(loop.round())
        probe.failing_routers = ["router-1"]
        asyncio.run(loop.round())
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["liveness: suspects ['expert-0'], recovered [], dead []; pushed to 2 router(s)",
                     "liveness: suspects ['expert-0'], recovered [], dead []; pushed to 1 router(s), not to "
                     "['router-1']"]


def test_repair_heals_the_dead_and_only_one_runs_at_a_time() -> None:
    async def scenario():
        loop, control, _, _ = _loop({"expert-0": Reply.DIED, "expert-1": Reply.ANSWERED})
        control.gate = asyncio.Event()
        assert loop.start_repair(frozenset({"expert-0"}))
        await asyncio.sleep(0)
        assert not loop.start_repair(frozenset({"expert-0"}))  # one is running
        control.gate.set()
        await loop.repair_task
        assert control.heals == [frozenset({"expert-0"})]
        async with control.lock:  # a placement change holds the lock: no repair now
            assert not loop.start_repair(frozenset({"expert-0"}))

    asyncio.run(scenario())


def test_repair_without_dead_actors_checks_the_routers() -> None:
    loop, control, _, _ = _loop({"expert-0": Reply.ANSWERED})
    asyncio.run(loop.repair(frozenset({"gone-already"})))
    assert control.heals == [] and control.router_checks == 1


def test_failed_repairs_back_off_doubling_up_to_the_maximum_and_reset_on_success() -> None:
    loop, control, _, clock = _loop({"expert-0": Reply.DIED})
    control.fail = True
    waits = []
    for _ in range(6):
        asyncio.run(loop.repair(frozenset({"expert-0"})))
        waits.append(loop.repair_wait_s)
    assert waits == [4.0, 8.0, 16.0, BACKOFF_MAX_S, BACKOFF_MAX_S, BACKOFF_MAX_S]
    assert loop.repair_after == clock.now + BACKOFF_MAX_S

    async def blocked() -> bool:
        return loop.start_repair(frozenset({"expert-0"}))

    assert not asyncio.run(blocked())
    clock.now += BACKOFF_MAX_S
    control.fail = False
    asyncio.run(loop.repair(frozenset({"expert-0"})))
    assert loop.repair_wait_s == ROUTER_CHECK_S


def test_the_loop_survives_a_failing_round_and_repairs_what_it_finds_dead() -> None:
    async def scenario():
        loop, control, probe, _ = _loop({"expert-0": Reply.DIED, "expert-1": Reply.ANSWERED})
        original = probe.ping
        calls = {"n": 0}

        async def flaky(actor: str) -> Reply:
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("GCS hiccup")
            return await original(actor)

        probe.ping = flaky
        task = asyncio.get_running_loop().create_task(loop.run())
        for _ in range(200):
            await asyncio.sleep(0.01)
            if control.heals:
                break
        task.cancel()
        loop.stop()
        assert control.heals and control.heals[0] == {"expert-0"}

    asyncio.run(scenario())


def test_a_bad_deadline_is_refused() -> None:
    from expertray.errors import ConfigError

    with pytest.raises(ConfigError, match="dead_after_s"):
        _loop({"expert-0": Reply.ANSWERED}, dead_after_s=0.0)


def test_a_silent_sole_copy_gets_one_stand_in_and_a_silent_replica_none() -> None:
    async def scenario() -> None:
        loop, control, _, clock = _loop({"expert-0": Reply.SILENT, "expert-1": Reply.ANSWERED})
        verdict = await loop.round()
        assert not loop.start_stand_in(frozenset(verdict.suspects))  # silent for one round only: a busy host?
        clock.now += STAND_IN_AFTER_S
        verdict = await loop.round()
        assert loop.start_stand_in(frozenset(verdict.suspects))  # expert-0 holds experts 0, 1 alone
        await loop.repair_task
        assert control.stand_ins == [frozenset({"expert-0"})] and not control.table.stranded(frozenset({"expert-0"}))
        assert not loop.start_stand_in(frozenset({"expert-0"}))  # done: nothing stranded, not repeated
        async with control.lock:  # a change in progress: no stand-in now
            control.table = PlacementTable.balanced(1, 4, ["expert-0", "expert-1"])
            assert not loop.start_stand_in(frozenset({"expert-1"}))

    asyncio.run(scenario())
