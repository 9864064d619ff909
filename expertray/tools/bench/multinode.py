"""Multi-node scenarios on a real Ray cluster of several raylets on this machine (`ray.cluster_utils.Cluster`),
run in a process of their own (a process holds one Ray connection; the test session already has one).

    python -m expertray.tools.bench.multinode [--scenarios spread,connect,grow,remove_node,collective,...] [--repeats 1]

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
- collective: the cluster is relaunched on the same raylets with transport="collective" (gloo): routers
  (rank 0, rendezvous store on their node address) form groups with expert actors on other raylets, each
  worker raylet with a node address of its own (127.0.0.2, .3, ...); answers equal the in-process layers.
- collective_remove_node: remove_node under a stream on that cluster; then every router is back on a
  re-formed collective group and answers correctly.
The fault scenarios report recovery figures (`recovery_figures`): time from the fault to the first correct
answer to a request sent after it, time until latency is steady again, the largest latency, and p99 before.

Prints one JSON line (the last line of stdout): {"scenarios": {name: {...} | {"error": ...}}, "wall_s": ...}.
The cluster is shut down in `finally`; SIGTERM and the internal budget (SIGALRM) both end up there.
"""

from __future__ import annotations

import argparse
import itertools
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

from expertray.state.actor_names import CONTROLLER, NAMESPACE, ray_name  # noqa: E402
from expertray.tools.bench.report import quantile  # noqa: E402

D = 16
LOOPBACK = "127.0.0.1"
SCENARIOS = ("spread", "connect", "grow", "remove_node", "remove_replicated_node", "kill_actor", "collective",
             "collective_remove_node", "autoscale")
FAULT_SCENARIOS = ("remove_node", "remove_replicated_node", "kill_actor")
DEFAULT_SCENARIOS = ("spread", "connect", "grow", "remove_node", "collective", "collective_remove_node")
SLOTS_PER_WORKER = 2


_worker_ips = itertools.count(2)


def _worker_ip() -> str:
    """A node address of its own for each worker raylet (127.0.0.2, .3, ...: Linux routes all of 127/8 to
    loopback), as on a real cluster where every node has its own IP; the head is 127.0.0.1."""
    n = next(_worker_ips)
    if n > 254:
        raise RuntimeError("more than 253 worker raylets started in one run")
    return f"127.0.0.{n}"


def recovery_figures(records: list[tuple[float, float, str]], t_fault: float) -> dict[str, float | None]:
    """Recovery of a closed-loop stream from a fault at `t_fault`; records are (sent, done, outcome) seconds.

    first_ok_s: fault -> first correct answer to a request sent after it. steady_s: fault -> the end of the
    last slow request (latency > 2x the p99 before the fault, and > p99 + 20 ms); after it every request is
    within that bound (0 when none was slow). max_latency_s: the largest latency of a request answered after
    the fault. p99_before_s: the steady p99 before it (None without requests before the fault)."""
    before = [e - s for s, e, _ in records if e < t_fault]
    p99 = quantile(before, 0.99) if before else None
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
        node = cluster.add_node(num_cpus=1, resources={"expert_slot": 3}, node_ip_address=_worker_ip())
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
    node = cluster.add_node(num_cpus=1, resources={"expert_slot": SLOTS_PER_WORKER}, node_ip_address=_worker_ip())
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


def relaunch_collective(c: Any, layers: list[Any], workers: dict[str, Any]) -> Any:
    """Stop the running expertray cluster and launch the same model on the same Ray cluster with
    transport="collective" (gloo on CPU): the routers form a group with expert actors on other raylets.

    A node removed by an earlier scenario stays listed alive by Ray for a while (missed heartbeats); a fresh
    controller has no way to know it is gone, so the launch waits until Ray says so (head + `workers` only)."""
    import dataclasses

    import ray

    from expertray.api import launch

    cfg = dataclasses.replace(c.cfg, transport="collective")
    c.shutdown()

    def controller_gone() -> bool:
        try:
            ray.get_actor(CONTROLLER, namespace=NAMESPACE)
        except ValueError:
            return True
        return False

    _wait(controller_gone, 30, "the object-store cluster's controller gone")  # its name frees asynchronously

    def only_live_nodes_listed() -> bool:
        head = ray.get_runtime_context().get_node_id()
        return all(n["NodeID"] in workers or n["NodeID"] == head for n in ray.nodes() if n["Alive"])

    _wait(only_live_nodes_listed, 60, "Ray marking the removed nodes dead")
    return launch(cfg, layers, detached=False)


def _transports(st: dict[str, Any]) -> list[list[Any]]:
    """[transport, backend] of every router (sorted, for comparison)."""
    return sorted([r.get("transport"), (r.get("transport_detail") or {}).get("backend")] for r in st["routers"])


def scenario_collective(c: Any, layers: list[Any], workers: dict[str, Any]) -> dict[str, Any]:
    """The collective transport across raylets: routers (rank 0, hosting the rendezvous store on their node
    address) and expert actors on workers with node addresses of their own; answers equal the in-process
    layers."""
    st = c.status()
    ips = {n["node_id"]: n["ip"] for n in st["nodes"] if "node_id" in n}
    where = _where(st)
    router_nodes = [(r.get("node") or {}).get("node_id") for r in st["routers"]]
    return {"transports": _transports(st), "cfg_transport": c.cfg.transport,
            "actor_ips": sorted({str(ips.get(n)) for n in where.values()}),
            "router_ips": sorted(str(ips.get(n)) for n in router_nodes),
            "actors_on_head": sum(n not in workers for n in where.values()),
            "routers_with_actors_elsewhere": sum(any(a != r for a in where.values()) for r in router_nodes),
            "routers": len(router_nodes), "correct": _correct(c, layers, n=10)}


def scenario_collective_remove(c: Any, layers: list[Any], cluster: Any, workers: dict[str, Any]
                               ) -> dict[str, Any]:
    """remove_node under a stream with the collective transport (routers fall back to the object store
    while the group re-forms); then every router serves on a re-formed group again, correctly."""
    if c.cfg.transport != "collective":
        raise RuntimeError("collective_remove_node needs the collective scenario before it (it launches "
                           "the collective cluster)")
    out = scenario_remove(c, layers, cluster, workers)

    def regrouped() -> list[list[Any]] | None:
        got = _transports(c.status())
        return got if all(t == "collective" for t, _ in got) else None

    t = time.monotonic()
    transports = _wait(regrouped, 30, "every router on a re-formed collective group")
    return {**out, "transports_after": transports, "regrouped_s": round(time.monotonic() - t, 2),
            "correct_regrouped": _correct(c, layers, n=10)}


# --- growth through a real autoscaler: Ray's fake multi-node provider answering request_resources -------------

AUTOSCALE_WORKER_TYPE = "expert.worker"


def fake_autoscaler_config(gcs_address: str, head_cpus: int, max_workers: int) -> dict[str, Any]:
    """A v1 autoscaling config whose provider is Ray's fake multi-node one: it starts worker raylets as local
    processes when the autoscaler asks (one node type: 1 CPU, SLOTS_PER_WORKER expert slots).

    Written in full because the installed Ray wheel lacks the provider's `example.yaml`, which both
    `ray.cluster_utils.AutoscalingCluster` and the `fake_multinode` provider type read (FileNotFoundError);
    the same provider class loads as an `external` one. Node updaters and launch-config checks are off
    (there is nothing to ssh into), nodes are told apart by node id (they share one IP), and new nodes
    join the head's GCS at `gcs_address` (the provider would assume port 6379)."""
    return {
        "cluster_name": "expertray-fake", "max_workers": max_workers, "upscaling_speed": 1.0,
        "idle_timeout_minutes": 5,
        "provider": {"type": "external",
                     "module": "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider",
                     "gcs_address": gcs_address, "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True},
        "auth": {"ssh_user": "ray"}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
        "head_start_ray_commands": [], "worker_start_ray_commands": [],
        "head_node_type": "ray.head.default",
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": head_cpus}, "node_config": {}, "max_workers": 0},
            AUTOSCALE_WORKER_TYPE: {"resources": {"CPU": 1, "expert_slot": SLOTS_PER_WORKER}, "node_config": {},
                                    "min_workers": 1, "max_workers": max_workers}}}


def _kill_run_processes(tmp: str, grace_s: float = 5.0) -> list[int]:
    """End the processes of this run that outlive `Cluster.shutdown` (the raylets the fake provider started
    from the autoscaler's process): those whose command line names this run's private temp dir, by pid,
    SIGTERM then SIGKILL. Returns their pids. Nothing else on the machine is touched."""
    def ours() -> list[int]:
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if (tmp.rstrip("/") + "/").encode() in f.read():  # its own dir, not a longer name
                        pids.append(int(entry))
            except OSError:
                continue
        return pids

    found = ours()
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 1.0)):
        for pid in ours():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait_s
        while ours() and time.monotonic() < deadline:
            time.sleep(0.2)
    return found


def _expert_nodes() -> dict[str, str]:
    """Live nodes offering expert_slot: node id -> IP."""
    import ray

    return {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()
            if n["Alive"] and n["Resources"].get("expert_slot")}


def scenario_autoscale(tmp: str) -> dict[str, Any]:
    """Growth through Ray's autoscaler. The head has no expert_slot; the autoscaler keeps one 2-slot worker
    (min_workers 1, max_workers 3). Two expert actors fill it.
    1. add_actor: under a stream it finds no node with room, the controller calls request_resources, the
       autoscaler starts a worker and the actor lands there and serves (grow_s: from the add_actor call to
       the actor in the table, answering); the met request is withdrawn. A further actor fills that worker.
    2. The autoscale policy: under a stream, scale_up holds (tokens/s per actor over a low line, max_actors 5)
       with no node room, so it decides request_resources; once the autoscaler's node joins, it decides
       add_actor and the actor lands there (request_to_serving_s: the first request_resources decision to the
       actor seen in the table).
    3. A further actor fills that worker; the next finds no room with the autoscaler at max_workers: the add
       must fail within the controller's deadline with a clear error, leaving no pending actor behind."""
    import ray
    from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID
    from ray.cluster_utils import Cluster

    from expertray.api import launch, random_model
    from expertray.client import free_port
    from expertray.config import ClusterConfig, GateConfig, MoELayerConfig

    port = free_port(LOOPBACK)
    path = os.path.join(tmp, "autoscaling.json")
    with open(path, "w") as f:
        json.dump(fake_autoscaler_config(f"{LOOPBACK}:{port}", head_cpus=2, max_workers=3), f)
    os.environ.update({"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"})  # read by the monitor
    cluster = c = None
    try:
        cluster = Cluster()
        os.environ["RAY_OVERRIDE_NODE_ID_FOR_TESTING"] = FAKE_HEAD_NODE_ID  # the provider's head node id
        try:
            cluster.add_node(num_cpus=2, include_dashboard=False, node_ip_address=LOOPBACK, temp_dir=tmp,
                             gcs_server_port=port, autoscaling_config=path)
        finally:
            os.environ.pop("RAY_OVERRIDE_NODE_ID_FOR_TESTING", None)
        os.environ["RAY_ADDRESS"] = cluster.address
        ray.init(address=cluster.address, namespace=NAMESPACE, logging_level="WARNING", log_to_driver=False)
        first = _wait(_expert_nodes, 90, "the autoscaler's first worker (min_workers 1)")
        cfg = ClusterConfig(layer=MoELayerConfig(d_model=D, d_ff=24, gate=GateConfig("mixtral", 4, 2)),
                            num_layers=2, num_expert_actors=2, transport="object_store", actor_num_cpus=0.1,
                            actor_resources={"expert_slot": 1}, router_num_cpus=0.25, max_wait_ms=5.0,
                            metrics_port=-1, request_timeout_s=30.0, ping_timeout_s=2.0, control_timeout_s=30.0,
                            start_timeout_s=30.0,
                            max_expert_actors=8,
                            autoscale_params={"scale_up_tokens_per_s": 1.0, "max_actors": 5, "sustain_checks": 1,
                                              "cooldown_s": 1.0, "hot_ratio": 1e6, "straggler_ratio": 1e6})
        layers = random_model(cfg)
        c = launch(cfg, layers, detached=False)
        stream = Stream(c, layers, seed=40).start()
        try:
            time.sleep(1.0)
            t = time.monotonic()
            grown = c.add_actor()
            grow_s = time.monotonic() - t
            request = ray.get(c.controller.info.remote(), timeout=cfg.control_timeout_s)["resource_request"]
            where = _where(c.status())
            nodes = _expert_nodes()
            time.sleep(1.0)
        finally:
            result = stream.finish(join_s=cfg.request_timeout_s + 10)
        filler = c.add_actor()  # the new worker's second slot: no request needed
        policy = _autoscale_policy_grows(c, layers)
        c.add_actor()  # the policy's worker's second slot
        t = time.monotonic()
        try:
            extra = c.add_actor()
            no_room = {"error": None, "added": extra}
        except Exception as exc:  # noqa: BLE001 - the expected outcome: recorded and checked by the test
            no_room = {"error": f"{type(exc).__name__}: {str(exc)[-600:]}"}  # the tail: the controller's message
        no_room["s"] = round(time.monotonic() - t, 2)
        st = c.status()
        return {"grow_s": round(grow_s, 2), "resource_request": request,
                "new_actor_node_new": where.get(grown) in nodes and where.get(grown) not in first,
                "expert_nodes": len(nodes), "stream": result, "filler_node": _where(st).get(filler) in nodes,
                "policy": policy, "no_room": no_room, "actors_after": len(st["actors"]),
                "all_alive_after": all(a["alive"] for a in st["actors"].values()),
                "correct_after": _correct(c, layers, n=6)}
    finally:
        for step in ((lambda: c.shutdown()) if c is not None else None, ray.shutdown,
                     cluster.shutdown if cluster is not None else None):
            try:
                if step is not None:
                    step()
            except Exception:  # noqa: BLE001 - the processes are ended below whatever happened here
                traceback.print_exc()
        left = _kill_run_processes(tmp)
        if left:
            print(f"ended {len(left)} leftover process(es) of this run: {left}", file=sys.stderr)


def _autoscale_policy_grows(c: Any, layers: list[Any]) -> dict[str, Any]:
    """Step 2 of scenario_autoscale: the autoscale policy grows the cluster through the autoscaler."""
    import ray

    known, nodes_before = set(c.table().actors), set(_expert_nodes())
    stream = Stream(c, layers, seed=50).start()
    try:
        c.autoscale(True)
        _wait(lambda: len(c.table().actors) > len(known), 90, "an actor added by the autoscale policy")
        seen = time.time()
        c.autoscale(False)
        log = c.autoscale()["recent_actions"]
        request = ray.get(c.controller.info.remote(), timeout=c.cfg.control_timeout_s)["resource_request"]
        where, nodes = _where(c.status()), _expert_nodes()
        time.sleep(1.0)
    finally:
        result = stream.finish(join_s=c.cfg.request_timeout_s + 10)
    added = [a for a in c.table().actors if a not in known]
    requests = [e["t"] for e in log if e["kind"] == "request_resources" and e["ok"]]
    return {"decisions": [(e["kind"], e["ok"]) for e in log][:12], "added": added,
            "on_new_node": bool(added) and where.get(added[0]) in set(nodes) - nodes_before,
            "request_to_serving_s": round(seen - min(requests), 2) if requests else None, "stream": result,
            "request": request}


def autoscale_main(budget_s: int) -> None:
    """Run scenario_autoscale on a cluster of its own; prints the same one-line JSON as main()."""
    signal.signal(signal.SIGTERM, _raise_budget)
    signal.signal(signal.SIGALRM, _raise_budget)
    signal.alarm(budget_s)
    t0 = time.monotonic()
    tmp = tempfile.mkdtemp(prefix="ermn-", dir="/tmp")
    os.environ["RAY_TMPDIR"] = tmp
    os.makedirs(os.path.join(tmp, "ray"))
    results: dict[str, Any] = {}
    try:
        results["autoscale"] = {**scenario_autoscale(tmp), "wall_s": round(time.monotonic() - t0, 2)}
    except Budget as exc:
        results["_run"] = {"error": str(exc)}
    except Exception as exc:  # noqa: BLE001 - recorded; the test shows it
        results["autoscale"] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-3000:]}
    finally:
        signal.alarm(0)
        _kill_run_processes(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        print(json.dumps({"scenarios": results, "wall_s": round(time.monotonic() - t0, 2)}), flush=True)


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
    if "autoscale" in names:  # a cluster of its own, with an autoscaler
        if names != ["autoscale"]:
            parser.error("autoscale runs alone: it starts its own cluster with Ray's fake autoscaler")
        autoscale_main(args.budget_s)
        return
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
                                    node_ip_address=_worker_ip())
            workers[node.node_id] = node
        cluster.wait_for_nodes()
        os.environ["RAY_ADDRESS"] = cluster.address  # any implicit re-init attaches here, never elsewhere
        ray.init(address=cluster.address, namespace=NAMESPACE, logging_level="WARNING", log_to_driver=False)
        cfg = ClusterConfig(layer=MoELayerConfig(d_model=D, d_ff=24, gate=GateConfig("mixtral", 4, 2)),
                            num_layers=2, num_expert_actors=4, transport="object_store", actor_num_cpus=0.1,
                            actor_resources={"expert_slot": 1}, router_num_cpus=0.25, max_wait_ms=5.0,
                            metrics_port=-1, request_timeout_s=30.0, ping_timeout_s=2.0, control_timeout_s=30.0,
                            start_timeout_s=30.0,
                            max_expert_actors=8)
        layers = random_model(cfg)
        c = launch(cfg, layers, detached=False)

        def collective() -> dict[str, Any]:
            nonlocal c
            c = relaunch_collective(c, layers, workers)
            return scenario_collective(c, layers, workers)

        runs = {"spread": lambda: scenario_spread(c, layers, workers),
                "connect": lambda: scenario_connect(cluster.address),
                "grow": lambda: scenario_grow(c, layers, cluster, workers),
                "remove_node": lambda: scenario_remove(c, layers, cluster, workers),
                "remove_replicated_node": lambda: scenario_remove(c, layers, cluster, workers, replicated=True),
                "kill_actor": lambda: scenario_kill_actor(c, layers, workers),
                "collective": collective,
                "collective_remove_node": lambda: scenario_collective_remove(c, layers, cluster, workers)}
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
