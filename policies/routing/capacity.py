"""`capacity`: the gate's choice under the configured capacity and overflow mode (drop, reroute, dropless)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from expertray.config import CapacityConfig
from expertray.layer.capacity import CapacityResult, apply_capacity
from expertray.layer.gating import GateOutput
from expertray.policies.routing import ROUTING, RoutingPolicy


@ROUTING.register("capacity")
@dataclass(frozen=True)
class CapacityRouting(RoutingPolicy):
    """Exactly `apply_capacity(gate, capacity)`; the live load is not used."""

    def route(self, gate: GateOutput, capacity: CapacityConfig,
              expert_load: torch.Tensor | None = None) -> CapacityResult:
        return apply_capacity(gate, capacity)
