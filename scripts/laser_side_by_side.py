"""Laser's cost side by side in one process: the top-k gate, the previous laser (the pinning oracle
tests/unit/laser_reference.py) and laser now, device-aware defaults, 4,096 tokens, one thread, timed in turn each
repeat; medians of wall and thread-CPU µs/token, and whether both lasers decide identically.

Run from the repository root: `.venv/bin/python scripts/laser_side_by_side.py [repeats]`."""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from functools import partial

import torch

from expertray.bench.routing import DROPLESS, MODELS, _device_of, families
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
            "laser now": partial(LaserRouting(expert_groups=groups).route, gate, DROPLESS)}
        before, now = runs["laser before"](), runs["laser now"]()
        same = torch.equal(before.experts, now.experts) and torch.equal(before.weights, now.weights)
        wall: dict[str, list[float]] = {k: [] for k in runs}
        cpu: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(repeats):
            for name, fn in runs.items():
                t0, c0 = time.perf_counter(), time.thread_time()
                fn()
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.thread_time() - c0)

        def us(times: list[float]) -> float:
            return statistics.median(times) * 1e6 / TOKENS

        cells = " | ".join(f"{k}: wall {us(wall[k]):.3f} cpu {us(cpu[k]):.3f} us/token" for k in runs)
        print(f"{model}: identical={same} repeats={repeats} | {cells} | now/before wall "
              f"{us(wall['laser now']) / us(wall['laser before']):.2f} cpu "
              f"{us(cpu['laser now']) / us(cpu['laser before']):.2f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 9)
