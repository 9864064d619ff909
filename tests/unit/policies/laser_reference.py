"""Reference (test only): `laser` routing as it was before its chunk steps moved to numpy, kept verbatim so
tests can pin the current implementation to its decisions bit for bit. One change: `_take_level` caps the
sampled pairs at those available (float rounding of moves / scale could index past them and raise).

Original docstring: `laser`: score-distribution-adaptive, load-aware routing (LASER-style) under a gate-mass budget.

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
k chosen, w = widen, G groups (devices).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from expertray.config import CapacityConfig
from expertray.errors import ConfigError, InputError, require
from expertray.layer.capacity import CapacityResult, apply_capacity
from expertray.layer.gating import GateOutput
from expertray.policies.routing import RoutingPolicy
from expertray.state.placement_table import LayerRoute

_SCALARS = ("mass_threshold", "entropy_threshold", "widen", "mass_budget", "balance_weight", "max_mass_loss",
            "chunk_tokens")


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

    def flat_tokens(self, probs: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """[T] bool: tokens whose gate distribution (probs [T, E], top-k experts [T, k]) is not peaked."""
        dist = probs / probs.sum(dim=1, keepdim=True).clamp_min(1e-30)
        peaked = dist.gather(1, experts).sum(dim=1) >= self.mass_threshold
        if self.entropy_threshold >= 0:
            entropy = -torch.special.xlogy(dist, dist).sum(dim=1) / math.log(probs.shape[1])
            peaked |= entropy <= self.entropy_threshold
        return ~peaked

    def route(self, gate: GateOutput, capacity: CapacityConfig,
              expert_load: torch.Tensor | None = None) -> CapacityResult:
        T, k = gate.experts.shape
        E = gate.probs.shape[1]
        widen = min(self.widen, E - k)
        load = torch.zeros(E) if expert_load is None else expert_load.reshape(-1).to(torch.float32).clone()
        if load.numel() != E:
            raise InputError(f"expert_load must have {E} entries (one per logical expert), got {load.numel()}")
        if self.expert_groups is not None and len(self.expert_groups) != E:
            raise InputError(f"routing.laser.expert_groups has {len(self.expert_groups)} entries for {E} experts")
        flat = self.flat_tokens(gate.probs, gate.experts) if widen > 0 and T > 0 else torch.zeros(T, dtype=torch.bool)
        idx = flat.nonzero().squeeze(1)
        if idx.numel() == 0 or (self.balance_weight is None and self.mass_budget == 0):
            return apply_capacity(gate, capacity)
        # The projected load: every token's top-k demand; swaps update it as they are taken.
        load += torch.bincount(gate.experts.reshape(-1), minlength=E).to(load.dtype)
        top_probs = gate.probs.gather(1, gate.experts)
        budget = self.mass_budget * float(top_probs.sum(dtype=torch.float64))
        # Candidates in score order: the gate's top-k (best first), then the next best. Working on all rows
        # and then picking the flat ones is cheaper than gathering flat rows of [T, E] tensors.
        cand = torch.cat([gate.experts, next_best(gate.scores, gate.experts, widen)], dim=1)
        usable = torch.isfinite(gate.scores.gather(1, cand[:, k:]))
        mass = torch.cat([top_probs, gate.probs.gather(1, cand[:, k:])], dim=1)
        if idx.numel() < T:
            usable, mass, cand = usable[idx], mass[idx], cand[idx]
        groups = torch.arange(E) if self.expert_groups is None else torch.tensor(self.expert_groups, dtype=torch.long)
        chosen = self._place(cand, usable, mass, k, load, groups, budget)
        pos = _first_true(chosen, k)  # ascending positions keep the choice best first
        changed = chosen[:, k:].any(dim=1, keepdim=True)
        top_weights = gate.weights if idx.numel() == T else gate.weights[idx]
        new_weights = torch.where(changed, _renormalised(top_weights, mass[:, :k], mass.gather(1, pos)), top_weights)
        if idx.numel() == T:
            experts, weights = cand.gather(1, pos), new_weights
        else:
            experts, weights = gate.experts.clone(), gate.weights.clone()
            experts[idx] = cand.gather(1, pos)
            weights[idx] = new_weights
        return apply_capacity(GateOutput(gate.logits, gate.scores, gate.probs, experts, weights), capacity)

    def _place(self, cand: torch.Tensor, out_usable: torch.Tensor, mass: torch.Tensor, k: int, load: torch.Tensor,
               groups: torch.Tensor, budget: float) -> torch.Tensor:
        """[n, k + w] bool: which of its candidates each of n flat tokens uses.

        cand [n, k + w]: each token's top-k, then its next w candidates (usable where `out_usable` [n, w]);
        mass [n, k + w]: their gate probs; load [E]: projected load per expert; groups [E]: group (device) of
        each expert, load is priced per group; budget: gate mass the n tokens may give up in all.
        Chunk by chunk, each token's swap pairs (`_pairs`) are built from the loads so far and `_take_level`
        (budget) or `_take_priced` (price) picks among them. A token never gives up more than
        `max_mass_loss` of its top-k mass.
        """
        n, K = cand.shape
        m = min(k, K - k)
        chosen = torch.zeros(n, K, dtype=torch.bool)
        chosen[:, :k] = True
        group_load = torch.zeros(int(groups.max()) + 1, dtype=torch.float64).index_add_(0, groups, load.double())
        mean = float(group_load.mean())
        if m == 0 or n == 0 or mean <= 0:
            return chosen
        top_mass = mass[:, :k].sum(dim=1, keepdim=True)
        guard = self.max_mass_loss * top_mass
        g = _lookup(groups, cand)
        chunk_masses = torch.zeros(-(-n // self.chunk_tokens), dtype=torch.float64).index_add_(
            0, torch.arange(n) // self.chunk_tokens, top_mass.squeeze(1).double()).tolist()
        budget_left, mass_left = budget, sum(chunk_masses)
        ceiling = math.inf
        # Chunk by chunk: pairs from the loads so far, taken with the chunk's pro-rata share of the budget.
        for s, chunk_mass in zip(range(0, n, self.chunk_tokens), chunk_masses, strict=True):
            c = slice(s, s + self.chunk_tokens)
            share = budget_left * min(1.0, chunk_mass / max(mass_left, 1e-30))
            mass_left -= chunk_mass
            mean = float(group_load.mean())
            p = self._pairs(g[c], out_usable[c], mass[c], guard[c], group_load, k, m)
            if self.balance_weight is None and s == 0:
                # the level the whole batch can reach, estimated from the first chunk's pairs as a sample of
                # the batch's; no later chunk fills a destination above it (it would become the next peak)
                scale = n / p.cost.shape[0]
                ceiling = _take_level(p.cost, p.ok, p.src, p.dst, group_load, mean, budget, scale=scale)[1]
            if self.balance_weight is None:
                take = _take_level(p.cost, p.ok, p.src, p.dst, group_load, mean, share, ceiling)[0]
                take &= (p.cost * take).cumsum(dim=1) <= guard[c]
            else:
                take = _take_priced(p.price, p.ok, p.src, p.dst, group_load, mean).cumprod(dim=1).bool()
            sel = chosen[c]
            sel.scatter_(1, p.in_pos, ~take)
            sel.scatter_(1, p.out_pos, take)
            moved = take.reshape(-1).to(torch.float64)
            group_load.index_add_(0, p.src.reshape(-1), -moved).index_add_(0, p.dst.reshape(-1), moved)
            budget_left -= float((p.cost.reshape(-1) * moved).sum())
        return chosen

    def _pairs(self, g: torch.Tensor, out_usable: torch.Tensor, mass: torch.Tensor, guard: torch.Tensor,
               group_load: torch.Tensor, k: int, m: int) -> _Pairs:
        """Each token's m swap pairs: its top-k by group load (g [n, k + w] groups, group_load [G]), busiest
        first, against its other candidates — with a budget those on groups below the mean in score order,
        with a fixed price the idlest first — and what each pair costs (mass [n, k + w]) and allows."""
        n, K = g.shape
        rel = _lookup((group_load / group_load.mean()).to(torch.float32), g)
        in_rel, in_pos = rel[:, :k].sort(dim=1, descending=True)
        if self.balance_weight is None:
            order = torch.arange(K - k).expand(n, K - k)
            out_pos = torch.where(out_usable & (rel[:, k:] < 1), order, K + order).sort(dim=1).indices
            out_rel = rel[:, k:].gather(1, out_pos).masked_fill(~out_usable.gather(1, out_pos), math.inf)
        else:
            out_rel, out_pos = rel[:, k:].masked_fill(~out_usable, math.inf).sort(dim=1)
        in_pos, out_pos, gap = in_pos[:, :m], out_pos[:, :m] + k, in_rel[:, :m] - out_rel[:, :m]
        cost = mass.gather(1, in_pos) - mass.gather(1, out_pos)
        price = None
        if self.balance_weight is None:
            ok = (gap > 0) & (cost <= guard)
        else:
            unit = mass[:, :k].sum(dim=1, keepdim=True) / k  # the token's average top-k expert mass
            price = torch.where(gap > 0, cost.clamp_min(0) / (unit * gap.clamp_min(1e-12)), math.inf)
            price = price.cummax(dim=1).values  # pair j only after pairs 1..j-1
            ok = ((cost.cumsum(dim=1) <= guard) & (price <= self.balance_weight)).cumprod(dim=1).bool()
        return _Pairs(in_pos, out_pos, cost, g.gather(1, in_pos), g.gather(1, out_pos), ok, price)


@dataclass(frozen=True)
class _Pairs:
    """m swap pairs of n tokens, all [n, m]: positions (into the k + w candidates) of the top-k expert given
    up and of the one taken, mass given up, source and destination groups, eligibility, price (fixed-price
    mode only)."""

    in_pos: torch.Tensor
    out_pos: torch.Tensor
    cost: torch.Tensor
    src: torch.Tensor
    dst: torch.Tensor
    ok: torch.Tensor
    price: torch.Tensor | None


def _candidate_pairs(ok: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, excess: torch.Tensor) -> torch.Tensor:
    """Flat indices of the eligible pairs (ok [n, m]) from a group above the mean to one below it
    (excess [G]: group load minus the mean; src / dst [n, m] groups): no other pair can pass the caps."""
    return (ok.reshape(-1) & (excess[src.reshape(-1)] >= 1) & (excess[dst.reshape(-1)] <= -1)).nonzero().squeeze(1)


def _take_priced(price: torch.Tensor, ok: torch.Tensor, src: torch.Tensor, dst: torch.Tensor,
                 group_load: torch.Tensor, mean: float) -> torch.Tensor:
    """[n, m] bool: the eligible pairs (ok; price, source / destination group, all [n, m]) taken in ascending
    price while no group passes the mean load (group_load [G])."""
    excess = (group_load - mean).to(torch.float32)
    take = torch.zeros(ok.numel(), dtype=torch.bool)
    pairs = _candidate_pairs(ok, src, dst, excess)
    if pairs.numel():
        order = pairs[price.reshape(-1)[pairs].sort(stable=True).indices]
        src_o, dst_o = src.reshape(-1)[order], dst.reshape(-1)[order]
        useful = _rank_within(src_o) < excess[src_o]
        # a pair its source cap rejects takes no room at its destination (they all share the id -1 there)
        take[order] = useful & (_rank_within(torch.where(useful, dst_o, -1)) < -excess[dst_o])
    return take.view_as(ok)


def _take_level(cost: torch.Tensor, ok: torch.Tensor, src: torch.Tensor, dst: torch.Tensor,
                group_load: torch.Tensor, mean: float, budget: float, ceiling: float = math.inf,
                scale: float = 1.0) -> tuple[torch.Tensor, float]:
    """([n, m] bool, level): the eligible pairs (ok; mass cost, source / destination group, all [n, m]) that
    bring every group down to the lowest level the budget pays for: each group above the level gives up its
    cheapest ceil(load - level) pairs (to a less loaded group). The level is the lowest of 257 between the
    mean and the peak of group_load [G] that fits; destinations take pairs while they stay at or below both
    the level and `ceiling` (the level the whole batch can reach, so a chunk does not fill a destination that
    later chunks must bring down again). With `scale` s > 1 the pairs stand for s times as many (a sample):
    only the level is meaningful then."""
    take = torch.zeros(ok.numel(), dtype=torch.bool)
    src, dst, cost = src.reshape(-1), dst.reshape(-1), cost.reshape(-1).clamp_min(0)
    pairs = (ok.reshape(-1) & (_lookup(group_load, src) >= mean + 1)).nonzero().squeeze(1)
    if pairs.numel() == 0:
        return take.view_as(ok), mean
    key = (_lookup(src, pairs) << 32) | _lookup(cost, pairs).view(torch.int32).long()  # by group, then cheapest
    order = _lookup(pairs, key.sort().indices)
    src_o, dst_o = _lookup(src, order), _lookup(dst, order)
    available = torch.bincount(src_o, minlength=group_load.numel())
    start = available.cumsum(0) - available
    spent = torch.cat([torch.zeros(1, dtype=torch.float64), _lookup(cost, order).double().cumsum(0)])
    receives = torch.zeros(group_load.numel(), dtype=torch.float64).index_fill_(0, dst_o, 1.0)
    # On a grid of levels [P] from the mean to the peak: pairs each group gives up [P, G], what they cost and
    # what the destinations can absorb below the level. Both tests hold from some level up (the peak passes).
    levels = torch.linspace(mean, float(group_load.max()), 257, dtype=torch.float64).unsqueeze(1)
    moves = torch.minimum((group_load - levels).ceil().clamp_min(0), available * scale)
    sampled = (moves / scale).ceil().long().minimum(available)  # the sample's cheapest pairs standing for them
    room = ((levels.clamp_max(ceiling) - group_load).clamp_min(0) * receives).sum(dim=1)
    fits = ((_lookup(spent, start + sampled) - _lookup(spent, start)).sum(dim=1) * scale <= budget) \
        & (moves.sum(dim=1) <= room)
    first = int(fits.to(torch.int8).argmax())
    level = float(levels[first])
    sel = (torch.arange(order.numel()) - _lookup(start, src_o)) < _lookup(sampled[first], src_o)
    room_left = min(level, ceiling) - _lookup(group_load, dst_o)
    take.index_copy_(0, order, sel & (_rank_within(torch.where(sel, dst_o, -1)) < room_left))
    return take.view_as(ok), level


def _lookup(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """values[index] for 1-D values and an index of any shape (index_select: much cheaper on CPU than
    advanced indexing for the small tensors here)."""
    return values.index_select(0, index.reshape(-1)).view(index.shape)


def _rank_within(ids: torch.Tensor) -> torch.Tensor:
    """[N] for each entry of ids [N], how many earlier entries have the same id."""
    sorted_ids, order = ids.sort(stable=True)
    first = torch.arange(ids.numel())
    new = torch.ones(ids.numel(), dtype=torch.bool)
    new[1:] = sorted_ids[1:] != sorted_ids[:-1]
    start = torch.where(new, first, 0).cummax(0).values
    return torch.empty_like(first).scatter_(0, order, first - start)


def _first_true(mask: torch.Tensor, k: int) -> torch.Tensor:
    """[n, k] positions of the k True entries of each row of mask [n, K], ascending."""
    n, K = mask.shape
    dest = torch.where(mask, mask.cumsum(dim=1) - 1, k)  # column k collects the False entries
    out = torch.empty(n, k + 1, dtype=torch.long)
    return out.scatter_(1, dest, torch.arange(K).expand(n, K))[:, :k]


def next_best(scores: torch.Tensor, exclude: torch.Tensor, n: int) -> torch.Tensor:
    """[T, n] the n best-scoring experts per token outside `exclude` [T, k], best first (scores [T, E]).

    torch.topk is slow on short CPU rows, so each step takes one max over keys that pack the score's
    order-preserving int32 bits with the expert id in the low bits; scores within 2^-(23 - log2 E) of each
    other count as ties (broken towards the lower id).
    """
    E = scores.shape[1]
    bits = max(1, (E - 1).bit_length())
    raw = scores.contiguous().view(torch.int32)
    if float(scores.amin()) < 0:  # negative floats order backwards as ints: flip their magnitude bits
        raw = raw ^ ((raw >> 31) & 0x7FFFFFFF)
    low = (1 << bits) - 1
    keys = (raw & ~low) | (E - 1 - torch.arange(E, dtype=torch.int32))
    keys = keys.scatter(1, exclude, torch.iinfo(torch.int32).min)
    out = torch.empty(scores.shape[0], n, dtype=torch.long)
    for j in range(n):
        best = keys.amax(dim=1, keepdim=True)
        out[:, j:j + 1] = (E - 1) - (best & low).long()
        keys.scatter_(1, out[:, j:j + 1], torch.iinfo(torch.int32).min)
    return out


def _renormalised(weights: torch.Tensor, top_mass: torch.Tensor, picked_mass: torch.Tensor) -> torch.Tensor:
    """Combine weights [n, k] for picked experts with gate probs `picked_mass` [n, k], normalised the way the
    gate normalised its own top-k (weights [n, k], gate probs `top_mass` [n, k]).

    A family that renormalises its top-k (Mixtral, DeepSeek-V3 with scaling, GPT-OSS) gives weights whose
    per-token sum differs from the probs' sum; then the picked probs are scaled to the same per-token sum.
    """
    w_sum = weights.sum(dim=1, keepdim=True)
    renormalises = (w_sum - top_mass.sum(dim=1, keepdim=True)).abs() > 1e-5 * w_sum.abs().clamp_min(1e-12)
    scaled = picked_mass * (w_sum / picked_mass.sum(dim=1, keepdim=True).clamp_min(1e-30))
    return torch.where(renormalises, scaled, picked_mass)
