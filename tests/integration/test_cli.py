"""The typer CLI against a live local cluster, as a user runs it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from cli_lifecycle import CliLifecycle
from typer.testing import CliRunner

from expertray.api import launch, random_model
from expertray.cli.main import app
from expertray.config import ClusterConfig, GateConfig, MoELayerConfig

pytestmark = pytest.mark.ray
runner = CliRunner()


@pytest.fixture(scope="module")
def live(ray_session):
    cfg = ClusterConfig(layer=MoELayerConfig(d_model=32, d_ff=48, gate=GateConfig("mixtral", 6, 2)), num_layers=2,
                        num_expert_actors=3, actor_num_cpus=0.25, metrics_port=-1)
    layers = random_model(cfg)
    cluster = launch(cfg, layers, detached=False)
    for i in range(4):
        cluster.forward(i % 2, torch.randn(12, 32))
    yield cluster, layers
    cluster.shutdown()


def _json(args: list[str]) -> object:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_status_and_experts(live) -> None:
    status = _json(["status", "--json"])
    assert len(status["actors"]) == 3 and status["routers"][0]["requests"] == 4
    rows = _json(["experts", "--json"])
    assert len(rows) == 12 and abs(sum(r["share"] for r in rows if r["expert"].startswith("0:")) - 1) < 1e-6
    # window load is the mean per batch: each batch routes 12 tokens x top-2, in each of the 2 layers
    assert sum(r["tokens_per_batch"] for r in rows) == 2 * 12 * 2
    table = runner.invoke(app, ["experts", "--layer", "1"])
    assert table.exit_code == 0 and "1:5" in table.stdout


def test_replicate_migrate_drain_keep_answers_exact(live) -> None:
    cluster, layers = live
    event = _json(["replicate", "0:2", "--to", "expert-2"])
    assert event["added"] == [["expert-2", 0, 2]]
    event = _json(["migrate", "1:0", "--to", "expert-1"])
    assert ["expert-1", 1, 0] in event["added"] and ["expert-0", 1, 0] in event["removed"]
    added = runner.invoke(app, ["add-actor"])
    assert added.exit_code == 0 and added.stdout.strip() == "expert-3"
    event = _json(["drain", "expert-0"])
    assert all(a != "expert-0" for a, _, _ in event["added"])
    assert "expert-0" not in cluster.table().actors
    x = torch.randn(20, 32)
    for layer in (0, 1):
        torch.testing.assert_close(cluster.forward(layer, x), layers[layer](x), atol=1e-5, rtol=0)


def test_rebalance_from_observed_skew(live) -> None:
    cluster, layers = live
    hot = torch.zeros(64, 32)
    gate = layers[0].gate_weights.weight
    hot += 4.0 * gate[0] / gate[0].norm()  # every token prefers expert 0:0
    for _ in range(4):
        cluster.forward(0, hot + 0.1 * torch.randn(64, 32))
    event = _json(["rebalance"])
    assert event["balancedness_after"] > event["balancedness_before"]
    assert len(cluster.table().replicas(0, 0)) > 1
    x = torch.randn(20, 32)
    torch.testing.assert_close(cluster.forward(0, x), layers[0](x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("args,needle", [
    (["replicate", "9:0"], "unknown expert 9:0"),
    (["replicate", "0:99"], "unknown expert 0:99"),
    (["replicate", "abc"], "LAYER:EXPERT"),
    (["migrate", "0:1", "--to", "nobody"], "unknown actor 'nobody'"),
    (["drain", "nobody"], "unknown actor 'nobody'"),
    (["rebalance", "--policy", "nope"], "placement policy 'nope' is unknown"),
    (["experts", "--layer", "7"], "unknown layer 7"),
])
def test_unknown_names_exit_2_with_clear_message(live, args: list[str], needle: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert needle in result.output


def test_live_trace_round_trips_through_replay_and_analyze(live, tmp_path) -> None:
    cluster, _ = live
    path = tmp_path / "live.msgpack"
    cluster.start_trace(str(path))
    for i in range(5):
        cluster.forward(i % 2, torch.randn(16, 32))
    assert cluster.stop_trace()[0] > 0
    from expertray.tools.trace import read_trace

    records = list(read_trace(path))
    assert len(records) == 5 and {r.layer for r in records} == {0, 1}
    assert sum(r.tokens for r in records) == 80
    analyzed = runner.invoke(app, ["trace", "analyze", str(path), "--json", "--heatmap", str(tmp_path / "h.png")])
    assert analyzed.exit_code == 0, analyzed.output
    replayed = runner.invoke(app, ["trace", "replay", str(path), "--policy", "laser", "--json"])
    assert replayed.exit_code == 0, replayed.output


# --- lifecycle, as a user runs it: separate processes, a Ray head of its own, the session's Ray untouched -----
def _one_line_exit_2(result: subprocess.CompletedProcess, needle: str) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert needle in result.stderr and "Traceback" not in result.stderr


def test_up_status_load_down_touch_only_what_up_started(ray_session, cli_lifecycle: CliLifecycle) -> None:
    run = cli_lifecycle.result()
    steps = run.steps
    _one_line_exit_2(steps["status before up"], "no expertray cluster is up on this machine")
    _one_line_exit_2(steps["down before up"], "nothing to stop")
    _one_line_exit_2(steps["status of nothing"], "no Ray cluster answers at '127.0.0.1:1'")
    up = steps["up"]
    assert up.returncode == 0, up.stderr
    started = json.loads(up.stdout)
    assert started["address"].startswith("127.0.0.1:") and started["ray_head_started"] is True
    assert "starting a Ray head on 127.0.0.1" in up.stderr  # progress goes to stderr
    _one_line_exit_2(steps["second up"], f"already up at {started['address']}")
    load = steps["load"]
    assert load.returncode == 0, load.stderr
    summary = json.loads(load.stdout)
    assert summary["requests"] > 0 and summary["errors"] == 0 and summary["max_abs_diff_vs_in_process"] < 1e-4
    status = steps["status"]
    assert status.returncode == 0, status.stderr
    doc = json.loads(status.stdout)
    assert doc["routers"][0]["tokens"] == summary["tokens"] and doc["tokens_per_s"] >= 0
    assert steps["kill controller"].returncode == 0, steps["kill controller"].stderr
    _one_line_exit_2(steps["status without controller"], "expertray down")
    down = steps["down"]
    assert down.returncode == 0, down.stderr
    assert f"Ray head {started['address']} stopped" in down.stdout
    pid = run.head["pid"]
    assert not Path(f"/proc/{pid}").exists() or b"start" not in Path(f"/proc/{pid}/cmdline").read_bytes()
    assert not (run.state_dir / "head.json").exists()
    assert ray_session.cluster_resources()["CPU"] > 0  # the session's own Ray is still up
    _one_line_exit_2(steps["status after down"], "no expertray cluster is up on this machine")
