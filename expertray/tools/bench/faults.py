"""`expertray bench faults`: inject one fault per scenario under a concurrent request stream and count what
the clients saw: requests, correct, wrong, errors, hung, and the time from the fault to serving again.

Scenarios: kill an expert actor; kill an expert actor whose every expert also has a replica on another
actor (`kill_replicated_expert`: routers fail over to the replicas at once, the heal runs in the background);
SIGSTOP (hang) an expert actor, with or without a replica of each of its experts elsewhere
(`hang_replicated_expert`: the controller's liveness pings push it to the routers); a 3x straggler; kill a router (of two); kill the detached controller (Ray
restarts it); corrupt the snapshot, kill the controller, then kill an expert actor while the controller runs
degraded. Every answer is compared with the in-process MoELayer (atol 1e-5). `hung`: a request with no
answer and no error within request_timeout_s + 10 s. `serving again`: from the fault to the first correct
answer to a request sent after it (a hang blocks only the few requests waiting on the hung actor, so `max
latency after fault` shows how long they waited). `heal done`: from the fault to the controller's first heal
event (the replacement actor loaded and every router switched). Router counters: `masked_retries` (batches retried at
once on surviving replicas) and `served_while_healing` (batches answered while a heal was still running).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import ray
import torch
import typer

from expertray.api import Cluster, init_ray, launch, random_model
from expertray.config import ClusterConfig, GateConfig, MoELayerConfig
from expertray.errors import ConfigError
from expertray.state.actor_names import NAMESPACE, ray_name
from expertray.state.placement_table import PlacementTable
from expertray.tools.bench.report import emit, quantile

SCENARIOS = ("kill_expert", "kill_replicated_expert", "hang_expert", "hang_replicated_expert", "straggler",
             "kill_router", "kill_controller", "bad_snapshot_then_expert_death")
VICTIM = "expert-1"
HUNG_GRACE_S = 10.0


class _Stream:
    """`clients` threads, each sending requests back to back through Cluster.forward and checking answers."""

    def __init__(self, cluster: Cluster, layers: list, d_model: int, tokens: int, clients: int) -> None:
        gen = torch.Generator().manual_seed(0)
        self.inputs = [torch.randn(tokens, d_model, generator=gen) for _ in range(16)]
        self.expected = [[m(x) for x in self.inputs] for m in layers]
        self.cluster, self.num_layers = cluster, len(layers)
        self.records: list[tuple[float, float, str]] = []  # (sent, done, outcome), perf_counter seconds
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(c,), daemon=True) for c in range(clients)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def _run(self, client: int) -> None:
        i = client
        while not self.stop.is_set():
            layer, k = i % self.num_layers, i % len(self.inputs)
            sent = time.perf_counter()
            try:
                out = self.cluster.forward(layer, self.inputs[k])
                outcome = "correct" if torch.allclose(out, self.expected[layer][k], atol=1e-5, rtol=0) else "wrong"
            except Exception as exc:  # noqa: BLE001 - counted by kind: a clear error is allowed, silence is not
                outcome = f"error:{type(exc).__name__}"
            with self.lock:
                self.records.append((sent, time.perf_counter(), outcome))
            i += len(self.threads)

    def finish(self, request_timeout_s: float) -> int:
        """Stop sending; returns how many clients are still waiting after the hung deadline."""
        self.stop.set()
        for t in self.threads:
            t.join(timeout=request_timeout_s + HUNG_GRACE_S)
        return sum(t.is_alive() for t in self.threads)


def replicate_elsewhere(table: PlacementTable, victim: str) -> PlacementTable:
    """`table` plus a replica of every expert `victim` holds alone, all on one other actor (the one with the
    fewest slots). One source for the heal: it loads the replacement from that actor in a single call
    (concurrent loads into one expert actor race: see docs/RELIABILITY.md)."""
    table.check_actor(victim)
    others = [a for a in table.actors if a != victim]
    if not others:
        raise ConfigError(f"{victim!r} is the only actor: nowhere to replicate its experts")
    target = min(others, key=lambda a: (len(table.slots_of(a)), a))
    for s in table.slots_of(victim):
        if all(r.actor == victim for r in table.replicas(s.layer, s.expert)):
            table = table.replicate(s.layer, s.expert, target)
    return table


def _prepare(name: str, cluster: Cluster) -> dict[str, Any]:
    """Set the scenario up before the stream starts (*_replicated_expert: replicate the victim's experts)."""
    if name not in ("kill_replicated_expert", "hang_replicated_expert"):
        return {}
    table = cluster.table()
    event = cluster.apply_table(replicate_elsewhere(table, VICTIM), f"bench: replicate {VICTIM}'s experts")
    return {"replicas_added": len(event["added"])}


def kill_expert_actor(actor: str) -> None:
    """Kill expert actor `actor` (e.g. "expert-1") for good: Ray does not restart it, the controller heals."""
    ray.kill(ray.get_actor(ray_name(actor), namespace=NAMESPACE), no_restart=True)


def resume_process(pid: int) -> bool:
    """SIGCONT a process this bench stopped; False when it is gone (killed meanwhile by the heal)."""
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        return False
    return True


def corrupt_snapshot(cluster: Cluster) -> str:
    """Overwrite the controller's snapshot file with garbage; returns its path."""
    info = ray.get(cluster.controller.info.remote(), timeout=30)
    path = Path(info["state_dir"], "snapshot.msgpack")
    path.write_bytes(b"\x00 corrupted")
    return str(path)


def restart_controller(cluster: Cluster, timeout_s: float = 60.0) -> dict[str, Any]:
    """Kill the detached controller (Ray restarts it) and wait until the restarted one (Ray's restart count
    went up) answers with its state restored; returns its info ({} if it did not within `timeout_s`)."""
    restarts = _restarts(cluster.controller)
    ray.kill(cluster.controller, no_restart=False)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:  # the old controller may answer briefly: wait for the new one
        try:
            if _restarts(cluster.controller) > restarts:
                info = ray.get(cluster.controller.info.remote(), timeout=5)
                if info["restored"]:
                    return info
        except Exception:  # noqa: BLE001 - restarting
            pass
        time.sleep(0.25)
    return {}


def _restarts(actor: Any) -> int:
    """How many times Ray has restarted `actor` (from the GCS: no call to the actor)."""
    info = ray._private.state.actors(actor_id=actor._actor_id.hex())
    return int(info.get("NumRestarts", 0))


def _inject(name: str, cluster: Cluster, cfg: ClusterConfig) -> dict[str, Any]:
    """Apply the scenario's fault; returns what was done (and anything to undo)."""
    if name == "kill_replicated_expert":
        kill_expert_actor(VICTIM)
        return {"fault": f"ray.kill({VICTIM}), every expert of it replicated elsewhere"}
    if name == "kill_expert":
        kill_expert_actor(VICTIM)
        return {"fault": f"ray.kill({VICTIM})"}
    if name in ("hang_expert", "hang_replicated_expert"):
        pid = cluster.status()["actors"][VICTIM]["pid"]
        os.kill(pid, signal.SIGSTOP)
        return {"fault": f"SIGSTOP {VICTIM} (pid {pid})", "pid": pid}
    if name == "straggler":
        ray.get(cluster.controller.set_actor_slowdown.remote(VICTIM, 3.0))
        return {"fault": f"{VICTIM} 3x slower"}
    if name == "kill_router":
        ray.kill(cluster.routers[0], no_restart=True)
        return {"fault": "ray.kill(router-0) of 2"}
    if name == "kill_controller":
        ray.kill(cluster.controller, no_restart=False)
        return {"fault": "ray.kill(controller), Ray restarts it"}
    corrupt_snapshot(cluster)
    info = restart_controller(cluster)
    kill_expert_actor(VICTIM)
    return {"fault": f"corrupted snapshot + controller restart, then ray.kill({VICTIM})",
            "controller_degraded": bool(info.get("degraded")), "snapshot_error": info.get("snapshot_error")}


def _scenario(name: str, cfg: ClusterConfig, before_s: float, after_s: float, tokens: int, clients: int) -> dict:
    layers = random_model(cfg)
    detached = name in ("kill_controller", "bad_snapshot_then_expert_death")
    cluster = launch(cfg, layers, detached=detached)
    stream = _Stream(cluster, layers, cfg.layer.d_model, tokens, clients)
    fault: dict[str, Any] = {}
    try:
        prepared = _prepare(name, cluster)
        stream.start()
        time.sleep(before_s)
        t_fault, t_fault_wall = time.perf_counter(), time.time()
        fault = {**prepared, **_inject(name, cluster, cfg)}
        time.sleep(after_s)
        hung = stream.finish(cfg.request_timeout_s)
        status = cluster.status()
        routers = _router_counters(cluster)
    finally:
        if "pid" in fault:
            resume_process(fault["pid"])
        cluster.shutdown()
    recs = stream.records
    hung += sum(1 for s, d, _ in recs if d - s > cfg.request_timeout_s + HUNG_GRACE_S)
    after = sorted(d for s, d, o in recs if s >= t_fault and o == "correct")
    errors: dict[str, int] = {}
    for _, _, o in recs:
        if o.startswith("error:"):
            errors[o[6:]] = errors.get(o[6:], 0) + 1
    lat = [(d - s) * 1e3 for s, d, _ in recs if s >= t_fault]
    error_times = [d - t_fault for _, d, o in recs if o.startswith("error:")]
    return {"scenario": name, **{k: v for k, v in fault.items() if k != "pid"}, "requests": len(recs),
            "correct": sum(o == "correct" for *_, o in recs), "wrong": sum(o == "wrong" for *_, o in recs),
            "errors": sum(errors.values()), "error_kinds": errors, "hung": hung,
            "errors_from_to_s": [min(error_times), max(error_times)] if error_times else None,
            "serving_again_s": after[0] - t_fault if after else None,
            "p99_after_fault_ms": quantile(lat, 0.99) if lat else None,
            "max_latency_after_fault_ms": max(lat) if lat else None,
            "heals": [h["reason"] for h in status["history"] if h["reason"].startswith("heal")],
            "heal_done_s": next((h["t"] - t_fault_wall for h in status["history"]
                                 if h["reason"].startswith("heal") and h["t"] >= t_fault_wall), None),
            **routers,
            "routers_down_at_end": len(status["routers_down"]), "controller": status["controller"]}


def _router_counters(cluster: Cluster) -> dict[str, int]:
    """Failover counters summed over the live routers (0 where a router predates them or is gone)."""
    out = {"masked_retries": 0, "served_while_healing": 0}
    for r in cluster.routers:
        try:
            stats = ray.get(r.stats.remote(), timeout=10)
        except Exception:  # noqa: BLE001 - a killed router (kill_router scenario) has no counters
            continue
        for k in out:
            out[k] += int(stats.get(k, 0))
    return out


def run(scenarios: tuple[str, ...] = SCENARIOS, transport: str = "auto", before_s: float = 3.0,
        after_s: float = 12.0, tokens: int = 16, clients: int = 2, collective_timeout_s: float = 10.0) -> dict:
    unknown = [s for s in scenarios if s not in SCENARIOS]
    if unknown:
        raise typer.BadParameter(f"unknown scenario {unknown[0]!r} (known: {', '.join(SCENARIOS)})")
    init_ray(num_cpus=16)
    results = []
    for name in scenarios:
        cfg = ClusterConfig(layer=MoELayerConfig(d_model=64, d_ff=128, gate=GateConfig("mixtral", 8, 2)),
                            num_layers=2, num_expert_actors=3, num_routers=2 if name == "kill_router" else 1,
                            transport=transport, actor_num_cpus=0.25, router_num_cpus=0.25, metrics_port=-1,
                            collective_timeout_s=collective_timeout_s)
        results.append(_scenario(name, cfg, before_s, after_s, tokens, clients))
    return {"config": {"transport": transport, "before_s": before_s, "after_s": after_s, "tokens": tokens,
                       "clients": clients, "collective_timeout_s": collective_timeout_s,
                       "request_timeout_s": collective_timeout_s + 5.0}, "scenarios": results}


def cli(scenario: list[str] = typer.Option(list(SCENARIOS), "--scenario", help="Repeat to pick several."),
        transport: str = "auto", after_s: float = 12.0, clients: int = 2,
        as_json: bool = typer.Option(False, "--json"), out: Path | None = None) -> None:
    """Fault table: kill / hang / slow each piece under a request stream; requests, correct, wrong, errors,
    hung, time to serving again."""
    r = run(tuple(scenario), transport=transport, after_s=after_s, clients=clients)
    rows = [[x["scenario"], x["requests"], x["correct"], x["wrong"], x["errors"], x["hung"], x["serving_again_s"],
             x["heal_done_s"], x["p99_after_fault_ms"], x["max_latency_after_fault_ms"]] for x in r["scenarios"]]
    emit("faults", r, rows, ["scenario", "requests", "correct", "wrong", "errors", "hung", "serving again s",
                             "heal done s", "p99 after fault ms", "max latency after fault ms"], as_json, out)
