"""Quantized checkpoints are dequantized at load: FP8 blocks (DeepSeek-V3's official format) and MXFP4 experts
(GPT-OSS's). from_pretrained equals the transformers model holding the dequantized weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from expertray.errors import CheckpointError
from expertray.models import WeightSource
from expertray.models.pretrained import from_pretrained
from expertray.models.synthetic import write_tiny_checkpoint

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
    config["quantization_config"] = {"quant_method": "awq"}
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"quantization 'awq' is not supported \(supported: fp8, mxfp4;"):
        WeightSource.open(str(broken))


def test_mxfp4_dequantization_equals_transformers() -> None:
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from expertray.models.quant import dequantize_mxfp4

    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 8, 2, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(118, 130, (3, 8, 2), generator=g, dtype=torch.uint8)
    ref = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # [E, C, R] (transposed)
    torch.testing.assert_close(dequantize_mxfp4(blocks, scales), ref.transpose(1, 2), atol=0, rtol=0)


def test_mxfp4_gpt_oss_checkpoint_equals_the_dequantized_reference(tmp_path: Path) -> None:
    """A GPT-OSS checkpoint with MXFP4 experts (as openai/gpt-oss-* ship) serves like the same model with
    the experts dequantized by transformers' own converter."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    cfg = tf.GptOssConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4,
                          num_experts_per_tok=2, sliding_window=16, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    model = tf.GptOssForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(1)
    quantized: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.15)
        for layer in model.model.layers:
            ex = layer.mlp.experts
            for proj, (rows, cols) in {"gate_up_proj": (128, 32), "down_proj": (32, 64)}.items():
                blocks = torch.randint(0, 256, (4, rows, cols // 32, 16), generator=g, dtype=torch.uint8)
                scales = torch.randint(122, 126, (4, rows, cols // 32), generator=g, dtype=torch.uint8)
                getattr(ex, proj).copy_(convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))
                quantized[f"{proj}_blocks"], quantized[f"{proj}_scales"] = blocks, scales
            prefix = f"model.layers.{layer.self_attn.layer_idx}.mlp.experts."
            for key in list(quantized):
                if "." not in key:
                    quantized[prefix + key] = quantized.pop(key)
    model.save_pretrained(tmp_path / "reference")
    ref = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "reference").eval()
    state = load_file(str(tmp_path / "reference" / "model.safetensors"))
    state = {k: v for k, v in state.items() if not k.endswith(("experts.gate_up_proj", "experts.down_proj"))}
    mx = tmp_path / "mxfp4"
    mx.mkdir()
    save_file({**state, **quantized}, str(mx / "model.safetensors"))
    config = json.loads((tmp_path / "reference" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["router", "lm_head"]}
    (mx / "config.json").write_text(json.dumps(config))

    source = WeightSource.open(str(mx))
    assert source._tensors[0].layout == "gpt_oss_mxfp4"
    served, cluster = from_pretrained(str(mx), backend="in_process")
    ids = torch.randint(2, 96, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(served(ids).logits, ref(ids).logits, atol=1e-5, rtol=0)
    assert torch.equal(served.generate(ids, max_new_tokens=6, do_sample=False),
                       ref.generate(ids, max_new_tokens=6, do_sample=False))
