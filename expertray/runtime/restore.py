"""What a restarted controller resumes from, Ray-free: its snapshot, or (when the snapshot is bad) what is
still running, plus the weights it needs to heal.

A bad snapshot is reported loudly (logged, and kept as `snapshot_error` for `status()`), and the state is
rebuilt from the running cluster instead: routers found by name tell the table they serve (the newest
version wins), and the id counters continue after the highest names found, so serving and healing go on.
Unusable weights (weight store or checkpoint) are reported the same way: experts that still have a live
replica can be healed from it, the others cannot.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from expertray.config import MoELayerConfig
from expertray.errors import CheckpointError
from expertray.layer.reference import MoELayer
from expertray.runtime.snapshot import SnapshotError, load_controller_snapshot
from expertray.runtime.weights import load_weights
from expertray.state.actor_names import ray_name, router_id
from expertray.state.placement_table import PlacementTable

log = logging.getLogger(__name__)


class RunningCluster(Protocol):
    """Named actors in the cluster's namespace, as a restarted controller finds them."""

    def named_actors(self) -> list[str]: ...

    def lookup(self, name: str) -> Any:
        """The handle of the actor named `name`; None when there is none."""

    def router_table(self, handle: Any) -> dict[str, Any]:
        """The table (as a dict) the router serves; bounded, raises when it does not answer."""

    def router_transport(self, handle: Any) -> str: ...


@dataclass
class Resumed:
    """The controller state to resume with; `routers` maps router id -> handle (None: not found)."""

    table: PlacementTable
    routers: dict[str, Any]
    next_actor: int
    next_router: int
    transport: str | None
    history: list[dict[str, Any]] = field(default_factory=list)
    autoscaler: dict[str, Any] = field(default_factory=dict)
    checkpoint: dict[str, Any] = field(default_factory=dict)
    snapshot_error: str | None = None


def resume(snapshot_path: Path, cluster: RunningCluster) -> Resumed:
    """From the snapshot at `snapshot_path`, re-attaching the routers it names; else from `discover`."""
    try:
        table, state = load_controller_snapshot(snapshot_path)
    except SnapshotError as exc:
        log.error("controller restart: SNAPSHOT UNUSABLE (%s); rebuilding state from the running routers "
                  "and actors", exc)
        return discover(cluster, str(exc))
    routers = {r: cluster.lookup(ray_name(r)) for r in state.routers}
    return Resumed(table, routers, state.next_actor, state.next_router, state.transport, list(state.history),
                   state.autoscaler, state.checkpoint)


def discover(cluster: RunningCluster, snapshot_error: str) -> Resumed:
    """Rebuild the table and id counters from the running routers and actors; SnapshotError when no router
    answers (nothing is left to tell the table: the cluster must be relaunched)."""
    names = cluster.named_actors()
    numbers = {kind: [int(m.group(1)) for n in names if (m := re.fullmatch(rf"{ray_name(kind)}-(\d+)", n))]
               for kind in ("router", "expert")}
    routers = {router_id(i): cluster.lookup(ray_name(router_id(i))) for i in sorted(numbers["router"])}
    tables, transport = [], None
    for r, h in routers.items():
        try:
            tables.append(PlacementTable.from_dict(cluster.router_table(h)))
            transport = transport or cluster.router_transport(h)
        except Exception as exc:  # noqa: BLE001 - that router is healed later
            log.warning("controller restart: router %s did not answer: %s", r, exc)
    if not tables:
        raise SnapshotError(f"{snapshot_error}; and no running router could tell its table: relaunch the cluster")
    return Resumed(max(tables, key=lambda t: t.version), routers, max(numbers["expert"], default=-1) + 1,
                   max(numbers["router"], default=-1) + 1, transport, snapshot_error=snapshot_error)


def weight_store(path: Path, layer: MoELayerConfig, num_layers: int) -> tuple[list[MoELayer] | None, str | None]:
    """(the weight store's layers, None), or (None, why it is unusable)."""
    try:
        return load_weights(path, layer, num_layers), None
    except SnapshotError as exc:
        log.error("controller restart: weight store unusable: %s (experts with no live replica cannot be "
                  "restored)", exc)
        return None, str(exc)


def checkpoint(descriptor: dict[str, Any], model: str) -> tuple[dict[str, Any], str | None]:
    """(the checkpoint descriptor to re-read experts from, None), or ({}, why it is unusable). The snapshot's
    descriptor is checked against the shards (a changed checkpoint is reported, not served); without one,
    `model` is described afresh (its digests can then not be compared with what the actors loaded)."""
    from expertray.models.files import CheckpointDescriptor, describe

    try:
        if descriptor:
            CheckpointDescriptor.from_dict(descriptor).verify()
            return descriptor, None
        log.error("controller restart: no checkpoint descriptor in the snapshot; describing %s again", model)
        return describe(model).to_dict(), None
    except CheckpointError as exc:
        log.error("controller restart: checkpoint unusable: %s (experts with no live replica cannot be "
                  "restored)", exc)
        return {}, str(exc)
