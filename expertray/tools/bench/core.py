"""`expertray bench core`: the in-process layer's routing overhead and forward vs the transformers block.

Side by side, same input, same weights: (a) transformers' MixtralSparseMoeBlock forward vs our MoELayer
forward at full size (expert GEMMs dominate both); (b) our dispatch+combine alone (gate, capacity, plan,
permute, combine; no expert GEMMs) vs the block's forward, the issue's headline ratio; (c) the data path
only: both layers again with d_ff shrunk to 8 so expert compute is negligible and what remains is routing,
token shuffling and combine, the part the two implementations actually do differently.
"""

from __future__ import annotations

from pathlib import Path

import torch
import typer

from expertray.config import GateConfig, MoELayerConfig
from expertray.layer.capacity import apply_capacity
from expertray.layer.dispatch import build_plan, combine, permute
from expertray.layer.experts import grouped_swiglu
from expertray.layer.gating import gate
from expertray.tools.bench.report import emit, median, time_ms


def run(tokens: int = 4096, d_model: int = 1024, d_ff: int = 2816, experts: int = 8, top_k: int = 2,
        repeats: int = 5, threads: int | None = None) -> dict:
    from expertray.layer.reference import MoELayer
    from expertray.models.blocks import to_hf_block  # transformers is a dev/reference dependency

    if threads:
        torch.set_num_threads(threads)
    cfg = MoELayerConfig(d_model=d_model, d_ff=d_ff, gate=GateConfig("mixtral", experts, top_k))
    layer = MoELayer.random(cfg, seed=0)
    block = to_hf_block(layer)
    thin = MoELayer.random(MoELayerConfig(d_model=d_model, d_ff=8, gate=cfg.gate), seed=0)
    thin_block = to_hf_block(thin)
    x = torch.randn(tokens, d_model, generator=torch.Generator().manual_seed(1))

    def ours_dispatch_combine() -> torch.Tensor:
        g = gate(x, cfg.gate, layer.gate_weights)
        cap = apply_capacity(g, cfg.capacity)
        plan = build_plan(cap.experts, experts)
        rows = permute(x, plan)
        return combine(rows, plan, g.weights)

    g = gate(x, cfg.gate, layer.gate_weights)
    plan = build_plan(g.experts, experts)
    rows = permute(x, plan)
    counts = plan.counts.tolist()

    with torch.inference_mode():
        t_hf = time_ms(lambda: block(x.unsqueeze(0)), repeats)
        t_ours = time_ms(lambda: layer(x), repeats)
        t_dc = time_ms(ours_dispatch_combine, repeats)
        t_gemm = time_ms(lambda: grouped_swiglu(rows, counts, layer.experts), repeats)
        t_hf_thin = time_ms(lambda: thin_block(x.unsqueeze(0)), repeats)
        t_ours_thin = time_ms(lambda: thin(x), repeats)
        max_err = float((block(x.unsqueeze(0))[0] - layer(x)).abs().max())

    hf, ours, dc = median(t_hf), median(t_ours), median(t_dc)
    hf_thin, ours_thin = median(t_hf_thin), median(t_ours_thin)
    return {
        "config": {"tokens": tokens, "d_model": d_model, "d_ff": d_ff, "experts": experts, "top_k": top_k,
                   "repeats": repeats, "threads": torch.get_num_threads()},
        "median_ms": {"hf_block_forward": hf, "moelayer_forward": ours, "dispatch_combine": dc,
                      "expert_gemms": median(t_gemm), "hf_block_data_path": hf_thin,
                      "moelayer_data_path": ours_thin},
        "ratios": {"hf_forward_over_dispatch_combine": hf / dc, "hf_forward_over_moelayer": hf / ours,
                   "hf_data_path_over_ours": hf_thin / ours_thin},
        "max_abs_diff_vs_hf": max_err,
    }


def cli(tokens: int = 4096, d_model: int = 1024, d_ff: int = 2816, experts: int = 8, top_k: int = 2,
        repeats: int = 5, as_json: bool = typer.Option(False, "--json"), out: Path | None = None) -> None:
    """Dispatch+combine and full-layer time vs transformers' Mixtral block (fp32, CPU)."""
    r = run(tokens, d_model, d_ff, experts, top_k, repeats)
    m, q = r["median_ms"], r["ratios"]
    rows = [[k, v] for k, v in m.items()] + [[k, v] for k, v in q.items()]
    emit("core", r, rows, ["measure (ms or ratio)", "value"], as_json, out)
