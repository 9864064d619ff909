"""Skewed traffic against a cluster with the autoscaler on: balancedness and replica counts over time, as a PNG.

Each layer gets Zipf-skewed routing (hot experts rotate every --hotspot-period requests) from
expertray.tools.workload; LogitInverter turns the target router logits into hidden states the layer's gate routes
exactly that way. The script samples `cluster.status()` every --sample-s seconds: per layer, balancedness
(mean / max tokens per actor over the routers' window; 1.0 is perfect) and the number of physical replicas,
and plots both against time. Every 8th answer is checked against the in-process layer.

    python examples/skewed_autoscaling.py [--seconds 30 --zipf 1.2 --out skewed_autoscaling.png] [--no-autoscale]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import matplotlib
import ray
import torch

from expertray.api import init_ray, launch, random_model
from expertray.config import ClusterConfig, GateConfig, MoELayerConfig
from expertray.state.placement_table import PlacementTable
from expertray.tools.hidden_from_logits import LogitInverter
from expertray.tools.workload import Workload, WorkloadConfig

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=30.0, help="how long to send traffic")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--d-model", type=int, default=64, help="must be >= --experts (logit inversion)")
    p.add_argument("--actors", type=int, default=4, help="expert actors at start")
    p.add_argument("--tokens", type=int, default=128, help="tokens per request")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight per round")
    p.add_argument("--zipf", type=float, default=1.2, help="Zipf exponent of expert popularity (0 = uniform)")
    p.add_argument("--hotspot-period", type=int, default=0, help="rotate the hot experts every N requests (0 = never)")
    p.add_argument("--sample-s", type=float, default=1.0, help="seconds between status samples")
    p.add_argument("--autoscale", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--out", type=Path, default=Path("skewed_autoscaling.png"))
    p.add_argument("--num-cpus", type=int, default=8, help="logical CPUs if this script starts Ray")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def sample(status: dict[str, Any], t_s: float) -> list[dict[str, Any]]:
    """One row per layer: worst balancedness over the routers, physical replicas, expert actors."""
    table = PlacementTable.from_dict(status["table"])
    return [{"t_s": t_s, "layer": layer,
             "balancedness": min(r["layers"][layer]["balancedness"] for r in status["routers"]),
             "replicas": sum(table.replica_counts(layer)), "actors": len(table.actors),
             "version": table.version} for layer in range(table.num_layers)]


def plot(rows: list[dict[str, Any]], num_layers: int, path: Path, title: str) -> None:
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(8, 6))
    for layer in range(num_layers):
        mine = [r for r in rows if r["layer"] == layer]
        t = [r["t_s"] for r in mine]
        top.plot(t, [r["balancedness"] for r in mine], marker=".", label=f"layer {layer}")
        # thinner and dashed per layer, so equal replica counts stay visible on top of each other
        bottom.step(t, [r["replicas"] for r in mine], where="post", label=f"layer {layer} replicas",
                    linewidth=max(1.0, 4.0 - 1.5 * layer), linestyle=("-", "--", ":", "-.")[layer % 4])
    per_time = {r["t_s"]: r["actors"] for r in rows}
    bottom.step(list(per_time), list(per_time.values()), where="post", linestyle="--", color="k",
                label="expert actors")
    top.set_ylabel("balancedness (mean/max per actor)")
    top.set_ylim(0, 1.05)
    top.legend()
    bottom.set_ylabel("count")
    bottom.set_xlabel("seconds since traffic started")
    bottom.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    cfg = ClusterConfig(layer=MoELayerConfig(d_model=args.d_model, d_ff=2 * args.d_model,
                                             gate=GateConfig("mixtral", args.experts, args.top_k)),
                        num_layers=args.layers, num_expert_actors=args.actors, actor_num_cpus=0.25,
                        router_num_cpus=0.25, metrics_port=-1, seed=args.seed)
    layers = random_model(cfg)
    inverters = [LogitInverter(m.gate_weights.weight) for m in layers]
    work = [Workload(WorkloadConfig(num_experts=args.experts, tokens_per_batch=args.tokens, zipf_exponent=args.zipf,
                                    hotspot_period=args.hotspot_period, seed=args.seed + layer))
            for layer in range(args.layers)]
    init_ray(num_cpus=args.num_cpus)
    cluster = launch(cfg, layers, detached=False)
    rows: list[dict[str, Any]] = []
    sent = errors = 0
    max_diff = 0.0
    try:
        if args.autoscale:
            print(f"autoscaler: {cluster.autoscale(True)}")
        start = last_sample = time.monotonic()
        i = 0
        while time.monotonic() - start < args.seconds:
            reqs = []
            for _ in range(args.concurrency):
                layer = i % args.layers
                x = inverters[layer].hidden(work[layer].batch(i // args.layers).logits, seed=i)
                reqs.append((layer, x, cluster.forward_ref(layer, x)))
                i += 1
            for layer, x, ref in reqs:
                try:
                    out = torch.from_numpy(ray.get(ref).copy())
                except Exception as exc:  # noqa: BLE001 - counted and reported; the run goes on
                    errors += 1
                    print(f"request failed: {type(exc).__name__}: {exc}")
                    continue
                if sent % 8 == 0:
                    max_diff = max(max_diff, float((out - layers[layer](x)).abs().max()))
                sent += 1
            if time.monotonic() - last_sample >= args.sample_s:
                last_sample = time.monotonic()
                rows += sample(cluster.status(), last_sample - start)
                print("  ".join(f"t={r['t_s']:5.1f}s L{r['layer']} bal={r['balancedness']:.2f} "
                                f"replicas={r['replicas']} actors={r['actors']}" for r in rows[-args.layers:]))
        history = cluster.status()["history"]
    finally:
        cluster.shutdown()
    title = (f"zipf {args.zipf}, {args.experts} experts top-{args.top_k}, "
             f"autoscaler {'on' if args.autoscale else 'off'}")
    plot(rows, args.layers, args.out, title)
    for event in history:
        print(f"placement v{event['version']}: {event['reason']}")
    first = {r["layer"]: r["balancedness"] for r in reversed(rows)}
    last = {r["layer"]: r["balancedness"] for r in rows}
    summary = {"requests": sent, "errors": errors, "max_abs_diff": max_diff, "samples": len(rows) // args.layers,
               "placement_changes": len(history), "first_balancedness": first, "last_balancedness": last,
               "rows": rows, "plot": str(args.out)}
    print(f"{sent} requests, {errors} errors, max abs diff vs in-process {max_diff:.1e}, "
          f"{len(history)} placement changes; balancedness first {first} last {last}; plot: {args.out}")
    return summary


if __name__ == "__main__":
    main()
