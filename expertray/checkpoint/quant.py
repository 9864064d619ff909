"""Block-quantized FP8 checkpoints (DeepSeek-V3's official weights): dequantized at load, to the serving dtype.

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


def fp8_block(path: str, quantization_config: dict[str, Any] | None) -> tuple[int, int] | None:
    """(bo, bi) of an FP8 block-quantized checkpoint, None for an unquantized one; other methods refused."""
    if not quantization_config:
        return None
    method = quantization_config.get("quant_method")
    if method != "fp8":
        raise CheckpointError(f"checkpoint {path}: quantization {method!r} is not supported (fp8 block "
                              "quantization is; or use an unquantized checkpoint)")
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
