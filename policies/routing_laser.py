"""`laser`: score-distribution-adaptive, load-aware routing (LASER-style).

A token whose gate distribution is peaked keeps its top-k: swapping would cost real gate mass. A token with
a flat distribution chooses k of its top-(k + widen) experts, trading gate mass for load at a fixed price
(`balance_weight`) and never giving up more than `max_mass_loss` of its top-k gate mass. Flat tokens are
placed greedily in chunks against the live load (the caller's prior plus this batch's assignments so far).
Capacity is then applied to the new choice exactly as `apply_capacity` would.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from expertray.capacity import CapacityResult, apply_capacity
from expertray.config import CapacityConfig
from expertray.errors import ConfigError, InputError
from expertray.gating import GateOutput
from expertray.policies.routing import ROUTING, RoutingPolicy

_SCALARS = ("mass_threshold", "entropy_threshold", "widen", "balance_weight", "max_mass_loss", "chunk_tokens")


@ROUTING.register("laser")
@dataclass(frozen=True)
class LaserRouting(RoutingPolicy):
    """Parameters.

    mass_threshold: a token is peaked if its top-k experts hold at least this share of its gate mass.
    entropy_threshold: ... or if its gate distribution's entropy / log(E) is at most this (-1 disables).
    widen: flat tokens choose among their top-(k + widen) experts.
    balance_weight: the price of load: gate mass (in units of the token's average top-k expert mass) a
        token gives up to move off an expert loaded one mean load above average. Larger balances harder
        and keeps less mass; the unit makes one price fit both many small experts and few large ones.
    max_mass_loss: a token never gives up more than this fraction of its top-k gate mass.
    chunk_tokens: flat tokens are placed greedily in chunks of this size; the load is refreshed between
        chunks, so smaller chunks balance better and cost more.
    layer_overrides: {layer: {parameter: value}} for layers that need other thresholds (see `for_layer`).
    expert_groups: optional [E] device (or any group) of each logical expert: load is then priced per group,
        so flat tokens move toward experts on lightly loaded devices, not just lightly loaded experts.
    device_aware: in the runtime, the router fills `expert_groups` from the live placement table.
    """

    mass_threshold: float = 0.6
    entropy_threshold: float = -1.0
    widen: int = 4
    balance_weight: float = 0.12
    max_mass_loss: float = 0.1
    chunk_tokens: int = 1024
    layer_overrides: Mapping[int, Mapping[str, Any]] = field(default_factory=dict)
    expert_groups: tuple[int, ...] | None = None
    device_aware: bool = False

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, msg: str) -> None:
            if not ok:
                raise ConfigError(f"routing.laser.{name}: {msg}")

        need(math.isfinite(self.mass_threshold), "mass_threshold", f"must be finite, got {self.mass_threshold}")
        need(math.isfinite(self.entropy_threshold), "entropy_threshold",
             f"must be finite, got {self.entropy_threshold}")
        need(self.widen >= 0, "widen", f"must be >= 0, got {self.widen}")
        need(math.isfinite(self.balance_weight) and self.balance_weight >= 0, "balance_weight",
             f"must be >= 0, got {self.balance_weight}")
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
        if idx.numel() == 0:
            return apply_capacity(gate, capacity)
        # Peaked tokens keep their choice whatever the load, so their load is committed before flat tokens
        # are placed around it.
        load += torch.bincount(gate.experts[~flat].reshape(-1), minlength=E).to(load.dtype)
        # Candidates in score order: the gate's top-k (best first), then the next best. Working on all rows
        # and then picking the flat ones is cheaper than gathering flat rows of [T, E] tensors.
        cand = torch.cat([gate.experts, next_best(gate.scores, gate.experts, widen)], dim=1)
        usable = torch.isfinite(gate.scores.gather(1, cand[:, k:]))[idx]
        mass = gate.probs.gather(1, cand)[idx]
        cand = cand[idx]
        chosen = self._place(cand, usable, mass, k, load)
        pos = _first_true(chosen, k)  # ascending positions keep the choice best first
        changed = chosen[:, k:].any(dim=1, keepdim=True)
        top_weights = gate.weights[idx]
        new_weights = _renormalised(top_weights, mass[:, :k], mass.gather(1, pos))
        experts, weights = gate.experts.clone(), gate.weights.clone()
        experts[idx] = cand.gather(1, pos)
        weights[idx] = torch.where(changed, new_weights, top_weights)
        return apply_capacity(GateOutput(gate.logits, gate.scores, gate.probs, experts, weights), capacity)

    def _place(self, cand: torch.Tensor, out_usable: torch.Tensor, mass: torch.Tensor, k: int,
               load: torch.Tensor) -> torch.Tensor:
        """[n, k + w] bool: which of its candidates each of n flat tokens uses; updates `load` [E] in place.

        cand [n, k + w]: each token's top-k, then its next w candidates (usable where `out_usable` [n, w]);
        mass [n, k + w]: their gate probs. Each token keeps the k candidates with the best value
        mass / (top-k mass / k) - balance_weight * (load / mean load - 1): its top-k sorted worst first is paired
        with its other candidates sorted best first, and the first m pairs swap, m being the longest prefix
        of pairs that raise the value and keep the accumulated mass loss within the token's budget.
        """
        m = min(k, cand.shape[1] - k)
        top_mass = mass[:, :k].sum(dim=1, keepdim=True)
        budget = self.max_mass_loss * top_mass
        share = mass * (k / top_mass.clamp_min(1e-30))  # 1.0 = the token's average top-k expert
        chosen = torch.zeros(cand.shape, dtype=torch.bool)
        chosen[:, :k] = True
        groups = None if self.expert_groups is None else torch.tensor(self.expert_groups, dtype=torch.long)
        for s in range(0, cand.shape[0], self.chunk_tokens):
            c = slice(s, s + self.chunk_tokens)
            priced = load if groups is None else torch.zeros(int(groups.max()) + 1).index_add_(0, groups, load)[groups]
            mean = priced.mean().clamp_min(1e-9)
            cand_load = priced.index_select(0, cand[c].reshape(-1)).view(-1, cand.shape[1])
            value = share[c] - self.balance_weight * (cand_load / mean - 1.0)
            in_value, in_pos = value[:, :k].sort(dim=1)
            out_value, out_pos = value[:, k:].masked_fill(~out_usable[c], float("-inf")).sort(dim=1, descending=True)
            in_pos, out_pos = in_pos[:, :m], out_pos[:, :m] + k
            better = out_value[:, :m] > in_value[:, :m]  # true on a prefix: in rises, out falls
            loss = mass[c].gather(1, in_pos) - mass[c].gather(1, out_pos)
            swap = (better & (torch.cumsum(loss, dim=1) <= budget[c])).cumprod(dim=1).bool()
            sel = chosen[c]
            sel.scatter_(1, in_pos, ~swap)
            sel.scatter_(1, out_pos, swap)
            load.index_add_(0, cand[c].reshape(-1), sel.reshape(-1).to(load.dtype))
        return chosen


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
