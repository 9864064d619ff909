"""Ray's nodes as the controller sees them, Ray-free: parse `ray.nodes()`-style records, choose the node for
a new expert actor, and group actors by node into the placement policies' `Topology`.

Scheduling choice (documented in docs/DEPLOY.md): each expert actor is created with a *soft* node-affinity
strategy on the node `choose_node` picks, not in a placement group. Actors come and go one at a time
(heal, `add_actor`, autoscale), which a per-actor choice follows directly; a placement group reserves a fixed
set of bundles up front and would have to be rebuilt to grow onto a new node. Soft affinity lets Ray place
the actor elsewhere if the chosen node filled up in the meantime; with no node having room, the actor is
created without a preference and waits for the Ray autoscaler (or a `ray start` joining) to add one.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from expertray.errors import ConfigError
from expertray.state.topology import Links, Topology

# Ray's per-node bookkeeping resources ("node:<ip>", "node:__internal_head__"), not capacity to schedule on.
_NODE_MARKER = "node:"


@dataclass(frozen=True)
class NodeInfo:
    """One live Ray node: id (hex), IP, total resources (CPU, GPU, memory, custom ones such as
    `expert_slot`) and labels (e.g. `ray.io/accelerator-type`)."""

    node_id: str
    ip: str
    resources: Mapping[str, float]
    labels: Mapping[str, str] = field(default_factory=dict)
    is_head: bool = False


def _field(record: Mapping[str, Any], index: int, key: str, kind: type | tuple[type, ...]) -> Any:
    if key not in record:
        raise ConfigError(f"ray node record {index}: missing {key!r} (has {sorted(record)})")
    value = record[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ConfigError(f"ray node record {index}: {key} must be {getattr(kind, '__name__', kind)}, "
                          f"got {type(value).__name__} {value!r}")
    return value


def nodes_from_ray(records: Iterable[Mapping[str, Any]]) -> list[NodeInfo]:
    """Live nodes from `ray.nodes()` records (keys NodeID, Alive, NodeManagerAddress, Resources, Labels);
    dead nodes are left out. Raises ConfigError naming the record and field that is malformed, or when no
    node is alive."""
    nodes: list[NodeInfo] = []
    seen: set[str] = set()
    for i, record in enumerate(records):
        if not isinstance(record, Mapping):
            raise ConfigError(f"ray node record {i}: expected a mapping, got {type(record).__name__}")
        node_id = _field(record, i, "NodeID", str)
        if not _field(record, i, "Alive", bool):
            continue
        if not node_id or node_id in seen:
            raise ConfigError(f"ray node record {i}: NodeID {node_id!r} is empty or appears twice")
        seen.add(node_id)
        ip = _field(record, i, "NodeManagerAddress", str)
        raw = _field(record, i, "Resources", Mapping)
        resources: dict[str, float] = {}
        for name, amount in raw.items():
            if not isinstance(amount, (int, float)) or isinstance(amount, bool) or not math.isfinite(amount) \
                    or amount < 0:
                raise ConfigError(f"ray node record {i} ({node_id}): resource {name!r} must be a finite number "
                                  f">= 0, got {amount!r}")
            if not str(name).startswith(_NODE_MARKER):
                resources[str(name)] = float(amount)
        labels = record.get("Labels") or {}
        if not isinstance(labels, Mapping):
            raise ConfigError(f"ray node record {i} ({node_id}): Labels must be a mapping, got "
                              f"{type(labels).__name__}")
        is_head = any(str(name) == "node:__internal_head__" for name in raw)
        nodes.append(NodeInfo(node_id, ip, resources, {str(k): str(v) for k, v in labels.items()}, is_head))
    if not nodes:
        raise ConfigError("ray reports no live node: is the cluster running?")
    return nodes


def check_demand(demand: Mapping[str, float]) -> None:
    """A resource demand names each resource once with a finite amount >= 0, and asks for something."""
    for name, amount in demand.items():
        if not isinstance(name, str) or not name:
            raise ConfigError(f"resource demand: resource names must be non-empty strings, got {name!r}")
        if not isinstance(amount, (int, float)) or isinstance(amount, bool) or not math.isfinite(amount) \
                or amount < 0:
            raise ConfigError(f"resource demand: {name} must be a finite number >= 0, got {amount!r}")
    if not any(amount > 0 for amount in demand.values()):
        raise ConfigError(f"resource demand {dict(demand)}: asks for nothing; every actor needs some resource")


def free_resources(node: NodeInfo, used: Mapping[str, float]) -> dict[str, float]:
    """What is left on `node` after `used` (resources the controller's own actors hold there)."""
    return {name: total - used.get(name, 0.0) for name, total in node.resources.items()}


def fits(node: NodeInfo, used: Mapping[str, float], demand: Mapping[str, float]) -> int:
    """How many more actors of `demand` fit on `node` (0: none), given what is already `used` there."""
    free = free_resources(node, used)
    counts = [math.floor(free.get(name, 0.0) / amount + 1e-9) for name, amount in demand.items() if amount > 0]
    return max(0, min(counts))


def choose_node(nodes: Sequence[NodeInfo], used: Mapping[str, Mapping[str, float]],
                demand: Mapping[str, float], actors_on: Mapping[str, int] | None = None,
                avoid: Collection[str] = ()) -> NodeInfo | None:
    """The node for a new actor asking for `demand`: among nodes where it fits, the one with room for the
    most further actors (most free `expert_slot` / GPU / CPU, whichever the demand asks for), then the one
    holding fewest of the controller's actors (spread), then the lowest node id (deterministic).

    used: node id -> resources the controller's actors hold there. avoid: node ids to use only when no other
    node has room (e.g. where an actor just stopped answering: Ray lists a killed node as alive until its
    health checks fail). Returns None when no node has room (the caller then lets Ray queue the actor until a
    node is added)."""
    check_demand(demand)
    actors_on = actors_on or {}
    room = [(fits(n, used.get(n.node_id, {}), demand), n) for n in nodes]
    candidates = [(r, n) for r, n in room if r > 0 and n.node_id not in avoid] or [(r, n) for r, n in room if r > 0]
    if not candidates:
        return None
    return min(candidates, key=lambda rn: (-rn[0], actors_on.get(rn[1].node_id, 0), rn[1].node_id))[1]


def topology_from_nodes(actor_nodes: Mapping[str, str | None], actors: Sequence[str], slots_per_device: int,
                        links: Links | None = None) -> Topology:
    """The placement policies' `Topology`: one topology node per Ray node, holding the actors placed there,
    in the order the actors are given (a node's position is its first actor's). Actors whose node is unknown
    (not yet scheduled) form one more node of their own."""
    if not actors:
        raise ConfigError("topology from Ray nodes: no actors to place")
    groups: dict[str, list[str]] = {}
    for a in actors:
        groups.setdefault(actor_nodes.get(a) or "unknown", []).append(a)
    return Topology(tuple(tuple(g) for g in groups.values()), slots_per_device, links or Links())
