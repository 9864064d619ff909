"""Snapshots round-trip and corrupted files fail with errors that name the file and the problem."""

import msgpack
import pytest

from expertray.placement import PlacementTable
from expertray.snapshot import SnapshotError, load_snapshot, save_snapshot


def test_round_trip(tmp_path) -> None:
    t = PlacementTable.balanced(2, 4, ["a", "b"]).replicate(0, 1, "b")
    save_snapshot(tmp_path / "s", t, {"next_actor": 2})
    table, state = load_snapshot(tmp_path / "s")
    assert table == t and state == {"next_actor": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["s"]  # no temp files left behind


@pytest.mark.parametrize("payload,needle", [
    (b"\xc1\x00", "corrupted msgpack"),
    (msgpack.packb({"format": "other"}), "not an expertray snapshot"),
    (msgpack.packb({"format": "expertray-snapshot", "version": 9}), "version 9 unsupported"),
    (msgpack.packb({"format": "expertray-snapshot", "version": 1, "table": {"version": 0}}), "bad placement"),
])
def test_corrupted_snapshots(tmp_path, payload: bytes, needle: str) -> None:
    path = tmp_path / "bad"
    path.write_bytes(payload)
    with pytest.raises(SnapshotError, match=needle):
        load_snapshot(path)
    with pytest.raises(SnapshotError, match="cannot read"):
        load_snapshot(tmp_path / "missing")


def test_truncated_snapshot(tmp_path) -> None:
    t = PlacementTable.balanced(1, 4, ["a"])
    save_snapshot(tmp_path / "s", t, {})
    raw = (tmp_path / "s").read_bytes()
    (tmp_path / "s").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(SnapshotError, match="snapshot .*s"):
        load_snapshot(tmp_path / "s")
