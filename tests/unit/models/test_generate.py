"""`expertray generate` end to end on a tiny sharded checkpoint (in-process MoE layers: no Ray needed)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from typer.testing import CliRunner

from expertray.cli.main import app
from expertray.models.synthetic import tiny_model, write_tiny_checkpoint


def test_generate_matches_transformers_greedy(tmp_path: Path) -> None:
    path = write_tiny_checkpoint("mixtral", tmp_path / "mixtral", torch.float32, seed=3)
    result = CliRunner().invoke(app, ["generate", "--model", str(path), "--prompt-ids", "1,5,9",
                                      "--max-new-tokens", "4", "--in-process", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    reference = tiny_model("mixtral", seed=3).eval()
    with torch.no_grad():
        want = reference.generate(torch.tensor([[1, 5, 9]]), attention_mask=torch.ones(1, 3, dtype=torch.long),
                                  do_sample=False, max_new_tokens=4)[0, 3:].tolist()
    assert doc["new_ids"] == want and doc["tokens_per_s"] > 0


def test_generate_refuses_bad_prompt_ids_in_one_line(tmp_path: Path) -> None:
    path = write_tiny_checkpoint("mixtral", tmp_path / "mixtral", torch.float32)
    result = CliRunner().invoke(app, ["generate", "--model", str(path), "--prompt-ids", "1,x", "--in-process"])
    assert result.exit_code == 2 and "--prompt-ids must be comma-separated integers" in result.output
