"""Tiny random checkpoints of every supported family, written by transformers' own `save_pretrained`
(sharded), for tests, examples and benchmarks. transformers is imported lazily (a dev dependency).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

# Small but complete configs: several experts, top-2, dense layers where the family has them, so layer
# mapping, grouped gating and shared experts are all exercised.
_COMMON = {"vocab_size": 96, "hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4,
           "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 128, "pad_token_id": 0,
           "bos_token_id": 1, "eos_token_id": None, "tie_word_embeddings": False}
_MLA = {"q_lora_rank": 16, "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8,
        "num_key_value_heads": 4}

TINY_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {  # family -> (transformers config class, kwargs)
    "mixtral": ("MixtralConfig", {"intermediate_size": 48, "num_local_experts": 6, "num_experts_per_tok": 2}),
    "qwen2_moe": ("Qwen2MoeConfig", {"intermediate_size": 40, "moe_intermediate_size": 24, "num_experts": 6,
                                     "num_experts_per_tok": 2, "shared_expert_intermediate_size": 40,
                                     "mlp_only_layers": [1]}),
    "qwen3_moe": ("Qwen3MoeConfig", {"moe_intermediate_size": 24, "num_experts": 6, "num_experts_per_tok": 2,
                                     "norm_topk_prob": True}),
    "qwen3_next": ("Qwen3NextConfig", {"moe_intermediate_size": 24, "num_experts": 6, "num_experts_per_tok": 2,
                                       "shared_expert_intermediate_size": 40, "norm_topk_prob": True,
                                       "linear_num_key_heads": 2, "linear_num_value_heads": 4,
                                       "linear_key_head_dim": 8, "linear_value_head_dim": 8,
                                       "layer_types": ["linear_attention", "full_attention", "linear_attention"]}),
    "olmoe": ("OlmoeConfig", {"intermediate_size": 48, "num_experts": 6, "num_experts_per_tok": 2}),
    "deepseek_v3": ("DeepseekV3Config", {**_MLA, "intermediate_size": 40, "moe_intermediate_size": 24,
                                         "n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 4,
                                         "topk_group": 2, "first_k_dense_replace": 1, "n_shared_experts": 1,
                                         "routed_scaling_factor": 2.5}),
    "glm4_moe": ("Glm4MoeConfig", {"intermediate_size": 40, "moe_intermediate_size": 24, "n_routed_experts": 8,
                                   "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1,
                                   "first_k_dense_replace": 1, "n_shared_experts": 1, "routed_scaling_factor": 1.5}),
    "gpt_oss": ("GptOssConfig", {"intermediate_size": 48, "num_local_experts": 6, "num_experts_per_tok": 2,
                                 "sliding_window": 16}),
}


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    """A random causal LM of `family` (float32) with activations of order 1 and non-zero router biases."""
    import transformers as tf

    cls_name, kwargs = TINY_CONFIGS[family]
    common = {k: v for k, v in _COMMON.items() if not (family == "deepseek_v3" and k == "head_dim")}
    config = getattr(tf, cls_name)(**{**common, **kwargs})
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if not t.is_floating_point() or "inv_freq" in name:
                continue
            if t.dim() >= 2:
                t.copy_(torch.randn(t.shape, generator=g) * (0.7 / t.shape[-1] ** 0.5))
            elif not name.endswith("norm.weight"):  # biases, router/correction biases, attention sinks
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
    return model


def write_tiny_checkpoint(family: str, path: str | Path, dtype: torch.dtype = torch.float32, seed: int = 0,
                          max_shard_size: str = "24KB") -> Path:
    """Save a tiny random `family` model at `path` in `dtype`, sharded by `max_shard_size`."""
    path = Path(path)
    model = tiny_model(family, seed).to(dtype)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    return path
