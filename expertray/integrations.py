"""Model integrations: run a transformers model's sparse-MoE blocks on an expertray cluster.

The i-th supported MoE block of a model (in module order) is served as cluster layer i; attention, norms
and the LM head stay in the calling process. Build the cluster's weights from the same blocks
(`expertray.hf.from_hf_block` on each of `find_moe_blocks(model)`), then `swap_moe_blocks(model, cluster)`.
Router logits (`output_router_logits=True`) are not available through a proxy: gating runs on the cluster.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from expertray.errors import ConfigError
from expertray.hf import SUPPORTED_BLOCKS


def find_moe_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, block) of every sparse-MoE block expertray can serve, in module order."""
    return [(name, m) for name, m in model.named_modules() if type(m).__name__ in SUPPORTED_BLOCKS]


class ClusterMoEProxy(nn.Module):
    """Stands in for one sparse-MoE block: hidden [..., D] → cluster layer `layer` → [..., D], same dtype.

    Inference only: inputs are detached and sent as float32 (the cluster computes in float32).
    """

    def __init__(self, cluster: Any, layer: int, d_model: int) -> None:
        super().__init__()
        self.cluster = cluster
        self.layer = layer
        self.d_model = d_model

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        flat = hidden_states.detach().reshape(-1, self.d_model).to("cpu", torch.float32)
        out = self.cluster.forward(self.layer, flat)
        return out.to(hidden_states.device, hidden_states.dtype).reshape(hidden_states.shape)

    def extra_repr(self) -> str:
        return f"layer={self.layer}, d_model={self.d_model}"


def swap_moe_blocks(model: nn.Module, cluster: Any) -> int:
    """Replace every supported MoE block of `model` by a ClusterMoEProxy; returns how many were swapped.

    The model must have exactly `cluster.cfg.num_layers` such blocks of width `cluster.cfg.layer.d_model`.
    """
    blocks = find_moe_blocks(model)
    cfg = cluster.cfg
    if len(blocks) != cfg.num_layers:
        raise ConfigError(f"model has {len(blocks)} sparse-MoE blocks but the cluster serves "
                          f"cluster.num_layers={cfg.num_layers}")
    for name, block in blocks:  # check all before swapping any: a refused model stays untouched
        width = block.gate.weight.shape[1]
        if width != cfg.layer.d_model:
            raise ConfigError(f"{name}: hidden size {width} != cluster.layer.d_model={cfg.layer.d_model}")
    for layer, (name, _) in enumerate(blocks):
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, ClusterMoEProxy(cluster, layer, cfg.layer.d_model))
    return len(blocks)
