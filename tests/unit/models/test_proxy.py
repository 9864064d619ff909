"""swap_moe_blocks / ClusterMoEProxy against a stand-in cluster (no Ray): the proxy reshapes and casts
exactly like the block it replaces, and mismatched models are refused by name."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from expertray.config import ClusterConfig, MoELayerConfig
from expertray.errors import ConfigError
from expertray.models.blocks import from_hf_block
from expertray.models.proxy import ClusterMoEProxy, find_moe_blocks, swap_moe_blocks

tf = pytest.importorskip("transformers")


def _model(layers: int = 2, hidden: int = 32) -> torch.nn.Module:
    cfg = tf.MixtralConfig(vocab_size=64, hidden_size=hidden, intermediate_size=48, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    return tf.MixtralForCausalLM(cfg).eval()


class InProcessCluster:
    """What the proxy needs from expertray.api.Cluster: `cfg` and `forward(layer, [T, D])`."""

    def __init__(self, layers) -> None:
        self.layers = layers
        self.cfg = ClusterConfig(layer=layers[0].cfg, num_layers=len(layers), num_expert_actors=1)
        self.calls: list[tuple[int, tuple[int, ...], torch.dtype]] = []

    def forward(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        self.calls.append((layer, tuple(hidden.shape), hidden.dtype))
        return self.layers[layer](hidden)


def test_swapped_model_matches_and_sends_flat_float32() -> None:
    model = _model()
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
    cluster = InProcessCluster([from_hf_block(b) for _, b in find_moe_blocks(model)])
    assert swap_moe_blocks(model, cluster) == 2
    assert [type(layer.mlp) for layer in model.model.layers] == [ClusterMoEProxy, ClusterMoEProxy]
    assert find_moe_blocks(model) == []
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, atol=1e-5, rtol=0)
    assert cluster.calls == [(0, (10, 32), torch.float32), (1, (10, 32), torch.float32)]


def test_proxy_keeps_dtype_and_shape() -> None:
    model = _model(layers=1)
    cluster = InProcessCluster([from_hf_block(b) for _, b in find_moe_blocks(model)])
    proxy = ClusterMoEProxy(cluster, 0, 32)
    x = torch.randn(2, 3, 32, dtype=torch.bfloat16, requires_grad=True)
    out = proxy(x)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    assert cluster.calls == [(0, (6, 32), torch.bfloat16)]  # the caller's dtype, no float32 detour


def test_mismatched_model_is_refused_by_name() -> None:
    model = _model(layers=2)
    layers = [from_hf_block(b) for _, b in find_moe_blocks(model)]
    with pytest.raises(ConfigError, match="model has 2 sparse-MoE blocks but the cluster serves cluster.num_layers=3"):
        swap_moe_blocks(model, SimpleNamespace(cfg=ClusterConfig(layer=layers[0].cfg, num_layers=3)))
    wide = ClusterConfig(layer=MoELayerConfig(d_model=64, d_ff=48), num_layers=2)
    with pytest.raises(ConfigError, match=r"model.layers.0.mlp: hidden size 32 != cluster.layer.d_model=64"):
        swap_moe_blocks(model, SimpleNamespace(cfg=wide))
    assert find_moe_blocks(model) != [], "a refused swap must leave the model untouched"
