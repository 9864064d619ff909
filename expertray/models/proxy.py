"""Model integrations: run a transformers model's sparse-MoE blocks on an expertray cluster.

The i-th supported MoE block of a model (in module order) is served as cluster layer i; attention, norms
and the LM head stay in the calling process. Build the cluster's weights from the same blocks
(`expertray.models.blocks.from_hf_block` on each of `find_moe_blocks(model)`), then `swap_moe_blocks(model, cluster)`.
Router logits (`output_router_logits=True`) are not available through a proxy: gating runs on the cluster.
`expertray.from_pretrained` does all of this from a checkpoint directory without loading routed experts.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from expertray.errors import ConfigError
from expertray.models import families
from expertray.models.blocks import supported_blocks


def find_moe_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, block) of every sparse-MoE block expertray can serve, in module order."""
    supported = set(supported_blocks())
    return [(name, m) for name, m in model.named_modules() if type(m).__name__ in supported]


def find_unsupported_moe_blocks(model: nn.Module) -> list[tuple[str, str]]:
    """(qualified name, class name) of every module holding routed `experts` that expertray cannot serve
    (e.g. Llama-4's Llama4TextMoe), in module order."""
    supported = set(supported_blocks())
    return [(name, type(m).__name__) for name, m in model.named_modules()
            if isinstance(getattr(m, "experts", None), nn.Module) and type(m).__name__ not in supported]


class ClusterMoEProxy(nn.Module):
    """Stands in for one sparse-MoE block: hidden [..., D] → cluster layer `layer` → [..., D], same dtype.

    Inference only: inputs are detached and sent in the caller's dtype (no float32 detour; the cluster
    computes experts in its serving dtype). `returns_router_scores`: the replaced block returned
    (hidden, router_scores) (GPT-OSS); the proxy then returns (hidden, None).
    """

    def __init__(self, cluster: Any, layer: int, d_model: int, returns_router_scores: bool = False) -> None:
        super().__init__()
        self.cluster = cluster
        self.layer = layer
        self.d_model = d_model
        self.returns_router_scores = returns_router_scores

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, None]:
        flat = hidden_states.detach().reshape(-1, self.d_model).to("cpu")
        out = self.cluster.forward(self.layer, flat)
        out = out.to(hidden_states.device, hidden_states.dtype).reshape(hidden_states.shape)
        return (out, None) if self.returns_router_scores else out

    def extra_repr(self) -> str:
        return f"layer={self.layer}, d_model={self.d_model}"


def swap_moe_blocks(model: nn.Module, cluster: Any) -> int:
    """Replace every supported MoE block of `model` by a ClusterMoEProxy; returns how many were swapped.

    The model must have exactly `cluster.cfg.num_layers` such blocks of width `cluster.cfg.layer.d_model`.
    """
    unsupported = find_unsupported_moe_blocks(model)
    if unsupported:
        name, cls = unsupported[0]
        raise ConfigError(f"{name}: MoE block {cls} is not supported (supported: {', '.join(supported_blocks())})")
    blocks = find_moe_blocks(model)
    cfg = cluster.cfg
    if len(blocks) != cfg.num_layers:
        raise ConfigError(f"model has {len(blocks)} sparse-MoE blocks but the cluster serves "
                          f"cluster.num_layers={cfg.num_layers}")
    rows = [families.by_block(type(block).__name__) for _, block in blocks]
    for (name, block), row in zip(blocks, rows):  # check all before swapping any: a refused model stays untouched
        width = getattr(block, row.router).weight.shape[1]
        if width != cfg.layer.d_model:
            raise ConfigError(f"{name}: hidden size {width} != cluster.layer.d_model={cfg.layer.d_model}")
    for layer, ((name, _), row) in enumerate(zip(blocks, rows)):
        parent_name, _, attr = name.rpartition(".")
        proxy = ClusterMoEProxy(cluster, layer, cfg.layer.d_model, row.returns_router_scores)
        setattr(model.get_submodule(parent_name), attr, proxy)
    return len(blocks)
