"""Laser's cost side by side in one process, 4,096 tokens, one thread.

`laser_side_by_side.py [repeats]`: the top-k gate, the previous laser (the pinning oracle
tests/unit/policies/laser_reference.py) and laser now, device-aware defaults (and laser now pricing per expert), timed in
turn each repeat (after one warm-up call); medians of wall and thread-CPU µs/token, and whether both device-aware
lasers decide identically.

`laser_side_by_side.py REPEATS REVISION`: laser now against policies/routing/laser.py as it stood at a git
revision, device-aware and per expert, over 16 batches of different seeds cycled (so no call meets a batch its
caches or branch predictors have just learned), in turn; the best of REPEATS rounds of thread CPU µs/token, and
whether both decide identically on every batch.

Run from the repository root: `.venv/bin/python scripts/laser_side_by_side.py [repeats [revision]]`."""

from __future__ import annotations

import math
import subprocess
import sys
import time
import types
from collections.abc import Callable
from functools import partial

import torch

from expertray.layer.gating import GateOutput, gate_from_logits
from expertray.policies.routing.laser import LaserRouting
from expertray.tools.bench.routing import DROPLESS, MODELS, _device_of, families, us_per_token_in_turn

TOKENS = 4096


def against_reference(repeats: int) -> None:
    sys.path.insert(0, "tests/unit")
    from laser_reference import LaserRouting as Reference

    for model, (cfg, _, devices) in MODELS.items():
        groups = tuple(_device_of(cfg, devices).tolist())
        logits = families(model, None)["zipf"](0, TOKENS, 2.0)
        gate = gate_from_logits(logits, cfg)
        runs: dict[str, Callable[[], object]] = {
            "topk gate": partial(gate_from_logits, logits, cfg),
            "laser before": partial(Reference(expert_groups=groups).route, gate, DROPLESS),
            "laser now": partial(LaserRouting(expert_groups=groups).route, gate, DROPLESS),
            "laser now per expert": partial(LaserRouting().route, gate, DROPLESS)}
        before, now = runs["laser before"](), runs["laser now"]()
        same = torch.equal(before.experts, now.experts) and torch.equal(before.weights, now.weights)
        wall, cpu = us_per_token_in_turn(runs, repeats, TOKENS)
        cells = " | ".join(f"{k}: wall {wall[k]:.3f} cpu {cpu[k]:.3f} us/token" for k in runs)
        print(f"{model}: identical={same} repeats={repeats} | {cells} | now/before wall "
              f"{wall['laser now'] / wall['laser before']:.2f} cpu {cpu['laser now'] / cpu['laser before']:.2f}")


def laser_at(revision: str) -> type:
    """LaserRouting as policies/routing/laser.py stood at a git revision of this repository (its registry
    entry left out: the current module holds the name)."""
    path = f"{revision}:policies/routing/laser.py"
    shown = subprocess.run(["git", "show", path], capture_output=True, text=True)
    if shown.returncode != 0:  # before the package layout (policies/routing_laser.py, other import paths)
        raise SystemExit(f"{path} does not exist: revisions before the routing/ package imported modules that "
                         "are gone; compare them from a checkout of that revision")
    source = shown.stdout
    module = types.ModuleType(f"routing_laser_at_{revision}")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(source.replace('@ROUTING.register("laser")\n', ""), path, "exec"), module.__dict__)
    return module.LaserRouting


def against_revision(repeats: int, revision: str) -> None:
    previous = laser_at(revision)
    for model, (cfg, _, devices) in MODELS.items():
        groups = tuple(_device_of(cfg, devices).tolist())
        gates = [gate_from_logits(families(model, None)["zipf"](seed, TOKENS, 2.0), cfg) for seed in range(16)]
        cells = []
        for pricing, params in (("device-aware", {"expert_groups": groups}), ("per expert", {})):
            pair = {"previous": previous(**params), "now": LaserRouting(**params)}
            same = all(_same(pair["previous"].route(g, DROPLESS), pair["now"].route(g, DROPLESS)) for g in gates)
            best = dict.fromkeys(pair, math.inf)
            for _ in range(repeats):
                for name, policy in pair.items():
                    best[name] = min(best[name], _cpu_us_per_token(policy, gates))
            cells.append(f"{pricing}: previous {best['previous']:.3f} now {best['now']:.3f} cpu us/token, "
                         f"now/previous {best['now'] / best['previous']:.2f}, identical={same}")
        print(f"{model} vs {revision}, best of {repeats}: " + " | ".join(cells))


def _same(a: GateOutput, b: GateOutput) -> bool:
    return torch.equal(a.experts, b.experts) and torch.equal(a.weights, b.weights)


def _cpu_us_per_token(policy: LaserRouting, gates: list[GateOutput]) -> float:
    start = time.thread_time()
    for g in gates:
        policy.route(g, DROPLESS)
    return (time.thread_time() - start) * 1e6 / (len(gates) * TOKENS)


if __name__ == "__main__":
    torch.set_num_threads(1)
    reps = int(sys.argv[1]) if len(sys.argv) > 1 else 9
    if len(sys.argv) > 2:
        against_revision(reps, sys.argv[2])
    else:
        against_reference(reps)
