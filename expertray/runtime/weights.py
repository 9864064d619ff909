"""The controller's weight store on disk: every layer's gate, routed experts and shared expert as one
safetensors file (tensors only: loading it executes nothing, unlike a pickle).

Keys, for layer l: `{l}.gate.weight` [E, D], optional `{l}.gate.bias` [E] and `{l}.gate.correction_bias` [E],
`{l}.experts.gate_up` [E, 2F, D], `{l}.experts.down` [E, D, F], optional `{l}.shared.gate_up` [2Fs, D],
`{l}.shared.down` [D, Fs], `{l}.shared.gate` [1, D].
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from expertray.config import MoELayerConfig
from expertray.experts import ExpertWeights, SharedExpert
from expertray.gating import GateWeights
from expertray.layer import MoELayer
from expertray.snapshot import SnapshotError


def save_weights(path: str | Path, layers: list[MoELayer]) -> None:
    """Write every layer's weights to `path` (safetensors), atomically (temp file, then rename)."""
    tensors: dict[str, torch.Tensor] = {}
    for i, m in enumerate(layers):
        parts = {"gate.weight": m.gate_weights.weight, "gate.bias": m.gate_weights.bias,
                 "gate.correction_bias": m.gate_weights.correction_bias,
                 "experts.gate_up": m.experts.gate_up, "experts.down": m.experts.down}
        if m.shared is not None:
            parts.update({"shared.gate_up": m.shared.gate_up, "shared.down": m.shared.down,
                          "shared.gate": m.shared.gate})
        tensors.update({f"{i}.{k}": v.detach().contiguous() for k, v in parts.items() if v is not None})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "expertray-weights", "num_layers": str(len(layers))})
    tmp.replace(path)


def load_weights(path: str | Path, cfg: MoELayerConfig, num_layers: int) -> list[MoELayer]:
    """The layers saved by save_weights, checked against the layer config; SnapshotError names the problem."""
    try:
        tensors = load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise SnapshotError(f"weight store {path}: cannot read ({exc})") from exc

    def get(layer: int, key: str, required: bool = True) -> torch.Tensor | None:
        t = tensors.get(f"{layer}.{key}")
        if t is None and required:
            raise SnapshotError(f"weight store {path}: tensor {layer}.{key} is missing")
        return t

    layers = []
    for i in range(num_layers):
        gate = GateWeights(get(i, "gate.weight"), get(i, "gate.bias", False), get(i, "gate.correction_bias", False))
        shared = None
        if get(i, "shared.gate_up", False) is not None:
            shared = SharedExpert(get(i, "shared.gate_up"), get(i, "shared.down"), get(i, "shared.gate", False))
        try:
            layers.append(MoELayer(cfg, gate, ExpertWeights(get(i, "experts.gate_up"), get(i, "experts.down")),
                                   shared))
        except ValueError as exc:
            raise SnapshotError(f"weight store {path}: layer {i} does not match the config ({exc})") from exc
    return layers
