"""`expertray bench stall`: how long a placement change holds up a closed-loop stream.

A local cluster serving over the collective transport (a gloo group: every change of the actor set forms a
new group) takes a closed-loop stream (expertray/tools/bench/multinode.py's `Stream`: clients send one request at a
time and check every answer against the in-process layers) while placement changes of three kinds run, one
after the other, `repeats` times each:
- migrate: one expert moves to another actor (the actor set stays; no new group);
- add_actor: a new, empty expert actor joins the table (a new group forms);
- drain: that actor leaves the table (a new group forms, the old one closes).

Per change: the steady p50 / p99 of requests answered in the `steady_s` before it, the router's median batch
time then, the largest latency of a request in flight while the change ran, the added latency
(max − steady p99, in ms and in batch times) and how long the change took (the API call, start to end).
Medians over repeats per kind. Goal: at most one batch time added.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import typer

from expertray.tools.bench.report import emit, median, quantile

KINDS = ("migrate", "add_actor", "drain")


def change_figures(records: list[tuple[float, float, str]], t_start: float, t_end: float, steady_s: float,
                   batch_ms: float, swaps: Sequence[float] = ()) -> dict[str, Any]:
    """Stall figures of one change that ran from `t_start` to `t_end`; records are (sent, done, outcome) in
    seconds on one clock, `batch_ms` the router's steady batch time, `swaps` the moments (same clock) the
    routers swapped tables under their batch lanes.

    steady: requests answered in [t_start − steady_s, t_start). in flight: requests sent before t_end and
    answered after t_start (they could have waited on the change; with add_actor that includes the new
    actor's process start). at swap: requests in flight at a swap (they could have waited on the lane)."""
    if not batch_ms > 0:
        raise ValueError(f"batch time must be > 0 ms, got {batch_ms}")
    steady = [(e - s) * 1e3 for s, e, _ in records if t_start - steady_s <= e < t_start]
    during = [(e - s) * 1e3 for s, e, _ in records if s < t_end and e > t_start]
    if not steady or not during:
        raise ValueError(f"no requests {'before' if not steady else 'during'} the change: the stream is not running")
    p99 = quantile(steady, 0.99)
    worst = max(during)
    worst_at = max(e for s, e, _ in records if s < t_end and e > t_start and (e - s) * 1e3 == worst)
    at_swap = [(e - s) * 1e3 for s, e, _ in records if any(s <= t <= e for t in swaps)]
    swap_worst = max(at_swap, default=None)
    return {"steady_p50_ms": median(steady), "steady_p99_ms": p99, "batch_ms": batch_ms,
            "in_flight": len(during), "max_latency_ms": worst, "worst_done_after_s": worst_at - t_start,
            "added_ms": worst - p99, "added_batches": (worst - p99) / batch_ms, "change_s": t_end - t_start,
            "at_swap": len(at_swap), "max_at_swap_ms": swap_worst,
            "added_at_swap_batches": None if swap_worst is None else (swap_worst - p99) / batch_ms,
            "not_ok": sum(o != "ok" for s, e, o in records if s < t_end and e > t_start)}


def _batch_ms(cluster: Any) -> float:
    """The routers' median batch time (ms) over their recent batches (the largest, with several routers)."""
    return max(r["timing_ms_p50"]["batch"] for r in cluster.status()["routers"])


def _swaps(cluster: Any, since_wall: float) -> list[dict[str, float]]:
    """Each router's last table switch (RouterActor stats `last_switch`) if it ran after `since_wall`."""
    switches = [r.get("last_switch") or {} for r in cluster.status()["routers"]]
    return [s for s in switches if s.get("at", 0.0) >= since_wall]


def _migrate(cluster: Any, repeat: int) -> dict[str, Any]:
    """Move one expert of layer 0 from its first holder to the actor holding the fewest slots without it."""
    table = cluster.table()
    expert = repeat % table.num_experts
    held = [s.actor for s in table.replicas(0, expert)]
    dst = min((a for a in table.actors if a not in held), key=lambda a: (len(table.slots_of(a)), a))
    return cluster.migrate(0, expert, dst, held[0])


def run(repeats: int = 5, transport: str = "collective", routers: int = 1, clients: int = 2,
        steady_s: float = 2.0, num_cpus: int = 8) -> dict[str, Any]:
    """Launch a local cluster, stream, apply `repeats` × (migrate, add_actor, drain); per-change figures and
    medians per kind. Raises when the stream saw a wrong answer or an error."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    from expertray.api import init_ray, launch, random_model
    from expertray.config import ClusterConfig, GateConfig, MoELayerConfig
    from expertray.errors import ExpertRayError
    from expertray.tools.bench.multinode import D, Stream

    if repeats < 1 or steady_s <= 0:
        raise ValueError(f"repeats must be >= 1 and steady_s > 0, got {repeats}, {steady_s}")
    cfg = ClusterConfig(layer=MoELayerConfig(d_model=D, d_ff=24, gate=GateConfig("mixtral", 8, 2)), num_layers=2,
                        num_expert_actors=4, num_routers=routers, transport=transport, actor_num_cpus=0.1,
                        router_num_cpus=0.25, max_wait_ms=1.0, metrics_port=-1, request_timeout_s=60.0,
                        max_expert_actors=8)
    init_ray(num_cpus=num_cpus)
    changes: list[dict[str, Any]] = []
    try:
        layers = random_model(cfg)
        cluster = launch(cfg, layers, detached=False)
        try:
            transports = sorted({(r["transport_detail"] or {}).get("backend") or r["transport"]
                                 for r in cluster.status()["routers"]})
            stream = Stream(cluster, layers, clients=clients).start()
            try:
                time.sleep(steady_s + 1.0)  # warm up, then a full steady window before the first change
                for i in range(repeats):
                    added = ""
                    for kind in KINDS:
                        batch_ms = _batch_ms(cluster)
                        wall0 = time.time()
                        t0 = time.monotonic()
                        if kind == "migrate":
                            _migrate(cluster, i)
                        elif kind == "add_actor":
                            added = cluster.add_actor()
                        else:
                            cluster.drain(added)
                        t1 = time.monotonic()
                        swaps = _swaps(cluster, wall0)  # wall clock -> the stream's monotonic clock
                        time.sleep(steady_s)  # requests in flight during the change finish; the next steady window
                        with stream.lock:
                            records = list(stream.records)
                        at = [s["at"] - wall0 + t0 for s in swaps]
                        changes.append({"kind": kind, "repeat": i,
                                        **change_figures(records, t0, t1, steady_s, batch_ms, at),
                                        **{f"{k}_max": max((s[k] for s in swaps), default=None)
                                           for k in ("form_s", "lane_wait_s", "lane_held_s")}})
            finally:
                totals = stream.finish(cfg.request_timeout_s + 10.0)
            status = cluster.status()
        finally:
            cluster.shutdown()
    finally:
        ray.shutdown()
    if totals["wrong"] or totals["errors"] or totals["hung"]:
        raise ExpertRayError(f"bench stall: the stream saw wrong answers, errors or hung requests: {totals}")
    summary = {}
    for kind in KINDS:
        cs = [c for c in changes if c["kind"] == kind]
        summary[kind] = {"changes": len(cs), **{f"{k}_median": median([c[k] for c in cs]) for k in
                                                ("steady_p50_ms", "steady_p99_ms", "batch_ms", "max_latency_ms",
                                                 "added_ms", "added_batches", "change_s")},
                         "added_batches_max": max(c["added_batches"] for c in cs),
                         **{f"{k}_median": median(v) if (v := [c[k] for c in cs if c[k] is not None]) else None
                            for k in ("added_at_swap_batches", "form_s_max", "lane_wait_s_max", "lane_held_s_max")}}
    return {"command": f"expertray bench stall --repeats {repeats} --transport {transport} --routers {routers}",
            "setup": f"local Ray ({num_cpus} logical CPUs) on this machine; 4 expert actors, {routers} router(s), "
                     f"transport {transport} ({', '.join(map(str, transports))}); d_model {D}, 2 layers, 8 experts "
                     f"top-2; {clients} closed-loop clients (1-8 tokens); steady window {steady_s:g} s",
            "stream": totals, "final_table_version": status["table"]["version"], "summary": summary,
            "changes": changes}


def cli(repeats: int = typer.Option(5, help="Changes of each kind."),
        transport: str = typer.Option("collective", help="The routers' transport (collective forms gloo groups)."),
        routers: int = typer.Option(1, help="Routers (every one switches at each change)."),
        as_json: bool = typer.Option(False, "--json"), out: Path | None = None) -> None:
    """Stall a placement change adds to a closed-loop stream: steady p50/p99 and batch time before, max
    latency of requests in flight during the change, added = max − p99 (ms, batch times), change time."""
    r = run(repeats, transport, routers)
    rows = [[k, s["changes"], s["steady_p50_ms_median"], s["steady_p99_ms_median"], s["batch_ms_median"],
             s["max_latency_ms_median"], s["added_ms_median"], s["added_batches_median"], s["added_batches_max"],
             s["added_at_swap_batches_median"], s["form_s_max_median"], s["lane_wait_s_max_median"],
             s["change_s_median"]] for k, s in r["summary"].items()]
    emit("stall", r, rows, ["change", "n", "p50 ms", "p99 ms", "batch ms", "max in flight ms", "added ms",
                            "added batches", "added batches (max)", "added at swap", "form s", "lane wait s",
                            "change s"], as_json, out)
