"""laser's chunk steps against plain Python: the pair orders `_pairs` builds from its row keys, and the
(group, cost) order `_take_level` sorts the eligible pairs by — on the small-key paths and the wide ones."""

import numpy as np
import pytest

from expertray.policies.routing.laser import LaserRouting, _cells, _sort_by_group_then_cost


@pytest.mark.parametrize("groups", [3, 8, 64, 40_000])  # 40,000 groups: the int64 row keys
@pytest.mark.parametrize("priced", [False, True])
@pytest.mark.parametrize(("k", "w"), [(8, 4), (2, 4), (6, 3), (1, 1)])
def test_pairs_order_each_side_as_a_stable_sort_of_the_group_loads(groups: int, priced: bool, k: int,
                                                                   w: int) -> None:
    rng = np.random.default_rng(groups + 10 * k + w)
    n, m = 300, min(k, w)
    used = rng.choice(groups, size=min(groups, 12), replace=False)  # the groups these tokens touch
    g = used[rng.integers(0, used.size, (n, k + w))].astype(np.int64)
    load = np.zeros(groups)
    load[used] = rng.integers(0, 6, used.size) * 10.0  # repeated loads: equal loads share a rank
    mean = float(load.mean())
    usable = rng.random((n, w)) < 0.8
    mass = rng.random((n, k + w)).astype(np.float32)
    top_mass = mass[:, :k].sum(axis=1, keepdims=True)
    policy = LaserRouting(balance_weight=0.5 if priced else None)
    p = policy._pairs(g, _cells(g, k, usable, groups), k, usable, mass, top_mass, top_mass, load, mean, m)

    rel = (load / mean).astype(np.float32)
    for row in range(n):
        top_keys = [(int((rel > rel[g[row, j]]).sum()), j) for j in range(k)]  # busiest group first
        out_rel = rel[g[row, k:]]
        if priced:  # the idlest group first
            out_keys = [(int((rel < out_rel[j]).sum()) if usable[row, j] else groups, j) for j in range(w)]
        else:  # usable candidates below the mean first
            out_keys = [(0 if usable[row, j] and out_rel[j] < 1 else 1, j) for j in range(w)]
        want_in = [row * (k + w) + j for _, j in sorted(top_keys)[:m]]
        want_out = [row * (k + w) + k + j for _, j in sorted(out_keys)[:m]]
        assert p.in_flat[row].tolist() == want_in
        assert p.out_flat[row].tolist() == want_out
    assert np.array_equal(p.src, g.reshape(-1).take(p.in_flat))
    assert np.array_equal(p.cost, mass.reshape(-1).take(p.in_flat) - mass.reshape(-1).take(p.out_flat))


@pytest.mark.parametrize("groups", [1, 8, 300, 70_000])  # 70,000: group ids past 16 bits
def test_pairs_sort_by_group_then_cost_then_position(groups: int) -> None:
    rng = np.random.default_rng(groups)
    N = 5000
    group = rng.integers(0, groups, N)
    cost = (rng.random(N) ** 8).astype(np.float32)  # costs across many exponents
    cost[rng.random(N) < 0.2] = 0  # the clamped swaps that gain mass: many equal costs
    cost[rng.random(N) < 0.05] = 1
    cost[:50] = np.float32(1e-42)  # subnormals
    pairs = np.sort(rng.choice(N, size=3000, replace=False))
    want = sorted(pairs.tolist(), key=lambda i: (group[i], cost[i], i))
    assert _sort_by_group_then_cost(pairs, group, cost).tolist() == want
