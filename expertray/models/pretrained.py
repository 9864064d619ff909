"""`from_pretrained`: a transformers model whose MoE blocks run on a cluster, built from a checkpoint
directory without materialising a routed expert in the calling process.

Steps: describe the checkpoint → cluster config (layer shape, MoE layer count and dtype from the
checkpoint) → build the model skeleton on the meta device → refuse unsupported MoE blocks by name and
check every other tensor's name and shape against the shard headers → start the backend (which loads the
routed experts where they are served) → swap every MoE block for a ClusterMoEProxy → load every other
tensor (attention, norms, embeddings, dense MLPs) from the shards, in the serving dtype.

A backend is `Callable[[CheckpointDescriptor, ClusterConfig], runner]`; the runner has `cfg`,
`forward(layer, hidden [T, D]) -> [T, D]` and `shutdown()`. Built in: "in_process" (MoELayers in this
process, no Ray) and "ray" (expertray.api.launch).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from expertray.config import CapacityConfig, ClusterConfig, from_dict
from expertray.errors import CheckpointError, ConfigError
from expertray.layer.reference import MoELayer
from expertray.models.files import CheckpointDescriptor, TensorInfo, describe
from expertray.models.proxy import find_moe_blocks, find_unsupported_moe_blocks, swap_moe_blocks
from expertray.models.source import WeightSource
from expertray.validation import check_hidden

_FROM_CHECKPOINT = ("layer", "num_layers", "model")
log = logging.getLogger(__name__)


def checkpoint_cluster_config(cfg: ClusterConfig, source: WeightSource | None = None) -> ClusterConfig:
    """`cfg` with the served model's shape filled in from checkpoint `cfg.model`: layer (keeping
    cfg.layer.capacity), num_layers (MoE layers only) and a concrete dtype (auto → checkpoint's)."""
    if not cfg.model:
        raise ConfigError("cluster.model: empty; name the checkpoint directory to serve")
    source = source or WeightSource.open(cfg.model, cfg.dtype)
    dtype = str(source.dtype).removeprefix("torch.")
    return dataclasses.replace(cfg, model=str(source.path), layer=source.config(cfg.layer.capacity),
                               num_layers=source.num_layers, dtype=dtype)


def _options_config(path: str, options: dict[str, Any]) -> ClusterConfig:
    """`options` (ClusterConfig fields and `capacity`) validated by name, with model = `path`."""
    options = dict(options)
    clash = sorted(set(options) & set(_FROM_CHECKPOINT))
    if clash:
        raise ConfigError(f"cluster.{clash[0]}: comes from the checkpoint, do not pass it")
    capacity = options.pop("capacity", None)
    if isinstance(capacity, dict):
        capacity = from_dict(CapacityConfig, capacity, "layer.capacity")
    cfg = from_dict(ClusterConfig, {**options, "model": str(path)})
    if capacity is not None:
        cfg = dataclasses.replace(cfg, layer=dataclasses.replace(cfg.layer, capacity=capacity))
    return cfg


def cluster_config(path: str, **options: Any) -> ClusterConfig:
    """The ClusterConfig serving checkpoint `path`; `options` are ClusterConfig fields (validated by name)
    plus `capacity` (a CapacityConfig or its dict). layer, num_layers and model come from the checkpoint."""
    return checkpoint_cluster_config(_options_config(path, options))


class InProcessCluster:
    """A cluster stand-in without Ray: every MoE layer of the checkpoint as a MoELayer in this process
    (the reference path; what `expertray.api.Cluster` must equal)."""

    def __init__(self, cfg: ClusterConfig, layers: list[MoELayer]) -> None:
        self.cfg = cfg
        self.layers = layers

    def forward(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """[..., D] in, same shape and dtype out."""
        if not isinstance(layer, int) or not 0 <= layer < len(self.layers):
            raise ConfigError(f"unknown layer {layer!r} (serving layers 0..{len(self.layers) - 1})")
        check_hidden(hidden, self.cfg.layer.d_model, self.cfg.max_request_tokens)
        return self.layers[layer](hidden)

    def shutdown(self) -> None:
        self.layers = []


def in_process_backend(descriptor: CheckpointDescriptor, cfg: ClusterConfig) -> InProcessCluster:
    """Every MoE layer read whole into this process (the reference; reads every routed expert)."""
    source = WeightSource(descriptor, cfg.dtype)
    return InProcessCluster(cfg, [source.layer(layer, cfg.layer.capacity) for layer in range(source.num_layers)])


Backend = Callable[[CheckpointDescriptor, ClusterConfig], Any]
# Name -> backend; expertray.api adds "ray" (a Ray cluster) when it is imported, so this core module needs no Ray.
BACKENDS: dict[str, Backend] = {"in_process": in_process_backend}


def _skeleton(path: Path, dtype: torch.dtype) -> nn.Module:
    """The checkpoint's causal LM with every parameter on the meta device (nothing allocated)."""
    import transformers as tf

    hf_cfg = tf.AutoConfig.from_pretrained(str(path))  # config.json only; remote code is never run
    if getattr(hf_cfg, "quantization_config", None) is not None:  # weights are dequantized as they load
        del hf_cfg.quantization_config
    with torch.device("meta"):
        model = tf.AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype)
    if (path / "generation_config.json").exists():
        model.generation_config = tf.GenerationConfig.from_pretrained(str(path))
    return model.eval()


def _check_blocks(model: nn.Module, source: WeightSource) -> None:
    """Refuse, before anything starts, a model whose MoE blocks are not the checkpoint's MoE layers."""
    unsupported = find_unsupported_moe_blocks(model)
    if unsupported:
        name, cls = unsupported[0]
        raise ConfigError(f"{name}: MoE block {cls} is not supported")
    found = []
    for name, block in find_moe_blocks(model):
        m = re.search(r"layers\.(\d+)\.", name + ".")
        found.append(int(m.group(1)) if m else -1)
        if type(block).__name__ != source.family.block:
            raise ConfigError(f"{name}: block {type(block).__name__} is not the {source.family.name} "
                              f"block {source.family.block}")
    if found != source.moe_layers:
        raise CheckpointError(f"checkpoint {source.path}: model has MoE blocks at layers {found} but config.json "
                              f"puts them at {source.moe_layers}")


def _dense_plan(model: nn.Module, source: WeightSource) -> dict[str, TensorInfo]:
    """Parameter/buffer name → checkpoint tensor for everything outside the MoE blocks; tied parameters
    (e.g. lm_head tied to the embeddings) may be absent. Checks names and shapes from headers only."""
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    blocks = tuple(name + "." for name, _ in find_moe_blocks(model))
    plan: dict[str, TensorInfo] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if name.startswith(blocks):
            continue
        info = source.index.get(name)
        if info is None:
            if name in tied:
                continue
            raise CheckpointError(f"checkpoint {source.path}: tensor {name} (needed by the model) is in no shard")
        if info.shape != tuple(t.shape):
            raise CheckpointError(f"checkpoint {source.path}: tensor {name} in {info.file} has shape "
                                  f"{list(info.shape)}, expected {list(t.shape)}")
        plan[name] = info
    return plan


def _load_dense(model: nn.Module, source: WeightSource, plan: dict[str, TensorInfo]) -> None:
    """Read the planned tensors (each shard opened once) into the model, then tie weights and compute
    the non-persistent buffers (rotary inv_freq) the checkpoint does not hold."""
    targets = model.state_dict(keep_vars=True)
    names = list(plan)
    tensors = source.read([(n, plan[n].shape, None) for n in names], [targets[n].dtype for n in names])
    model.load_state_dict(dict(zip(names, tensors)), strict=False, assign=True)
    model.tie_weights()
    for module in model.modules():
        if any(b is not None and b.is_meta for b in module.buffers(recurse=False)):
            module.to_empty(device="cpu", recurse=False)
            model._init_weights(module)  # transformers recomputes rotary buffers from the config here
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"checkpoint {source.path}: {left[0]} was not loaded (and {len(left) - 1} more)")


def from_pretrained(path: str, *, backend: str | Backend = "ray", **cluster_options: Any) -> tuple[nn.Module, Any]:
    """(transformers model, cluster) serving checkpoint `path`: the model's MoE blocks are proxies to the
    cluster; attention, norms and embeddings are loaded here in the serving dtype; routed experts never
    are. `cluster_options`: ClusterConfig fields (dtype, num_expert_actors, ...) and `capacity`; the model's
    layer calls take `client_path="direct"` unless told otherwise (decode is one call per token per layer:
    no router hop, no Ray task per call).
    """
    cluster_options.setdefault("client_path", "direct")
    runner_factory = BACKENDS.get(backend) if isinstance(backend, str) else backend
    if runner_factory is None:
        hint = "; the Ray backend comes with expertray.api (use expertray.from_pretrained)" if backend == "ray" else ""
        raise ConfigError(f"backend {backend!r} is unknown (known: {', '.join(BACKENDS)}){hint}")
    requested = _options_config(path, cluster_options)
    descriptor = describe(path)
    source = WeightSource(descriptor, requested.dtype, verify=False)
    cfg = checkpoint_cluster_config(requested, source)
    model = _skeleton(source.path, source.dtype)
    _check_blocks(model, source)
    dense = _dense_plan(model, source)
    cluster = runner_factory(descriptor, cfg)
    try:
        swap_moe_blocks(model, cluster)
        _load_dense(model, source, dense)
    except BaseException:
        cluster.shutdown()
        raise
    return model, cluster
