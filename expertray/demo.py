"""`expertray demo` / `make demo`: a local single-node Ray cluster serving a multi-layer MoE under skewed,
shifting traffic, with the controller's autoscaler balancing it live. Prints per-expert load as it goes
and checks every answer against the in-process layer."""

from __future__ import annotations

import dataclasses
import time

import ray
import torch
from rich.console import Console
from rich.table import Table

from expertray.api import init_ray, launch, random_model
from expertray.config import ClusterConfig
from expertray.traffic import LogitInverter
from expertray.workload import Workload, WorkloadConfig

console = Console()


def _load_table(status: dict, num_layers: int) -> Table:
    t = Table(title=f"per-expert load (window) — placement v{status['table']['version']}")
    t.add_column("layer")
    t.add_column("balancedness")
    t.add_column("tokens per expert (x replicas)")
    from expertray.placement import PlacementTable

    table = PlacementTable.from_dict(status["table"])
    for layer in range(num_layers):
        load = [sum(r["layers"][layer]["expert_load"][e] for r in status["routers"])
                for e in range(table.num_experts)]
        bal = min(r["layers"][layer]["balancedness"] for r in status["routers"])
        reps = table.replica_counts(layer)
        cells = " ".join(f"{v:.0f}" + (f"x{n}" if n > 1 else "") for v, n in zip(load, reps))
        t.add_row(str(layer), f"{bal:.2f}", cells)
    return t


def run_demo(cfg: ClusterConfig, seconds: float = 20.0, tokens_per_request: int = 128,
             concurrency: int = 8) -> dict:
    init_ray(num_cpus=8)
    if not cfg.autoscale_params:  # react within seconds in a 20-second demo (production default: 30 s cooldown)
        cfg = dataclasses.replace(cfg, autoscale_params={"cooldown_s": 4.0, "sustain_checks": 2})
    layers = random_model(cfg)
    console.print(f"[bold]expertray demo[/]: {cfg.num_layers} layers x {cfg.layer.num_experts} experts "
                  f"(top-{cfg.layer.top_k}, d_model {cfg.layer.d_model}) on {cfg.num_expert_actors} expert actors")
    cluster = launch(cfg, layers, detached=False)
    try:
        console.print(f"transport: {cluster.status()['transport']}; autoscaler: {cluster.autoscale(True)}")
        inverters = [LogitInverter(m.gate_weights.weight) for m in layers]
        work = [Workload(WorkloadConfig(num_experts=cfg.layer.num_experts, tokens_per_batch=tokens_per_request,
                                        zipf_exponent=1.2, hotspot_period=400, seed=layer))
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
                except Exception as exc:  # noqa: BLE001 - counted and shown, the demo goes on
                    errors += 1
                    console.print(f"[red]request failed:[/] {exc}")
                    continue
                if sent % 16 == 0:
                    max_err = max(max_err, float((out - layers[layer](x)).abs().max()))
                sent += 1
                tokens += x.shape[0]
            if time.monotonic() - last_print > 4.0:
                last_print = time.monotonic()
                console.print(_load_table(cluster.status(), cfg.num_layers))
        status = cluster.status()
        console.print(_load_table(status, cfg.num_layers))
        elapsed = time.monotonic() - start
        for event in status["history"]:
            console.print(f"  placement v{event['version']}: {event['reason']}")
        summary = {"requests": sent, "tokens": tokens, "errors": errors, "seconds": elapsed,
                   "tokens_per_s": tokens / elapsed, "max_abs_diff_vs_in_process": max_err,
                   "placement_changes": len(status["history"])}
        console.print(summary)
        return summary
    finally:
        cluster.shutdown()
