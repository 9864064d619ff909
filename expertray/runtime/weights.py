"""Where a cluster's weights come from, Ray-free.

A checkpoint cluster (`cluster.model`) has no weight store: the controller keeps only the checkpoint's
descriptor (path, shard sizes and digests; persisted in its snapshot); each expert actor reads its own
slots from the shards (`ExpertActor.load_checkpoint`) and each router its gates and shared experts
(`router_params`). A new slot is copied from a live replica, or re-read from the checkpoint by the actor
when none is alive.

A random-weight cluster (no `model`) keeps the weight store it has always had: every layer's gate, routed
experts and shared expert as one safetensors file in the state directory (tensors only: loading it
executes nothing, unlike a pickle), held by the controller and sent to actors as `expert_blob`s. (Its
weights could be regenerated from cfg.seed instead; the store also serves `launch(cfg, layers)` with
caller-given weights, which no seed reproduces.)

Keys, for layer l: `{l}.gate.weight` [E, D], optional `{l}.gate.bias` [E] and `{l}.gate.correction_bias` [E],
`{l}.experts.gate_up` [E, 2F, D], `{l}.experts.down` [E, D, F], optional `{l}.experts.gate_up_bias` [E, 2F]
and `{l}.experts.down_bias` [E, D] (layers with expert biases), optional `{l}.shared.gate_up` [2Fs, D],
`{l}.shared.down` [D, Fs], `{l}.shared.gate` [1, D].
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from expertray.config import ClusterConfig, MoELayerConfig
from expertray.layer.experts import ExpertBiases, ExpertWeights, SharedExpert
from expertray.layer.gating import GateWeights
from expertray.layer.reference import MoELayer
from expertray.layer.slots import SlotStore
from expertray.runtime.snapshot import SnapshotError


def serving_dtype(cfg: ClusterConfig) -> str:
    """The dtype expert slots, rows on the wire and shared experts use: cfg.dtype, with `auto` meaning
    float32 (a checkpoint cluster's config has it resolved to the checkpoint's dtype before launch)."""
    return "float32" if cfg.dtype == "auto" else cfg.dtype


def expert_blob(layers: list[MoELayer], keys: list[tuple[int, int]], dtype: str) -> dict[str, Any]:
    """The ExpertBlob (see actors/expert.py) of `keys` from in-memory layers, in `dtype`: weights and, for
    layers with expert biases, biases; bf16 as its raw bits."""
    from expertray.wire.collective import to_host_array

    def rows(m: MoELayer, e: int) -> list[torch.Tensor]:
        out = [m.experts.gate_up[e], m.experts.down[e]]
        if m.biases is not None:
            out += [m.biases.gate_up[e], m.biases.down[e]]
        return out

    return {"dtype": dtype, "slots": {(layer, e): [to_host_array(t.to(getattr(torch, dtype)).contiguous())[0]
                                                   for t in rows(layers[layer], e)] for layer, e in keys}}


def read_slots(source: Any, keys: list[tuple[int, int]], store: SlotStore, chunk_bytes: int) -> None:
    """Add the slots `keys` to `store`, read from WeightSource `source` (which must serve the store's dtype).

    One layer at a time: that layer's stacks (gate_up [S, 2F, D], down [S, D, F], biases) are allocated
    once on the store's device and filled in chunks of ≤ chunk_bytes read from the shards (on the CPU
    straight out of the mmap into the stacks), then adopted by the store without another copy; so the peak
    is the slots plus one chunk's mmap pages (plus one chunk on a GPU, staged through the host)."""
    cfg = source.layer_config
    D, F = cfg.d_model, cfg.d_ff
    by_layer: dict[int, list[int]] = {}
    for layer, expert in keys:
        by_layer.setdefault(int(layer), []).append(int(expert))
    chunk = max(1, chunk_bytes // max(1, source.slot_bytes(1)))
    on_host = store.device.type == "cpu"
    for layer, experts in sorted(by_layer.items()):
        experts = sorted(set(experts))
        S = len(experts)
        gate_up = torch.empty(S, 2 * F, D, dtype=store.dtype, device=store.device)
        down = torch.empty(S, D, F, dtype=store.dtype, device=store.device)
        biases = (torch.empty(S, 2 * F, dtype=store.dtype, device=store.device),
                  torch.empty(S, D, dtype=store.dtype, device=store.device)) if cfg.expert_bias else (None, None)
        for start in range(0, S, chunk):
            part = slice(start, min(S, start + chunk))
            out = ExpertWeights(gate_up[part], down[part]) if on_host else None
            weights, bias = source.experts([(layer, e) for e in experts[part]], out)
            if not on_host:
                gate_up[part].copy_(weights.gate_up)
                down[part].copy_(weights.down)
            if bias is not None:
                biases[0][part].copy_(bias.gate_up)
                biases[1][part].copy_(bias.down)
            del weights, bias
        store.add_stacked(layer, experts, gate_up, down, *biases)


def router_params(descriptor: dict[str, Any], dtype: str) -> list[Any]:
    """LayerParams (gate weights in float32, shared expert in `dtype`) of every MoE layer of a checkpoint,
    read from its shards: what a router loads for itself (routed experts are never read)."""
    from expertray.layer.route import LayerParams
    from expertray.models.source import cached_source

    source = cached_source(descriptor, dtype)
    return [LayerParams(rw.gate, rw.shared) for rw in (source.router(layer) for layer in range(source.num_layers))]


def save_weights(path: str | Path, layers: list[MoELayer]) -> None:
    """Write every layer's weights to `path` (safetensors), atomically (temp file, then rename)."""
    tensors: dict[str, torch.Tensor] = {}
    for i, m in enumerate(layers):
        parts = {"gate.weight": m.gate_weights.weight, "gate.bias": m.gate_weights.bias,
                 "gate.correction_bias": m.gate_weights.correction_bias,
                 "experts.gate_up": m.experts.gate_up, "experts.down": m.experts.down}
        if m.biases is not None:
            parts.update({"experts.gate_up_bias": m.biases.gate_up, "experts.down_bias": m.biases.down})
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
        biases = None
        if cfg.expert_bias:
            biases = ExpertBiases(get(i, "experts.gate_up_bias"), get(i, "experts.down_bias"))
        try:
            layers.append(MoELayer(cfg, gate, ExpertWeights(get(i, "experts.gate_up"), get(i, "experts.down")),
                                   shared, biases))
        except ValueError as exc:
            raise SnapshotError(f"weight store {path}: layer {i} does not match the config ({exc})") from exc
    return layers


def slot_bytes(layer: MoELayerConfig, checkpoint: dict[str, Any], dtype: str) -> int:
    """Bytes of one expert slot as actors hold it in `dtype` (checkpoint: from the shard headers only)."""
    if checkpoint:
        from expertray.models.source import cached_source

        return cached_source(checkpoint, dtype).slot_bytes(1)
    per = 3 * layer.d_model * layer.d_ff + (2 * layer.d_ff + layer.d_model if layer.expert_bias else 0)
    return per * torch.empty(0, dtype=getattr(torch, dtype)).element_size()


def held_bytes(layers: list[MoELayer] | None) -> int:
    """Routed-expert bytes of a weight store (0 without one, as for a checkpoint cluster)."""
    return sum(m.experts.nbytes + (m.biases.nbytes if m.biases is not None else 0) for m in layers or [])
