"""The controller's liveness decisions (expertray/runtime/liveness.py) and the router side of a suspect push
(Failover.suspect, waits_on in expertray/layer/route.py), without Ray: which actors become suspect, when
the routers are told, when an actor is dead, and which batch in flight is dropped."""

from __future__ import annotations

import asyncio

import pytest
import torch

from expertray.config import ClusterConfig, GateConfig, MoELayerConfig
from expertray.errors import ConfigError
from expertray.layer.reference import MoELayer
from expertray.layer.route import InProcessTransport, LayerParams, run_layer, waits_on
from expertray.policies.replica import REPLICA
from expertray.policies.routing import ROUTING
from expertray.runtime.failover import Failover
from expertray.runtime.liveness import Liveness, Reply
from expertray.state.placement_table import PlacementTable, Slot

A, S, D_ = Reply.ANSWERED, Reply.SILENT, Reply.DIED


def test_a_silent_actor_is_suspect_at_once_and_pushed_every_round_while_silent() -> None:
    live = Liveness(dead_after_s=2.0)
    v = live.observe({"a": A, "b": A}, 0.0, 0.01)
    assert (v.suspects, v.push, v.dead) == (frozenset(), False, frozenset())
    v = live.observe({"a": A, "b": S}, 0.5, 1.0)
    assert v.suspects == {"b"} and v.push and not v.dead and not v.recovered
    v = live.observe({"a": A, "b": S}, 1.5, 2.0)  # pushed again: a router replaced meanwhile learns it too
    assert v.suspects == {"b"} and v.push and not v.dead


def test_an_actor_silent_for_dead_after_s_is_dead_counted_from_its_first_unanswered_ping() -> None:
    live = Liveness(dead_after_s=2.0)
    live.observe({"a": S}, 10.0, 10.5)
    assert not live.observe({"a": S}, 11.0, 11.5).dead
    assert live.observe({"a": S}, 11.6, 12.0).dead == {"a"}  # silent since 10.0: 2.0 s at 12.0


def test_an_answer_resets_the_silence() -> None:
    live = Liveness(dead_after_s=2.0)
    live.observe({"a": S}, 0.0, 0.5)
    live.observe({"a": A}, 1.0, 1.01)
    live.observe({"a": S}, 1.5, 2.0)
    assert not live.observe({"a": S}, 2.5, 3.0).dead  # silent since 1.5, not 0.0
    assert live.observe({"a": S}, 3.0, 3.5).dead == {"a"}


def test_an_actor_ray_reports_dead_is_dead_at_once() -> None:
    v = Liveness(dead_after_s=5.0).observe({"a": A, "b": D_}, 0.0, 0.01)
    assert v.suspects == {"b"} and v.dead == {"b"} and v.push


def test_a_pushed_suspect_that_answers_again_is_pushed_as_recovered_once() -> None:
    live = Liveness(dead_after_s=5.0)
    live.observe({"a": S, "b": A}, 0.0, 0.5)
    v = live.observe({"a": A, "b": A}, 1.0, 1.01)
    assert v.recovered == {"a"} and v.push and not v.suspects
    v = live.observe({"a": A, "b": A}, 2.0, 2.01)
    assert not v.recovered and not v.push  # told once; nothing to push any more


def test_actors_that_left_the_table_are_forgotten() -> None:
    live = Liveness(dead_after_s=1.0)
    live.observe({"a": S, "b": A}, 0.0, 0.5)
    v = live.observe({"c": A, "b": A}, 1.0, 1.01)  # a was replaced by c (healed)
    assert not v.push and not v.recovered and live.pushed == frozenset() and "a" not in live.silent_since


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_liveness_rejects_a_bad_dead_after(bad: float) -> None:
    with pytest.raises(ConfigError, match="dead_after_s"):
        Liveness(bad)


def test_observe_rejects_bad_replies_and_clocks() -> None:
    live = Liveness(1.0)
    with pytest.raises(ConfigError, match="not Reply"):
        live.observe({"a": True}, 0.0, 0.1)  # type: ignore[dict-item]
    with pytest.raises(ConfigError, match="before its pings"):
        live.observe({"a": A}, 1.0, 0.5)


@pytest.mark.parametrize("field,value", [("liveness_interval_s", 0.0), ("liveness_timeout_s", float("nan")),
                                         ("liveness_timeout_s", 6.0)])
def test_cluster_config_validates_the_liveness_fields(field: str, value: float) -> None:
    with pytest.raises(ConfigError, match=f"cluster.{field}"):
        ClusterConfig(**{field: value})


# --- the router side -----------------------------------------------------------------------------------
def _table() -> PlacementTable:
    """Layer 0: expert 0 on a+b, 1 on a only, 2 on b+c, 3 on c."""
    slots = [Slot("a", 0, 0), Slot("b", 0, 0), Slot("a", 0, 1), Slot("b", 0, 2), Slot("c", 0, 2), Slot("c", 0, 3)]
    return PlacementTable(0, 1, 4, ("a", "b", "c"), tuple(slots))


def test_failover_suspect_masks_new_actors_and_unmasks_recovered_ones() -> None:
    table, failover = _table(), Failover()
    assert failover.suspect(table, ["b", "not-in-table"]) == {"b"}
    assert failover.suspect(table, ["b"]) == frozenset()  # already masked: nothing new to drop for
    assert failover.suspects == {"b"}
    assert failover.suspect(table, ["c"], recovered=["b"]) == {"c"}
    assert failover.suspects == {"c"}
    failover.install(table, healed=True)
    assert failover.suspects == frozenset()


def test_waits_on_names_the_busy_actors_or_every_group_member() -> None:
    cfg = MoELayerConfig(d_model=16, d_ff=24, gate=GateConfig("mixtral", 4, 2))
    table = _table()
    layer = MoELayer.random(cfg, seed=0)
    params = LayerParams(layer.gate_weights, None)
    seen = []
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(0))
    result = asyncio.run(run_layer(x, 0, cfg, params, ROUTING.create("topk"), REPLICA.create("round_robin"), table,
                                   InProcessTransport([layer.experts]), suspects=frozenset({"b"}),
                                   on_prepared=seen.append))
    assert seen == [result.batch]
    busy = waits_on(result.batch, table.actors, every_member=False)
    rows = {table.actors[b.actor]: b.num_rows for b in result.batch.buckets}
    assert busy == {a for a, n in rows.items() if n} and "b" not in busy  # b masked: its experts have replicas
    assert waits_on(result.batch, table.actors, every_member=True) == {"a", "b", "c"}
    torch.testing.assert_close(result.output, layer(x), atol=1e-5, rtol=0)
