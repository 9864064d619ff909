"""`expertray demo` / `make demo` and `expertray load`: skewed, shifting traffic on an expertray cluster.

`drive` is the traffic: per layer, a Zipf(skew) workload over experts whose hot spot rotates, realised as
hidden states through the layer's gate (LogitInverter), sent `concurrency` requests at a time; it prints
per-expert load as it goes and, with reference layers, checks answers against the in-process layer.
`run_demo` starts its own local Ray and cluster (autoscaler on) and drives it; `expertray load` drives any
running cluster.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import ray
import torch
from rich.console import Console
from rich.table import Table

from expertray.api import Cluster, init_ray, launch, random_model
from expertray.config import ClusterConfig
from expertray.layer.reference import MoELayer
from expertray.tools.hidden_from_logits import LogitInverter
from expertray.tools.workload import Workload, WorkloadConfig

console = Console()


def _load_table(status: dict, num_layers: int) -> Table:
    t = Table(title=f"per-expert load (window) — placement v{status['table']['version']}")
    t.add_column("layer")
    t.add_column("balancedness")
    t.add_column("tokens per expert (x replicas)")
    from expertray.state.placement_table import PlacementTable

    table = PlacementTable.from_dict(status["table"])
    for layer in range(num_layers):
        load = [sum(r["layers"][layer]["expert_load"][e] for r in status["routers"])
                for e in range(table.num_experts)]
        bal = min(r["layers"][layer]["balancedness"] for r in status["routers"])
        reps = table.replica_counts(layer)
        cells = " ".join(f"{v:.0f}" + (f"x{n}" if n > 1 else "") for v, n in zip(load, reps))
        t.add_row(str(layer), f"{bal:.2f}", cells)
    return t


def drive(cluster: Cluster, gates: list[MoELayer], seconds: float, skew: float = 1.2,
          tokens_per_request: int = 128, concurrency: int = 8, check: bool = False,
          show: Callable[[Any], None] = console.print, every_s: float = 4.0) -> dict[str, Any]:
    """Send skewed traffic to `cluster` for `seconds`; returns counts, tokens/s and the largest deviation
    from `gates`' in-process answers (checked on every 16th request when `check`; then `gates` must be the
    weights the cluster serves — otherwise they only shape the traffic through their gates)."""
    cfg = cluster.cfg
    inverters = [LogitInverter(m.gate_weights.weight) for m in gates]
    work = [Workload(WorkloadConfig(num_experts=cfg.layer.num_experts, tokens_per_batch=tokens_per_request,
                                    zipf_exponent=skew, hotspot_period=400, seed=layer))
            for layer in range(cfg.num_layers)]
    start = last_print = time.monotonic()
    sent = tokens = errors = 0
    max_err = 0.0
    i = 0
    while time.monotonic() - start < seconds:
        reqs = []
        for _ in range(concurrency):
            layer = i % cfg.num_layers
            x = inverters[layer].hidden(work[layer].batch(i).logits, seed=i)
            reqs.append((layer, x, cluster.forward_ref(layer, x)))
            i += 1
        for layer, x, ref in reqs:
            try:
                out = torch.from_numpy(ray.get(ref).copy())
            except Exception as exc:  # noqa: BLE001 - counted and shown, the traffic goes on
                errors += 1
                show(f"[red]request failed:[/] {exc}")
                continue
            if check and sent % 16 == 0:
                max_err = max(max_err, float((out - gates[layer](x)).abs().max()))
            sent += 1
            tokens += x.shape[0]
        if time.monotonic() - last_print > every_s:
            last_print = time.monotonic()
            show(_load_table(cluster.status(), cfg.num_layers))
    elapsed = time.monotonic() - start
    return {"requests": sent, "tokens": tokens, "errors": errors, "seconds": elapsed,
            "tokens_per_s": tokens / elapsed, "max_abs_diff_vs_in_process": max_err if check else None}


def run_demo(cfg: ClusterConfig, seconds: float = 20.0, tokens_per_request: int = 128,
             concurrency: int = 8) -> dict:
    """A Ray of its own (8 logical CPUs: the default config fits on 2 cores), a cluster, `seconds` of traffic."""
    init_ray(num_cpus=8)
    if not cfg.autoscale_params:  # react within seconds in a 20-second demo (production default: 30 s cooldown)
        cfg = dataclasses.replace(cfg, autoscale_params={"cooldown_s": 4.0, "sustain_checks": 2})
    layers = random_model(cfg)
    console.print(f"[bold]expertray demo[/]: {cfg.num_layers} layers x {cfg.layer.num_experts} experts "
                  f"(top-{cfg.layer.top_k}, d_model {cfg.layer.d_model}) on {cfg.num_expert_actors} expert actors")
    cluster = launch(cfg, layers, detached=False)
    try:
        console.print(f"transport: {cluster.status()['transport']}; autoscaler: {cluster.autoscale(True)}")
        summary = drive(cluster, layers, seconds, 1.2, tokens_per_request, concurrency, check=True)
        status = cluster.status()
        console.print(_load_table(status, cfg.num_layers))
        for event in status["history"]:
            console.print(f"  placement v{event['version']}: {event['reason']}")
        summary["placement_changes"] = len(status["history"])
        console.print(summary)
        return summary
    finally:
        cluster.shutdown()
