"""The decode batch's padded cache: masks from real positions, rows joining and leaving."""

from __future__ import annotations

import torch

from expertray.serving.kv import AttentionMasks, DecodeBatch


class _Cache:
    def __init__(self, layers) -> None:
        self.layers = [type("L", (), {"keys": k, "values": v})() for k, v in layers]


def _cache(length: int, fill: float) -> _Cache:
    t = torch.full((1, 2, length, 4), fill)
    return _Cache([(t, t.clone())])


def test_masks_follow_real_positions_and_windows() -> None:
    masks = AttentionMasks({"full_attention": None, "sliding_attention": 2}, True, False, torch.float32)
    kv = torch.tensor([[-1, 0, 1, 2]])
    q = torch.tensor([[3]])
    got = masks.build(kv, q)
    assert got["full_attention"][0, 0, 0].tolist() == [False, True, True, True]
    assert got["sliding_attention"][0, 0, 0].tolist() == [False, False, False, True]
    additive = AttentionMasks({"full_attention": None}, False, True, torch.float32).build(kv, q)
    assert additive[0, 0, 0, 0] == torch.finfo(torch.float32).min and additive[0, 0, 0, 1] == 0


def test_rows_are_right_aligned_and_leading_padding_is_trimmed() -> None:
    batch = DecodeBatch()
    batch.add("a", _cache(2, 1.0), 2)
    batch.add("b", _cache(5, 2.0), 5)
    assert batch.positions.tolist() == [[-1, -1, -1, 0, 1], [0, 1, 2, 3, 4]] and batch.cells == 10
    assert batch.layers[0][0][0, 0, :, 0].tolist() == [0, 0, 0, 1, 1]
    position_ids, mask = batch.step_inputs(AttentionMasks({"full_attention": None}, False, False, torch.float32))
    assert position_ids.tolist() == [[2], [5]] and mask.shape == (2, 1, 1, 6)
    batch.remove(["b"])
    assert batch.positions.tolist() == [[0, 1]] and batch.layers[0][0].shape[-2] == 2 and batch.seqs == ["a"]
    batch.remove(["a"])
    assert len(batch) == 0 and batch.cells == 0
