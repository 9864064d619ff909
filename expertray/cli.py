"""The `expertray` command line: run a local cluster, inspect it, move experts, benchmark, trace, simulate.

Commands that talk to a cluster connect with --address (default: the local Ray cluster). Errors that name
an unknown expert/actor or a bad value print one clear line and exit with status 2.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from expertray import sim_cli
from expertray.bench.cli import bench_app
from expertray.errors import ConfigError, ExpertRayError
from expertray.trace_cli import trace_app

app = typer.Typer(help="expertray: elastic expert-parallel MoE inference on Ray.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
app.add_typer(trace_app, name="trace")
app.command("sim")(sim_cli.sim)
autoscale_app = typer.Typer(help="Turn the controller's autoscaler on or off, or show its state.",
                            no_args_is_help=True)
app.add_typer(autoscale_app, name="autoscale")
console = Console()
ADDRESS = typer.Option("auto", "--address", help="Ray cluster address (default: the local one).")
JSON = typer.Option(False, "--json", help="Machine-readable output.")


def _clean(exc: BaseException) -> str:
    """The message of the original error (not Ray's remote-traceback wrapper), on one line."""
    cause = getattr(exc, "cause", None) or exc
    text = " ".join(line.strip() for line in str(cause).splitlines() if line.strip())
    return text or type(cause).__name__


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn expertray errors (local or raised inside an actor) into one line on stderr and exit code 2."""
    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (ExpertRayError, ValueError, KeyError) as exc:
            typer.echo(f"error: {_clean(exc)}", err=True)
            raise typer.Exit(2) from None
    return wrapper


def parse_expert(spec: str) -> tuple[int, int]:
    """'LAYER:EXPERT' → (layer, expert)."""
    try:
        layer, expert = spec.split(":")
        return int(layer), int(expert)
    except ValueError:
        raise ConfigError(f"expert must be given as LAYER:EXPERT (e.g. 0:3), got {spec!r}") from None


def _print(doc: Any, as_json: bool, table: Table | None = None) -> None:
    if as_json or table is None:
        typer.echo(json.dumps(doc, indent=2, default=str))
    else:
        console.print(table)


def load_config(path: Path | None):  # noqa: ANN201 - ClusterConfig
    """A ClusterConfig from a YAML/JSON file (unknown or bad fields are named), or the embedded default."""
    from expertray.config import ClusterConfig, check_policy_names, from_dict

    if path is None:
        return ClusterConfig()
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"config {path}: cannot read ({exc})") from exc
    cfg = from_dict(ClusterConfig, data or {}, "cluster")
    check_policy_names(cfg)
    return cfg


# --- cluster lifecycle ----------------------------------------------------------------------------------
@app.command()
@friendly
def up(config: Path | None = typer.Option(None, help="Cluster config (YAML/JSON); default: embedded."),
       num_cpus: int = typer.Option(8, help="Logical CPUs for the local Ray head (oversubscribe small boxes)."),
       as_json: bool = JSON) -> None:
    """Start a local Ray head (loopback, no dashboard) and an expertray cluster on it."""
    import os

    from expertray.api import launch

    cfg = load_config(config)
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "start", "--head", f"--num-cpus={num_cpus}",
                    "--include-dashboard=false", "--node-ip-address=127.0.0.1", "--disable-usage-stats"],
                   check=True, env=env, capture_output=True)
    cluster = launch(cfg, address="auto")
    _print({"status": "up", "actors": list(cluster.table().actors), "routers": len(cluster.routers)}, True)


@app.command()
@friendly
def down(address: str = ADDRESS) -> None:
    """Shut the expertray cluster down and stop the local Ray head."""
    from expertray.api import connect

    try:
        connect(address).shutdown()
    finally:
        subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "stop"], capture_output=True)
    typer.echo("down")


# --- inspection -----------------------------------------------------------------------------------------
@app.command()
@friendly
def status(address: str = ADDRESS, as_json: bool = JSON) -> None:
    """Placement version, transport, per-actor slots/memory/latency, per-router counters."""
    from expertray.api import connect

    st = connect(address).status()
    t = Table(title=f"expertray — table v{st['table']['version']}, transport {st['transport']}")
    for col in ("actor", "slots", "memory MiB", "calls", "compute p50 ms", "compute p99 ms", "slowdown"):
        t.add_column(col)
    for a, s in st["actors"].items():
        if not s["alive"]:
            t.add_row(a, "dead (healing)", "", "", "", "", "")
            continue
        t.add_row(a, str(s["slots"]), f"{s['memory_bytes'] / 2**20:.1f}", str(s["calls"]),
                  f"{s['compute_ms_p50']:.2f}", f"{s['compute_ms_p99']:.2f}", f"{s['slowdown']:g}")
    _print(st, as_json, t)
    if not as_json:
        for r in st["routers"]:
            console.print(f"{r['router']}: {r['requests']} requests, {r['batches']} batches, {r['tokens']} tokens, "
                          f"{r['dropped']} dropped, {r['errors']} errors, queue {r['queued_tokens']} tokens")
        for n in st.get("nodes", []):  # actors by Ray node
            routers = [r["router"] for r in st["routers"] if (r.get("node") or {}).get("node_id") == n.get("node_id")]
            console.print(f"node {n.get('ip', '?')} ({n.get('node_id', '')[:12]}{', head' if n.get('head') else ''})"
                          f": actors {', '.join(n.get('actors', [])) or '-'}; routers {', '.join(routers) or '-'}"
                          + (f"; {n['error']}" if "error" in n else ""))


@app.command()
@friendly
def experts(address: str = ADDRESS, layer: int | None = typer.Option(None, help="Only this layer."),
            as_json: bool = JSON) -> None:
    """Per logical expert: replicas, the actors holding them, window tokens, share, tokens/s."""
    from expertray.api import connect

    st = connect(address).status()
    from expertray.placement import PlacementTable

    table = PlacementTable.from_dict(st["table"])
    rows = []
    for lyr in range(table.num_layers):
        if layer is not None and lyr != layer:
            continue
        load = [sum(r["layers"][lyr]["expert_load"][e] for r in st["routers"]) for e in range(table.num_experts)]
        total = [sum(r["layers"][lyr]["expert_tokens_total"][e] for r in st["routers"])
                 for e in range(table.num_experts)]
        uptime = max(r["uptime_s"] for r in st["routers"])
        denom = sum(load) or 1.0
        for e in range(table.num_experts):
            reps = table.replicas(lyr, e)
            rows.append({"expert": f"{lyr}:{e}", "replicas": len(reps), "actors": [s.actor for s in reps],
                         "tokens_per_batch": load[e], "share": load[e] / denom, "tokens_per_s": total[e] / uptime})
    if layer is not None and not rows:
        raise ConfigError(f"unknown layer {layer} (cluster serves layers 0..{table.num_layers - 1})")
    t = Table(title="experts")
    for col in ("expert", "replicas", "actors", "tokens/batch (window)", "share", "tokens/s"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["expert"], str(r["replicas"]), ",".join(r["actors"]), f"{r['tokens_per_batch']:.1f}",
                  f"{r['share']:.1%}", f"{r['tokens_per_s']:.1f}")
    _print(rows, as_json, t)


# --- placement changes ----------------------------------------------------------------------------------
@app.command()
@friendly
def replicate(expert: str = typer.Argument(..., help="LAYER:EXPERT"),
              to: str | None = typer.Option(None, "--to", help="Target actor (default: least-loaded)."),
              address: str = ADDRESS) -> None:
    """Add a replica of a logical expert."""
    from expertray.api import connect

    layer, e = parse_expert(expert)
    _print(connect(address).replicate(layer, e, to), True)


@app.command()
@friendly
def migrate(expert: str = typer.Argument(..., help="LAYER:EXPERT"),
            to: str = typer.Option(..., "--to", help="Target actor."),
            src: str | None = typer.Option(None, "--from", help="Source actor (default: its first replica)."),
            address: str = ADDRESS) -> None:
    """Move one replica of a logical expert to another actor."""
    from expertray.api import connect

    layer, e = parse_expert(expert)
    _print(connect(address).migrate(layer, e, to, src), True)


@app.command()
@friendly
def drain(actor: str, address: str = ADDRESS) -> None:
    """Move every slot off an actor (weights copied first, no token lost), then remove it."""
    from expertray.api import connect

    _print(connect(address).drain(actor), True)


@app.command()
@friendly
def rebalance(policy: str = typer.Option("balanced", help="Placement policy (round_robin, balanced, ...)."),
              slots: int = typer.Option(0, help="Slots per actor per layer (0: experts/actors + 1)."),
              address: str = ADDRESS) -> None:
    """Re-plan replica counts and packing from the observed load; weights move before the switch."""
    from expertray.api import connect

    _print(connect(address).rebalance(policy, slots), True)


@app.command("add-actor")
@friendly
def add_actor(address: str = ADDRESS) -> None:
    """Start one more (empty) expert actor; the autoscaler or `migrate` fills it."""
    from expertray.api import connect

    typer.echo(connect(address).add_actor())


@autoscale_app.command("on")
@friendly
def autoscale_on(address: str = ADDRESS) -> None:
    from expertray.api import connect

    _print(connect(address).autoscale(True), True)


@autoscale_app.command("off")
@friendly
def autoscale_off(address: str = ADDRESS) -> None:
    from expertray.api import connect

    _print(connect(address).autoscale(False), True)


@autoscale_app.command("status")
@friendly
def autoscale_status(address: str = ADDRESS) -> None:
    from expertray.api import connect

    _print(connect(address).autoscale(None), True)


@app.command()
@friendly
def demo(seconds: float = typer.Option(20.0, help="How long to serve traffic."),
         config: Path | None = typer.Option(None, help="Cluster config (YAML/JSON); default: embedded.")) -> None:
    """The main job: a local Ray cluster serving a multi-layer MoE with live balancing."""
    from expertray.demo import run_demo

    run_demo(load_config(config), seconds)


def main() -> None:
    app()
