"""The controller's ActorPool and RouterPool (expertray/runtime/changes.py) over Ray actor handles.

Every call is bounded: pings by `ping_timeout_s`, weight loads, unloads and table switches by
`control_timeout_s`. `ctl` is the Controller actor's instance: the pools read its handles (`handles`,
`routers`), weight source (`checkpoint` descriptor or weight store `layers`) and config, and ask it to start actors (`_new_actor`) and routers
(`_start_router`) and to persist its state (`_save`).
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import Any

import ray

from expertray.errors import ExpertRayError
from expertray.runtime.changes import ExpertKey
from expertray.runtime.weights import expert_blob
from expertray.state.placement_table import PlacementTable
from expertray.state.ray_nodes import NodeInfo, choose_node, nodes_from_ray

CHECKPOINT_MIN_READ_BPS = 100e6  # an actor reading its slots slower than this (bytes/s) counts as hung


def default_state_dir() -> Path:
    """A per-cluster directory: <Ray session dir>/expertray (the session dir is one per running Ray cluster)."""
    import ray._private.worker as worker  # the session dir has no public accessor in Ray 2.x

    node = worker._global_node
    base = Path(node.get_session_dir_path()) if node is not None else Path(tempfile.gettempdir())
    return base / "expertray"


async def bounded(ref: Any, timeout_s: float, what: str) -> Any:
    """Await a Ray ref (or coroutine) for at most `timeout_s`; TimeoutError names `what` otherwise."""
    try:
        return await asyncio.wait_for(ref, timeout_s)
    except asyncio.TimeoutError:
        raise TimeoutError(f"{what}: no answer within {timeout_s:g} s") from None


def live_nodes() -> list[NodeInfo]:
    """Ray's live nodes (dead ones left out), from the GCS: works without the dashboard."""
    return nodes_from_ray(ray.nodes())


def head_node_options() -> dict[str, Any]:
    """Actor options that pin an actor to the head node: the controller lives there, as `ray up` and KubeRay
    clusters expect, rather than on a worker that may be scaled away. Hard affinity: Ray 2.60 does not always
    honour a soft one for an actor asking for no resources (the controller's num_cpus=0). {} when Ray names no
    head (e.g. a cluster whose nodes are all workers)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    try:
        head = next((n for n in live_nodes() if n.is_head), None)
    except ExpertRayError:
        head = None
    return {} if head is None else {"scheduling_strategy": NodeAffinitySchedulingStrategy(head.node_id, soft=False)}


def actor_location(handle: Any) -> dict[str, str] | None:
    """{"node_id", "ip", "state"} of an actor as the GCS records it; None while it is not placed (pending)
    or unknown. The GCS actor table has no public accessor without the dashboard in Ray 2.x."""
    from ray._private.state import actors as actor_table

    try:
        info = actor_table(actor_id=handle._actor_id.hex())
    except Exception:  # noqa: BLE001 - the location is informative; a failed lookup is "unknown"
        return None
    address = info.get("Address") or {}
    node_id = address.get("NodeID", "")
    if not node_id or set(node_id) == {"f"}:  # the nil id: not scheduled yet
        return None
    return {"node_id": node_id, "ip": address.get("IPAddress", ""), "state": str(info.get("State", ""))}


def node_affinity(demand: dict[str, float], nodes: list[NodeInfo], used: dict[str, dict[str, float]],
                  actors_on: dict[str, int], avoid: Any = ()) -> tuple[str | None, dict[str, Any]]:
    """(chosen node id, actor options) for a new expert actor: a soft NodeAffinitySchedulingStrategy on the
    node `choose_node` picks, or no preference (Ray queues it until a node with room joins) when none fits."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = choose_node(nodes, used, demand, actors_on, avoid)
    if node is None:
        return None, {}
    return node.node_id, {"scheduling_strategy": NodeAffinitySchedulingStrategy(node.node_id, soft=True)}


async def answers(handle: Any, timeout_s: float) -> bool:
    """Whether the actor behind `handle` (None: not running) answers a ping within `timeout_s`."""
    if handle is None:
        return False
    try:
        await asyncio.wait_for(handle.ping.remote(), timeout_s)
        return True
    except Exception:  # noqa: BLE001 - dead, hung or unreachable: all the same to the caller
        return False


class RayActorPool:
    """ActorPool over Ray expert actors (see expertray/runtime/changes.py)."""

    def __init__(self, ctl: Any) -> None:
        self.ctl = ctl

    def has(self, actor: str) -> bool:
        return actor in self.ctl.handles

    def create(self) -> str:
        return self.ctl._new_actor()

    async def ping(self, actor: str) -> bool:
        alive = await answers(self.ctl.handles.get(actor), self.ctl.cfg.ping_timeout_s)
        if actor in self.ctl.handles:
            self.ctl._node_suspect(actor, not alive)
        return alive

    async def load(self, actor: str, keys: list[ExpertKey], source: str | None) -> None:
        """Give `actor` the weights of `keys`: copied from live actor `source`; else, for a checkpoint cluster,
        read by the actor itself from the shards; else from the controller's weight store."""
        handle, ctl = self.ctl.handles[actor], self.ctl
        timeout_s = ctl.cfg.control_timeout_s
        if source is not None:
            call = handle.load.remote(ctl.handles[source].export.remote(keys))
        elif ctl.checkpoint:  # no live replica: the actor re-reads the checkpoint itself
            call = handle.load_checkpoint.remote(ctl.checkpoint, ctl.dtype, keys)
            # a large share of a large checkpoint takes longer than a control call: allow for the bytes
            timeout_s += ctl._expert_bytes() * len(keys) / CHECKPOINT_MIN_READ_BPS
        elif ctl.layers is not None:
            call = handle.load.remote(ray.put(expert_blob(ctl.layers, keys, ctl.dtype)))
        else:
            raise ExpertRayError(f"experts {keys} have no live replica and the weight store is unavailable "
                                 f"({ctl.weights_error}); relaunch the cluster with its weights")
        await bounded(call, timeout_s, f"loading {len(keys)} expert(s) into {actor}")

    async def unload(self, actor: str, keys: list[ExpertKey]) -> None:
        await bounded(self.ctl.handles[actor].unload.remote(keys), self.ctl.cfg.control_timeout_s,
                       f"unloading from {actor}")

    def kill(self, actor: str) -> None:
        handle = self.ctl.handles.pop(actor, None)
        if handle is not None:
            ray.kill(handle, no_restart=True)


class RayRouterPool:
    """RouterPool over Ray router actors (see expertray/runtime/changes.py)."""

    def __init__(self, ctl: Any) -> None:
        self.ctl = ctl

    def ids(self) -> list[str]:
        return list(self.ctl.routers)

    async def ping(self, router: str) -> bool:
        return await answers(self.ctl.routers.get(router), self.ctl.cfg.ping_timeout_s)

    async def set_table(self, router: str, table: PlacementTable, reopen: bool) -> int:
        handle = self.ctl.routers.get(router)
        if handle is None:
            raise ExpertRayError(f"router {router} is not running")
        return await bounded(handle.set_table.remote(table.to_dict(), self.ctl.handles, reopen),
                              self.ctl.cfg.control_timeout_s, f"router {router} switching to v{table.version}")

    async def replace(self, router: str, table: PlacementTable) -> str:
        old = self.ctl.routers.get(router)
        if old is not None:
            ray.kill(old, no_restart=True)
        new_id, handle = await self.ctl._start_router(table)
        self.ctl.routers = {(new_id if r == router else r): (handle if r == router else h)
                            for r, h in self.ctl.routers.items()}
        self.ctl._save()
        return new_id
