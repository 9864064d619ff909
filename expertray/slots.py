"""The expert weights one actor holds, stacked per layer on its device, and the compute over them.

Per layer: experts held (ascending logical ids), gate_up [S, 2F, D] and down [S, D, F] on one device in
one dtype. Stacking lets one grouped GEMM cover a whole call; a load or unload rebuilds that layer's stack
(rare: placement changes), never the hot path. No Ray here: the ExpertActor is a thin shell over this.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from expertray.errors import UnknownExpertError
from expertray.experts import (
    grouped_mm_fast,
    padded_bmm_swiglu,
    prefer_grouped,
    prefer_padded,
    slots_swiglu,
    swiglu,
)
from expertray.validation import tensor_view

ExpertKey = tuple[int, int]  # (layer, logical expert)


@dataclass
class LayerStack:
    """The slots of one layer: experts[s] is stored at gate_up[s] / down[s]."""

    experts: list[int]
    gate_up: torch.Tensor  # [S, 2F, D]
    down: torch.Tensor  # [S, D, F]
    grouped: bool  # whether a call runs as one grouped GEMM (device/dtype/shape allow a fast kernel)

    def __post_init__(self) -> None:
        self.index = {e: s for s, e in enumerate(self.experts)}


class SlotStore:
    """Weights of the (layer, expert) slots an actor holds, on `device` in `dtype`."""

    def __init__(self, owner: str, device: torch.device, dtype: torch.dtype, grouped: bool | None = None) -> None:
        self.owner = owner
        self.device = device
        self.dtype = dtype
        self.grouped = grouped  # None: grouped_mm_fast per layer shape, then prefer_grouped per call
        self._layers: dict[int, LayerStack] = {}

    # --- weights -------------------------------------------------------------------------------------
    def add(self, weights: Mapping[ExpertKey, tuple[np.ndarray | torch.Tensor, np.ndarray | torch.Tensor]]) -> None:
        """Add or replace slots: key -> (gate_up [2F, D], down [D, F]); each touched layer is restacked."""
        by_layer: dict[int, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
        for (layer, expert), (gate_up, down) in weights.items():
            by_layer.setdefault(int(layer), {})[int(expert)] = (self._to_device(gate_up), self._to_device(down))
        for layer, new in by_layer.items():
            held = {e: self.get((layer, e)) for e in self._layers[layer].experts} if layer in self._layers else {}
            self._restack(layer, {**held, **new})

    def remove(self, keys: Iterable[ExpertKey]) -> None:
        """Drop slots (unknown keys are ignored: unloading twice is harmless)."""
        drop: dict[int, set[int]] = {}
        for layer, expert in keys:
            drop.setdefault(int(layer), set()).add(int(expert))
        for layer, experts in drop.items():
            if layer in self._layers:
                keep = {e: self.get((layer, e)) for e in self._layers[layer].experts if e not in experts}
                self._restack(layer, keep)

    def get(self, key: ExpertKey) -> tuple[torch.Tensor, torch.Tensor]:
        """Views (gate_up [2F, D], down [D, F]) of one held slot."""
        layer, expert = key
        stack = self._layers.get(layer)
        if stack is None or expert not in stack.index:
            raise UnknownExpertError(f"actor {self.owner} holds no slot for expert {layer}:{expert}")
        s = stack.index[expert]
        return stack.gate_up[s], stack.down[s]

    def keys(self) -> list[ExpertKey]:
        return sorted((layer, e) for layer, stack in self._layers.items() for e in stack.experts)

    def nbytes(self) -> int:
        return sum(s.gate_up.numel() * s.gate_up.element_size() + s.down.numel() * s.down.element_size()
                   for s in self._layers.values())

    def layer(self, layer: int) -> LayerStack:
        return self._layers[layer]

    def _to_device(self, array: np.ndarray | torch.Tensor) -> torch.Tensor:
        tensor = array if isinstance(array, torch.Tensor) else tensor_view(np.asarray(array))
        return tensor.to(self.device, self.dtype)

    def _restack(self, layer: int, slots: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        if not slots:
            self._layers.pop(layer, None)
            return
        experts = sorted(slots)
        gate_up = torch.stack([slots[e][0] for e in experts])
        down = torch.stack([slots[e][1] for e in experts])
        grouped = self.grouped if self.grouped is not None else grouped_mm_fast(
            self.device, self.dtype, gate_up.shape[2], down.shape[2])
        self._layers[layer] = LayerStack(experts, gate_up, down, grouped)

    # --- compute -------------------------------------------------------------------------------------
    def compute(self, layer: int, experts: Sequence[int], counts: Sequence[int], rows: torch.Tensor) -> torch.Tensor:
        """rows [N, D] on this device, grouped by `experts` (counts[i] rows for experts[i]) → outputs [N, D].

        One grouped GEMM when the layer allows it (fast kernel), the experts come in stack order (the
        dispatch plan sorts them so) and there are enough of them (`prefer_grouped`, unless the store was
        built with grouped=True); padded batched GEMMs instead when the counts are even enough
        (`prefer_padded`); the per-slot loop otherwise."""
        if len(experts) != len(counts):
            raise ValueError(f"actor {self.owner}: {len(experts)} experts but {len(counts)} counts")
        if sum(counts) != rows.shape[0]:
            raise ValueError(f"actor {self.owner}: counts sum {sum(counts)} != {rows.shape[0]} rows received")
        for e in experts:
            self.get((layer, e))  # names the first missing slot
        stack = self._layers.get(layer)
        if stack is None or not rows.shape[0]:
            return torch.empty_like(rows)
        positions = [stack.index[e] for e in experts]
        if stack.grouped and all(a < b for a, b in zip(positions, positions[1:])):
            full = [0] * len(stack.experts)
            for s, n in zip(positions, counts):
                full[s] = n
            if self.grouped is None and prefer_padded(full):  # even counts: padded batched GEMMs
                return padded_bmm_swiglu(rows, full, stack.gate_up, stack.down)
            if self.grouped is True or prefer_grouped(full):  # grouped=True forces it (tests, benches)
                return slots_swiglu(rows, full, stack.gate_up, stack.down, grouped=True)
        out = torch.empty_like(rows)
        start = 0
        for s, n in zip(positions, counts):
            if n:
                swiglu(rows[start:start + n], stack.gate_up[s], stack.down[s], out=out[start:start + n])
                start += n
        return out
