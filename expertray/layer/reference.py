"""In-process MoE layer: gate → capacity → dispatch plan → grouped experts → combine (the reference path).

Dtypes: expert (and shared-expert) weights may be bfloat16, float16 or float32; experts compute in their
weights' dtype, the gate always in float32 (as the transformers references do), and the output comes back
in the input's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from expertray.config import MoELayerConfig
from expertray.layer.capacity import apply_capacity
from expertray.layer.dispatch import build_plan
from expertray.layer.experts import (
    ExpertBiases,
    ExpertWeights,
    SharedExpert,
    fused_experts_combine,
    fused_experts_combine_general,
)
from expertray.layer.gating import GateOutput, GateWeights, gate, gating_rule
from expertray.validation import check_hidden


@dataclass(frozen=True)
class MoEOutput:
    """output [T, D]; expert_counts [E] routed rows per logical expert; drops/reroutes counted."""

    output: torch.Tensor
    gate: GateOutput
    experts: torch.Tensor
    expert_counts: torch.Tensor
    num_dropped: int
    num_rerouted: int
    capacity: int | None


class MoELayer:
    """One MoE layer held in this process. `forward` on [T, D] (or [..., D]) returns the same shape."""

    def __init__(self, cfg: MoELayerConfig, gate_weights: GateWeights, experts: ExpertWeights,
                 shared: SharedExpert | None = None, biases: ExpertBiases | None = None) -> None:
        if experts.num_slots != cfg.num_experts or experts.d_model != cfg.d_model or experts.d_ff != cfg.d_ff:
            raise ValueError(f"expert weights {experts.num_slots}x[{experts.d_ff}x{experts.d_model}] do not match "
                             f"config {cfg.num_experts}x[{cfg.d_ff}x{cfg.d_model}]")
        if tuple(gate_weights.weight.shape) != (cfg.num_experts, cfg.d_model):
            raise ValueError(f"gate weight must be [{cfg.num_experts}, {cfg.d_model}], "
                             f"got {tuple(gate_weights.weight.shape)}")
        if cfg.expert_bias != (biases is not None):
            raise ValueError(f"layer.expert_bias={cfg.expert_bias} but expert biases were "
                             f"{'given' if biases is not None else 'not given'}")
        if biases is not None:
            biases.check(experts)
        self.cfg = cfg
        self.biases = biases
        self.gate_weights = gate_weights
        self.experts = experts
        self.shared = shared

    @classmethod
    def random(cls, cfg: MoELayerConfig, seed: int = 0) -> MoELayer:
        """Random weights (deterministic in `seed`), with a shared expert when cfg.shared_d_ff > 0."""
        g = torch.Generator().manual_seed(seed + 7919)
        gw = GateWeights(torch.randn(cfg.num_experts, cfg.d_model, generator=g) / cfg.d_model**0.5,
                         **gating_rule(cfg.gate.family).random_router_extras(cfg.num_experts, g))
        biases = None
        if cfg.expert_bias:
            biases = ExpertBiases(torch.randn(cfg.num_experts, 2 * cfg.d_ff, generator=g) * 0.1,
                                  torch.randn(cfg.num_experts, cfg.d_model, generator=g) * 0.1)
        shared = None
        if cfg.shared_d_ff:
            sw = ExpertWeights.random(1, cfg.d_model, cfg.shared_d_ff, seed=seed + 1)
            sg = torch.randn(1, cfg.d_model, generator=g) / cfg.d_model**0.5 if cfg.shared_gated else None
            shared = SharedExpert(sw.gate_up[0], sw.down[0], sg)
        return cls(cfg, gw, ExpertWeights.random(cfg.num_experts, cfg.d_model, cfg.d_ff, seed=seed), shared, biases)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype experts compute in (their weights')."""
        return self.experts.gate_up.dtype

    def to(self, dtype: torch.dtype) -> MoELayer:
        """A copy whose expert, shared-expert and bias weights are `dtype`; gate weights stay as they are
        (the gate runs in float32 anyway)."""
        def cast(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(dtype)

        shared = None if self.shared is None else SharedExpert(cast(self.shared.gate_up), cast(self.shared.down),
                                                               cast(self.shared.gate))
        biases = None if self.biases is None else ExpertBiases(cast(self.biases.gate_up), cast(self.biases.down))
        return MoELayer(self.cfg, self.gate_weights, ExpertWeights(cast(self.experts.gate_up),
                                                                    cast(self.experts.down)), shared, biases)

    def route(self, hidden: torch.Tensor) -> tuple[GateOutput, torch.Tensor, int, int, int | None]:
        """Gate + capacity on [T, D]: (gate output, experts [T, k] with -1 for drops, dropped, rerouted, cap)."""
        g = gate(hidden, self.cfg.gate, self.gate_weights)
        cap = apply_capacity(g, self.cfg.capacity)
        return g, cap.experts, cap.num_dropped, cap.num_rerouted, cap.capacity

    def forward_with_stats(self, hidden: torch.Tensor) -> MoEOutput:
        shape = hidden.shape
        x = check_hidden(hidden, self.cfg.d_model)
        compute = x.to(self.experts.gate_up.dtype)
        g, experts, dropped, rerouted, cap = self.route(x)
        plan = build_plan(experts, self.cfg.num_experts)
        if self.biases is None and self.cfg.expert_activation == "swiglu":
            out = fused_experts_combine(compute, plan, g.weights, self.experts)
        else:
            out = fused_experts_combine_general(compute, plan, g.weights, self.experts, self.biases, self.cfg)
        if self.shared is not None:
            out = out + self.shared(compute)
        return MoEOutput(out.to(hidden.dtype).reshape(shape), g, experts, plan.counts, dropped, rerouted, cap)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.forward_with_stats(hidden).output

    __call__ = forward
