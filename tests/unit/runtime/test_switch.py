"""A table switch forms its new transport with the batch lane free, without Ray: a fake
transport whose forming blocks on an event while batches keep running through the old one; the swap lands
between batches, the old transport closes after it; a failed forming changes nothing."""

from __future__ import annotations

import asyncio

import pytest
import torch

from expertray.runtime.batcher import Batcher, BatchLimits
from expertray.runtime.switch import TableSwitch, reform_needed

LIMITS = BatchLimits(max_batch_tokens=64, max_wait_s=0.001, max_queue_tokens=4096, request_timeout_s=5.0,
                     batch_timeout_s=2.0, heal_timeout_s=1.0)


class _Transport:
    """Adds its `offset` to every row, so an answer tells which transport ran the batch."""

    def __init__(self, offset: float) -> None:
        self.offset = offset
        self.closed = 0
        self.batches = 0

    async def close(self) -> None:
        self.closed += 1


class _Router:
    """What RouterActor keeps around the batcher: the transport in use, swapped by a TableSwitch."""

    def __init__(self) -> None:
        self.transport = _Transport(1.0)
        self.batcher = Batcher(1, LIMITS, self.run_batch)
        self.switch = TableSwitch(self.batcher.lane, form_timeout_s=5.0, close_timeout_s=1.0)

    async def run_batch(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        assert self.transport.closed == 0, "a batch ran on a closed transport"
        self.transport.batches += 1
        await asyncio.sleep(0)
        return hidden + self.transport.offset

    def swap(self, formed: _Transport | None) -> _Transport | None:
        if formed is None:
            return None
        old, self.transport = self.transport, formed
        return old


def _serve(coro_fn, router: _Router):
    async def main():
        loop = asyncio.get_running_loop().create_task(router.batcher.run())
        try:
            return await asyncio.wait_for(coro_fn(), 10.0)
        finally:
            loop.cancel()
    return asyncio.run(main())


def test_batches_run_on_the_old_transport_while_the_new_one_forms() -> None:
    router = _Router()
    old, new = router.transport, _Transport(2.0)
    forming, release = asyncio.Event(), asyncio.Event()
    x = torch.zeros(3, 4)

    async def form() -> _Transport:
        forming.set()
        await release.wait()  # a slow rendezvous
        return new

    async def go():
        switch = asyncio.ensure_future(router.switch.run(form, router.swap))
        await forming.wait()
        during = [await router.batcher.submit(0, x) for _ in range(3)]  # the lane is free: these are answered
        assert not switch.done() and not router.batcher.lane.locked()
        release.set()
        await switch
        after = await router.batcher.submit(0, x)
        return during, after

    during, after = _serve(go, router)
    assert all(torch.equal(out, x + 1.0) for out in during)
    assert torch.equal(after, x + 2.0)
    assert old.batches >= 3 and new.batches == 1
    assert old.closed == 1 and new.closed == 0 and router.transport is new


def test_a_failed_forming_keeps_the_old_transport_and_raises() -> None:
    router = _Router()
    old = router.transport
    swapped: list[object] = []

    async def form() -> _Transport:
        raise RuntimeError("rendezvous failed")

    async def go():
        with pytest.raises(RuntimeError, match="rendezvous failed"):
            await router.switch.run(form, lambda t: swapped.append(t))
        return await router.batcher.submit(0, torch.zeros(2, 4))

    out = _serve(go, router)
    assert torch.equal(out, torch.ones(2, 4))
    assert swapped == [] and router.transport is old and old.closed == 0


def test_a_forming_past_its_deadline_changes_nothing() -> None:
    router = _Router()
    router.switch = TableSwitch(router.batcher.lane, form_timeout_s=0.05, close_timeout_s=1.0)
    old = router.transport

    async def go():
        with pytest.raises(asyncio.TimeoutError):
            await router.switch.run(lambda: asyncio.Event().wait(), router.swap)

    _serve(go, router)
    assert router.transport is old and old.closed == 0


def test_a_transport_formed_for_a_swap_that_raised_is_closed() -> None:
    router = _Router()
    new = _Transport(2.0)

    async def form() -> _Transport:
        return new

    def swap(formed: _Transport | None) -> _Transport | None:
        raise ValueError("bad table")

    async def go():
        with pytest.raises(ValueError, match="bad table"):
            await router.switch.run(form, swap)

    _serve(go, router)
    assert new.closed == 1 and router.transport.closed == 0


def test_switches_land_in_arrival_order() -> None:
    """A slow forming switch that arrived first lands before a quick one that arrived second."""
    router = _Router()
    first, second = _Transport(2.0), _Transport(3.0)
    release = asyncio.Event()

    async def slow() -> _Transport:
        await release.wait()
        return first

    async def quick() -> _Transport:
        return second

    async def go():
        a = asyncio.ensure_future(router.switch.run(slow, router.swap))
        await asyncio.sleep(0.01)
        b = asyncio.ensure_future(router.switch.run(quick, router.swap))
        await asyncio.sleep(0.01)
        assert not b.done()
        release.set()
        await asyncio.gather(a, b)

    _serve(go, router)
    assert router.transport is second and first.closed == 1 and second.closed == 0


def test_a_switch_without_a_new_transport_only_swaps() -> None:
    router = _Router()
    old = router.transport
    calls: list[object] = []

    async def go():
        await router.switch.run(lambda: None, lambda t: calls.append(t))

    _serve(go, router)
    assert calls == [None] and router.transport is old and old.closed == 0


@pytest.mark.parametrize(("current", "new", "reopen", "fallback", "suspects", "needed"), [
    (("a", "b"), ("a", "b"), False, False, frozenset(), False),       # same actors: keep the group
    (("a", "b"), ("a", "b", "c"), False, False, frozenset(), True),   # an actor added
    (("a", "b", "c"), ("a", "b"), False, False, frozenset(), True),   # an actor drained
    (("a", "b"), ("b", "a"), False, False, frozenset(), True),        # ranks move
    (("a", "b"), ("a", "b"), True, False, frozenset(), True),         # asked to re-form after a failure
    (("a", "b"), ("a", "b"), False, True, frozenset(), True),         # fallback, nobody suspect any more
    (("a", "b"), ("a", "b"), False, True, frozenset({"a"}), False),   # fallback while a is still suspect
])
def test_reform_needed(current, new, reopen, fallback, suspects, needed) -> None:
    assert reform_needed(current, new, reopen, fallback, suspects) is needed


def test_table_switch_rejects_bad_deadlines() -> None:
    with pytest.raises(ValueError, match="form_timeout_s"):
        TableSwitch(asyncio.Lock(), 0.0, 1.0)
    with pytest.raises(ValueError, match="close_timeout_s"):
        TableSwitch(asyncio.Lock(), 1.0, -1.0)


def test_the_last_switch_reports_its_forming_and_lane_times() -> None:
    router = _Router()

    async def form() -> _Transport:
        return _Transport(2.0)

    async def go():
        await router.switch.run(form, router.swap)

    _serve(go, router)
    last = router.switch.last
    assert set(last) == {"at", "form_s", "lane_wait_s", "lane_held_s"}
    assert all(last[k] >= 0 for k in ("form_s", "lane_wait_s", "lane_held_s")) and last["at"] > 0
