"""GPT-OSS expert math: clamped SwiGLU, biases, interleaved gate/up reordering, and the layer checks."""

import pytest
import torch

from expertray.config import GateConfig, MoELayerConfig
from expertray.errors import ConfigError
from expertray.layer.experts import (
    ExpertBiases,
    ExpertWeights,
    clamped_swiglu_act,
    deinterleave_gpt_oss,
    expert_mlp,
)
from expertray.layer.reference import MoELayer

CFG = MoELayerConfig(d_model=8, d_ff=6, gate=GateConfig("gpt_oss", 4, 2), expert_activation="clamped_swiglu",
                     swiglu_alpha=1.5, swiglu_limit=0.5, expert_bias=True)


def test_one_expert_equals_the_gpt_oss_formula() -> None:
    g = torch.Generator().manual_seed(0)
    x, w_DF2, b, wd, bd = (torch.randn(5, 8, generator=g), torch.randn(1, 8, 12, generator=g),
                           torch.randn(1, 12, generator=g), torch.randn(6, 8, generator=g), torch.randn(8, generator=g))
    gu = x @ w_DF2[0] + b[0]  # GPT-OSS: interleaved columns, gate even, up odd
    gate, up = gu[:, ::2].clamp(max=0.5), gu[:, 1::2].clamp(-0.5, 0.5)
    expected = ((up + 1) * gate * torch.sigmoid(1.5 * gate)) @ wd + bd
    gate_up, bias = deinterleave_gpt_oss(w_DF2, b)
    out = expert_mlp(x, CFG, gate_up[0], wd.t(), bias[0], bd)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    assert (gu.abs() > 0.5).any(), "the clamp must be exercised"
    torch.testing.assert_close(clamped_swiglu_act(torch.tensor([9.0]), torch.tensor([-9.0]), 1.0, 7.0),
                               torch.tensor([7.0 * torch.sigmoid(torch.tensor(7.0)) * -6.0]))


def test_layer_requires_biases_exactly_when_configured() -> None:
    layer = MoELayer.random(CFG, seed=1)
    assert layer.biases is not None and layer(torch.randn(3, 8)).shape == (3, 8)
    with pytest.raises(ValueError, match="layer.expert_bias=True but expert biases were not given"):
        MoELayer(CFG, layer.gate_weights, layer.experts)
    with pytest.raises(ValueError, match=r"expert biases must be \(4, 12\) and \(4, 8\), got \(4, 10\)"):
        MoELayer(CFG, layer.gate_weights, layer.experts, biases=ExpertBiases(torch.zeros(4, 10), torch.zeros(4, 8)))
    sub = layer.biases.select([2, 0])
    torch.testing.assert_close(sub.down, layer.biases.down[[2, 0]], atol=0, rtol=0)
    bf16 = layer.to(torch.bfloat16)
    assert bf16.biases.gate_up.dtype == torch.bfloat16 and bf16(torch.randn(3, 8)).dtype == torch.float32
    assert isinstance(bf16.experts, ExpertWeights)


def test_config_rejects_bad_activation_fields() -> None:
    with pytest.raises(ConfigError, match="layer.expert_activation: 'gelu' is not one of"):
        MoELayerConfig(expert_activation="gelu")
    with pytest.raises(ConfigError, match="layer.swiglu_limit: must be a positive finite number"):
        MoELayerConfig(swiglu_limit=float("inf"))
