"""`laser`: score-distribution-adaptive, load-aware routing (LASER-style) under a gate-mass budget.

A token whose gate distribution is peaked (its top-k hold >= `mass_threshold` of its mass) keeps its top-k.
A flat token may swap some of its top-k experts for its next `widen` candidates: its experts on the busiest
devices (or experts) are paired with candidates on less loaded ones, and each pair costs the gate mass it
gives up. With a budget (`mass_budget`, the default) the price of load is found per chunk of tokens rather
than fixed: the chunk brings every device down to the lowest load *level* its pro-rata share of the budget
pays for, each device above the level giving up its cheapest swaps, and destinations fill only up to the
level (and to the level the whole batch can reach, so early chunks do not create the next peak). With a
fixed `balance_weight` every swap whose mass per unit of load moved is below that price is taken instead,
never past the mean. No token gives up more than `max_mass_loss` of its own top-k mass. Capacity is then
applied to the new choice as `apply_capacity` would.

Loads are projected: the caller's prior (`expert_load`) plus this batch's whole top-k demand, updated by
every swap taken, so the first chunk already sees the batch's hot spots. Shapes: T tokens, E experts,
k chosen, w = widen, G groups (devices). The chunk steps on a few thousand entries run in numpy, where one call
costs a fraction of torch's, and avoid data-dependent branches where numpy offers a way (radix and SIMD sorts
of small integer keys); a gate output on an accelerator keeps its [T, E] steps there and sends the flat
tokens' [n, 2 (k + w) + 1] candidates, probs and top-k mass (with [n, w] usable flags when some score is not
finite) to the host in one copy, and the chosen experts and their probs back.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch

from expertray.config import CapacityConfig
from expertray.errors import ConfigError, InputError, require
from expertray.layer.capacity import CapacityResult, apply_capacity
from expertray.layer.gating import GateOutput
from expertray.policies.routing import ROUTING, RoutingPolicy
from expertray.state.placement_table import LayerRoute

_GRID = np.arange(257) / 256  # the level grid of `_take_level`, from the mean (0) to the peak (1)
_SCALARS = ("mass_threshold", "entropy_threshold", "widen", "mass_budget", "balance_weight", "max_mass_loss",
            "chunk_tokens")


@ROUTING.register("laser")
@dataclass(frozen=True)
class LaserRouting(RoutingPolicy):
    """Parameters.

    mass_threshold: a token is peaked if its top-k experts hold at least this share of its gate mass.
    entropy_threshold: ... or if its gate distribution's entropy / log(E) is at most this (-1 disables).
    widen: flat tokens choose among their top-(k + widen) experts.
    mass_budget: the share of the batch's top-k gate mass the policy may give up to balance load; it buys
        the swaps with the lowest price first. The user-facing knob (one value fits every model shape).
    balance_weight: None (default) prices load through `mass_budget`; a number fixes the price instead (gate
        mass, in units of the token's average top-k expert, given up per mean load moved) and the budget is
        not used.
    max_mass_loss: a token never gives up more than this fraction of its own top-k gate mass.
    chunk_tokens: flat tokens are placed in chunks of this size, each with a pro-rata share of the budget
        left; loads are refreshed between chunks.
    layer_overrides: {layer: {parameter: value}} for layers that need other thresholds (see `for_layer`).
    expert_groups: optional [E] device (or any group) of each logical expert: load is then priced per group,
        so flat tokens move toward experts on lightly loaded devices, not just lightly loaded experts.
    device_aware: in the runtime, `for_route` fills `expert_groups` from the live placement table.
    """

    mass_threshold: float = 0.9
    entropy_threshold: float = -1.0
    widen: int = 4
    mass_budget: float = 0.03
    balance_weight: float | None = None
    max_mass_loss: float = 0.25
    chunk_tokens: int = 1024
    layer_overrides: Mapping[int, Mapping[str, Any]] = field(default_factory=dict)
    expert_groups: tuple[int, ...] | None = None
    device_aware: bool = False

    def __post_init__(self) -> None:
        need = partial(require, prefix="routing.laser")
        need(math.isfinite(self.mass_threshold), "mass_threshold", f"must be finite, got {self.mass_threshold}")
        need(math.isfinite(self.entropy_threshold), "entropy_threshold",
             f"must be finite, got {self.entropy_threshold}")
        need(self.widen >= 0, "widen", f"must be >= 0, got {self.widen}")
        need(0.0 <= self.mass_budget <= 1.0, "mass_budget", f"must be in [0, 1], got {self.mass_budget}")
        need(self.balance_weight is None or (math.isfinite(self.balance_weight) and self.balance_weight >= 0),
             "balance_weight", f"must be None or >= 0, got {self.balance_weight}")
        need(0.0 <= self.max_mass_loss <= 1.0, "max_mass_loss", f"must be in [0, 1], got {self.max_mass_loss}")
        need(self.chunk_tokens >= 1, "chunk_tokens", f"must be >= 1, got {self.chunk_tokens}")
        overrides: dict[int, dict[str, Any]] = {}
        for key, params in dict(self.layer_overrides).items():
            unknown = sorted(set(params) - set(_SCALARS))
            need(not unknown, f"layer_overrides.{key}", f"unknown parameters {unknown} (known: {list(_SCALARS)})")
            try:
                layer = int(key)  # JSON / msgpack configs give string keys
            except ValueError:
                raise ConfigError(f"routing.laser.layer_overrides: layer {key!r} is not an integer") from None
            overrides[layer] = dict(params)
            dataclasses.replace(self, **params, layer_overrides={})  # validates the overridden values
        object.__setattr__(self, "layer_overrides", overrides)
        if self.expert_groups is not None:
            groups = tuple(int(g) for g in self.expert_groups)
            need(bool(groups) and min(groups) >= 0, "expert_groups", "must be non-negative group ids, one per expert")
            object.__setattr__(self, "expert_groups", groups)

    def for_layer(self, layer: int) -> LaserRouting:
        params = self.layer_overrides.get(layer)
        return dataclasses.replace(self, **params, layer_overrides={}) if params else self

    def for_route(self, route: LayerRoute) -> LaserRouting:
        """Device-aware: price load per actor holding each expert's first replica in `route`."""
        return self.with_expert_groups(route.home_actor) if self.device_aware else self

    def with_expert_groups(self, groups: tuple[int, ...]) -> LaserRouting:
        """This policy pricing load per group (e.g. the device holding each expert)."""
        return dataclasses.replace(self, expert_groups=groups, layer_overrides={})

    def flat_tokens(self, probs: torch.Tensor, experts: torch.Tensor,
                    top_probs: torch.Tensor | None = None) -> torch.Tensor:
        """[T] bool: tokens whose gate distribution (probs [T, E], top-k experts [T, k]; top_probs [T, k]: their
        probs, when the caller has them) is not peaked."""
        total = probs.sum(dim=1, keepdim=True).clamp_min(1e-30)
        top_probs = probs.gather(1, experts) if top_probs is None else top_probs
        peaked = (top_probs / total).sum(dim=1) >= self.mass_threshold  # no [T, E] division
        if self.entropy_threshold >= 0:
            dist = probs / total
            entropy = -torch.special.xlogy(dist, dist).sum(dim=1) / math.log(probs.shape[1])
            peaked |= entropy <= self.entropy_threshold
        return ~peaked

    def route(self, gate: GateOutput, capacity: CapacityConfig,
              expert_load: torch.Tensor | None = None) -> CapacityResult:
        T, k = gate.experts.shape
        E = gate.probs.shape[1]
        widen = min(self.widen, E - k)
        load = torch.zeros(E) if expert_load is None else expert_load.reshape(-1).to("cpu", torch.float32).clone()
        if load.numel() != E:
            raise InputError(f"expert_load must have {E} entries (one per logical expert), got {load.numel()}")
        if self.expert_groups is not None and len(self.expert_groups) != E:
            raise InputError(f"routing.laser.expert_groups has {len(self.expert_groups)} entries for {E} experts")
        top_probs = gate.probs.gather(1, gate.experts)
        flat = (self.flat_tokens(gate.probs, gate.experts, top_probs) if widen > 0 and T > 0
                else torch.zeros(T, dtype=torch.bool))
        idx = flat.nonzero().squeeze(1)
        if idx.numel() == 0 or (self.balance_weight is None and self.mass_budget == 0):
            return apply_capacity(gate, capacity)
        on_host = gate.probs.device.type == "cpu"
        # The projected load: every token's top-k demand; swaps update it as they are taken.
        demand = (np.bincount(gate.experts.numpy().reshape(-1), minlength=E) if on_host
                  else torch.bincount(gate.experts.reshape(-1), minlength=E).cpu().numpy())
        load += torch.from_numpy(demand).to(load.dtype)
        budget = self.mass_budget * float(top_probs.sum(dtype=torch.float64))
        # Candidates in score order: the gate's top-k (best first), then the next best. Working on all rows
        # and then picking the flat ones is cheaper than gathering flat rows of [T, E] tensors.
        lowest, highest = (float(x) for x in torch.aminmax(gate.scores))
        cand = torch.cat([gate.experts, next_best(gate.scores, gate.experts, widen, signed=lowest < 0)], dim=1)
        mass = torch.cat([top_probs, gate.probs.gather(1, cand[:, k:])], dim=1)
        # a candidate with a masked (-inf) score is not usable; with every score finite, all are
        rows = [cand, mass]
        if not (math.isfinite(lowest) and math.isfinite(highest)):
            rows.append(torch.isfinite(gate.scores.gather(1, cand[:, k:])))
        if idx.numel() < T:
            rows = [t.index_select(0, idx) for t in rows]
        cand, mass = rows[:2]
        groups = np.arange(E) if self.expert_groups is None else np.array(self.expert_groups)
        group_load = np.bincount(groups, weights=load.numpy().astype(np.float64), minlength=int(groups.max()) + 1)
        top_mass = mass[:, :k].sum(dim=1, keepdim=True)  # [n, 1]
        group_ids = groups.astype(np.int16 if groups.max() < 2 ** 15 else np.int64)
        # the chunk steps run on the host: a gate output on an accelerator sends these in one copy
        cand_n, mass_n, top_mass_n, *flags = _host([cand, mass, top_mass, *rows[2:]], pack=not on_host)
        usable = flags[0] if flags and not flags[0].all() else None
        chosen = self._place(group_ids.take(cand_n), k, usable, mass_n, top_mass_n, group_load, budget)
        n, K = chosen.shape
        # k per row, ascending (best first); a token changed if its last one is past its top-k
        picks = np.flatnonzero(chosen)
        changed = picks[k - 1::k] - np.arange(0, n * K, K) >= k
        new_experts, picked_mass, changed = (torch.from_numpy(a).to(gate.probs.device) for a in (
            cand_n.reshape(-1).take(picks).reshape(n, k), mass_n.reshape(-1).take(picks).reshape(n, k),
            changed[:, None]))
        top_weights = gate.weights if idx.numel() == T else gate.weights.index_select(0, idx)
        new_weights = torch.where(changed, _renormalised(top_weights, top_mass, picked_mass), top_weights)
        if idx.numel() == T:
            experts, weights = new_experts, new_weights
        else:
            experts = gate.experts.index_copy(0, idx, new_experts)
            weights = gate.weights.index_copy(0, idx, new_weights)
        return apply_capacity(GateOutput(gate.logits, gate.scores, gate.probs, experts, weights), capacity)

    def _place(self, g: np.ndarray, k: int, usable: np.ndarray | None, mass: np.ndarray, top_mass: np.ndarray,
               load: np.ndarray, budget: float) -> np.ndarray:
        """[n, k + w] bool: which of its candidates (top-k, then the next w) each of n flat tokens uses.

        g [n, k + w]: the group (device) of each token's top-k and of its next w candidates (those usable
        where `usable` [n, w]; None: all are); mass [n, k + w]: their gate probs; top_mass [n, 1]: the top-k's
        sum; load [G] float64: projected load per group (updated in place); budget: gate mass the n tokens may
        give up. Chunk by chunk, each token's swap pairs (`_pairs`) are built from the loads so far and
        `_take_level` (budget) or `_take_priced` (price) picks among them. A token never gives up more than
        `max_mass_loss` of its top-k mass.
        """
        n, w = g.shape[0], g.shape[1] - k
        m = min(k, w)
        chosen = np.zeros(g.shape, dtype=bool)
        chosen[:, :k] = True
        if m == 0 or n == 0 or float(load.mean()) <= 0:
            return chosen
        guard = self.max_mass_loss * top_mass
        cells = _cells(g, k, usable, load.size)
        chunk_masses = np.add.reduceat(top_mass[:, 0].astype(np.float64), np.arange(0, n, self.chunk_tokens)).tolist()
        budget_left, mass_left = budget, sum(chunk_masses)
        ceiling = math.inf
        # Chunk by chunk: pairs from the loads so far, taken with the chunk's pro-rata share of the budget.
        for s, chunk_mass in zip(range(0, n, self.chunk_tokens), chunk_masses, strict=True):
            c = slice(s, s + self.chunk_tokens)
            share = budget_left * min(1.0, chunk_mass / max(mass_left, 1e-30))
            mass_left -= chunk_mass
            mean = float(load.mean())
            p = self._pairs(g[c], cells[c], k, None if usable is None else usable[c], mass[c], top_mass[c],
                            guard[c], load, mean, m)
            if self.balance_weight is None:
                # first chunk: the level the whole batch can reach, estimated from its pairs as a sample of the
                # batch's; no later chunk fills a destination above it (it would become the next peak)
                whole = (budget, n / p.cost.shape[0]) if s == 0 else None
                take, ceiling = _take_level(p, load, mean, share, ceiling, whole)
                take &= _cumsum(p.cost * take) <= guard[c]
            else:
                take = np.logical_and.accumulate(_take_priced(p, load, mean), axis=1)
            chunk = chosen[c].reshape(-1)  # a view
            chunk[p.in_flat] = ~take
            chunk[p.out_flat] = take
            moved = take.reshape(-1)
            load -= np.bincount(p.src.reshape(-1), weights=moved, minlength=load.size)
            load += np.bincount(p.dst.reshape(-1), weights=moved, minlength=load.size)
            budget_left -= float(p.cost.reshape(-1).astype(np.float64) @ moved)
        return chosen

    def _pairs(self, g: np.ndarray, cells: np.ndarray, k: int, usable: np.ndarray | None, mass: np.ndarray,
               top_mass: np.ndarray, guard: np.ndarray, load: np.ndarray, mean: float, m: int) -> _Pairs:
        """Each token's m swap pairs: its top-k (groups g[:, :k] of g [n, k + w]) by group load (load [G], mean
        load), busiest first, against its next candidates (g[:, k:], usable [n, w] or None) — with a budget
        those on groups below the mean in score order, with a fixed price the idlest first — and what each
        pair costs (gate probs mass [n, k + w]) and allows (guard, top_mass [n, 1]). Each side is ordered by
        small integer keys: its group's rank among the group loads (equal loads share a rank) then the
        column, as a stable sort of the loads orders it, looked up in one table by `cells` [n, k + w]
        ((G + 1) * column + group; group G: an unusable candidate)."""
        n, K = g.shape
        w = K - k
        rel = (load / mean).astype(np.float32)  # [G]
        G = rel.size
        busiest = np.searchsorted(np.sort(-rel), -rel)  # [G] 0 for the busiest
        if self.balance_weight is None:
            # usable candidates below the mean first, then the rest, each in score order (a stable partition)
            rank = np.append(~(rel < 1), 1)
        else:
            rank = np.append(np.searchsorted(np.sort(rel), rel), G)  # the idlest first
        # a key per candidate, side << 2 shift | group rank << shift | column (unique in a row), from one table;
        # one sort of each row's keys orders the top-k then the next candidates, and the low bits say where
        shift = max((max(k, w) - 1).bit_length(), (G + 1).bit_length())
        table = np.concatenate([(np.append(busiest, G) << shift) | np.arange(k)[:, None],
                                (1 << 2 * shift) | (rank << shift) | np.arange(w)[:, None]])
        table = table.astype(np.int32 if 2 * shift < 31 else np.int64)  # numpy sorts short int32 rows fastest
        ordered = np.sort(table.reshape(-1).take(cells), axis=1)
        low = table.dtype.type((1 << shift) - 1)
        in_pos, out_pos = ordered[:, :m] & low, ordered[:, k:k + m] & low
        row = np.arange(0, n * K, K)[:, None]
        in_flat, out_flat = row + in_pos, row + k + out_pos  # into the chunk's [n, k + w]
        src, dst = g.reshape(-1).take(in_flat), g.reshape(-1).take(out_flat)
        in_rel, out_rel = rel.take(src), rel.take(dst)
        cost = mass.reshape(-1).take(in_flat) - mass.reshape(-1).take(out_flat)
        price = None
        if self.balance_weight is None:
            # toward a less loaded group (in_rel > out_rel is in_rel - out_rel > 0 for these finite ratios)
            ok = (in_rel > out_rel) & (cost <= guard)
            if usable is not None:
                ok &= np.take_along_axis(usable, out_pos, axis=1)
        else:
            if usable is not None:
                out_rel = np.where(np.take_along_axis(usable, out_pos, axis=1), out_rel, np.float32(math.inf))
            gap = in_rel - out_rel
            unit = top_mass / np.float32(k)  # the token's average top-k expert mass
            with np.errstate(divide="ignore", invalid="ignore"):
                price = np.where(gap > 0, np.maximum(cost, np.float32(0)) / (unit * np.maximum(gap, np.float32(1e-12))),
                                 np.float32(math.inf))
            price = np.maximum.accumulate(price, axis=1)  # pair j only after pairs 1..j-1
            ok = np.logical_and.accumulate((_cumsum(cost) <= guard) & (price <= np.float32(self.balance_weight)),
                                           axis=1)
        return _Pairs(in_flat, out_flat, cost, src, dst, ok, price)


def _cells(g: np.ndarray, k: int, usable: np.ndarray | None, G: int) -> np.ndarray:
    """[n, k + w] int64: each candidate's cell in `_pairs`' key table [k + w, G + 1], (G + 1) * column + its
    group (g [n, k + w]); a candidate not usable (usable [n, w] False) in the extra group G."""
    cells = np.add(g, (G + 1) * np.arange(g.shape[1]), dtype=np.int64)
    if usable is not None:
        cells[:, k:] += np.where(usable, 0, G - g[:, k:])
    return cells


@dataclass(frozen=True)
class _Pairs:
    """m swap pairs of n tokens, all [n, m] numpy arrays: flat positions (into the chunk's [n, k + w]) of the top-k
    expert given up and of the candidate taken, mass given up (float32), source and destination
    groups, eligibility, price (fixed-price mode only)."""

    in_flat: np.ndarray
    out_flat: np.ndarray
    cost: np.ndarray
    src: np.ndarray
    dst: np.ndarray
    ok: np.ndarray
    price: np.ndarray | None


def _host(tensors: list[torch.Tensor], pack: bool) -> list[np.ndarray]:
    """numpy arrays of 2-D tensors [n, *] with one row count: views of CPU tensors, or (`pack`) one
    device-to-host copy of all of them side by side as float64 (exact for gate probs, expert ids, flags)."""
    if not pack:
        return [t.numpy() for t in tensors]
    packed = torch.cat([t.to(torch.float64) for t in tensors], dim=1).cpu().numpy()
    ends = np.cumsum([t.shape[1] for t in tensors])
    return [packed[:, end - t.shape[1]:end].astype(torch.empty(0, dtype=t.dtype).numpy().dtype)
            for t, end in zip(tensors, ends, strict=True)]


def _cumsum(x: np.ndarray) -> np.ndarray:
    """Row cumsum of float32 x [n, m] as torch computes it (a float64 running sum, each rounded to float32),
    column by column: numpy's cumsum along short rows costs several times more."""
    out = np.empty(x.shape, dtype=np.float32)
    running = np.zeros(x.shape[0])
    for j in range(x.shape[1]):
        running = running + x[:, j]
        out[:, j] = running
    return out


def _take_priced(p: _Pairs, load: np.ndarray, mean: float) -> np.ndarray:
    """[n, m] bool: the eligible pairs of p taken in ascending price while no group passes the mean load
    (load [G]). Only pairs from a group above the mean to one below it can pass the caps."""
    excess = (load - mean).astype(np.float32)
    src, dst = p.src.reshape(-1), p.dst.reshape(-1)
    take = np.zeros(src.size, dtype=bool)
    pairs = np.flatnonzero(p.ok.reshape(-1) & (excess.take(src) >= 1) & (excess.take(dst) <= -1))
    if pairs.size:
        order = pairs.take(np.argsort(p.price.reshape(-1).take(pairs), kind="stable"))
        src_o, dst_o = src.take(order), dst.take(order)
        useful = _rank_within_np(src_o) < excess.take(src_o)
        # a pair its source cap rejects takes no room at its destination (they all share the id -1 there)
        take[order] = useful & (_rank_within_np(np.where(useful, dst_o, -1)) < -excess.take(dst_o))
    return take.reshape(p.ok.shape)


def _take_level(p: _Pairs, load: np.ndarray, mean: float, budget: float, ceiling: float = math.inf,
                whole: tuple[float, float] | None = None) -> tuple[np.ndarray, float]:
    """([n, m] bool, ceiling): the eligible pairs of p that bring every group down to the lowest level the
    budget pays for: each group above the level gives up its cheapest ceil(load - level) pairs (to a less
    loaded group). The level is the lowest of 257 between the mean and the peak of load [G] that fits;
    destinations take pairs while they stay at or below both the level and `ceiling` (the level the whole
    batch can reach, so a chunk does not fill a destination that later chunks must bring down again). With
    `whole` = (batch budget, s) the ceiling is first found from these pairs standing for s times as many (a
    sample of the batch's), from the same sorted pairs; the ceiling used is returned."""
    G = load.size
    src_n, dst_n = p.src.reshape(-1), p.dst.reshape(-1)
    cost_n = np.maximum(p.cost.reshape(-1), np.float32(0))
    take = np.zeros(src_n.size, dtype=bool)
    pairs = np.flatnonzero(p.ok.reshape(-1) & (load.take(src_n) >= mean + 1))
    if pairs.size == 0:
        return take.reshape(p.ok.shape), (mean if whole is not None else ceiling)
    # by group, then cheapest (the cost's float bits order like the cost: it is >= 0)
    order = _sort_by_group_then_cost(pairs, src_n, cost_n)
    src_o, dst_o = src_n.take(order), dst_n.take(order)
    available = np.bincount(src_o, minlength=G)
    start = available.cumsum() - available
    spent = np.zeros(order.size + 1)
    np.cumsum(cost_n.take(order), dtype=np.float64, out=spent[1:])
    receives = np.zeros(G, dtype=bool)
    receives[dst_o] = True
    # On a grid of levels [P] from the mean to the peak: pairs each source group (one with pairs) gives up
    # [S, P], what they cost, and what the destination groups [D] can absorb below the level. Both tests hold
    # from some level up (the peak passes). The other groups add nothing to the sums.
    peak = float(load.max())
    levels = mean + (peak - mean) * _GRID
    levels[-1] = peak  # exactly, so the last level always fits
    sources = np.flatnonzero(available)
    excess = np.maximum(np.ceil(load.take(sources)[:, None] - levels), 0)
    base, first_pair = spent.take(start.take(sources))[:, None], start.take(sources)[:, None]
    available_s = available.take(sources)[:, None]
    available_f = available_s.astype(np.float32)
    below = np.sort(load[receives])  # the destinations' loads, and the sums of their lowest
    below_sums = np.concatenate([[0.0], np.cumsum(below)])

    def level(budget: float, ceiling: float, scale: float) -> tuple[float, np.ndarray]:
        """The lowest fitting level and the [G] pairs each group gives up there."""
        if scale == 1:  # the chunk's own pairs: whole moves, each of one pair
            moves = np.minimum(excess, available_f)
            sampled = moves.astype(np.int64)
        else:
            moves = np.minimum(excess, available_f * np.float32(scale))  # float32 products
            sampled = np.minimum(np.ceil(moves / scale).astype(np.int64), available_s)  # the sample's cheapest
        spend = (spent.take(first_pair + sampled) - base).sum(axis=0)
        capped = np.minimum(levels, ceiling)
        under = np.searchsorted(below, capped)  # destinations below each level: room = sum of level - load
        room = under * capped - below_sums.take(under)
        first = int(((spend * scale <= budget) & (moves.sum(axis=0) <= room)).argmax())
        per_group = np.zeros(G, dtype=np.int64)
        per_group[sources] = sampled[:, first]
        return float(levels[first]), per_group

    if whole is not None:
        ceiling = level(whole[0], math.inf, whole[1])[0]
    at, sampled = level(budget, ceiling, 1.0)
    # each source's cheapest `sampled`, then per destination the first of those its room below the level allows
    sel = np.flatnonzero((np.arange(order.size) - start.take(src_o)) < sampled.take(src_o))
    dst_sel = dst_o.take(sel)
    take[order.take(sel[_rank_within_np(dst_sel) < min(at, ceiling) - load.take(dst_sel)])] = True
    return take.reshape(p.ok.shape), ceiling


def _sort_by_group_then_cost(pairs: np.ndarray, group: np.ndarray, cost: np.ndarray) -> np.ndarray:
    """`pairs` (indices into group [N] and cost [N] float32 >= 0) ordered by group, then cost, then position:
    three stable 16-bit passes (numpy radix-sorts 16-bit keys) on the cost's low and high halves, then the
    group. A comparison sort of one 64-bit key does the same with many mispredicted branches."""
    bits = cost.view(np.uint32)
    order = pairs.take(np.argsort((bits.take(pairs) & 0xFFFF).astype(np.uint16), kind="stable"))
    order = order.take(np.argsort((bits.take(order) >> 16).astype(np.uint16), kind="stable"))
    return order.take(_stable_argsort(group.take(order)))


def _stable_argsort(ids: np.ndarray) -> np.ndarray:
    """Stable argsort of small integer ids (>= -1): through an int16 copy when they fit, which numpy radix-sorts."""
    return np.argsort(ids.astype(np.int16) if ids.size and ids.max() < 2 ** 15 else ids, kind="stable")


def _rank_within_np(ids: np.ndarray) -> np.ndarray:
    """[N] for each entry of ids [N] (small ints), how many earlier entries have the same id."""
    order = _stable_argsort(ids)
    sorted_ids = ids.take(order)
    first = np.arange(ids.size)
    new = np.ones(ids.size, dtype=bool)
    new[1:] = sorted_ids[1:] != sorted_ids[:-1]
    start = np.maximum.accumulate(np.where(new, first, 0))
    out = np.empty_like(first)
    out[order] = first - start
    return out


def next_best(scores: torch.Tensor, exclude: torch.Tensor, n: int, signed: bool = True) -> torch.Tensor:
    """[T, n] the n best-scoring experts per token outside `exclude` [T, k], best first (scores [T, E]; `signed`:
    some may be negative).

    torch.topk is slow on short CPU rows, so each step takes one max over keys that pack the score's
    order-preserving int32 bits with the expert id in the low bits; scores within 2^-(23 - log2 E) of each
    other count as ties (broken towards the lower id).
    """
    E = scores.shape[1]
    bits = max(1, (E - 1).bit_length())
    raw = scores.contiguous().view(torch.int32)
    if signed:  # negative floats order backwards as ints: flip their magnitude bits
        raw = raw ^ ((raw >> 31) & 0x7FFFFFFF)
    low = (1 << bits) - 1
    keys = (raw & ~low).bitwise_or_(E - 1 - torch.arange(E, dtype=torch.int32, device=scores.device))
    flat, lowest = keys.view(-1), torch.iinfo(torch.int32).min
    row_start = torch.arange(0, keys.numel(), E, device=scores.device)
    flat.index_fill_(0, (row_start[:, None] + exclude).view(-1), lowest)  # cheaper than scatter_ on CPU
    out = torch.empty(n, scores.shape[0], dtype=torch.int32, device=scores.device)
    for j in range(n):
        torch.sub(E - 1, keys.amax(dim=1).bitwise_and_(low), out=out[j])
        flat.index_fill_(0, row_start + out[j], lowest)
    return out.T.long()


def _renormalised(weights: torch.Tensor, top_mass: torch.Tensor, picked_mass: torch.Tensor) -> torch.Tensor:
    """Combine weights [n, k] for picked experts with gate probs `picked_mass` [n, k], normalised the way the
    gate normalised its own top-k (weights [n, k], the sum of their gate probs `top_mass` [n, 1]).

    A family that renormalises its top-k (Mixtral, DeepSeek-V3 with scaling, GPT-OSS) gives weights whose
    per-token sum differs from the probs' sum; then the picked probs are scaled to the same per-token sum.
    """
    w_sum = weights.sum(dim=1, keepdim=True)
    renormalises = (w_sum - top_mass).abs() > 1e-5 * w_sum.abs().clamp_min(1e-12)
    if not bool(renormalises.any()):  # e.g. OLMoE: the weights are the probs
        return picked_mass
    scaled = picked_mass * (w_sum / picked_mass.sum(dim=1, keepdim=True).clamp_min(1e-30))
    return torch.where(renormalises, scaled, picked_mass)
