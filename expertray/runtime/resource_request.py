"""The controller's standing autoscaler request, Ray-free: sent when no node has room for another expert
actor, withdrawn once the table shows it was met or made moot.

Ray's `request_resources` is a floor on the cluster's size, not an addition to what runs; it bypasses the
autoscaler's upscaling speed and stands until the next request. Left standing, it would keep the autoscaler
from removing the nodes it brought once the load falls, hence the withdrawal. Without an autoscaler a
request does nothing. Every request is advisory: a failure to send one is logged, never raised.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

log = logging.getLogger(__name__)

Bundle = dict[str, float]
Send = Callable[[list[Bundle]], None]  # sends bundles as the standing request ([]: withdraw it); may raise


class ResourceRequests:
    """The last request sent (`last`: bundles, bundle, why, t, and withdrawn once withdrawn) and the table's
    actors when it was sent; `send` reaches the autoscaler (Ray's `request_resources`)."""

    def __init__(self, send: Send, clock: Callable[[], float] = time.time) -> None:
        self.send = send
        self.clock = clock
        self.last: dict[str, Any] | None = None
        self.asked_with: frozenset[str] = frozenset()

    def ask(self, demand: Mapping[str, float], keeping: int, why: str, actors: tuple[str, ...]) -> list[Bundle]:
        """Ask for room for one more actor of `demand` than the `keeping` ones that keep their place: one
        bundle per actor. Returns the bundles sent ([]: sending failed, nothing recorded)."""
        bundles = [dict(demand) for _ in range(keeping + 1)]
        if not self._send(bundles, f"request_resources ({len(bundles)} bundles of {bundles[0]})"):
            return []
        self.last = {"bundles": len(bundles), "bundle": bundles[0], "why": why, "t": self.clock()}
        self.asked_with = frozenset(actors)
        log.info("request_resources: %d bundles of %s (%s)", len(bundles), bundles[0], why)
        return bundles

    def settle(self, actors: tuple[str, ...]) -> None:
        """After a placement change: withdraw a standing request that the table's `actors` show met (an actor
        started since) or moot (the table shrank since)."""
        standing = self.last is not None and "withdrawn" not in self.last
        if standing and resource_request_settled(self.asked_with, actors) and self._send([], "withdrawing "
                                                                                              "request_resources"):
            assert self.last is not None
            self.last["withdrawn"] = self.clock()
            log.info("request_resources withdrawn (%d actors in the table)", len(actors))

    def _send(self, bundles: list[Bundle], what: str) -> bool:
        try:
            self.send(bundles)
        except Exception as exc:  # noqa: BLE001 - the request is a hint to the autoscaler, never required
            log.warning("%s failed: %s", what, exc)
            return False
        return True


def resource_request_settled(asked_with: frozenset[str], actors: tuple[str, ...]) -> bool:
    """Whether a standing `request_resources`, sent while the table held the expert actors `asked_with`, should
    be withdrawn now that it holds `actors`: met (an actor started since, the one the room was asked for) or
    moot (the table shrank since: whoever asked no longer grows it). The request is a floor on the cluster's
    size that stands until the next one, so left alone it would keep the autoscaler from removing the nodes
    it brought once the load falls."""
    return bool(set(actors) - asked_with) or len(set(actors)) < len(asked_with)
