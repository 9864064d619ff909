"""Autoscale policies: turn the controller's live signals into placement and capacity actions.

The controller calls `decide(signals, table, now_s)` on a timer and applies the returned actions in order:
slot actions through `Action.apply` (PlacementTable.replicate / remove / migrate / drain), `add_actor` by
starting an actor, `request_resources` by asking the cluster autoscaler for room. Policies keep state
between decisions (streaks, cooldowns) and never touch Ray. `AUTOSCALE.create(name, **params)` builds one;
the interface, AutoscalePolicy, is declared in expertray.seams.

`hysteresis` (the default): every condition must hold for `sustain_checks` consecutive decisions before it
acts, each target then waits `cooldown_s`, and a decision returns at most `max_actions` actions, most urgent
first: straggler migrations, hot replications, scale up, cold de-replications, scale down. Cost per
decision: O(L · E + slots · A) for A actors.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from expertray.config import AUTOSCALE_POLICIES
from expertray.errors import ConfigError, require
from expertray.policies.placement import device_loads
from expertray.registry import Registry
from expertray.seams import AutoscalePolicy
from expertray.state.decisions import ACTION_KINDS, Action, Signals  # noqa: F401 - re-exported
from expertray.state.placement_table import PlacementTable

log = logging.getLogger(__name__)

AUTOSCALE: Registry[AutoscalePolicy] = Registry("autoscale")


@dataclass(frozen=True)
class HysteresisParams:
    """Parameters of the `hysteresis` policy.

    hot_ratio: replicate an expert whose demand per replica exceeds this × its layer's mean per slot.
    cold_ratio: remove a replica (never the last, nor a shadow: `Signals.min_replicas`) of an expert below this
        × the mean; must be below
        hot_ratio / 2, so that neither change can flip the expert straight back.
    sustain_checks: consecutive decisions a condition must hold before it acts.
    straggler_ratio: an actor whose p50 latency is at least this × the median of the actors' straggles.
    straggler_slots: a straggler's hottest slots migrated away per decision.
    scale_up_tokens_per_s / scale_down_tokens_per_s: add an actor above, remove one below, this many tokens/s
        per actor (inf / 0 turn them off).
    min_actors / max_actors: bounds for adding and removing actors.
    cooldown_s: after an action, its expert / actor / the cluster (for scaling) waits this long.
    max_actions: actions per decision, at most.

    Defaults (measured with `expertray bench elastic`, docs/BENCHMARKS.md): a 3x straggler is recovered
    (p99 within 1.2x of baseline) in under 10 s, and a steady skewed load sees at most a couple of placement
    changes per minute; sustain_checks (2 decisions) is what keeps one noisy sample from acting.
    """

    hot_ratio: float = 2.0
    cold_ratio: float = 0.25
    sustain_checks: int = 2
    straggler_ratio: float = 1.5
    straggler_slots: int = 1
    scale_up_tokens_per_s: float = math.inf
    scale_down_tokens_per_s: float = 0.0
    min_actors: int = 1
    max_actors: int = 1024
    cooldown_s: float = 5.0
    max_actions: int = 4

    def __post_init__(self) -> None:
        need = partial(require, prefix="autoscale.hysteresis")
        need(math.isfinite(self.hot_ratio) and self.hot_ratio > 1, "hot_ratio", f"must be > 1, got {self.hot_ratio}")
        need(0 <= self.cold_ratio < self.hot_ratio / 2, "cold_ratio",
             f"must be in [0, hot_ratio / 2 = {self.hot_ratio / 2}), got {self.cold_ratio}")
        need(self.sustain_checks >= 1, "sustain_checks", f"must be >= 1, got {self.sustain_checks}")
        need(math.isfinite(self.straggler_ratio) and self.straggler_ratio > 1, "straggler_ratio",
             f"must be > 1, got {self.straggler_ratio}")
        need(self.straggler_slots >= 1, "straggler_slots", f"must be >= 1, got {self.straggler_slots}")
        need(0 <= self.scale_down_tokens_per_s < self.scale_up_tokens_per_s, "scale_down_tokens_per_s",
             f"must be >= 0 and below scale_up_tokens_per_s={self.scale_up_tokens_per_s}, "
             f"got {self.scale_down_tokens_per_s}")
        need(self.min_actors >= 1, "min_actors", f"must be >= 1, got {self.min_actors}")
        need(self.max_actors >= self.min_actors, "max_actors",
             f"must be >= min_actors={self.min_actors}, got {self.max_actors}")
        need(math.isfinite(self.cooldown_s) and self.cooldown_s >= 0, "cooldown_s",
             f"must be a finite number >= 0, got {self.cooldown_s}")
        need(self.max_actions >= 1, "max_actions", f"must be >= 1, got {self.max_actions}")


class _Working:
    """The table and memory as this decision's earlier actions leave them, for choosing destinations."""

    def __init__(self, table: PlacementTable, signals: Signals) -> None:
        self.table = table
        self.signals = signals
        self.used = {a: signals.memory_used_bytes.get(a, 0) for a in table.actors}

    def actor_load(self) -> dict[str, float]:
        """Demand tokens per actor, each expert's demand split evenly over its replicas."""
        per_actor = device_loads(self.table, self.signals.demand).sum(axis=0)
        return dict(zip(self.table.actors, per_actor.tolist(), strict=True))

    def has_room(self, actor: str) -> bool:
        budget = self.signals.memory_budget_bytes.get(actor)
        return budget is None or self.used[actor] + self.signals.expert_bytes <= budget

    def destination(self, layer: int, expert: int, avoid: set[str]) -> str | None:
        """The least-loaded actor with memory room that lacks the expert and is not in `avoid`."""
        holders = {s.actor for s in self.table.replicas(layer, expert)}
        load = self.actor_load()
        options = [a for a in self.table.actors if a not in holders and a not in avoid and self.has_room(a)]
        return min(options, key=lambda a: (load[a], len(self.table.slots_of(a)), a)) if options else None

    def apply(self, action: Action) -> None:
        self.table = action.apply(self.table)
        # a source's bytes are free only once it has drained, so this decision does not count on them
        if action.dst is not None:
            self.used[action.dst] += self.signals.expert_bytes


class Hysteresis(AutoscalePolicy):
    """Hot/cold replication, straggler migration and actor scaling with sustain checks and cooldowns."""

    def __init__(self, params: HysteresisParams | None = None) -> None:
        self.params = params or HysteresisParams()
        self._streaks: dict[tuple[Any, ...], int] = {}  # condition → consecutive decisions it has held
        self._last_action_s: dict[tuple[Any, ...], float] = {}  # cooldown target → time of its last action

    def export_state(self, now_s: float) -> dict[str, Any]:
        """{"streaks": [[condition, count]], "cooldown_ages_s": [[target, seconds since its last action]]}."""
        return {"streaks": [[list(c), n] for c, n in self._streaks.items()],
                "cooldown_ages_s": [[list(t), now_s - at] for t, at in self._last_action_s.items()]}

    def restore_state(self, state: dict[str, Any], now_s: float) -> None:
        def pairs(name: str, ok: Any) -> list[tuple[tuple[Any, ...], Any]]:
            items = state.get(name, [])
            if not isinstance(items, list) or not all(
                    isinstance(i, list) and len(i) == 2 and isinstance(i[0], list) and ok(i[1]) for i in items):
                raise ConfigError(f"autoscale.hysteresis state.{name}: expected [[key, value], ...], got {items!r}")
            return [(tuple(k), v) for k, v in items]

        def is_count(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and v >= 0

        def is_age(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        streaks = dict(pairs("streaks", is_count))
        ages = dict(pairs("cooldown_ages_s", is_age))
        self._streaks = streaks
        self._last_action_s = {t: now_s - age for t, age in ages.items()}

    def decide(self, signals: Signals, table: PlacementTable, now_s: float) -> list[Action]:
        signals.check(table)
        p = self.params
        holding: dict[tuple[Any, ...], tuple[float, str]] = {}  # condition → (severity, why it holds now)
        stragglers = self._stragglers(signals, table, holding)
        self._expert_conditions(signals, table, holding)
        self._scale_conditions(signals, table, holding)
        self._streaks = {c: self._streaks.get(c, 0) + 1 for c in holding}
        due = [c for c in holding if self._streaks[c] >= p.sustain_checks]
        work = _Working(table, signals)
        actions: list[Action] = []
        last_action_s = dict(self._last_action_s)  # cooldowns run between decisions, not within one
        for condition in sorted(due, key=lambda c: (_URGENCY[c[0]], -holding[c][0], c)):
            if len(actions) >= p.max_actions:
                log.debug("autoscale: max_actions=%d reached, %s waits", p.max_actions, condition)
                break
            streak = self._streaks[condition]
            reason = f"{holding[condition][1]} for {streak} check{'s' if streak > 1 else ''}"
            for action, targets in self._actions(condition, reason, work, stragglers):
                if len(actions) >= p.max_actions:
                    log.debug("autoscale: max_actions=%d reached, %s waits", p.max_actions, action.reason)
                    break
                waiting = [t for t in targets if now_s - last_action_s.get(t, -math.inf) < p.cooldown_s]
                if waiting:
                    log.debug("autoscale: %s held back, cooling down: %s", action.reason, waiting)
                    continue
                work.apply(action)
                actions.append(action)
                self._last_action_s.update(dict.fromkeys(targets, now_s))
                self._streaks[condition] = 0
                log.info("autoscale %s: %s", action.kind, action.reason)
        return actions

    # --- conditions: what holds now, keyed by condition, with the numbers that make it hold ------------------
    def _stragglers(self, signals: Signals, table: PlacementTable, holding: dict) -> set[str]:
        p50 = signals.latency_p50_ms
        if len(p50) < 2:
            return set()
        median = float(np.median(list(p50.values())))
        slow = {a for a, ms in p50.items() if median > 0 and ms >= self.params.straggler_ratio * median}
        for a in slow:
            p99 = signals.latency_p99_ms.get(a)
            holding[("straggler", a)] = (p50[a] / median, f"actor {a!r} straggles: p50 {p50[a]:.2f} ms >= "
                                         f"{self.params.straggler_ratio} x the median {median:.2f} ms"
                                         + (f" (p99 {p99:.2f} ms)" if p99 is not None else ""))
        return slow

    def _expert_conditions(self, signals: Signals, table: PlacementTable, holding: dict) -> None:
        demand = signals.demand
        for layer in range(table.num_layers):
            replicas = np.array(table.replica_counts(layer), dtype=np.float64)
            mean = demand[layer].sum() / replicas.sum()
            if mean <= 0:
                continue
            ratio = demand[layer] / replicas / mean
            p = self.params
            for e in np.flatnonzero(ratio > p.hot_ratio):
                why = (f"expert {layer}:{e} hot: {demand[layer, e]:.0f} tokens over {replicas[e]:.0f} replica(s) = "
                       f"{ratio[e]:.2f} x the layer mean per slot ({mean:.1f}) > hot_ratio {p.hot_ratio}")
                holding[("hot", layer, int(e))] = (ratio[e], why)
            for e in np.flatnonzero((ratio < p.cold_ratio) & (replicas > max(1, signals.min_replicas))):
                why = (f"expert {layer}:{e} cold: {demand[layer, e]:.0f} tokens over {replicas[e]:.0f} replicas = "
                       f"{ratio[e]:.2f} x the layer mean per slot ({mean:.1f}) < cold_ratio {p.cold_ratio}")
                holding[("cold", layer, int(e))] = (-ratio[e], why)

    def _scale_conditions(self, signals: Signals, table: PlacementTable, holding: dict) -> None:
        p, n = self.params, len(table.actors)
        per_actor = signals.tokens_per_s / n
        if per_actor > p.scale_up_tokens_per_s and n < p.max_actors:
            holding[("scale_up",)] = (per_actor, f"{per_actor:.1f} tokens/s per actor ({n} actors) > "
                                      f"scale_up_tokens_per_s {p.scale_up_tokens_per_s}")
        # one fewer actor must not be over the scale-up line, or the next decisions would add it back
        if (per_actor < p.scale_down_tokens_per_s and n > p.min_actors
                and signals.tokens_per_s / (n - 1) <= p.scale_up_tokens_per_s):
            holding[("scale_down",)] = (-per_actor, f"{per_actor:.1f} tokens/s per actor ({n} actors) < "
                                        f"scale_down_tokens_per_s {p.scale_down_tokens_per_s}")

    # --- actions for a due condition, each with its cooldown targets; lazily, so that each destination is
    # --- chosen after the previous action of this decision has been applied to `work`
    def _actions(self, condition: tuple[Any, ...], reason: str, work: _Working, stragglers: set[str]
                 ) -> Iterator[tuple[Action, list[tuple[Any, ...]]]]:
        kind, signals = condition[0], work.signals
        if kind == "straggler":
            yield from self._migrations(condition[1], reason, work, stragglers)
        elif kind == "hot":
            layer, expert = condition[1], condition[2]
            dst = work.destination(layer, expert, stragglers)
            if dst is None:
                log.info("autoscale: %s, but no healthy actor has room for another replica", reason)
                return
            yield (Action("replicate", f"{reason}; to least-loaded {dst!r}", layer, expert, dst=dst),
                   [("expert", layer, expert)])
        elif kind == "cold":
            layer, expert = condition[1], condition[2]
            load = work.actor_load()
            holders = [s.actor for s in work.table.replicas(layer, expert)]
            src = max(holders, key=lambda a: (load[a], a))
            yield (Action("dereplicate", f"{reason}; from its busiest holder {src!r}", layer, expert, src=src),
                   [("expert", layer, expert)])
        elif kind == "scale_up":
            if signals.free_capacity < 1:
                yield (Action("request_resources", f"{reason}; free_capacity 0: the cluster has no room for "
                                                   f"another expert actor"), [("cluster",)])
            else:
                yield Action("add_actor", f"{reason}; free_capacity {signals.free_capacity}"), [("cluster",)]
        else:
            yield from self._removal(reason, work)

    def _migrations(self, actor: str, reason: str, work: _Working, stragglers: set[str]
                    ) -> Iterator[tuple[Action, list[tuple[Any, ...]]]]:
        """Move the straggler's hottest slots, each to the least-loaded healthy actor with room."""
        demand = work.signals.demand

        def share(layer: int, expert: int) -> float:
            return float(demand[layer, expert]) / len(work.table.replicas(layer, expert))

        hottest = sorted(work.table.slots_of(actor), key=lambda s: (-share(s.layer, s.expert), s))
        for s in hottest[: self.params.straggler_slots]:
            dst = work.destination(s.layer, s.expert, stragglers | {actor})
            if dst is None:
                log.info("autoscale: %s, but no healthy actor has room for expert %d:%d", reason, s.layer, s.expert)
                continue
            yield (Action("migrate", f"{reason}; its hottest slot {s.layer}:{s.expert} "
                                     f"({share(s.layer, s.expert):.0f} tokens) to least-loaded healthy {dst!r}",
                          s.layer, s.expert, actor, dst),
                   [("actor", actor), ("expert", s.layer, s.expert)])

    def _removal(self, reason: str, work: _Working) -> Iterator[tuple[Action, list[tuple[Any, ...]]]]:
        """Drain the least-loaded actor, if the others have memory for its slots."""
        load = work.actor_load()
        src = min(work.table.actors, key=lambda a: (load[a], a))
        others = [a for a in work.table.actors if a != src]
        budgets = work.signals.memory_budget_bytes
        need = len(work.table.slots_of(src)) * work.signals.expert_bytes
        room = sum(max(budgets[a] - work.used[a], 0) for a in others) if all(a in budgets for a in others) else None
        if room is not None and room < need:
            log.info("autoscale: %s, but the other actors have %d bytes free for the %d of %r", reason, room, need, src)
            return
        yield (Action("remove_actor", f"{reason}; drain least-loaded {src!r} ({load[src]:.0f} tokens)", src=src),
               [("cluster",), ("actor", src)])


_URGENCY = {"straggler": 0, "hot": 1, "scale_up": 2, "cold": 3, "scale_down": 4}


@AUTOSCALE.register("hysteresis")
def _hysteresis(**params: Any) -> Hysteresis:
    return Hysteresis(HysteresisParams(**params))


AUTOSCALE.check(AUTOSCALE_POLICIES)
