"""The controller's liveness decisions, Ray-free: which expert actors routers must stop sending to now, and
which are dead and must be replaced.

Every `liveness_interval_s` the controller pings every actor of the table at once, each ping bounded by the
short `liveness_timeout_s`, and hands the replies to `Liveness.observe`, which decides:
- suspects: actors whose ping failed (no answer in time, or Ray reported the actor dead). A hung actor
  (SIGSTOP, a stuck driver) and a dead one look the same here; so does every actor of a lost node (Ray keeps
  listing a killed node as alive for ~15 s, so calls to its actors just hang).
- push: suspects go to every router at once, and again each round while any stays silent (a router that
  was replaced, or that installed a healed table in between, learns them again); an actor that was pushed
  and answers again is pushed as `recovered`, so routers un-mask it without waiting for a heal.
- dead: Ray reported the actor dead (a certain death), or it has been silent for `dead_after_s`
  (`ping_timeout_s`: the deadline after which the controller has always declared an actor dead). Dead
  actors are healed (killed, replaced, reloaded). A busy actor is not silent: it serves pings on a
  concurrency group of their own, beside its compute (actors/expert.py).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass

from expertray.errors import ConfigError


class Reply(enum.Enum):
    """How one liveness ping ended."""

    ANSWERED = "answered"
    SILENT = "silent"  # no answer within the liveness deadline (hung, overloaded, or on a lost node)
    DIED = "died"  # Ray says the actor is dead (killed, crashed) or it has no handle


@dataclass(frozen=True)
class Verdict:
    """What one liveness round decided (actor ids).

    suspects: every actor whose ping failed this round. push: tell the routers now (`suspects` and
    `recovered`). recovered: actors pushed before that answer again. dead: actors to heal now."""

    suspects: frozenset[str]
    push: bool
    recovered: frozenset[str]
    dead: frozenset[str]


class Liveness:
    """Per-actor silence over liveness rounds (see the module docstring); one instance per controller."""

    def __init__(self, dead_after_s: float) -> None:
        if not (math.isfinite(dead_after_s) and dead_after_s > 0):
            raise ConfigError(f"liveness.dead_after_s: must be a finite number > 0, got {dead_after_s}")
        self.dead_after_s = dead_after_s
        self.silent_since: dict[str, float] = {}  # actor -> when the first unanswered ping of its silence was sent
        self.pushed: frozenset[str] = frozenset()  # suspects the routers were told about and not yet recovered

    def observe(self, replies: Mapping[str, Reply], sent_at: float, now: float) -> Verdict:
        """One round: `replies` to pings sent at `sent_at` for every actor of the current table, seen at `now`
        (seconds, one monotonic clock). Actors not in `replies` left the table and are forgotten."""
        if now < sent_at:
            raise ConfigError(f"liveness.observe: the round ended ({now}) before its pings were sent ({sent_at})")
        bad = [a for a, r in replies.items() if not isinstance(r, Reply)]
        if bad:
            raise ConfigError(f"liveness.observe: replies for {sorted(bad)} are not Reply values")
        self.silent_since = {a: t for a, t in self.silent_since.items() if replies.get(a, Reply.ANSWERED)
                             is not Reply.ANSWERED}
        suspects = frozenset(a for a, r in replies.items() if r is not Reply.ANSWERED)
        for a in suspects:
            self.silent_since.setdefault(a, sent_at)
        dead = frozenset(a for a in suspects if replies[a] is Reply.DIED
                         or now - self.silent_since[a] >= self.dead_after_s)
        recovered = frozenset(a for a in self.pushed if replies.get(a) is Reply.ANSWERED)
        self.pushed = frozenset(a for a in self.pushed if a in replies) - recovered | suspects
        return Verdict(suspects, bool(suspects or recovered), recovered, dead)
