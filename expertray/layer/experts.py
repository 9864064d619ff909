"""Expert MLP math on stacked weights: SwiGLU (Mixtral / Qwen-MoE / DeepSeek) and GPT-OSS's clamped SwiGLU with
expert biases.

gate_up: [S, 2F, D] (gate rows first, then up rows), down: [S, D, F]; y = down · (silu(gate·x) ⊙ up·x).
Biases (GPT-OSS): gate_up [S, 2F] (same row order), down [S, D]; GPT-OSS's interleaved [E, D, 2F] is reordered
once, at load (`deinterleave_gpt_oss`).
Rows for S slots arrive grouped (counts[s] consecutive rows for slot s). Two ways to run plain SwiGLU, equal up
to rounding: a loop of per-slot GEMMs (any device, any dtype) and one grouped GEMM per projection
(`torch._grouped_mm`, used where the device has a fast kernel: bf16 on Hopper or newer, and the call has
enough non-empty groups to beat the loop: `prefer_grouped`).
The stacked layout is the one the grouped kernel wants as it is: `gate_up.transpose(-2, -1)` is a view
([S, D, 2F] with stride 1 along D, i.e. K-major B, the layout torchtitan's MoE passes for its [E, F, D]
weights), which the CUTLASS kernel takes without a copy; nothing is re-laid out per call.
Layers with another activation or biases (`expert_activation="clamped_swiglu"`, `expert_bias=True`) go
through `expert_mlp`, one slot at a time. Everything keeps the dtype and device it is given.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from expertray.config import MoELayerConfig
from expertray.layer.dispatch import DispatchPlan


@dataclass
class ExpertWeights:
    """Weights of S expert slots, stacked."""

    gate_up: torch.Tensor
    down: torch.Tensor

    def __post_init__(self) -> None:
        if self.gate_up.dim() != 3 or self.down.dim() != 3:
            raise ValueError(f"expert weights must be 3-D, got gate_up {tuple(self.gate_up.shape)}, "
                             f"down {tuple(self.down.shape)}")
        S, two_f, D = self.gate_up.shape
        if two_f % 2 or self.down.shape != (S, D, two_f // 2):
            raise ValueError(f"down must be [S, D, F] = {(S, D, two_f // 2)}, got {tuple(self.down.shape)}")

    @property
    def num_slots(self) -> int:
        return self.gate_up.shape[0]

    @property
    def d_model(self) -> int:
        return self.gate_up.shape[2]

    @property
    def d_ff(self) -> int:
        return self.down.shape[2]

    @property
    def nbytes(self) -> int:
        return self.gate_up.numel() * self.gate_up.element_size() + self.down.numel() * self.down.element_size()

    def select(self, slots: Sequence[int]) -> ExpertWeights:
        """A copy holding only `slots`, in that order."""
        idx = torch.as_tensor(list(slots), dtype=torch.long)
        return ExpertWeights(self.gate_up.index_select(0, idx).contiguous(),
                             self.down.index_select(0, idx).contiguous())

    @staticmethod
    def random(num_slots: int, d_model: int, d_ff: int, seed: int = 0,
               dtype: torch.dtype = torch.float32) -> ExpertWeights:
        g = torch.Generator().manual_seed(seed)
        gate_up = torch.randn(num_slots, 2 * d_ff, d_model, generator=g) / d_model**0.5
        down = torch.randn(num_slots, d_model, d_ff, generator=g) / d_ff**0.5
        return ExpertWeights(gate_up.to(dtype), down.to(dtype))


def swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, out: torch.Tensor | None = None
           ) -> torch.Tensor:
    """One expert on rows x [n, D] with gate_up [2F, D], down [D, F] → [n, D]."""
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
    return torch.matmul(F.silu(gate) * up, down.t(), out=out)


def grouped_swiglu(rows: torch.Tensor, counts: Sequence[int], weights: ExpertWeights) -> torch.Tensor:
    """Rows [N, D] grouped by slot (counts[s] consecutive rows for slot s) → outputs [N, D]."""
    return looped_swiglu(rows, counts, weights.gate_up, weights.down)


def looped_swiglu(rows: torch.Tensor, counts: Sequence[int], gate_up: torch.Tensor, down: torch.Tensor
                  ) -> torch.Tensor:
    """One GEMM pair per slot: rows [N, D] grouped by slot, gate_up [S, 2F, D], down [S, D, F] → [N, D]."""
    out = torch.empty_like(rows)
    start = 0
    for slot, n in enumerate(counts):
        if n:
            swiglu(rows[start:start + n], gate_up[slot], down[slot], out=out[start:start + n])
            start += n
    return out


def grouped_mm_swiglu(rows: torch.Tensor, counts: Sequence[int], gate_up: torch.Tensor, down: torch.Tensor
                      ) -> torch.Tensor:
    """Two grouped GEMMs for all slots at once (the torchtitan MoE kernel): same contract as looped_swiglu.

    offs [S] int32 are the cumulative row counts; slots with no rows are empty groups. On CUDA they travel
    from pinned memory without blocking (a pageable host→device copy would synchronise the stream)."""
    offs = torch.tensor(list(counts), dtype=torch.int32).cumsum(0, dtype=torch.int32)
    if rows.device.type == "cuda":
        offs = offs.pin_memory().to(rows.device, non_blocking=True)
    else:
        offs = offs.to(rows.device)
    h = torch._grouped_mm(rows, gate_up.transpose(-2, -1), offs=offs)  # [N, 2F]
    gate, up = h.chunk(2, dim=-1)
    return torch._grouped_mm(F.silu(gate) * up, down.transpose(-2, -1), offs=offs)  # [N, D]


def grouped_mm_fast(device: torch.device, dtype: torch.dtype, d_model: int, d_ff: int) -> bool:
    """Whether the grouped GEMM has a fast kernel here: CUDA bf16 on compute capability ≥ 9.0, with row
    strides that are multiples of 16 bytes. Elsewhere (CPU, older GPUs, fp32/fp16) the loop is used."""
    if not hasattr(torch, "_grouped_mm") or device.type != "cuda" or dtype != torch.bfloat16:
        return False
    aligned = d_model % 8 == 0 and d_ff % 8 == 0
    return aligned and torch.cuda.get_device_capability(device) >= (9, 0)


# Fewest non-empty groups for which one grouped GEMM beats the per-slot loop on a fast-kernel device.
# Measured on an H200 (bf16, `expertray bench gpu`, the first device run): with 8 groups the loop won at
# both 1024 and 32 rows per group (655 vs 564 and 96 vs 81 TFLOP/s: cuBLAS per expert beats the grouped
# kernel's tiles, and 8 launches cost little); with 256 groups it lost at 128 and 4 rows per group
# (202 vs 285 and 4.4 vs 12.7 TFLOP/s: ~4 launches per group dominate). 32 sits between the measured
# points; the bench measures both paths side by side on every run, so the rule can be checked there.
GROUPED_MIN_GROUPS = 32
# torch._grouped_mm's CUTLASS kernel takes fewer than 1024 groups.
GROUPED_MAX_GROUPS = 1023


def prefer_grouped(counts: Sequence[int]) -> bool:
    """Whether a call with these per-slot row counts should run as one grouped GEMM (given a fast kernel):
    when it has at least GROUPED_MIN_GROUPS non-empty groups and the kernel can take all of its groups."""
    return len(counts) <= GROUPED_MAX_GROUPS and sum(1 for n in counts if n) >= GROUPED_MIN_GROUPS


def padded_rows(counts: Sequence[int], multiple: int = 16) -> int:
    """Rows per slot of the padded layout: the largest count rounded up to `multiple` (0 when all are empty)."""
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    most = max(counts, default=0)
    return -(-most // multiple) * multiple


def padded_bmm_swiglu(rows: torch.Tensor, counts: Sequence[int], gate_up: torch.Tensor, down: torch.Tensor,
                      multiple: int = 16) -> torch.Tensor:
    """All slots as two batched GEMMs over a zero-padded [S, M, D] copy of the rows (M = `padded_rows`):
    same contract as looped_swiglu. Trades S·M - N padded rows of extra FLOPs for one dense `torch.bmm`
    per projection (cuBLAS strided-batched tiles instead of the grouped kernel's); worth it only when the
    counts are even (padding overhead S·M / N close to 1) and many (a random DeepSeek-V3-like gate at 4096
    tokens: max 168 rows per expert for a mean of 128, overhead 1.375 with M a multiple of 16, 1.5 of 64;
    Mixtral-like: 1.06). Each row's place in the padded buffer
    comes from the counts on the device (`repeat_interleave` with its size given: no host sync)."""
    S, N, D = len(counts), rows.shape[0], rows.shape[1]
    M = padded_rows(counts, multiple)
    if N == 0:
        return torch.empty_like(rows)
    host = torch.tensor(list(counts), dtype=torch.long)
    if rows.device.type == "cuda":
        host = host.pin_memory()
    c = host.to(rows.device, non_blocking=True)
    slot = torch.repeat_interleave(torch.arange(S, device=rows.device), c, output_size=N)  # [N]
    start = torch.cumsum(c, 0) - c
    place = slot * M + torch.arange(N, device=rows.device) - start[slot]  # [N] row of the padded buffer
    padded = rows.new_zeros(S * M, D).index_copy_(0, place, rows).view(S, M, D)
    h = torch.bmm(padded, gate_up.transpose(-2, -1))  # [S, M, 2F]
    gate, up = h.chunk(2, dim=-1)
    y = torch.bmm(F.silu(gate) * up, down.transpose(-2, -1))  # [S, M, D]
    return y.view(S * M, D).index_select(0, place)


# Largest padding overhead (padded rows S·M over routed rows N) at which `padded_bmm_swiglu` replaces the
# grouped GEMM. Measured on an H200 (bf16, `expertray bench gpu`, third device run), DeepSeek-V3-like, 256
# groups: prefill (128 rows each on average, padding 1.25x) padded ran at 364 TFLOP/s against the grouped
# GEMM's 280; decode (4 rows each, padding 4.0x) 15.5 against 13 — reading the weights dominates there. So
# padded up to the largest overhead measured to win; a skewed call (one hot expert) stays grouped.
PADDED_MAX_OVERHEAD = 4.0


def prefer_padded(counts: Sequence[int], multiple: int = 16) -> bool:
    """Whether padded batched GEMMs cost little enough padding for these per-slot counts."""
    n = sum(counts)
    return n > 0 and len(counts) * padded_rows(counts, multiple) <= PADDED_MAX_OVERHEAD * n


def expert_path(counts: Sequence[int], fast_kernel: bool) -> str:
    """Which expert-compute path a call with these per-slot row counts takes: "padded" (batched GEMMs over
    a zero-padded [S, M, D]), "grouped" (one torch._grouped_mm per projection) or "loop" (a GEMM per slot).
    Only where the device has a fast grouped kernel (`grouped_mm_fast`) do the first two apply: with many
    groups (`prefer_grouped`), padded when the padding is small (`prefer_padded`), else grouped."""
    if not fast_kernel or not prefer_grouped(counts):
        return "loop"
    return "padded" if prefer_padded(counts) else "grouped"


def slots_swiglu(rows: torch.Tensor, counts: Sequence[int], gate_up: torch.Tensor, down: torch.Tensor,
                 grouped: bool, padded: bool = False) -> torch.Tensor:
    """Rows [N, D] grouped by slot → [N, D], by padded batched GEMMs (`padded`), one grouped GEMM
    (`grouped`) or the per-slot loop."""
    if sum(counts) != rows.shape[0]:
        raise ValueError(f"counts sum to {sum(counts)} but {rows.shape[0]} rows were given")
    if len(counts) != gate_up.shape[0]:
        raise ValueError(f"{len(counts)} counts for {gate_up.shape[0]} stacked slots")
    if padded:
        return padded_bmm_swiglu(rows, counts, gate_up, down)
    if grouped and rows.shape[0]:
        return grouped_mm_swiglu(rows, counts, gate_up, down)
    return looped_swiglu(rows, counts, gate_up, down)


def fused_experts_combine(hidden: torch.Tensor, plan: DispatchPlan, weights: torch.Tensor,
                          experts: ExpertWeights) -> torch.Tensor:
    """In-process gather → SwiGLU → weighted scatter-add, one slot at a time: hidden [T, D] → [T, D].

    Same result as combine(grouped_swiglu(permute(hidden))), but each slot's rows are gathered, computed
    and added back while they are still in cache instead of materialising the whole [N, D] permutation
    three times (3.6x faster than the unfused path when expert compute is small, T=4096, D=1024).
    """
    out = torch.zeros(plan.num_tokens, hidden.shape[1], dtype=hidden.dtype, device=hidden.device)
    row_weight = weights[plan.token_index, plan.k_index].to(hidden.dtype)
    start = 0
    for slot, n in enumerate(plan.host_counts):
        if n:
            idx = plan.token_index[start:start + n]
            y = swiglu(hidden.index_select(0, idx), experts.gate_up[slot], experts.down[slot])
            out.index_add_(0, idx, y.mul_(row_weight[start:start + n].unsqueeze(1)))
            start += n
    return out


@dataclass
class SharedExpert:
    """A dense SwiGLU expert every token passes through (Qwen-MoE, DeepSeek), optionally sigmoid-gated."""

    gate_up: torch.Tensor
    down: torch.Tensor
    gate: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = swiglu(x, self.gate_up, self.down)
        if self.gate is not None:
            y = torch.sigmoid(F.linear(x, self.gate)) * y
        return y


@dataclass
class ExpertBiases:
    """Biases of S expert slots: gate_up [S, 2F] (gate entries first, then up), down [S, D]."""

    gate_up: torch.Tensor
    down: torch.Tensor

    def __post_init__(self) -> None:
        if self.gate_up.dim() != 2 or self.down.dim() != 2 or self.gate_up.shape[0] != self.down.shape[0]:
            raise ValueError(f"expert biases must be gate_up [S, 2F] and down [S, D], got "
                             f"{tuple(self.gate_up.shape)} and {tuple(self.down.shape)}")

    @property
    def nbytes(self) -> int:
        return self.gate_up.numel() * self.gate_up.element_size() + self.down.numel() * self.down.element_size()

    def select(self, slots: Sequence[int]) -> ExpertBiases:
        """A copy holding only `slots`, in that order."""
        idx = torch.as_tensor(list(slots), dtype=torch.long)
        return ExpertBiases(self.gate_up.index_select(0, idx).contiguous(), self.down.index_select(0, idx).contiguous())

    def check(self, experts: ExpertWeights) -> None:
        """Raise unless these biases fit `experts` (same slots, 2F and D)."""
        want = ((experts.num_slots, 2 * experts.d_ff), (experts.num_slots, experts.d_model))
        if (tuple(self.gate_up.shape), tuple(self.down.shape)) != want:
            raise ValueError(f"expert biases must be {want[0]} and {want[1]}, got {tuple(self.gate_up.shape)} "
                             f"and {tuple(self.down.shape)}")


def clamped_swiglu_act(gate: torch.Tensor, up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """GPT-OSS activation on [n, F] halves: clamp, gate·sigmoid(alpha·gate)·(up + 1)."""
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return gate * torch.sigmoid(gate * alpha) * (up + 1)


def expert_mlp(x: torch.Tensor, cfg: MoELayerConfig, gate_up: torch.Tensor, down: torch.Tensor,
               gate_up_bias: torch.Tensor | None = None, down_bias: torch.Tensor | None = None) -> torch.Tensor:
    """One expert on rows x [n, D] (gate_up [2F, D], down [D, F], optional biases [2F], [D]) → [n, D],
    with the activation `cfg.expert_activation` names."""
    gate, up = F.linear(x, gate_up, gate_up_bias).chunk(2, dim=-1)
    if cfg.expert_activation == "clamped_swiglu":
        h = clamped_swiglu_act(gate, up, cfg.swiglu_alpha, cfg.swiglu_limit)
    else:
        h = F.silu(gate) * up
    return F.linear(h, down, down_bias)


def fused_experts_combine_general(hidden: torch.Tensor, plan: DispatchPlan, weights: torch.Tensor,
                                  experts: ExpertWeights, biases: ExpertBiases | None,
                                  cfg: MoELayerConfig) -> torch.Tensor:
    """`experts.fused_experts_combine` for any activation and optional biases: hidden [T, D] → [T, D].

    weights: [T, k] combine weights; plan rows grouped by slot (slot s = logical expert s in-process).
    """
    out = torch.zeros(plan.num_tokens, hidden.shape[1], dtype=hidden.dtype, device=hidden.device)
    row_weight = weights[plan.token_index, plan.k_index].to(hidden.dtype)
    start = 0
    for slot, n in enumerate(plan.counts.tolist()):
        if n:
            idx = plan.token_index[start:start + n]
            y = expert_mlp(hidden.index_select(0, idx), cfg, experts.gate_up[slot], experts.down[slot],
                           None if biases is None else biases.gate_up[slot],
                           None if biases is None else biases.down[slot])
            out.index_add_(0, idx, y.mul_(row_weight[start:start + n].unsqueeze(1)))
            start += n
    return out


def deinterleave_gpt_oss(gate_up_EDF2: torch.Tensor, bias_EF2: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """GPT-OSS's gate_up [E, D, 2F] (gate at even, up at odd columns) and bias [E, 2F] → expertray's
    gate_up [E, 2F, D] (gate rows first) and bias [E, 2F] in the same row order."""
    gate_up = torch.cat([gate_up_EDF2[..., ::2], gate_up_EDF2[..., 1::2]], dim=-1).transpose(1, 2).contiguous()
    if bias_EF2 is None:
        return gate_up, None
    return gate_up, torch.cat([bias_EF2[..., ::2], bias_EF2[..., 1::2]], dim=-1).contiguous()
