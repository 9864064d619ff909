"""The accuracy harness of `bench routing --accuracy`: a RoutedBlock without a policy is the transformers
block; with device-aware laser it changes outputs only where it moved tokens, and records what it did."""

import pytest
import torch

tf = pytest.importorskip("transformers")

from expertray.policies.routing.laser import LaserRouting  # noqa: E402
from expertray.tools.bench.routing_accuracy import RoutedBlock  # noqa: E402


def _block() -> torch.nn.Module:
    from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock

    torch.manual_seed(0)
    block = OlmoeSparseMoeBlock(tf.OlmoeConfig(hidden_size=32, intermediate_size=48, num_experts=16,
                                               num_experts_per_tok=4))
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.05)
    torch.nn.init.normal_(block.gate.weight, std=2.0 / 32**0.5)
    return block.eval()


def test_routed_block_without_policy_is_the_transformers_block() -> None:
    block = _block()
    routed = RoutedBlock(block, devices=4)
    x = torch.randn(2, 24, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(routed(x), block(x), atol=1e-5, rtol=0)
    assert routed.stats.calls == 0


def test_routed_block_with_laser_records_change_and_balance() -> None:
    block = _block()
    routed = RoutedBlock(block, devices=4)
    routed.policy = LaserRouting(mass_budget=0.05, expert_groups=tuple(routed.device_of.tolist()))
    x = torch.randn(1, 512, 32, generator=torch.Generator().manual_seed(2))
    x[0, :256] = x[0, :1]  # half the batch is one token: its experts' device is hot
    with torch.no_grad():
        out, ref = routed(x), block(x)
    s = routed.stats
    assert s.calls == 1 and s.mass_kept >= 0.95 - 1e-6
    assert s.imbalance_policy < s.imbalance_topk  # laser moved load off the hot device
    assert s.rel_error == pytest.approx(float((out - ref).norm() / ref.norm()), rel=1e-4)
    assert 0 < s.rel_error < 1
