"""Model families expertray serves from a checkpoint, one `Family` row each in FAMILIES: how config.json maps
to a MoELayerConfig, which decoder layers are MoE layers, under which tensor names the router, experts and
shared experts live, which transformers block class holds them, and a tiny config for tests. Adding an
architecture is adding its row (its gating family must be one of config.GATING_FAMILIES).

config.json is read as plain JSON (no transformers needed on expert actors); a key a checkpoint omits
takes the transformers config class's default, written here next to the key.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from expertray.config import GATING_FAMILIES, CapacityConfig, GateConfig, MoELayerConfig
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

    block: the transformers MoE block class (transformers.models.<name>.modeling_<name>.<block>).
    gating: its gating family (config.GATING_FAMILIES); layer_kwargs: MoELayerConfig fields from config.json,
    with "gate" the GateConfig fields but the family.
    tiny: (transformers config class, kwargs) of a tiny random checkpoint for tests (models/synthetic.py).
    prefixes: where a MoE layer's tensors live, tried in order ({layer} = decoder layer index).
    router: the router submodule's name; proj: per-expert (gate, up, down) projection names.
    fused: the stacked layout's kind when a checkpoint stores experts stacked: "stacked" (transformers-5
    `experts.gate_up_proj` [E, 2F, D] + `experts.down_proj` [E, D, F]) or "gpt_oss" ([E, D, 2F]
    interleaved gate/up + biases, down [E, F, D]).
    block_kwargs: MoELayerConfig fields read off a loaded block (the expert activation's parameters).
    returns_router_scores: the block returns (output, router scores), not output alone.
    hf_kwargs: the transformers config kwargs of a block shaped like a MoELayerConfig (to_hf_block builds the
    reference block of this row's gating family from the first row that has them).
    """

    name: str  # also the config.json model_type
    architectures: tuple[str, ...]
    block: str
    gating: str
    layer_kwargs: Callable[[HFConfig], dict[str, Any]]
    moe_layers: Callable[[HFConfig], list[int]]
    tiny: tuple[str, dict[str, Any]]
    prefixes: tuple[str, ...] = ("model.layers.{layer}.mlp",)
    router: str = "gate"
    proj: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    fused: str = "stacked"
    shared: str = ""
    shared_gate: str = ""
    router_bias: bool = False
    correction_bias: bool = False
    block_kwargs: Callable[[Any], dict[str, Any]] | None = None
    returns_router_scores: bool = False
    hf_kwargs: Callable[[MoELayerConfig], dict[str, Any]] | None = None

    def layer_config(self, hf: HFConfig, capacity: CapacityConfig | None = None) -> MoELayerConfig:
        kwargs = self.layer_kwargs(hf)
        gate = GateConfig(self.gating, **kwargs.pop("gate"))
        return MoELayerConfig(gate=gate, capacity=capacity or CapacityConfig(), **kwargs)


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
            "gate": {"num_experts": hf.get("num_local_experts", "num_experts"),
                     "top_k": hf.get("num_experts_per_tok", default=2)}}


def _qwen(shared: bool) -> Callable[[HFConfig], dict[str, Any]]:
    def kwargs(hf: HFConfig) -> dict[str, Any]:
        out = {"d_model": hf.get("hidden_size"), "d_ff": hf.get("moe_intermediate_size"),
               "gate": {"num_experts": hf.get("num_experts", "num_local_experts"),
                        "top_k": hf.get("num_experts_per_tok"),
                        "normalize": bool(hf.get("norm_topk_prob", default=False))}}
        if shared:
            out.update(shared_d_ff=hf.get("shared_expert_intermediate_size"), shared_gated=True)
        return out
    return kwargs


def _olmoe(hf: HFConfig) -> dict[str, Any]:
    return {"d_model": hf.get("hidden_size"), "d_ff": hf.get("intermediate_size"),
            "gate": {"num_experts": hf.get("num_experts", "num_local_experts"),
                     "top_k": hf.get("num_experts_per_tok"),
                     "normalize": bool(hf.get("norm_topk_prob", default=False))}}


def _deepseek(hf: HFConfig) -> dict[str, Any]:
    d_ff = hf.get("moe_intermediate_size")
    return {"d_model": hf.get("hidden_size"), "d_ff": d_ff,
            "gate": {"num_experts": hf.get("n_routed_experts", "num_local_experts"),
                     "top_k": hf.get("num_experts_per_tok"),
                     "normalize": bool(hf.get("norm_topk_prob", default=True)),
                     "num_groups": hf.get("n_group", default=1), "topk_groups": hf.get("topk_group", default=1),
                     "routed_scaling_factor": float(hf.get("routed_scaling_factor", default=1.0))},
            "shared_d_ff": d_ff * int(hf.get("n_shared_experts", default=1))}


def _gpt_oss(hf: HFConfig) -> dict[str, Any]:
    return {"d_model": hf.get("hidden_size"), "d_ff": hf.get("intermediate_size"),
            "gate": {"num_experts": hf.get("num_local_experts", "num_experts"), "top_k": hf.get("num_experts_per_tok")},
            "expert_activation": "clamped_swiglu", "expert_bias": True,
            "swiglu_alpha": float(hf.get("swiglu_alpha", default=1.702)),
            "swiglu_limit": float(hf.get("swiglu_limit", default=7.0))}


def _gpt_oss_block(block: Any) -> dict[str, Any]:
    return {"expert_activation": "clamped_swiglu", "swiglu_alpha": float(block.experts.alpha),
            "swiglu_limit": float(block.experts.limit), "expert_bias": True}


def _common_hf(cfg: MoELayerConfig) -> dict[str, Any]:
    return {"hidden_size": cfg.d_model, "num_experts_per_tok": cfg.gate.top_k, "hidden_act": "silu"}


def _mixtral_hf(cfg: MoELayerConfig) -> dict[str, Any]:
    return {**_common_hf(cfg), "intermediate_size": cfg.d_ff, "num_local_experts": cfg.gate.num_experts}


def _qwen2_hf(cfg: MoELayerConfig) -> dict[str, Any]:
    return {**_common_hf(cfg), "moe_intermediate_size": cfg.d_ff, "num_experts": cfg.gate.num_experts,
            "norm_topk_prob": cfg.gate.normalize, "shared_expert_intermediate_size": cfg.shared_d_ff or 1}


def _deepseek_hf(cfg: MoELayerConfig) -> dict[str, Any]:
    g = cfg.gate
    return {**_common_hf(cfg), "moe_intermediate_size": cfg.d_ff, "n_routed_experts": g.num_experts,
            "n_group": g.num_groups, "topk_group": g.topk_groups, "norm_topk_prob": g.normalize,
            "routed_scaling_factor": g.routed_scaling_factor, "n_shared_experts": max(1, cfg.shared_d_ff // cfg.d_ff)}


# Tiny configs: several experts, top-2, dense layers where the family has them, so layer mapping, grouped
# gating and shared experts are all exercised (models/synthetic.py adds the attention and vocabulary sizes).
_MLA = {"q_lora_rank": 16, "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8,
        "num_key_value_heads": 4}

FAMILIES: tuple[Family, ...] = (
    Family("mixtral", ("MixtralForCausalLM",), "MixtralSparseMoeBlock", "mixtral", _mixtral, _all_layers,
           ("MixtralConfig", {"intermediate_size": 48, "num_local_experts": 6, "num_experts_per_tok": 2}),
           prefixes=("model.layers.{layer}.block_sparse_moe", "model.layers.{layer}.mlp"), proj=("w1", "w3", "w2"),
           hf_kwargs=_mixtral_hf),
    Family("qwen2_moe", ("Qwen2MoeForCausalLM",), "Qwen2MoeSparseMoeBlock", "qwen_moe", _qwen(shared=True),
           _qwen_sparse_layers,
           ("Qwen2MoeConfig", {"intermediate_size": 40, "moe_intermediate_size": 24, "num_experts": 6,
                               "num_experts_per_tok": 2, "shared_expert_intermediate_size": 40,
                               "mlp_only_layers": [1]}),
           shared="shared_expert", shared_gate="shared_expert_gate", hf_kwargs=_qwen2_hf),
    Family("qwen3_moe", ("Qwen3MoeForCausalLM",), "Qwen3MoeSparseMoeBlock", "qwen_moe", _qwen(shared=False),
           _qwen_sparse_layers,
           ("Qwen3MoeConfig", {"moe_intermediate_size": 24, "num_experts": 6, "num_experts_per_tok": 2,
                               "norm_topk_prob": True})),
    Family("qwen3_next", ("Qwen3NextForCausalLM",), "Qwen3NextSparseMoeBlock", "qwen_moe", _qwen(shared=True),
           _qwen_sparse_layers,
           ("Qwen3NextConfig", {"moe_intermediate_size": 24, "num_experts": 6, "num_experts_per_tok": 2,
                                "shared_expert_intermediate_size": 40, "norm_topk_prob": True,
                                "linear_num_key_heads": 2, "linear_num_value_heads": 4,
                                "linear_key_head_dim": 8, "linear_value_head_dim": 8,
                                "layer_types": ["linear_attention", "full_attention", "linear_attention"]}),
           shared="shared_expert", shared_gate="shared_expert_gate"),
    Family("olmoe", ("OlmoeForCausalLM",), "OlmoeSparseMoeBlock", "qwen_moe", _olmoe, _all_layers,
           ("OlmoeConfig", {"intermediate_size": 48, "num_experts": 6, "num_experts_per_tok": 2})),
    Family("deepseek_v3", ("DeepseekV3ForCausalLM",), "DeepseekV3MoE", "deepseek_v3", _deepseek, _after_dense,
           ("DeepseekV3Config", {**_MLA, "intermediate_size": 40, "moe_intermediate_size": 24,
                                 "n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 4, "topk_group": 2,
                                 "first_k_dense_replace": 1, "n_shared_experts": 1, "routed_scaling_factor": 2.5}),
           shared="shared_experts", correction_bias=True, hf_kwargs=_deepseek_hf),
    Family("glm4_moe", ("Glm4MoeForCausalLM",), "Glm4MoeMoE", "deepseek_v3", _deepseek, _after_dense,
           ("Glm4MoeConfig", {"intermediate_size": 40, "moe_intermediate_size": 24, "n_routed_experts": 8,
                              "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1, "first_k_dense_replace": 1,
                              "n_shared_experts": 1, "routed_scaling_factor": 1.5}),
           shared="shared_experts", correction_bias=True),
    Family("gpt_oss", ("GptOssForCausalLM",), "GptOssMLP", "gpt_oss", _gpt_oss, _all_layers,
           ("GptOssConfig", {"intermediate_size": 48, "num_local_experts": 6, "num_experts_per_tok": 2,
                             "sliding_window": 16}),
           router="router", fused="gpt_oss", router_bias=True, block_kwargs=_gpt_oss_block,
           returns_router_scores=True),
)


def by_name(name: str) -> Family:
    """The row named `name` (KeyError listing the known ones when there is none)."""
    for family in FAMILIES:
        if family.name == name:
            return family
    raise KeyError(f"no model family {name!r} (known: {', '.join(f.name for f in FAMILIES)})")


def by_block(block_class: str) -> Family | None:
    """The row whose transformers MoE block class is named `block_class` (None: not supported)."""
    return next((f for f in FAMILIES if f.block == block_class), None)


def reference_family(gating: str) -> Family | None:
    """The first row of gating family `gating` whose block to_hf_block can build (None: none)."""
    return next((f for f in FAMILIES if f.gating == gating and f.hf_kwargs is not None), None)


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


if {f.gating for f in FAMILIES} - set(GATING_FAMILIES) or len({f.name for f in FAMILIES}) != len(FAMILIES):
    raise RuntimeError(f"FAMILIES: a row's gating family is not in config.GATING_FAMILIES {GATING_FAMILIES}, "
                       "or two rows share a name")
