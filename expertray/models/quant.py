"""Quantized checkpoints, dequantized at load to the serving dtype: block FP8 (DeepSeek-V3's official
weights) and MXFP4 experts (GPT-OSS's).

config.json `quantization_config` {quant_method: fp8, weight_block_size: [bo, bi]}; a quantized weight W
[O, I] is stored as `name` (F8_E4M3) plus `name_scale_inv` (F32 [ceil(O/bo), ceil(I/bi)]); the real weight
is W[o, i] = q[o, i] · scale_inv[o // bo, i // bi].
"""

from __future__ import annotations

from typing import Any

import torch

from expertray.errors import CheckpointError

FP8_DTYPES = ("F8_E4M3",)
SCALE_SUFFIX = "_scale_inv"


QUANT_METHODS = ("fp8", "mxfp4")


def fp8_block(path: str, quantization_config: dict[str, Any] | None) -> tuple[int, int] | None:
    """(bo, bi) of an FP8 block-quantized checkpoint, None otherwise; unknown quantization methods refused."""
    if not quantization_config:
        return None
    method = quantization_config.get("quant_method")
    if method not in QUANT_METHODS:
        raise CheckpointError(f"checkpoint {path}: quantization {method!r} is not supported (supported: "
                              f"{', '.join(QUANT_METHODS)}; or use an unquantized checkpoint)")
    if method != "fp8":
        return None
    block = quantization_config.get("weight_block_size") or [128, 128]
    if len(block) != 2 or not all(isinstance(b, int) and b > 0 for b in block):
        raise CheckpointError(f"checkpoint {path}: quantization_config.weight_block_size must be two positive "
                              f"integers, got {block!r}")
    return block[0], block[1]


def dequantize_fp8(q_OI: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """q [O, I] float8 and scale_inv [ceil(O/bo), ceil(I/bi)] → float32 [O, I]."""
    O, I = q_OI.shape  # noqa: E741 - the input dimension's conventional name
    want = (-(-O // block[0]), -(-I // block[1]))
    if tuple(scale_inv.shape) != want:
        raise ValueError(f"scale_inv must be {list(want)} for a [{O}, {I}] weight in {list(block)} blocks, "
                         f"got {list(scale_inv.shape)}")
    scale = scale_inv.float().repeat_interleave(block[0], 0)[:O].repeat_interleave(block[1], 1)[:, :I]
    return q_OI.float() * scale


# MXFP4 (GPT-OSS's official weights): per expert, `{proj}_blocks` uint8 [R, C/32, 16] hold two FP4 (e2m1)
# values per byte, low nibble first; `{proj}_scales` uint8 [R, C/32] is each 32-value group's power of two,
# biased by 127. R×C is the weight as expertray stores it: gate_up [2F, D] (gate/up rows interleaved), down [D, F].
FP4_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """blocks uint8 [..., G, 16] and scales uint8 [..., G] → float32 [..., G·32]."""
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != 16:
        raise ValueError(f"MXFP4 blocks [..., G, 16] and scales [..., G] disagree: {list(blocks.shape)} vs "
                         f"{list(scales.shape)}")
    lut = torch.tensor(FP4_E2M1, dtype=torch.float32)
    b = blocks.to(torch.uint8)
    values = torch.stack([lut[(b & 0x0F).long()], lut[(b >> 4).long()]], dim=-1)  # [..., G, 16, 2]
    values = values.reshape(*blocks.shape[:-1], 32)
    out = torch.ldexp(values, scales.to(torch.int32).unsqueeze(-1) - 127)
    return out.reshape(*blocks.shape[:-2], -1)
