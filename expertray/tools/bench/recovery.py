"""`expertray bench recovery`: kill an expert actor / remove a whole node (with or without a replica of each
of its experts on another node) under a closed-loop stream, on a real multi-node Ray (head + worker raylets on
this machine, expertray/tools/bench/multinode.py, in a process of its own), and report per run: requests, lost, wrong, hung, errors, time to the first correct answer, time until
latency is steady again, the largest latency, and the steady p99 before the fault; medians over repeats.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import typer

from expertray.errors import ExpertRayError
from expertray.tools.bench.report import emit, median

FAULTS = ("kill_actor", "remove_node", "remove_replicated_node")


def run(repeats: int, budget_s: int) -> dict[str, Any]:
    """Run the fault scenarios `repeats` times each on one 3-worker cluster; raises when the run fails."""
    cmd = [sys.executable, "-m", "expertray.tools.bench.multinode", "--scenarios", ",".join(FAULTS), "--repeats",
           str(repeats), "--workers", "3", "--budget-s", str(budget_s)]
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=budget_s + 60)
    except subprocess.TimeoutExpired:
        proc.terminate()  # the driver shuts its cluster down on SIGTERM
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
        raise ExpertRayError(f"bench recovery: no result within {budget_s + 60} s") from None
    lines = [line for line in out.splitlines() if line.startswith('{"scenarios"')]
    if proc.returncode != 0 or not lines:
        raise ExpertRayError(f"bench recovery: driver exited {proc.returncode}: {err[-2000:]}")
    runs = json.loads(lines[-1])["scenarios"]
    failed = {k: v["error"] for k, v in runs.items() if "error" in v}
    if failed:
        raise ExpertRayError(f"bench recovery: runs failed: {failed}")
    summary = {}
    for fault in FAULTS:
        rs = [v for k, v in runs.items() if k.split("#")[0] == fault]
        lost = [v["stream"]["requests"] - v["stream"]["ok"] - v["stream"]["wrong"] - sum(v["stream"]["errors"].values())
                - v["stream"]["hung"] for v in rs]
        summary[fault] = {
            "runs": len(rs), "requests": sum(v["stream"]["requests"] for v in rs), "lost": sum(lost),
            "wrong": sum(v["stream"]["wrong"] for v in rs), "hung": sum(v["stream"]["hung"] for v in rs),
            "errors": sum(sum(v["stream"]["errors"].values()) for v in rs),
            **{f"{k}_median": median([v[k] for v in rs if v[k] is not None] or [float("nan")])
               for k in ("first_ok_s", "steady_s", "max_latency_s", "p99_before_s", "healed_s")}}
    return {"command": " ".join(["expertray", "bench", "recovery", "--repeats", str(repeats)]),
            "setup": "head (4 CPUs) + 3 workers (1 CPU, 2 expert_slot each) on one 2-core machine; 4 expert "
                     "actors, object_store transport, d_model 16, 2 layers, 4 experts top-2; 2 closed-loop "
                     "clients (1-8 tokens)", "summary": summary, "runs": runs}


def cli(repeats: int = typer.Option(3, help="Runs of each fault."),
        budget_s: int = typer.Option(600, help="Wall-clock budget for the whole run."),
        as_json: bool = typer.Option(False, "--json"), out: Path | None = None) -> None:
    """Recovery table: kill an actor / remove a node under a stream; lost, wrong, hung, time to first correct
    answer and to steady latency (medians over repeats)."""
    r = run(repeats, budget_s)
    rows = [[f, s["runs"], s["requests"], s["lost"], s["wrong"], s["hung"], s["errors"], s["first_ok_s_median"],
             s["steady_s_median"], s["max_latency_s_median"], s["p99_before_s_median"]]
            for f, s in r["summary"].items()]
    emit("recovery", r, rows, ["fault", "runs", "requests", "lost", "wrong", "hung", "errors", "first ok s",
                               "steady s", "max latency s", "p99 before s"], as_json, out)
