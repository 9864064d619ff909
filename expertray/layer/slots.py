"""The expert weights one actor holds, stacked per layer on its device, and the compute over them.

Per layer: experts held (ascending logical ids), gate_up [S, 2F, D] and down [S, D, F] on one device in
one dtype, plus expert biases gate_up [S, 2F] and down [S, D] for layers that have them (GPT-OSS). With a
layer config whose experts are plain SwiGLU without biases the grouped GEMM / per-slot SwiGLU runs; any
other activation (clamped SwiGLU) or biases go through `experts.expert_mlp`, one slot at a time. Stacking lets one grouped GEMM cover a whole call; a load or unload rebuilds that layer's stack
(rare: placement changes), never the hot path. No Ray here: the ExpertActor is a thin shell over this.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from expertray.config import MoELayerConfig
from expertray.errors import UnknownExpertError
from expertray.layer.experts import (
    expert_mlp,
    expert_path,
    grouped_mm_fast,
    padded_bmm_swiglu,
    slots_swiglu,
    swiglu,
)
from expertray.state.placement_table import ExpertKey
from expertray.validation import tensor_view

Tensorish = np.ndarray | torch.Tensor
SlotWeights = tuple[Tensorish, ...]  # (gate_up [2F, D], down [D, F]) or with (gate_up_bias [2F], down_bias [D])


@dataclass
class LayerStack:
    """The slots of one layer: experts[s] is stored at gate_up[s] / down[s]."""

    experts: list[int]
    gate_up: torch.Tensor  # [S, 2F, D]
    down: torch.Tensor  # [S, D, F]
    grouped: bool  # whether a call runs as one grouped GEMM (device/dtype/shape allow a fast kernel)
    gate_up_bias: torch.Tensor | None = None  # [S, 2F]
    down_bias: torch.Tensor | None = None  # [S, D]

    def __post_init__(self) -> None:
        self.index = {e: s for s, e in enumerate(self.experts)}

    def slot(self, s: int) -> tuple[torch.Tensor, ...]:
        """Views of slot s: (gate_up, down) or, with biases, (gate_up, down, gate_up_bias, down_bias)."""
        if self.gate_up_bias is None or self.down_bias is None:
            return self.gate_up[s], self.down[s]
        return self.gate_up[s], self.down[s], self.gate_up_bias[s], self.down_bias[s]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.gate_up, self.down, self.gate_up_bias, self.down_bias)
                   if t is not None)


class SlotStore:
    """Weights of the (layer, expert) slots an actor holds, on `device` in `dtype`. `layer_cfg` says how
    experts compute (activation, biases); None: plain SwiGLU without biases."""

    def __init__(self, owner: str, device: torch.device, dtype: torch.dtype, grouped: bool | None = None,
                 layer_cfg: MoELayerConfig | None = None) -> None:
        self.owner = owner
        self.device = device
        self.dtype = dtype
        self.grouped = grouped  # None: grouped_mm_fast per layer shape, then prefer_grouped per call
        self.layer_cfg = layer_cfg
        self.plain = layer_cfg is None or (layer_cfg.expert_activation == "swiglu" and not layer_cfg.expert_bias)
        self._layers: dict[int, LayerStack] = {}
        # Loads and unloads arrive on concurrent actor threads (a heal loading from two sources at once): each
        # read-modify-restack of a layer holds this lock, or one load's slots would be lost. compute() reads
        # a layer's stack with one dict lookup and needs no lock: stacks are replaced, never changed.
        self._mutate = threading.RLock()

    # --- weights -------------------------------------------------------------------------------------
    def add(self, weights: Mapping[ExpertKey, SlotWeights]) -> None:
        """Add or replace slots: key -> (gate_up [2F, D], down [D, F]) plus (gate_up_bias [2F], down_bias [D])
        when the layer config has expert biases; each touched layer is restacked."""
        by_layer: dict[int, dict[int, tuple[torch.Tensor, ...]]] = {}
        want = 4 if self.layer_cfg is not None and self.layer_cfg.expert_bias else 2
        for (layer, expert), tensors in weights.items():
            if len(tensors) != want:
                raise ValueError(f"actor {self.owner}: expert {layer}:{expert} came with {len(tensors)} tensors, "
                                 f"expected {want} ({'weights and biases' if want == 4 else 'gate_up and down'})")
            by_layer.setdefault(int(layer), {})[int(expert)] = tuple(self._to_device(t) for t in tensors)
        with self._mutate:
            for layer, new in by_layer.items():
                held = {e: self.get((layer, e)) for e in self._layers[layer].experts} if layer in self._layers else {}
                self._restack(layer, {**held, **new})

    def add_stacked(self, layer: int, experts: Sequence[int], gate_up: torch.Tensor, down: torch.Tensor,
                    gate_up_bias: torch.Tensor | None = None, down_bias: torch.Tensor | None = None) -> None:
        """Add the slots of `experts` (ascending) of one layer from stacked gate_up [S, 2F, D], down [S, D, F]
        (biases [S, 2F], [S, D]). A layer not held yet adopts the tensors as its stack (no copy when they are
        already on this device in this dtype): loading a checkpoint needs no second copy of the weights."""
        if list(experts) != sorted(set(experts)):
            raise ValueError(f"actor {self.owner}: experts {list(experts)} must be ascending and distinct")
        has_bias = bool(self.layer_cfg is not None and self.layer_cfg.expert_bias)
        if (gate_up_bias is not None) != has_bias:
            raise ValueError(f"actor {self.owner}: layer {layer}: expert biases "
                             f"{'given' if gate_up_bias is not None else 'missing'} but layer.expert_bias={has_bias}")
        with self._mutate:
            if layer in self._layers:
                stack = LayerStack(list(experts), gate_up, down, False, gate_up_bias, down_bias)
                self.add({(layer, e): stack.slot(s) for s, e in enumerate(experts)})
                return
            tensors = [None if t is None else self._to_device(t) for t in (gate_up, down, gate_up_bias, down_bias)]
            grouped = self._grouped(tensors[0], tensors[1])
            self._layers[layer] = LayerStack(list(experts), tensors[0], tensors[1], grouped, tensors[2], tensors[3])

    def remove(self, keys: Iterable[ExpertKey]) -> None:
        """Drop slots (unknown keys are ignored: unloading twice is harmless)."""
        drop: dict[int, set[int]] = {}
        for layer, expert in keys:
            drop.setdefault(int(layer), set()).add(int(expert))
        with self._mutate:
            for layer, experts in drop.items():
                if layer in self._layers:
                    keep = {e: self.get((layer, e)) for e in self._layers[layer].experts if e not in experts}
                    self._restack(layer, keep)

    def get(self, key: ExpertKey) -> tuple[torch.Tensor, ...]:
        """Views of one held slot: (gate_up [2F, D], down [D, F]) plus (gate_up_bias [2F], down_bias [D])
        in a layer with expert biases."""
        layer, expert = key
        stack = self._layers.get(layer)
        if stack is None or expert not in stack.index:
            raise UnknownExpertError(f"actor {self.owner} holds no slot for expert {layer}:{expert}")
        return stack.slot(stack.index[expert])

    def keys(self) -> list[ExpertKey]:
        return sorted((layer, e) for layer, stack in self._layers.items() for e in stack.experts)

    def nbytes(self) -> int:
        return sum(s.nbytes for s in self._layers.values())

    def layer(self, layer: int) -> LayerStack:
        return self._layers[layer]

    def _to_device(self, array: np.ndarray | torch.Tensor) -> torch.Tensor:
        tensor = array if isinstance(array, torch.Tensor) else tensor_view(np.asarray(array))
        return tensor.to(self.device, self.dtype)

    def _grouped(self, gate_up: torch.Tensor, down: torch.Tensor) -> bool:
        if not self.plain:
            return False
        return self.grouped if self.grouped is not None else grouped_mm_fast(
            self.device, self.dtype, gate_up.shape[2], down.shape[2])

    def _restack(self, layer: int, slots: dict[int, tuple[torch.Tensor, ...]]) -> None:
        if not slots:
            self._layers.pop(layer, None)
            return
        experts = sorted(slots)
        parts = [torch.stack([slots[e][i] for e in experts]) for i in range(len(slots[experts[0]]))]
        gate_up, down = parts[0], parts[1]
        biases = (parts[2], parts[3]) if len(parts) == 4 else (None, None)
        self._layers[layer] = LayerStack(experts, gate_up, down, self._grouped(gate_up, down), *biases)

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
            path = "grouped" if self.grouped is True else expert_path(full, fast_kernel=True)  # True: tests
            if path == "padded":
                return padded_bmm_swiglu(rows, full, stack.gate_up, stack.down)
            if path == "grouped":
                return slots_swiglu(rows, full, stack.gate_up, stack.down, grouped=True)
        out = torch.empty_like(rows)
        start = 0
        for s, n in zip(positions, counts):
            if n:
                if self.plain:
                    swiglu(rows[start:start + n], stack.gate_up[s], stack.down[s], out=out[start:start + n])
                else:
                    out[start:start + n] = expert_mlp(rows[start:start + n], self.layer_cfg, *stack.slot(s))
                start += n
        return out
