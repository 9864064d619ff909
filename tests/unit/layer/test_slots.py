"""Expert compute over an actor's stacked slots: the grouped GEMM equals the per-expert loop, on the device
EXPERTRAY_DEVICE names, in fp32 and bf16; stacks follow loads and unloads."""

from __future__ import annotations

import pytest
import torch

from expertray.errors import UnknownExpertError
from expertray.layer.experts import (
    GROUPED_MAX_GROUPS,
    GROUPED_MIN_GROUPS,
    ExpertWeights,
    expert_path,
    grouped_mm_fast,
    grouped_swiglu,
    padded_bmm_swiglu,
    padded_rows,
    prefer_grouped,
    prefer_padded,
    slots_swiglu,
    swiglu,
)
from expertray.layer.slots import SlotStore

D, F = 32, 48
COUNTS = [5, 0, 17, 1, 9]  # an expert with no rows included


def _grouped_mm_runs(device: torch.device, dtype: torch.dtype) -> str | None:
    """None when torch._grouped_mm runs here with these shapes, else why not (the skip reason)."""
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no _grouped_mm"
    try:
        x = torch.zeros(4, D, device=device, dtype=dtype)
        w = torch.zeros(2, F, D, device=device, dtype=dtype)
        torch._grouped_mm(x, w.transpose(-2, -1), offs=torch.tensor([1, 4], dtype=torch.int32, device=device))
    except (RuntimeError, NotImplementedError) as exc:
        return f"torch._grouped_mm does not run on {device} in {dtype}: {str(exc).splitlines()[0]}"
    return None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_grouped_gemm_equals_the_loop(device: torch.device, dtype: torch.dtype) -> None:
    reason = _grouped_mm_runs(device, dtype)
    if reason:
        pytest.skip(reason)
    w = ExpertWeights.random(len(COUNTS), D, F, seed=3, dtype=dtype)
    gate_up, down = w.gate_up.to(device), w.down.to(device)
    rows = torch.randn(sum(COUNTS), D, generator=torch.Generator().manual_seed(4)).to(device, dtype)
    loop = slots_swiglu(rows, COUNTS, gate_up, down, grouped=False)
    grouped = slots_swiglu(rows, COUNTS, gate_up, down, grouped=True)
    assert grouped.dtype == dtype and grouped.device == rows.device
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(grouped, loop, **tol)


def test_loop_matches_the_reference_swiglu(device: torch.device) -> None:
    w = ExpertWeights.random(len(COUNTS), D, F, seed=5)
    rows = torch.randn(sum(COUNTS), D, generator=torch.Generator().manual_seed(6))
    ref = torch.cat([swiglu(r, w.gate_up[s], w.down[s]) for s, r in enumerate(rows.split(COUNTS))])
    out = slots_swiglu(rows.to(device), COUNTS, w.gate_up.to(device), w.down.to(device), grouped=False)
    torch.testing.assert_close(out.cpu(), ref)
    torch.testing.assert_close(grouped_swiglu(rows, COUNTS, w), ref)


def test_slots_swiglu_rejects_counts_that_do_not_fit() -> None:
    w = ExpertWeights.random(2, D, F)
    with pytest.raises(ValueError, match="counts sum"):
        slots_swiglu(torch.zeros(3, D), [1, 1], w.gate_up, w.down, grouped=False)
    with pytest.raises(ValueError, match="stacked slots"):
        slots_swiglu(torch.zeros(2, D), [1, 1, 0], w.gate_up, w.down, grouped=False)


def _store(device: torch.device, dtype: torch.dtype, grouped: bool | None, experts: list[int]) -> SlotStore:
    w = ExpertWeights.random(len(experts), D, F, seed=7)
    store = SlotStore("a0", device, dtype, grouped=grouped)
    store.add({(1, e): (w.gate_up[i].numpy(), w.down[i].numpy()) for i, e in enumerate(experts)})
    return store


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_slot_store_keeps_weights_on_the_device_in_the_dtype(device: torch.device, dtype: torch.dtype) -> None:
    store = _store(device, dtype, None, [4, 1, 9])
    stack = store.layer(1)
    assert stack.experts == [1, 4, 9]
    assert stack.gate_up.device.type == device.type and stack.gate_up.dtype == dtype
    assert stack.grouped == grouped_mm_fast(device, dtype, D, F)
    assert store.nbytes() == 3 * 3 * D * F * torch.finfo(dtype).bits // 8


def test_slot_store_compute_is_the_same_in_any_expert_order_and_either_path(device: torch.device) -> None:
    reason = _grouped_mm_runs(device, torch.float32)
    looped, grouped = _store(device, torch.float32, False, [1, 4, 9]), _store(device, torch.float32, True, [1, 4, 9])
    rows = torch.randn(10, D, generator=torch.Generator().manual_seed(8)).to(device)
    ref = torch.cat([swiglu(r, *looped.get((1, e))) for e, r in zip([4, 9], rows.split([6, 4]))])
    torch.testing.assert_close(looped.compute(1, [4, 9], [6, 4], rows), ref)
    if reason is None:
        torch.testing.assert_close(grouped.compute(1, [4, 9], [6, 4], rows), ref, atol=1e-5, rtol=1e-5)
    # Out of stack order: the loop runs (a grouped call needs the rows in stack order).
    swapped = torch.cat([rows[6:], rows[:6]])
    out = grouped.compute(1, [9, 4], [4, 6], swapped)
    torch.testing.assert_close(torch.cat([out[4:], out[:4]]), ref, atol=1e-5, rtol=1e-5)


def test_slot_store_restacks_on_load_and_unload() -> None:
    store = _store(torch.device("cpu"), torch.float32, False, [1, 4])
    before = store.get((1, 4))[0].clone()
    store.add({(1, 2): (torch.ones(2 * F, D), torch.ones(D, F)), (0, 3): (torch.ones(2 * F, D), torch.ones(D, F))})
    assert store.keys() == [(0, 3), (1, 1), (1, 2), (1, 4)]
    torch.testing.assert_close(store.get((1, 4))[0], before)
    store.remove([(1, 1), (1, 2), (0, 3), (5, 5)])
    assert store.keys() == [(1, 4)]
    torch.testing.assert_close(store.get((1, 4))[0], before)


def test_slot_store_names_a_missing_slot_and_bad_counts() -> None:
    store = _store(torch.device("cpu"), torch.float32, False, [1])
    with pytest.raises(UnknownExpertError, match="actor a0 holds no slot for expert 1:2"):
        store.compute(1, [2], [1], torch.zeros(1, D))
    with pytest.raises(ValueError, match="counts sum 3 != 2 rows"):
        store.compute(1, [1], [3], torch.zeros(2, D))


def test_prefer_grouped_follows_the_number_of_non_empty_groups() -> None:
    few = [1024] * 8  # Mixtral-like: 8 large experts, the loop won on the H200
    many = [128] * 256  # DeepSeek-like: 256 small experts, the grouped GEMM won
    assert not prefer_grouped(few) and prefer_grouped(many)
    assert not prefer_grouped([0] * 200 + [4] * (GROUPED_MIN_GROUPS - 1))  # empty groups do not count
    assert prefer_grouped([0] * 200 + [4] * GROUPED_MIN_GROUPS)
    assert not prefer_grouped([1] * (GROUPED_MAX_GROUPS + 1))  # more groups than the kernel takes


def test_slot_store_automatic_choice_runs_the_loop_for_few_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    """With grouped=None the store asks prefer_grouped per call, on top of the layer's fast-kernel check."""
    store = _store(torch.device("cpu"), torch.float32, None, [1, 4, 9])
    store.layer(1).grouped = True  # as on a fast-kernel device
    calls: list[bool] = []
    monkeypatch.setattr("expertray.layer.slots.slots_swiglu", lambda *a, grouped: calls.append(grouped) or a[0])
    rows = torch.randn(10, D, generator=torch.Generator().manual_seed(9))
    store.compute(1, [4, 9], [6, 4], rows)  # 2 groups: the loop, not the grouped GEMM
    assert calls == []
    monkeypatch.setattr("expertray.layer.experts.GROUPED_MIN_GROUPS", 2)
    store.compute(1, [4, 9], [6, 4], rows)  # now enough groups: one grouped call over the whole stack
    assert calls == [True]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_padded_bmm_equals_the_loop(device: torch.device, dtype: torch.dtype) -> None:
    w = ExpertWeights.random(len(COUNTS), D, F, seed=3, dtype=dtype)
    gate_up, down = w.gate_up.to(device), w.down.to(device)
    rows = torch.randn(sum(COUNTS), D, generator=torch.Generator().manual_seed(4)).to(device, dtype)
    loop = slots_swiglu(rows, COUNTS, gate_up, down, grouped=False)
    padded = slots_swiglu(rows, COUNTS, gate_up, down, grouped=False, padded=True)
    assert padded.dtype == dtype and padded.device == rows.device and padded.shape == loop.shape
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(padded, loop, **tol)
    assert padded_bmm_swiglu(rows[:0], [0] * len(COUNTS), gate_up, down).shape == (0, D)


def test_padded_rows_and_the_padded_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    assert padded_rows([5, 0, 17], multiple=8) == 24 and padded_rows([], multiple=8) == 0
    with pytest.raises(ValueError, match="multiple"):
        padded_rows([1], multiple=0)
    monkeypatch.setattr("expertray.layer.experts.PADDED_MAX_OVERHEAD", 1.25)
    assert prefer_padded([64] * 8) and not prefer_padded([64] * 7 + [129]) and not prefer_padded([0, 0])


def test_expert_path_follows_the_measured_rule() -> None:
    even, skewed = [128] * 256, [4] * 255 + [1024]  # DeepSeek-like prefill; one hot expert
    assert expert_path(even, fast_kernel=True) == "padded"  # 1.0x padding: batched GEMMs
    assert expert_path(skewed, fast_kernel=True) == "grouped"  # padding ~ 128x: one grouped GEMM
    assert expert_path([1024] * 8, fast_kernel=True) == "loop"  # few large experts: a GEMM each
    assert expert_path(even, fast_kernel=False) == "loop"  # no fast kernel (CPU, fp32): the loop


def test_concurrent_loads_and_unloads_lose_no_slot() -> None:
    """Loads from several threads at once (a heal copying from two source actors) all land: each
    read-modify-restack of a layer is serialised, so no thread's slots are overwritten by another's."""
    import threading

    store = SlotStore("a", torch.device("cpu"), torch.float32)
    d, f, threads, per_thread = 8, 12, 8, 16
    barrier = threading.Barrier(threads)

    def load(t: int) -> None:
        barrier.wait()
        for i in range(per_thread):
            e = t * per_thread + i
            store.add({(0, e): (torch.full((2 * f, d), float(e)), torch.full((d, f), float(e)))})
            store.add({(1, e): (torch.zeros(2 * f, d), torch.zeros(d, f))})
            store.remove([(1, e)])

    workers = [threading.Thread(target=load, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
    assert store.keys() == [(0, e) for e in range(threads * per_thread)]
    assert all(float(store.get((0, e))[0][0, 0]) == e for e in range(threads * per_thread))
