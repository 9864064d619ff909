"""FP8 block-quantized checkpoints (DeepSeek-V3's official format) are dequantized at load: from_pretrained
equals the transformers model holding the dequantized weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from expertray.checkpoint import WeightSource
from expertray.checkpoint.model import from_pretrained
from expertray.checkpoint.synthetic import write_tiny_checkpoint
from expertray.errors import CheckpointError

tf = pytest.importorskip("transformers")

BLOCK = (16, 16)  # dims 24, 32, 40 leave partial blocks
UNQUANTIZED = ("embed_tokens", "lm_head", "norm", "mlp.gate.weight")


def _dequantize_by_blocks(q: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    out = torch.empty(q.shape)
    for bo in range(scale_inv.shape[0]):
        for bi in range(scale_inv.shape[1]):
            rows, cols = slice(bo * BLOCK[0], (bo + 1) * BLOCK[0]), slice(bi * BLOCK[1], (bi + 1) * BLOCK[1])
            out[rows, cols] = q[rows, cols].float() * scale_inv[bo, bi]
    return out


@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """(the FP8 checkpoint dequantized by blocks, in float32; the FP8 checkpoint; its dequantized weights)."""
    root = tmp_path_factory.mktemp("fp8")
    dense = write_tiny_checkpoint("deepseek_v3", root / "fp32", seed=5, max_shard_size="10GB")
    state = load_file(str(dense / "model.safetensors"))
    quantized, dequantized = {}, {}
    for name, w in state.items():
        if w.dim() != 2 or any(u in name for u in UNQUANTIZED):
            quantized[name] = w
            continue
        O, I = w.shape  # noqa: E741
        so, si = -(-O // BLOCK[0]), -(-I // BLOCK[1])
        padded = torch.zeros(so * BLOCK[0], si * BLOCK[1])
        padded[:O, :I] = w
        amax = padded.abs().reshape(so, BLOCK[0], si, BLOCK[1]).amax(dim=(1, 3)).clamp(min=1e-12)
        scale_inv = amax / 448.0
        q = (w / scale_inv.repeat_interleave(BLOCK[0], 0)[:O].repeat_interleave(BLOCK[1], 1)[:, :I])
        quantized[name] = q.to(torch.float8_e4m3fn)
        quantized[name + "_scale_inv"] = scale_inv
        dequantized[name] = _dequantize_by_blocks(quantized[name], scale_inv)
    fp8 = root / "fp8"
    fp8.mkdir()
    config = json.loads((dense / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": list(BLOCK)}
    (fp8 / "config.json").write_text(json.dumps(config))
    save_file(quantized, str(fp8 / "model.safetensors"))
    save_file({**state, **dequantized}, str(dense / "model.safetensors"), metadata={"format": "pt"})
    return dense, fp8, dequantized


def test_fp8_checkpoint_equals_the_dequantized_reference(fp8_checkpoint) -> None:
    dense, fp8, dequantized = fp8_checkpoint
    ref = tf.AutoModelForCausalLM.from_pretrained(dense).eval()
    assert any("experts" in n for n in dequantized) and any("self_attn" in n for n in dequantized)
    model, cluster = from_pretrained(str(fp8), backend="in_process")
    assert cluster.cfg.dtype == "float32"
    ids = torch.randint(2, 96, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=1e-5, rtol=0)
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False),
                       ref.generate(ids, max_new_tokens=6, do_sample=False))
    bf16 = WeightSource.open(str(fp8), dtype="bfloat16")
    weights, _ = bf16.experts([(1, 7)])
    name = "model.layers.2.mlp.experts.7.down_proj.weight"
    assert weights.down.dtype == torch.bfloat16
    torch.testing.assert_close(weights.down[0], dequantized[name].bfloat16(), atol=0, rtol=0)


def test_fp8_errors_name_the_tensor(fp8_checkpoint, tmp_path: Path) -> None:
    _, fp8, _ = fp8_checkpoint
    state = load_file(str(fp8 / "model.safetensors"))
    scale = "model.layers.1.mlp.experts.0.up_proj.weight_scale_inv"
    del state[scale]
    broken = tmp_path / "no-scale"
    broken.mkdir()
    (broken / "config.json").write_text((fp8 / "config.json").read_text())
    save_file(state, str(broken / "model.safetensors"))
    with pytest.raises(CheckpointError, match=rf"^checkpoint {broken}: tensor {scale} \(scales of the FP8 tensor "
                                              r"model.layers.1.mlp.experts.0.up_proj.weight in model.safetensors\) "
                                              "is in no shard$"):
        WeightSource.open(str(broken)).experts([(0, 0)])
    config = json.loads((fp8 / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4"}
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="quantization 'mxfp4' is not supported"):
        WeightSource.open(str(broken))
