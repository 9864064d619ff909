"""How far laser-routed model outputs move from top-k outputs, on tiny real-architecture models.

Tiny transformers causal LMs (Mixtral: 8 experts top-2 renormalised; OLMoE: 64 experts top-8 not
renormalised) with random weights, prompts of Zipf-distributed token ids (popular tokens make some experts
hot, as real text does). Every sparse-MoE block is replaced by `RoutedBlock`, which gates with expertray's
gating (equal to the block's own, see tests/unit/models/test_blocks.py), routes with a policy and combines
with expertray's expert math. Per budget of device-aware laser (experts spread over `devices` in contiguous
groups, as `PlacementTable.balanced` places them):
- layer relative error: ‖laser(x) − top-k(x)‖ / ‖top-k(x)‖ of each MoE block on the same input x (the
  laser model's own hidden states), mean over blocks and batches;
- logits relative error of the whole model, laser routing in every block vs top-k in every block;
- top-1 agreement: greedy tokens generated with top-k routing, re-read with laser routing (teacher forced):
  the share of generated positions where the laser model's argmax is the same token;
- gate mass kept and per-device imbalance, as in the routing benchmark.
Random weights are enough to measure change; they say nothing about task quality.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from expertray.config import CapacityConfig
from expertray.layer.capacity import CapacityResult
from expertray.layer.dispatch import build_plan
from expertray.layer.experts import fused_experts_combine
from expertray.layer.gating import gate
from expertray.models.blocks import from_hf_block
from expertray.models.proxy import find_moe_blocks
from expertray.policies.routing import RoutingPolicy
from expertray.policies.routing.laser import LaserRouting
from expertray.state.loadstats import gate_mass_retained, imbalance

DROPLESS = CapacityConfig(overflow="dropless")


@dataclass
class BlockStats:
    """Sums over the calls of one RoutedBlock (means are sums / calls)."""

    calls: int = 0
    rel_error: float = 0.0
    mass_kept: float = 0.0
    imbalance_topk: float = 0.0
    imbalance_policy: float = 0.0
    topk_share: list[float] = field(default_factory=list)


class RoutedBlock(nn.Module):
    """A transformers sparse-MoE block computed by expertray with `policy` choosing the experts
    (None: the gate's top-k). hidden [..., D] → [..., D]."""

    def __init__(self, block: nn.Module, devices: int) -> None:
        super().__init__()
        self.layer = from_hf_block(block)
        E = self.layer.cfg.num_experts
        self.device_of = torch.arange(E) * devices // E
        self.devices = devices
        self.policy: RoutingPolicy | None = None
        self.stats = BlockStats()

    def _combine(self, x: torch.Tensor, routing: CapacityResult) -> torch.Tensor:
        plan = build_plan(routing.experts, self.layer.cfg.num_experts)
        out = fused_experts_combine(x, plan, routing.weights, self.layer.experts)
        return out if self.layer.shared is None else out + self.layer.shared(x)

    def _per_device(self, experts: torch.Tensor) -> torch.Tensor:
        counts = torch.bincount(experts[experts >= 0], minlength=self.layer.cfg.num_experts).double()
        return torch.zeros(self.devices, dtype=torch.float64).index_add_(0, self.device_of, counts)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = hidden.reshape(-1, hidden.shape[-1]).float()
        g = gate(x, self.layer.cfg.gate, self.layer.gate_weights)
        top = CapacityResult(g.experts, g.weights, None, 0, 0)
        reference = self._combine(x, top)
        if self.policy is None:
            return reference.to(hidden.dtype).reshape(hidden.shape)
        routed = self.policy.route(g, DROPLESS)
        out = self._combine(x, routed)
        s = self.stats
        s.calls += 1
        s.rel_error += float((out - reference).norm() / reference.norm().clamp_min(1e-30))
        s.mass_kept += gate_mass_retained(g.probs, routed.experts, g.experts)
        s.imbalance_topk += imbalance(self._per_device(g.experts))
        s.imbalance_policy += imbalance(self._per_device(routed.experts))
        s.topk_share.append(float((g.probs.gather(1, g.experts).sum(1) / g.probs.sum(1)).mean()))
        return out.to(hidden.dtype).reshape(hidden.shape)


def tiny_models() -> dict[str, tuple[nn.Module, int]]:
    """{name: (tiny causal LM with random weights, devices its experts are spread over)}."""
    import transformers as tf

    common = {"vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "max_position_embeddings": 256, "eos_token_id": None, "bos_token_id": None, "pad_token_id": None}
    torch.manual_seed(0)
    mixtral = tf.MixtralForCausalLM(tf.MixtralConfig(**common, intermediate_size=64, num_key_value_heads=2,
                                                     num_local_experts=8, num_experts_per_tok=2))
    olmoe = tf.OlmoeForCausalLM(tf.OlmoeConfig(**common, intermediate_size=32, num_key_value_heads=4,
                                               num_experts=64, num_experts_per_tok=8))
    for model in (mixtral, olmoe):
        for _, block in find_moe_blocks(model):  # routers with the spread of a trained one (logit std ~1-2)
            nn.init.normal_(block.gate.weight, std=2.0 / block.gate.weight.shape[1] ** 0.5)
    return {"mixtral": (mixtral.eval(), 8), "olmoe": (olmoe.eval(), 8)}


def _swap(model: nn.Module, devices: int) -> list[RoutedBlock]:
    blocks = []
    for name, block in find_moe_blocks(model):
        parent_name, _, attr = name.rpartition(".")
        routed = RoutedBlock(block, devices)
        setattr(model.get_submodule(parent_name), attr, routed)
        blocks.append(routed)
    return blocks


def _prompts(batches: int, sequences: int, length: int, vocab: int, seed: int) -> list[torch.Tensor]:
    """[sequences, length] token ids per batch, Zipf(1.0) over a seeded permutation of the vocabulary."""
    g = torch.Generator().manual_seed(seed)
    weights = (torch.arange(vocab, dtype=torch.float64) + 1) ** -1.0
    ids = torch.randperm(vocab, generator=g)
    return [ids[torch.multinomial(weights, sequences * length, replacement=True, generator=g)].view(sequences, length)
            for _ in range(batches)]


@torch.no_grad()
def _generate(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy continuation [S, length + new_tokens] (no cache: the models are tiny)."""
    seq = prompt
    for _ in range(new_tokens):
        seq = torch.cat([seq, model(seq).logits[:, -1].argmax(dim=-1, keepdim=True)], dim=1)
    return seq


@torch.no_grad()
def run(budgets: tuple[float, ...] = (0.01, 0.03, 0.05, 0.1), batches: int = 2, sequences: int = 8,
        prompt_length: int = 48, new_tokens: int = 8, seed: int = 0) -> dict[str, Any]:
    """{model: {budget: measures}} for device-aware laser at each gate-mass budget (defaults otherwise)."""
    out: dict[str, Any] = {}
    for name, (model, devices) in tiny_models().items():
        blocks = _swap(model, devices)
        prompts = _prompts(batches, sequences, prompt_length, model.config.vocab_size, seed)
        for b in blocks:
            b.policy = None
        sequences_topk = [_generate(model, p, new_tokens) for p in prompts]
        logits_topk = [model(s).logits for s in sequences_topk]
        out[name] = {"devices": devices, "moe_blocks": len(blocks), "tokens_per_batch": sequences * (prompt_length + new_tokens),
                     "budgets": {}}
        for budget in budgets:
            for b in blocks:
                b.policy = LaserRouting(mass_budget=budget, expert_groups=tuple(b.device_of.tolist()))
                b.stats = BlockStats()
            rel, agree, total = 0.0, 0, 0
            for seq, ref in zip(sequences_topk, logits_topk, strict=True):
                logits = model(seq).logits
                rel += float((logits - ref).norm() / ref.norm())
                generated = slice(prompt_length - 1, seq.shape[1] - 1)  # positions that predicted new tokens
                agree += int((logits[:, generated].argmax(-1) == ref[:, generated].argmax(-1)).sum())
                total += seq.shape[0] * new_tokens
            calls = sum(b.stats.calls for b in blocks)
            out[name]["budgets"][str(budget)] = {
                "layer_rel_error": sum(b.stats.rel_error for b in blocks) / calls,
                "logits_rel_error": rel / len(prompts),
                "top1_agreement": agree / total,
                "gate_mass_retained": sum(b.stats.mass_kept for b in blocks) / calls,
                "imbalance_device_topk": sum(b.stats.imbalance_topk for b in blocks) / calls,
                "imbalance_device_laser": sum(b.stats.imbalance_policy for b in blocks) / calls,
                "topk_share": sum(sum(b.stats.topk_share) for b in blocks) / calls,
            }
    return out
