"""The Python API: `launch` a cluster from a config (and weights) or `connect` to a running one.

Where Ray runs: `address=None` starts a Ray of this process's own, bound to 127.0.0.1 (never a guess at
another Ray on the machine); `address="HOST:PORT"` attaches to that existing cluster (`expertray up`, `ray up`,
KubeRay, `ray start`) exactly, and this driver binds the address that reaches it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading

# Ray reads this once, at `import ray`: local Rays bind loopback unless the user chose otherwise. Attaching to a
# multi-node cluster passes the driver's real address explicitly (init_ray), so it does not depend on this.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import math  # noqa: E402
import socket  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402

from expertray.config import ClusterConfig, check_policy_names
from expertray.errors import ConfigError, RequestTimeoutError, RouterUnavailableError
from expertray.layer.reference import MoELayer
from expertray.models.files import CheckpointDescriptor, describe
from expertray.models.pretrained import (
    BACKENDS,
    checkpoint_cluster_config,
    from_pretrained,  # noqa: F401 - expertray.from_pretrained, Ray backend added below
)
from expertray.policies.replica import REPLICA
from expertray.policies.routing import ROUTING
from expertray.runtime.direct import DirectLayers
from expertray.runtime.weights import router_params, serving_dtype
from expertray.state.actor_names import CONTROLLER, NAMESPACE
from expertray.state.placement_table import PlacementTable
from expertray.validation import check_hidden, check_layer
from expertray.wire.collective import from_host_array, to_host_array

DEADLINE_GRACE_S = 2.0  # past a request's deadline, so the router's own RequestTimeoutError arrives first
CONTROL_CALL_S = 10.0  # a bound on small controller queries made by the client
ROUTER_WAIT_S = 0.25  # between looks at the router list while every router is being replaced
# A placement change is three controller steps (load the new slots, switch the routers, unload the old),
# each bounded by control_timeout_s there; the client waits for all of them and a margin.
CHANGE_STEPS = 4
PERSIST_BYTES_PER_S = 50e6  # a slow disk: launch() allows the controller this rate to persist in-memory weights

log = logging.getLogger(__name__)


def init_ray(address: str | None = None, num_cpus: float | None = None) -> None:
    """Ray in the expertray namespace: a new local one on 127.0.0.1 (no dashboard; `num_cpus` logical CPUs,
    default the machine's) when `address` is None, else the existing cluster at `address`, exactly.
    Does nothing when this process already runs Ray (e.g. inside an actor or a Serve replica)."""
    if ray.is_initialized():
        return
    opts: dict[str, Any] = {"namespace": NAMESPACE, "logging_level": "WARNING", "configure_logging": True}
    if address is None:  # "local": never the Ray that $RAY_ADDRESS or /tmp/ray/ray_current_cluster names
        ray.init(address="local", include_dashboard=False, num_cpus=num_cpus, _node_ip_address="127.0.0.1",
                 **opts)
        return
    if num_cpus is not None:
        raise ConfigError(f"num_cpus={num_cpus} applies only to a local Ray this process starts; the cluster at "
                          f"{address!r} already has its resources")
    node_ip = _driver_ip(address)
    if node_ip is not None:
        opts["_node_ip_address"] = node_ip
    ray.init(address=address, **opts)


def local_num_cpus(cfg: ClusterConfig) -> float:
    """Logical CPUs for a local Ray that serves `cfg`: the machine's, or enough for every actor and router plus
    one for Serve and the driver when the config asks for more (logical CPUs may oversubscribe cores; without
    them the actors would wait for resources forever)."""
    needed = cfg.num_expert_actors * cfg.actor_num_cpus + cfg.num_routers * cfg.router_num_cpus + 1
    return max(float(os.cpu_count() or 1), float(math.ceil(needed)))


def _driver_ip(address: str) -> str | None:
    """The address of this host on the route to the Ray head at HOST:PORT (loopback for a local head), or None
    for addresses Ray resolves itself (`auto`, `ray://`). Raises ConfigError when nothing listens there."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address:
        return None
    try:
        head = socket.getaddrinfo(host, int(port), type=socket.SOCK_DGRAM)[0][4][0]
    except OSError as exc:
        raise ConfigError(f"Ray address {address!r}: cannot resolve {host!r} ({exc})") from None
    try:  # fail now, with a clear error, instead of Ray retrying an address where nothing listens
        socket.create_connection((head, int(port)), timeout=5.0).close()
    except OSError as exc:
        raise ConfigError(f"no Ray cluster answers at {address!r} ({exc}); start one (`expertray up`, "
                          "`ray start --head`) or check the address") from None
    if head.startswith("127.") or head == "::1":
        return "127.0.0.1"
    with socket.socket(socket.AF_INET6 if ":" in head else socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((head, int(port)))  # UDP: no packet is sent, the kernel only picks the route
        return s.getsockname()[0]


def random_model(cfg: ClusterConfig) -> list[MoELayer]:
    """Deterministic random weights for every layer (layer l uses seed cfg.seed + 1000·l)."""
    return [MoELayer.random(cfg.layer, seed=cfg.seed + 1000 * layer) for layer in range(cfg.num_layers)]


def to_wire(x: torch.Tensor) -> tuple[np.ndarray, str]:
    """A validated [T, D] tensor as sent to a router: (numpy array, wire dtype). bf16 (no numpy dtype)
    travels as its raw bits with wire dtype "bfloat16", half the bytes of float32; others as themselves
    with wire dtype "" (see RouterActor.forward)."""
    array, name = to_host_array(x.detach())
    return array, name if name == "bfloat16" else ""


def _unwire(out: np.ndarray, wire_dtype: str) -> torch.Tensor:
    """A router's answer (in the request's wire format) as a tensor that owns its memory."""
    return from_host_array(np.array(out), wire_dtype)


class _LoopThread:
    """An asyncio event loop on a daemon thread, for coroutines submitted from synchronous code."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="expertray-client", daemon=True)
        self.thread.start()

    def submit(self, coro: Any) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self, timeout_s: float = CONTROL_CALL_S) -> None:
        """Cancel what still runs (its Futures raise CancelledError), then stop and close the loop."""
        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            self.submit(cancel_all()).result(timeout=timeout_s)
        except concurrent.futures.TimeoutError:
            log.warning("client event loop: requests not cancelled within %g s; stopping it anyway", timeout_s)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=timeout_s)
            if not self.thread.is_alive():
                self.loop.close()


class RayLink:
    """expertray.runtime.direct.ClusterLink over the controller (and a router, for load reports)."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster

    def spec(self) -> dict[str, Any]:
        return ray.get(self.cluster.controller.direct_spec.remote(), timeout=self.cluster.cfg.control_timeout_s)

    def report_failed(self, actors: list[str]) -> None:
        self.cluster.controller.heal.remote("direct client")  # fire and forget: the controller pings them

    def report_load(self, counts: list[list[int]]) -> None:
        routers = self.cluster.routers
        if routers:
            routers[0].record_load.remote(counts)  # fire and forget; balancing reads routers' load windows


class Cluster:
    """A handle on a running expertray cluster (its Controller and routers)."""

    def __init__(self, controller: Any) -> None:
        self.controller = controller
        self.cfg: ClusterConfig = ray.get(controller.get_config.remote(), timeout=CONTROL_CALL_S)
        self.routers: list[Any] = ray.get(controller.get_routers.remote(), timeout=CONTROL_CALL_S)
        self._next = 0
        # routers seen dead: left out of the controller's list until it drops them too (it notices a death
        # only at its next ping); forward_ref learns of one from its ref's completion
        self._dead: set[Any] = set()
        self._client_loop: _LoopThread | None = None
        self._client_loop_lock = threading.Lock()
        self._direct: DirectLayers | None = None

    def _router(self) -> Any:
        if not self.routers:
            self.refresh_routers()
        routers = self.routers  # one list: other threads (forward_future, ref callbacks) may replace it
        if not routers:
            raise RouterUnavailableError("the cluster has no router in service")
        self._next = (self._next + 1) % len(routers)
        return routers[self._next]

    def refresh_routers(self, failed: Any = None) -> None:
        """Take the controller's current router list (dead routers are replaced there), less the routers seen
        dead; without an answer, at least stop using `failed`."""
        if failed is not None:
            self._dead.add(failed)
        try:
            listed = ray.get(self.controller.get_routers.remote(), timeout=CONTROL_CALL_S)
        except (ray.exceptions.RayError, TimeoutError) as exc:
            log.warning("router list not refreshed (controller: %s)", exc)
            if failed is not None and len(self.routers) > 1:
                self.routers = [r for r in self.routers if r != failed]
            return
        listed = [r for r in listed if r is not None]
        self._dead &= set(listed)  # ids are never reused: one the controller no longer lists is gone for good
        self.routers = [r for r in listed if r not in self._dead]

    def _drop_if_died(self, router: Any, answer: concurrent.futures.Future) -> None:
        """A forward_ref's completion: when its router died, stop choosing that router (no controller call
        here, on Ray's callback thread; the next refresh picks up its replacement)."""
        if isinstance(answer.exception(), ray.exceptions.RayActorError):
            self._dead.add(router)
            self.routers = [r for r in self.routers if r != router]

    def validate(self, layer: object, hidden: Any) -> torch.Tensor:
        """Validate a request (layer: any integer type, not bool; hidden: [..., D]) → hidden as [T, D]."""
        check_layer(layer, self.cfg.num_layers)
        return check_hidden(hidden, self.cfg.layer.d_model, self.cfg.max_request_tokens)

    def forward_ref(self, layer: int, hidden: torch.Tensor | np.ndarray) -> ray.ObjectRef:
        """Submit [T, D] hidden states for `layer`; returns a Ray ref to the [T, D] numpy output (bf16 input:
        its raw bits as int16, see exchange.from_host_array). The ref is fixed to one router and is not
        retried if that router dies (later calls avoid it); forward_async / forward_future retry."""
        router = self._router()
        ref = router.forward.remote(layer, *to_wire(self.validate(layer, hidden)))
        ref.future().add_done_callback(lambda answer: self._drop_if_died(router, answer))
        return ref

    def direct(self) -> DirectLayers:
        """This process's direct layers (made on first use): it routes its own tokens and speaks to the expert
        actors over standing channels, with no router hop and no Ray task per call (expertray/runtime/direct.py)."""
        with self._client_loop_lock:
            if self._direct is None:
                self._direct = self.new_direct()
            return self._direct

    def new_direct(self) -> DirectLayers:
        """Direct layers of their own (own channels, own refresh thread): one per thread that calls layers
        concurrently, e.g. an engine's ping-pong lanes. The caller closes it."""
        found = self._ask(self.controller.layer_params.remote())
        dtype = serving_dtype(self.cfg)
        params = router_params(found, dtype) if isinstance(found, dict) else found
        return DirectLayers(self.cfg, [p.in_dtype(getattr(torch, dtype)) for p in params], RayLink(self),
                            ROUTING.create(self.cfg.routing_policy, **self.cfg.routing_params),
                            REPLICA.create(self.cfg.replica_policy))

    def forward(self, layer: int, hidden: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Run one MoE layer on the cluster: [..., D] in, same shape and dtype out.

        By `request_timeout_s` it returns the answer or raises: the router's error (e.g. ExpertUnavailableError),
        RequestTimeoutError, or RouterUnavailableError when routers kept dying. A request whose router died is
        sent again to a live router (the router list is refreshed from the controller). With
        `client_path="direct"` the call routes in this process instead (`direct`)."""
        if self.cfg.client_path == "direct":
            return self.direct().forward(layer, hidden)
        x = self.validate(layer, hidden)
        wire, wire_dtype = to_wire(x)
        deadline = time.monotonic() + self.cfg.request_timeout_s
        while True:
            try:
                router = self._router()
            except RouterUnavailableError:  # every router died: the controller is starting replacements
                if time.monotonic() >= deadline:
                    raise
                time.sleep(ROUTER_WAIT_S)
                continue
            left = deadline - time.monotonic()
            try:
                out = ray.get(router.forward.remote(layer, wire, wire_dtype),
                              timeout=max(left, 0.0) + DEADLINE_GRACE_S)
                break
            except ray.exceptions.GetTimeoutError:
                raise self._timed_out(layer) from None
            except ray.exceptions.RayActorError as exc:  # the router died (not an error it raised)
                self._router_died(layer, router, deadline, exc)
                time.sleep(0.05)
        return _unwire(out, wire_dtype).to(x.dtype).reshape(hidden.shape)

    async def forward_wire(self, layer: int, wire: np.ndarray, wire_dtype: str = "") -> np.ndarray:
        """For async callers (the Serve ingress): a validated [T, D] numpy array in, the router's [T, D] numpy
        answer out, with `forward`'s deadline and retry on a live router when a router dies. wire_dtype
        "bfloat16": `wire` (and the answer) are bf16 as int16 bits (exchange.to_host_array)."""
        deadline = time.monotonic() + self.cfg.request_timeout_s
        while True:
            try:
                router = self._router()
            except RouterUnavailableError:  # every router died: the controller is starting replacements
                if time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(ROUTER_WAIT_S)
                continue
            try:
                return await asyncio.wait_for(router.forward.remote(layer, wire, wire_dtype),
                                              max(deadline - time.monotonic(), 0.0) + DEADLINE_GRACE_S)
            except asyncio.TimeoutError:
                raise self._timed_out(layer) from None
            except ray.exceptions.RayActorError as exc:  # the router died (not an error it raised)
                await asyncio.to_thread(self._router_died, layer, router, deadline, exc)
                await asyncio.sleep(0.05)

    async def forward_async(self, layer: int, hidden: torch.Tensor | np.ndarray) -> torch.Tensor:
        """`forward` for async callers: [..., D] in, same shape and dtype out, with its deadline and retry."""
        x = self.validate(layer, hidden)
        wire, wire_dtype = to_wire(x)
        out = await self.forward_wire(layer, wire, wire_dtype)
        return _unwire(out, wire_dtype).to(x.dtype).reshape(hidden.shape)

    def forward_future(self, layer: int, hidden: torch.Tensor | np.ndarray) -> concurrent.futures.Future:
        """`forward_async` run on this handle's client event loop (one daemon thread, started on first use):
        a non-blocking call for synchronous code; its Future holds the [..., D] answer or the error."""
        with self._client_loop_lock:
            if self._client_loop is None:
                self._client_loop = _LoopThread()
        return self._client_loop.submit(self.forward_async(layer, hidden))

    def _timed_out(self, layer: int) -> RequestTimeoutError:
        return RequestTimeoutError(f"layer {layer}: no answer within request_timeout_s="
                                   f"{self.cfg.request_timeout_s:g} s")

    def _router_died(self, layer: int, router: Any, deadline: float, exc: BaseException) -> None:
        """Refresh the router list (dropping `router`) until it names a router not seen dead (the controller
        replaces dead ones); raise RouterUnavailableError past the deadline."""
        while True:
            self.refresh_routers(failed=router)
            if time.monotonic() >= deadline:
                raise RouterUnavailableError(f"layer {layer}: routers died and no live router answered within "
                                             f"request_timeout_s={self.cfg.request_timeout_s:g} s") from exc
            if self.routers:
                return
            time.sleep(0.25)

    def _ask(self, refs: Any, steps: int = 1) -> Any:
        """ray.get with a deadline: `steps` × control_timeout_s (queries 1, placement changes CHANGE_STEPS);
        past it, GetTimeoutError (a hung controller or router never hangs the caller)."""
        return ray.get(refs, timeout=steps * self.cfg.control_timeout_s)

    def status(self) -> dict[str, Any]:
        return self._ask(self.controller.status.remote())

    def table(self) -> PlacementTable:
        return PlacementTable.from_dict(self._ask(self.controller.get_table.remote()))

    def replicate(self, layer: int, expert: int, actor: str | None = None) -> dict[str, Any]:
        return self._ask(self.controller.replicate.remote(layer, expert, actor), steps=CHANGE_STEPS)

    def migrate(self, layer: int, expert: int, dst: str, src: str | None = None) -> dict[str, Any]:
        return self._ask(self.controller.migrate.remote(layer, expert, dst, src), steps=CHANGE_STEPS)

    def drain(self, actor: str) -> dict[str, Any]:
        return self._ask(self.controller.drain.remote(actor), steps=CHANGE_STEPS)

    def add_actor(self) -> str:
        return self._ask(self.controller.add_actor.remote(), steps=CHANGE_STEPS)

    def rebalance(self, policy: str = "balanced", slots_per_actor: int = 0) -> dict[str, Any]:
        """Re-plan every layer's placement from the observed load (see policies/placement/__init__.py)."""
        return self._ask(self.controller.rebalance.remote(policy, slots_per_actor), steps=CHANGE_STEPS)

    def start_trace(self, path: str) -> list[str]:
        """Record live routing of every router to msgpack traces (one file per router; the router's node)."""
        base = Path(path)
        paths = [str(base) if len(self.routers) == 1 else str(base.with_name(f"{base.stem}-router{i}{base.suffix}"))
                 for i in range(len(self.routers))]
        return self._ask([r.start_trace.remote(p) for r, p in zip(self.routers, paths)])

    def stop_trace(self) -> list[int]:
        """Stop recording; returns each trace file's size in bytes."""
        return self._ask([r.stop_trace.remote() for r in self.routers])

    def autoscale(self, on: bool | None = None) -> dict[str, Any]:
        """Turn the controller's autoscaler on (True) or off (False); None only reports its state."""
        return self._ask(self.controller.autoscale.remote(on))

    def apply_table(self, table: PlacementTable, reason: str = "manual") -> dict[str, Any]:
        return self._ask(self.controller.apply_table.remote(table, reason), steps=CHANGE_STEPS)

    def shutdown(self) -> None:
        """Stop the client event loop (cancelling its requests), the routers, expert actors and the controller."""
        with self._client_loop_lock:
            if self._client_loop is not None:
                self._client_loop.stop()
                self._client_loop = None
            if self._direct is not None:
                self._direct.close()
                self._direct = None
        try:
            ray.get(self.controller.shutdown.remote(), timeout=self.cfg.control_timeout_s)
        finally:
            ray.kill(self.controller, no_restart=True)


def launch(cfg: ClusterConfig, layers: list[MoELayer] | None = None, *, address: str | None = None,
           num_cpus: int | None = None, detached: bool = True,
           checkpoint: CheckpointDescriptor | None = None) -> Cluster:
    """Start a cluster for `cfg` and return its handle.

    With `cfg.model` it serves that checkpoint: the layer shape, MoE layer count and dtype come from it
    (checkpoint_cluster_config), and only its descriptor (`checkpoint`, else described here from the shard
    headers) goes to the controller; every expert actor reads its own slots and every router its gates,
    so no routed expert passes through this process or the controller. Without `model`: `layers`, else
    deterministic random weights (random_model)."""
    from expertray.actors.controller import Controller
    from expertray.actors.pools import head_node_options

    check_policy_names(cfg)
    if cfg.model:
        if layers is not None:
            raise ConfigError("launch: cluster.model names a checkpoint; do not also pass layers")
        cfg = checkpoint_cluster_config(cfg)
        descriptor = checkpoint if checkpoint is not None else describe(cfg.model)
        if Path(descriptor.path).resolve() != Path(cfg.model).resolve():
            raise ConfigError(f"launch: checkpoint descriptor is for {descriptor.path}, config serves {cfg.model}")
        start_args: tuple[Any, ...] = (None, descriptor.to_dict())
    else:
        if checkpoint is not None:
            raise ConfigError("launch: a checkpoint descriptor was given but cluster.model is empty")
        start_args = (layers if layers is not None else random_model(cfg),)
    init_ray(address, num_cpus if num_cpus is not None or address is not None else local_num_cpus(cfg))
    try:
        ray.get_actor(CONTROLLER, namespace=NAMESPACE)
        raise ConfigError("an expertray controller is already running in this Ray cluster; connect() to it "
                          "or shut it down first")
    except ValueError:
        pass
    opts: dict[str, Any] = {"name": CONTROLLER, "namespace": NAMESPACE, "num_cpus": 0}
    opts.update(head_node_options())  # the controller runs on the head, not on a worker that may go away
    if detached:  # survives the driver; restarted by Ray on failure (state restored from the snapshot)
        opts.update(lifetime="detached", max_restarts=-1)
    # the constructor gets only the config, so Ray can re-run it on a restart; the weights (or the checkpoint's
    # descriptor) go to start(), which persists them in the cluster's state directory for that restart
    controller = Controller.options(**opts).remote(cfg, detached)
    deadline_s = start_deadline_s(cfg, layers=start_args[0])
    try:
        ray.get(controller.start.remote(*start_args), timeout=deadline_s)
    except ray.exceptions.GetTimeoutError:
        ray.kill(controller, no_restart=True)
        raise RequestTimeoutError(f"launch: the cluster did not start within {deadline_s:.0f} s (expert actors, "
                                  "weight loads or routers did not come up: are there resources for "
                                  f"{cfg.num_expert_actors} expert actors and {cfg.num_routers} routers? "
                                  "cluster.start_timeout_s bounds a process start, control_timeout_s each step)") from None
    except BaseException:
        ray.kill(controller, no_restart=True)
        raise
    return Cluster(controller)


def start_deadline_s(cfg: ClusterConfig, layers: list[MoELayer] | None) -> float:
    """How long launch() waits for the controller's start: its processes coming up (all together, within
    start_timeout_s), its bounded steps (the actors' loads run together, then each router in turn, each within
    control_timeout_s), one step of slack for the controller's own start, and the time to persist in-memory
    weights at PERSIST_BYTES_PER_S."""
    persist_bytes = sum(m.experts.nbytes for m in layers or [])
    return (cfg.start_timeout_s + (cfg.num_routers + 2) * cfg.control_timeout_s
            + persist_bytes / PERSIST_BYTES_PER_S)


def connect(address: str | None = None, timeout_s: float = 30.0) -> Cluster:
    """Attach to the running cluster's controller: in the Ray this process already runs, else at `address`,
    else at the head `expertray up` started (its record: expertray.cli.localhead). Raises ConfigError saying what
    to do when there is no cluster or its controller does not answer within `timeout_s`."""
    if not ray.is_initialized():
        from expertray.cli.localhead import read_state, use_head

        state = read_state()
        if address is None:
            if state is None:
                raise ConfigError("no expertray cluster is up on this machine: start one with `expertray up`, or "
                                  "pass address='HOST:PORT' (CLI: --address) for an existing Ray cluster")
            address = state.address
        if state is not None and state.address == address:
            use_head(state)
        init_ray(address)
    where = f"at {address!r}" if address else "in this Ray"
    try:
        controller = ray.get_actor(CONTROLLER, namespace=NAMESPACE)
    except ValueError:
        raise ConfigError(f"no expertray controller found in the Ray cluster {where} (never started, stopped or "
                          "died): `expertray down` then `expertray up`, or expertray.launch(), starts one") from None
    try:
        ray.get(controller.info.remote(), timeout=timeout_s)
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as exc:
        raise ConfigError(f"the expertray controller in the Ray cluster {where} does not answer "
                          f"({type(exc).__name__}); `expertray down` then `expertray up` restarts it") from None
    return Cluster(controller)


def ray_backend(descriptor: CheckpointDescriptor, cfg: ClusterConfig, detached: bool = False,
                **launch_options: Any) -> Cluster:
    """The `from_pretrained` backend "ray": a cluster from `launch`, which sends only `descriptor` out (each
    expert actor reads its own slots, each router its gates and shared experts); not detached, it lives with
    the calling process. `launch_options`: address, num_cpus."""
    return launch(cfg, detached=detached, checkpoint=descriptor, **launch_options)


BACKENDS["ray"] = ray_backend
