"""`expertray sim`: simulate placement policies on a cluster of any size (no Ray, no GPUs) and compare their
all-to-all traffic, dispatch time, balance and memory. Bad options exit with code 2 and one line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from expertray.cli.common import cli_errors
from expertray.state.topology import Topology
from expertray.tools.sim.routing import GeneratorRouting, RoutingSource, SyntheticRouting, TraceRouting
from expertray.tools.sim.simulator import (
    DEFAULT_POLICIES,
    SimConfig,
    SimResult,
    default_slots_per_device,
    simulate,
    write_plot,
)
from expertray.tools.trace import read_trace
from expertray.tools.trace.cli import json_object
from expertray.tools.workload import WorkloadConfig


def _params(text: str | None) -> dict[str, dict[str, Any]]:
    params = json_object(text)
    if not all(isinstance(v, dict) for v in params.values()):
        raise typer.BadParameter('must map policy names to parameter objects, e.g. {"balanced": {"search_steps": 8}}')
    return params


def sim(
    devices: Annotated[int, typer.Option(min=1, help="devices (one expert actor each)")] = 64,
    devices_per_node: Annotated[int, typer.Option(min=1, help="devices per node (NVLink domain)")] = 8,
    slots_per_device: Annotated[int | None, typer.Option(min=1, help="expert slots per device and layer "
                                                          "[default: ceil(experts / devices) + 1]")] = None,
    experts: Annotated[int, typer.Option(min=1, help="routed experts per layer (ignored with --trace)")] = 256,
    layers: Annotated[int, typer.Option(min=1, help="MoE layers (ignored with --trace)")] = 60,
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="experts per token (ignored with --trace)")] = 8,
    tokens: Annotated[int | None, typer.Option(min=1, help="tokens per step over all devices "
                                               "[default: 128 per device]")] = None,
    d_model: Annotated[int, typer.Option(min=1, help="hidden size: elements moved per token transfer")] = 7168,
    bytes_per_elem: Annotated[int, typer.Option(min=1, help="bytes per element on the wire (bf16: 2)")] = 2,
    expert_intermediate: Annotated[int, typer.Option(min=1, help="expert FFN width: memory per slot is "
                                                     "3 × d_model × this × bytes_per_elem")] = 2048,
    trace: Annotated[Path | None, typer.Option(help="replay a recorded routing trace")] = None,
    generator: Annotated[bool, typer.Option(help="route with expertray.tools.workload's Zipf generator "
                                            "(no affinity) instead of the synthetic affinity model")] = False,
    zipf: Annotated[float, typer.Option(help="Zipf exponent of expert popularity")] = 0.25,
    topics: Annotated[int, typer.Option(min=1, help="synthetic model: token topics (expert groups)")] = 16,
    topic_affinity: Annotated[float, typer.Option(help="synthetic model: share of picks from the topic")] = 0.5,
    seed: int = 0,
    policies: Annotated[str, typer.Option(help="comma-separated placement policies")] = ",".join(DEFAULT_POLICIES),
    policy_params: Annotated[str | None, typer.Option(help='JSON, e.g. \'{"topology_aware": '
                                                      '{"balance_slack": 0.2}}\'')] = None,
    selector: Annotated[str, typer.Option(help="replica selection: locality or round_robin")] = "locality",
    dispatch: Annotated[str, typer.Option(help="flat (once per device) or hierarchical (network once "
                                          "per node, then NVLink)")] = "flat",
    origin: Annotated[str, typer.Option(help="even (tokens return home) or follow (next layer starts "
                                        "where the first expert ran)")] = "even",
    as_json: Annotated[bool, typer.Option("--json", help="print the full result as JSON")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="no progress lines on stderr")] = False,
    plot: Annotated[Path | None, typer.Option(help="PNG of inter-node bytes and balancedness per layer")] = None,
) -> None:
    """Simulate placement policies over a cluster: all-to-all bytes within / across nodes, dispatch time,
    balancedness and memory per device, per layer."""
    with cli_errors():
        source: RoutingSource
        total_tokens = tokens or 128 * devices
        if trace is not None:
            source = TraceRouting(read_trace(trace))
        elif generator:
            source = GeneratorRouting(layers, top_k, WorkloadConfig(num_experts=experts, tokens_per_batch=total_tokens,
                                                                    zipf_exponent=zipf, seed=seed))
        else:
            source = SyntheticRouting(layers, experts, top_k, total_tokens, zipf, topics, topic_affinity, seed)
        if devices % devices_per_node:
            raise typer.BadParameter(f"--devices {devices} is not a multiple of --devices-per-node "
                                     f"{devices_per_node}")
        topology = Topology.uniform(devices // devices_per_node, devices_per_node,
                                    slots_per_device or default_slots_per_device(source.num_experts, devices))
        config = SimConfig(d_model, bytes_per_elem, 3 * d_model * expert_intermediate * bytes_per_elem,
                           selector, dispatch, origin)
        result = simulate(source, topology, [p.strip() for p in policies.split(",") if p.strip()], config,
                          _params(policy_params), None if quiet else _progress)
        if plot is not None:
            write_plot(result, plot)
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        _print_table(result)


def _progress(line: str) -> None:
    typer.echo(f"sim: {line}", err=True)


def _print_table(result: SimResult) -> None:
    console = Console(width=max(Console().width, 160))  # 11 columns: don't squeeze them into a pipe's 80
    console.print(f"{result.devices} devices on {result.nodes} nodes, {result.experts} experts top-{result.top_k}, "
                  f"{result.layers} layers, {result.tokens_per_step:.0f} tokens/step; {result.config.dispatch} "
                  f"dispatch, {result.config.selector} replicas, {result.config.origin} origin")
    table = Table(title="per layer; bytes are dispatch + combine; memory = max slots x expert bytes")
    columns = ("policy", "inter-node GB", "intra-node GB", "dispatch us", "combine us", "balancedness",
               "min bal.", "slots/dev", "memory GB/dev", "plan s", "replay s")
    for c in columns:
        table.add_column(c, justify="left" if c == "policy" else "right", no_wrap=True)
    for p in result.policies:
        s = p.summary()
        table.add_row(p.policy, f"{s['inter_node_bytes_per_layer'] / 1e9:.3f}",
                      f"{s['intra_node_bytes_per_layer'] / 1e9:.3f}", f"{s['dispatch_time_s_per_layer'] * 1e6:.0f}",
                      f"{s['combine_time_s_per_layer'] * 1e6:.0f}", f"{s['balancedness_mean']:.3f}",
                      f"{s['balancedness_min']:.3f}", str(s["slots_per_device_max"]),
                      f"{s['memory_bytes_per_device_max'] / 1e9:.1f}", f"{s['plan_s']:.1f}", f"{s['replay_s']:.1f}")
    console.print(table)
    console.print(f"calibration {result.calibration_s:.1f} s, total {result.total_s:.1f} s")
