"""Model families expertray serves from a checkpoint: how config.json maps to a MoELayerConfig, which
decoder layers are MoE layers, and under which tensor names the router, experts and shared experts live.

config.json is read as plain JSON (no transformers needed on expert actors); a key a checkpoint omits
takes the transformers config class's default, written here next to the key.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from expertray.config import CapacityConfig, GateConfig, MoELayerConfig
from expertray.errors import CheckpointError

_REQUIRED = object()


class HFConfig:
    """config.json with lookups that try a key's aliases and name the checkpoint when one is missing."""

    def __init__(self, path: str, data: dict[str, Any]) -> None:
        self.path = path
        self.data = data

    def get(self, *names: str, default: Any = _REQUIRED) -> Any:
        for name in names:
            if self.data.get(name) is not None:
                return self.data[name]
        if default is _REQUIRED:
            raise CheckpointError(f"checkpoint {self.path}: config.json has no {' / '.join(names)}")
        return default


@dataclass(frozen=True)
class Family:
    """One supported architecture.

    prefixes: where a MoE layer's tensors live, tried in order ({layer} = decoder layer index).
    router: the router submodule's name; proj: per-expert (gate, up, down) projection names.
    fused: the stacked layout's kind when a checkpoint stores experts stacked: "stacked" (transformers-5
    `experts.gate_up_proj` [E, 2F, D] + `experts.down_proj` [E, D, F]) or "gpt_oss" ([E, D, 2F]
    interleaved gate/up + biases, down [E, F, D]).
    """

    name: str  # also the config.json model_type
    architectures: tuple[str, ...]
    block: str
    layer_kwargs: Callable[[HFConfig], dict[str, Any]]
    moe_layers: Callable[[HFConfig], list[int]]
    prefixes: tuple[str, ...] = ("model.layers.{layer}.mlp",)
    router: str = "gate"
    proj: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    fused: str = "stacked"
    shared: str = ""
    shared_gate: str = ""
    router_bias: bool = False
    correction_bias: bool = False

    def layer_config(self, hf: HFConfig, capacity: CapacityConfig | None = None) -> MoELayerConfig:
        return MoELayerConfig(capacity=capacity or CapacityConfig(), **self.layer_kwargs(hf))


def _all_layers(hf: HFConfig) -> list[int]:
    return list(range(int(hf.get("num_hidden_layers"))))


def _qwen_sparse_layers(hf: HFConfig) -> list[int]:
    """Qwen2/3-MoE: layer i is sparse unless listed in mlp_only_layers, every decoder_sparse_step-th."""
    step = int(hf.get("decoder_sparse_step", default=1))
    dense = set(hf.get("mlp_only_layers", default=[]))
    return [i for i in _all_layers(hf) if i not in dense and step > 0 and (i + 1) % step == 0]


def _after_dense(hf: HFConfig) -> list[int]:
    """DeepSeek-V3 / GLM-4.5: the first `first_k_dense_replace` layers are dense."""
    first = int(hf.get("first_k_dense_replace", default=0))
    return [i for i in _all_layers(hf) if i >= first]


def _mixtral(hf: HFConfig) -> dict[str, Any]:
    return {"d_model": hf.get("hidden_size"), "d_ff": hf.get("intermediate_size"),
            "gate": GateConfig("mixtral", hf.get("num_local_experts", "num_experts"),
                               hf.get("num_experts_per_tok", default=2))}


def _qwen(shared: bool) -> Callable[[HFConfig], dict[str, Any]]:
    def kwargs(hf: HFConfig) -> dict[str, Any]:
        out = {"d_model": hf.get("hidden_size"), "d_ff": hf.get("moe_intermediate_size"),
               "gate": GateConfig("qwen_moe", hf.get("num_experts", "num_local_experts"),
                                  hf.get("num_experts_per_tok"), normalize=bool(hf.get("norm_topk_prob",
                                                                                       default=False)))}
        if shared:
            out.update(shared_d_ff=hf.get("shared_expert_intermediate_size"), shared_gated=True)
        return out
    return kwargs


def _olmoe(hf: HFConfig) -> dict[str, Any]:
    return {"d_model": hf.get("hidden_size"), "d_ff": hf.get("intermediate_size"),
            "gate": GateConfig("qwen_moe", hf.get("num_experts", "num_local_experts"), hf.get("num_experts_per_tok"),
                               normalize=bool(hf.get("norm_topk_prob", default=False)))}


def _deepseek(hf: HFConfig) -> dict[str, Any]:
    d_ff = hf.get("moe_intermediate_size")
    return {"d_model": hf.get("hidden_size"), "d_ff": d_ff,
            "gate": GateConfig("deepseek_v3", hf.get("n_routed_experts", "num_local_experts"),
                               hf.get("num_experts_per_tok"), normalize=bool(hf.get("norm_topk_prob", default=True)),
                               num_groups=hf.get("n_group", default=1), topk_groups=hf.get("topk_group", default=1),
                               routed_scaling_factor=float(hf.get("routed_scaling_factor", default=1.0))),
            "shared_d_ff": d_ff * int(hf.get("n_shared_experts", default=1))}


def _gpt_oss(hf: HFConfig) -> dict[str, Any]:
    return {"d_model": hf.get("hidden_size"), "d_ff": hf.get("intermediate_size"),
            "gate": GateConfig("gpt_oss", hf.get("num_local_experts", "num_experts"), hf.get("num_experts_per_tok")),
            "expert_activation": "clamped_swiglu", "expert_bias": True,
            "swiglu_alpha": float(hf.get("swiglu_alpha", default=1.702)),
            "swiglu_limit": float(hf.get("swiglu_limit", default=7.0))}


FAMILIES: tuple[Family, ...] = (
    Family("mixtral", ("MixtralForCausalLM",), "MixtralSparseMoeBlock", _mixtral, _all_layers,
           prefixes=("model.layers.{layer}.block_sparse_moe", "model.layers.{layer}.mlp"), proj=("w1", "w3", "w2")),
    Family("qwen2_moe", ("Qwen2MoeForCausalLM",), "Qwen2MoeSparseMoeBlock", _qwen(shared=True),
           _qwen_sparse_layers, shared="shared_expert", shared_gate="shared_expert_gate"),
    Family("qwen3_moe", ("Qwen3MoeForCausalLM",), "Qwen3MoeSparseMoeBlock", _qwen(shared=False), _qwen_sparse_layers),
    Family("qwen3_next", ("Qwen3NextForCausalLM",), "Qwen3NextSparseMoeBlock", _qwen(shared=True),
           _qwen_sparse_layers, shared="shared_expert", shared_gate="shared_expert_gate"),
    Family("olmoe", ("OlmoeForCausalLM",), "OlmoeSparseMoeBlock", _olmoe, _all_layers),
    Family("deepseek_v3", ("DeepseekV3ForCausalLM",), "DeepseekV3MoE", _deepseek, _after_dense,
           shared="shared_experts", correction_bias=True),
    Family("glm4_moe", ("Glm4MoeForCausalLM",), "Glm4MoeMoE", _deepseek, _after_dense,
           shared="shared_experts", correction_bias=True),
    Family("gpt_oss", ("GptOssForCausalLM",), "GptOssMLP", _gpt_oss, _all_layers, router="router",
           fused="gpt_oss", router_bias=True),
)


def supported_architectures() -> list[str]:
    return [a for f in FAMILIES for a in f.architectures]


def family_for(path: str, config: dict[str, Any]) -> Family:
    """The family of a config.json (by `architectures`, else `model_type`), or a CheckpointError listing the supported ones."""
    archs = config.get("architectures") or []
    for family in FAMILIES:
        if any(a in family.architectures for a in archs) or (not archs and config.get("model_type") == family.name):
            return family
    named = ", ".join(archs) if archs else f"model_type {config.get('model_type', '?')!r}"
    raise CheckpointError(f"checkpoint {path}: architecture {named} is not supported "
                          f"(supported: {', '.join(supported_architectures())})")
