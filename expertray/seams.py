"""The two interfaces the router's data path calls, defined once: RoutingPolicy and ReplicaSelector.

`pipeline.prepare` calls them; the implementations live in policies/ (routing*.py, replica.py), which
depends on this core package and registers each implementation by its config name (ROUTING, REPLICA).
T tokens, k choices per token, E logical experts of the layer, S_l destinations (physical slots) of it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from expertray.config import CapacityConfig
from expertray.layer.capacity import CapacityResult
from expertray.layer.gating import GateOutput
from expertray.state.placement_table import LayerRoute


class RoutingPolicy(ABC):
    """Which logical experts each token uses: GateOutput → CapacityResult (experts [T, k], -1 for a drop;
    weights [T, k])."""

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


class ReplicaSelector(ABC):
    """Which physical copy (destination) of its logical expert each assignment goes to."""

    @abstractmethod
    def select(self, experts: torch.Tensor, route: LayerRoute, dest_load: torch.Tensor | None = None,
               local_actors: set[int] | None = None) -> torch.Tensor:
        """Destinations [T, k] (indices into the route's S_l destinations) for logical experts [T, k];
        -1 (dropped) stays -1.

        dest_load: [S_l] load each destination already carries; local_actors: actor indices (into the
        table's actors) the caller would rather use, e.g. those on its own node.
        """
