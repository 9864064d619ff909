"""`expertray bench latency`: one MoE layer's round trip, per path, side by side in one run.

Paths, each at 1, 16 and 256 tokens, for tiny experts (d 256, d_ff 256, 16 experts top-4) and medium ones
(d 1024, d_ff 2816, 8 experts top-2) on 2 expert actors:
- in_process: the reference layer in this process (the floor with no distribution at all);
- router/<transport>: `Cluster.forward` — a Ray call to the router, which batches, routes and exchanges
  rows with the actors over `transport` (object_store: a Ray call per busy actor; collective: all-to-all
  plus a Ray call per actor; channel: standing TCP channels, no Ray task);
- direct: `Cluster.direct().forward` — this process routes its own tokens and speaks to the actors over
  standing channels (no router hop, no Ray task);
- compiled_graph: the floor Ray itself offers for a standing pipeline, driver → router → 2 experts → router →
  driver as a Ray compiled graph (`experimental_compile`, shared-memory channels), 1 token of width d.
Then `generate`: greedy decode of a tiny Qwen3-MoE checkpoint (4 MoE layers, 16 experts top-4, d 256; vocabulary
`--gen-vocab`, default 32,000) through
the cluster (direct, and the router path) against transformers in this process, tokens/s, single stream.
Every distributed answer is checked against the in-process layer (max |diff|) and generation's tokens
against transformers' own.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
import typer

from expertray.api import init_ray, launch, random_model
from expertray.config import ClusterConfig, GateConfig, MoELayerConfig
from expertray.tools.bench.report import emit, median, quantile, time_ms

SIZES = {"tiny": (256, 256, 16, 4), "medium": (1024, 2816, 8, 2)}  # d_model, d_ff, experts, top_k
# the tiny decoder of `generate`: 4 MoE layers, d 256, 16 experts top-4; the vocabulary is a parameter (a
# Llama-2 / Mixtral-sized 32,000 by default: the LM head is part of every decode step's cost)
QWEN3_TINY = {"hidden_size": 256, "num_hidden_layers": 4, "num_experts": 16, "num_experts_per_tok": 4,
              "moe_intermediate_size": 256, "intermediate_size": 512, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 64}


def _stats(ms: list[float], inproc: list[float] | None) -> dict[str, float]:
    out = {"p50_ms": median(ms), "p99_ms": quantile(ms, 0.99)}
    if inproc is not None:
        out["overhead_ms_p50"] = median(ms) - median(inproc)
    return out


def compiled_graph_floor(d_model: int, repeats: int) -> list[float]:
    """driver → router → 2 experts → router → driver as a Ray compiled graph, 1 row of width d_model."""
    from ray.dag import InputNode

    @ray.remote(num_cpus=0.1)
    class Stage:
        def split(self, x: np.ndarray) -> np.ndarray:
            return x

        def compute(self, x: np.ndarray) -> np.ndarray:
            return x * 2

        def combine(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
            return a + b

    router, e1, e2 = Stage.remote(), Stage.remote(), Stage.remote()
    with InputNode() as inp:
        s = router.split.bind(inp)
        dag = router.combine.bind(e1.compute.bind(s), e2.compute.bind(s)).experimental_compile()
    x = np.zeros((1, d_model), np.float32)
    try:
        return time_ms(lambda: ray.get(dag.execute(x)), repeats, warmup=20)
    finally:
        dag.teardown()
        for a in (router, e1, e2):
            ray.kill(a)


def layer_paths(size: str, token_counts: tuple[int, ...], transports: tuple[str, ...], repeats: int,
                actors: int) -> dict[str, Any]:
    d, f, e, k = SIZES[size]
    cfg = ClusterConfig(layer=MoELayerConfig(d_model=d, d_ff=f, gate=GateConfig("mixtral", e, k)), num_layers=1,
                        num_expert_actors=actors, max_wait_ms=0.0, metrics_port=-1)
    layers = random_model(cfg)
    gen = torch.Generator().manual_seed(0)
    xs = {t: torch.randn(t, d, generator=gen) for t in token_counts}
    out: dict[str, Any] = {"config": {"d_model": d, "d_ff": f, "experts": e, "top_k": k, "actors": actors},
                           "paths": {}}
    with torch.inference_mode():
        inproc = {t: time_ms(lambda x=x: layers[0](x), repeats, warmup=10) for t, x in xs.items()}
    out["paths"]["in_process"] = {t: _stats(inproc[t], None) for t in token_counts}
    for transport in transports:
        cluster = launch(ClusterConfig(**{**cfg.__dict__, "transport": transport}), layers, detached=False)
        try:
            paths = {f"router/{transport}": cluster.forward}
            if transport == "channel":
                paths["direct"] = cluster.direct().forward
            for name, forward in paths.items():
                row: dict[Any, Any] = {}
                for t, x in xs.items():
                    row[t] = _stats(time_ms(lambda x=x, fw=forward: fw(0, x), repeats, warmup=10), inproc[t])
                    row[t]["max_abs_diff"] = float((forward(0, x) - layers[0](x)).abs().max())
                out["paths"][name] = row
        finally:
            cluster.shutdown()
    return out


def generation(max_new_tokens: int, repeats: int, actors: int, vocab: int = 32000) -> dict[str, Any]:
    """Single-stream greedy decode tokens/s: transformers in this process vs the cluster (direct, router)."""
    import expertray
    from expertray.models.synthetic import write_tiny_checkpoint

    with tempfile.TemporaryDirectory(prefix="expertray-bench-") as tmp:
        shape = {**QWEN3_TINY, "vocab_size": vocab}
        path = write_tiny_checkpoint("qwen3_moe", Path(tmp) / "qwen3", overrides=shape, max_shard_size="256MB")
        from transformers import AutoModelForCausalLM

        prompt = torch.tensor([[5, 17, 42, 7, 99, 3, 250, 11]])
        mask = torch.ones_like(prompt)

        def decode(model: Any) -> tuple[list[float], list[int]]:
            with torch.no_grad():
                times = time_ms(lambda: model.generate(prompt, attention_mask=mask, do_sample=False,
                                                       max_new_tokens=max_new_tokens), repeats, warmup=1)
                ids = model.generate(prompt, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens)
            return times, ids[0, prompt.shape[1]:].tolist()

        reference = AutoModelForCausalLM.from_pretrained(path).eval()
        t_ref, ids_ref = decode(reference)
        result: dict[str, Any] = {"checkpoint": {"family": "qwen3_moe", **shape},
                                  "max_new_tokens": max_new_tokens, "repeats": repeats,
                                  "transformers": {"tokens_per_s": max_new_tokens / median(t_ref) * 1e3}}
        for client_path in ("direct", "router"):
            model, cluster = expertray.from_pretrained(str(path), num_expert_actors=actors, client_path=client_path,
                                                       max_wait_ms=0.0, metrics_port=-1)
            try:
                times, ids = decode(model.eval())
            finally:
                cluster.shutdown()
            tps = max_new_tokens / median(times) * 1e3
            result[client_path] = {"tokens_per_s": tps, "ratio": tps / result["transformers"]["tokens_per_s"],
                                   "same_tokens": ids == ids_ref}
    return result


def run(token_counts: tuple[int, ...] = (1, 16, 256), sizes: tuple[str, ...] = ("tiny", "medium"),
        transports: tuple[str, ...] = ("object_store", "collective", "channel"), repeats: int = 200,
        actors: int = 2, gen_tokens: int = 32, gen_repeats: int = 3, gen_vocab: int = 32000) -> dict[str, Any]:
    init_ray(num_cpus=8)
    results: dict[str, Any] = {"config": {"token_counts": list(token_counts), "repeats": repeats,
                                          "driver_threads": torch.get_num_threads()}, "sizes": {}}
    results["compiled_graph"] = _stats(compiled_graph_floor(SIZES["tiny"][0], repeats), None)
    for size in sizes:
        results["sizes"][size] = layer_paths(size, token_counts, transports, repeats, actors)
    if gen_tokens > 0:
        results["generate"] = generation(gen_tokens, gen_repeats, actors, gen_vocab)
    return results


def cli(tokens: list[int] = typer.Option([1, 16, 256], "--tokens"),
        size: list[str] = typer.Option(["tiny", "medium"], "--size", help=f"Of {sorted(SIZES)}."),
        transport: list[str] = typer.Option(["object_store", "collective", "channel"], "--transport"),
        repeats: int = typer.Option(200, min=5), actors: int = typer.Option(2, min=1),
        gen_tokens: int = typer.Option(32, "--gen-tokens", min=0, help="0: skip the generate comparison."),
        gen_vocab: int = typer.Option(32000, "--gen-vocab", min=16, help="Vocabulary of the generate model."),
        as_json: bool = typer.Option(False, "--json"), out: Path | None = None) -> None:
    """Per-layer round trip p50/p99 per path and token count, against in-process and a compiled graph; and
    generate tokens/s against transformers."""
    bad = [s for s in size if s not in SIZES]
    if bad:
        raise typer.BadParameter(f"unknown size {bad[0]!r} (known: {', '.join(SIZES)})")
    r = run(tuple(tokens), tuple(size), tuple(transport), repeats, actors, gen_tokens, gen_vocab=gen_vocab)
    rows = [["compiled_graph (1 tok, floor)", "-", r["compiled_graph"]["p50_ms"], r["compiled_graph"]["p99_ms"], "-"]]
    for s, block in r["sizes"].items():
        for name, per in block["paths"].items():
            for t, st in per.items():
                rows.append([f"{s} {name}", t, st["p50_ms"], st["p99_ms"], st.get("overhead_ms_p50", "-")])
    if "generate" in r:
        g = r["generate"]
        for name in ("transformers", "direct", "router"):
            rows.append([f"generate {name} (tokens/s)", g["max_new_tokens"], g[name]["tokens_per_s"],
                         g[name].get("ratio", 1.0), g[name].get("same_tokens", "-")])
    emit("latency", r, rows, ["path", "tokens", "p50 ms (tok/s)", "p99 ms (ratio)", "overhead ms (same)"],
         as_json, out)
