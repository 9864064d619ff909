"""`balanced`: replicate hot experts and pack replicas so that the busiest device carries as little as possible.

Per layer, on D devices of c slots (budget and load model: see placement.py), two constructions compete and
the plan with the lower peak device load wins:

1. Home nodes (the hierarchy): experts, heaviest first, each go to the node with the least load per device
   that has a slot left (LPT).
2. Target search (counts and packing chosen together): bisection on a per-device target T. For one T,
   experts (heaviest first) get the fewest replicas r whose share load / r fits on r distinct devices with a
   free slot and room under T, keeping a slot for every expert still to place; the r devices are taken from
   the home node first (spilling to other nodes only when they do not fit there), then best fit.
3. Count first (EPLB's hierarchical order): per node, its home experts fill every slot, each extra replica
   going to the expert with the max per-replica load (a heap); replicas are then packed heaviest first onto
   the least-loaded device of the node that lacks the expert. Strong when slots are plentiful, weak when a
   device holds few: for loads [600, 560, 120, 120, 20, 10, 10, 10] on 8 devices x 2 slots the heap gives
   counts (5, 5, 1, ...), which force two devices to hold both hot experts: 232 tokens, 1.28 x the mean.
   The target search reaches 590 / 3 ≈ 196.7 (1.085 x), the optimum (checked by exhaustive search).
4. Refinement of both: local search on the busiest device. Moves: one of its replicas to a device with a
   free slot, a swap for a lighter replica of another device, or one more replica of one of its experts on
   a device with a free slot (every replica of that expert gets lighter). The move leaving both changed
   devices lowest is applied while that is below the peak; the peak never rises and the number of devices
   at the peak falls each step, so it ends.
5. Movement, with a current table: each construction's device contents are permuted within a node to
   overlap the current slots most (greedy matching), and the current layer competes too, as it is and
   refined from there only until its peak is within `balance_slack` of the constructions' (lost experts
   re-placed first). Among plans whose peak is within `balance_slack` of the best, the one moving the fewest
   slots wins, so planning the same load twice moves nothing.

Cost per layer: search O(search_steps · E · D log D), count first O(S log S + S · D) for S = D · c slots,
refinement O(moves · c² · D), matching O(D² · c).
The target search leaves a slot empty when filling it would not lower the peak: an empty slot is headroom
the autoscaler can use to replicate a hot expert without a re-plan, and it moves no bytes.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import numpy as np

from expertray.errors import ConfigError
from expertray.policies.placement import PLACEMENT, PlacementPlan, PlacementPolicy, check_inputs, finish_plan
from expertray.state.placement_table import PlacementTable, Slot
from expertray.state.topology import Topology

Bins = list[set[int]]  # per device (topology order), the logical experts of one layer it holds


@PLACEMENT.register("balanced")
@dataclass(frozen=True)
class BalancedPlacement(PlacementPolicy):
    """Parameters.

    search_steps: bisection steps on the per-device target (each halves the remaining interval), at most.
    search_precision: the bisection stops once its interval is within this fraction of the target (a finer
        target moves the peak by less than that; 0 leaves only search_steps).
    max_refine_moves: local-search moves per layer and candidate, at most.
    balance_slack: a candidate moving fewer slots wins if its peak device load is within this fraction of
        the best candidate's (0 keeps slots only where that costs no balance at all).
    """

    search_steps: int = 24
    search_precision: float = 1e-4
    max_refine_moves: int = 500
    balance_slack: float = 0.01

    def __post_init__(self) -> None:
        if self.search_steps < 0:
            raise ConfigError(f"placement.balanced.search_steps: must be >= 0, got {self.search_steps}")
        if not 0.0 <= self.search_precision < 1.0:
            raise ConfigError(f"placement.balanced.search_precision: must be in [0, 1), got {self.search_precision}")
        if self.max_refine_moves < 0:
            raise ConfigError(f"placement.balanced.max_refine_moves: must be >= 0, got {self.max_refine_moves}")
        if not 0.0 <= self.balance_slack < 1.0:
            raise ConfigError(f"placement.balanced.balance_slack: must be in [0, 1), got {self.balance_slack}")

    def plan(self, load: np.ndarray, topology: Topology, current: PlacementTable | None = None,
             expert_bytes: int = 0) -> PlacementPlan:
        arr = check_inputs(load, topology, current, expert_bytes)
        devices = topology.devices
        node_of = np.array([i for i, node in enumerate(topology.nodes) for _ in node])
        slots = []
        for layer in range(arr.shape[0]):
            held = _holdings(current, layer, devices) if current is not None else None
            bins = self._plan_layer(arr[layer], node_of, topology.slots_per_device, held)
            slots += [Slot(devices[d], layer, e) for d, experts in enumerate(bins) for e in sorted(experts)]
        return finish_plan("balanced", slots, arr, topology, current, expert_bytes)

    def _plan_layer(self, load: np.ndarray, node_of: np.ndarray, slots: int, held: Bins | None) -> Bins:
        home = _home_nodes(load, node_of, slots)
        candidates = [self._search(load, node_of, home, slots)]
        counted = _count_first(load, node_of, home, slots)
        if counted is not None:
            candidates.append(_refine(load, counted, slots, self.max_refine_moves))
        if held is None:
            return min(candidates, key=lambda b: _peak(load, b))
        good_enough = min(_peak(load, b) for b in candidates) * (1.0 + self.balance_slack)
        candidates = [_match(b, held, node_of) for b in candidates]
        repaired = _repair(load, held, slots)
        if repaired is not None:  # the current layer as it is, and improved from there only as far as needed
            candidates += [repaired, _refine(load, repaired, slots, self.max_refine_moves, good_enough)]
        peaks = [_peak(load, b) for b in candidates]
        limit = min(peaks) * (1.0 + self.balance_slack) + _tol(min(peaks))
        eligible = [(_moved(b, held), p, i) for i, (b, p) in enumerate(zip(candidates, peaks)) if p <= limit]
        return candidates[min(eligible)[2]]

    def _search(self, load: np.ndarray, node_of: np.ndarray, home: np.ndarray, slots: int) -> Bins:
        """Bisection on the target; the always-feasible target (all the load) bounds it from above."""
        best = _fit(load, float(load.sum()), node_of, home, slots)
        assert best is not None  # every expert fits one slot under the whole load, and E <= D * c
        best_peak = _peak(load, best)
        lo, hi = float(load.sum()) / len(node_of), best_peak
        for _ in range(self.search_steps):
            if hi - lo <= max(_tol(hi), self.search_precision * hi):
                break
            mid = (lo + hi) / 2
            bins = _fit(load, mid, node_of, home, slots)
            if bins is None:
                lo = mid
                continue
            peak = _peak(load, bins)
            if peak < best_peak:
                best, best_peak = bins, peak
            hi = min(mid, peak)
        return _refine(load, best, slots, self.max_refine_moves)


def _tol(scale: float) -> float:
    return 1e-9 * max(scale, 1.0)


def _holdings(current: PlacementTable, layer: int, devices: list[str]) -> Bins:
    """The current table's experts of `layer` per topology device (actors outside the topology drop out)."""
    index = {d: i for i, d in enumerate(devices)}
    held: Bins = [set() for _ in devices]
    for s in current.slots:
        if s.layer == layer and s.actor in index:
            held[index[s.actor]].add(s.expert)
    return held


def _home_nodes(load: np.ndarray, node_of: np.ndarray, slots: int) -> np.ndarray:
    """[E] home node per expert: heaviest first to the node with least load per device and a slot left."""
    devices = np.bincount(node_of)
    room = devices * slots
    assigned = np.zeros(devices.size)
    home = np.zeros(load.size, dtype=np.int64)
    for e in np.argsort(-load, kind="stable"):
        node = min((n for n in range(devices.size) if room[n] > 0), key=lambda n: (assigned[n] / devices[n], n))
        home[e], assigned[node], room[node] = node, assigned[node] + load[e], room[node] - 1
    return home


def _fit(load: np.ndarray, target: float, node_of: np.ndarray, home: np.ndarray, slots: int) -> Bins | None:
    """Pack every expert, heaviest first, with the fewest replicas that fit under `target`; None if one can't.

    Each expert's devices by preference: home node first, then best fit (big gaps stay for big shares), then
    more free slots (spreading them), then the lower index. Per expert the work is a partition of the D open
    rooms plus the home node's few devices, in numpy; other nodes are searched only when home is full."""
    num_devices, tol = node_of.size, _tol(target)
    room = np.full(num_devices, target)
    open_room = room.copy()  # room of devices with a free slot, -inf for full ones
    free = np.full(num_devices, slots)
    free_total, open_count = num_devices * slots, num_devices
    untouched = num_devices  # devices holding nothing yet: their room is the whole target, the largest
    node_devices = np.split(np.argsort(node_of, kind="stable"), np.cumsum(np.bincount(node_of))[:-1])
    bins: Bins = [set() for _ in range(num_devices)]
    for i, e in enumerate(np.argsort(-load, kind="stable")):
        max_replicas = min(open_count, free_total - (load.size - i - 1))  # a slot for each expert still to place
        r = _replicas(open_room, float(load[e]), max_replicas, tol, target, untouched)
        if r == 0:
            return None
        share = load[e] / r
        home_devices = node_devices[home[e]]
        chosen = _best_fit(home_devices[open_room[home_devices] >= share - tol], room, free, r)
        if chosen.size < r:
            others = (open_room >= share - tol) & (node_of != home[e])
            chosen = np.concatenate([chosen, _best_fit_split(others, room, free, r - chosen.size, target, slots)])
        for d in chosen.tolist():
            bins[d].add(int(e))
        room[chosen] -= share
        free[chosen] -= 1
        open_room[chosen] = np.where(free[chosen] > 0, room[chosen], -np.inf)
        free_total -= r
        open_count -= int((free[chosen] == 0).sum())
        untouched -= int((free[chosen] == slots - 1).sum())
    return bins


def _replicas(open_room: np.ndarray, load: float, max_replicas: int, tol: float, target: float,
              untouched: int) -> int:
    """The fewest r <= max_replicas whose share load / r fits the r-th largest of open_room [D] (-inf = no
    free slot); 0 if none. The `untouched` largest rooms equal `target`, which settles most calls."""
    r = max(1, math.ceil(load / (target + tol)))
    while r > 1 and target >= load / (r - 1) - tol:
        r -= 1
    while target < load / r - tol:
        r += 1
    if r <= min(untouched, max_replicas):
        return r
    looked = 0
    for width in (8, max_replicas):  # nearly always the answer is among the few largest rooms
        width = min(width, max_replicas)
        if width <= looked:
            continue
        negated = np.partition(-open_room, width - 1)[:width] if width < open_room.size else -open_room
        largest = -np.sort(negated)[:width]  # descending
        fits = largest >= load / np.arange(1, width + 1) - tol
        if fits.any():
            return int(fits.argmax()) + 1
        looked = width
    return 0


def _best_fit_split(mask: np.ndarray, room: np.ndarray, free: np.ndarray, r: int, target: float,
                    slots: int) -> np.ndarray:
    """`_best_fit` over the devices in mask [D], cheaply: devices holding load (room below the target) come
    first and are few; the rest have the whole target as room, and the empty ones among them go by index."""
    used = mask & (room < target)
    chosen = _best_fit(np.flatnonzero(used), room, free, r)
    if chosen.size == r:
        return chosen
    rest = mask & ~used
    empty = np.flatnonzero(rest & (free == slots))[: r - chosen.size]
    if empty.size == r - chosen.size:
        return np.concatenate([chosen, empty])
    return np.concatenate([chosen, _best_fit(np.flatnonzero(rest), room, free, r - chosen.size)])


def _best_fit(devices: np.ndarray, room: np.ndarray, free: np.ndarray, r: int) -> np.ndarray:
    """Up to r of `devices` [n]: least room first, then most free slots, then lowest index."""
    if devices.size > r:  # only devices with room up to the r-th smallest can be among the r first
        cut = np.partition(room[devices], r - 1)[r - 1]
        devices = devices[room[devices] <= cut]
    return devices[np.lexsort((devices, -free[devices], room[devices]))][:r]


def _repair(load: np.ndarray, held: Bins, slots: int) -> Bins | None:
    """The current layer made valid here with few changes: extra replicas are dropped where a device holds
    more than `slots` or an expert that lost every replica (its devices left) needs a free slot, and each
    such orphan goes to the least-loaded device with a free slot. None if that takes more than dropping."""
    bins = [set(b) for b in held]

    def drop_extra_replica(devices: list[int]) -> bool:
        # the extra replica whose expert stays lightest per replica without it, from its busiest holder
        dev, replicas = _device_loads(load, bins)
        options = [(load[e] / (replicas[e] - 1), -dev[d], d, e) for d in devices for e in bins[d] if replicas[e] > 1]
        if not options:
            return False
        _, _, d, e = min(options)
        bins[d].discard(e)
        return True

    for d in range(len(bins)):
        while len(bins[d]) > slots:
            if not drop_extra_replica([d]):
                return None
    for e in sorted(set(range(load.size)) - set().union(*bins), key=lambda e: -load[e]):
        if all(len(b) >= slots for b in bins) and not drop_extra_replica(list(range(len(bins)))):
            return None
        dev = _device_loads(load, bins)[0]
        bins[min((d for d in range(len(bins)) if len(bins[d]) < slots), key=lambda d: (dev[d], d))].add(e)
    return bins


def _count_first(load: np.ndarray, node_of: np.ndarray, home: np.ndarray, slots: int) -> Bins | None:
    """EPLB's hierarchical order, node by node: the node's home experts fill all its slots, each extra
    replica going to the max per-replica load (at most one per device); then replicas, heaviest first, go to
    the least-loaded device of the node with a free slot that lacks the expert. None if one finds none."""
    bins: Bins = [set() for _ in node_of]
    dev = np.zeros(node_of.size)
    for node in np.unique(node_of):
        devices = np.flatnonzero(node_of == node).tolist()
        experts = np.flatnonzero(home == node).tolist()
        replicas = dict.fromkeys(experts, 1)
        heap = [(-load[e], e) for e in experts]
        heapq.heapify(heap)
        for _ in range(len(devices) * slots - len(experts)):
            while heap and replicas[heap[0][1]] >= len(devices):
                heapq.heappop(heap)
            if not heap:
                break
            _, e = heapq.heappop(heap)
            replicas[e] += 1
            heapq.heappush(heap, (-load[e] / replicas[e], e))
        items = sorted(((load[e] / r, e) for e, r in replicas.items() for _ in range(r)), key=lambda t: (-t[0], t[1]))
        for w, e in items:
            open_devices = [d for d in devices if len(bins[d]) < slots and e not in bins[d]]
            if not open_devices:
                return None
            d = min(open_devices, key=lambda d: (dev[d], d))
            bins[d].add(e)
            dev[d] += w
    return bins


def _device_loads(load: np.ndarray, bins: Bins) -> tuple[np.ndarray, np.ndarray]:
    """(per-device tokens [D], replicas per expert [E]) of a layer's bins."""
    sizes = np.fromiter((len(b) for b in bins), dtype=np.int64, count=len(bins))
    experts = np.fromiter((e for b in bins for e in b), dtype=np.int64, count=int(sizes.sum()))
    replicas = np.bincount(experts, minlength=load.size).astype(np.float64)
    share = load / np.maximum(replicas, 1)
    return np.bincount(np.repeat(np.arange(len(bins)), sizes), weights=share[experts], minlength=len(bins)), replicas


def _peak(load: np.ndarray, bins: Bins) -> float:
    return float(_device_loads(load, bins)[0].max())


def _refine(load: np.ndarray, bins: Bins, slots: int, max_moves: int, good_enough: float = 0.0) -> Bins:
    """Local search on the busiest device (see the module docstring) until its load is `good_enough`."""
    bins = [set(b) for b in bins]
    for _ in range(max_moves):
        dev, replicas = _device_loads(load, bins)
        p = int(dev.argmax())
        peak = dev[p]
        if peak <= good_enough:
            break
        best: tuple[float, str, int, int, int] | None = None
        for e in sorted(bins[p]):
            w = load[e] / replicas[e]
            w_more = load[e] / (replicas[e] + 1)
            for d in range(len(bins)):
                if d == p or e in bins[d]:
                    continue
                options = []
                if len(bins[d]) < slots:
                    options.append((max(peak - w, dev[d] + w), "move", e, d, -1))
                    options.append((max(peak - w + w_more, dev[d] + w_more), "add", e, d, -1))
                for f in bins[d] - bins[p]:
                    w_f = load[f] / replicas[f]
                    if w_f < w:
                        options.append((max(peak - w + w_f, dev[d] - w_f + w), "swap", e, d, f))
                for option in options:
                    if best is None or option[0] < best[0]:
                        best = option
        if best is None or best[0] >= peak - _tol(peak):
            break
        _, kind, e, d, f = best
        bins[d].add(e)
        if kind != "add":
            bins[p].discard(e)
        if kind == "swap":
            bins[d].discard(f)
            bins[p].add(f)
    return bins


def _match(bins: Bins, held: Bins, node_of: np.ndarray) -> Bins:
    """Permute device contents within each node so they overlap the current holdings most (greedy)."""
    out: Bins = [set() for _ in bins]
    for node in np.unique(node_of):
        devices = np.flatnonzero(node_of == node).tolist()
        pairs = sorted(((len(bins[b] & held[d]), b, d) for b in devices for d in devices),
                       key=lambda t: (-t[0], t[1] != t[2], t[1], t[2]))
        used_bins: set[int] = set()
        used_devices: set[int] = set()
        for _, b, d in pairs:
            if b not in used_bins and d not in used_devices:
                out[d] = bins[b]
                used_bins.add(b)
                used_devices.add(d)
    return out


def _moved(bins: Bins, held: Bins | None) -> int:
    """Slots that are new on their device (all of them without a current table)."""
    if held is None:
        return sum(len(b) for b in bins)
    return sum(len(b - h) for b, h in zip(bins, held))
