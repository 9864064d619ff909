"""The controller's change and heal logic, driven without Ray by fake expert actors and routers."""

from __future__ import annotations

import asyncio

import pytest

from expertray.errors import ExpertRayError, NoChangeError
from expertray.runtime.changes import PlacementControl
from expertray.state.placement_table import PlacementTable


class FakeActors:
    """Expert actors in memory: which keys each holds; `dead` ones fail every call and ping False."""

    def __init__(self, ids: list[str]) -> None:
        self.held: dict[str, set[tuple[int, int]]] = {a: set() for a in ids}
        self.next = len(ids)
        self.dead: set[str] = set()
        self.killed: list[str] = []
        self.fail_loads_into: set[str] = set()
        self.loads: list[tuple[str, list, str | None]] = []

    def has(self, actor: str) -> bool:
        return actor in self.held

    def create(self) -> str:
        actor = f"expert-{self.next}"
        self.next += 1
        self.held[actor] = set()
        return actor

    async def ping(self, actor: str) -> bool:
        return actor in self.held and actor not in self.dead

    async def load(self, actor: str, keys, source) -> None:
        if actor in self.dead or actor in self.fail_loads_into:
            raise RuntimeError(f"{actor} cannot load")
        if source is not None:
            assert source not in self.dead and set(keys) <= self.held[source], (source, keys)
        self.loads.append((actor, list(keys), source))
        self.held[actor] |= set(keys)

    async def unload(self, actor: str, keys) -> None:
        if actor in self.dead:
            raise RuntimeError(f"{actor} is dead")
        self.held[actor] -= set(keys)

    def kill(self, actor: str) -> None:
        self.killed.append(actor)
        self.held.pop(actor, None)
        self.dead.discard(actor)


class FakeRouters:
    def __init__(self, n: int, table: PlacementTable) -> None:
        self.tables = {f"router-{i}": table for i in range(n)}
        self.next = n
        self.dead: set[str] = set()
        self.refuse: set[str] = set()
        self.reopened: list[str] = []

    def ids(self) -> list[str]:
        return list(self.tables)

    async def ping(self, router: str) -> bool:
        return router not in self.dead

    async def set_table(self, router: str, table: PlacementTable, reopen: bool) -> int:
        if router in self.dead:
            raise ConnectionError(f"{router} died")
        if router in self.refuse and table.version > self.tables[router].version:
            raise RuntimeError("transport failed to form")
        if reopen:
            self.reopened.append(router)
        self.tables[router] = table
        return table.version

    async def replace(self, router: str, table: PlacementTable) -> str:
        new = f"router-{self.next}"
        self.next += 1
        self.tables = {(new if r == router else r): (table if r == router else t) for r, t in self.tables.items()}
        self.dead.discard(router)
        return new


def _setup(num_routers: int = 2):
    table = PlacementTable.balanced(2, 4, ["expert-0", "expert-1", "expert-2"])
    actors = FakeActors(list(table.actors))
    for s in table.slots:
        actors.held[s.actor].add((s.layer, s.expert))
    routers = FakeRouters(num_routers, table)
    events: list[dict] = []
    return PlacementControl(table, actors, routers, events.append), actors, routers, events


def _holdings_match(control: PlacementControl, actors: FakeActors) -> None:
    for a in control.table.actors:
        assert actors.held[a] == {(s.layer, s.expert) for s in control.table.slots_of(a)}, a


def test_replicate_loads_from_a_live_holder_switches_then_unloads() -> None:
    control, actors, routers, events = _setup()
    new = control.table.replicate(0, 1, "expert-2").remove(0, 1, "expert-0")
    event = asyncio.run(control.apply(new, "migrate 0:1"))
    assert event["version"] == 1 and all(t.version == 1 for t in routers.tables.values())
    assert actors.loads == [("expert-2", [(0, 1)], "expert-0")]
    _holdings_match(control, actors)
    assert events == [event]


def test_a_change_that_changes_nothing_raises_and_keeps_the_version() -> None:
    control, _, routers, events = _setup()
    with pytest.raises(NoChangeError, match="would stay as it is"):
        asyncio.run(control.apply(control.table.bump(5), "rebalance"))
    assert control.table.version == 0 and events == []


def test_failed_load_leaves_no_router_switched_and_kills_created_actors() -> None:
    control, actors, routers, _ = _setup()
    fresh = actors.create()
    actors.fail_loads_into.add(fresh)
    new = control.table.with_actor(fresh).replicate(0, 0, fresh)
    with pytest.raises(RuntimeError, match="cannot load"):
        asyncio.run(control.apply(new, "add", created=(fresh,)))
    assert control.table.version == 0 and all(t.version == 0 for t in routers.tables.values())
    assert fresh in actors.killed


def test_router_refusing_a_table_rolls_every_router_back() -> None:
    """A failed change left router and controller on different table versions."""
    control, actors, routers, _ = _setup()
    routers.refuse.add("router-1")
    new = control.table.replicate(1, 2, "expert-0")
    with pytest.raises(ExpertRayError, match="rolled back"):
        asyncio.run(control.apply(new, "replicate 1:2"))
    assert control.table.version == 0
    assert {r: t.version for r, t in routers.tables.items()} == {"router-0": 0, "router-1": 0}
    _holdings_match(control, actors)  # the slot loaded for the change was unloaded again


def test_dead_router_during_a_change_is_replaced_with_the_new_table() -> None:
    control, _, routers, _ = _setup()
    routers.dead.add("router-0")
    asyncio.run(control.apply(control.table.replicate(1, 2, "expert-0"), "replicate 1:2"))
    assert {r: t.version for r, t in routers.tables.items()} == {"router-2": 1, "router-1": 1}


def test_heal_replaces_dead_and_hung_actors_from_replicas_or_the_store() -> None:
    control, actors, routers, _ = _setup()

    async def go():
        async with control.lock:
            await control.apply(control.table.replicate(0, 0, "expert-2"), "replicate 0:0")
        actors.dead.add("expert-0")  # holds 0:0 (replica on expert-2 survives) and 0:1, 1:0, 1:1
        async with control.lock:
            return await control.heal("router-0")

    result = asyncio.run(go())
    assert result["replaced"] == {"expert-0": "expert-3"} and result["version"] == 2
    assert "expert-0" in actors.killed and "expert-0" not in control.table.actors
    sources = {tuple(k): src for a, keys, src in actors.loads if a == "expert-3" for k in keys}
    assert sources[(0, 0)] == "expert-2" and sources[(0, 1)] is None  # live replica, else the weight store
    assert set(routers.reopened) == {"router-0", "router-1"}
    _holdings_match(control, actors)


def test_heal_that_fails_leaks_no_actor_and_keeps_the_table() -> None:
    """Each failing liveness round leaked a new expert actor (8 in 30 s)."""
    control, actors, routers, _ = _setup()
    actors.dead.add("expert-1")
    routers.refuse.add("router-0")
    for _ in range(3):
        with pytest.raises(ExpertRayError):
            asyncio.run(control.heal("liveness"))
    leaked = [a for a in actors.held if a not in control.table.actors]
    assert leaked == [] and control.table.version == 0


def test_heal_without_dead_actors_reopens_only_the_reporter() -> None:
    control, _, routers, _ = _setup()
    result = asyncio.run(control.heal("router-1"))
    assert result == {"replaced": {}, "routers_replaced": {}, "version": 0} and routers.reopened == ["router-1"]


def test_heal_does_not_ping_again_the_actors_the_caller_found_dead() -> None:
    """The liveness loop hands over the actors it found dead: the heal is not held up by pings to a lost node
    (here a ping that never returns; the guard turns a regression into a failure, not a hang)."""
    control, actors, _, _ = _setup()
    pinged: list[str] = []

    async def ping(actor: str) -> bool:
        pinged.append(actor)
        if actor == "expert-1":
            await asyncio.Event().wait()
        return True

    actors.ping = ping
    actors.dead.add("expert-1")
    result = asyncio.run(asyncio.wait_for(control.heal("liveness check", known_dead=frozenset({"expert-1", "gone"})),
                                          30))
    assert result["replaced"] == {"expert-1": "expert-3"} and sorted(pinged) == ["expert-0", "expert-2"]
    _holdings_match(control, actors)


def test_dead_router_is_replaced_and_recorded() -> None:
    control, _, routers, events = _setup()
    routers.dead.add("router-1")
    assert asyncio.run(control.heal_routers()) == {"router-1": "router-2"}
    assert routers.ids() == ["router-0", "router-2"] and routers.tables["router-2"] == control.table
    assert "replaced routers" in events[-1]["reason"]


def test_a_router_whose_switch_lands_after_the_deadline_is_switched_back_too() -> None:
    """A switch that passed the controller's deadline may still land on the router (it runs switches in
    arrival order): the rollback is sent to that router as well, so it ends on the old table."""
    control, actors, routers, _ = _setup()
    take = routers.set_table

    async def late(router: str, table: PlacementTable, reopen: bool) -> int:
        await take(router, table, reopen)  # lands on the router...
        if router == "router-1" and table.version > 0:
            raise TimeoutError("router-1 switching to v1: no answer within 30 s")  # ...after the deadline
        return table.version

    routers.set_table = late
    with pytest.raises(ExpertRayError, match="rolled back"):
        asyncio.run(control.apply(control.table.replicate(1, 2, "expert-0"), "replicate 1:2"))
    assert control.table.version == 0
    assert {r: t.version for r, t in routers.tables.items()} == {"router-0": 0, "router-1": 0}
    _holdings_match(control, actors)


def test_every_applied_table_keeps_the_shadows() -> None:
    """min_replicas=2: a drain (which drops a copy that has another replica) and a heal both end with every
    expert on two actors, the missing copies loaded from the surviving ones."""
    table = PlacementTable.balanced(2, 4, ["expert-0", "expert-1", "expert-2"]).with_min_replicas(2)
    actors = FakeActors(list(table.actors))
    for s in table.slots:
        actors.held[s.actor].add((s.layer, s.expert))
    routers = FakeRouters(2, table)
    control = PlacementControl(table, actors, routers, min_replicas=2)

    def two_each() -> None:
        assert all(c == 2 for layer in range(2) for c in control.table.replica_counts(layer))
        _holdings_match(control, actors)

    async def go() -> None:
        async with control.lock:
            await control.apply(control.table.drain("expert-2"), "drain expert-2")
        assert control.table.actors == ("expert-0", "expert-1")
        two_each()
        assert all(src in ("expert-0", "expert-1") for _, _, src in actors.loads)  # copied, not re-read
        fresh = actors.create()
        async with control.lock:
            await control.apply(control.table.with_actor(fresh), "add", created=(fresh,))
        actors.dead.add("expert-0")
        async with control.lock:
            await control.heal("router-0")
        two_each()

    asyncio.run(go())


def test_a_stand_in_copies_a_silent_actors_sole_experts_to_live_actors_from_the_store() -> None:
    control, actors, routers, events = _setup()
    silent = frozenset({"expert-0"})  # holds 0:0, 0:1, 1:0, 1:1, each its only copy

    async def go() -> dict | None:
        async with control.lock:
            return await control.stand_in(silent)

    event = asyncio.run(go())
    assert event is not None and "stand-in" in event["reason"]
    assert control.table.actors == ("expert-0", "expert-1", "expert-2")  # no actor started, none removed
    assert control.table.stranded(silent) == []  # every expert now has a copy off the silent actor
    assert actors.loads and all(src is None for _, _, src in actors.loads)  # the store, never the silent actor
    counts = {a: len(control.table.slots_of(a)) for a in ("expert-1", "expert-2")}
    assert counts == {"expert-1": 4, "expert-2": 4}  # spread over the live actors
    assert "expert-0" not in actors.killed and all(t.version == 1 for t in routers.tables.values())
    _holdings_match(control, actors)
    assert asyncio.run(go()) is None  # nothing stranded any more


def test_a_stand_in_avoids_the_silent_actors_node() -> None:
    """A silent actor may be the first sign of a lost node: its node-mates get no copy when another node can."""
    control, actors, _, _ = _setup()
    control.node_of = lambda: {"expert-0": "n1", "expert-1": "n1", "expert-2": "n2"}

    async def go() -> None:
        async with control.lock:
            await control.stand_in(frozenset({"expert-0"}))

    asyncio.run(go())
    assert control.table.stranded(frozenset({"expert-0"})) == []
    assert len(control.table.slots_of("expert-1")) == 2 and len(control.table.slots_of("expert-2")) == 6


def test_a_routers_heal_request_gives_silent_sole_copies_a_stand_in_without_pinging_them() -> None:
    control, actors, _, _ = _setup()
    actors.dead.add("expert-0")  # would fail a ping (hung); the liveness loop has it as a suspect

    async def go() -> dict:
        async with control.lock:
            return await control.heal("router-0", silent=frozenset({"expert-0"}))

    result = asyncio.run(go())
    assert "stand-in" in result["stand_in"] and result["replaced"] == {} and result["version"] == 1
    assert "expert-0" in control.table.actors and "expert-0" not in actors.killed  # declared dead later, not here
    assert control.table.stranded(frozenset({"expert-0"})) == []


def test_a_heal_request_while_only_silent_actors_hold_replicated_experts_changes_nothing() -> None:
    """Re-forming the reporter's transport would clear its mask of the silent actor and send it rows again."""
    control, actors, routers, _ = _setup()
    table = control.table.replicate(0, 0, "expert-1").replicate(0, 1, "expert-2").replicate(1, 0, "expert-1") \
        .replicate(1, 1, "expert-2")

    async def go() -> dict:
        async with control.lock:
            await control.apply(table, "replicate expert-0's experts")
            routers.reopened.clear()
            actors.dead.add("expert-0")  # hung now
            return await control.heal("router-0", silent=frozenset({"expert-0"}))

    result = asyncio.run(go())
    assert result["stand_in"] is None and result["version"] == 1 and routers.reopened == []
