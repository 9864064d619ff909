"""The Python API: `launch` a cluster from a config (and weights) or `connect` to a running one."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from expertray.config import ClusterConfig, check_policy_names
from expertray.errors import ConfigError, UnknownExpertError
from expertray.layer import MoELayer
from expertray.placement import PlacementTable
from expertray.validation import check_hidden

NAMESPACE = "expertray"
CONTROLLER = "controller"


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
        self.cfg: ClusterConfig = ray.get(controller.get_config.remote())
        self.routers: list[Any] = ray.get(controller.get_routers.remote())
        self._next = 0

    def _router(self) -> Any:
        self._next = (self._next + 1) % len(self.routers)
        return self.routers[self._next]

    def _check(self, layer: int, hidden: Any) -> torch.Tensor:
        if not isinstance(layer, int) or not (0 <= layer < self.cfg.num_layers):
            raise UnknownExpertError(f"unknown layer {layer!r} (cluster serves layers 0..{self.cfg.num_layers - 1})")
        return check_hidden(hidden, self.cfg.layer.d_model, self.cfg.max_request_tokens)

    def forward_ref(self, layer: int, hidden: torch.Tensor | np.ndarray) -> ray.ObjectRef:
        """Submit [T, D] hidden states for `layer`; returns a Ray ref to the [T, D] numpy output."""
        return self._router().forward.remote(layer, _wire(self._check(layer, hidden)))

    def forward(self, layer: int, hidden: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Run one MoE layer on the cluster: [..., D] in, same shape and dtype out."""
        x = self._check(layer, hidden)
        out = torch.from_numpy(np.array(ray.get(self._router().forward.remote(layer, _wire(x)))))
        return out.to(x.dtype).reshape(hidden.shape)

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
        ray.get(self.controller.shutdown.remote())
        ray.kill(self.controller)


def launch(cfg: ClusterConfig, layers: list[MoELayer] | None = None, *, address: str | None = None,
           num_cpus: int | None = None, detached: bool = True) -> Cluster:
    """Start a cluster for `cfg` (random weights unless `layers` are given) and return its handle."""
    from expertray.actors.controller import Controller

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
    if detached:  # survives the driver; restarted by Ray on failure (state restored from the snapshot)
        opts.update(lifetime="detached", max_restarts=-1)
    weights_path = ""
    if cfg.snapshot_path:  # a restarted controller must find its weight store without the driver
        weights_path = cfg.snapshot_path + ".weights.pt"
        torch.save(layers, weights_path)
    controller = Controller.options(**opts).remote(cfg, None if weights_path else layers, detached, weights_path)
    ray.get(controller.start.remote())
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
