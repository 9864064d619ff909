"""The Python API: `launch` a cluster from a config (and weights) or `connect` to a running one."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from expertray.config import ClusterConfig, check_policy_names
from expertray.errors import ConfigError, RequestTimeoutError, RouterUnavailableError, UnknownExpertError
from expertray.layer import MoELayer
from expertray.placement import PlacementTable
from expertray.validation import check_hidden

NAMESPACE = "expertray"
CONTROLLER = "controller"
DEADLINE_GRACE_S = 2.0  # past a request's deadline, so the router's own RequestTimeoutError arrives first
CONTROL_CALL_S = 10.0  # a bound on small controller queries made by the client

log = logging.getLogger(__name__)


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join (or start) Ray in the expertray namespace; local clusters bind loopback, no dashboard."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(address=address, namespace=NAMESPACE, include_dashboard=False, num_cpus=num_cpus,
             logging_level="WARNING", configure_logging=True)


def random_model(cfg: ClusterConfig) -> list[MoELayer]:
    """Deterministic random weights for every layer (layer l uses seed cfg.seed + 1000·l)."""
    return [MoELayer.random(cfg.layer, seed=cfg.seed + 1000 * layer) for layer in range(cfg.num_layers)]


def _wire(x: torch.Tensor) -> np.ndarray:
    """A validated [T, D] tensor as the numpy array sent to a router (bf16 has no numpy dtype: fp32)."""
    x = x.detach()
    return (x.float() if x.dtype == torch.bfloat16 else x).numpy()


class Cluster:
    """A handle on a running expertray cluster (its Controller and routers)."""

    def __init__(self, controller: Any) -> None:
        self.controller = controller
        self.cfg: ClusterConfig = ray.get(controller.get_config.remote(), timeout=CONTROL_CALL_S)
        self.routers: list[Any] = ray.get(controller.get_routers.remote(), timeout=CONTROL_CALL_S)
        self._next = 0

    def _router(self) -> Any:
        if not self.routers:
            self.refresh_routers()
        if not self.routers:
            raise RouterUnavailableError("the cluster has no router in service")
        self._next = (self._next + 1) % len(self.routers)
        return self.routers[self._next]

    def refresh_routers(self, failed: Any = None) -> None:
        """Take the controller's current router list (dead routers are replaced there); without an answer,
        at least stop using `failed`."""
        try:
            self.routers = ray.get(self.controller.get_routers.remote(), timeout=CONTROL_CALL_S)
        except (ray.exceptions.RayError, TimeoutError) as exc:
            log.warning("router list not refreshed (controller: %s)", exc)
            if failed is not None and len(self.routers) > 1:
                self.routers = [r for r in self.routers if r != failed]

    def _check(self, layer: int, hidden: Any) -> torch.Tensor:
        if not isinstance(layer, int) or not (0 <= layer < self.cfg.num_layers):
            raise UnknownExpertError(f"unknown layer {layer!r} (cluster serves layers 0..{self.cfg.num_layers - 1})")
        return check_hidden(hidden, self.cfg.layer.d_model, self.cfg.max_request_tokens)

    def forward_ref(self, layer: int, hidden: torch.Tensor | np.ndarray) -> ray.ObjectRef:
        """Submit [T, D] hidden states for `layer`; returns a Ray ref to the [T, D] numpy output."""
        return self._router().forward.remote(layer, _wire(self._check(layer, hidden)))

    def forward(self, layer: int, hidden: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Run one MoE layer on the cluster: [..., D] in, same shape and dtype out.

        By `request_timeout_s` it returns the answer or raises: the router's error (e.g. ExpertUnavailableError),
        RequestTimeoutError, or RouterUnavailableError when routers kept dying. A request whose router died is
        sent again to a live router (the router list is refreshed from the controller)."""
        x = self._check(layer, hidden)
        wire = _wire(x)
        deadline = time.monotonic() + self.cfg.request_timeout_s
        while True:
            router = self._router()
            left = deadline - time.monotonic()
            try:
                out = ray.get(router.forward.remote(layer, wire), timeout=max(left, 0.0) + DEADLINE_GRACE_S)
                break
            except ray.exceptions.GetTimeoutError:
                raise self._timed_out(layer) from None
            except ray.exceptions.RayActorError as exc:  # the router died (not an error it raised)
                self._router_died(layer, router, deadline, exc)
                time.sleep(0.05)
        out = torch.from_numpy(np.array(out))
        return out.to(x.dtype).reshape(hidden.shape)

    async def forward_wire(self, layer: int, wire: np.ndarray) -> np.ndarray:
        """For async callers (the Serve ingress): a validated [T, D] numpy array in, the router's [T, D] numpy
        answer out, with `forward`'s deadline and retry on a live router when a router dies."""
        deadline = time.monotonic() + self.cfg.request_timeout_s
        while True:
            router = self._router()
            try:
                return await asyncio.wait_for(router.forward.remote(layer, wire),
                                              max(deadline - time.monotonic(), 0.0) + DEADLINE_GRACE_S)
            except asyncio.TimeoutError:
                raise self._timed_out(layer) from None
            except ray.exceptions.RayActorError as exc:  # the router died (not an error it raised)
                await asyncio.to_thread(self._router_died, layer, router, deadline, exc)
                await asyncio.sleep(0.05)

    def _timed_out(self, layer: int) -> RequestTimeoutError:
        return RequestTimeoutError(f"layer {layer}: no answer within request_timeout_s="
                                   f"{self.cfg.request_timeout_s:g} s")

    def _router_died(self, layer: int, router: Any, deadline: float, exc: BaseException) -> None:
        """Refresh the router list (dropping `router`); raise RouterUnavailableError past the deadline."""
        self.refresh_routers(failed=router)
        if time.monotonic() >= deadline:
            raise RouterUnavailableError(f"layer {layer}: routers died and no live router answered within "
                                         f"request_timeout_s={self.cfg.request_timeout_s:g} s") from exc

    def status(self) -> dict[str, Any]:
        return ray.get(self.controller.status.remote())

    def table(self) -> PlacementTable:
        return PlacementTable.from_dict(ray.get(self.controller.get_table.remote()))

    def replicate(self, layer: int, expert: int, actor: str | None = None) -> dict[str, Any]:
        return ray.get(self.controller.replicate.remote(layer, expert, actor))

    def migrate(self, layer: int, expert: int, dst: str, src: str | None = None) -> dict[str, Any]:
        return ray.get(self.controller.migrate.remote(layer, expert, dst, src))

    def drain(self, actor: str) -> dict[str, Any]:
        return ray.get(self.controller.drain.remote(actor))

    def add_actor(self) -> str:
        return ray.get(self.controller.add_actor.remote())

    def rebalance(self, policy: str = "balanced", slots_per_actor: int = 0) -> dict[str, Any]:
        """Re-plan every layer's placement from the observed load (see policies/placement.py)."""
        return ray.get(self.controller.rebalance.remote(policy, slots_per_actor))

    def start_trace(self, path: str) -> list[str]:
        """Record live routing of every router to msgpack traces (one file per router; the router's node)."""
        base = Path(path)
        paths = [str(base) if len(self.routers) == 1 else str(base.with_name(f"{base.stem}-router{i}{base.suffix}"))
                 for i in range(len(self.routers))]
        return ray.get([r.start_trace.remote(p) for r, p in zip(self.routers, paths)])

    def stop_trace(self) -> list[int]:
        """Stop recording; returns each trace file's size in bytes."""
        return ray.get([r.stop_trace.remote() for r in self.routers])

    def autoscale(self, on: bool | None = None) -> dict[str, Any]:
        """Turn the controller's autoscaler on (True) or off (False); None only reports its state."""
        return ray.get(self.controller.autoscale.remote(on))

    def apply_table(self, table: PlacementTable, reason: str = "manual") -> dict[str, Any]:
        return ray.get(self.controller.apply_table.remote(table, reason))

    def shutdown(self) -> None:
        """Stop the routers, expert actors and the controller."""
        try:
            ray.get(self.controller.shutdown.remote(), timeout=self.cfg.control_timeout_s)
        finally:
            ray.kill(self.controller, no_restart=True)


def launch(cfg: ClusterConfig, layers: list[MoELayer] | None = None, *, address: str | None = None,
           num_cpus: int | None = None, detached: bool = True) -> Cluster:
    """Start a cluster for `cfg` (random weights unless `layers` are given) and return its handle."""
    from expertray.actors.controller import Controller
    from expertray.actors.pools import head_node_options

    check_policy_names(cfg)
    init_ray(address, num_cpus)
    layers = layers if layers is not None else random_model(cfg)
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
    # the constructor gets only the config, so Ray can re-run it on a restart; the weights go to start(),
    # which persists them (safetensors) in the cluster's state directory for that restart
    controller = Controller.options(**opts).remote(cfg, detached)
    try:
        ray.get(controller.start.remote(layers))
    except BaseException:
        ray.kill(controller, no_restart=True)
        raise
    return Cluster(controller)


def connect(address: str | None = "auto") -> Cluster:
    """Attach to the running cluster's controller."""
    init_ray(address)
    try:
        controller = ray.get_actor(CONTROLLER, namespace=NAMESPACE)
    except ValueError:
        raise ConfigError(f"no expertray controller found in the Ray cluster at {address!r}; "
                          "start one with `expertray up` or expertray.launch()") from None
    return Cluster(controller)
