"""`expertray bench gpu`: the device data path of one MoE layer, every figure measured side by side.

For a Mixtral-like layer (d 4096, ff 14336, E 8, k 2) and a DeepSeek-V3-like one (d 7168, ff 2048, k 8,
as many of its 256 experts as fit in half the device memory), at prefill (4096 tokens) and decode
(128 tokens), on one device:
- expert compute (grouped GEMM and per-expert loop) in TFLOP/s, as a fraction of one plain matmul of the
  same FLOPs ([N, D] @ [D, 3F]);
- at decode, bytes of the active experts' weights read per second, as a fraction of a device-to-device
  copy of the same bytes;
- router work on the device (gate + plan + permute, then combine) against expert compute, and where it
  goes: each stage of the router's `prepare` (gate GEMM, the family's selection, routing policy with and
  without capacity, replica selection, plan, permute, expert counts) and `finish` (combine and its two
  steps, the shared expert) timed alone with device events, plus the host synchronisations one whole
  `pipeline.prepare` makes (CUDA's sync debug mode, counted);
- an alternative expert path measured beside the others: padded batched GEMMs (`padded_bmm_swiglu`);
- which path the actors' rule (`prefer_grouped`) would pick, and whether it is the faster one measured.
Medians over repeats; every timed call ends with a device synchronize. Needs no Ray. On a CPU the same
command runs with small shapes (`--small`, the default there) so CI exercises it.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import typer

from expertray.config import CapacityConfig, GateConfig, MoELayerConfig
from expertray.layer import route as pipeline
from expertray.layer.dispatch import build_plan, combine, permute
from expertray.layer.experts import SharedExpert, expert_path, grouped_mm_fast, padded_rows, slots_swiglu
from expertray.layer.gating import GateWeights, gate, gating_rule, router_logits
from expertray.policies.replica import REPLICA
from expertray.policies.routing import ROUTING
from expertray.state.placement_table import PlacementTable
from expertray.tools.bench.report import emit, median
from expertray.wire.devices import DEVICE_ENV, resolve_device, synchronize

GOALS = {"prefill_matmul_fraction": 0.6, "decode_copy_fraction": 0.5, "router_over_compute_prefill": 0.10}


@dataclass(frozen=True)
class Shape:
    name: str
    d_model: int
    d_ff: int
    num_experts: int
    top_k: int
    family: str = "mixtral"
    num_groups: int = 1
    topk_groups: int = 1


FULL = [Shape("mixtral", 4096, 14336, 8, 2), Shape("deepseek_v3", 7168, 2048, 256, 8, "deepseek_v3", 8, 4)]
SMALL = [Shape("mixtral", 64, 224, 8, 2), Shape("deepseek_v3", 112, 32, 32, 8, "deepseek_v3", 8, 4)]
FULL_TOKENS = {"prefill": 4096, "decode": 128}
SMALL_TOKENS = {"prefill": 256, "decode": 16}


def timed(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Median wall time of fn() in ms, each run fenced by device synchronizes."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        out.append((time.perf_counter() - t0) * 1e3)
    return median(out)


def device_ms(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median device time of fn() in ms between two CUDA events around it (the wall time of `timed`
    elsewhere): what one stage costs on the stream, without the fences' launch gaps."""
    if device.type != "cuda":
        return timed(fn, device, repeats, warmup)
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end))
    return median(out)


def host_syncs(fn: Callable[[], Any], device: torch.device) -> int | None:
    """Host synchronisations one fn() call makes on CUDA (sync debug mode's warnings, counted); None
    elsewhere."""
    if device.type != "cuda":
        return None
    synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum(1 for w in caught if "synchroniz" in str(w.message).lower())


def router_stages(shape: Shape, cfg: GateConfig, gw: GateWeights, hidden: torch.Tensor, experts: int,
                  device: torch.device, dtype: torch.dtype, repeats: int) -> dict[str, Any]:
    """Each stage of the router's prepare and finish timed alone on its real inputs (device events), the
    whole `pipeline.prepare` (dropless top-k routing, round-robin replicas over 4 actors), and its host
    synchronisations."""
    T, D = hidden.shape
    actors = min(4, experts)
    route = PlacementTable.balanced(1, experts, [f"a{i}" for i in range(actors)]).route(0)
    layer_cfg = MoELayerConfig(d_model=D, d_ff=shape.d_ff, gate=cfg)
    topk, capped = ROUTING.create("topk"), ROUTING.create("capacity")
    dropless, drop = CapacityConfig(), CapacityConfig(factor=1.25, overflow="drop")
    selector = REPLICA.create("round_robin")
    rule = gating_rule(cfg.family)

    logits = router_logits(hidden, gw)
    g = rule(logits, cfg, gw)
    routing = topk.route(g, dropless)
    dests = selector.select(routing.experts, route)
    plan = build_plan(dests, route.num_dests)
    rows = permute(hidden, plan)
    scratch = rows.clone()
    T_, k = plan.num_tokens, plan.top_k
    place = plan.token_index * k + plan.k_index
    per_assignment = rows.new_empty(T_ * k, D).index_copy_(0, place, rows)
    w = routing.weights.reshape(-1).to(dtype)

    ms: dict[str, float] = {
        "gate_upcast": device_ms(lambda: hidden.float(), device, repeats),
        "gate_gemm": device_ms(lambda: router_logits(hidden, gw), device, repeats),
        "gate_select": device_ms(lambda: rule(logits, cfg, gw), device, repeats),
        "routing_topk": device_ms(lambda: topk.route(g, dropless), device, repeats),
        "routing_capacity_drop": device_ms(lambda: capped.route(g, drop), device, repeats),
        "replica": device_ms(lambda: selector.select(routing.experts, route), device, repeats),
        "plan": device_ms(lambda: build_plan(dests, route.num_dests), device, repeats),
        "permute": device_ms(lambda: permute(hidden, plan), device, repeats),
        "expert_counts": device_ms(lambda: pipeline._expert_counts(routing.experts, experts), device, repeats),
        "combine": device_ms(lambda: combine(scratch, plan, routing.weights), device, repeats),
        # combine_by_gather's two steps alone: rows to their (token, k) places (the scatter it uses with drops,
        # the gather without), then the weighted sum
        "combine_place": device_ms(lambda: rows.new_empty(T_ * k, D).index_copy_(0, place, rows), device, repeats),
        "combine_place_gather": device_ms(lambda: rows.index_select(0, torch.empty_like(place).scatter_(
            0, place, torch.arange(T_ * k, device=device))), device, repeats),
        "combine_reduce_bmm": device_ms(lambda: torch.bmm(w.view(T_, 1, k), per_assignment.view(T_, k, D)),
                                        device, repeats),
        # the same sum as an elementwise product and a reduction over k (no batched GEMM)
        "combine_reduce_sum": device_ms(lambda: (per_assignment.view(T_, k, D) * w.view(T_, k, 1)).sum(1),
                                        device, repeats),
    }
    # the gate GEMM without the fp32 copy of hidden, where the device has it: bf16 inputs with fp32 output
    # (torch.mm out_dtype), and all-bf16 as transformers' Mixtral gate runs (softmax in fp32 after it)
    w16 = gw.weight.to(dtype)
    for name, fn in (("gate_gemm_out_fp32", lambda: torch.mm(hidden, w16.t(), out_dtype=torch.float32)),
                     ("gate_gemm_in_dtype", lambda: torch.nn.functional.linear(hidden, w16))):
        try:
            ms[name] = device_ms(fn, device, repeats)
        except (RuntimeError, NotImplementedError, TypeError):  # not on this device/torch: not measured
            pass
    if shape.family == "deepseek_v3":  # DeepSeek-V3: one shared expert of the routed experts' width
        gen = torch.Generator(device=device).manual_seed(1)
        shared = SharedExpert(
            torch.randn(2 * shape.d_ff, D, generator=gen, device=device, dtype=dtype).div_(D**0.5),
            torch.randn(D, shape.d_ff, generator=gen, device=device, dtype=dtype).div_(shape.d_ff**0.5))
        ms["shared_expert"] = device_ms(lambda: shared(hidden), device, repeats)

    def whole() -> pipeline.PreparedBatch:
        return pipeline.prepare(hidden, 0, layer_cfg, gw, topk, selector, route, actors)

    ms["pipeline_prepare"] = device_ms(whole, device, repeats)
    prepare_stages = ("gate_gemm", "gate_select", "routing_topk", "replica", "plan", "permute", "expert_counts")
    return {"median_ms": ms, "prepare_stages_sum_ms": sum(ms[s] for s in prepare_stages),
            "pipeline_prepare_host_syncs": host_syncs(whole, device),
            "combine_host_syncs": host_syncs(lambda: combine(scratch, plan, routing.weights), device)}


def _measured(name: str, errors: dict[str, str], fn: Callable[[], Any]) -> Any:
    """fn() for one of the added measurements (padded path, router stages), or None with the failure
    recorded in `errors` under `name`: the figures measured before on the same run are kept, and `cli`
    exits nonzero after writing them."""
    try:
        return fn()
    except (RuntimeError, NotImplementedError, TypeError, ValueError) as exc:
        errors[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return None


def fit_experts(shape: Shape, device: torch.device, dtype: torch.dtype) -> int:
    """Experts of `shape` whose weights fit in half the device's memory (all of them on a CPU)."""
    if device.type != "cuda":
        return shape.num_experts
    per_expert = 3 * shape.d_model * shape.d_ff * torch.finfo(dtype).bits // 8
    budget = torch.cuda.get_device_properties(device).total_memory // 2
    return max(shape.top_k, min(shape.num_experts, budget // per_expert))


def _groups_for(experts: int, shape: Shape) -> tuple[int, int]:
    """DeepSeek's group-limited routing with fewer experts: keep groups that divide the expert count."""
    groups = shape.num_groups
    while groups > 1 and (experts % groups or experts // groups < 2 or
                          shape.topk_groups * (experts // groups) < shape.top_k):
        groups //= 2
    return groups, min(shape.topk_groups, groups)


def run_case(shape: Shape, tokens: int, phase: str, device: torch.device, dtype: torch.dtype, repeats: int
             ) -> dict[str, Any]:
    experts = fit_experts(shape, device, dtype)
    groups, topk_groups = _groups_for(experts, shape)
    cfg = GateConfig(shape.family, experts, shape.top_k, num_groups=groups, topk_groups=topk_groups)
    g = torch.Generator(device=device).manual_seed(0)
    D, F = shape.d_model, shape.d_ff
    gate_up = torch.randn(experts, 2 * F, D, generator=g, device=device, dtype=dtype).div_(D**0.5)
    down = torch.randn(experts, D, F, generator=g, device=device, dtype=dtype).div_(F**0.5)
    gw = GateWeights(torch.randn(experts, D, generator=g, device=device) / D**0.5,
                     correction_bias=torch.zeros(experts, device=device) if shape.family == "deepseek_v3" else None)
    hidden = torch.randn(tokens, D, generator=g, device=device, dtype=dtype)

    out = gate(hidden, cfg, gw)
    plan = build_plan(out.experts, experts)
    rows = permute(hidden, plan)
    counts = list(plan.host_counts)
    n_rows = rows.shape[0]

    def prepare() -> torch.Tensor:
        o = gate(hidden, cfg, gw)
        return permute(hidden, build_plan(o.experts, experts))

    scratch = rows.clone()  # combine scales its input in place: give it a buffer of its own

    def finish() -> torch.Tensor:
        return combine(scratch, plan, out.weights)

    grouped_ok = grouped_mm_fast(device, dtype, D, F) or (device.type == "cpu" and hasattr(torch, "_grouped_mm"))
    ms: dict[str, float] = {}
    ms["experts_loop"] = timed(lambda: slots_swiglu(rows, counts, gate_up, down, grouped=False), device, repeats)
    if grouped_ok:
        ms["experts_grouped"] = timed(lambda: slots_swiglu(rows, counts, gate_up, down, grouped=True), device, repeats)
    a = torch.randn(n_rows, D, generator=g, device=device, dtype=dtype)
    b = torch.randn(D, 3 * F, generator=g, device=device, dtype=dtype)
    ms["plain_matmul"] = timed(lambda: a @ b, device, repeats)
    ms["router_prepare"] = timed(prepare, device, repeats)
    ms["router_finish"] = timed(finish, device, repeats)
    errors: dict[str, str] = {}
    # the padded alternative is measured after the router: its [S, M, D] buffers must not crowd the rest
    padded_ms = _measured("experts_padded", errors, lambda: timed(
        lambda: slots_swiglu(rows, counts, gate_up, down, grouped=False, padded=True), device, repeats))
    if padded_ms is not None:
        ms["experts_padded"] = padded_ms

    # the paths the actors' rule (experts.expert_path) chooses between, and what it picks here
    best = min(v for k, v in ms.items() if k in ("experts_loop", "experts_grouped", "experts_padded"))
    picked = f"experts_{expert_path(counts, grouped_mm_fast(device, dtype, D, F))}"
    flops = 6.0 * n_rows * D * F
    tflops = {k: flops / (v / 1e3) / 1e12 for k, v in ms.items() if k.startswith("experts_") or k == "plain_matmul"}
    result: dict[str, Any] = {
        "shape": asdict(shape), "phase": phase, "tokens": tokens, "experts_resident": experts,
        "routed_rows": n_rows, "median_ms": ms, "tflops": tflops,
        "matmul_fraction": {k: v / tflops["plain_matmul"] for k, v in tflops.items() if k != "plain_matmul"},
        "router_over_compute": (ms["router_prepare"] + ms["router_finish"]) / best,
        "rule_picks": picked, "rule_picked_the_faster": ms[picked] == best,
        "padded_overhead": len(counts) * padded_rows(counts) / max(n_rows, 1),
        "padded_faster": padded_ms is not None and padded_ms < best,
        "router_stages": _measured("router_stages", errors, lambda: router_stages(
            shape, cfg, gw, hidden, experts, device, dtype, repeats)),
    }
    if errors:
        result["errors"] = errors
    if phase == "decode":
        active = sum(1 for c in counts if c)
        weight_bytes = active * 3 * D * F * gate_up.element_size()
        src = torch.empty(weight_bytes // gate_up.element_size(), device=device, dtype=dtype)
        dst = torch.empty_like(src)
        copy_ms = timed(lambda: dst.copy_(src), device, repeats)
        copy_gbs = weight_bytes / (copy_ms / 1e3) / 1e9
        weights_gbs = {k: weight_bytes / (v / 1e3) / 1e9 for k, v in ms.items() if k.startswith("experts_")}
        result.update(active_experts=active, weight_bytes=weight_bytes, copy_ms=copy_ms, copy_gbs=copy_gbs,
                      weights_gbs=weights_gbs, copy_fraction={k: v / copy_gbs for k, v in weights_gbs.items()})
    return result


def run(small: bool | None = None, device: str | None = None, dtype: str | None = None, repeats: int = 10,
        shapes: list[Shape] | None = None, tokens: dict[str, int] | None = None) -> dict[str, Any]:
    dev = resolve_device(device or os.environ.get(DEVICE_ENV) or ("cuda" if torch.cuda.is_available() else "cpu"))
    small = dev.type == "cpu" if small is None else small
    dt = getattr(torch, dtype) if dtype else (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    shapes = shapes or (SMALL if small else FULL)
    tokens = tokens or (SMALL_TOKENS if small else FULL_TOKENS)
    cases = []
    with torch.inference_mode():
        for shape in shapes:
            for phase, t in tokens.items():
                cases.append(run_case(shape, t, phase, dev, dt, repeats))
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    return {"device": name, "dtype": str(dt).removeprefix("torch."), "small": small, "repeats": repeats,
            "torch": torch.__version__, "goals": GOALS, "cases": cases}


def cli(small: bool = typer.Option(None, "--small/--full", help="small shapes (default on CPU)"),
        device: str = typer.Option(None, help="cpu | cuda (default: EXPERTRAY_DEVICE, else cuda when available)"),
        dtype: str = typer.Option(None, help="bfloat16 | float16 | float32 (default bf16 on GPU, fp32 on CPU)"),
        repeats: int = 10, as_json: bool = typer.Option(False, "--json"), out: Path | None = None) -> None:
    """Expert GEMMs vs a plain matmul, decode weight reads vs a copy, router vs expert time, on one device."""
    r = run(small, device, dtype, repeats)
    nan = float("nan")
    rows = [[c["shape"]["name"], c["phase"], c["routed_rows"], c["matmul_fraction"].get("experts_grouped", nan),
             c["matmul_fraction"]["experts_loop"], c.get("copy_fraction", {}).get("experts_grouped", nan),
             c.get("copy_fraction", {}).get("experts_loop", nan), c["router_over_compute"]] for c in r["cases"]]
    emit("gpu", r, rows, ["layer", "phase", "rows", "grouped/matmul", "loop/matmul", "grouped weights/copy",
                          "loop weights/copy", "router/compute"], as_json, out)
    failed = {f"{c['shape']['name']} {c['phase']}": c["errors"] for c in r["cases"] if c.get("errors")}
    if failed:
        typer.echo(f"bench gpu: measurements failed (their figures are missing from the results): {failed}", err=True)
        raise typer.Exit(1)
