"""Direct layers (expertray/runtime/direct.py) against in-process channel servers holding real expert slots:
the answer equals the reference layer, and a dead actor, a migrated slot or a sole copy lost are served
again (from a replica at once, or from the healed table) — or end in RequestTimeoutError, never a hang."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch

from expertray.config import ClusterConfig, GateConfig, MoELayerConfig
from expertray.errors import RequestTimeoutError
from expertray.layer.reference import MoELayer
from expertray.layer.route import LayerParams
from expertray.layer.slots import SlotStore
from expertray.policies.replica import REPLICA
from expertray.policies.routing import ROUTING
from expertray.runtime.direct import DirectLayers
from expertray.state.placement_table import PlacementTable
from expertray.wire.channel import ChannelServer

CFG = ClusterConfig(layer=MoELayerConfig(d_model=32, d_ff=48, gate=GateConfig("mixtral", 8, 2)), num_layers=2,
                    num_expert_actors=3, request_timeout_s=5.0, collective_timeout_s=2.0, metrics_port=-1)


class FakeActor:
    """An expert actor's channel side: a SlotStore and a ChannelServer over it."""

    def __init__(self, actor: str, layers: list[MoELayer], keys: list[tuple[int, int]]) -> None:
        self.store = SlotStore(actor, torch.device("cpu"), torch.float32)
        self.store.add({(i, e): (layers[i].experts.gate_up[e], layers[i].experts.down[e]) for i, e in keys})
        self.server = ChannelServer(actor, "127.0.0.1", lambda layer, ex, c, rows: (
            self.store.compute(layer, ex, c, rows), 0.0))


class FakeCluster:
    """The controller's side of the ClusterLink: a table, actors, and a heal that replaces dead actors."""

    def __init__(self, table: PlacementTable, layers: list[MoELayer], heal: bool = True) -> None:
        self.layers, self.heal_on_report = layers, heal
        self.table = table
        self.actors = {a: FakeActor(a, layers, [(s.layer, s.expert) for s in table.slots_of(a)])
                       for a in table.actors}
        self.failed_reports: list[list[str]] = []
        self.suspects: list[str] = []
        self.loads: list[list[list[int]]] = []
        self.lock = threading.Lock()

    def spec(self) -> dict[str, Any]:
        with self.lock:
            return {"table": self.table.to_dict(),
                    "endpoints": {a: dataclasses.asdict(x.server.endpoint) for a, x in self.actors.items()
                                  if not x.server._closed}, "suspects": list(self.suspects)}

    def report_failed(self, actors: list[str]) -> None:
        self.failed_reports.append(actors)
        if self.heal_on_report:
            with self.lock:  # replace each dead actor by a new one holding its slots
                for dead in actors:
                    new = dead + "-healed"
                    self.table = self.table.with_actor(new)
                    for s in list(self.table.slots_of(dead)):
                        self.table = self.table.replicate(s.layer, s.expert, new)
                    self.table = self.table.drain(dead)
                    self.actors[new] = FakeActor(new, self.layers, [(s.layer, s.expert)
                                                                    for s in self.table.slots_of(new)])

    def report_load(self, counts: list[list[int]]) -> None:
        self.loads.append(counts)

    def close(self) -> None:
        for x in self.actors.values():
            x.server.close()


@contextmanager
def _running(table: PlacementTable, heal: bool = True, cfg: ClusterConfig = CFG
             ) -> Iterator[tuple[list[MoELayer], FakeCluster, DirectLayers]]:
    """Reference layers, a FakeCluster serving them on `table`, and direct layers over it (closed after)."""
    layers = [MoELayer.random(cfg.layer, seed=7 + layer) for layer in range(cfg.num_layers)]
    cluster = FakeCluster(table, layers, heal)
    direct = DirectLayers(cfg, [LayerParams(m.gate_weights, m.shared) for m in layers], cluster,
                          ROUTING.create(cfg.routing_policy), REPLICA.create(cfg.replica_policy))
    try:
        yield layers, cluster, direct
    finally:
        direct.close()
        cluster.close()


def _check(direct: DirectLayers, layers: list[MoELayer], seed: int = 0, tokens: int = 17) -> None:
    hidden = torch.randn(tokens, CFG.layer.d_model, generator=torch.Generator().manual_seed(seed))
    for layer, m in enumerate(layers):
        torch.testing.assert_close(direct.forward(layer, hidden), m.forward(hidden), rtol=1e-5, atol=1e-5)


def test_equals_the_reference_layer_and_reports_its_load() -> None:
    with _running(PlacementTable.balanced(2, 8, ["a", "b", "c"])) as (layers, cluster, direct):
        _check(direct, layers)
        one = direct.forward(0, torch.randn(1, 32))  # a decode step: one token
        assert one.shape == (1, 32)
        assert direct.counters["calls"] == 3 and direct.counters["retries"] == 0
    assert sum(sum(map(sum, c)) for c in cluster.loads) == (17 * 2 + 1) * 2  # every routed row, top-2


def test_a_dead_actor_with_replicas_is_routed_around_at_once() -> None:
    table = PlacementTable.balanced(2, 8, ["a", "b", "c"])
    for layer in range(2):
        for s in table.slots_of("b"):
            if s.layer == layer:
                table = table.replicate(layer, s.expert, "c" if s.expert % 2 else "a")
    with _running(table, heal=False) as (layers, cluster, direct):
        _check(direct, layers)
        cluster.actors["b"].server.close()  # b's process died
        _check(direct, layers, seed=1)
        assert cluster.failed_reports == [["b"]] and direct.counters["retries"] >= 1


def test_a_lost_sole_copy_is_served_from_the_healed_table() -> None:
    with _running(PlacementTable.balanced(2, 8, ["a", "b", "c"])) as (layers, cluster, direct):
        _check(direct, layers)
        cluster.actors["a"].server.close()
        _check(direct, layers, seed=2)
        assert ["a"] in cluster.failed_reports and "a-healed" in direct._state.table.actors


def test_a_migrated_slot_is_found_through_a_table_refresh() -> None:
    with _running(PlacementTable.balanced(2, 8, ["a", "b", "c"])) as (layers, cluster, direct):
        _check(direct, layers)
        with cluster.lock:  # the controller migrates every slot of b to c and unloads them from b
            moved = [(s.layer, s.expert) for s in cluster.table.slots_of("b")]
            for layer, e in moved:
                cluster.table = cluster.table.migrate(layer, e, "b", "c")
            cluster.actors["c"].store.add({(i, e): (layers[i].experts.gate_up[e], layers[i].experts.down[e])
                                           for i, e in moved})
            cluster.actors["b"].store.remove(moved)
        _check(direct, layers, seed=3)  # b answers "no slot": the table is refreshed, nothing is lost
        assert cluster.failed_reports == []


def test_a_sole_copy_never_healed_ends_in_a_timeout_not_a_hang() -> None:
    cfg = dataclasses.replace(CFG, request_timeout_s=1.0)
    table = PlacementTable.balanced(2, 8, ["a", "b", "c"])
    with _running(table, heal=False, cfg=cfg) as (layers, cluster, direct):
        cluster.actors["a"].server.close()
        hidden = torch.randn(64, 32)  # 64 tokens x top-2 of 8 experts: a's experts are among them
        with pytest.raises(RequestTimeoutError, match="request_timeout_s=1"):
            direct.forward(0, hidden)


def test_bad_input_is_refused_before_anything_moves() -> None:
    from expertray.errors import InputError, UnknownExpertError

    with _running(PlacementTable.balanced(2, 8, ["a", "b", "c"])) as (layers, cluster, direct):
        with pytest.raises(InputError):
            direct.forward(0, torch.randn(3, 31))
        with pytest.raises(UnknownExpertError, match="unknown layer 5"):
            direct.forward(5, torch.randn(3, 32))
        assert sum(x.server.requests for x in cluster.actors.values()) == 0


def test_a_call_waiting_on_a_suspect_is_served_again_around_it() -> None:
    """The hung actor's channel stays open and silent; the controller's liveness suspects it: the call in
    flight ends at the next refresh and is answered from the replicas, long before its deadline."""
    table = PlacementTable.balanced(2, 8, ["a", "b", "c"])
    for s in table.slots_of("b"):
        table = table.replicate(s.layer, s.expert, "c" if s.expert % 2 else "a")
    cfg = dataclasses.replace(CFG, collective_timeout_s=60.0, request_timeout_s=60.0)
    release = threading.Event()
    with _running(table, heal=False, cfg=cfg) as (layers, cluster, direct):
        cluster.actors["b"].server.handler = lambda *args: (release.wait(60), (_ for _ in ()).throw(
            RuntimeError("late")))
        timer = threading.Timer(0.5, lambda: cluster.suspects.append("b"))
        try:
            timer.start()
            hidden = torch.randn(48, 32, generator=torch.Generator().manual_seed(5))
            t0 = time.monotonic()
            for layer, m in enumerate(layers):
                torch.testing.assert_close(direct.forward(layer, hidden), m.forward(hidden), rtol=1e-5, atol=1e-5)
            assert time.monotonic() - t0 < 30  # ended by the suspect push, not by the 60 s deadline
            assert direct.counters["retries"] >= 1
        finally:
            release.set()
            timer.cancel()
