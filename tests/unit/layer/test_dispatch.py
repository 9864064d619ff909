"""Dispatch plan and combine: identity round trips and exact counts."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from expertray.layer.dispatch import build_plan, combine, combine_by_gather, combine_by_scatter_add, permute


@settings(max_examples=80, deadline=None)
@given(T=st.integers(1, 50), S=st.integers(1, 12), data=st.data())
def test_dispatch_combine_identity_experts(T: int, S: int, data: st.DataObject) -> None:
    """With identity experts, no drops and weights summing to 1, combine(permute(x)) == x."""
    k = data.draw(st.integers(1, S))
    seed = data.draw(st.integers(0, 10_000))
    gen = torch.Generator().manual_seed(seed)
    dest = torch.stack([torch.randperm(S, generator=gen)[:k] for _ in range(T)])
    w = torch.rand(T, k, generator=gen, dtype=torch.float64) + 0.1
    w = w / w.sum(dim=1, keepdim=True)
    x = torch.randn(T, 6, generator=gen, dtype=torch.float64)
    plan = build_plan(dest, S)
    rows = permute(x, plan)
    torch.testing.assert_close(combine(rows, plan, w), x)
    assert int(plan.counts.sum()) == T * k


@settings(max_examples=80, deadline=None)
@given(T=st.integers(1, 50), S=st.integers(1, 12), data=st.data())
def test_counts_sum_to_tk_minus_drops(T: int, S: int, data: st.DataObject) -> None:
    k = data.draw(st.integers(1, S))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 10_000)))
    dest = torch.stack([torch.randperm(S, generator=gen)[:k] for _ in range(T)])
    drop = torch.rand(T, k, generator=gen) < data.draw(st.floats(0.0, 1.0))
    dest = torch.where(drop, -1, dest)
    plan = build_plan(dest, S)
    assert int(plan.counts.sum()) == T * k - int(drop.sum())
    assert plan.counts.tolist() == torch.bincount(dest[dest >= 0], minlength=S).tolist()
    # rows are grouped by destination, in ascending slot order
    seg_dest = dest[plan.token_index, plan.k_index]
    assert bool((seg_dest[1:] >= seg_dest[:-1]).all())


def test_fully_dropped_token_gets_zero_row() -> None:
    dest = torch.tensor([[0, 1], [-1, -1]])
    plan = build_plan(dest, 2)
    x = torch.ones(2, 3)
    out = combine(permute(x, plan), plan, torch.full((2, 2), 0.5))
    assert out[1].abs().sum() == 0 and torch.allclose(out[0], torch.ones(3))


def test_offsets_start_each_slot_segment() -> None:
    dest = torch.tensor([[0, 3], [2, 3], [1, 0]])
    plan = build_plan(dest, 4)
    assert plan.counts.tolist() == [2, 1, 1, 2]
    assert plan.offsets.tolist() == [0, 2, 3, 4, 6]


@settings(max_examples=60, deadline=None)
@given(T=st.integers(1, 40), S=st.integers(1, 10), drop_rate=st.floats(0.0, 1.0), data=st.data())
def test_combine_by_gather_equals_scatter_add(T: int, S: int, drop_rate: float, data: st.DataObject) -> None:
    """The atomic-free combine (CUDA's) equals the scatter-add one (the CPU's), drops included, and a
    dropped assignment contributes zero even when its gate weight is not finite."""
    k = data.draw(st.integers(1, S))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 10_000)))
    dest = torch.stack([torch.randperm(S, generator=gen)[:k] for _ in range(T)])
    drop = torch.rand(T, k, generator=gen) < drop_rate
    dest = torch.where(drop, -1, dest)
    w = torch.rand(T, k, generator=gen, dtype=torch.float64).masked_fill(drop, float("nan"))
    x = torch.randn(T, 5, generator=gen, dtype=torch.float64)
    plan = build_plan(dest, S)
    rows = permute(x, plan) * 2 + 1  # stand-in for expert outputs
    gathered = combine_by_gather(rows, plan, w)
    torch.testing.assert_close(gathered, combine_by_scatter_add(rows.clone(), plan, w))
    assert torch.equal(gathered[drop.all(dim=1)], torch.zeros_like(gathered[drop.all(dim=1)]))
    assert plan.host_counts == tuple(plan.counts.tolist()) and plan.top_k == k


def test_combine_rejects_mismatched_inputs() -> None:
    plan = build_plan(torch.tensor([[0, 1], [1, -1]]), 2)
    with pytest.raises(ValueError, match="weights must be"):
        combine(torch.zeros(3, 4), plan, torch.ones(2, 3))
    with pytest.raises(ValueError, match="rows for a plan of 3"):
        combine(torch.zeros(4, 4), plan, torch.ones(2, 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_combine_by_gather_without_drops_places_every_row_exactly(device: torch.device, dtype: torch.dtype
                                                                   ) -> None:
    """Dropless, the gather through the inverse permutation builds the same [T, k, D] buffer as scattering
    each row to its (token, k) place: the combine is bit-identical to that construction, on
    EXPERTRAY_DEVICE."""
    T, S, k, D = 37, 9, 3, 16
    gen = torch.Generator().manual_seed(11)
    dest = torch.stack([torch.randperm(S, generator=gen)[:k] for _ in range(T)])
    w = torch.rand(T, k, generator=gen).to(device)
    plan = build_plan(dest.to(device), S)
    rows = torch.randn(plan.num_rows, D, generator=gen).to(device, dtype)
    place = plan.token_index * k + plan.k_index
    scattered = rows.new_empty(T * k, D).index_copy_(0, place, rows)
    expected = torch.bmm(w.reshape(-1).to(dtype).view(T, 1, k), scattered.view(T, k, D)).view(T, D)
    assert torch.equal(combine_by_gather(rows, plan, w), expected)
