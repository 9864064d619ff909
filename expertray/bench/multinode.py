"""Multi-node scenarios on a real Ray cluster of several raylets on this machine (`ray.cluster_utils.Cluster`),
run in a process of their own (a process holds one Ray connection; the test session already has one).

    python -m expertray.bench.multinode [--scenarios spread,connect,grow,remove_node] [--repeats 1]

tests/integration/test_multinode.py runs it and checks the result; `expertray bench recovery` runs the
kill_actor and remove_node scenarios with repeats and reports recovery figures (docs/RELIABILITY.md).

Cluster: a head (CPUs only: the controller, routers and this driver) and worker raylets, each with a custom
`expert_slot` resource standing in for GPUs; expert actors ask for one `expert_slot` each, so they can run
only on workers. Everything binds 127.0.0.1, no dashboard, and Ray's temp dir (with its "current cluster"
address file) is private to this run, so other Ray instances on the machine neither see nor are touched by it.

Scenarios, in order, on one cluster (each records its result or its error; later ones go on):
- spread: 4 actors on two 2-slot workers -> 2 per worker; a replica added with no actor named goes to the
  other worker than the expert's home; answers equal the in-process layers.
- connect: a second driver process `connect(address)`s, reads status and gets correct answers.
- grow: with both workers full, a 3-slot worker joins while a stream runs; `add_actor` lands on it.
- remove_node: a worker holding two actors is removed (killed) under a concurrent stream: every request gets a
  correct answer or a clear error, none hangs; after healing every answer is correct. A fresh worker then
  joins, so a repeat has room again.
- remove_replicated_node: remove_node, but first every expert the doomed actors hold gets a replica on an
  actor of another worker, so routers can serve every request from survivors while the heal runs.
- kill_actor: one expert actor on a worker is killed (ray.kill) under a stream; the same checks.
The fault scenarios report recovery figures (`recovery_figures`): time from the fault to the first correct
answer to a request sent after it, time until latency is steady again, the largest latency, and p99 before.

Prints one JSON line (the last line of stdout): {"scenarios": {name: {...} | {"error": ...}}, "wall_s": ...}.
The cluster is shut down in `finally`; SIGTERM and the internal budget (SIGALRM) both end up there.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from typing import Any

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import torch  # noqa: E402

from expertray.names import CONTROLLER, NAMESPACE, ray_name  # noqa: E402

D = 16
LOOPBACK = "127.0.0.1"
SCENARIOS = ("spread", "connect", "grow", "remove_node", "remove_replicated_node", "kill_actor")
FAULT_SCENARIOS = ("remove_node", "remove_replicated_node", "kill_actor")
DEFAULT_SCENARIOS = ("spread", "connect", "grow", "remove_node")
SLOTS_PER_WORKER = 2


def recovery_figures(records: list[tuple[float, float, str]], t_fault: float) -> dict[str, float | None]:
    """Recovery of a closed-loop stream from a fault at `t_fault`; records are (sent, done, outcome) seconds.

    first_ok_s: fault -> first correct answer to a request sent after it. steady_s: fault -> the end of the
    last slow request (latency > 2x the p99 before the fault, and > p99 + 20 ms); after it every request is
    within that bound (0 when none was slow). max_latency_s: the largest latency of a request answered after
    the fault. p99_before_s: the steady p99 before it (None without requests before the fault)."""
    before = sorted(e - s for s, e, _ in records if e < t_fault)
    p99 = before[min(len(before) - 1, round(0.99 * (len(before) - 1)))] if before else None
    after = [(s, e, o) for s, e, o in records if e >= t_fault]
    oks = [e for s, e, o in after if s >= t_fault and o == "ok"]
    bound = max(2 * p99, p99 + 0.02) if p99 is not None else None
    slow = [e for s, e, _ in after if bound is not None and e - s > bound]
    return {"first_ok_s": min(oks) - t_fault if oks else None,
            "steady_s": max(slow) - t_fault if slow else 0.0,
            "max_latency_s": max((e - s for s, e, _ in after), default=0.0), "p99_before_s": p99}


class Budget(Exception):
    """The run's wall-clock budget (or a SIGTERM) ran out."""


def _raise_budget(signum: int, frame: Any) -> None:
    raise Budget(f"signal {signum}: budget exhausted or terminated")


class Stream:
    """A closed-loop stream: `clients` threads, each sending one request at a time and checking the answer
    against the in-process layers. Outcomes: ok, wrong (answered, not equal), error (a raised error, by
    type); a request still in flight when the stream is joined past its deadline is hung."""

    def __init__(self, cluster: Any, layers: list[Any], clients: int = 2, seed: int = 0) -> None:
        self.cluster, self.layers = cluster, layers
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.records: list[tuple[float, float, str]] = []  # (start, end, outcome)
        self.in_flight: dict[int, float] = {}
        self.threads = [threading.Thread(target=self._run, args=(i, seed + i), daemon=True) for i in range(clients)]

    def start(self) -> Stream:
        for t in self.threads:
            t.start()
        return self

    def _run(self, index: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        while not self.stop.is_set():
            layer = int(torch.randint(0, len(self.layers), (1,), generator=gen))
            x = torch.randn(int(torch.randint(1, 9, (1,), generator=gen)), D, generator=gen)
            start = time.monotonic()
            with self.lock:
                self.in_flight[index] = start
            try:
                out = self.cluster.forward(layer, x)
                with torch.no_grad():
                    ok = torch.allclose(out, self.layers[layer](x), atol=1e-4, rtol=0)
                outcome = "ok" if ok else "wrong"
            except Exception as exc:  # noqa: BLE001 - recorded by type: the test decides what is clear
                outcome = f"error:{type(exc).__name__}"
            with self.lock:
                self.in_flight.pop(index, None)
                self.records.append((start, time.monotonic(), outcome))

    def finish(self, join_s: float) -> dict[str, Any]:
        self.stop.set()
        deadline = time.monotonic() + join_s
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        with self.lock:
            records, hung = list(self.records), len(self.in_flight)
        errors: dict[str, int] = {}
        for _, _, o in records:
            if o.startswith("error:"):
                errors[o[6:]] = errors.get(o[6:], 0) + 1
        return {"requests": len(records) + hung, "ok": sum(o == "ok" for _, _, o in records),
                "wrong": sum(o == "wrong" for _, _, o in records), "errors": errors, "hung": hung,
                "max_latency_s": max((e - s for s, e, _ in records), default=0.0)}

    def figures(self, t_fault: float) -> dict[str, float | None]:
        with self.lock:
            return recovery_figures(list(self.records), t_fault)


def _where(status: dict[str, Any]) -> dict[str, str | None]:
    return {a: (s.get("node") or {}).get("node_id") for a, s in status["actors"].items()}


def _wait(predicate: Any, timeout_s: float, what: str, interval_s: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout_s:g} s")
        time.sleep(interval_s)


def _changes(c: Any, since: float) -> list[tuple[float, str]]:
    """Placement changes (heals) after the fault: (seconds after it, reason), from the controller's history."""
    return [(round(e["t"] - since, 2), e["reason"][:120]) for e in c.status()["history"] if e["t"] >= since]


def _correct(cluster: Any, layers: list[Any], n: int = 6) -> bool:
    gen = torch.Generator().manual_seed(99)
    for i in range(n):
        x = torch.randn(3, D, generator=gen)
        if not torch.allclose(cluster.forward(i % len(layers), x), layers[i % len(layers)](x), atol=1e-4, rtol=0):
            return False
    return True


def _controller_node() -> str | None:
    import ray

    from expertray.actors.pools import actor_location

    where = actor_location(ray.get_actor(CONTROLLER, namespace=NAMESPACE))
    return where and where["node_id"]


def scenario_spread(c: Any, layers: list[Any], workers: dict[str, Any]) -> dict[str, Any]:
    st = c.status()
    where = _where(st)
    per_node = {w: sorted(a for a, n in where.items() if n == w) for w in workers}
    table = c.table()
    home = table.replicas(0, 0)[0].actor
    c.replicate(0, 0)
    new = [s.actor for s in c.table().replicas(0, 0) if s.actor != home]
    return {"actors_per_worker": sorted(len(v) for v in per_node.values()),
            "actors_on_head": sum(n not in workers for n in where.values()),
            "replica_nodes": [where[home], where.get(new[0]) if new else None],
            "controller_on_head": _controller_node() not in workers,
            "router_node_known": all((r.get("node") or {}).get("node_id") for r in st["routers"]),
            "nodes_listed": len(st["nodes"]), "correct": _correct(c, layers)}


def scenario_connect(address: str) -> dict[str, Any]:
    code = ("import json, os, torch\n"
            "os.environ.setdefault('RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER', '0')\n"
            "from expertray.api import connect, random_model\n"
            f"c = connect({address!r})\n"
            "layers = random_model(c.cfg)\n"
            f"x = torch.randn(5, {D}, generator=torch.Generator().manual_seed(3))\n"
            "ok = all(torch.allclose(c.forward(i, x), layers[i](x), atol=1e-4, rtol=0) for i in range(2))\n"
            "print(json.dumps({'actors': len(c.status()['actors']), 'correct': bool(ok)}))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=90,
                          env=os.environ.copy())
    if proc.returncode != 0:
        raise RuntimeError(f"second driver exited {proc.returncode}: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def scenario_grow(c: Any, layers: list[Any], cluster: Any, workers: dict[str, Any]) -> dict[str, Any]:
    stream = Stream(c, layers, seed=10).start()
    try:
        time.sleep(1.0)
        node = cluster.add_node(num_cpus=1, resources={"expert_slot": 3}, node_ip_address=LOOPBACK)
        workers[node.node_id] = node
        actor = c.add_actor()
        where = _where(c.status())
        time.sleep(1.0)
    finally:
        result = stream.finish(join_s=c.cfg.request_timeout_s + 10)
    return {"new_actor_on_new_node": where.get(actor) == node.node_id, "stream": result,
            "correct": _correct(c, layers)}


def _replicate_off(c: Any, doomed: list[str], where: dict[str, str | None]) -> int:
    """Give every expert that only `doomed` actors hold a replica on a surviving actor (the one with the
    fewest slots), in one placement change; returns the replicas added."""
    table = c.table()
    survivors = [a for a in table.actors if a not in doomed and where.get(a) != where.get(doomed[0])]
    added = 0
    for layer in range(table.num_layers):
        for e in range(table.num_experts):
            holders = {s.actor for s in table.replicas(layer, e)}
            if holders <= set(doomed):
                target = min(survivors, key=lambda a: (len(table.slots_of(a)), a))
                table, added = table.replicate(layer, e, target), added + 1
    if added:
        c.apply_table(table, f"bench: replicate the experts of {', '.join(doomed)} off their node")
    return added


def scenario_remove(c: Any, layers: list[Any], cluster: Any, workers: dict[str, Any],
                    replicated: bool = False) -> dict[str, Any]:
    where = _where(c.status())
    victim_id = max(workers, key=lambda w: (sum(n == w for n in where.values()), w))
    doomed = sorted(a for a, n in where.items() if n == victim_id)
    replicas_added = _replicate_off(c, doomed, where) if replicated else 0

    def healed() -> dict[str, Any] | None:
        st = c.status()
        fine = all(s["alive"] for s in st["actors"].values()) and not set(doomed) & set(st["actors"])
        return st if fine else None

    stream = Stream(c, layers, seed=20).start()
    try:
        time.sleep(1.5)
        cluster.remove_node(workers.pop(victim_id), allow_graceful=False)  # returns once its processes are dead
        t_remove, wall_remove = time.monotonic(), time.time()  # the fault: from here nothing there answers
        st = _wait(healed, 60, "actors on the removed node replaced")
        healed_s = time.monotonic() - t_remove
        time.sleep(2.0)  # a steady stretch after recovery
    finally:
        result = stream.finish(join_s=c.cfg.request_timeout_s + 10)
    after = _where(st)
    out = {"removed_actors": doomed, "replicas_added": replicas_added, "replaced_on_live_nodes": all(n in workers for n in after.values()),
           "stream": result, **stream.figures(t_remove), "healed_s": healed_s,
           "correct_after": _correct(c, layers, n=10), "changes": _changes(c, wall_remove)}
    node = cluster.add_node(num_cpus=1, resources={"expert_slot": SLOTS_PER_WORKER}, node_ip_address=LOOPBACK)
    workers[node.node_id] = node  # room for the next repeat
    return out


def scenario_kill_actor(c: Any, layers: list[Any], workers: dict[str, Any]) -> dict[str, Any]:
    import ray

    victim = sorted(a for a, n in _where(c.status()).items() if n in workers)[0]

    def healed() -> bool:
        st = c.status()
        return all(s["alive"] for s in st["actors"].values()) and victim not in st["actors"]

    stream = Stream(c, layers, seed=30).start()
    try:
        time.sleep(1.5)
        t_kill, wall_kill = time.monotonic(), time.time()
        ray.kill(ray.get_actor(ray_name(victim), namespace=NAMESPACE), no_restart=True)
        _wait(healed, 60, f"{victim} replaced")
        healed_s = time.monotonic() - t_kill
        time.sleep(2.0)
    finally:
        result = stream.finish(join_s=c.cfg.request_timeout_s + 10)
    return {"killed": victim, "stream": result, **stream.figures(t_kill), "healed_s": healed_s,
            "correct_after": _correct(c, layers, n=10), "changes": _changes(c, wall_kill)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=int, default=200)
    parser.add_argument("--scenarios", default=",".join(DEFAULT_SCENARIOS),
                        help=f"comma-separated, in order, from {', '.join(SCENARIOS)}")
    parser.add_argument("--workers", type=int, default=2, help=f"worker raylets to start with "
                        f"({SLOTS_PER_WORKER} expert slots each; the 4 actors need 2, a replacement needs a spare)")
    parser.add_argument("--repeats", type=int, default=1,
                        help=f"runs of each fault scenario ({', '.join(FAULT_SCENARIOS)})")
    args = parser.parse_args()
    names = [n for n in args.scenarios.split(",") if n]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown or args.repeats < 1 or args.workers < 2:
        parser.error(f"unknown scenario(s) {unknown} (known: {', '.join(SCENARIOS)})" if unknown
                     else f"--repeats must be >= 1 and --workers >= 2, got {args.repeats}, {args.workers}")
    signal.signal(signal.SIGTERM, _raise_budget)
    signal.signal(signal.SIGALRM, _raise_budget)
    signal.alarm(args.budget_s)
    t0 = time.monotonic()
    tmp = tempfile.mkdtemp(prefix="ermn-", dir="/tmp")  # short: Ray's socket paths must stay short
    os.environ["RAY_TMPDIR"] = tmp
    results: dict[str, Any] = {}
    cluster = c = None
    import ray
    from ray.cluster_utils import Cluster

    from expertray.api import launch, random_model
    from expertray.config import ClusterConfig, GateConfig, MoELayerConfig

    try:
        os.makedirs(os.path.join(tmp, "ray"))
        cluster = Cluster()  # assigned before any node starts, so `finally` can stop what did
        cluster.add_node(num_cpus=4, include_dashboard=False, node_ip_address=LOOPBACK, temp_dir=tmp)
        workers = {}
        for _ in range(args.workers):
            node = cluster.add_node(num_cpus=1, resources={"expert_slot": SLOTS_PER_WORKER},
                                    node_ip_address=LOOPBACK)
            workers[node.node_id] = node
        cluster.wait_for_nodes()
        os.environ["RAY_ADDRESS"] = cluster.address  # any implicit re-init attaches here, never elsewhere
        ray.init(address=cluster.address, namespace=NAMESPACE, logging_level="WARNING", log_to_driver=False)
        cfg = ClusterConfig(layer=MoELayerConfig(d_model=D, d_ff=24, gate=GateConfig("mixtral", 4, 2)),
                            num_layers=2, num_expert_actors=4, transport="object_store", actor_num_cpus=0.1,
                            actor_resources={"expert_slot": 1}, router_num_cpus=0.25, max_wait_ms=5.0,
                            metrics_port=-1, request_timeout_s=30.0, ping_timeout_s=2.0, control_timeout_s=30.0,
                            max_expert_actors=8)
        layers = random_model(cfg)
        c = launch(cfg, layers, detached=False)
        runs = {"spread": lambda: scenario_spread(c, layers, workers),
                "connect": lambda: scenario_connect(cluster.address),
                "grow": lambda: scenario_grow(c, layers, cluster, workers),
                "remove_node": lambda: scenario_remove(c, layers, cluster, workers),
                "remove_replicated_node": lambda: scenario_remove(c, layers, cluster, workers, replicated=True),
                "kill_actor": lambda: scenario_kill_actor(c, layers, workers)}
        for name in names:
            repeats = args.repeats if name in FAULT_SCENARIOS else 1
            for i in range(repeats):
                key = name if repeats == 1 else f"{name}#{i}"
                t = time.monotonic()
                try:
                    results[key] = {**runs[name](), "wall_s": round(time.monotonic() - t, 2)}
                except Budget:
                    results[key] = {"error": "run budget exhausted"}
                    raise
                except Exception as exc:  # noqa: BLE001 - recorded; the test names the scenario that failed
                    results[key] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-3000:]}
    except Budget as exc:
        results.setdefault("_run", {"error": str(exc)})
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # shut down whatever happens now
        stop_nodes = cluster.shutdown if cluster is not None else None
        # a second try: a hung stream thread may have re-attached the driver (remove_node then detaches it)
        for step in ((lambda: c.shutdown()) if c is not None else None, ray.shutdown, stop_nodes, stop_nodes):
            try:
                if step is not None:
                    step()
                if stop_nodes is not None and step is stop_nodes:
                    break
            except Exception as exc:  # noqa: BLE001 - the next steps still run
                results.setdefault("_shutdown", {"error": repr(exc)})
        shutil.rmtree(tmp, ignore_errors=True)
        print(json.dumps({"scenarios": results, "wall_s": round(time.monotonic() - t0, 2)}), flush=True)


if __name__ == "__main__":
    main()
