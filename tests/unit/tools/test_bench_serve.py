"""`bench serve`'s pure parts: the seeded workload and the closed-loop driver, on an in-process engine."""

from __future__ import annotations

import torch

from expertray.models.synthetic import tiny_model, write_tiny_checkpoint
from expertray.serving.engine import EngineConfig
from expertray.serving.loader import in_process_runners, load_engine
from expertray.tools.bench.serve import drive, transformers_sequential, transformers_static, workload


def test_workload_is_seeded_and_within_its_ranges() -> None:
    jobs = workload(12, 3, (4, 9), (2, 5), 96)
    assert jobs == workload(12, 3, (4, 9), (2, 5), 96) and jobs != workload(12, 4, (4, 9), (2, 5), 96)
    assert all(4 <= len(p) <= 9 and 2 <= n <= 5 and max(p) < 96 for p, n in jobs)


def test_drive_answers_every_job_like_transformers_and_counts_tokens(tmp_path) -> None:
    overrides = {"max_position_embeddings": 64}
    path = write_tiny_checkpoint("mixtral", tmp_path / "m", torch.float32, seed=2, overrides=overrides)
    jobs = workload(5, 0, (3, 12), (2, 6), 96)
    engine = load_engine(str(path), in_process_runners(1), EngineConfig())
    try:
        got = drive(engine, jobs, clients=3, timeout_s=60)
    finally:
        engine.stop()
    reference = tiny_model("mixtral", 2, overrides)
    seq, want = transformers_sequential(reference, jobs)
    assert got["answers"] == want and got["errors"] == 0
    assert got["output_tokens"] == seq["output_tokens"] == sum(n for _, n in jobs) and got["tokens_per_s"] > 0
    assert got["ttft_ms_p50"] > 0 and got["tpot_ms_p50"] >= 0
    static = transformers_static(reference, jobs, batch=2)
    assert static["generated_tokens"] >= static["output_tokens"] and static["tokens_per_s"] > 0
