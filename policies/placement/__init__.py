"""Placement policies: where each logical expert's replicas (slots) live, given its load and the topology.

A policy plans a whole PlacementTable from the window load [L, E] (tokens per logical expert), the Topology
(actor ids are its device ids) and the current table, which it may try to keep (moving weights costs bytes).

Budget model: every layer is planned on its own with `num_devices × slots_per_device` slots, i.e.
`slots_per_device` bounds how many experts *of one layer* a device holds. Memory across layers is the
autoscaler's concern (it sees per-actor memory); a planner that shared slots across layers would have to
trade one layer's balance against another's, which the window load gives no basis for.

Load model (what balancedness measures): an expert's tokens split evenly over its replicas, as round-robin
replica selection does, so device d carries Σ load[l, e] / replicas[l, e] over its slots of layer l.
`PLACEMENT.create(name, **params)` builds a policy; `round_robin` (no replication, expert e on device e mod D,
O(L · E)) lives here, the others in their own modules: a new policy is one module here registering itself,
plus its name in config.PLACEMENT_POLICIES. The interface, PlacementPolicy, is declared in expertray.seams. Measuring a plan costs O(slots) per table.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from expertray.config import PLACEMENT_POLICIES
from expertray.errors import ConfigError
from expertray.registry import Registry, import_submodules
from expertray.seams import PlacementPolicy
from expertray.state.decisions import Balancedness, PlacementPlan  # noqa: F401 - re-exported
from expertray.state.loadstats import balancedness
from expertray.state.placement_table import PlacementTable, Slot
from expertray.state.topology import Topology

log = logging.getLogger(__name__)


PLACEMENT: Registry[PlacementPolicy] = Registry("placement")


def check_inputs(load: np.ndarray, topology: Topology, current: PlacementTable | None,
                 expert_bytes: int) -> np.ndarray:
    """Validate a plan request; returns load as float64 [L, E].

    Rejects (ConfigError naming the input): load not 2-D, empty, non-finite or negative; expert_bytes < 0;
    fewer slots (devices × slots_per_device) than one layer's experts; a current table of another shape.
    """
    arr = np.asarray(load, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ConfigError(f"placement load: expected shape [layers, experts], got {list(arr.shape)}")
    if not np.isfinite(arr).all() or (arr < 0).any():
        raise ConfigError("placement load: every entry must be a finite number >= 0")
    if expert_bytes < 0:
        raise ConfigError(f"placement expert_bytes: must be >= 0, got {expert_bytes}")
    num_experts = arr.shape[1]
    if num_experts > topology.num_devices * topology.slots_per_device:
        raise ConfigError(f"topology.slots_per_device: {topology.num_devices} devices x "
                          f"{topology.slots_per_device} slots hold fewer than the {num_experts} experts of a layer")
    if current is not None and (current.num_layers, current.num_experts) != arr.shape:
        raise ConfigError(f"placement current: table has {current.num_layers} layers x {current.num_experts} "
                          f"experts, load has {arr.shape[0]} x {arr.shape[1]}")
    return arr


def device_loads(table: PlacementTable, load: np.ndarray) -> np.ndarray:
    """[L, A] tokens per actor (table.actors order) when each expert's load splits evenly over its replicas."""
    rank = {a: i for i, a in enumerate(table.actors)}
    counts = np.array([table.replica_counts(layer) for layer in range(table.num_layers)], dtype=np.float64)
    per_replica = load / counts
    out = np.zeros((table.num_layers, len(table.actors)))
    for s in table.slots:
        out[s.layer, rank[s.actor]] += per_replica[s.layer, s.expert]
    return out


def table_balancedness(table: PlacementTable, load: np.ndarray) -> Balancedness:
    """Balancedness of `table` under load [L, E] (tokens per logical expert), as `device_loads` splits it."""
    per_device = device_loads(table, load)
    return Balancedness(np.array([balancedness(torch.from_numpy(row)) for row in per_device]))


def finish_plan(name: str, slots: list[Slot], load: np.ndarray, topology: Topology,
                current: PlacementTable | None, expert_bytes: int) -> PlacementPlan:
    """Build the table (next version) from a policy's `slots`, measure it against `current` and log it.

    load: [L, E] float64 as check_inputs returns it; `name` is the policy's, for the log line.
    """
    num_layers, num_experts = load.shape
    version = current.version + 1 if current is not None else 0
    table = PlacementTable(version, num_layers, num_experts, tuple(topology.devices), tuple(slots))
    if current is None:
        before_table = PlacementTable.balanced(num_layers, num_experts, topology.devices)
    else:  # the current table with the topology's new devices attached, still empty
        joined = [d for d in topology.devices if d not in current.actors]
        before_table = current.with_slots(current.slots, current.actors + tuple(joined)) if joined else current
    moved = len(set(table.slots) - set(current.slots)) if current is not None else len(table.slots)
    plan = PlacementPlan(table, np.array([table.replica_counts(layer) for layer in range(num_layers)]),
                         table_balancedness(before_table, load), table_balancedness(table, load),
                         moved, moved * expert_bytes)
    log.info("placement %s: v%d, balancedness %.3f -> %.3f, %d slots moved (%d bytes)", name, version,
             plan.balancedness_before.mean, plan.balancedness_after.mean, moved, plan.bytes_moved)
    return plan


@PLACEMENT.register("round_robin")
@dataclass(frozen=True)
class RoundRobinPlacement(PlacementPolicy):
    """No replication, load ignored: expert e of every layer goes to device e mod D (topology order)."""

    def plan(self, load: np.ndarray, topology: Topology, current: PlacementTable | None = None,
             expert_bytes: int = 0) -> PlacementPlan:
        arr = check_inputs(load, topology, current, expert_bytes)
        devices = topology.devices
        slots = [Slot(devices[e % len(devices)], layer, e)
                 for layer in range(arr.shape[0]) for e in range(arr.shape[1])]
        return finish_plan("round_robin", slots, arr, topology, current, expert_bytes)


import_submodules(__name__, __path__)  # each policy module registers itself
PLACEMENT.check(PLACEMENT_POLICIES)
