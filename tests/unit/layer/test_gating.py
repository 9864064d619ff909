"""Gating families are a registry like routing policies: config names and registered rules are the same set."""

import pytest
import torch

from expertray.config import GATING_FAMILIES, GateConfig
from expertray.errors import ConfigError
from expertray.layer.gating import GATING, GatingRule, gate_from_logits, gating_rule


def test_registry_equals_config_families() -> None:
    assert GATING.names() == sorted(GATING_FAMILIES)
    assert all(isinstance(gating_rule(f), GatingRule) for f in GATING_FAMILIES)
    with pytest.raises(ConfigError, match="gating family policy 'switch' is unknown"):
        gating_rule("switch")


def test_qwen_and_mixtral_share_the_rule_but_not_the_default_normalisation() -> None:
    logits = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    mixtral = gate_from_logits(logits, GateConfig("mixtral", 8, 2))
    qwen = gate_from_logits(logits, GateConfig("qwen_moe", 8, 2, normalize=False))
    assert torch.equal(mixtral.experts, qwen.experts)
    torch.testing.assert_close(mixtral.weights.sum(-1), torch.ones(5))
    assert (qwen.weights.sum(-1) < 1).all()
