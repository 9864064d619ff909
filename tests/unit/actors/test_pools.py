"""call_routers, the one way the controller calls every router: replies in router order, each call bounded, a
hung, failing or missing router reported as its exception, never raised (fake handles, no cluster)."""

from __future__ import annotations

import asyncio

from expertray.actors.pools import call_routers
from expertray.errors import ExpertRayError


class _Method:
    def __init__(self, reply: object) -> None:
        self.reply = reply

    def remote(self, *args: object) -> object:
        async def answer() -> object:
            if self.reply == "hang":
                await asyncio.sleep(60)
            if isinstance(self.reply, Exception):
                raise self.reply
            return (self.reply, args)
        return answer()


class _Router:
    def __init__(self, reply: object) -> None:
        self.stats = _Method(reply)


def test_replies_in_order_and_each_failure_as_its_exception() -> None:
    routers = {"router-0": _Router("ok"), "router-1": _Router("hang"), "router-2": None,
               "router-3": _Router(RuntimeError("boom"))}
    replies = asyncio.run(call_routers(routers, "stats", (1, 2), timeout_s=0.2))
    assert [r for r, _ in replies] == list(routers)
    assert replies[0][1] == ("ok", (1, 2))
    assert isinstance(replies[1][1], TimeoutError) and "router-1.stats" in str(replies[1][1])
    assert isinstance(replies[2][1], ExpertRayError) and "router-2 is not running" in str(replies[2][1])
    assert isinstance(replies[3][1], RuntimeError)
