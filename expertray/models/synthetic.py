"""Tiny random checkpoints of every supported family, written by transformers' own `save_pretrained`
(sharded), for tests, examples and benchmarks. transformers is imported lazily (a dev dependency).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from expertray.models.families import FAMILIES, by_name

# What every tiny config shares; each family's own part is its row's `tiny` (models/families.py).
_COMMON = {"vocab_size": 96, "hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4,
           "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 128, "pad_token_id": 0,
           "bos_token_id": 1, "eos_token_id": None, "tie_word_embeddings": False}

TINY_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {f.name: f.tiny for f in FAMILIES}  # name -> row's `tiny`


def tiny_model(family: str, seed: int = 0, overrides: dict[str, Any] | None = None) -> torch.nn.Module:
    """A random causal LM of `family` (float32) with activations of order 1 and non-zero router biases;
    `overrides`: config fields over the family's tiny ones (e.g. a wider model for a benchmark)."""
    import transformers as tf

    cls_name, kwargs = by_name(family).tiny
    config = getattr(tf, cls_name)(**{**_COMMON, **kwargs, **(overrides or {})})
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
                          max_shard_size: str = "24KB", overrides: dict[str, Any] | None = None) -> Path:
    """Save a tiny random `family` model (config `overrides` applied) at `path` in `dtype`, sharded by
    `max_shard_size`."""
    path = Path(path)
    model = tiny_model(family, seed, overrides).to(dtype)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    return path


def write_tiny_tokenizer(path: str | Path, vocab_size: int = 96) -> Path:
    """A word-level tokenizer for a tiny checkpoint at `path`: the words w0..w{vocab_size-1} are ids
    0..vocab_size-1 (unknown words → w0), split on whitespace, with a chat template that writes each message as
    "<role word> <content>" and ends with the assistant's role word. For the OpenAI routes' tests and examples."""
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    words = {f"w{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(words, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = tf.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0")
    tokenizer.chat_template = ("{% for m in messages %}{{ {'system': 'w2', 'user': 'w3', 'assistant': 'w4'}"
                               ".get(m['role'], 'w2') }} {{ m['content'] }} {% endfor %}"
                               "{% if add_generation_prompt %}w4{% endif %}")
    tokenizer.save_pretrained(path)
    return Path(path)
