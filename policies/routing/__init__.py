"""Routing policies: which logical experts each token uses, given the gate's scores and the live load.

A policy turns a GateOutput into a CapacityResult (experts [T, k], -1 for drops; weights [T, k]). Policies
are small frozen dataclasses whose fields are their parameters; `ROUTING.create(name, **params)` builds one.
The interface, RoutingPolicy, is defined in the core (expertray.seams) and re-exported here.
"""

from __future__ import annotations

from expertray.registry import Registry
from expertray.seams import RoutingPolicy

ROUTING: Registry[RoutingPolicy] = Registry("routing")

# Importing the policy modules registers them, so importing this module is enough to use ROUTING.
import expertray.policies.routing.capacity  # noqa: E402,F401
import expertray.policies.routing.laser  # noqa: E402,F401
import expertray.policies.routing.topk  # noqa: E402,F401
