"""The decode batch's KV cache: the caches of sequences of different lengths side by side in one transformers
DynamicCache, so that one forward of B rows (one new token each) serves them all.

Rows are right-aligned: a sequence's cached tokens are the last columns of its row, the columns before them are
padding. `positions` [B, T] holds each column's real position in its sequence (-1: padding). Masks are built from
real positions, not column indices, so causal and sliding-window attention see exactly the tokens they would see
with the sequence alone (`AttentionMasks`): greedy decoding through the batch equals transformers' batch-1
`generate`. Joining a sequence pads the shorter side on the left; leaving drops its row and every leading column
no row uses any more.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from expertray.errors import ConfigError

# Cache layer kinds this batch can hold: plain key/value attention (full or sliding window).
ATTENTION_KINDS = ("full_attention", "sliding_attention")


@dataclass(frozen=True)
class AttentionMasks:
    """How the model wants its masks. `windows`: layer kind → sliding window (None: full causal), given to the
    model as a dict of masks when `by_kind` (models with `layer_types`), else as one 4D mask for every layer;
    `additive`: float masks (0 / dtype min, eager attention) rather than boolean (sdpa)."""

    windows: dict[str, int | None]
    by_kind: bool
    additive: bool
    dtype: torch.dtype

    @classmethod
    def for_model(cls, model: Any) -> AttentionMasks:
        """Read the text config of a transformers causal LM; refuse caches that are not key/value attention."""
        config = model.config.get_text_config()
        impl = getattr(config, "_attn_implementation", None) or "eager"
        if impl not in ("sdpa", "eager"):
            raise ConfigError(f"engine: attention implementation {impl!r} is not supported (sdpa or eager)")
        window = getattr(config, "sliding_window", None)
        if getattr(config, "use_sliding_window", True) is False:
            window = None
        kinds = getattr(config, "layer_types", None)
        if kinds:
            unknown = sorted(set(kinds) - set(ATTENTION_KINDS))
            if unknown:
                raise ConfigError(f"engine: layer type(s) {', '.join(unknown)} keep a cache the batched engine "
                                  f"cannot hold (supported: {', '.join(ATTENTION_KINDS)})")
            windows = {k: (window if k == "sliding_attention" else None) for k in set(kinds)}
            return cls(windows, True, impl == "eager", model.dtype)
        return cls({"full_attention": window}, False, impl == "eager", model.dtype)

    def build(self, kv_pos_BT: torch.Tensor, q_pos_BQ: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        """Masks [B, 1, Q, T] for queries at real positions q_pos_BQ over keys at kv_pos_BT (-1: padding)."""
        kv = kv_pos_BT[:, None, None, :]
        q = q_pos_BQ[:, None, :, None]
        base = (kv >= 0) & (kv <= q)
        masks = {}
        for kind, window in self.windows.items():
            allowed = base & (q - kv < window) if window else base
            if self.additive:
                masks[kind] = torch.zeros(allowed.shape, dtype=self.dtype).masked_fill_(
                    ~allowed, torch.finfo(self.dtype).min)
            else:
                masks[kind] = allowed
        return masks if self.by_kind else masks["full_attention"]


def cache_tensors(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) of every layer of a DynamicCache, each [B, H, T, d]."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def _pad_left(t: torch.Tensor, columns: int) -> torch.Tensor:
    if columns == 0:
        return t
    pad = t.new_zeros(*t.shape[:-2], columns, t.shape[-1])
    return torch.cat([pad, t], dim=-2)


class DecodeBatch:
    """Sequences decoding together: their KV rows in one DynamicCache and each column's real position."""

    def __init__(self) -> None:
        self.seqs: list[Any] = []
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.positions = torch.empty(0, 0, dtype=torch.long)  # [B, T]; -1 = padding

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def columns(self) -> int:
        return self.positions.shape[1]

    @property
    def cells(self) -> int:
        """Token slots held (rows × columns, padding included): what the KV budget counts."""
        return len(self.seqs) * self.columns

    def add(self, seq: Any, cache: Any, length: int) -> None:
        """Append `seq`, whose own batch-1 cache holds its first `length` tokens (positions 0..length-1)."""
        rows = cache_tensors(cache)
        if any(k.shape[-2] != length for k, _ in rows):
            raise ValueError(f"a joining cache holds {rows[0][0].shape[-2]} tokens, expected {length}")
        width = max(self.columns, length)
        mine = torch.cat([torch.full((1, width - length), -1, dtype=torch.long), torch.arange(length)[None]], 1)
        if not self.seqs:
            self.layers = [(_pad_left(k, width - length), _pad_left(v, width - length)) for k, v in rows]
            self.positions = mine
        else:
            grow = width - self.columns
            self.layers = [(torch.cat([_pad_left(bk, grow), _pad_left(k, width - length)]),
                            torch.cat([_pad_left(bv, grow), _pad_left(v, width - length)]))
                           for (bk, bv), (k, v) in zip(self.layers, rows)]
            self.positions = torch.cat([torch.nn.functional.pad(self.positions, (grow, 0), value=-1), mine])
        self.seqs.append(seq)

    def remove(self, seqs: list[Any]) -> None:
        """Drop these sequences' rows, then the leading columns that only padding uses."""
        gone = {id(s) for s in seqs}
        keep = [i for i, s in enumerate(self.seqs) if id(s) not in gone]
        if len(keep) == len(self.seqs):
            return
        self.seqs = [self.seqs[i] for i in keep]
        if not keep:
            self.layers, self.positions = [], torch.empty(0, 0, dtype=torch.long)
            return
        index = torch.tensor(keep)
        positions = self.positions.index_select(0, index)
        used = (positions >= 0).any(0).nonzero()
        start = int(used[0]) if len(used) else positions.shape[1]
        self.positions = positions[:, start:].contiguous()
        self.layers = [(k.index_select(0, index)[..., start:, :].contiguous(),
                        v.index_select(0, index)[..., start:, :].contiguous()) for k, v in self.layers]

    def cache(self) -> Any:
        """A DynamicCache over the batch's rows for one forward (it appends the step's column)."""
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        cache = DynamicCache()
        for keys, values in self.layers:  # the tensors themselves: no copy before the forward's own append
            layer = DynamicLayer()
            layer.lazy_initialization(keys, values)
            layer.keys, layer.values = keys, values
            cache.layers.append(layer)
        return cache

    def step_inputs(self, masks: AttentionMasks) -> tuple[torch.Tensor, torch.Tensor | dict[str, torch.Tensor]]:
        """(position_ids [B, 1], attention masks) for one new token per row: each row's next real position."""
        next_pos = (self.positions.max(dim=1).values + 1)[:, None]
        kv = torch.cat([self.positions, next_pos], dim=1)
        return next_pos, masks.build(kv, next_pos)

    def absorb(self, cache: Any, position_ids_B1: torch.Tensor) -> None:
        """Keep the cache a forward grew by one column (the rows' new tokens at `position_ids_B1`)."""
        self.layers = cache_tensors(cache)
        self.positions = torch.cat([self.positions, position_ids_B1], dim=1)
