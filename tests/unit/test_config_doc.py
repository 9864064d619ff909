"""docs/CONFIG.md has a row for every ClusterConfig field (a new field without one fails here)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from expertray.config import ClusterConfig

DOC = Path(__file__).resolve().parents[2] / "docs" / "CONFIG.md"


def test_every_cluster_field_has_a_row() -> None:
    rows = {line.split("|")[1].strip().strip("`") for line in DOC.read_text().splitlines() if line.startswith("| `")}
    missing = [f.name for f in dataclasses.fields(ClusterConfig) if f.name != "layer" and f.name not in rows]
    assert not missing, f"docs/CONFIG.md lacks a row for {missing}"
