"""Routing policies: which logical experts each token uses, given the gate's scores and the live load.

A policy turns a GateOutput into a CapacityResult (experts [T, k], -1 for drops; weights [T, k]). Policies
are small frozen dataclasses whose fields are their parameters; `ROUTING.create(name, **params)` builds one.
A new policy is one module here registering itself, plus its name in config.ROUTING_POLICIES.
The interface, RoutingPolicy, is defined in the core (expertray.seams) and re-exported here.
"""

from __future__ import annotations

from expertray.config import ROUTING_POLICIES
from expertray.registry import Registry, import_submodules
from expertray.seams import RoutingPolicy

__all__ = ["ROUTING", "RoutingPolicy"]

ROUTING: Registry[RoutingPolicy] = Registry("routing")

import_submodules(__name__, __path__)  # each policy module registers itself
ROUTING.check(ROUTING_POLICIES)
