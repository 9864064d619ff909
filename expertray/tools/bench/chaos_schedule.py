"""The seeded fault schedule of `expertray bench chaos`: which fault starts when and how long its effect lasts.

Pure and Ray-free: the same (seed, duration, kinds, shadows, nodes) always gives the same events. Faults
overlap: an event may start while earlier ones are still in effect (a hung actor not yet resumed, a kill not
yet healed, a slowed actor). One rule keeps the shadow goal (0 errors with `min_replicas_per_expert=2`)
meaningful: with shadows on, at most one *destructive* fault (one that takes expert copies away: kill or
hang an expert actor, remove a node) is in effect at a time, so every expert keeps a live copy; the other
faults (slow an actor, kill a router or the controller, corrupt the snapshot, add / drain actors,
rebalance, add a node) overlap it freely. Without shadows destructive faults overlap too, and the runner
counts the errors they cause as can't-serve when no live copy of a needed expert existed. Router kills never
overlap one another (whatever the shadows): a second kill before the first router's replacement is up can
take the last router, an outage by construction rather than a fault the runtime could mask.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any

DESTRUCTIVE = ("kill_expert", "hang_expert", "remove_node")
SINGLE_NODE_KINDS = ("kill_expert", "hang_expert", "slow_expert", "kill_router", "kill_controller",
                     "corrupt_snapshot", "add_actor", "drain_actor", "rebalance")
MULTI_NODE_KINDS = (*SINGLE_NODE_KINDS, "remove_node", "add_node")
TIMED = ("hang_expert", "slow_expert")  # undone by the runner after duration_s (SIGCONT, slowdown 1)


@dataclass(frozen=True)
class ScheduleParams:
    """Shape of a schedule. Gaps between fault starts are uniform in [min_gap_s, max_gap_s]; hangs and slowdowns
    last uniform [min_hold_s, max_hold_s]; `recover_s` is how long a kill, restart or placement change is taken
    to stay in effect (the heal or restart it triggers); nothing starts in the last `quiet_tail_s`."""

    min_gap_s: float = 2.0
    max_gap_s: float = 8.0
    min_hold_s: float = 2.0
    max_hold_s: float = 8.0
    recover_s: float = 12.0
    quiet_tail_s: float = 15.0
    lead_in_s: float = 5.0
    min_actors: int = 3
    max_actors: int = 6
    min_nodes: int = 2
    max_nodes: int = 4

    def __post_init__(self) -> None:
        if not 0 < self.min_gap_s <= self.max_gap_s:
            raise ValueError(f"gaps: need 0 < min_gap_s <= max_gap_s, got {self.min_gap_s}, {self.max_gap_s}")
        if not 0 < self.min_hold_s <= self.max_hold_s:
            raise ValueError(f"holds: need 0 < min_hold_s <= max_hold_s, got {self.min_hold_s}, {self.max_hold_s}")
        if self.recover_s <= 0 or self.quiet_tail_s < 0 or self.lead_in_s < 0:
            raise ValueError("recover_s must be > 0, quiet_tail_s and lead_in_s >= 0")


@dataclass(frozen=True)
class FaultEvent:
    """One fault: starts `at_s` into the run and is undone `hold_s` later (SIGCONT, slowdown back to 1; 0 for
    faults nothing undoes); in effect for `duration_s` (the hold plus the recovery it triggers)."""

    at_s: float
    kind: str
    hold_s: float
    duration_s: float

    @property
    def end_s(self) -> float:
        return round(self.at_s + self.duration_s, 3)  # times are in ms steps: a fault may start as one ends

    @property
    def destructive(self) -> bool:
        return self.kind in DESTRUCTIVE

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fault_kinds(nodes: int) -> tuple[str, ...]:
    """Every fault kind the mode supports: multi-node (`nodes` > 0 worker nodes) adds node removal and addition."""
    return MULTI_NODE_KINDS if nodes > 0 else SINGLE_NODE_KINDS


def make_schedule(seed: int, duration_s: float, kinds: tuple[str, ...], shadows: bool, actors: int,
                  nodes: int = 0, params: ScheduleParams | None = None) -> list[FaultEvent]:
    """The fault events of a run of `duration_s`, sorted by start. `actors` expert actors and `nodes` worker
    nodes at the start: drains and node removals never go below params.min_actors / min_nodes, additions
    never above max_actors / max_nodes (a kind that does not fit is replaced by another draw)."""
    p = params or ScheduleParams()
    allowed = fault_kinds(nodes)
    bad = [k for k in kinds if k not in allowed]
    if bad or not kinds:
        raise ValueError(f"fault kinds {bad or 'none'} not available here (available: {', '.join(allowed)})")
    rng = random.Random(seed)
    events: list[FaultEvent] = []
    destructive_until = router_until = 0.0
    t = p.lead_in_s
    last = duration_s - p.quiet_tail_s
    while True:
        t += rng.uniform(p.min_gap_s, p.max_gap_s)
        fits = [k for k in kinds if _fits(k, actors, nodes, p)]
        if t >= last or not fits:
            break
        kind = rng.choice(fits)
        at = max(t, destructive_until) if shadows and kind in DESTRUCTIVE else t
        at = max(at, router_until) if kind == "kill_router" else at
        if at >= last:
            continue
        hold = round(rng.uniform(p.min_hold_s, p.max_hold_s), 3) if kind in TIMED else 0.0
        event = FaultEvent(round(at, 3), kind, hold, round(hold + (0.0 if kind == "slow_expert" else p.recover_s), 3))
        if event.destructive:
            destructive_until = event.end_s
        if kind == "kill_router":
            router_until = event.end_s
        actors += {"add_actor": 1, "drain_actor": -1}.get(kind, 0)
        nodes += {"add_node": 1, "remove_node": -1}.get(kind, 0)
        events.append(event)
    return sorted(events, key=lambda e: e.at_s)


def _fits(kind: str, actors: int, nodes: int, p: ScheduleParams) -> bool:
    if kind == "drain_actor":
        return actors > p.min_actors
    if kind == "add_actor":
        return actors < p.max_actors
    if kind == "remove_node":
        return nodes > p.min_nodes
    if kind == "add_node":
        return nodes < p.max_nodes
    return True


def overlapping_pairs(events: list[FaultEvent]) -> list[tuple[FaultEvent, FaultEvent]]:
    """Every pair (a, b) where b starts while a is still in effect."""
    return [(a, b) for i, a in enumerate(events) for b in events[i + 1:] if b.at_s < a.end_s]
