"""Losing an actor without stalling, without Ray: the masked routing view over hand-built
tables, every replica selector on it, and the batcher + data path retrying on surviving replicas while a heal
is still running (or waiting for it when an expert has no surviving replica)."""

from __future__ import annotations

import asyncio
import pickle

import pytest
import torch

from expertray.config import GateConfig, MoELayerConfig
from expertray.errors import TransportError
from expertray.layer.reference import MoELayer
from expertray.layer.route import InProcessTransport, LayerParams, run_layer
from expertray.policies.replica import REPLICA
from expertray.policies.routing import ROUTING
from expertray.runtime.batcher import Batcher, BatchLimits
from expertray.runtime.failover import Failover, failed_actors
from expertray.state.placement_table import PlacementTable, Slot

D = 16
CFG = MoELayerConfig(d_model=D, d_ff=24, gate=GateConfig("mixtral", 8, 2))


def _table() -> PlacementTable:
    """Layer 0 of 4 experts over a, b, c: 0 on a+b, 1 on a only, 2 on b+c, 3 on c; layer 1: all on c, 0 also on a."""
    slots = [Slot("a", 0, 0), Slot("b", 0, 0), Slot("a", 0, 1), Slot("b", 0, 2), Slot("c", 0, 2), Slot("c", 0, 3),
             Slot("a", 1, 0), *(Slot("c", 1, e) for e in range(4))]
    return PlacementTable(0, 2, 4, ("a", "b", "c"), tuple(slots))


def _dest_actors(table: PlacementTable, layer: int, dests: torch.Tensor) -> set[str]:
    on = table.route(layer).dest_actor
    return {table.actors[int(on[d])] for d in dests.reshape(-1).tolist() if d >= 0}


# --- the masked view -------------------------------------------------------------------------------------
def test_masked_route_withholds_suspect_replicas_where_another_survives() -> None:
    table = _table()
    route, masked = table.route(0), table.masked_route(0, frozenset({"a"}))
    assert torch.equal(masked.dest_actor, route.dest_actor) and torch.equal(masked.dest_expert, route.dest_expert)
    on = route.dest_actor.tolist()
    assert [{table.actors[on[d]] for d in r} for r in masked.replicas] == [{"b"}, {"a"}, {"b", "c"}, {"c"}]
    assert table.stranded(frozenset({"a"})) == [(0, 1)]
    assert table.stranded(frozenset({"b"})) == []
    assert table.stranded(frozenset({"a", "c"})) == [(0, 1), (0, 3), (1, 0), (1, 1), (1, 2), (1, 3)]


def test_masked_route_without_suspects_is_the_route_and_is_cached() -> None:
    table = _table()
    assert table.masked_route(0, frozenset()) is table.route(0)
    assert table.masked_route(0, frozenset({"not-an-actor"})) is table.route(0)
    assert table.stranded(frozenset({"not-an-actor"})) == []
    assert table.masked_route(1, frozenset({"a"})) is table.masked_route(1, frozenset({"a"}))


@pytest.mark.parametrize("name", ["round_robin", "locality", "least_loaded"])
def test_no_selector_picks_a_suspect_slot_when_the_expert_has_another_replica(name: str) -> None:
    table, selector = _table(), REPLICA.create(name)
    experts = torch.tensor([[0, 2], [0, 3], [1, 2], [0, 1], [-1, 0]] * 20)
    for suspect in ("a", "b", "c"):
        masked = table.masked_route(0, frozenset({suspect}))
        dests = selector.select(experts, masked, None, {0, 1, 2})
        stranded = {e for layer, e in table.stranded(frozenset({suspect})) if layer == 0}
        served = torch.isin(experts, torch.tensor(sorted(stranded) or [-2]))
        assert suspect not in _dest_actors(table, 0, dests[~served & (experts >= 0)])
        if stranded:  # every replica suspect: still routed to them, waiting for the heal
            assert _dest_actors(table, 0, dests[served]) == {suspect}
        assert torch.equal(table.route(0).dest_expert[dests[experts >= 0]], experts[experts >= 0])
        assert bool((dests[experts < 0] == -1).all())


def test_failover_marks_named_actors_and_clears_on_a_healed_table() -> None:
    table, f = _table(), Failover()
    assert f.mark(table, []) is False and f.suspects == frozenset()
    assert f.mark(table, ["zzz"]) is False and f.suspects == frozenset()
    assert f.mark(table, ["b"]) is True and f.suspects == {"b"}  # every expert of b has a live replica
    assert f.mark(table, ["a"]) is False and f.suspects == {"a", "b"}  # 0:1 lives on a alone
    f.install(table.drain("b"), healed=False)
    assert f.suspects == {"a"}
    f.install(table, healed=True)
    assert f.suspects == frozenset()


def test_transport_error_carries_the_actors_it_names_across_pickling() -> None:
    exc = pickle.loads(pickle.dumps(TransportError("group broke", ["expert-1"])))
    assert failed_actors(exc) == ("expert-1",) and str(exc) == "group broke"
    assert failed_actors(TransportError("no idea who")) == () and failed_actors(RuntimeError("x")) == ()


# --- the batcher and the data path over a transport that loses one actor ---------------------------------
class _LosesActor:
    """The in-process transport, except that any batch with rows for `dead` fails naming it (as the object
    store / collective transports do); records which actors got rows."""

    def __init__(self, layers: list[MoELayer], table: PlacementTable, dead: str) -> None:
        self.inner = InProcessTransport([m.experts for m in layers])
        self.table, self.dead = table, dead
        self.sent_to: list[set[str]] = []

    async def exchange(self, batch):
        busy = {self.table.actors[b.actor] for b in batch.buckets if b.num_rows}
        self.sent_to.append(busy)
        if self.dead in busy:
            raise TransportError(f"actor {self.dead} died", [self.dead])
        return await self.inner.exchange(batch)


class _Router:
    """What RouterActor does around the batcher, Ray-free: run_layer on the table with the failover mask."""

    def __init__(self, table: PlacementTable, dead: str) -> None:
        self.layers = [MoELayer.random(CFG, seed=s) for s in (1, 2)]
        self.params = [LayerParams(m.gate_weights, m.shared) for m in self.layers]
        self.table, self.failover = table, Failover()
        self.transport = _LosesActor(self.layers, table, dead)
        self.policy, self.selector = ROUTING.create("topk"), REPLICA.create("round_robin")
        self.heal_started = asyncio.Event()
        self.heal_release = asyncio.Event()
        self.healed = False

    async def run_batch(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        r = await run_layer(hidden, layer, CFG, self.params[layer], self.policy.for_layer(layer), self.selector,
                            self.table, self.transport, suspects=self.failover.suspects)
        return r.output

    def reroute(self, exc: BaseException) -> bool:
        return self.failover.mark(self.table, failed_actors(exc))

    async def heal(self, exc: BaseException) -> None:
        """The controller: slow (held until released), then installs a table without the dead actor."""
        self.heal_started.set()
        await self.heal_release.wait()
        self.table = self.table.drain(self.transport.dead)
        self.transport.table = self.table
        self.failover.install(self.table, healed=True)
        self.healed = True

    def batcher(self) -> Batcher:
        limits = BatchLimits(max_batch_tokens=64, max_wait_s=0.002, max_queue_tokens=4096, request_timeout_s=5.0,
                             batch_timeout_s=2.0, heal_timeout_s=4.0, max_attempts=3)
        return Batcher(2, limits, self.run_batch, self.heal, reroute=self.reroute)


def _replicated(actors: tuple[str, ...] = ("a", "b", "c")) -> PlacementTable:
    """Every expert on two actors (its block's actor and the next one)."""
    base = PlacementTable.balanced(2, 8, actors)
    extra = [Slot(actors[(actors.index(s.actor) + 1) % len(actors)], s.layer, s.expert) for s in base.slots]
    return base.with_slots(base.slots + tuple(extra))


def test_a_failed_actor_is_avoided_at_once_and_answers_stay_exact_before_the_heal_ends() -> None:
    router = _Router(_replicated(), dead="b")
    batcher = router.batcher()
    xs = [torch.randn(6 + i, D, generator=torch.Generator().manual_seed(i)) for i in range(10)]

    async def go():
        loop = asyncio.get_running_loop().create_task(batcher.run())
        try:
            outs = await asyncio.gather(*[batcher.submit(i % 2, x) for i, x in enumerate(xs)])
            assert router.heal_started.is_set() and not router.healed  # every answer came before the heal
            router.heal_release.set()
            return outs
        finally:
            loop.cancel()

    outs = asyncio.run(go())
    for i, (x, out) in enumerate(zip(xs, outs)):
        torch.testing.assert_close(out, router.layers[i % 2](x), atol=1e-5, rtol=0)
    c = batcher.counters
    assert c.retries == 1 and c.masked_retries == 1 and c.heals == 1 and c.errors == 0
    assert c.served_while_healing >= 1
    assert "b" in router.transport.sent_to[0] and all("b" not in s for s in router.transport.sent_to[1:])


def test_an_expert_with_no_surviving_replica_waits_for_the_heal_then_answers_exactly() -> None:
    table = _replicated().with_slots([s for s in _replicated().slots if (s.layer, s.expert) != (0, 3)]
                                     + [Slot("b", 0, 3)])  # 0:3 lives on b alone
    router = _Router(table, dead="b")
    router.policy = ROUTING.create("topk")
    batcher = router.batcher()
    # tokens routed to expert 3 of layer 0: a request that must wait for the heal
    x = torch.randn(64, D, generator=torch.Generator().manual_seed(0))
    assert bool((router.layers[0].gate_weights.weight @ x.T).argmax(0).eq(3).any())

    async def go():
        loop = asyncio.get_running_loop().create_task(batcher.run())
        try:
            pending = asyncio.ensure_future(batcher.submit(0, x))
            await asyncio.wait_for(router.heal_started.wait(), 2.0)
            await asyncio.sleep(0.05)
            assert not pending.done() and batcher.healing  # dispatch paused: nothing to serve 0:3 from
            router.heal_release.set()
            return await pending
        finally:
            loop.cancel()

    out = asyncio.run(go())
    torch.testing.assert_close(out, router.layers[0](x), atol=1e-5, rtol=0)
    c = batcher.counters
    assert c.masked_retries == 0 and c.served_while_healing == 0 and c.errors == 0 and router.healed


@pytest.mark.ray  # the fault bench module imports Ray
def test_bench_replicates_every_expert_of_the_victim_onto_one_other_actor() -> None:
    from expertray.tools.bench.faults import replicate_elsewhere

    table = PlacementTable.balanced(2, 8, ["a", "b", "c"]).replicate(0, 3, "c")
    out = replicate_elsewhere(table, "b")
    assert out.stranded(frozenset({"b"})) == [] and table.stranded(frozenset({"b"})) != []
    assert {s.actor for s in set(out.slots) - set(table.slots)} == {"c"}  # c has the fewest slots (5 vs 6)
    assert len(out.slots) - len(table.slots) == 5  # b's 6 experts, one of which already had a replica
    assert set(table.slots) <= set(out.slots)
