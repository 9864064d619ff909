"""`expertray trace …`: record routing traces (from the synthetic workload), replay them through a policy,
analyze them. Bad files and bad options exit with code 2 and a one-line message, no traceback."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.console import Console
from rich.table import Table

from expertray.cli.common import cli_errors, say
from expertray.config import GATING_FAMILIES, CapacityConfig, GateConfig
from expertray.layer.gating import gate_from_logits
from expertray.policies.replica import REPLICA
from expertray.policies.routing import ROUTING
from expertray.state.placement_table import PlacementTable
from expertray.tools.trace import TraceWriter, analyze, read_trace, replay, write_heatmap
from expertray.tools.workload import Workload, WorkloadConfig, popularity_from_counts

trace_app = typer.Typer(help="Routing traces: record, replay through a policy, analyze.", no_args_is_help=True)


def json_object(text: str | None) -> dict[str, Any]:
    """A JSON-object command-line option (e.g. policy parameters); empty means {}."""
    if not text:
        return {}
    try:
        params = json.loads(text)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"not JSON: {exc}") from None
    if not isinstance(params, dict):
        raise typer.BadParameter("must be a JSON object")
    return params


@trace_app.command("record")
def record(
    out: Annotated[Path, typer.Argument(help="trace file to write")],
    batches: Annotated[int, typer.Option(min=1)] = 64,
    tokens: Annotated[int, typer.Option(min=1)] = 1024,
    layers: Annotated[int, typer.Option(min=1)] = 1,
    experts: Annotated[int, typer.Option(min=1)] = 64,
    top_k: Annotated[int, typer.Option("--top-k", min=1)] = 8,
    family: Annotated[str, typer.Option(help=f"gating family, one of {GATING_FAMILIES}")] = "qwen_moe",
    normalize: Annotated[bool, typer.Option(help="renormalise top-k weights (Mixtral does, OLMoE not)")] = False,
    zipf: Annotated[float, typer.Option(help="Zipf exponent of expert popularity")] = 1.0,
    temperature: Annotated[float, typer.Option(help="logit temperature: high = flat scores, low = peaked")] = 1.0,
    hotspot_period: Annotated[int, typer.Option(help="rotate the popular experts every N batches (0 = never)")] = 0,
    repetition: Annotated[float, typer.Option(help="share of each batch that repeats one token")] = 0.0,
    burst_off_s: Annotated[float, typer.Option(help="mean silence between bursts (0 = Poisson arrivals)")] = 0.0,
    popularity_file: Annotated[Path | None, typer.Option(help="measured counts JSON (expert_counts_c4.json)")] = None,
    popularity_model: str = "olmoe_c4",
    popularity_layer: int = 0,
    policy: Annotated[str, typer.Option(help="routing policy whose choice is recorded")] = "topk",
    cf: Annotated[float, typer.Option(help="capacity factor for the recorded policy")] = 1.25,
    overflow: Annotated[str, typer.Option(help="capacity overflow mode: drop, reroute, dropless")] = "dropless",
    gate: Annotated[bool, typer.Option(help="also store full gate probs (needed to replay other policies)")] = True,
    seed: int = 0,
) -> None:
    """Record a trace from the synthetic workload generator."""
    with cli_errors():
        gate_cfg = GateConfig(family, experts, top_k, normalize=normalize)
        capacity = CapacityConfig(factor=cf, overflow=overflow)
        popularity = (popularity_from_counts(popularity_file, popularity_model, popularity_layer)
                      if popularity_file else None)
        routing = ROUTING.create(policy)
        meta = {"source": "workload", "family": family, "normalize": normalize, "zipf": zipf,
                "temperature": temperature, "hotspot_period": hotspot_period, "repetition": repetition,
                "policy": policy, "seed": seed}
        workloads = [Workload(WorkloadConfig(
            num_experts=experts, tokens_per_batch=tokens, zipf_exponent=zipf, popularity=popularity,
            temperature=temperature, hotspot_period=hotspot_period, repetition=repetition,
            burst_off_s=burst_off_s, seed=seed + layer)) for layer in range(layers)]
        with TraceWriter(out, layers, experts, top_k, meta) as writer:
            for per_layer in zip(*(wl.batches(batches) for wl in workloads), strict=True):
                for layer, b in enumerate(per_layer):
                    g = gate_from_logits(b.logits, gate_cfg)
                    r = routing.for_layer(layer).route(g, capacity)
                    writer.write(layer, r.experts, r.weights, g.probs if gate else None, float(b.arrival_s[-1]))
        typer.echo(f"wrote {batches} batches x {layers} layers x {tokens} tokens to {out}")


@trace_app.command("live")
def live(
    out: Annotated[Path, typer.Argument(help="trace file to write (one per router if several)")],
    seconds: Annotated[float, typer.Option(min=0.0, help="how long to record")] = 10.0,
    address: Annotated[str | None, typer.Option(help="Ray cluster address HOST:PORT (default: the head "
                                                      "`expertray up` started)")] = None,
) -> None:
    """Record the live routing of a running cluster for a while (progress on stderr)."""
    import time

    from expertray.api import connect

    with cli_errors():
        cluster = connect(address)
        paths = cluster.start_trace(str(out))
        try:
            end = time.monotonic() + seconds
            while (left := end - time.monotonic()) > 0:
                time.sleep(min(left, 2.0))
                say(f"recording: {seconds - max(end - time.monotonic(), 0.0):.0f} of {seconds:g} s")
        finally:
            sizes = cluster.stop_trace()
        for p, size in zip(paths, sizes, strict=True):
            typer.echo(f"wrote {p} ({size} bytes)")


@trace_app.command("replay")
def replay_cmd(
    trace: Annotated[Path, typer.Argument(help="trace file (recorded with gate probs)")],
    policy: Annotated[str, typer.Option(help="routing policy")] = "laser",
    policy_params: Annotated[str | None, typer.Option(help='policy parameters as JSON, e.g. \'{"widen": 4}\'')] = None,
    selector: Annotated[str, typer.Option(help="replica selector")] = "round_robin",
    placement_actors: Annotated[int, typer.Option(min=1, help="balanced placement over this many actors")] = 8,
    cf: float = 1.25,
    overflow: str = "dropless",
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Replay recorded gate probs through a policy and a balanced placement; print loads and measures."""
    with cli_errors():
        tr = read_trace(trace)
        h = tr.header
        placement = PlacementTable.balanced(h.num_layers, h.num_experts,
                                            [f"actor{i}" for i in range(placement_actors)])
        result = replay(tr, ROUTING.create(policy, **json_object(policy_params)), placement,
                        REPLICA.create(selector), CapacityConfig(factor=cf, overflow=overflow))
    result = {"trace": str(trace), "policy": policy, "selector": selector, "actors": placement_actors, **result}
    if as_json:
        print(json.dumps(result, indent=2))
        return
    table = Table(title=f"replay {trace.name} through {policy} / {selector} on {placement_actors} actors")
    columns = {"batches": "batches", "imbalance_device": "imbalance (actor)",
               "imbalance_expert": "imbalance (expert)", "drop_rate": "drop rate",
               "gate_mass_retained": "gate mass kept", "topk_agreement": "top-k agreement"}
    table.add_column("layer")
    for title in columns.values():
        table.add_column(title, justify="right")
    for layer, r in result["layers"].items():
        table.add_row(layer, *[f"{r[m]:.4g}" for m in columns])
    Console().print(table)


@trace_app.command("analyze")
def analyze_cmd(
    trace: Annotated[Path, typer.Argument(help="trace file")],
    heatmap: Annotated[Path | None, typer.Option(help="PNG to write (default: <trace>.heatmap.png)")] = None,
    summary: Annotated[Path | None, typer.Option(help="summary JSON to write (default: <trace>.summary.json)")] = None,
    time_bins: Annotated[int, typer.Option(min=1, help="at most this many time bins in the heatmap")] = 128,
    as_json: Annotated[bool, typer.Option("--json", help="print the summary JSON instead of the tables")] = False,
) -> None:
    """Per-expert load table, expert x time heatmap PNG and summary JSON of the recorded choices."""
    with cli_errors():
        a = analyze(read_trace(trace), time_bins)
        doc = a.summary()
        heatmap = heatmap or trace.with_name(trace.name + ".heatmap.png")
        summary = summary or trace.with_name(trace.name + ".summary.json")
        write_heatmap(a, heatmap)
        summary.write_text(json.dumps(doc, indent=2) + "\n")
    if as_json:
        print(json.dumps(doc, indent=2))
        return
    console = Console()
    for layer, info in doc["layers"].items():
        console.print(f"layer {layer}: {info['batches']} batches, {info['tokens']} tokens, expert imbalance "
                      f"{info['imbalance_expert_total']:.3g}, drop rate {info['drop_rate']:.3g}")
        console.print(_load_table(f"layer {layer} load per expert", info["expert_tokens"]))
    console.print(f"heatmap: {heatmap}\nsummary: {summary}")


def _load_table(title: str, expert_tokens: list[float]) -> Table:
    load = torch.tensor(expert_tokens, dtype=torch.float64)
    total = float(load.sum()) or 1.0
    mean = float(load.mean()) or 1.0
    table = Table(title=title)
    for c in ("expert", "tokens", "share", "x mean"):
        table.add_column(c, justify="right")
    for e in load.argsort(descending=True).tolist():
        table.add_row(str(e), f"{int(load[e])}", f"{float(load[e]) / total:.2%}", f"{float(load[e]) / mean:.3g}")
    return table
