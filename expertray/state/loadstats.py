"""Load statistics (sliding window + EMA per logical expert, per physical slot, per-actor latency) and the
pure measures the project reports: balancedness, imbalance, drop rate, gate mass retained, top-k agreement.

Shapes: expert counts [E] per (layer, batch); slot counts [S_l] per layer for one placement-table version.
Snapshots are plain dicts of lists and numbers, so msgpack/JSON persist them as they are.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

import torch

from expertray.errors import ConfigError, TraceFormatError, UnknownExpertError

SNAPSHOT_VERSION = 1


class _Window:
    """The last `size` rows of width `width` (a ring buffer) with their running sum, for O(width) means."""

    def __init__(self, size: int, width: int) -> None:
        self.rows = torch.zeros(size, width, dtype=torch.float64)
        self.total = torch.zeros(width, dtype=torch.float64)
        self.pos = 0
        self.filled = 0

    def push(self, row: torch.Tensor) -> None:
        self.total += row - self.rows[self.pos]
        self.rows[self.pos] = row
        self.pos = (self.pos + 1) % self.rows.shape[0]
        self.filled = min(self.filled + 1, self.rows.shape[0])

    def mean(self) -> torch.Tensor:
        return self.total / max(self.filled, 1)

    def chronological(self) -> torch.Tensor:
        """[filled, width] rows, oldest first."""
        size = self.rows.shape[0]
        start = (self.pos - self.filled) % size
        idx = (torch.arange(self.filled) + start) % size
        return self.rows[idx]


class LoadStats:
    """Per-layer load of each logical expert (and of each physical slot), plus per-actor compute latency.

    `record` takes one batch's routed tokens per logical expert [E] and its dropped assignments. The window
    holds the last `window_batches` batches; `window_load` is their per-batch mean, so it is on the scale of
    one batch's counts. The EMA starts at the first batch's counts (no bias towards zero).
    """

    def __init__(self, num_layers: int, num_experts: int, window_batches: int = 64, ema_alpha: float = 0.1,
                 latency_window: int = 1024) -> None:
        if num_layers < 1:
            raise ConfigError(f"loadstats.num_layers: must be >= 1, got {num_layers}")
        if num_experts < 1:
            raise ConfigError(f"loadstats.num_experts: must be >= 1, got {num_experts}")
        if window_batches < 1:
            raise ConfigError(f"loadstats.window_batches: must be >= 1, got {window_batches}")
        if not 0.0 < ema_alpha <= 1.0:
            raise ConfigError(f"loadstats.ema_alpha: must be in (0, 1], got {ema_alpha}")
        if latency_window < 1:
            raise ConfigError(f"loadstats.latency_window: must be >= 1, got {latency_window}")
        self.num_layers, self.num_experts = num_layers, num_experts
        self.window_batches, self.ema_alpha, self.latency_window = window_batches, ema_alpha, latency_window
        # column E of each window row holds the batch's dropped assignments
        self._experts = [_Window(window_batches, num_experts + 1) for _ in range(num_layers)]
        self._ema = torch.zeros(num_layers, num_experts, dtype=torch.float64)
        self._batches = [0] * num_layers
        self._slots: dict[int, tuple[int, _Window]] = {}
        self._latency: dict[str, deque[float]] = {}

    # --- recording ----------------------------------------------------------------------------------
    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.num_layers:
            raise UnknownExpertError(f"unknown layer {layer} (stats cover layers 0..{self.num_layers - 1})")

    def record(self, layer: int, expert_counts: torch.Tensor, dropped: int = 0) -> None:
        """Add one batch: routed tokens per logical expert [E] and the batch's dropped assignments."""
        self._check_layer(layer)
        counts = torch.as_tensor(expert_counts).to(torch.float64).reshape(-1)
        if counts.numel() != self.num_experts:
            raise ConfigError(f"expert_counts: expected {self.num_experts} entries, got {counts.numel()}")
        if dropped < 0 or bool((counts < 0).any()):
            raise ConfigError(f"layer {layer}: counts and dropped must be >= 0")
        self._experts[layer].push(torch.cat([counts, torch.tensor([float(dropped)], dtype=torch.float64)]))
        if self._batches[layer] == 0:
            self._ema[layer] = counts
        else:
            self._ema[layer].mul_(1.0 - self.ema_alpha).add_(counts, alpha=self.ema_alpha)
        self._batches[layer] += 1

    def record_slot_counts(self, layer: int, slot_counts: torch.Tensor, table_version: int) -> None:
        """Add one batch's routed tokens per physical slot [S_l] of placement-table `table_version`.

        Slot indices mean nothing across versions, so a new version restarts the layer's slot window.
        """
        self._check_layer(layer)
        counts = torch.as_tensor(slot_counts).to(torch.float64).reshape(-1)
        held = self._slots.get(layer)
        if held is None or held[0] != table_version or held[1].rows.shape[1] != counts.numel():
            if held is not None and held[0] == table_version:
                raise ConfigError(f"layer {layer}: table version {table_version} has {held[1].rows.shape[1]} "
                                  f"slots, got counts for {counts.numel()}")
            held = (table_version, _Window(self.window_batches, counts.numel()))
            self._slots[layer] = held
        held[1].push(counts)

    def record_latency(self, actor: str, ms: float) -> None:
        """One compute-latency sample of `actor` (only the last `latency_window` are kept)."""
        self._latency.setdefault(actor, deque(maxlen=self.latency_window)).append(float(ms))

    def forget_actor(self, actor: str) -> None:
        """Drop a removed actor's latency samples."""
        self._latency.pop(actor, None)

    # --- queries ------------------------------------------------------------------------------------
    def num_batches(self, layer: int) -> int:
        self._check_layer(layer)
        return self._batches[layer]

    def window_load(self, layer: int) -> torch.Tensor:
        """[E] float64: mean routed tokens per batch per logical expert over the window (zeros if empty)."""
        self._check_layer(layer)
        return self._experts[layer].mean()[: self.num_experts].clone()

    def ema_load(self, layer: int) -> torch.Tensor:
        """[E] float64: exponential moving average of routed tokens per batch per logical expert."""
        self._check_layer(layer)
        return self._ema[layer].clone()

    def window_drop_rate(self, layer: int) -> float:
        """Dropped / (routed + dropped) assignments over the window (0.0 if nothing was recorded)."""
        self._check_layer(layer)
        total = self._experts[layer].total
        assigned = float(total.sum())
        return float(total[-1]) / assigned if assigned > 0 else 0.0

    def slot_load(self, layer: int) -> tuple[int, torch.Tensor]:
        """(table version, [S_l] float64 mean routed tokens per batch per slot over the window)."""
        self._check_layer(layer)
        if layer not in self._slots:
            raise UnknownExpertError(f"no slot counts recorded for layer {layer}")
        version, window = self._slots[layer]
        return version, window.mean()

    def actors(self) -> list[str]:
        return sorted(self._latency)

    def latency_quantiles(self, actor: str, qs: Sequence[float] = (0.5, 0.99)) -> tuple[float, ...]:
        """Latency quantiles (ms, linear interpolation) over the actor's last `latency_window` samples."""
        samples = self._latency.get(actor)
        if not samples:
            raise UnknownExpertError(f"no latency samples for actor {actor!r} (known: {', '.join(self.actors())})")
        if any(not 0.0 <= q <= 1.0 for q in qs):
            raise ConfigError(f"latency quantiles must be in [0, 1], got {tuple(qs)}")
        values = torch.quantile(torch.tensor(list(samples), dtype=torch.float64),
                                torch.tensor(list(qs), dtype=torch.float64))
        return tuple(float(v) for v in values)

    # --- persistence --------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """Plain-dict state (lists and numbers); `from_snapshot` restores it exactly."""
        return {
            "format": "expertray-loadstats", "version": SNAPSHOT_VERSION,
            "num_layers": self.num_layers, "num_experts": self.num_experts,
            "window_batches": self.window_batches, "ema_alpha": self.ema_alpha,
            "latency_window": self.latency_window,
            "batches": list(self._batches),
            "window": [w.chronological().tolist() for w in self._experts],
            "ema": self._ema.tolist(),
            "slots": {str(layer): {"table_version": v, "window": w.chronological().tolist()}
                      for layer, (v, w) in self._slots.items()},
            "latency_ms": {a: list(s) for a, s in self._latency.items()},
        }

    @classmethod
    def from_snapshot(cls, snap: dict[str, Any]) -> LoadStats:
        if not isinstance(snap, dict) or snap.get("format") != "expertray-loadstats":
            raise TraceFormatError("load-stats snapshot: missing format 'expertray-loadstats'")
        if snap.get("version") != SNAPSHOT_VERSION:
            raise TraceFormatError(f"load-stats snapshot: version {snap.get('version')!r} is not supported "
                                   f"(this reader supports {SNAPSHOT_VERSION})")
        try:
            stats = cls(int(snap["num_layers"]), int(snap["num_experts"]), int(snap["window_batches"]),
                        float(snap["ema_alpha"]), int(snap["latency_window"]))
            if len(snap["window"]) != stats.num_layers or len(snap["batches"]) != stats.num_layers:
                raise ValueError(f"expected {stats.num_layers} layers of window and batches")
            for layer, rows in enumerate(snap["window"]):
                for row in rows[-stats.window_batches:]:
                    stats._experts[layer].push(_row(row, stats.num_experts + 1))
            stats._batches = [int(b) for b in snap["batches"]]
            stats._ema = torch.tensor(snap["ema"], dtype=torch.float64).reshape(stats.num_layers, stats.num_experts)
            for key, entry in snap["slots"].items():
                layer = int(key)
                stats._check_layer(layer)
                rows = entry["window"]
                window = _Window(stats.window_batches, len(rows[0]) if rows else 0)
                for row in rows[-stats.window_batches:]:
                    window.push(_row(row, window.rows.shape[1]))
                stats._slots[layer] = (int(entry["table_version"]), window)
            for actor, samples in snap["latency_ms"].items():
                for ms in samples:
                    stats.record_latency(str(actor), float(ms))
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as exc:
            raise TraceFormatError(f"load-stats snapshot: malformed ({exc!r})") from exc
        return stats


def _row(values: Sequence[float], width: int) -> torch.Tensor:
    row = torch.tensor(values, dtype=torch.float64)
    if row.shape != (width,):
        raise ValueError(f"window row has {row.numel()} entries, expected {width}")
    return row


# --- measures ---------------------------------------------------------------------------------------
def balancedness(per_device_tokens: torch.Tensor) -> float:
    """mean / max of tokens per device [D]; 1.0 is perfect (and is what an all-zero load counts as)."""
    x = torch.as_tensor(per_device_tokens).to(torch.float64).reshape(-1)
    peak = float(x.max()) if x.numel() else 0.0
    return float(x.mean()) / peak if peak > 0 else 1.0


def imbalance(per_device_tokens: torch.Tensor) -> float:
    """max / mean of tokens per device [D]; 1.0 is perfect (and is what an all-zero load counts as)."""
    x = torch.as_tensor(per_device_tokens).to(torch.float64).reshape(-1)
    mean = float(x.mean()) if x.numel() else 0.0
    return float(x.max()) / mean if mean > 0 else 1.0


def drop_rate(experts: torch.Tensor) -> float:
    """Fraction of assignments in experts [T, k] marked dropped (-1); 0.0 for an empty batch."""
    n = experts.numel()
    return float((experts < 0).sum()) / n if n else 0.0


def gate_mass_retained(gate_probs: torch.Tensor, chosen: torch.Tensor, baseline: torch.Tensor) -> float:
    """Gate mass of the chosen experts over that of the model's own top-k, summed over the batch.

    gate_probs [T, E]; chosen [T, k] (-1 = dropped, contributes nothing); baseline [T, k'] the gate's top-k.
    """
    kept = gate_probs.gather(1, chosen.clamp(min=0)) * (chosen >= 0)
    base = gate_probs.gather(1, baseline.clamp(min=0)) * (baseline >= 0)
    denom = float(base.sum(dtype=torch.float64))
    return float(kept.sum(dtype=torch.float64)) / denom if denom > 0 else 1.0


def topk_agreement(chosen: torch.Tensor, baseline: torch.Tensor) -> float:
    """Fraction of baseline assignments [T, k'] that the chosen set [T, k] (-1 = dropped) still holds, per token."""
    valid = baseline >= 0
    hit = (chosen.unsqueeze(2) == baseline.unsqueeze(1)).any(dim=1) & valid
    n = int(valid.sum())
    return float(hit.sum()) / n if n else 1.0


BATCH_MEASURES = ("imbalance_device", "imbalance_expert", "balancedness_device", "balancedness_expert",
                  "drop_rate", "gate_mass_retained", "topk_agreement")


def batch_measures(per_device: torch.Tensor, per_expert: torch.Tensor, gate_probs: torch.Tensor,
                   chosen: torch.Tensor, baseline: torch.Tensor) -> dict[str, float]:
    """Every balance and fidelity measure of one routed batch, keyed by BATCH_MEASURES.

    per_device [A] / per_expert [E]: routed tokens; gate_probs [T, E]; chosen / baseline [T, k] (-1 dropped).
    """
    return {"imbalance_device": imbalance(per_device), "imbalance_expert": imbalance(per_expert),
            "balancedness_device": balancedness(per_device), "balancedness_expert": balancedness(per_expert),
            "drop_rate": drop_rate(chosen), "gate_mass_retained": gate_mass_retained(gate_probs, chosen, baseline),
            "topk_agreement": topk_agreement(chosen, baseline)}
