"""Data shipped in the package: the measured C4 expert counts are found without the checkout's neighbours,
an override is honoured, and a missing file is an error."""

import json

import pytest

from expertray.data import COUNTS_ENV, counts_file
from expertray.errors import ConfigError


def test_shipped_counts_are_inside_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(COUNTS_ENV, raising=False)
    path = counts_file()
    assert path.parent.name == "data" and path.parent.parent.name == "expertray"
    data = json.loads(path.read_text())
    for model, experts in (("olmoe_c4", 64), ("mixtral_c4", 8)):
        assert data[model]["layers"] == [0, 7, 15]
        assert [len(c) for c in data[model]["counts"]] == [experts] * 3


def test_override_and_missing_file(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    mine = tmp_path / "counts.json"
    mine.write_text("{}")
    monkeypatch.setenv(COUNTS_ENV, str(mine))
    assert counts_file() == mine
    monkeypatch.setenv(COUNTS_ENV, str(tmp_path / "absent.json"))
    with pytest.raises(ConfigError, match=rf"absent.json \(from \${COUNTS_ENV}\) does not exist"):
        counts_file()
