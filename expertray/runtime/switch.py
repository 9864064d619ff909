"""Switching a router to a new placement table without holding up its batches, Ray-free.

A table whose actor set differs from the one in use needs a new transport (a collective group over the new
actors: a rendezvous that can take hundreds of milliseconds). It forms *outside* the batch lane, while
batches keep running on the old transport; only the swap itself (table, transport and failover mask: a few
assignments) takes the lane, between two batches; the old transport closes after the lane is released. So
a switch holds the stream up by at most the one batch in flight when the swap asks for the lane.

The two transports live side by side until the swap: a collective group has a fresh name per transport
(actors/transport.py), and an expert actor serves the old group's batches on one thread while it joins the
new group on another (it is a threaded actor), so the join does not queue behind compute.

Switches run one at a time, in arrival order (`serial`), so an older switch never lands after a newer one.
If forming fails (or passes its deadline), nothing changes: the router keeps its table and transport and the
error goes to the caller (the controller rolls the change back).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

log = logging.getLogger(__name__)


class Closable(Protocol):
    async def close(self) -> None: ...


T = TypeVar("T", bound=Closable)


def reform_needed(current_actors: tuple[str, ...], new_actors: tuple[str, ...], reopen: bool, fallback: bool,
                  suspects_after: frozenset[str]) -> bool:
    """Whether a switch to a table over `new_actors` needs a new transport: the actor set changes, the caller
    asks (`reopen`, after a failure), or the router serves on the object-store fallback and no suspect is
    left once the new table is installed (`suspects_after`), so the configured transport can come back."""
    return reopen or new_actors != current_actors or (fallback and not suspects_after)


class TableSwitch:
    """Runs a router's table switches: form the new transport, swap under the lane, close the old one.

    lane: the batcher's dispatch lane (held while a batch runs). form_timeout_s bounds forming a transport;
    close_timeout_s bounds closing the old one (a group with a hung member may never close cleanly)."""

    def __init__(self, lane: asyncio.Lock, form_timeout_s: float, close_timeout_s: float) -> None:
        for name, value in (("form_timeout_s", form_timeout_s), ("close_timeout_s", close_timeout_s)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {value}")
        self.lane = lane
        self.form_timeout_s = form_timeout_s
        self.close_timeout_s = close_timeout_s
        self.serial = asyncio.Lock()
        # the last switch: when its swap ran (wall clock), seconds spent forming, waiting for the lane, holding it
        self.last: dict[str, float] = {}

    async def run(self, form: Callable[[], Awaitable[T] | None], swap: Callable[[T | None], T | None],
                  before_lane: Callable[[], None] = lambda: None) -> None:
        """One switch. With `serial` held: `form()` gives the new transport's opening (an awaitable, awaited
        here with the lane free) or None when the switch needs none; `before_lane()` runs once it formed;
        then `swap(formed)` runs with the lane held (between two batches) and returns the transport it
        replaced, closed here after the lane is released. A transport formed for a swap that raised is
        closed, and the error raised."""
        async with self.serial:
            t0 = time.perf_counter()
            opening = form()
            formed = None if opening is None else await asyncio.wait_for(opening, self.form_timeout_s)
            try:
                before_lane()
                t1 = time.perf_counter()
                async with self.lane:
                    t2 = time.perf_counter()
                    old = swap(formed)
                    t3 = time.perf_counter()
            except BaseException:
                if formed is not None:
                    await self.close(formed)
                raise
            self.last = {"at": time.time(), "form_s": t1 - t0, "lane_wait_s": t2 - t1, "lane_held_s": t3 - t2}
            if old is not None:
                await self.close(old)

    async def close(self, transport: Any) -> None:
        """Close `transport` within close_timeout_s; a failure is logged (the transport is dropped either way)."""
        try:
            await asyncio.wait_for(transport.close(), self.close_timeout_s)
        except Exception:  # noqa: BLE001 - logged; whatever replaced it is already in place
            log.warning("closing transport %s failed", getattr(transport, "name", transport), exc_info=True)
