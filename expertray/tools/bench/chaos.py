"""`expertray bench chaos`: steady mixed load on every interface while a seeded schedule injects overlapping
faults; every answer is checked against the in-process layers.

Load: expertray/tools/bench/chaos_load.py (blocking, future, async, direct and HTTP clients). Faults:
chaos_schedule.py (when, pure) and chaos_inject.py (how: kill / SIGSTOP / slow an expert actor, kill a router
or the controller, corrupt the snapshot before a controller restart, add and drain actors, rebalance; with
`--nodes N` the cluster is a multi-node `ray.cluster_utils.Cluster` of N worker raylets and nodes are removed
and added too). Results: chaos_report.py. Besides the answers, the run reports the Ray actors left alive
after shutdown that were not there before (leaked), the RSS growth of every expert actor process seen alive
for at least RSS_MIN_LIFE_S (first to last reading), and the object store's growth after shutdown.

Goals: 0 wrong, 0 hung, 0 leaked, and errors only where no live copy of a needed expert existed (can't-serve);
with shadows (`min_replicas_per_expert=2`, the default here) 0 errors.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray
import ray._private.state as gcs_state
import typer
from ray._private.internal_api import get_memory_info_reply, get_state_from_address, global_gc

from expertray.api import Cluster, init_ray, launch, random_model
from expertray.config import ClusterConfig, GateConfig, MoELayerConfig
from expertray.state.actor_names import NAMESPACE
from expertray.tools.bench.chaos_inject import SLOTS_PER_NODE, Coverage, Injector, expert_processes
from expertray.tools.bench.chaos_load import CLIENT_KINDS, Load, make_samples
from expertray.tools.bench.chaos_report import plot, summarize, timeline
from expertray.tools.bench.chaos_schedule import fault_kinds, make_schedule
from expertray.tools.bench.report import emit

log = logging.getLogger(__name__)

TRANSPORTS = ("channel", "object_store")
MIN_DURATION_S = 30.0  # the schedule's lead-in (5 s) and quiet tail (15 s) leave room for faults
SETTLE_S = 30.0  # how long shutdown gets to end every actor and free the store before what is left counts
RSS_EVERY_S = 10.0  # expert actors' RSS is read this often; growth counts for those seen RSS_MIN_LIFE_S apart
RSS_MIN_LIFE_S = 60.0


def _config(transport: str, shadows: bool, nodes: int) -> ClusterConfig:
    """A small model (2 layers, 8 experts top-2, d_model 64) on 4 expert actors and 2 routers."""
    return ClusterConfig(layer=MoELayerConfig(d_model=64, d_ff=128, gate=GateConfig("mixtral", 8, 2)),
                         num_layers=2, num_expert_actors=4, num_routers=2, transport=transport,
                         actor_num_cpus=0.25, router_num_cpus=0.25, metrics_port=-1, collective_timeout_s=10.0,
                         min_replicas_per_expert=2 if shadows else 1, max_expert_actors=8,
                         actor_resources={"expert_slot": 1} if nodes else {})


def _alive_actors() -> dict[str, str]:
    """Every live Ray actor: id -> name (or class)."""
    return {i: a.get("Name") or a.get("ActorClassName", "?")
            for i, a in gcs_state.actors(actor_state_name="ALIVE").items()}


def _rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _store_bytes() -> int:
    """Bytes used in the plasma stores (what `ray memory --stats-only` shows), after garbage collection."""
    gc.collect()
    global_gc()
    time.sleep(0.5)
    reply = get_memory_info_reply(get_state_from_address(ray.get_runtime_context().gcs_address))
    return int(reply.store_stats.object_store_bytes_used)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _ray(nodes: int) -> Iterator[Any]:
    """A Ray for the run: this process's own local one, or (nodes > 0) a head plus `nodes` worker raylets with
    SLOTS_PER_NODE expert slots each (the head has none, so expert actors live on workers). Yields the
    ray.cluster_utils.Cluster or None; shuts it all down afterwards."""
    if not nodes:
        init_ray(num_cpus=16)
        try:
            yield None
        finally:
            ray.shutdown()
        return
    from ray.cluster_utils import Cluster as RayNodes

    tmp = tempfile.mkdtemp(prefix="erch-", dir="/tmp")  # short: Ray's socket paths must stay short
    os.environ["RAY_TMPDIR"] = tmp
    os.makedirs(os.path.join(tmp, "ray"))  # where cluster_utils records the cluster's address
    cluster = RayNodes()
    try:
        cluster.add_node(num_cpus=8, include_dashboard=False, node_ip_address="127.0.0.1", temp_dir=tmp)
        for i in range(nodes):
            cluster.add_node(num_cpus=1, resources={"expert_slot": SLOTS_PER_NODE}, node_ip_address=f"127.0.0.{2 + i}")
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, namespace=NAMESPACE, logging_level="WARNING", log_to_driver=False)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def _settle_leaks(before: dict[str, str]) -> list[str]:
    """Actors alive now that were not before the run, once they had SETTLE_S to go away."""
    deadline = time.monotonic() + SETTLE_S
    while True:
        extra = sorted(name for i, name in _alive_actors().items() if i not in before)
        if not extra or time.monotonic() > deadline:
            return extra
        time.sleep(1.0)


def _serve(clients: tuple[str, ...]) -> str:
    if "http" not in clients:
        return ""
    from expertray.serve.layers import run_app

    return run_app(_free_port(), name="expertray-chaos", quiet=True)


def _stop_serve(base_url: str) -> None:
    if base_url:
        from ray import serve

        serve.shutdown()


def run(duration_s: float, seed: int = 0, shadows: bool = True, transport: str = "channel",
        clients: tuple[str, ...] = CLIENT_KINDS, kinds: tuple[str, ...] = (), nodes: int = 0, tokens: int = 16,
        plot_path: Path | None = None) -> dict[str, Any]:
    cfg = _config(transport, shadows, nodes)
    kinds = kinds or fault_kinds(nodes)
    events = make_schedule(seed, duration_s, kinds, shadows, cfg.num_expert_actors, nodes)
    layers = random_model(cfg)
    samples = make_samples(layers, tokens, seed)
    with _ray(nodes) as ray_nodes:
        before = _alive_actors()
        store_before = _store_bytes()
        cluster = launch(cfg, layers, detached=True)  # detached: Ray restarts a killed controller
        base_url = ""
        try:
            base_url = _serve(clients)
            for s in samples[:: len(samples) // cfg.num_layers]:  # warm every path once before the clock starts
                cluster.forward(s.layer, s.x)
                if "direct" in clients:
                    cluster.direct().forward(s.layer, s.x)
            measured = _measure(cluster, cfg, samples, clients, base_url, events, seed, ray_nodes, duration_s)
        finally:
            _stop_serve(base_url)
            _shutdown(cluster)
        leaked = _settle_leaks(before)
        store_after = _store_bytes()
    growth = {a: round(last - first, 1) for a, (first, last, lived_s) in measured["rss"].items()
              if lived_s >= RSS_MIN_LIFE_S}
    summary = summarize(measured["records"], measured["times"], measured["uncovered"])
    series = timeline(measured["records"], duration_s)
    config = {"seconds": duration_s, "seed": seed, "shadows": shadows, "transport": transport, "nodes": nodes,
              "clients": list(clients), "fault_kinds": list(kinds), "tokens": tokens,
              "request_timeout_s": cfg.request_timeout_s, "min_replicas_per_expert": cfg.min_replicas_per_expert,
              "expert_actors": cfg.num_expert_actors, "routers": cfg.num_routers}
    faults = sorted(measured["faults"], key=lambda f: f["at_s"])
    result = {"config": config, "summary": {**summary, "leaked": leaked,
              "faults_applied": sum(f["ok"] for f in faults), "faults_failed": sum(not f["ok"] for f in faults),
              "rss_growth_mib": growth, "rss_growth_max_mib": max(growth.values(), default=None),
              "object_store_growth_bytes": store_after - store_before, "stuck_at_end": measured["stuck"]},
              "faults": faults, "schedule": [e.to_dict() for e in events], "timeline": series}
    result["goals"] = goals(result["summary"], shadows)
    if plot_path is not None:
        title = (f"expertray bench chaos: seed {seed}, {duration_s / 60:g} min, transport {transport}, "
                 f"shadows {'on' if shadows else 'off'}" + (f", {nodes} worker nodes" if nodes else ""))
        result["plot"] = plot(series, faults, plot_path, title)
    return result


def _measure(cluster: Cluster, cfg: ClusterConfig, samples: list, clients: tuple[str, ...], base_url: str,
             events: list, seed: int, ray_nodes: Any, duration_s: float) -> dict[str, Any]:
    """The timed part: load, coverage and injector run for `duration_s`; everything is stopped (bounded)."""
    t0 = time.monotonic()
    coverage = Coverage(cluster, t0)
    load = Load(cluster, samples, clients, base_url, cfg.request_timeout_s, t0)
    injector = Injector(cluster, events, coverage, t0, seed, ray_nodes)
    coverage.start()
    load.start()
    injector.start()
    rss: dict[str, tuple[float, float, float, float]] = {}
    try:
        next_rss = 0.0
        while (left := t0 + duration_s - time.monotonic()) > 0:
            if time.monotonic() - t0 >= next_rss:
                _track_rss(rss, time.monotonic() - t0)
                next_rss += RSS_EVERY_S
            injector.serve_main_calls(timeout_s=min(left, 0.5))
        _track_rss(rss, duration_s)
    finally:
        injector.finish(timeout_s=cfg.control_timeout_s * 2)
        stuck = load.finish()
        times, uncovered = coverage.finish()
    return {"records": load.records, "times": times, "uncovered": uncovered, "faults": injector.log,
            "stuck": stuck, "rss": {a: (first, last, seen - since) for a, (first, last, since, seen) in rss.items()}}


def _track_rss(rss: dict[str, tuple[float, float, float, float]], now_s: float) -> None:
    """Update, for every live expert actor process (actor id and pid), its first and latest RSS (MiB) and
    when they were read."""
    for actor, proc in expert_processes().items():
        mib = _rss_mib(proc["pid"])
        if mib is None:
            continue
        key = f"{actor}:{proc['pid']}"
        first, _, since, _ = rss.get(key, (mib, mib, now_s, now_s))
        rss[key] = (first, mib, since, now_s)


def _shutdown(cluster: Cluster) -> None:
    try:
        cluster.shutdown()
    except Exception as exc:  # noqa: BLE001 - what it left behind is counted as leaked
        log.warning("chaos: cluster shutdown failed: %s", exc)
        with contextlib.suppress(Exception):
            ray.kill(cluster.controller, no_restart=True)


def goals(summary: dict[str, Any], shadows: bool) -> dict[str, bool]:
    """Each goal of the run and whether it was met."""
    out = {"0 wrong": summary["wrong"] == 0, "0 hung": summary["hung"] == 0, "0 leaked": not summary["leaked"],
           "errors only can't-serve": summary["errors_other"] == 0}
    if shadows:
        out["0 errors (shadows on)"] = summary["errors"] == 0
    return out


def _split(option: str, value: str, known: tuple[str, ...]) -> tuple[str, ...]:
    names = tuple(v.strip() for v in value.split(",") if v.strip())
    bad = [n for n in names if n not in known]
    if bad or not names:
        raise typer.BadParameter(f"{option}: {', '.join(bad) or 'nothing given'} not among {', '.join(known)}")
    return names


def cli(minutes: float = typer.Option(10.0, help="Run length in minutes (> 0)."),
        seconds: float | None = typer.Option(None, help=f"Run length in seconds instead (>= {MIN_DURATION_S:g})."),
        seed: int = typer.Option(0, help="Seed of the fault schedule and of the targets."),
        shadows: bool = typer.Option(True, help="min_replicas_per_expert=2 (goal: 0 errors), else 1."),
        transport: str = typer.Option("channel", help=f"One of {', '.join(TRANSPORTS)}."),
        clients: str = typer.Option(",".join(CLIENT_KINDS), help="Comma-separated interfaces to load."),
        faults: str = typer.Option("", help="Comma-separated fault kinds (default: all of the mode)."),
        nodes: int = typer.Option(0, help="Worker nodes of a multi-node ray.cluster_utils.Cluster (0: one node; "
                                          "else >= 3); adds node removal and addition."),
        plot_path: Path = typer.Option(Path("chaos.png"), "--plot", help="Timeline PNG (needs matplotlib)."),
        as_json: bool = typer.Option(False, "--json"), out: Path | None = None) -> None:
    """Chaos under load: overlapping faults on a seeded schedule while every interface sends requests; wrong,
    hung, errors (can't-serve or not), leaked actors, RSS and object-store growth."""
    if minutes <= 0:
        raise typer.BadParameter(f"--minutes must be > 0, got {minutes}")
    duration_s = seconds if seconds is not None else minutes * 60
    if duration_s < MIN_DURATION_S:
        raise typer.BadParameter(f"the run must last at least {MIN_DURATION_S:g} s (the schedule leaves 5 s before "
                                 f"the first fault and 15 s after the last), got {duration_s:g} s")
    if transport not in TRANSPORTS:
        raise typer.BadParameter(f"--transport must be one of {', '.join(TRANSPORTS)}, got {transport!r}")
    if nodes < 0 or 0 < nodes < 3:
        raise typer.BadParameter(f"--nodes must be 0 (one node) or >= 3 (room to replace a lost node), got {nodes}")
    picked = _split("--clients", clients, CLIENT_KINDS)
    kinds = _split("--faults", faults, fault_kinds(nodes)) if faults else ()
    r = run(duration_s, seed, shadows, transport, picked, kinds, nodes, plot_path=plot_path)
    s = r["summary"]
    errors = ", ".join(f"{k} {v['cant_serve']}+{v['other']}" for k, v in s["error_kinds"].items()) or "-"
    rows = [["requests", s["requests"]], ["correct", s["correct"]], ["wrong", s["wrong"]], ["hung", s["hung"]],
            ["errors (can't-serve / other)", f"{s['errors_cant_serve']} / {s['errors_other']}"],
            ["errors by kind (can't-serve+other)", errors], ["leaked actors", len(s["leaked"])],
            ["faults applied / failed", f"{s['faults_applied']} / {s['faults_failed']}"],
            ["p50 / p99 ms", f"{s['p50_ms'] or 0:.1f} / {s['p99_ms'] or 0:.1f}"],
            ["expert RSS growth max MiB", s["rss_growth_max_mib"]],
            ["object store growth bytes", s["object_store_growth_bytes"]],
            *[[f"goal: {g}", "met" if ok else "MISSED"] for g, ok in r["goals"].items()]]
    emit("chaos", r, rows, ["metric", "value"], as_json, out)
