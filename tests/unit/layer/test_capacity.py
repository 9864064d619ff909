"""Capacity formula and overflow modes, checked by hand."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from expertray.config import CapacityConfig
from expertray.layer.capacity import apply_capacity, expert_capacity
from expertray.layer.gating import GateOutput


def _gate(experts: list[list[int]], weights: list[list[float]], num_experts: int,
          scores: torch.Tensor | None = None) -> GateOutput:
    e = torch.tensor(experts)
    w = torch.tensor(weights)
    if scores is None:
        scores = torch.zeros(len(experts), num_experts)
        scores.scatter_(1, e, w)
    return GateOutput(scores, scores, scores, e, w)


@pytest.mark.parametrize("T,E,k,cf,minc", [(4096, 8, 2, 1.25, 4), (10, 8, 2, 1.0, 4), (7, 3, 1, 1.0, 0),
                                          (100, 64, 8, 1.25, 0), (1, 64, 8, 1.0, 1)])
def test_capacity_formula(T: int, E: int, k: int, cf: float, minc: int) -> None:
    assert expert_capacity(T, E, k, cf, minc) == max(math.ceil(cf * T * k / E), minc)


def test_drop_first_come_gives_first_choices_priority() -> None:
    # 4 tokens, 2 experts, k=1 -> capacity = ceil(1.0*4*1/2) = 2. Expert 0 wanted by tokens 0,1,2.
    g = _gate([[0], [0], [0], [1]], [[1.0], [1.0], [1.0], [1.0]], 2)
    r = apply_capacity(g, CapacityConfig(factor=1.0, min_capacity=0, overflow="drop"))
    assert r.capacity == 2
    assert r.experts.squeeze(1).tolist() == [0, 0, -1, 1]
    assert r.num_dropped == 1


def test_first_come_is_rank_major() -> None:
    # token 1's first choice beats token 0's second choice for expert 0 (capacity 1).
    g = _gate([[1, 0], [0, 1]], [[0.6, 0.4], [0.7, 0.3]], 2)
    r = apply_capacity(g, CapacityConfig(factor=0.5, min_capacity=0, overflow="drop"))
    assert r.capacity == 1
    assert r.experts.tolist() == [[1, -1], [0, -1]]
    assert r.num_dropped == 2


def test_drop_by_score_keeps_highest_weights() -> None:
    g = _gate([[0], [0], [0], [1]], [[0.2], [0.9], [0.5], [1.0]], 2)
    r = apply_capacity(g, CapacityConfig(factor=1.0, min_capacity=0, overflow="drop", drop_priority="score"))
    assert r.experts.squeeze(1).tolist() == [-1, 0, 0, 1]


def test_reroute_moves_overflow_to_next_best_with_room() -> None:
    scores = torch.tensor([[0.5, 0.3, 0.2], [0.5, 0.2, 0.3], [0.6, 0.3, 0.1]])
    g = _gate([[0], [0], [0]], [[0.5], [0.5], [0.6]], 3, scores)
    r = apply_capacity(g, CapacityConfig(factor=1.0, min_capacity=0, overflow="reroute"))
    # capacity ceil(3/3)=1: token 0 keeps expert 0; token 1 -> its next best (2); token 2 -> next best (1).
    assert r.experts.squeeze(1).tolist() == [0, 2, 1]
    assert (r.num_dropped, r.num_rerouted) == (0, 2)
    torch.testing.assert_close(r.weights, g.weights)


def test_reroute_never_duplicates_a_token_expert_and_drops_when_full() -> None:
    scores = torch.tensor([[0.4, 0.35, 0.25], [0.4, 0.35, 0.25]])
    g = _gate([[0, 1], [0, 1]], [[0.4, 0.35], [0.4, 0.35]], 3, scores)
    r = apply_capacity(g, CapacityConfig(factor=0.75, min_capacity=0, overflow="reroute"))
    # capacity ceil(0.75*2*2/3)=1 per expert, 3 slots for 4 assignments: exactly one drop.
    assert r.capacity == 1
    assert r.num_dropped == 1 and r.num_rerouted == 1
    for row in r.experts.tolist():
        kept = [e for e in row if e >= 0]
        assert len(kept) == len(set(kept))
    assert torch.bincount(r.experts[r.experts >= 0], minlength=3).max() <= 1


def test_dropless_keeps_everything() -> None:
    g = _gate([[0], [0], [0]], [[1.0]] * 3, 4)
    r = apply_capacity(g, CapacityConfig(overflow="dropless"))
    assert r.num_dropped == 0 and r.capacity is None and r.experts.squeeze(1).tolist() == [0, 0, 0]


@settings(max_examples=60, deadline=None)
@given(T=st.integers(1, 40), E=st.integers(2, 10), data=st.data(),
       mode=st.sampled_from(["drop", "reroute"]), prio=st.sampled_from(["first_come", "score"]),
       cf=st.floats(0.25, 2.0))
def test_capacity_invariants(T: int, E: int, data: st.DataObject, mode: str, prio: str, cf: float) -> None:
    k = data.draw(st.integers(1, min(E, 4)))
    scores = torch.rand(T, E, generator=torch.Generator().manual_seed(data.draw(st.integers(0, 999))))
    w, e = scores.topk(k, dim=-1)
    g = GateOutput(scores, scores, scores, e, w)
    r = apply_capacity(g, CapacityConfig(factor=cf, min_capacity=0, overflow=mode, drop_priority=prio))
    kept = r.experts[r.experts >= 0]
    assert torch.bincount(kept, minlength=E).max() <= r.capacity
    assert kept.numel() + r.num_dropped == T * k
    for row in r.experts.tolist():
        live = [x for x in row if x >= 0]
        assert len(live) == len(set(live))
    if mode == "drop":
        assert r.num_rerouted == 0
        changed = (r.experts >= 0) & (r.experts != e)
        assert not bool(changed.any())
    else:  # reroute drops an assignment only when every expert its token does not hold is full
        load = torch.bincount(kept, minlength=E)
        for t, row in enumerate(r.experts.tolist()):
            if -1 in row:
                free = [x for x in range(E) if x not in row and load[x] < r.capacity and scores[t, x] > -1]
                assert not free, f"token {t} dropped while experts {free} had room"
