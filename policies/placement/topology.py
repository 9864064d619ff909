"""`topology_aware`: spend the slot budget on node-local replicas and keep experts that tokens use together on
the same node and device, under a per-device load cap.

Premises: tokens originate evenly on all devices (data-parallel attention) and the runtime picks replicas
with the `locality` selector (a replica on the token's node if there is one, round robin otherwise). Then a
token's transfer to expert e stays on its node exactly when e has a copy there, so each copy on one more node
turns 1/N of e's tokens into intra-node traffic; and experts that a token picks together cost one transfer
when they share its destination device, or one network transfer when they share its destination node and
the network leg is sent once per node (DeepEP's normal kernels).

Affinity is the *excess* of pair counts over independence, C[i, j] - r_i · r_j / Σr (r: row sums, as in
graph modularity): raw counts grow with every expert a device or node holds, so they would only favour full
bins. A device's affinity for an expert is its excess with the copies on the device plus with the copies on
the device's node (each copy weighted 1 / copies of its expert), plus, with `layer_affinity`, the excess
with the previous layer's experts placed on that node.

Per layer, on D devices with c slots each (budget and load model: see placement.py; a copy carries
load / copies), with cap = (1 + balance_slack) × the mean device load:

1. Packing: experts, heaviest first, take the fewest copies (at least their floor) whose share fits the
   roomiest devices under the cap, keeping slots for the floors of the experts still to place (first-fit
   decreasing with splitting, the count rule of `balanced` without its home nodes). An expert's copies go
   to fitting devices on nodes holding the fewest of its copies (coverage), then with the highest affinity,
   then with the least room left (best fit).
2. Locality: the floors are extra copies, given out as D'Hondt does (each to the expert whose copies carry
   the most load each): enough to fill every free slot, then 3/4 of that, ..., then none; the first that
   packs under the cap wins. If none packs, the same without the preferences of step 1 (best fit alone),
   then the cap grows by 5%. (Floors also help balance: splitting a hot expert further can leave the
   rooms a light one needs.)

`balance_slack` trades balance for traffic: extra copies and affinity only use room under the cap. Cost per
layer: O(E · (D + E)) numpy work per packing; one to a few packings when the cap is reachable.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

from expertray.errors import ConfigError
from expertray.policies.placement import PLACEMENT, PlacementPlan, PlacementPolicy, check_inputs, finish_plan
from expertray.state.placement_table import PlacementTable, Slot
from expertray.state.topology import Topology

CAP_GROWTH = 1.05
EXTRA_GRID = 4  # extra-copy budgets tried: all free slots, 3/4 of them, ..., none


@PLACEMENT.register("topology_aware")
@dataclass(frozen=True, eq=False)
class TopologyAwarePlacement(PlacementPolicy):
    """Parameters.

    balance_slack: the device load cap is (1 + slack) × the mean device load; 0 puts balance first.
    coselection: [L, E, E] tokens that picked both experts within a layer (expertray.tools.sim.coactivation);
        None: place by load alone.
    layer_affinity: [L - 1, E, E] tokens that picked expert i at layer l and j at l + 1; useful only when a
        token's next layer starts where its expert ran (the simulator's `follow` origin), None otherwise.
    extra_copies: spend free slots on copies for locality (step 2); False keeps the fewest copies.
    """

    balance_slack: float = 0.1
    coselection: np.ndarray | None = None
    layer_affinity: np.ndarray | None = None
    extra_copies: bool = True

    def __post_init__(self) -> None:
        if not (np.isfinite(self.balance_slack) and self.balance_slack >= 0):
            raise ConfigError(f"placement.topology_aware.balance_slack: must be >= 0, got {self.balance_slack}")
        for name in ("coselection", "layer_affinity"):
            value = getattr(self, name)
            if value is not None and (np.ndim(value) != 3 or not np.isfinite(value).all() or (value < 0).any()):
                raise ConfigError(f"placement.topology_aware.{name}: expected finite counts >= 0 of shape "
                                  f"[layers, experts, experts], got shape {list(np.shape(value))}")

    def plan(self, load: np.ndarray, topology: Topology, current: PlacementTable | None = None,
             expert_bytes: int = 0) -> PlacementPlan:
        arr = check_inputs(load, topology, current, expert_bytes)
        L, E = arr.shape
        self._check_shapes(L, E)
        devices = topology.devices
        node_of = np.asarray(topology.device_nodes, dtype=np.int64)
        slots: list[Slot] = []
        prior: np.ndarray | None = None  # [E, N] excess affinity with the previous layer's experts per node
        for layer in range(L):
            affinity = None if self.coselection is None else excess(self.coselection[layer], symmetric=True)
            packing = self._pack_layer(arr[layer], topology, node_of, affinity, prior)
            slots += [Slot(devices[d], layer, int(e)) for e, d in zip(*np.nonzero(packing.counts))]
            if self.layer_affinity is not None and layer < L - 1:
                share = packing.node_counts / packing.counts.sum(axis=1, keepdims=True)
                prior = excess(self.layer_affinity[layer], symmetric=False).T @ share
        return finish_plan("topology_aware", slots, arr, topology, current, expert_bytes)

    def _pack_layer(self, load: np.ndarray, topology: Topology, node_of: np.ndarray,
                    affinity: np.ndarray | None, prior: np.ndarray | None) -> _Packing:
        """Steps 1 and 2 of the module docstring for one layer's load [E]."""
        E, D = load.size, topology.num_devices
        cap = (1.0 + self.balance_slack) * max(float(load.sum()), 1.0) / D
        top = min(D * topology.slots_per_device, E * D) - E  # extra copies that would fill every slot
        grid = np.unique(np.linspace(0, top if self.extra_copies else 0, EXTRA_GRID + 1).round().astype(np.int64))
        floors = [replica_counts(load, E + int(extra), D) for extra in grid[::-1]]
        while True:
            for prefer in (True, False):
                for floor in floors:
                    packing = _Packing(load, node_of, topology.slots_per_device, cap, affinity, prior, prefer)
                    if packing.place_all(floor):
                        return packing
            cap *= CAP_GROWTH

    def _check_shapes(self, num_layers: int, num_experts: int) -> None:
        E = num_experts
        for name, layers in (("coselection", num_layers), ("layer_affinity", num_layers - 1)):
            value = getattr(self, name)
            if value is not None and value.shape != (layers, E, E):
                raise ConfigError(f"placement.topology_aware.{name}: expected shape {[layers, E, E]} for "
                                  f"{num_layers} layers x {E} experts, got {list(value.shape)}")


def replica_counts(load: np.ndarray, budget: int, num_devices: int) -> np.ndarray:
    """[E] copies per expert: one each, then each further copy up to `budget` in all (at most num_devices
    per expert) to the expert whose copies carry the most load each (D'Hondt); ties go to the lower id."""
    copies = np.ones(load.size, dtype=np.int64)
    heap = [(-float(load[e]), e) for e in range(load.size) if num_devices > 1]
    heapq.heapify(heap)
    for _ in range(min(budget, load.size * num_devices) - load.size):
        _, e = heapq.heappop(heap)
        copies[e] += 1
        if copies[e] < num_devices:
            heapq.heappush(heap, (-float(load[e]) / copies[e], e))
    return copies


def excess(counts: np.ndarray, symmetric: bool) -> np.ndarray:
    """[E, E] float pair counts minus their expectation under independence (row sum × column sum / total);
    the diagonal of a symmetric (co-selection) matrix is dropped first."""
    x = np.asarray(counts, dtype=np.float64).copy()
    if symmetric:
        np.fill_diagonal(x, 0.0)
    total = x.sum()
    if total > 0:
        x -= np.outer(x.sum(axis=1), x.sum(axis=0)) / total
    return x


class _Packing:
    """One layer's copies on devices grouped into nodes, under a load cap.

    counts [E, D] (0/1: a device holds an expert once) and node_counts [E, N]; device_load [D]; free [D]
    slots; dev_score [E, D] and node_score [E, N]: affinity of each expert with the copies on a device /
    node, each weighted 1 / its expert's copies (node_score starts at `prior`). Without `prefer`, copies go
    by best fit alone.
    """

    def __init__(self, load: np.ndarray, node_of: np.ndarray, slots: int, cap: float,
                 affinity: np.ndarray | None, prior: np.ndarray | None, prefer: bool) -> None:
        E, D, N = load.size, node_of.size, int(node_of.max()) + 1
        self.load, self.node_of, self.cap, self.prefer = load, node_of, cap, prefer
        self.affinity = affinity if prefer else None
        self.counts = np.zeros((E, D), dtype=np.int64)
        self.node_counts = np.zeros((E, N), dtype=np.int64)
        self.device_load = np.zeros(D)
        self.free = np.full(D, slots, dtype=np.int64)
        self.dev_score = np.zeros((E, D))
        self.node_score = np.zeros((E, N)) if prior is None or not prefer else np.array(prior, dtype=np.float64)
        self.tol = 1e-9 * max(cap, 1.0)

    def place_all(self, floor: np.ndarray) -> bool:
        """Step 1 of the module docstring; False when an expert fits nowhere under the cap."""
        order = np.argsort(-self.load, kind="stable")
        reserved = int(floor.sum())
        for e in order.tolist():
            reserved -= int(floor[e])
            open_room = np.sort(self.cap - self.device_load[self.free > 0])[::-1]
            most = min(open_room.size, int(self.free.sum()) - reserved)
            r = np.arange(1, most + 1)
            fits = np.flatnonzero((open_room[:most] >= self.load[e] / r - self.tol) & (r >= floor[e]))
            if fits.size == 0:
                return False
            self._place(e, int(fits[0]) + 1)
        return True

    def _place(self, e: int, copies: int) -> None:
        """Put `copies` copies of e on distinct fitting devices (the caller checked that enough fit)."""
        share = self.load[e] / copies
        fitting = np.flatnonzero((self.free > 0) & (self.device_load + share <= self.cap + self.tol))
        if self.prefer:
            score = self.dev_score[e, fitting] + self.node_score[e, self.node_of[fitting]]
            fitting = fitting[np.lexsort((fitting, -self.device_load[fitting], -score))]
            # coverage first: the best fitting device of every node, then the second best of every node, ...
            nodes = self.node_of[fitting]
            by_node = np.argsort(nodes, kind="stable")
            rank_in_node = np.empty_like(by_node)
            rank_in_node[by_node] = np.arange(by_node.size) - np.searchsorted(nodes[by_node], nodes[by_node])
            chosen = fitting[np.lexsort((np.arange(fitting.size), rank_in_node))[:copies]]
        else:
            chosen = fitting[np.lexsort((fitting, -self.device_load[fitting]))[:copies]]
        self.counts[e, chosen] = 1
        np.add.at(self.node_counts[e], self.node_of[chosen], 1)
        self.free[chosen] -= 1
        self.device_load[chosen] += share
        if self.affinity is not None:
            column = self.affinity[:, e] / copies
            self.dev_score[:, chosen] += column[:, None]
            np.add.at(self.node_score.T, self.node_of[chosen], column)
