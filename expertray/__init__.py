"""expertray: elastic expert-parallel runtime for Mixture-of-Experts inference on Ray.

The public surface is `__all__`: `launch` a cluster from a config (or `connect` to a running one) and get a
`Cluster` handle; the config classes; the errors every interface raises. `import expertray` imports
neither Ray nor torch: the configs and errors are plain Python, and the rest loads on first use, so a
machine without Ray (a GPU box running the layer alone) can import the package.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from expertray.config import CapacityConfig, ClusterConfig, GateConfig, MoELayerConfig
from expertray.errors import (
    BackpressureError,
    CheckpointError,
    ConfigError,
    ExpertRayError,
    ExpertUnavailableError,
    InputError,
    NoChangeError,
    OversizeError,
    RequestTimeoutError,
    RouterUnavailableError,
    TraceFormatError,
    TransportError,
    UnknownExpertError,
)

if TYPE_CHECKING:
    from expertray.api import Cluster, connect, launch
    from expertray.layer.reference import MoELayer
    from expertray.state.placement_table import PlacementTable

__version__ = "0.1.0"

# name → module that defines it; imported on first attribute access (these pull in Ray or torch)
_LAZY = {
    "launch": "expertray.api",
    "connect": "expertray.api",
    "Cluster": "expertray.api",
    "MoELayer": "expertray.layer.reference",
    "PlacementTable": "expertray.state.placement_table",
}

__all__ = [
    "launch", "connect", "from_pretrained", "Cluster", "MoELayer", "PlacementTable",
    "ClusterConfig", "MoELayerConfig", "GateConfig", "CapacityConfig",
    "ExpertRayError", "ConfigError", "InputError", "OversizeError", "UnknownExpertError", "TraceFormatError",
    "ExpertUnavailableError", "TransportError", "BackpressureError", "RequestTimeoutError",
    "RouterUnavailableError", "NoChangeError", "CheckpointError",
]


def from_pretrained(path: str, *, backend: str | Any = "ray", **cluster_options: Any) -> tuple[Any, Any]:
    """(transformers model, cluster) serving checkpoint `path` (expertray.models.pretrained.from_pretrained):
    backend "ray" (a new cluster; imports Ray), "in_process" (no Ray) or a backend callable."""
    if backend == "ray":
        importlib.import_module("expertray.api")  # registers the "ray" backend
    build = importlib.import_module("expertray.models.pretrained").from_pretrained
    return build(path, backend=backend, **cluster_options)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'expertray' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
