"""`expertray generate --model PATH --prompt "..."`: greedy generation through a cluster, with tokens/s.

The CLI wires `generate` and prints `GenerationResult.summary()`. The tokenizer comes from the checkpoint
directory when it has one; without one the prompt must be token ids.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from expertray.errors import ConfigError
from expertray.models.pretrained import Backend, from_pretrained

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


@dataclass(frozen=True)
class GenerationResult:
    """prompt_ids / new_ids: token ids; text: decoded new tokens ('' without a tokenizer);
    seconds: wall time of generate (prefill + decode); tokens_per_s: new tokens / seconds."""

    prompt_ids: list[int]
    new_ids: list[int]
    text: str
    seconds: float
    tokens_per_s: float
    dtype: str
    num_layers: int

    def summary(self) -> str:
        shown = self.text if self.text else " ".join(map(str, self.new_ids))
        return (f"{shown}\n-- {len(self.new_ids)} new tokens in {self.seconds:.2f} s = {self.tokens_per_s:.1f} "
                f"tokens/s ({self.num_layers} MoE layers on the cluster, {self.dtype})")


def has_tokenizer(path: str | Path) -> bool:
    return any((Path(path) / name).exists() for name in TOKENIZER_FILES)


def prompt_token_ids(path: str, prompt: str | None, prompt_ids: list[int] | None) -> tuple[list[int], Any]:
    """(token ids, tokenizer or None): `prompt` needs the checkpoint's tokenizer; `prompt_ids` do not."""
    if (prompt is None) == (prompt_ids is None):
        raise ConfigError("give exactly one of --prompt (text) and --prompt-ids (token ids)")
    if prompt_ids is not None:
        if not prompt_ids or not all(isinstance(i, int) and i >= 0 for i in prompt_ids):
            raise ConfigError(f"--prompt-ids must be non-negative integers, got {prompt_ids!r}")
        return list(prompt_ids), (_tokenizer(path) if has_tokenizer(path) else None)
    if not has_tokenizer(path):
        raise ConfigError(f"{path} has no tokenizer ({', '.join(TOKENIZER_FILES)}); pass --prompt-ids instead")
    tokenizer = _tokenizer(path)
    return tokenizer(prompt)["input_ids"], tokenizer


def _tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)  # local files only; no remote code


def generate(path: str, prompt: str | None = None, prompt_ids: list[int] | None = None, max_new_tokens: int = 32,
             backend: str | Backend = "ray", model_and_cluster: tuple[Any, Any] | None = None,
             **cluster_options: Any) -> GenerationResult:
    """Greedy-generate `max_new_tokens` after the prompt with checkpoint `path` served on a new cluster
    (shut down afterwards), or on `model_and_cluster` from an earlier `from_pretrained` (left running)."""
    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    ids, tokenizer = prompt_token_ids(path, prompt, prompt_ids)
    model, cluster = model_and_cluster or from_pretrained(path, backend=backend, **cluster_options)
    try:
        vocab = model.config.get_text_config().vocab_size
        if max(ids) >= vocab:
            raise ConfigError(f"prompt token id {max(ids)} is outside the vocabulary (size {vocab})")
        input_ids = torch.tensor([ids])
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                 max_new_tokens=max_new_tokens)
        seconds = time.perf_counter() - start
    finally:
        if model_and_cluster is None:
            cluster.shutdown()
    new = out[0, len(ids):].tolist()
    text = tokenizer.decode(new, skip_special_tokens=True) if tokenizer is not None else ""
    return GenerationResult(ids, new, text, seconds, len(new) / seconds if seconds > 0 else float("inf"),
                            cluster.cfg.dtype, cluster.cfg.num_layers)
