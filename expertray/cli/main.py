"""The `expertray` command line: run a local cluster, inspect it, move experts, put load on it, benchmark,
trace, simulate.

Where the cluster is: `expertray up` starts a Ray head of its own on 127.0.0.1 and records it
(expertray.cli.localhead); every other command connects to exactly that address, or to `--address HOST:PORT` (an
existing Ray cluster: `ray up`, KubeRay, `ray start`; `expertray up --address` launches expertray there).
`expertray down` stops the expertray actors and only the head `up` started. Expected failures (unknown
expert/actor, bad value, no cluster, dead controller) print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import os

# Ray reads this at `import ray` (which the subcommands trigger): local Rays bind loopback.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import typer  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from expertray.cli.common import EXIT_USAGE, friendly, progress, say  # noqa: E402
from expertray.config import load_config  # noqa: E402
from expertray.errors import ConfigError  # noqa: E402
from expertray.tools.bench.cli import bench_app  # noqa: E402
from expertray.tools.sim import cli as sim_cli  # noqa: E402
from expertray.tools.trace.cli import trace_app  # noqa: E402

app = typer.Typer(help="expertray: elastic expert-parallel MoE inference on Ray.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
app.add_typer(trace_app, name="trace")
app.command("sim")(sim_cli.sim)
autoscale_app = typer.Typer(help="Turn the controller's autoscaler on or off, or show its state.",
                            no_args_is_help=True)
app.add_typer(autoscale_app, name="autoscale")
console = Console()
ADDRESS = typer.Option(None, "--address", help="Ray cluster address HOST:PORT (default: the head `expertray up` "
                                                "started on this machine).")
JSON = typer.Option(False, "--json", help="Machine-readable output.")


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


def _connect(address: str | None):  # noqa: ANN202 - expertray.api.Cluster
    from expertray.api import connect

    return connect(address)


def _with_overrides(cfg: Any, **fields: Any) -> Any:
    """`cfg` with the command-line options that were given (None = keep the config's value), re-validated."""
    import dataclasses

    given = {k: v for k, v in fields.items() if v is not None}
    return dataclasses.replace(cfg, **given) if given else cfg


# --- cluster lifecycle ----------------------------------------------------------------------------------
@app.command()
@friendly
def up(config: Path | None = typer.Option(None, help="Cluster config (YAML/JSON); default: embedded."),
       num_cpus: float | None = typer.Option(None, help="Logical CPUs for the local Ray head (default: the "
                                                         "machine's, raised to what the config needs)."),
       dashboard: bool = typer.Option(False, "--dashboard", help="Also run Ray's dashboard on 127.0.0.1 (what "
                                                                  "`serve deploy` talks to)."),
       address: str | None = typer.Option(None, "--address", help="Launch on this existing Ray cluster "
                                                                  "(HOST:PORT) instead of starting a head."),
       model: str | None = typer.Option(None, "--model", help="Serve this Hugging Face checkpoint directory "
                                                                "(config.json + *.safetensors)."),
       dtype: str | None = typer.Option(None, "--dtype", help="Serving dtype: bfloat16 | float16 | float32 | "
                                                                "auto (the checkpoint's)."),
       actors: int | None = typer.Option(None, "--actors", min=1, help="Number of expert actors."),
       serve_app: bool = typer.Option(False, "--serve", help="Also deploy the Serve app: the layer API, and with "
                                                             "--model the OpenAI API from engine replicas."),
       port: int = typer.Option(8000, "--port", min=1, max=65535, help="HTTP port of --serve (on 127.0.0.1)."),
       as_json: bool = JSON) -> None:
    """Start a local Ray head (127.0.0.1) and an expertray cluster on it, or launch one on --address."""
    from expertray.api import local_num_cpus
    from expertray.cli import localhead

    cfg = _with_overrides(load_config(config), model=model, dtype=dtype, num_expert_actors=actors)
    state = localhead.read_state()
    if state is not None:
        if state.pid is None or localhead.is_running(state):
            raise localhead.HeadError(f"expertray is already up at {state.address}: use it (`expertray status`) "
                                      "or stop it first (`expertray down`)")
        say(f"forgetting the head recorded at {state.address}: it is no longer running")
        localhead.clear_state()
    if address is None:
        cpus = num_cpus if num_cpus is not None else local_num_cpus(cfg)
        with progress(f"starting a Ray head on 127.0.0.1 ({cpus:g} logical CPUs)"):
            state = localhead.start_head(cpus, dashboard, progress=say)
    elif num_cpus is not None or dashboard:
        raise ConfigError("--num-cpus and --dashboard apply to a head `up` starts, not to --address clusters")
    else:
        state = localhead.HeadState(address, None, "", "")
    try:
        from expertray.api import launch

        with progress(f"launching expertray ({cfg.num_expert_actors} expert actors, {cfg.num_routers} router(s)) "
                      f"on {state.address}"):
            cluster = launch(cfg, address=localhead.use_head(state) if state.pid is not None else state.address)
    except BaseException:
        if state.pid is not None:
            _disconnect()
            localhead.stop_head(state)
        raise
    localhead.write_state(state)
    doc = {"status": "up", "address": state.address, "actors": list(cluster.table().actors),
           "routers": len(cluster.routers), "ray_head_started": state.pid is not None}
    if serve_app:
        from expertray.serve.layers import run_app

        with progress(f"deploying the Serve app on 127.0.0.1:{port}" + (" with engine replicas" if model else "")):
            doc["serve"] = run_app(port, model=cluster.cfg.model, quiet=True)
        if model:
            doc["openai_base_url"] = f"{doc['serve']}/v1"
    if state.dashboard:
        doc["dashboard"] = state.dashboard
    _print(doc, True)


def _disconnect() -> None:
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


def _stop_actors(address: str | None) -> str:
    """Shut the expertray cluster down through its controller; if the controller is gone, kill the expertray
    actors left in the namespace by name. Returns what happened."""
    import ray
    from ray.util import list_named_actors

    from expertray.api import CONTROLLER, NAMESPACE, init_ray

    try:
        _connect(address).shutdown()
        return "expertray actors stopped"
    except ConfigError as exc:
        if not ray.is_initialized():
            init_ray(address)
        left = [a["name"] for a in list_named_actors(all_namespaces=True)
                if a["namespace"] == NAMESPACE and (a["name"] == CONTROLLER or a["name"].startswith("expertray-"))]
        for name in left:
            ray.kill(ray.get_actor(name, namespace=NAMESPACE))
        return f"killed {len(left)} expertray actor(s) left by a dead controller" if left else f"no cluster ({exc})"


@app.command()
@friendly
def down(address: str | None = ADDRESS) -> None:
    """Stop the expertray cluster, and the Ray head if `expertray up` started it (no other Ray)."""
    from expertray.cli import localhead

    state = localhead.read_state()
    if address is None and state is None:
        raise localhead.HeadError("nothing to stop: `expertray up` has no cluster recorded on this machine (pass "
                                  "--address HOST:PORT to stop expertray on another Ray cluster)")
    target = address or state.address
    ours = state is not None and state.address == target
    head_alive = ours and state.pid is not None and localhead.is_running(state)
    if ours and state.pid is not None and not head_alive:
        actors = "its Ray head is no longer running"
    else:
        actors = _stop_actors(target)
    _disconnect()
    if head_alive:
        with progress(f"stopping the Ray head at {target} (pid {state.pid})"):
            localhead.stop_head(state)
        typer.echo(f"down: {actors}; Ray head {target} stopped")
        return
    if ours:
        localhead.clear_state()
    started_head = ours and state.pid is not None
    typer.echo(f"down: {actors}" + ("" if started_head else f"; the Ray cluster at {target} was not started by "
                                                             "expertray and keeps running"))
    if actors.startswith("no cluster") or actors.startswith("its Ray head"):
        raise typer.Exit(EXIT_USAGE)


# --- inspection -----------------------------------------------------------------------------------------
def _tokens_per_s(cluster: Any, st: dict[str, Any], sample_s: float = 1.0) -> float:
    """The routers' current tokens/s: their own `tokens_per_s` when they report it, else measured from two
    status samples `sample_s` apart."""
    rates = [r.get("tokens_per_s") for r in st["routers"]]
    if all(r is not None for r in rates):
        return float(sum(rates))
    time.sleep(sample_s)
    later = cluster.status()
    before = {r["router"]: r for r in st["routers"]}
    total = 0.0
    for r in later["routers"]:
        prev = before.get(r["router"])
        if prev is not None and r["uptime_s"] > prev["uptime_s"]:
            total += (r["tokens"] - prev["tokens"]) / (r["uptime_s"] - prev["uptime_s"])
    return total


@app.command()
@friendly
def status(address: str | None = ADDRESS, as_json: bool = JSON) -> None:
    """Placement version, transport, tokens/s now, per-actor slots/memory/latency, per-router counters."""
    cluster = _connect(address)
    st = cluster.status()
    st["tokens_per_s"] = _tokens_per_s(cluster, st)
    t = Table(title=f"expertray — table v{st['table']['version']}, transport {st['transport']}, "
                    f"{st['tokens_per_s']:.0f} tokens/s")
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
            detail = r.get("transport_detail") or {}
            if detail:  # which transport and backend this router uses, and why
                backend = f" over {detail['backend']}" if detail.get("backend") else ""
                reason = f" ({detail['reason']})" if detail.get("reason") else ""
                console.print(f"  transport {detail.get('name')}{backend} on {r.get('device', 'cpu')}{reason}")
        for e in st.get("engines", []):  # Serve's engine replicas (attention, KV caches, scheduling)
            console.print(f"engine {e['replica']}: {e['running']} running, {e['waiting']} waiting, KV "
                          f"{e['kv_used']}/{e['kv_budget']}, {e['finished']} finished, {e['failed']} failed, "
                          f"{e['output_tokens']} tokens out, m={e['micro_batches']} (reported {e['reported_s_ago']} s ago)")
        for n in st.get("nodes", []):  # actors by Ray node
            routers = [r["router"] for r in st["routers"] if (r.get("node") or {}).get("node_id") == n.get("node_id")]
            console.print(f"node {n.get('ip', '?')} ({n.get('node_id', '')[:12]}{', head' if n.get('head') else ''})"
                          f": actors {', '.join(n.get('actors', [])) or '-'}; routers {', '.join(routers) or '-'}"
                          + (f"; {n['error']}" if "error" in n else ""))


@app.command()
@friendly
def experts(address: str | None = ADDRESS, layer: int | None = typer.Option(None, help="Only this layer."),
            as_json: bool = JSON) -> None:
    """Per logical expert: replicas, the actors holding them, window tokens, share, tokens/s since start."""
    from expertray.state.placement_table import PlacementTable
    from expertray.validation import check_layer

    st = _connect(address).status()
    table = PlacementTable.from_dict(st["table"])
    layers = range(table.num_layers) if layer is None else [check_layer(layer, table.num_layers)]
    rows = []
    for lyr in layers:
        load = [sum(r["layers"][lyr]["expert_load"][e] for r in st["routers"]) for e in range(table.num_experts)]
        total = [sum(r["layers"][lyr]["expert_tokens_total"][e] for r in st["routers"])
                 for e in range(table.num_experts)]
        uptime = max(r["uptime_s"] for r in st["routers"])
        denom = sum(load) or 1.0
        for e in range(table.num_experts):
            reps = table.replicas(lyr, e)
            rows.append({"expert": f"{lyr}:{e}", "replicas": len(reps), "actors": [s.actor for s in reps],
                         "tokens_per_batch": load[e], "share": load[e] / denom, "tokens_per_s": total[e] / uptime})
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
              address: str | None = ADDRESS) -> None:
    """Add a replica of a logical expert."""
    layer, e = parse_expert(expert)
    _print(_connect(address).replicate(layer, e, to), True)


@app.command()
@friendly
def migrate(expert: str = typer.Argument(..., help="LAYER:EXPERT"),
            to: str = typer.Option(..., "--to", help="Target actor."),
            src: str | None = typer.Option(None, "--from", help="Source actor (default: its first replica)."),
            address: str | None = ADDRESS) -> None:
    """Move one replica of a logical expert to another actor."""
    layer, e = parse_expert(expert)
    _print(_connect(address).migrate(layer, e, to, src), True)


@app.command()
@friendly
def drain(actor: str, address: str | None = ADDRESS) -> None:
    """Move every slot off an actor (weights copied first, no token lost), then remove it."""
    _print(_connect(address).drain(actor), True)


@app.command()
@friendly
def rebalance(policy: str = typer.Option("balanced", help="Placement policy (round_robin, balanced, ...)."),
              slots: int = typer.Option(0, help="Slots per actor per layer (0: experts/actors + 1)."),
              address: str | None = ADDRESS) -> None:
    """Re-plan replica counts and packing from the observed load; weights move before the switch."""
    _print(_connect(address).rebalance(policy, slots), True)


@app.command("add-actor")
@friendly
def add_actor(address: str | None = ADDRESS) -> None:
    """Start one more (empty) expert actor; the autoscaler or `migrate` fills it."""
    typer.echo(_connect(address).add_actor())


@autoscale_app.command("on")
@friendly
def autoscale_on(address: str | None = ADDRESS) -> None:
    _print(_connect(address).autoscale(True), True)


@autoscale_app.command("off")
@friendly
def autoscale_off(address: str | None = ADDRESS) -> None:
    _print(_connect(address).autoscale(False), True)


@autoscale_app.command("status")
@friendly
def autoscale_status(address: str | None = ADDRESS) -> None:
    _print(_connect(address).autoscale(None), True)


@app.command()
@friendly
def load(seconds: float = typer.Option(10.0, min=0.0, help="How long to send traffic."),
         skew: float = typer.Option(1.2, min=0.0, help="Zipf exponent of expert popularity (0: uniform)."),
         tokens: int = typer.Option(128, min=1, help="Tokens per request."),
         concurrency: int = typer.Option(8, min=1, help="Requests in flight."),
         check: bool = typer.Option(False, "--check", help="Check answers against random_model(cfg): only for "
                                                           "clusters serving random weights (expertray up)."),
         address: str | None = ADDRESS, as_json: bool = JSON) -> None:
    """Put the demo's skewed, shifting traffic on a running cluster (hidden states are shaped through the gates
    of random_model(cfg), the weights `expertray up` serves; on other weights the skew is approximate)."""
    from expertray.api import random_model
    from expertray.tools.demo import drive

    cluster = _connect(address)
    cfg = cluster.cfg
    say(f"load: {seconds:g} s of skew-{skew:g} traffic, {tokens} tokens x {concurrency} requests in flight, on "
        f"{cfg.num_layers} layers x {cfg.layer.num_experts} experts")
    summary = drive(cluster, random_model(cfg), seconds, skew, tokens, concurrency, check,
                    show=(lambda _: None) if as_json else console.print)
    _print(summary, True)
    if summary["errors"]:
        raise typer.Exit(1)


@app.command()
@friendly
def generate(model: str = typer.Option(..., "--model", help="Hugging Face checkpoint directory."),
             prompt: str | None = typer.Option(None, "--prompt", help="Prompt text (needs the checkpoint's "
                                                                       "tokenizer files)."),
             prompt_ids: str | None = typer.Option(None, "--prompt-ids", help="Prompt token ids, comma-separated "
                                                                               "(for checkpoints without a tokenizer)."),
             max_new_tokens: int = typer.Option(32, "--max-new-tokens", min=1),
             dtype: str | None = typer.Option(None, "--dtype", help="bfloat16 | float16 | float32 | auto."),
             actors: int | None = typer.Option(None, "--actors", min=1, help="Number of expert actors."),
             in_process: bool = typer.Option(False, "--in-process", help="Run the MoE layers in this process "
                                                                         "(no Ray) instead of on a new cluster."),
             as_json: bool = JSON) -> None:
    """Greedy generation end to end with a checkpoint's MoE layers on a new cluster; prints tokens/s."""
    from expertray.models.generate import generate as run_generate

    ids = None
    if prompt_ids is not None:
        try:
            ids = [int(t) for t in prompt_ids.split(",") if t.strip()]
        except ValueError:
            raise ConfigError(f"--prompt-ids must be comma-separated integers, got {prompt_ids!r}") from None
    options = {k: v for k, v in {"dtype": dtype, "num_expert_actors": actors}.items() if v is not None}
    backend: Any = "in_process"
    if not in_process:
        from expertray.api import ray_backend

        backend = ray_backend
    with progress(f"loading {model} and generating {max_new_tokens} tokens"):
        result = run_generate(model, prompt=prompt, prompt_ids=ids, max_new_tokens=max_new_tokens,
                              backend=backend, **options)
    if as_json:
        _print({"prompt_ids": result.prompt_ids, "new_ids": result.new_ids, "text": result.text,
                "seconds": result.seconds, "tokens_per_s": result.tokens_per_s, "dtype": result.dtype}, True)
    else:
        typer.echo(result.summary())


@app.command()
@friendly
def demo(seconds: float = typer.Option(20.0, help="How long to serve traffic."),
         config: Path | None = typer.Option(None, help="Cluster config (YAML/JSON); default: embedded.")) -> None:
    """The main job: a Ray of its own serving a multi-layer MoE with live balancing (any cluster that is up is
    left alone; `expertray load` drives that one)."""
    from expertray.tools.demo import run_demo

    run_demo(load_config(config), seconds)


def main() -> None:
    app()

