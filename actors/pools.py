"""The Ray side of the controller's Ray-free logic (expertray/runtime/): the ActorPool and RouterPool of
changes.py, the liveness Probe, the autoscaler's Cluster and restore's RunningCluster, over actor handles.

Every call is bounded: liveness pings and suspect pushes by `liveness_timeout_s`, pings and stats by
`ping_timeout_s`, weight loads, unloads and table switches by `control_timeout_s`. `ctl` is the Controller
actor's instance: the adapters read its handles (`handles`, `routers`), weight source (`checkpoint`
descriptor or weight store `layers`) and config, and ask it to start actors (`_new_actor`) and routers
(`_start_router`) and to persist its state (`_save`).
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import ActorDiedError

from expertray.errors import ExpertRayError
from expertray.policies.autoscale import Signals
from expertray.runtime.changes import ExpertKey, PlacementControl
from expertray.runtime.liveness import Reply
from expertray.runtime.weights import expert_blob
from expertray.state.actor_names import NAMESPACE, ray_name
from expertray.state.placement_table import PlacementTable
from expertray.state.ray_nodes import NodeInfo, nodes_from_ray

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


def child_options(name: str, num_cpus: float, num_gpus: float, detached: bool) -> dict[str, Any]:
    """Options of an actor the controller starts, named in expertray's namespace; a detached one outlives a
    controller restart and keeps serving."""
    opts: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": num_gpus, "name": name, "namespace": NAMESPACE}
    if detached:
        opts["lifetime"] = "detached"
    return opts


def affinity_options(node_id: str | None) -> dict[str, Any]:
    """Actor options preferring `node_id` (a soft NodeAffinitySchedulingStrategy); {} without one: Ray places
    the actor, or queues it until a node with room joins."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if node_id is None:
        return {}
    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id, soft=True)}


def lookup(name: str) -> Any:
    """The handle of the actor named `name` in expertray's namespace; None when there is none."""
    try:
        return ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return None


def strays(known: set[str]) -> list[Any]:
    """Handles of expertray's named expert actors and routers whose ids are not in `known`: started by an
    earlier incarnation of a restarted controller that died before recording them (a heal or an add in
    flight), so neither the snapshot nor the routers' tables name them."""
    prefix = ray_name("")
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["namespace"] == NAMESPACE and a["name"].startswith(prefix)]
    return [h for n in names if n[len(prefix):] not in known and (h := lookup(n)) is not None]


def request_resources(bundles: list[dict[str, float]]) -> None:
    """Send `bundles` as the cluster's standing autoscaler request ([]: withdraw it)."""
    from ray.autoscaler.sdk import request_resources as send

    send(bundles=bundles)


async def answers(handle: Any, timeout_s: float, method: str = "ping") -> bool:
    """Whether the actor behind `handle` (None: not running) answers `method` (no arguments) within `timeout_s`
    with a true value (`ping` answers its id)."""
    if handle is None:
        return False
    try:
        return bool(await asyncio.wait_for(getattr(handle, method).remote(), timeout_s))
    except Exception:  # noqa: BLE001 - dead, hung or unreachable: all the same to the caller
        return False


async def call_routers(routers: dict[str, Any], method: str, args: tuple, timeout_s: float
                       ) -> list[tuple[str, Any]]:
    """Call `method(*args)` on every router at once, each bounded by `timeout_s`: (router id, its reply or the
    exception it ended with), in router order; a router without a handle (not found after a restart) ends
    with an ExpertRayError."""
    async def one(router: str, handle: Any) -> Any:
        if handle is None:
            raise ExpertRayError(f"{router} is not running")
        return await bounded(getattr(handle, method).remote(*args), timeout_s, f"{router}.{method}")

    ids = list(routers)
    replies = await asyncio.gather(*[one(r, routers[r]) for r in ids], return_exceptions=True)
    return list(zip(ids, replies))


class _ControllerSide:
    """An adapter the controller's Ray-free parts call through: it reads the Controller actor `ctl` it wraps."""

    def __init__(self, ctl: Any) -> None:
        self.ctl = ctl


class _ExpertActorsSide(_ControllerSide):
    def has(self, actor: str) -> bool:
        """Whether the controller still holds expert actor `actor` (a heal has not killed it)."""
        return actor in self.ctl.handles


class RayActorPool(_ExpertActorsSide):
    """ActorPool over Ray expert actors (see expertray/runtime/changes.py)."""

    def create(self) -> str:
        return self.ctl._new_actor()

    async def ping(self, actor: str) -> bool:
        alive = await answers(self.ctl.handles.get(actor), self.ctl.cfg.ping_timeout_s)
        if actor in self.ctl.handles:
            self.ctl.nodes.ping_result(actor, not alive)
        return alive

    async def stats(self) -> dict[str, dict[str, Any]]:
        """Every table actor's stats ({"alive": True, ...}), or {"alive": False, "error"} for one that is not
        running or does not answer within ping_timeout_s."""
        ids = list(self.ctl.table.actors)

        async def one(a: str) -> Any:
            handle = self.ctl.handles.get(a)
            if handle is None:
                raise ExpertRayError(f"{a} is not running")
            return await bounded(handle.stats.remote(), self.ctl.cfg.ping_timeout_s, f"{a}.stats")

        replies = await asyncio.gather(*[one(a) for a in ids], return_exceptions=True)
        return {a: {"alive": False, "error": str(r).splitlines()[0]} if isinstance(r, BaseException)
                else {"alive": True, **r} for a, r in zip(ids, replies)}

    async def started(self, actor: str) -> None:
        """Wait (within start_timeout_s) until a new actor's process answers: its start (scheduling, imports, a
        node the autoscaler adds) is not a control step, and on a busy host it takes longer than one."""
        ctl = self.ctl
        if actor in ctl.starting:
            await bounded(ctl.handles[actor].ping.remote(), ctl.cfg.start_timeout_s, f"starting {actor}")
            ctl.starting.discard(actor)

    async def load(self, actor: str, keys: list[ExpertKey], source: str | None) -> None:
        """Give `actor` the weights of `keys`: copied from live actor `source`; else, for a checkpoint cluster,
        read by the actor itself from the shards; else from the controller's weight store. A new actor's
        process is first given start_timeout_s to come up."""
        await self.started(actor)
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
        self.ctl.starting.discard(actor)
        self.ctl.endpoints.pop(actor, None)
        handle = self.ctl.handles.pop(actor, None)
        if handle is not None:
            ray.kill(handle, no_restart=True)


class RayRouterPool(_ControllerSide):
    """RouterPool over Ray router actors (see expertray/runtime/changes.py)."""

    def ids(self) -> list[str]:
        return list(self.ctl.routers)

    async def ping(self, router: str) -> bool:
        """Whether the router answers and serves (started; see RouterActor.serving) within ping_timeout_s."""
        return await answers(self.ctl.routers.get(router), self.ctl.cfg.ping_timeout_s, "serving")

    async def call_all(self, method: str) -> tuple[list[tuple[str, Any]], list[dict[str, Any]]]:
        """Call `method` on every router (ping_timeout_s each): (id, reply) of those that answered, and
        {"router", "alive", "error"} for those that did not."""
        replies = await call_routers(self.ctl.routers, method, (), self.ctl.cfg.ping_timeout_s)
        ok = [(r, x) for r, x in replies if not isinstance(x, BaseException)]
        down = [{"router": r, "alive": False, "error": str(x).splitlines()[0] if str(x) else type(x).__name__}
                for r, x in replies if isinstance(x, BaseException)]
        return ok, down

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


class RayProbe(_ExpertActorsSide):
    """The liveness loop's Probe (expertray/runtime/liveness_loop.py), bounded by `liveness_timeout_s`."""

    async def ping(self, actor: str) -> Reply:
        """One expert actor's ping (it answers on a thread of its own, beside its compute)."""
        handle = self.ctl.handles.get(actor)
        if handle is None:
            return Reply.DIED
        try:
            await asyncio.wait_for(handle.ping.remote(), self.ctl.cfg.liveness_timeout_s)
            return Reply.ANSWERED
        except ActorDiedError:
            return Reply.DIED
        except Exception:  # noqa: BLE001 - no answer in time, or unreachable for now (a lost node): silent
            return Reply.SILENT

    async def push(self, suspects: list[str], recovered: list[str]) -> tuple[int, list[str]]:
        """Every router at once (a late call is still delivered; a router that misses one gets the next)."""
        routers = {r: h for r, h in self.ctl.routers.items() if h is not None}
        replies = await call_routers(routers, "suspect", (suspects, recovered), self.ctl.cfg.liveness_timeout_s)
        return len(replies), [r for r, x in replies if isinstance(x, BaseException)]


class RayScaling(_ControllerSide):
    """The autoscaler's Cluster (expertray/runtime/autoscaling.py): the controller's signals and actors."""

    @property
    def control(self) -> PlacementControl:
        return self.ctl.control

    async def signals(self) -> Signals:
        return await self.ctl.signals()

    async def add_actor(self, reason: str) -> str:
        return await self.ctl._add_actor(reason)

    def ask_for_room(self, why: str) -> bool:
        return bool(self.ctl._ask_for_room(why))

    def count_action(self, kind: str) -> None:
        self.ctl.metrics.count_action(kind)


class RayRunningCluster:
    """restore's RunningCluster (expertray/runtime/restore.py): named actors, routers asked within `timeout_s`."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s

    def named_actors(self) -> list[str]:
        return ray.util.list_named_actors()

    def lookup(self, name: str) -> Any:
        return lookup(name)

    def router_table(self, handle: Any) -> dict[str, Any]:
        return ray.get(handle.get_table.remote(), timeout=self.timeout_s)

    def router_transport(self, handle: Any) -> str:
        return ray.get(handle.stats.remote(), timeout=self.timeout_s)["transport"]
