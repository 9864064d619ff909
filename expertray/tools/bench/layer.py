"""`expertray bench layer`: the distributed runtime against the in-process layer, side by side.

(a) throughput ratio distributed / in-process for one large call (T tokens), per transport;
(b) p50/p99 latency of a small (16-token) call, and its overhead over in-process;
(c) the router's own decomposition of a call (gate, plan, transport, compute, combine; medians).
The in-process layer runs on the driver with all cores; the cluster's actors share the same cores.
"""

from __future__ import annotations

from pathlib import Path

import ray
import torch
import typer

from expertray.api import init_ray, launch, random_model
from expertray.config import ClusterConfig, GateConfig, MoELayerConfig
from expertray.tools.bench.report import emit, median, quantile, time_ms


def run(tokens: int = 4096, d_model: int = 1024, d_ff: int = 2816, experts: int = 8, top_k: int = 2,
        actors: int = 4, transports: tuple[str, ...] = ("channel", "collective", "object_store"), repeats: int = 5,
        small_tokens: int = 16, small_repeats: int = 200) -> dict:
    init_ray(num_cpus=max(8, actors * 2))
    layer_cfg = MoELayerConfig(d_model=d_model, d_ff=d_ff, gate=GateConfig("mixtral", experts, top_k))
    gen = torch.Generator().manual_seed(0)
    x_big = torch.randn(tokens, d_model, generator=gen)
    x_small = torch.randn(small_tokens, d_model, generator=gen)
    results: dict = {"config": {"tokens": tokens, "d_model": d_model, "d_ff": d_ff, "experts": experts,
                                "top_k": top_k, "actors": actors, "repeats": repeats,
                                "small_tokens": small_tokens, "small_repeats": small_repeats,
                                "driver_threads": torch.get_num_threads()}, "transports": {}}
    base_cfg = ClusterConfig(layer=layer_cfg, num_layers=1, num_expert_actors=actors, max_wait_ms=0.0,
                             actor_num_cpus=0.5, router_num_cpus=1.0)
    layers = random_model(base_cfg)
    with torch.inference_mode():
        t_inproc = time_ms(lambda: layers[0](x_big), repeats)
        s_inproc = time_ms(lambda: layers[0](x_small), small_repeats, warmup=10)
    results["in_process"] = {"big_ms_p50": median(t_inproc), "small_ms_p50": median(s_inproc),
                             "small_ms_p99": quantile(s_inproc, 0.99),
                             "tokens_per_s": tokens / median(t_inproc) * 1e3}
    for transport in transports:
        cfg = ClusterConfig(**{**base_cfg.__dict__, "transport": transport})
        cluster = launch(cfg, layers, detached=False)
        try:
            t_dist = time_ms(lambda c=cluster: c.forward(0, x_big), repeats)
            big_breakdown = cluster.status()["routers"][0]["timing_ms_p50"]
            ray.get(cluster.routers[0].reset_stats.remote())
            s_dist = time_ms(lambda c=cluster: c.forward(0, x_small), small_repeats, warmup=10)
            breakdown = cluster.status()["routers"][0]["timing_ms_p50"]
            err = float((cluster.forward(0, x_big) - layers[0](x_big)).abs().max())
        finally:
            cluster.shutdown()
        results["transports"][transport] = {
            "big_ms_p50": median(t_dist), "tokens_per_s": tokens / median(t_dist) * 1e3,
            "throughput_ratio": median(t_inproc) / median(t_dist),
            "small_ms_p50": median(s_dist), "small_ms_p99": quantile(s_dist, 0.99),
            "small_overhead_ms_p50": median(s_dist) - median(s_inproc),
            "big_call_breakdown_ms_p50": big_breakdown, "small_call_breakdown_ms_p50": breakdown,
            "max_abs_diff": err}
    return results


def cli(tokens: int = 4096, d_model: int = 1024, d_ff: int = 2816, experts: int = 8, top_k: int = 2,
        actors: int = 4, repeats: int = 5, small_repeats: int = 200,
        transport: list[str] = typer.Option(["channel", "collective", "object_store"]),
        as_json: bool = typer.Option(False, "--json"), out: Path | None = None) -> None:
    """Distributed vs in-process: throughput ratio, small-call latency, and per-call decomposition."""
    r = run(tokens, d_model, d_ff, experts, top_k, actors, tuple(transport), repeats, small_repeats=small_repeats)
    ip = r["in_process"]
    rows = [["in_process", ip["big_ms_p50"], 1.0, ip["small_ms_p50"], ip["small_ms_p99"], 0.0]]
    for name, t in r["transports"].items():
        rows.append([name, t["big_ms_p50"], t["throughput_ratio"], t["small_ms_p50"], t["small_ms_p99"],
                     t["small_overhead_ms_p50"]])
    emit("layer", r, rows, ["path", f"{tokens}-tok ms p50", "throughput ratio", "16-tok ms p50",
                            "16-tok ms p99", "16-tok overhead ms"], as_json, out)
