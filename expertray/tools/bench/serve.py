"""`expertray bench serve`: the serving engine under concurrent clients, against transformers on the same cores.

One seeded workload (prompts `--prompt-min`..`--prompt-max` tokens, outputs `--out-min`..`--out-max`, greedy) on a
Qwen3-MoE checkpoint written for the run (4 MoE layers, d 256, 16 experts top-4, vocabulary 32,000), measured side
by side in one run:
- engine: the engine an engine replica runs (expertray.serving), here in the benchmark's process, its MoE layers
  on `--actors` expert actors over the direct path, fed by 1, 4, 8, 16 closed-loop clients (each takes the next
  request when its last one finished); at each concurrency with ping-pong m = 1 and m = `--micro-batches`;
- engine_in_process: the same engine with its MoE layers in this process (no cluster): the engine's own ceiling;
- transformers_sequential (a): `generate` one request after another;
- transformers_static (b): `generate` on batches of `--static-batch` left-padded prompts (the batching limit of
  these cores without a scheduler; a batch runs to its longest output, and only requested tokens are counted).
Both transformers paths run at 1 torch thread and at the machine's count; the faster is the one compared with.
The engine runs at `--engine-threads` (default 1: what an engine replica at a fractional CPU gets from Ray).
Reported: aggregate output tokens/s, TTFT and TPOT p50/p99, the engine's stage times and overlap; ratios
engine@8 / (b), engine@1 / (a), m=default / m=1. Every engine answer is checked against transformers' greedy
tokens for the same prompt.
"""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import ray
import torch
import typer

from expertray.serving.engine import EngineConfig, Event, overlap
from expertray.serving.loader import in_process_runners, load_engine
from expertray.serving.sampling import SamplingParams
from expertray.state.actor_names import NAMESPACE, ray_name
from expertray.tools.bench.latency import QWEN3_TINY
from expertray.tools.bench.report import emit, median, quantile


def workload(n: int, seed: int, prompt: tuple[int, int], out: tuple[int, int], vocab: int) -> list[tuple[list[int], int]]:
    """n (prompt ids, output tokens) pairs, lengths uniform in the given inclusive ranges."""
    g = torch.Generator().manual_seed(seed)
    jobs = []
    for _ in range(n):
        p = int(torch.randint(prompt[0], prompt[1] + 1, (1,), generator=g))
        o = int(torch.randint(out[0], out[1] + 1, (1,), generator=g))
        jobs.append((torch.randint(3, vocab, (p,), generator=g).tolist(), o))
    return jobs


def drive(engine: Any, jobs: list[tuple[list[int], int]], clients: int, timeout_s: float) -> dict[str, Any]:
    """Run `jobs` through `engine` from `clients` closed-loop clients; tokens and timings per job."""
    results: list[dict[str, Any]] = [{} for _ in jobs]
    lock = threading.Lock()
    next_job = iter(range(len(jobs)))

    def one(i: int) -> None:
        prompt, n = jobs[i]
        done = threading.Event()
        rec = results[i]
        rec.update(tokens=[], times=[], start=time.perf_counter())

        def emit_(event: Event) -> None:
            rec["times"].append(time.perf_counter())
            rec["tokens"].extend(event.token_ids)
            if event.error is not None or event.finish_reason is not None:
                rec["error"] = repr(event.error) if event.error else None
                done.set()
        engine.submit(prompt, SamplingParams(max_tokens=n, temperature=0.0), emit_)
        if not done.wait(timeout_s):
            rec["error"] = f"no answer within {timeout_s} s"

    def client() -> None:
        while True:
            with lock:
                i = next(next_job, None)
            if i is None:
                return
            one(i)

    start = time.perf_counter()
    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s * len(jobs))
    wall = time.perf_counter() - start
    ttft = [r["times"][0] - r["start"] for r in results if r.get("times")]
    tpot = [(r["times"][-1] - r["times"][0]) / (len(r["times"]) - 1) for r in results if len(r.get("times", [])) > 1]
    out_tokens = sum(len(r.get("tokens", [])) for r in results)
    return {"clients": clients, "requests": len(jobs), "errors": sum(1 for r in results if r.get("error")),
            "output_tokens": out_tokens, "wall_s": wall, "tokens_per_s": out_tokens / wall,
            "ttft_ms_p50": 1e3 * median(ttft), "ttft_ms_p99": 1e3 * quantile(ttft, 0.99),
            "tpot_ms_p50": 1e3 * median(tpot) if tpot else 0.0, "tpot_ms_p99": 1e3 * quantile(tpot, 0.99) if tpot else 0.0,
            "answers": [r.get("tokens", []) for r in results]}


def transformers_sequential(model: Any, jobs: list[tuple[list[int], int]]) -> tuple[dict[str, Any], list[list[int]]]:
    answers, start = [], time.perf_counter()
    with torch.inference_mode():
        for prompt, n in jobs:
            ids = torch.tensor([prompt])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                                 min_new_tokens=n)
            answers.append(out[0, len(prompt):].tolist())
    wall = time.perf_counter() - start
    tokens = sum(n for _, n in jobs)
    return {"requests": len(jobs), "output_tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall}, answers


def transformers_static(model: Any, jobs: list[tuple[list[int], int]], batch: int) -> dict[str, Any]:
    """Left-padded batches of `batch` prompts; each batch decodes to its longest output; requested tokens count."""
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    start, generated = time.perf_counter(), 0
    with torch.inference_mode():
        for b in range(0, len(jobs), batch):
            group = jobs[b:b + batch]
            width = max(len(p) for p, _ in group)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p, _ in group])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in group])
            longest = max(n for _, n in group)
            model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=longest, min_new_tokens=longest)
            generated += longest * len(group)
    wall = time.perf_counter() - start
    tokens = sum(n for _, n in jobs)
    return {"requests": len(jobs), "batch": batch, "output_tokens": tokens, "generated_tokens": generated,
            "wall_s": wall, "tokens_per_s": tokens / wall}


def run(concurrency: tuple[int, ...] = (1, 4, 8, 16), requests_per_client: int = 2, min_requests: int = 8,
        prompt: tuple[int, int] = (16, 256), out: tuple[int, int] = (32, 128), micro_batches: int = 2,
        actors: int = 2, static_batch: int = 8, seed: int = 0, vocab: int = 32000, timeout_s: float = 600.0,
        engine_threads: int = 1, expert_slowdown: float = 1.0,
        cluster_options: dict[str, Any] | None = None) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    import expertray
    from expertray.models.pretrained import cluster_config
    from expertray.models.synthetic import write_tiny_checkpoint

    shape = {**QWEN3_TINY, "vocab_size": vocab, "max_position_embeddings": 2048}
    default_threads = torch.get_num_threads()
    results: dict[str, Any] = {"config": {"checkpoint": {"family": "qwen3_moe", **shape}, "prompt": list(prompt),
                                          "output": list(out), "micro_batches": micro_batches, "actors": actors,
                                          "seed": seed, "engine_threads": engine_threads,
                                          "machine_threads": torch.get_num_threads()}}
    with tempfile.TemporaryDirectory(prefix="expertray-bench-serve-") as tmp:
        path = str(write_tiny_checkpoint("qwen3_moe", Path(tmp) / "qwen3", overrides=shape, max_shard_size="256MB"))
        reference = AutoModelForCausalLM.from_pretrained(path).eval()
        sets = {c: workload(max(min_requests, requests_per_client * c), seed + c, prompt, out, vocab)
                for c in concurrency}
        base_jobs = sets[8] if 8 in sets else sets[max(concurrency)]
        # transformers at each thread count; its best is what the engine is compared with
        for threads in sorted({1, default_threads}):
            torch.set_num_threads(threads)
            seq, want = transformers_sequential(reference, base_jobs)
            static = transformers_static(reference, base_jobs, static_batch)
            results.setdefault("transformers_by_threads", {})[str(threads)] = {"sequential": seq, "static": static}
        by_threads = results["transformers_by_threads"].values()
        results["transformers_sequential"] = max((b["sequential"] for b in by_threads), key=lambda r: r["tokens_per_s"])
        results["transformers_static"] = max((b["static"] for b in by_threads), key=lambda r: r["tokens_per_s"])
        torch.set_num_threads(engine_threads)
        wants = {id(base_jobs): want}

        def check(jobs: list, answers: list[list[int]]) -> int:
            if id(jobs) not in wants:
                wants[id(jobs)] = transformers_sequential(reference, jobs)[1]
            return sum(a != w for a, w in zip(answers, wants[id(jobs)]))

        def measure(engine: Any, c: int) -> dict[str, Any]:
            drive(engine, sets[c][:2], min(c, 2), timeout_s)  # warm-up
            before = engine.stats()
            got = drive(engine, sets[c], c, timeout_s)
            after = engine.stats()
            got["wrong"] = check(sets[c], got.pop("answers"))
            got["stages"] = {k: round(after[k] - before[k], 4) for k in ("attention_s", "moe_s", "busy_s", "wall_s")}
            got["stages"]["overlap"] = overlap(got["stages"]["busy_s"], got["stages"]["wall_s"])
            return got

        engine = load_engine(path, in_process_runners(EngineConfig().micro_batches), EngineConfig())
        try:
            results["engine_in_process"] = measure(engine, 8 if 8 in sets else max(concurrency))
        finally:
            engine.stop()
        options = {"num_expert_actors": actors, "metrics_port": -1, **(cluster_options or {})}
        from expertray.api import init_ray

        init_ray(num_cpus=8)
        cluster = expertray.launch(cluster_config(path, **options), detached=False)
        default_m = EngineConfig().micro_batches

        def engines(prefix: str, levels: list[int]) -> None:
            for m in sorted({default_m, micro_batches}):
                engine = load_engine(path, lambda d, c, m=m: [cluster.new_direct() for _ in range(m)],
                                     EngineConfig(micro_batches=m), dtype=cluster.cfg.dtype)
                try:
                    results[f"{prefix}m{m}"] = {str(c): measure(engine, c) for c in levels
                                                if m == default_m or c >= 8}
                finally:
                    engine.stop()
                    engine.lanes.shutdown()

        try:
            engines("engine_", list(concurrency))
            if expert_slowdown > 1.0:  # experts whose answers take longer than their CPU time (remote, busy)
                for actor in cluster.table().actors:
                    ray.get(ray.get_actor(ray_name(actor), namespace=NAMESPACE).set_slowdown.remote(expert_slowdown),
                            timeout=30)
                engines(f"slow{expert_slowdown:g}_engine_", [c for c in concurrency if c >= 8])
        finally:
            cluster.shutdown()
    default = results[f"engine_m{EngineConfig().micro_batches}"]
    ratios: dict[str, float] = {}
    if "8" in default:
        ratios["engine_c8_over_static"] = default["8"]["tokens_per_s"] / results["transformers_static"]["tokens_per_s"]
    if "1" in default:
        ratios["engine_c1_over_sequential"] = (default["1"]["tokens_per_s"]
                                               / results["transformers_sequential"]["tokens_per_s"])
    for prefix in ("engine_", f"slow{expert_slowdown:g}_engine_"):
        for c in ("8", "16"):
            pong, ping = results.get(f"{prefix}m{micro_batches}", {}), results.get(f"{prefix}m1", {})
            if micro_batches != 1 and c in pong and c in ping:
                ratios[f"{prefix}pingpong_m{micro_batches}_c{c}_over_m1"] = (pong[c]["tokens_per_s"]
                                                                           / ping[c]["tokens_per_s"])
    results["ratios"] = ratios
    return results


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for key in sorted(k for k in results if k.startswith("engine_m")):
        xs = sorted(int(c) for c in results[key])
        ax.plot(xs, [results[key][str(c)]["tokens_per_s"] for c in xs], marker="o", label=f"expertray {key[7:]}")
    for key, style in (("transformers_static", "--"), ("transformers_sequential", ":")):
        ax.axhline(results[key]["tokens_per_s"], linestyle=style, color="gray", label=key)
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("output tokens/s")
    ax.set_title("bench serve: aggregate decode throughput")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def cli(concurrency: list[int] = typer.Option([1, 4, 8, 16], "--concurrency"),
        requests_per_client: int = typer.Option(2, min=1), micro_batches: int = typer.Option(2, min=1, max=8),
        actors: int = typer.Option(2, min=1), prompt_min: int = typer.Option(16, min=1),
        prompt_max: int = typer.Option(256, min=1), out_min: int = typer.Option(32, min=1),
        out_max: int = typer.Option(128, min=1), static_batch: int = typer.Option(8, min=1),
        seed: int = typer.Option(0), vocab: int = typer.Option(32000, min=16),
        engine_threads: int = typer.Option(1, min=1, help="torch threads of the engine (an engine replica at a "
                                                          "fractional CPU gets 1 from Ray)."),
        expert_slowdown: float = typer.Option(1.0, min=1.0, help="Also measure m=1 and m=--micro-batches at 8+ "
                                              "clients with every expert actor's answers taking this many times "
                                              "its compute (it sleeps the rest: experts on remote or busy "
                                              "devices, where ping-pong has idle time to fill)."),
        plot_path: Path | None = typer.Option(None, "--plot", help="Write a throughput-vs-concurrency PNG here."),
        as_json: bool = typer.Option(False, "--json"), out: Path | None = None) -> None:
    """Aggregate output tokens/s, TTFT and TPOT of the engine at each concurrency, against transformers."""
    if prompt_min > prompt_max or out_min > out_max:
        raise typer.BadParameter("--prompt-min/--out-min must not exceed --prompt-max/--out-max")
    if any(c < 1 for c in concurrency):
        raise typer.BadParameter("--concurrency values must be >= 1")
    r = run(tuple(sorted(set(concurrency))), requests_per_client, 8, (prompt_min, prompt_max), (out_min, out_max),
            micro_batches, actors, static_batch, seed, vocab, engine_threads=engine_threads,
            expert_slowdown=expert_slowdown)
    rows = [["transformers sequential (a)", 1, r["transformers_sequential"]["tokens_per_s"], "-", "-", "-"],
            [f"transformers static batch {static_batch} (b)", static_batch,
             r["transformers_static"]["tokens_per_s"], "-", "-", "-"]]
    ip = r["engine_in_process"]
    rows.append(["engine, MoE in process", ip["clients"], ip["tokens_per_s"], ip["ttft_ms_p50"], ip["tpot_ms_p50"],
                 ip["wrong"]])
    for key in sorted(k for k in r if "engine_m" in k):
        for c, got in r[key].items():
            rows.append([f"{key.replace('_engine_', ' engine ').replace('engine_', 'engine ')} on the cluster", c,
                         got["tokens_per_s"],
                         f"{got['ttft_ms_p50']:.0f} / {got['ttft_ms_p99']:.0f}",
                         f"{got['tpot_ms_p50']:.1f} / {got['tpot_ms_p99']:.1f}", got["wrong"] + got["errors"]])
    rows += [[f"ratio {k}", "-", v, "-", "-", "-"] for k, v in r["ratios"].items()]
    if plot_path is not None:
        plot(r, plot_path)
    emit("serve", r, rows, ["path", "clients", "output tok/s", "TTFT ms p50/p99", "TPOT ms p50/p99",
                            "wrong+errors"], as_json, out)
