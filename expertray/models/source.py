"""WeightSource: reads exactly the MoE tensors asked for from a checkpoint, memory-mapped, in the serving
dtype. Cluster layer l is decoder layer `moe_layers[l]` (models like DeepSeek-V3 start with dense layers).

An expert actor calls `experts(keys)` for its slots; a router calls `router(layer)` for gate weights and
shared experts. Both open shards through `safetensors.safe_open` and read only the named tensors (for
stacked layouts, only the requested experts' rows of the stacked tensor).
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from expertray.config import CapacityConfig, MoELayerConfig
from expertray.errors import CheckpointError
from expertray.layer.experts import ExpertBiases, ExpertWeights, SharedExpert, deinterleave_gpt_oss
from expertray.layer.gating import GateWeights
from expertray.layer.reference import MoELayer
from expertray.models.families import Family, HFConfig, family_for
from expertray.models.files import CheckpointDescriptor, TensorInfo, describe, read_config, tensor_index
from expertray.models.quant import FP8_DTYPES, SCALE_SUFFIX, dequantize_fp8, dequantize_mxfp4, fp8_block

SERVABLE_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
MXFP4_SUFFIXES = ("_blocks", "_scales")
DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(requested: str, checkpoint_dtype: str | None) -> torch.dtype:
    """`auto` → the checkpoint's dtype when it is one expertray serves, else float32."""
    if requested == "auto":
        return DTYPE_NAMES.get(str(checkpoint_dtype).removeprefix("torch."), torch.float32)
    if requested not in DTYPE_NAMES:
        raise CheckpointError(f"dtype {requested!r} is not one of auto, {', '.join(DTYPE_NAMES)}")
    return DTYPE_NAMES[requested]


@dataclass(frozen=True)
class LayerTensors:
    """Tensor names of one MoE layer: `prefix` (e.g. model.layers.3.mlp) and the experts' layout:
    per_expert (experts.{e}.{proj}.weight), stacked, gpt_oss (see Family.fused) or gpt_oss_mxfp4
    (GPT-OSS's experts as MXFP4 `_blocks` + `_scales`, see models/quant.py)."""

    prefix: str
    layout: str


@dataclass
class RouterWeights:
    """What a router needs for one layer: gate weights and the shared expert, if the family has one."""

    gate: GateWeights
    shared: SharedExpert | None


class WeightSource:
    """The MoE weights of one checkpoint, read on demand. Construct with `WeightSource.open(path)` or,
    on an actor, from a descriptor dict (`WeightSource(CheckpointDescriptor.from_dict(d), dtype)`)."""

    def __init__(self, descriptor: CheckpointDescriptor, dtype: str = "auto", verify: bool = True) -> None:
        if verify:
            descriptor.verify()
        self.descriptor = descriptor
        self.path = Path(descriptor.path)
        self.hf = HFConfig(descriptor.path, read_config(self.path))
        self.family: Family = family_for(descriptor.path, self.hf.data)
        self.index: dict[str, TensorInfo] = tensor_index(self.path)
        self.fp8_block = fp8_block(descriptor.path, self.hf.get("quantization_config", default=None))
        self.checkpoint_dtype: str | None = self.hf.get("torch_dtype", "dtype", default=None)
        self.dtype = resolve_dtype(dtype, self.checkpoint_dtype)
        self.moe_layers: list[int] = self.family.moe_layers(self.hf)
        if not self.moe_layers:
            raise CheckpointError(f"checkpoint {self.path}: config.json describes no MoE layer")
        self.layer_config: MoELayerConfig = self.family.layer_config(self.hf)
        self._tensors = [self._locate(layer) for layer in self.moe_layers]

    @classmethod
    def open(cls, path: str, dtype: str = "auto") -> WeightSource:
        return cls(describe(path), dtype, verify=False)

    @property
    def num_layers(self) -> int:
        return len(self.moe_layers)

    def config(self, capacity: CapacityConfig | None = None) -> MoELayerConfig:
        """The layer config with `capacity` in place of the default."""
        return self.family.layer_config(self.hf, capacity)

    # -- locating and checking tensors (headers only) --------------------------------------------------
    def _locate(self, model_layer: int) -> LayerTensors:
        f = self.family
        for template in f.prefixes:
            prefix = template.format(layer=model_layer)
            if f"{prefix}.{f.router}.weight" not in self.index:
                continue
            if f.fused == "gpt_oss" and f"{prefix}.experts.gate_up_proj_blocks" in self.index:
                return LayerTensors(prefix, "gpt_oss_mxfp4")
            if f.fused == "gpt_oss" or f"{prefix}.experts.gate_up_proj" in self.index:
                return LayerTensors(prefix, f.fused)
            return LayerTensors(prefix, "per_expert")
        wanted = " or ".join(t.format(layer=model_layer) + f".{f.router}.weight" for t in f.prefixes)
        raise CheckpointError(f"checkpoint {self.path}: tensor {wanted} (router of MoE layer {model_layer}) "
                              "is in no shard")

    def _info(self, name: str, shape: tuple[int, ...]) -> TensorInfo:
        info = self.index.get(name)
        if info is None:
            raise CheckpointError(f"checkpoint {self.path}: tensor {name} is in no shard")
        if info.shape != shape:
            raise CheckpointError(f"checkpoint {self.path}: tensor {name} in {info.file} has shape "
                                  f"{list(info.shape)}, expected {list(shape)}")
        if info.dtype == "U8" and name.endswith(MXFP4_SUFFIXES):
            pass  # MXFP4 blocks and scales: raw bytes, dequantized by the caller
        elif info.dtype in FP8_DTYPES and self.fp8_block is not None:
            if name + SCALE_SUFFIX not in self.index:
                raise CheckpointError(f"checkpoint {self.path}: tensor {name}{SCALE_SUFFIX} (scales of the FP8 "
                                      f"tensor {name} in {info.file}) is in no shard")
        elif info.dtype not in SERVABLE_DTYPES:
            raise CheckpointError(f"checkpoint {self.path}: tensor {name} in {info.file} has dtype {info.dtype}, "
                                  f"expected one of {', '.join(SERVABLE_DTYPES)} (quantized weights need a "
                                  "supported quantization_config)")
        return info

    def _check_layer(self, layer: int) -> LayerTensors:
        if not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise CheckpointError(f"checkpoint {self.path}: MoE layer {layer!r} out of range "
                                  f"0..{self.num_layers - 1}")
        return self._tensors[layer]

    # -- reading ---------------------------------------------------------------------------------------
    def read(self, requests: list[tuple[str, tuple[int, ...], int | None]],
             dtypes: list[torch.dtype] | None = None,
             into: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Read (name, expected full shape, row or None) tensors, each shard opened once; row e reads only
        [e] of a stacked tensor. FP8 block-quantized tensors are dequantized. Returns tensors in `dtypes`
        (default: the serving dtype), in request order; with `into`, each is copied (and cast) straight
        into into[i], a view of a preallocated stack, so the bytes are copied once out of the mmap."""
        infos = [self._info(name, shape) for name, shape, _ in requests]
        by_file: dict[str, list[int]] = defaultdict(list)
        for i, info in enumerate(infos):
            by_file[info.file].append(i)
        out: list[Any] = [None] * len(requests)
        for file, positions in by_file.items():
            try:
                with safe_open(str(self.path / file), framework="pt") as handle:
                    for i in positions:
                        name, _, row = requests[i]
                        t = handle.get_tensor(name) if row is None else handle.get_slice(name)[row]
                        if infos[i].dtype in FP8_DTYPES:
                            t = self._dequantize(name, row, t)
                        if into is not None:
                            out[i] = into[i].copy_(t)
                        elif infos[i].dtype == "U8":
                            out[i] = t
                        else:
                            out[i] = t.to(self.dtype if dtypes is None else dtypes[i])
            except OSError as exc:
                raise CheckpointError(f"checkpoint {self.path}: cannot read shard {file} ({exc})") from None
        return out

    def _dequantize(self, name: str, row: int | None, q: torch.Tensor) -> torch.Tensor:
        scale_name = name + SCALE_SUFFIX
        if row is not None or q.dim() != 2:
            raise CheckpointError(f"checkpoint {self.path}: FP8 tensor {name} is stacked; only per-expert FP8 "
                                  "weights are supported")
        info = self.index[scale_name]
        with safe_open(str(self.path / info.file), framework="pt") as handle:
            scale = handle.get_tensor(scale_name)
        try:
            return dequantize_fp8(q, scale, self.fp8_block)
        except ValueError as exc:
            raise CheckpointError(f"checkpoint {self.path}: tensor {scale_name} in {info.file}: {exc}") from None

    def experts(self, keys: Sequence[tuple[int, int]], out: ExpertWeights | None = None
                ) -> tuple[ExpertWeights, ExpertBiases | None]:
        """Stacked weights (and biases, for GPT-OSS) of the (cluster layer, logical expert) `keys`, in
        that order: gate_up [S, 2F, D], down [S, D, F]; biases [S, 2F], [S, D]. With `out` (tensors of those
        shapes in the serving dtype, e.g. views of a caller's stacks) the weights are written there, and
        per-expert and stacked layouts are copied once, straight out of the mmap."""
        cfg = self.layer_config
        D, F, E = cfg.d_model, cfg.d_ff, cfg.num_experts
        requests: list[tuple[str, tuple[int, ...], int | None]] = []
        for layer, expert in keys:
            where = self._check_layer(layer)
            if not isinstance(expert, int) or not 0 <= expert < E:
                raise CheckpointError(f"checkpoint {self.path}: expert {expert!r} out of range 0..{E - 1}")
            p = f"{where.prefix}.experts"
            if where.layout == "per_expert":
                g, u, d = self.family.proj
                requests += [(f"{p}.{expert}.{g}.weight", (F, D), None), (f"{p}.{expert}.{u}.weight", (F, D), None),
                             (f"{p}.{expert}.{d}.weight", (D, F), None)]
            elif where.layout == "stacked":
                requests += [(f"{p}.gate_up_proj", (E, 2 * F, D), expert), (f"{p}.down_proj", (E, D, F), expert)]
            elif where.layout == "gpt_oss":
                requests += [(f"{p}.gate_up_proj", (E, D, 2 * F), expert), (f"{p}.gate_up_proj_bias", (E, 2 * F), expert),
                             (f"{p}.down_proj", (E, F, D), expert), (f"{p}.down_proj_bias", (E, D), expert)]
            else:  # gpt_oss_mxfp4
                requests += [(f"{p}.gate_up_proj_blocks", (E, 2 * F, D // 32, 16), expert),
                             (f"{p}.gate_up_proj_scales", (E, 2 * F, D // 32), expert),
                             (f"{p}.gate_up_proj_bias", (E, 2 * F), expert),
                             (f"{p}.down_proj_blocks", (E, D, F // 32, 16), expert),
                             (f"{p}.down_proj_scales", (E, D, F // 32), expert), (f"{p}.down_proj_bias", (E, D), expert)]
        layouts = {self._tensors[layer].layout for layer, _ in keys}
        if layouts in ({"per_expert"}, {"stacked"}):
            return self._read_stacked(requests, len(keys), layouts == {"stacked"}, out), None
        tensors = iter(self.read(requests))
        gate_up, down, gate_up_bias, down_bias = [], [], [], []
        for layer, _ in keys:
            layout = self._tensors[layer].layout
            if layout == "per_expert":
                gate_up.append(torch.cat([next(tensors), next(tensors)]))
                down.append(next(tensors))
            elif layout == "stacked":
                gate_up.append(next(tensors))
                down.append(next(tensors))
            elif layout == "gpt_oss":
                gu, gub = deinterleave_gpt_oss(next(tensors).unsqueeze(0), next(tensors).unsqueeze(0))
                gate_up.append(gu[0])
                gate_up_bias.append(gub[0])
                down.append(next(tensors).t())
                down_bias.append(next(tensors))
            else:  # MXFP4 rows are [2F, D] with gate/up rows interleaved, down [D, F]
                gu_rows = dequantize_mxfp4(next(tensors), next(tensors)).to(self.dtype)
                gu, gub = deinterleave_gpt_oss(gu_rows.t().unsqueeze(0), next(tensors).unsqueeze(0))
                gate_up.append(gu[0])
                gate_up_bias.append(gub[0])
                down.append(dequantize_mxfp4(next(tensors), next(tensors)).to(self.dtype))
                down_bias.append(next(tensors))
        weights = ExpertWeights(_stack(gate_up, (0, 2 * F, D), self.dtype), _stack(down, (0, D, F), self.dtype))
        if out is not None:
            out.gate_up.copy_(weights.gate_up)
            out.down.copy_(weights.down)
            weights = out
        if not cfg.expert_bias:
            return weights, None
        return weights, ExpertBiases(_stack(gate_up_bias, (0, 2 * F), self.dtype),
                                     _stack(down_bias, (0, D), self.dtype))

    def _read_stacked(self, requests: list[tuple[str, tuple[int, ...], int | None]], num_slots: int,
                      stacked: bool, out: ExpertWeights | None = None) -> ExpertWeights:
        """Per-expert (gate, up, down per slot) or stacked (gate_up, down per slot) requests read straight
        into gate_up [S, 2F, D] and down [S, D, F] (`out`'s, else new ones)."""
        D, F = self.layer_config.d_model, self.layer_config.d_ff
        if out is not None:
            if (out.num_slots, out.d_ff, out.d_model) != (num_slots, F, D):
                raise ValueError(f"experts: out holds {out.num_slots}x[{out.d_ff}x{out.d_model}], "
                                 f"expected {num_slots}x[{F}x{D}]")
            gate_up, down = out.gate_up, out.down
        else:
            gate_up = torch.empty(num_slots, 2 * F, D, dtype=self.dtype)
            down = torch.empty(num_slots, D, F, dtype=self.dtype)
        into: list[torch.Tensor] = []
        for s in range(num_slots):
            into += [gate_up[s], down[s]] if stacked else [gate_up[s, :F], gate_up[s, F:], down[s]]
        self.read(requests, into=into)
        return ExpertWeights(gate_up, down)

    def router(self, layer: int) -> RouterWeights:
        """Gate weight [E, D] (kept float32, as the gate computes in float32), router bias / correction bias
        [E] and the shared expert in the serving dtype, for cluster layer `layer`."""
        where, f, cfg = self._check_layer(layer), self.family, self.layer_config
        E, D, Fs = cfg.num_experts, cfg.d_model, cfg.shared_d_ff
        names: list[tuple[str, tuple[int, ...], int | None]] = [(f"{where.prefix}.{f.router}.weight", (E, D), None)]
        if f.router_bias:
            names.append((f"{where.prefix}.{f.router}.bias", (E,), None))
        if f.correction_bias:
            names.append((f"{where.prefix}.{f.router}.e_score_correction_bias", (E,), None))
        if f.shared:
            s = f"{where.prefix}.{f.shared}"
            names += [(f"{s}.gate_proj.weight", (Fs, D), None), (f"{s}.up_proj.weight", (Fs, D), None),
                      (f"{s}.down_proj.weight", (D, Fs), None)]
        if f.shared_gate:
            names.append((f"{where.prefix}.{f.shared_gate}.weight", (1, D), None))
        t = iter(self.read(names))
        gw = GateWeights(next(t).float())
        if f.router_bias:
            gw.bias = next(t).float()
        if f.correction_bias:
            gw.correction_bias = next(t).float()
        shared = None
        if f.shared:
            gate_proj, up_proj, down_proj = next(t), next(t), next(t)
            shared = SharedExpert(torch.cat([gate_proj, up_proj]), down_proj, next(t) if f.shared_gate else None)
        return RouterWeights(gw, shared)

    def layer(self, layer: int, capacity: CapacityConfig | None = None) -> MoELayer:
        """The whole cluster layer `layer` as an in-process MoELayer (reads every expert of it)."""
        rw = self.router(layer)
        experts, biases = self.experts([(layer, e) for e in range(self.layer_config.num_experts)])
        return MoELayer(self.config(capacity), rw.gate, experts, rw.shared, biases)

    def slot_bytes(self, num_slots: int) -> int:
        """Bytes `num_slots` expert slots take in the serving dtype (for memory budgets)."""
        cfg = self.layer_config
        per = 3 * cfg.d_model * cfg.d_ff + (2 * cfg.d_ff + cfg.d_model if cfg.expert_bias else 0)
        return num_slots * per * torch.empty(0, dtype=self.dtype).element_size()


def _stack(rows: list[torch.Tensor], empty_shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """torch.stack that also handles no rows (an actor holding no slot of a layer)."""
    return torch.stack(rows).contiguous() if rows else torch.empty(empty_shape, dtype=dtype)


@functools.lru_cache(maxsize=8)
def _cached(descriptor: CheckpointDescriptor, dtype: str) -> WeightSource:
    return WeightSource(descriptor, dtype)


def cached_source(descriptor: dict[str, Any] | CheckpointDescriptor, dtype: str = "auto") -> WeightSource:
    """The WeightSource of a descriptor (plain dict as persisted, or the object), opened and verified once
    per process: an expert actor loading slots again (replication, heal) does not re-parse the headers."""
    if isinstance(descriptor, dict):
        descriptor = CheckpointDescriptor.from_dict(descriptor)
    return _cached(descriptor, dtype)
