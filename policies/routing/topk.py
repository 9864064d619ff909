"""`topk`: the gate's own choice, dropless (capacity is ignored)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from expertray.config import CapacityConfig
from expertray.layer.capacity import CapacityResult
from expertray.layer.gating import GateOutput
from expertray.policies.routing import ROUTING, RoutingPolicy


@ROUTING.register("topk")
@dataclass(frozen=True)
class TopKRouting(RoutingPolicy):
    """Every token goes to its gate's top-k experts with the gate's weights; nothing is dropped."""

    def route(self, gate: GateOutput, capacity: CapacityConfig,
              expert_load: torch.Tensor | None = None) -> CapacityResult:
        return CapacityResult(gate.experts, gate.weights, None, 0, 0)
