"""The runnable examples, run in-process on the session's Ray cluster with small arguments."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

pytestmark = pytest.mark.ray
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_transformers_proxy_logits_match_unmodified_model(ray_session, capsys) -> None:
    summary = _example("transformers_proxy").main(["--prompt-len", "6", "--new-tokens", "4", "--actors", "2"])
    assert summary["moe_blocks_swapped"] == 2
    assert summary["forward_max_abs_diff"] <= 1e-4
    assert summary["generate_logits_max_abs_diff"] <= 1e-4
    assert summary["generate_tokens_equal"] and summary["tokens_generated"] == 2 * 4
    assert "OK: logits within 0.0001" in capsys.readouterr().out


def test_http_client_msgpack_json_and_4xx(serve_port, capsys) -> None:
    summary = _example("http_client").main(["--tokens", "256", "--repeats", "3", "--d-model", "32",
                                            "--actors", "2", "--port", str(serve_port)])
    assert summary["msgpack_requests"] == 3 and summary["msgpack_p50_ms"] > 0
    assert summary["msgpack_max_abs_diff"] <= 1e-4 and summary["json_max_abs_diff"] <= 1e-4
    assert summary["error_status"] == 400 and "d_model=32" in summary["error_message"]
    out = capsys.readouterr().out
    assert "msgpack: 3 x [256, 32]" in out and "wrong d_model -> HTTP 400" in out


def test_skewed_autoscaling_plots_balancedness_and_replicas(ray_session, tmp_path) -> None:
    png = tmp_path / "plot.png"
    summary = _example("skewed_autoscaling").main(["--seconds", "8", "--sample-s", "1", "--tokens", "64",
                                                   "--zipf", "1.5", "--out", str(png)])
    assert summary["errors"] == 0 and summary["requests"] > 0 and summary["max_abs_diff"] <= 1e-4
    assert summary["samples"] >= 4
    assert {r["layer"] for r in summary["rows"]} == {0, 1}
    assert all(0 < r["balancedness"] <= 1 for r in summary["rows"])
    # under this much skew the autoscaler replicates a hot expert within a few seconds
    assert summary["placement_changes"] >= 1
    assert max(r["replicas"] for r in summary["rows"]) > 8
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
