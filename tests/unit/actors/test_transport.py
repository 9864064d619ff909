"""The transport seam: a registry of Transport classes chosen by name (a fake one is added here), the
object store's per-call deadline naming a hung actor, and `auto` falling back with its reason. Fake
in-process actor handles; the module imports Ray (actors/), hence the `ray` marker, but starts no cluster."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

import numpy as np
import pytest
import torch

from expertray.actors.transport import (
    TRANSPORTS,
    ActorTransport,
    CollectiveTransport,
    ObjectStoreTransport,
    TransportStats,
    open_transport,
)
from expertray.config import TRANSPORTS as CONFIG_TRANSPORTS
from expertray.errors import ConfigError, TransportError
from expertray.layer.route import ActorBucket, PreparedBatch
from expertray.wire.collective import Memberships, from_host_array, join, member_exchange, to_host_array


class _Method:
    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def remote(self, *args: Any) -> Any:
        return self.fn(*args)


class FakeActor:
    """Answers like an ExpertActor (outputs = 2 × rows) through awaitables; `hang` never answers."""

    def __init__(self, hang: bool = False, fail_identity: bool = False, error: Exception | None = None) -> None:
        self.hang, self.fail_identity, self.error = hang, fail_identity, error
        self.compute = _Method(self._compute)
        self.device_identity = _Method(self._identity)

    def _compute(self, layer: int, experts: list[int], counts: list[int], rows: np.ndarray, dtype: str) -> Any:
        fut = asyncio.get_running_loop().create_future()
        if self.error is not None:
            fut.set_exception(self.error)
        elif not self.hang:
            fut.set_result((to_host_array(from_host_array(rows, dtype) * 2)[0], 1.5))
        return fut

    def _identity(self) -> Any:
        fut = asyncio.get_running_loop().create_future()
        fut.set_exception(RuntimeError("no device")) if self.fail_identity else fut.set_result(None)
        return fut


def _batch(splits: list[int], d: int = 4, dtype: torch.dtype = torch.float32) -> PreparedBatch:
    rows = torch.arange(sum(splits) * d, dtype=dtype).view(-1, d)
    buckets, start = [], 0
    for actor, n in enumerate(splits):
        buckets.append(ActorBucket(actor, start, n, [actor] if n else [], [n] if n else []))
        start += n
    return PreparedBatch(0, None, None, None, None, rows, buckets, None)  # type: ignore[arg-type]


def test_transports_are_chosen_by_name_and_unknown_names_are_listed() -> None:
    assert set(TRANSPORTS.names()) | {"auto"} == set(CONFIG_TRANSPORTS)  # the config's choices, one list
    with pytest.raises(ConfigError, match="unknown.*object_store"):
        TRANSPORTS.create("carrier_pigeon", handles=[], timeout_s=1.0)


def test_a_fake_transport_plugs_in_through_the_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(TRANSPORTS, "_entries", dict(TRANSPORTS._entries))  # registered for this test only

    @TRANSPORTS.register("loopback")
    class LoopbackTransport(ActorTransport):
        """Computes 'experts' in process: the output rows are the input rows negated."""

        name = "loopback"
        opened = False

        async def open(self) -> None:
            self.opened = True

        async def exchange(self, batch: PreparedBatch) -> tuple[torch.Tensor, TransportStats]:
            return -batch.rows, TransportStats([0] * len(batch.buckets), {})

    transport = asyncio.run(open_transport("loopback", [FakeActor()], 1.0, ["a0"], torch.device("cpu")))
    assert isinstance(transport, LoopbackTransport) and transport.opened
    batch = _batch([3])
    out, _ = asyncio.run(transport.exchange(batch))
    torch.testing.assert_close(out, -batch.rows)
    assert transport.describe()["name"] == "loopback"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_object_store_returns_rows_in_plan_order_in_their_dtype(dtype: torch.dtype) -> None:
    t = ObjectStoreTransport([FakeActor(), FakeActor(), FakeActor()], 5.0, ["a0", "a1", "a2"])
    batch = _batch([2, 0, 3], dtype=dtype)
    out, stats = asyncio.run(t.exchange(batch))
    assert out.dtype == dtype
    torch.testing.assert_close(out, batch.rows * 2, atol=0, rtol=0)
    assert stats.compute_ms == {0: 1.5, 2: 1.5}
    assert stats.bytes_out == [2 * 4 * batch.rows.element_size(), 0, 3 * 4 * batch.rows.element_size()]


def test_a_hung_actor_fails_the_batch_at_the_deadline_naming_it() -> None:
    t = ObjectStoreTransport([FakeActor(), FakeActor(hang=True), FakeActor(hang=True)], 0.2, ["a0", "a1", "a2"])
    with pytest.raises(TransportError, match=r"actor\(s\) a1, a2 did not answer within 0.2 s") as info:
        asyncio.run(t.exchange(_batch([1, 2, 1])))
    assert info.value.actors == ("a1", "a2")  # the router masks exactly these


def test_an_actor_error_fails_the_batch_at_once_without_waiting_for_a_hung_one() -> None:
    t = ObjectStoreTransport([FakeActor(hang=True), FakeActor(error=ValueError("actor a1 broke"))], 60.0,
                             ["a0", "a1"])

    async def exchange_with_a_test_deadline() -> None:
        await asyncio.wait_for(t.exchange(_batch([1, 1])), 10.0)  # far below the transport's 60 s

    with pytest.raises(ValueError, match="actor a1 broke"):
        asyncio.run(exchange_with_a_test_deadline())


def test_auto_falls_back_to_the_object_store_and_says_why() -> None:
    t = asyncio.run(open_transport("auto", [FakeActor(fail_identity=True)], 1.0, ["a0"], torch.device("cpu")))
    assert t.name == "object_store"
    assert "channel transport failed to open" in t.describe()["reason"]


class ChannelActor:
    """An ExpertActor stand-in with a real channel server in this process (outputs = 2 × rows)."""

    def __init__(self, name: str, hang: bool = False) -> None:
        import threading

        from expertray.wire.channel import ChannelServer

        self.release = threading.Event()

        def compute(layer: int, experts: list[int], counts: list[int], rows: torch.Tensor) -> Any:
            if hang:
                self.release.wait(30)
            return rows * 2, 1.5

        self.server = ChannelServer(name, "127.0.0.1", compute)
        self.channel_endpoint = _Method(lambda: _resolved(dataclasses.asdict(self.server.endpoint)))


def _resolved(value: Any) -> Any:
    fut = asyncio.get_running_loop().create_future()
    fut.set_result(value)
    return fut


def test_the_channel_transport_moves_rows_with_no_call_and_names_a_dead_or_hung_actor() -> None:
    actors = [ChannelActor("a0"), ChannelActor("a1"), ChannelActor("a2", hang=True)]

    async def scenario() -> None:
        t = await open_transport("auto", actors, 0.5, ["a0", "a1", "a2"], torch.device("cpu"))
        assert t.name == "channel" and t.fallback("lost a member") is None  # no fallback once open
        batch = _batch([3, 0, 0])
        out, stats = await t.exchange(batch)
        assert torch.equal(out, batch.rows * 2) and stats.compute_ms == {0: 1.5}
        out, _ = await t.exchange(_batch([2, 5, 0], dtype=torch.bfloat16))
        assert out.dtype == torch.bfloat16 and torch.equal(out, _batch([2, 5, 0], dtype=torch.bfloat16).rows * 2)
        actors[1].server.close()
        with pytest.raises(TransportError) as dead:
            await t.exchange(_batch([1, 1, 0]))
        assert dead.value.actors == ("a1",)
        with pytest.raises(TransportError) as hung:
            await t.exchange(_batch([1, 0, 1]))
        assert hung.value.actors == ("a2",)
        dropped = asyncio.ensure_future(t.exchange(_batch([0, 0, 2])))  # a batch dropped mid-exchange
        await asyncio.sleep(0.1)
        dropped.cancel()
        with pytest.raises(asyncio.CancelledError):
            await dropped
        out, _ = await t.exchange(_batch([4, 0, 0]))  # the set serves on
        assert torch.equal(out, _batch([4, 0, 0]).rows * 2)
        await t.close()

    try:
        asyncio.run(scenario())
    finally:
        for a in actors:
            a.release.set()
            a.server.close()


def test_an_actor_silent_at_open_is_served_once_it_answers_again() -> None:
    """A channel transport opened while an actor was stopped (its endpoint call unanswered) learns the
    endpoint later: its placeholder channel must not fail for as long as the transport lives."""
    from expertray.actors import transport as transport_module

    actors = [ChannelActor("s0"), ChannelActor("s1")]
    answer = actors[1].channel_endpoint
    never = asyncio.Event()

    async def silent() -> Any:
        await never.wait()

    actors[1].channel_endpoint = _Method(lambda: asyncio.ensure_future(silent()))
    transport_module.ENDPOINTS.pop("s1", None)  # fakes have no Ray actor id: keyed by name

    async def scenario() -> None:
        t = await open_transport("channel", actors, 0.3, ["s0", "s1"], torch.device("cpu"))
        with pytest.raises(TransportError) as unknown:
            await t.exchange(_batch([1, 1]))
        assert unknown.value.actors == ("s1",)
        actors[1].channel_endpoint = answer  # the actor answers again (SIGCONT)
        t.next_learn = 0.0
        for _ in range(50):
            try:
                out, _ = await t.exchange(_batch([1, 2]))
                break
            except TransportError:
                await asyncio.sleep(0.05)
        else:
            raise AssertionError("the endpoint was never learned")
        assert torch.equal(out, _batch([1, 2]).rows * 2)
        await t.close()

    try:
        asyncio.run(scenario())
    finally:
        for a in actors:
            a.server.close()


def test_a_transport_needs_a_positive_deadline() -> None:
    with pytest.raises(ValueError, match="timeout must be > 0"):
        ObjectStoreTransport([FakeActor()], 0.0)


# --- the collective transport with in-process members (threads joining a real gloo group) -------------

class ThreadMember:
    """An ExpertActor stand-in whose calls run in threads: joins the group, doubles its rows."""

    def __init__(self, hang: bool = False, join_delay_s: float = 0.0) -> None:
        self.hang, self.join_delay_s = hang, join_delay_s
        self.memberships = Memberships()
        self.device_identity = _Method(lambda: _done(None))
        self.join_group = _Method(self._join)
        self.collective_compute = _Method(self._compute)
        self.leave_group = _Method(lambda name: _done(self.memberships.leave(name)))
        self.ping = _Method(lambda: asyncio.get_running_loop().create_future() if hang else _done("pong"))

    @property
    def groups(self) -> set[str]:
        return set(self.memberships.names())

    def _join(self, name: str, backend: str, host: str, port: int, secret: str, rank: int, world: int,
              timeout_s: float) -> Any:
        def run() -> None:
            time.sleep(self.join_delay_s)
            self.memberships.add(name, join(backend, host, port, secret, rank, world, timeout_s,
                                            torch.device("cpu")))
        return asyncio.get_running_loop().run_in_executor(None, run)

    def _compute(self, name: str, layer: int, experts: list[int], counts: list[int], d: int, wire: str) -> Any:
        if self.hang:
            return asyncio.get_running_loop().create_future()
        group = self.memberships.get(name)
        return asyncio.get_running_loop().run_in_executor(
            None, lambda: member_exchange(group, sum(counts), d, getattr(torch, wire), lambda r: r * 2) or 0.5)


def _done(value: Any) -> Any:
    fut = asyncio.get_running_loop().create_future()
    fut.set_result(value)
    return fut


def test_collective_transport_exchanges_and_reports_its_backend_and_why() -> None:
    async def scenario() -> tuple[Any, torch.Tensor, dict[str, Any]]:
        t = CollectiveTransport([ThreadMember(), ThreadMember()], 20.0, ["a0", "a1"], torch.device("cpu"),
                                host="127.0.0.1")
        await t.open()
        batch = _batch([3, 2])
        out, _ = await t.exchange(batch)
        await t.close()
        return batch, out, t.describe()

    batch, out, described = asyncio.run(scenario())
    torch.testing.assert_close(out, batch.rows * 2, atol=0, rtol=0)
    assert described == {"name": "collective", "backend": "gloo", "reason": "3 of 3 ranks have no GPU (ranks [0, 1, 2])"}


def test_collective_transport_names_a_member_that_never_answers() -> None:
    async def scenario() -> None:
        t = CollectiveTransport([ThreadMember(), ThreadMember(hang=True)], 2.0, ["a0", "a1"], torch.device("cpu"),
                                host="127.0.0.1")
        await t.open()
        await t.exchange(_batch([1, 1]))

    with pytest.raises(TransportError, match=r"unresponsive: a1; still in the collective: a0\)") as info:
        asyncio.run(scenario())
    assert info.value.actors == ("a1",)


def test_a_new_group_forms_over_the_same_members_while_the_old_one_serves() -> None:
    """A table switch (expertray/runtime/switch.py): the new group, of its own name, forms while batches still
    run through the old group whose members are joining it; after the old one closes, only the new one stays."""
    async def scenario() -> tuple[list[torch.Tensor], torch.Tensor, list[set[str]], str, str]:
        a, b, c = ThreadMember(), ThreadMember(), ThreadMember()
        old = CollectiveTransport([a, b], 20.0, ["a", "b"], torch.device("cpu"), host="127.0.0.1")
        await old.open()
        new = CollectiveTransport([a, b, c], 20.0, ["a", "b", "c"], torch.device("cpu"), host="127.0.0.1")
        forming = asyncio.ensure_future(new.open())
        outs = []
        while not forming.done() or not outs:  # batches on the old group while the members join the new one
            outs.append((await old.exchange(_batch([3, 2])))[0])
        await forming
        await old.close()
        out_new, _ = await new.exchange(_batch([1, 2, 3]))
        names = [m.groups for m in (a, b, c)]
        await new.close()
        return outs, out_new, names, old.group_name, new.group_name

    outs, out_new, names, old_name, new_name = asyncio.run(scenario())
    assert old_name != new_name
    assert all(torch.equal(out, _batch([3, 2]).rows * 2) for out in outs)
    torch.testing.assert_close(out_new, _batch([1, 2, 3]).rows * 2, atol=0, rtol=0)
    assert names == [{new_name}] * 3


def test_members_drop_a_group_the_router_gave_up_on_even_when_their_join_ends_later() -> None:
    """A switch past its deadline cancels the forming: the members are told to leave, and a join that
    completes only afterwards (rank 0's join runs on in its thread) is dropped, not kept for good."""
    async def scenario() -> tuple[list[set[str]], list[set[str]], str]:
        members = [ThreadMember(join_delay_s=0.5), ThreadMember(join_delay_s=0.5)]
        t = CollectiveTransport(members, 20.0, ["a0", "a1"], torch.device("cpu"), host="127.0.0.1")
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(t.open(), 0.2)  # gives up while the members still wait to join
        right_after = [m.groups for m in members]
        await asyncio.sleep(2.0)  # the joins complete now (rank 0's thread was not stopped)
        return right_after, [m.groups for m in members], t.group_name

    right_after, later, name = asyncio.run(scenario())
    assert right_after == [set(), set()] and later == [set(), set()], name


def test_memberships_get_names_a_group_never_joined_or_left() -> None:
    m = Memberships(remember=2)
    with pytest.raises(TransportError, match="not a member of group g-x"):
        m.get("g-x")
    for name in ("g-1", "g-2", "g-3"):
        m.leave(name)
    assert not m.add("g-3", object()) and not m.add("g-2", object())
    assert m.add("g-1", object()) and m.names() == ["g-1"]  # only the last `remember` left names are kept
