"""Analysis of a routing trace: per-expert load over time (bounded time bins), summary and heatmap."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from expertray.state.loadstats import balancedness, imbalance
from expertray.wire.trace import FORMAT, VERSION, Trace, TraceHeader


class _TimeBins:
    """Per-batch rows [E] summed into at most `max_bins` bins of equal batch counts (doubling as needed),
    so analysis memory stays bounded however long the trace."""

    def __init__(self, max_bins: int) -> None:
        self.max_bins = max_bins
        self.per_bin = 1
        self.rows: list[torch.Tensor] = []
        self.counts: list[int] = []
        self.starts: list[float] = []

    def add(self, row: torch.Tensor, t: float) -> None:
        if self.rows and self.counts[-1] < self.per_bin:
            self.rows[-1] += row
            self.counts[-1] += 1
            return
        if len(self.rows) == self.max_bins:
            self.rows = [sum(self.rows[i:i + 2]) for i in range(0, len(self.rows), 2)]
            self.counts = [sum(self.counts[i:i + 2]) for i in range(0, len(self.counts), 2)]
            self.starts = self.starts[::2]
            self.per_bin *= 2
            if self.counts[-1] < self.per_bin:
                self.add(row, t)
                return
        self.rows.append(row.clone())
        self.counts.append(1)
        self.starts.append(t)


@dataclass
class TraceAnalysis:
    """Per layer: expert_tokens [L, E] routed assignments, dropped [L], batches [L], tokens [L],
    mean per-batch expert imbalance [L], and expert-load time bins (start times, [bins, E] rows)."""

    header: TraceHeader
    expert_tokens: torch.Tensor
    dropped: list[int]
    batches: list[int]
    tokens: list[int]
    imbalance_sum: list[float]
    bins: list[_TimeBins]

    def summary(self) -> dict[str, Any]:
        h = self.header
        layers = {}
        for layer in range(h.num_layers):
            load = self.expert_tokens[layer]
            assigned = float(load.sum()) + self.dropped[layer]
            layers[str(layer)] = {
                "batches": self.batches[layer], "tokens": self.tokens[layer],
                "expert_tokens": load.tolist(), "dropped": self.dropped[layer],
                "drop_rate": self.dropped[layer] / assigned if assigned else 0.0,
                "balancedness_expert_total": balancedness(load), "imbalance_expert_total": imbalance(load),
                "imbalance_expert_mean_per_batch": self.imbalance_sum[layer] / max(self.batches[layer], 1),
                "hottest_experts": load.argsort(descending=True)[:min(8, h.num_experts)].tolist(),
            }
        return {"format": FORMAT, "version": VERSION, "num_layers": h.num_layers, "num_experts": h.num_experts,
                "top_k": h.top_k, "meta": h.meta, "layers": layers}


def analyze(trace: Trace, max_time_bins: int = 128) -> TraceAnalysis:
    """One streaming pass over the recorded choices (no replay): loads, drops and expert-load over time."""
    h = trace.header
    a = TraceAnalysis(h, torch.zeros(h.num_layers, h.num_experts, dtype=torch.float64), [0] * h.num_layers,
                      [0] * h.num_layers, [0] * h.num_layers, [0.0] * h.num_layers,
                      [_TimeBins(max_time_bins) for _ in range(h.num_layers)])
    for rec in trace:
        kept = rec.experts[rec.experts >= 0]
        row = torch.bincount(kept, minlength=h.num_experts).to(torch.float64)
        a.expert_tokens[rec.layer] += row
        a.dropped[rec.layer] += int((rec.experts < 0).sum())
        a.batches[rec.layer] += 1
        a.tokens[rec.layer] += rec.tokens
        a.imbalance_sum[rec.layer] += imbalance(row)
        a.bins[rec.layer].add(row, rec.t)
    return a


def write_heatmap(analysis: TraceAnalysis, path: str | Path) -> None:
    """PNG heatmap per layer: each expert's share of the routed tokens (rows) in each time bin (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    h = analysis.header
    per_layer_in = min(4.0, 1.5 + 0.04 * h.num_experts)
    fig, axes = plt.subplots(h.num_layers, 1, figsize=(10, per_layer_in * h.num_layers), squeeze=False)
    for layer, ax in enumerate(axes[:, 0]):
        bins = analysis.bins[layer]
        if not bins.rows:
            ax.set_title(f"layer {layer}: no batches")
            continue
        grid = torch.stack(bins.rows, dim=1)  # [E, bins]
        share = grid / grid.sum(dim=0, keepdim=True).clamp_min(1.0)
        im = ax.imshow(share.numpy(), aspect="auto", interpolation="nearest", cmap="viridis", origin="lower")
        ticks = list(range(0, len(bins.starts), max(1, len(bins.starts) // 8)))
        ax.set_xticks(ticks, [f"{bins.starts[i]:.3g}" for i in ticks])
        ax.set_xlabel(f"time bin start (s), {bins.per_bin} batch(es) per bin")
        ax.set_ylabel("expert")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"layer {layer}: share of routed tokens per expert")
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
