"""Routing policies: which logical experts each token uses, given the gate's scores and the live load.

A policy turns a GateOutput into a CapacityResult (experts [T, k], -1 for drops; weights [T, k]). Policies
are small frozen dataclasses whose fields are their parameters; `ROUTING.create(name, **params)` builds one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from expertray.capacity import CapacityResult
from expertray.config import CapacityConfig
from expertray.gating import GateOutput
from expertray.placement import LayerRoute
from expertray.policies.registry import Registry


class RoutingPolicy(ABC):
    """Interface of every routing policy."""

    @abstractmethod
    def route(self, gate: GateOutput, capacity: CapacityConfig,
              expert_load: torch.Tensor | None = None) -> CapacityResult:
        """Choose experts for gate.experts.shape[0] tokens.

        expert_load: [E] load each logical expert already carries (e.g. LoadStats.window_load); load-aware
        policies add this batch's own assignments to it as they go. None means no prior load.
        """

    def for_layer(self, layer: int) -> RoutingPolicy:
        """The policy to use at `layer` (policies with per-layer parameters override this)."""
        return self

    def for_route(self, route: LayerRoute) -> RoutingPolicy:
        """The policy to use with the live placement of one layer, `route` (the router calls this for every
        batch, after `for_layer`); a policy that prices load per device builds its expert -> device map from
        it. The default ignores the placement."""
        return self


ROUTING: Registry[RoutingPolicy] = Registry("routing")

# Importing the policy modules registers them, so importing this module is enough to use ROUTING.
from expertray.policies import routing_capacity, routing_laser, routing_topk  # noqa: E402,F401
