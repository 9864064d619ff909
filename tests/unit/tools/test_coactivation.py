"""Co-activation counts: within-layer co-selection and consecutive-layer affinity, by hand and from traces."""

from pathlib import Path

import numpy as np
import pytest
import torch

import expertray.tools.sim.coactivation as coactivation
from expertray.errors import InputError, TraceFormatError
from expertray.tools.sim.coactivation import (
    Coactivation,
    coselection_counts,
    layer_affinity_counts,
    trace_steps,
)
from expertray.tools.trace import TraceWriter, read_trace

LAYER0 = np.array([[0, 1], [1, 2], [0, -1]])
LAYER1 = np.array([[2, 0], [1, -1], [2, 1]])


def test_coselection_by_hand() -> None:
    # token 0 picks {0, 1}, token 1 {1, 2}, token 2 {0} (its second pick was dropped)
    expected = np.array([[2, 1, 0],
                         [1, 2, 1],
                         [0, 1, 1]])
    np.testing.assert_array_equal(coselection_counts(LAYER0, 3), expected)


def test_layer_affinity_by_hand() -> None:
    # t0: {0,1} -> {2,0}; t1: {1,2} -> {1}; t2: {0} -> {2,1}
    expected = np.array([[1, 1, 2],
                         [1, 1, 1],
                         [0, 1, 0]])
    np.testing.assert_array_equal(layer_affinity_counts(LAYER0, LAYER1, 3), expected)


def test_chunked_counting_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    experts = np.stack([rng.choice(12, 3, replace=False) for _ in range(200)])
    nxt = np.stack([rng.choice(12, 3, replace=False) for _ in range(200)])
    whole = coselection_counts(experts, 12), layer_affinity_counts(experts, nxt, 12)
    monkeypatch.setattr(coactivation, "_PAIRS_PER_CHUNK", 7)  # a handful of tokens per chunk
    chunked = coselection_counts(experts, 12), layer_affinity_counts(experts, nxt, 12)
    for a, b in zip(whole, chunked):
        np.testing.assert_array_equal(a, b)
    # each token with expert i has k - 1 = 2 partners
    c = whole[0]
    np.testing.assert_array_equal(c.sum(axis=1) - np.diag(c), 2 * np.diag(c))


def test_bad_inputs_are_named() -> None:
    with pytest.raises(InputError, match="token 1 picks expert 3 twice"):
        coselection_counts(np.array([[0, 1], [3, 3]]), 4)
    with pytest.raises(InputError, match=r"expert ids must be in \[-1, 4\)"):
        coselection_counts(np.array([[0, 4]]), 4)
    with pytest.raises(InputError, match="same tokens"):
        layer_affinity_counts(LAYER0, LAYER1[:2], 3)
    with pytest.raises(InputError, match="needs all 2 layers"):
        Coactivation.empty(2, 3).add_step([LAYER0])


def test_steps_accumulate() -> None:
    c = Coactivation.from_steps([[LAYER0, LAYER1], [LAYER1, LAYER0]], 2, 3)
    assert c.tokens == 6
    np.testing.assert_array_equal(c.load, [[3, 4, 3], [3, 4, 3]])
    np.testing.assert_array_equal(c.coselection[0], coselection_counts(LAYER0, 3) + coselection_counts(LAYER1, 3))
    np.testing.assert_array_equal(c.layer_affinity[0], layer_affinity_counts(LAYER0, LAYER1, 3)
                                  + layer_affinity_counts(LAYER1, LAYER0, 3))


def _write(path: Path, steps: list[list[np.ndarray]], num_experts: int = 3) -> None:
    k = steps[0][0].shape[1]
    with TraceWriter(path, len(steps[0]), num_experts, k) as w:
        for step in steps:
            for layer, experts in enumerate(step):
                w.write(layer, torch.from_numpy(experts), torch.ones(experts.shape))


def test_from_trace_pairs_the_nth_batch_of_each_layer(tmp_path: Path) -> None:
    steps = [[LAYER0, LAYER1], [LAYER1, LAYER0]]
    _write(tmp_path / "t", steps)
    got = Coactivation.from_trace(read_trace(tmp_path / "t"))
    want = Coactivation.from_steps(steps, 2, 3)
    np.testing.assert_array_equal(got.coselection, want.coselection)
    np.testing.assert_array_equal(got.layer_affinity, want.layer_affinity)


def test_trace_batches_that_do_not_line_up_are_rejected(tmp_path: Path) -> None:
    _write(tmp_path / "sizes", [[LAYER0, LAYER1[:2]]])
    with pytest.raises(TraceFormatError, match="batch 0 routes different tokens per layer"):
        list(trace_steps(read_trace(tmp_path / "sizes")))
    with TraceWriter(tmp_path / "short", 2, 3, 2) as w:
        w.write(0, torch.from_numpy(LAYER0), torch.ones(3, 2))
    with pytest.raises(TraceFormatError, match=r"batch 0 has no record for layers \[1\]"):
        list(trace_steps(read_trace(tmp_path / "short")))
