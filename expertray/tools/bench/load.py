"""`expertray bench load`: serving a checkpoint with weights loaded where they live.

The bench writes its own synthetic Mixtral-layout checkpoint (per-expert w1/w3/w2 tensors, bf16, sharded
with an index; MoE tensors only: `launch` reads nothing else) at two sizes that differ only in d_ff, then
for each size launches a cluster from it in a fresh driver process and measures:
- peak RSS (VmHWM from /proc/<pid>/status) of the driver, the controller, each router and each expert actor;
  an expert actor's against the bytes of the slots it holds (and its growth over the empty actor);
- time from `launch` to the first answer, and the actors' own checkpoint-read time, as bytes/s against
  reading the same shards with safetensors' `load_file` in one process (also a fresh process; both read
  from a warm page cache: the files were just written);
- bytes per token on the wire (driver → router, router → expert actors) and 4096-token layer throughput,
  served in bfloat16 and, on the small checkpoint, in float32 side by side.
Each measurement runs in its own process so no peak is inherited from writing the checkpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import typer

from expertray.tools.bench.report import emit, median, time_ms

SHARD_BYTES = 256 << 20


def write_checkpoint(path: Path, d_model: int, d_ff: int, experts: int, layers: int, top_k: int = 2,
                     dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> int:
    """A Mixtral-layout checkpoint of MoE tensors only at `path`, sharded (≤ SHARD_BYTES per shard) with
    model.safetensors.index.json; returns the routed experts' bytes. Writes one shard at a time."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    config = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": d_model,
              "intermediate_size": d_ff, "num_local_experts": experts, "num_experts_per_tok": top_k,
              "num_hidden_layers": layers, "num_attention_heads": 8, "num_key_value_heads": 8,
              "vocab_size": 128, "torch_dtype": str(dtype).removeprefix("torch.")}
    (path / "config.json").write_text(json.dumps(config))
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    nbytes, expert_bytes, shards = 0, 0, 0

    def flush() -> None:
        nonlocal shard, nbytes, shards
        if shard:
            name = f"model-{shards:05d}.safetensors"
            save_file(shard, str(path / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
            shard, nbytes, shards = {}, 0, shards + 1

    def add(name: str, shape: tuple[int, int]) -> None:
        nonlocal nbytes
        t = (torch.randn(shape, generator=g) * shape[1] ** -0.5).to(dtype)
        if nbytes + t.numel() * t.element_size() > SHARD_BYTES:
            flush()
        shard[name] = t
        nbytes += t.numel() * t.element_size()

    for layer in range(layers):
        p = f"model.layers.{layer}.block_sparse_moe"
        add(f"{p}.gate.weight", (experts, d_model))
        for e in range(experts):
            for proj, shape in (("w1", (d_ff, d_model)), ("w3", (d_ff, d_model)), ("w2", (d_model, d_ff))):
                add(f"{p}.experts.{e}.{proj}.weight", shape)
                expert_bytes += shape[0] * shape[1] * torch.empty(0, dtype=dtype).element_size()
    flush()
    total = sum((path / f).stat().st_size for f in set(weight_map.values()))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}))
    return expert_bytes


def _peak_kib(pid: int) -> int:
    """VmHWM (peak resident set, KiB) of a process on this node."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/{pid}/status has no VmHWM")


def read_baseline(path: str, repeats: int = 3) -> dict[str, float]:
    """In this process, alternately: read every shard of `path` with safetensors' load_file, copying each
    tensor into memory of its own and keeping it (load_file's tensors are lazy views of the mmap), and
    read every
    expert slot with expertray's reader (runtime.weights.read_slots, what an expert actor runs). Median
    seconds of each over `repeats`, and the bytes each read."""
    from safetensors.torch import load_file

    from expertray.layer.slots import SlotStore
    from expertray.models.files import describe
    from expertray.models.source import WeightSource
    from expertray.runtime.weights import read_slots

    files = sorted(Path(path).glob("*.safetensors"))
    source = WeightSource(describe(path), "auto")
    cfg = source.layer_config
    keys = [(layer, e) for layer in range(source.num_layers) for e in range(cfg.num_experts)]
    safetensors_s, reader_s = [], []
    nbytes = 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        held = [t.clone() for f in files for t in load_file(str(f)).values()]  # kept, as slots are
        safetensors_s.append(time.perf_counter() - t0)
        nbytes = sum(t.numel() * t.element_size() for t in held)
        del held
        t0 = time.perf_counter()
        store = SlotStore("bench", torch.device("cpu"), source.dtype, layer_cfg=cfg)
        read_slots(source, keys, store, 64 << 20)
        reader_s.append(time.perf_counter() - t0)
        slot_bytes = store.nbytes()
        del store
    return {"seconds": median(safetensors_s), "bytes": nbytes, "reader_seconds": median(reader_s),
            "reader_bytes": slot_bytes}


def serve_once(path: str, dtype: str, actors: int, tokens: int, repeats: int) -> dict[str, Any]:
    """In a fresh driver process: launch a cluster serving `path`, time launch → first answer and `tokens`-token
    calls, then collect every process's peak RSS, slot bytes and wire bytes."""
    import ray

    from expertray.api import _wire, init_ray, launch
    from expertray.config import ClusterConfig

    init_ray(num_cpus=2 * actors + 2)
    cfg = ClusterConfig(model=path, dtype=dtype, num_expert_actors=actors, actor_num_cpus=1.0, router_num_cpus=1.0,
                        max_wait_ms=0.0, control_timeout_s=600.0, request_timeout_s=600.0, metrics_port=-1)
    t0 = time.perf_counter()
    cluster = launch(cfg, detached=False)
    launch_s = time.perf_counter() - t0
    try:
        D, wdtype = cluster.cfg.layer.d_model, getattr(torch, cluster.cfg.dtype)
        cluster.forward(0, torch.randn(1, D).to(wdtype))
        first_s = time.perf_counter() - t0
        after_load = cluster.status()["actors"]  # peaks before any large batch: loading alone
        x = torch.randn(tokens, D, generator=torch.Generator().manual_seed(1)).to(wdtype)
        calls = time_ms(lambda: cluster.forward(0, x), repeats)
        status = cluster.status()
        info = ray.get(cluster.controller.info.remote())
        routers = status["routers"]
        sent = sum(sum(r["bytes_out"].values()) for r in routers)
        routed_tokens = sum(r["tokens"] for r in routers)
        actors_out = {a: {"peak_rss_bytes": _peak_kib(s["pid"]) * 1024, "slot_bytes": s["memory_bytes"],
                          "peak_rss_after_load_bytes": after_load[a]["peak_rss_kib"] * 1024,
                          "empty_rss_bytes": s["empty_rss_kib"] * 1024, "checkpoint_load_s": s["checkpoint_load_s"]}
                      for a, s in status["actors"].items()}
        result = {
            "dtype": cluster.cfg.dtype, "launch_s": launch_s, "launch_to_first_answer_s": first_s,
            "driver_peak_rss_bytes": _peak_kib(os.getpid()) * 1024,
            "controller_peak_rss_bytes": _peak_kib(info["pid"]) * 1024,
            "controller_expert_bytes_held": info["expert_bytes_held"],
            "router_peak_rss_bytes": [_peak_kib(r["pid"]) * 1024 for r in routers],
            "actors": actors_out,
            "wire_bytes_per_token_driver_to_router": _wire(x)[0].nbytes / tokens,
            "wire_bytes_per_token_router_to_actors": sent / routed_tokens,
            "layer_ms_p50": median(calls), "layer_tokens_per_s": tokens / median(calls) * 1e3,
        }
    finally:
        cluster.shutdown()
        ray.shutdown()
    return result


def _in_subprocess(fn: str, **kwargs: Any) -> dict[str, Any]:
    """Run `fn(**kwargs)` of this module in a fresh Python process; its JSON result."""
    code = (f"import json, sys; from expertray.tools.bench import load; "
            f"print('RESULT ' + json.dumps(load.{fn}(**json.loads(sys.argv[1]))))")
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(kwargs)], capture_output=True, text=True,
                          env=env, timeout=1800)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"bench load: {fn} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def run(d_model: int = 1024, small_d_ff: int = 512, large_d_ff: int = 5376, experts: int = 8, layers: int = 4,
        actors: int = 2, tokens: int = 4096, repeats: int = 3, workdir: str | None = None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(dir=workdir, prefix="expertray-bench-load-") as tmp:
        sizes: dict[str, Any] = {}
        for name, d_ff in (("small", small_d_ff), ("large", large_d_ff)):
            path = Path(tmp) / name
            expert_bytes = write_checkpoint(path, d_model, d_ff, experts, layers)
            disk = sum(f.stat().st_size for f in path.glob("*.safetensors"))
            baseline = _in_subprocess("read_baseline", path=str(path))
            served = _in_subprocess("serve_once", path=str(path), dtype="bfloat16", actors=actors, tokens=tokens,
                                    repeats=repeats)
            slowest_load = max(a["checkpoint_load_s"] for a in served["actors"].values())
            baseline_bps = baseline["bytes"] / baseline["seconds"]
            reader_bps = baseline["reader_bytes"] / baseline["reader_seconds"]
            sizes[name] = {"d_ff": d_ff, "disk_bytes": disk, "expert_bytes": expert_bytes,
                           "safetensors_one_process": {**baseline, "bytes_per_s": baseline_bps,
                                                       "reader_bytes_per_s": reader_bps},
                           "reader_over_safetensors": reader_bps / baseline_bps,
                           "actor_load_bytes_per_s": expert_bytes / slowest_load,
                           "actor_load_over_baseline": expert_bytes / slowest_load / baseline_bps,
                           "launch_to_first_answer_bytes_per_s": expert_bytes / served["launch_to_first_answer_s"],
                           "launch_over_baseline": expert_bytes / served["launch_to_first_answer_s"] / baseline_bps,
                           **served}
            if name == "small":
                sizes["small_fp32"] = _in_subprocess("serve_once", path=str(path), dtype="float32", actors=actors,
                                                     tokens=tokens, repeats=repeats)
    small, large = sizes["small"], sizes["large"]
    flat = {k: large[k] / small[k] for k in ("driver_peak_rss_bytes", "controller_peak_rss_bytes")}
    flat["router_peak_rss_bytes"] = max(large["router_peak_rss_bytes"]) / max(small["router_peak_rss_bytes"])
    def per_actor(n: str, key: str, minus_empty: bool) -> dict[str, float]:
        return {a: (s[key] - (s["empty_rss_bytes"] if minus_empty else 0)) / s["slot_bytes"]
                for a, s in sizes[n]["actors"].items()}

    actor_ratio = {n: {"after_load": per_actor(n, "peak_rss_after_load_bytes", False),
                       "after_traffic": per_actor(n, "peak_rss_bytes", False)} for n in ("small", "large")}
    actor_growth = {n: {"after_load": per_actor(n, "peak_rss_after_load_bytes", True),
                        "after_traffic": per_actor(n, "peak_rss_bytes", True)} for n in ("small", "large")}
    fp32 = sizes["small_fp32"]
    # launch → first answer has a fixed part (starting Ray processes) whatever the size; the extra time the
    # large checkpoint takes over the small one is what its extra bytes cost
    extra_s = large["launch_to_first_answer_s"] - small["launch_to_first_answer_s"]
    extra_bytes = large["expert_bytes"] - small["expert_bytes"]
    marginal = extra_bytes / extra_s if extra_s > 0 else float("inf")
    return {"config": {"d_model": d_model, "experts": experts, "layers": layers, "actors": actors, "tokens": tokens,
                       "repeats": repeats, "family": "mixtral (per-expert tensors)", "checkpoint_dtype": "bfloat16"},
            "sizes": sizes, "size_ratio": large["disk_bytes"] / small["disk_bytes"],
            "launch_marginal_bytes_per_s": marginal,
            "launch_marginal_over_baseline": marginal / large["safetensors_one_process"]["bytes_per_s"],
            "peak_rss_large_over_small": flat,
            "actor_peak_rss_over_slot_bytes": actor_ratio,
            "actor_peak_rss_growth_over_slot_bytes": actor_growth,
            "wire_bf16_over_fp32": {
                "driver_to_router": small["wire_bytes_per_token_driver_to_router"]
                / fp32["wire_bytes_per_token_driver_to_router"],
                "router_to_actors": small["wire_bytes_per_token_router_to_actors"]
                / fp32["wire_bytes_per_token_router_to_actors"]},
            "layer_tokens_per_s": {"bf16": small["layer_tokens_per_s"], "fp32": fp32["layer_tokens_per_s"]}}


def cli(d_model: int = 1024, small_d_ff: int = 512, large_d_ff: int = 5376, experts: int = 8, layers: int = 4,
        actors: int = 2, tokens: int = 4096, repeats: int = 3, workdir: str | None = None,
        as_json: bool = typer.Option(False, "--json"), out: Path | None = None) -> None:
    """Checkpoint loading: peak RSS per process across two checkpoint sizes, load throughput vs safetensors,
    bf16 vs fp32 wire bytes and layer throughput."""
    r = run(d_model, small_d_ff, large_d_ff, experts, layers, actors, tokens, repeats, workdir)
    rows: list[list[Any]] = [["checkpoint size ratio large/small", r["size_ratio"]]]
    for k, v in r["peak_rss_large_over_small"].items():
        rows.append([f"{k} large/small", v])
    for n in ("small", "large"):
        s = r["sizes"][n]
        rows += [[f"{n}: disk GB", s["disk_bytes"] / 1e9], [f"{n}: launch → first answer s", s["launch_to_first_answer_s"]],
                 [f"{n}: expertray reader / safetensors throughput, one process",
                  s["reader_over_safetensors"]],
                 [f"{n}: cluster actors' load (all actors) / safetensors throughput", s["actor_load_over_baseline"]],
                 [f"{n}: launch / safetensors throughput", s["launch_over_baseline"]],
                 [f"{n}: max actor peak RSS / slot bytes (after load)",
                  max(r["actor_peak_rss_over_slot_bytes"][n]["after_load"].values())],
                 [f"{n}: max actor RSS growth over empty / slot bytes (after load)",
                  max(r["actor_peak_rss_growth_over_slot_bytes"][n]["after_load"].values())],
                 [f"{n}: max actor RSS growth over empty / slot bytes (after {tokens}-token calls)",
                  max(r["actor_peak_rss_growth_over_slot_bytes"][n]["after_traffic"].values())]]
    rows.append(["launch: extra bytes / extra time vs safetensors", r["launch_marginal_over_baseline"]])
    rows += [[f"wire bf16/fp32 {k}", v] for k, v in r["wire_bf16_over_fp32"].items()]
    rows += [[f"{tokens}-token layer tokens/s {k}", v] for k, v in r["layer_tokens_per_s"].items()]
    emit("load", r, rows, ["measure", "value"], as_json, out)
