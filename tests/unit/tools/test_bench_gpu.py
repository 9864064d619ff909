"""`expertray bench gpu` runs end to end with tiny shapes on EXPERTRAY_DEVICE and reports every figure."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from typer.testing import CliRunner

from expertray.tools.bench.gpu import Shape, run

STAGES = {"gate_gemm", "gate_select", "routing_topk", "routing_capacity_drop", "replica", "plan", "permute",
          "expert_counts", "pipeline_prepare", "combine", "combine_place", "combine_place_gather",
          "combine_reduce_bmm", "combine_reduce_sum"}
TINY = [Shape("tiny_mixtral", 32, 48, 4, 2), Shape("tiny_deepseek", 32, 16, 16, 4, "deepseek_v3", 4, 2)]


def test_bench_gpu_reports_compute_copy_and_router_figures(device: torch.device) -> None:
    r = run(device=str(device), dtype="float32", repeats=1, shapes=TINY, tokens={"prefill": 32, "decode": 4})
    assert [(c["shape"]["name"], c["phase"]) for c in r["cases"]] == [
        ("tiny_mixtral", "prefill"), ("tiny_mixtral", "decode"), ("tiny_deepseek", "prefill"),
        ("tiny_deepseek", "decode")]
    for case in r["cases"]:
        assert case["routed_rows"] == case["tokens"] * case["shape"]["top_k"]
        assert case["experts_resident"] == case["shape"]["num_experts"]
        assert all(v > 0 for v in case["median_ms"].values())
        assert set(case["matmul_fraction"]) == {k for k in case["median_ms"] if k.startswith("experts_")}
        assert case["router_over_compute"] > 0
        assert "errors" not in case and case["padded_overhead"] >= 1
        stages = case["router_stages"]
        assert set(STAGES) <= set(stages["median_ms"]) and all(v > 0 for v in stages["median_ms"].values())
        assert ("shared_expert" in stages["median_ms"]) == (case["shape"]["family"] == "deepseek_v3")
        syncs = stages["pipeline_prepare_host_syncs"]
        assert syncs is None if device.type == "cpu" else syncs >= 1  # at least the plan's slot counts
        if case["phase"] == "decode":
            assert 0 < case["active_experts"] <= case["shape"]["num_experts"]
            assert case["weight_bytes"] == case["active_experts"] * 3 * 32 * case["shape"]["d_ff"] * 4
            assert set(case["copy_fraction"]) == set(case["matmul_fraction"])


def test_bench_gpu_cli_writes_json(tmp_path: Path, device: torch.device) -> None:
    from expertray.cli.main import app

    out = tmp_path / "gpu.json"
    result = CliRunner().invoke(app, ["bench", "gpu", "--small", "--device", str(device), "--repeats", "1",
                                      "--json", "--out", str(out)])
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "gpu" and doc["small"] is True and len(doc["cases"]) == 4
