"""Ray-free pieces of checkpoint-native serving: slots read from a checkpoint in chunks equal the checkpoint's
experts (GPT-OSS biases and clamped SwiGLU included), blobs carry the serving dtype exactly, the weight store
keeps expert biases, and snapshots record the checkpoint descriptor and refuse a bad one."""

from __future__ import annotations

import pytest
import torch

from expertray.config import GateConfig, MoELayerConfig
from expertray.layer.experts import expert_mlp
from expertray.layer.reference import MoELayer
from expertray.layer.slots import SlotStore
from expertray.models.files import describe
from expertray.models.source import WeightSource, cached_source
from expertray.models.synthetic import write_tiny_checkpoint
from expertray.runtime.snapshot import ControllerState, SnapshotError, load_controller_snapshot, save_snapshot
from expertray.runtime.weights import expert_blob, load_weights, read_slots, router_params, save_weights
from expertray.state.placement_table import PlacementTable
from expertray.wire.collective import from_host_array

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory: pytest.TempPathFactory) -> WeightSource:
    return WeightSource.open(str(write_tiny_checkpoint("gpt_oss", tmp_path_factory.mktemp("ck") / "gpt_oss", seed=2)))


@pytest.mark.parametrize("chunk_bytes", [1, 1 << 30], ids=["one-slot-chunks", "one-chunk"])
def test_read_slots_equals_the_checkpoint_experts(gpt_oss: WeightSource, chunk_bytes: int) -> None:
    cfg = gpt_oss.layer_config
    store = SlotStore("a", torch.device("cpu"), gpt_oss.dtype, layer_cfg=cfg)
    keys = [(1, 4), (0, 3), (0, 1), (1, 0), (0, 5)]
    read_slots(gpt_oss, keys, store, chunk_bytes)
    assert store.keys() == sorted(keys) and store.nbytes() == gpt_oss.slot_bytes(len(keys))
    full = gpt_oss.layer(0)
    rows = torch.randn(7, cfg.d_model, generator=torch.Generator().manual_seed(0))
    out = store.compute(0, [1, 3, 5], [2, 4, 1], rows)
    for e, sl in ((1, slice(0, 2)), (3, slice(2, 6)), (5, slice(6, 7))):
        ref = expert_mlp(rows[sl], cfg, full.experts.gate_up[e], full.experts.down[e], full.biases.gate_up[e],
                         full.biases.down[e])
        torch.testing.assert_close(out[sl], ref, atol=0, rtol=0)
    assert len(store.get((0, 3))) == 4  # weights and biases: what export copies to a new replica


def test_slots_refuse_missing_biases_and_unsorted_stacks(gpt_oss: WeightSource) -> None:
    cfg = gpt_oss.layer_config
    store = SlotStore("a", torch.device("cpu"), gpt_oss.dtype, layer_cfg=cfg)
    w, b = gpt_oss.experts([(0, 0), (0, 1)])
    with pytest.raises(ValueError, match="expected 4"):
        store.add({(0, 0): (w.gate_up[0], w.down[0])})
    with pytest.raises(ValueError, match="expert biases missing but layer.expert_bias=True"):
        store.add_stacked(0, [0, 1], w.gate_up, w.down)
    with pytest.raises(ValueError, match="ascending"):
        store.add_stacked(0, [1, 0], w.gate_up, w.down, b.gate_up, b.down)


def test_expert_blob_carries_bf16_exactly_with_biases() -> None:
    cfg = MoELayerConfig(d_model=16, d_ff=8, gate=GateConfig(num_experts=4, top_k=2), expert_bias=True,
                         expert_activation="clamped_swiglu")
    layer = MoELayer.random(cfg, seed=1).to(torch.bfloat16)
    blob = expert_blob([layer], [(0, 2)], "bfloat16")
    arrays = blob["slots"][(0, 2)]
    assert blob["dtype"] == "bfloat16" and len(arrays) == 4 and arrays[0].nbytes == 2 * 16 * 16
    store = SlotStore("a", torch.device("cpu"), torch.bfloat16, layer_cfg=cfg)
    store.add({(0, 2): [from_host_array(a, "bfloat16") for a in arrays]})
    assert torch.equal(store.get((0, 2))[0], layer.experts.gate_up[2])
    assert torch.equal(store.get((0, 2))[3], layer.biases.down[2])


def test_weight_store_keeps_expert_biases(tmp_path) -> None:
    cfg = MoELayerConfig(d_model=16, d_ff=8, gate=GateConfig(num_experts=4, top_k=2), expert_bias=True,
                         expert_activation="clamped_swiglu")
    layers = [MoELayer.random(cfg, seed=s) for s in (0, 1)]
    save_weights(tmp_path / "w.safetensors", layers)
    back = load_weights(tmp_path / "w.safetensors", cfg, 2)
    assert torch.equal(back[1].biases.gate_up, layers[1].biases.gate_up)


def test_router_params_are_gates_and_shared_experts_only(tmp_path) -> None:
    path = write_tiny_checkpoint("deepseek_v3", tmp_path / "ds", seed=1)
    descriptor = describe(path).to_dict()
    params = router_params(descriptor, "float32")
    source = cached_source(descriptor, "float32")
    assert len(params) == source.num_layers
    assert params[0].gate.correction_bias is not None and params[0].shared is not None
    assert not any(hasattr(p, "experts") for p in params)


def test_snapshot_records_the_checkpoint_descriptor(tmp_path) -> None:
    path = write_tiny_checkpoint("mixtral", tmp_path / "mx", seed=1)
    descriptor = describe(path).to_dict()
    table = PlacementTable.balanced(2, 6, ["expert-0"])
    save_snapshot(tmp_path / "s.msgpack", table, ControllerState(checkpoint=descriptor))
    assert load_controller_snapshot(tmp_path / "s.msgpack")[1].checkpoint == descriptor
    save_snapshot(tmp_path / "bad.msgpack", table, {"checkpoint": {"path": str(path)}})
    with pytest.raises(SnapshotError, match="state.checkpoint: checkpoint descriptor"):
        load_controller_snapshot(tmp_path / "bad.msgpack")
