"""All-to-all traffic of one MoE layer over a topology: which device serves each routed token, the bytes every
device pair exchanges, and how long the slowest device's links take.

Model. Token t starts on device token_origin[t] (data-parallel attention). Each of its experts is served by
one replica, chosen as the runtime's selectors do (policies/replica.py): `round_robin` takes replica
t mod n of the expert; `locality` takes, round robin, one of the replicas on the token's node, or of all
replicas if its node has none, where t counts the tokens of that node in row order (one router per node).
A token is sent once to each distinct destination device (d_model × bytes_per_elem bytes) and its output
comes back once from each. Two dispatch modes:
- flat: origin → destination device directly (NVLink inside a node, the network across nodes);
- hierarchical (DeepEP's normal kernels, DeepSeek-V3 §3.2.2): across nodes a token crosses the network once
  per destination node, to the device with its origin's in-node index, which forwards it over NVLink to the
  destination devices on that node.
Pair matrices are [D, D] over topology devices (src row, dst column); the diagonal holds tokens served on
their own device, which cross no link.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from expertray.errors import ConfigError, InputError
from expertray.state.placement_table import PlacementTable
from expertray.state.topology import Topology

SELECTORS = ("locality", "round_robin")
DISPATCH_MODES = ("flat", "hierarchical")


@dataclass(frozen=True)
class TopologyArrays:
    """node_of [D]: node of each device; relay [D, N]: the device on node m with device d's in-node index
    (mod that node's size); same_node [D, D] bool."""

    node_of: np.ndarray
    relay: np.ndarray
    same_node: np.ndarray

    @classmethod
    def of(cls, topology: Topology) -> TopologyArrays:
        node_of = np.asarray(topology.device_nodes, dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum([len(n) for n in topology.nodes])])
        in_node = np.arange(node_of.size) - starts[node_of]
        sizes = np.diff(starts)
        relay = starts[:-1][None, :] + in_node[:, None] % sizes[None, :]
        return cls(node_of, relay, node_of[:, None] == node_of[None, :])

    @property
    def num_devices(self) -> int:
        return int(self.node_of.size)

    @property
    def num_nodes(self) -> int:
        return int(self.relay.shape[1])


@dataclass(frozen=True)
class PlacementArrays:
    """A PlacementTable as CSR arrays over topology device indices, for vectorised replica choice.

    ptr [L·E + 1], dev [S]: replicas of (layer, expert) in table actor order;
    local_ptr [L·E·N + 1], local_dev [S]: the same split by node; slots_per_device [D] over all layers.
    """

    num_layers: int
    num_experts: int
    num_nodes: int
    ptr: np.ndarray
    dev: np.ndarray
    local_ptr: np.ndarray
    local_dev: np.ndarray
    slots_per_device: np.ndarray

    @classmethod
    def of(cls, table: PlacementTable, topology: Topology) -> PlacementArrays:
        unknown = [a for a in table.actors if a not in topology.device_index]
        if unknown:
            raise ConfigError(f"placement table actors {unknown[:3]} are not devices of the topology")
        rank = {a: i for i, a in enumerate(table.actors)}
        layer = np.fromiter((s.layer for s in table.slots), np.int64, len(table.slots))
        expert = np.fromiter((s.expert for s in table.slots), np.int64, len(table.slots))
        actor_rank = np.fromiter((rank[s.actor] for s in table.slots), np.int64, len(table.slots))
        device = np.fromiter((topology.device_index[s.actor] for s in table.slots), np.int64, len(table.slots))
        node = np.asarray(topology.device_nodes, dtype=np.int64)[device]
        L, E, N = table.num_layers, table.num_experts, topology.num_nodes
        key = layer * E + expert
        order = np.lexsort((actor_rank, key))
        local_key = key * N + node
        local_order = np.lexsort((actor_rank, local_key))
        return cls(L, E, N, _csr_ptr(key, L * E), device[order], _csr_ptr(local_key, L * E * N),
                   device[local_order], np.bincount(device, minlength=topology.num_devices))

    def choose(self, experts: np.ndarray, layer: int, token_origin: np.ndarray, node_of: np.ndarray,
               selector: str) -> np.ndarray:
        """Destination device [T, k] of every routed token of experts [T, k] (-1 = dropped stays -1)."""
        T = experts.shape[0]
        experts = experts.astype(np.int64, copy=False)
        valid = experts >= 0
        key = layer * self.num_experts + np.where(valid, experts, 0)
        count = self.ptr[key + 1] - self.ptr[key]
        if selector == "round_robin":
            dest = self.dev[self.ptr[key] + np.arange(T)[:, None] % count]
        elif selector == "locality":
            node = node_of[token_origin]
            rank = _rank_within(node, self.num_nodes)[:, None]
            local_key = key * self.num_nodes + node[:, None]
            local_count = self.local_ptr[local_key + 1] - self.local_ptr[local_key]
            local_at = np.minimum(self.local_ptr[local_key] + rank % np.maximum(local_count, 1), self.dev.size - 1)
            dest = np.where(local_count > 0, self.local_dev[local_at], self.dev[self.ptr[key] + rank % count])
        else:
            raise ConfigError(f"sim.selector: {selector!r} is unknown (known: {', '.join(SELECTORS)})")
        return np.where(valid, dest, -1)


def _csr_ptr(keys: np.ndarray, size: int) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(np.bincount(keys, minlength=size))]).astype(np.int64)


def _rank_within(groups: np.ndarray, num_groups: int) -> np.ndarray:
    """[T] position of each row among the rows of its group, in row order."""
    order = np.argsort(groups, kind="stable")
    starts = np.concatenate([[0], np.cumsum(np.bincount(groups, minlength=num_groups))[:-1]])
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size) - starts[groups[order]]
    return rank


def fanout_pairs(dest: np.ndarray, origin: np.ndarray, topo: TopologyArrays, dispatch: str
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(src, dst) device indices of every single-token transfer from each token's origin [T] to its
    destination devices dest [T, k] (-1 ignored); a pair with src == dst is a token served at home."""
    ordered = np.sort(dest, axis=1)
    first = np.ones_like(ordered, dtype=bool)
    first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    first &= ordered >= 0
    rows, cols = np.nonzero(first)
    src, dst = origin[rows], ordered[rows, cols]
    if dispatch == "flat":
        return src, dst
    if dispatch != "hierarchical":
        raise ConfigError(f"sim.dispatch: {dispatch!r} is unknown (known: {', '.join(DISPATCH_MODES)})")
    dst_node = topo.node_of[dst]
    remote = dst_node != topo.node_of[src]
    # destination devices are sorted, and devices are numbered node by node, so a row's nodes are sorted too
    new_node = np.ones(rows.size, dtype=bool)
    new_node[1:] = (rows[1:] != rows[:-1]) | (dst_node[1:] != dst_node[:-1])
    relay = topo.relay[src, dst_node]
    network = remote & new_node
    forward = remote & (relay != dst)
    return (np.concatenate([src[~remote], src[network], relay[forward]]),
            np.concatenate([dst[~remote], relay[network], dst[forward]]))


def pair_bytes(src: np.ndarray, dst: np.ndarray, num_devices: int, row_bytes: int) -> np.ndarray:
    """[D, D] int64 bytes per (src, dst) pair, one row of `row_bytes` per transfer."""
    counts = np.bincount(src * num_devices + dst, minlength=num_devices * num_devices)
    return counts.reshape(num_devices, num_devices).astype(np.int64) * row_bytes


@dataclass(frozen=True)
class LinkLoad:
    """Bytes of one all-to-all phase on the links: intra_node / inter_node totals (diagonal excluded) and
    time_s, the slowest device's max(NVLink time, network time), each max(send, receive) / bandwidth +
    latency when it moves anything (links are full duplex and the two fabrics work in parallel)."""

    intra_node_bytes: int
    inter_node_bytes: int
    time_s: float


def link_load(pairs: np.ndarray, topo: TopologyArrays, topology: Topology) -> LinkLoad:
    links = topology.links
    off_diagonal = ~np.eye(topo.num_devices, dtype=bool)
    intra = np.where(topo.same_node & off_diagonal, pairs, 0)
    inter = np.where(topo.same_node, 0, pairs)

    def fabric_s(m: np.ndarray, bandwidth: float, latency: float) -> np.ndarray:
        busiest = np.maximum(m.sum(axis=1), m.sum(axis=0)).astype(np.float64)
        return busiest / bandwidth + np.where(busiest > 0, latency, 0.0)

    per_device = np.maximum(
        fabric_s(intra, links.intra_node_bandwidth_bytes_per_s, links.intra_node_latency_s),
        fabric_s(inter, links.inter_node_bandwidth_bytes_per_s, links.inter_node_latency_s))
    return LinkLoad(int(intra.sum()), int(inter.sum()), float(per_device.max()))


def simulate_layer_bytes(experts: np.ndarray, table: PlacementTable, topology: Topology, d_model: int,
                         bytes_per_elem: int, token_origin: np.ndarray, layer: int = 0,
                         selector: str = "locality", dispatch: str = "flat") -> np.ndarray:
    """[D, D] int64 dispatch bytes (src device row, dst device column, topology.devices order) of one
    layer's routing experts [T, k] (-1 = dropped) under `table`, tokens starting on token_origin [T]
    (device indices). The combine phase moves the transpose. For comparing with measured transport bytes."""
    arr = np.asarray(experts)
    origin = np.asarray(token_origin, dtype=np.int64)
    if arr.ndim != 2 or origin.shape != (arr.shape[0],):
        raise InputError(f"simulate_layer_bytes: expected experts [T, k] and token_origin [T], got "
                         f"{list(arr.shape)} and {list(origin.shape)}")
    if origin.size and (origin.min() < 0 or origin.max() >= topology.num_devices):
        raise InputError(f"simulate_layer_bytes: token_origin must index the {topology.num_devices} devices")
    if arr.size and (arr.min() < -1 or arr.max() >= table.num_experts):
        raise InputError(f"simulate_layer_bytes: expert ids must be in [-1, {table.num_experts})")
    if d_model < 1 or bytes_per_elem < 1:
        raise ConfigError(f"simulate_layer_bytes: d_model and bytes_per_elem must be >= 1, got {d_model}, "
                          f"{bytes_per_elem}")
    table.check_expert(layer, 0)
    topo = TopologyArrays.of(topology)
    dest = PlacementArrays.of(table, topology).choose(arr, layer, origin, topo.node_of, selector)
    src, dst = fanout_pairs(dest, origin, topo, dispatch)
    return pair_bytes(src, dst, topo.num_devices, d_model * bytes_per_elem)
