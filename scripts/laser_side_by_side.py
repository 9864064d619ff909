"""Laser's cost side by side in one process: the top-k gate, the previous laser (the pinning oracle
tests/unit/laser_reference.py) and laser now, device-aware defaults (and laser now pricing per expert), 4,096
tokens, one thread, timed in turn each repeat (after one warm-up call); medians of wall and thread-CPU µs/token,
and whether both device-aware lasers decide identically.

Run from the repository root: `.venv/bin/python scripts/laser_side_by_side.py [repeats]`."""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import partial

import torch

from expertray.bench.routing import DROPLESS, MODELS, _device_of, families, us_per_token_in_turn
from expertray.gating import gate_from_logits
from expertray.policies.routing_laser import LaserRouting

TOKENS = 4096


def main(repeats: int) -> None:
    torch.set_num_threads(1)
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


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 9)
