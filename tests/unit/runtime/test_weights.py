"""The controller's weight store: safetensors round trip; a pickle or a mismatched file is refused."""

import pickle

import pytest
import torch

from expertray.config import GateConfig, MoELayerConfig
from expertray.layer.reference import MoELayer
from expertray.runtime.snapshot import SnapshotError
from expertray.runtime.weights import held_bytes, load_weights, save_weights, slot_bytes

CFG = MoELayerConfig(d_model=8, d_ff=12, gate=GateConfig("deepseek_v3", 4, 2, num_groups=2), shared_d_ff=6,
                     shared_gated=True)


def test_round_trip_answers_exactly(tmp_path) -> None:
    layers = [MoELayer.random(CFG, seed=s) for s in (0, 1)]
    save_weights(tmp_path / "w.safetensors", layers)
    back = load_weights(tmp_path / "w.safetensors", CFG, 2)
    x = torch.randn(5, 8)
    for a, b in zip(layers, back):
        assert torch.equal(a.experts.gate_up, b.experts.gate_up) and torch.equal(a.shared.gate, b.shared.gate)
        assert torch.equal(a.gate_weights.correction_bias, b.gate_weights.correction_bias)
        torch.testing.assert_close(a(x), b(x), atol=1e-6, rtol=0)  # bit-equal weights; layouts may differ


class _Boom:
    def __reduce__(self):
        return (exec, ("raise SystemExit('executed')",))


def test_a_planted_pickle_is_refused_not_executed(tmp_path) -> None:
    """A store once read with torch.load(weights_only=False) ran a planted pickle; safetensors executes nothing."""
    path = tmp_path / "w.safetensors"
    path.write_bytes(pickle.dumps(_Boom()))
    with pytest.raises(SnapshotError, match="cannot read"):
        load_weights(path, CFG, 1)


def test_wrong_shapes_and_missing_layers_are_named(tmp_path) -> None:
    save_weights(tmp_path / "w.safetensors", [MoELayer.random(CFG)])
    with pytest.raises(SnapshotError, match="tensor 1.gate.weight is missing"):
        load_weights(tmp_path / "w.safetensors", CFG, 2)
    other = MoELayerConfig(d_model=8, d_ff=16, gate=CFG.gate)
    with pytest.raises(SnapshotError, match="layer 0 does not match"):
        load_weights(tmp_path / "w.safetensors", other, 1)


def test_slot_bytes_match_what_the_weight_store_holds_per_expert() -> None:
    cfg = MoELayerConfig(d_model=16, d_ff=8, gate=GateConfig(num_experts=4, top_k=2), expert_bias=True,
                         expert_activation="clamped_swiglu")
    layers = [MoELayer.random(cfg, seed=s) for s in (0, 1)]
    assert held_bytes(layers) == 2 * 4 * slot_bytes(cfg, {}, "float32")
    assert slot_bytes(cfg, {}, "bfloat16") * 2 == slot_bytes(cfg, {}, "float32")
    assert held_bytes(None) == 0
