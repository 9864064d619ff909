"""Snapshots round-trip and corrupted files fail with errors that name the file and the problem."""

import msgpack
import pytest

from expertray.runtime.snapshot import (
    ControllerState,
    SnapshotError,
    load_controller_snapshot,
    load_snapshot,
    save_snapshot,
)
from expertray.state.placement_table import PlacementTable


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


def _doc(table: PlacementTable, state: dict) -> dict:
    return {"format": "expertray-snapshot", "version": 1, "table": table.to_dict(), "state": state}


@pytest.mark.parametrize("state,needle", [
    ({"next_actor": "NaN"}, "state.next_actor: expected an integer >= 0, got 'NaN'"),
    ({"next_actor": True}, "state.next_actor"),
    ({"next_actor": -1}, "state.next_actor"),
    ({"routers": "router-0"}, "state.routers"),
    ({"transport": 3}, "state.transport"),
    ({"history": [1]}, "state.history"),
    ({"surprise": 1}, "state.surprise: unknown field"),
])
def test_typed_state_refuses_bad_values(tmp_path, state: dict, needle: str) -> None:
    """`next_actor: "NaN"` loaded before; each state field is now checked by type."""
    path = tmp_path / "s"
    path.write_bytes(msgpack.packb(_doc(PlacementTable.balanced(1, 2, ["a"]), state)))
    with pytest.raises(SnapshotError, match=needle):
        load_snapshot(path)


def test_checksum_refuses_a_valid_looking_edit_and_a_missing_checksum(tmp_path) -> None:
    """116 of 2,250 single-byte mutations loaded as a different table before."""
    table = PlacementTable.balanced(2, 4, ["a", "b"])
    save_snapshot(tmp_path / "s", table, ControllerState(next_actor=2, routers=("router-0",)))
    doc = msgpack.unpackb((tmp_path / "s").read_bytes())
    doc["table"]["version"] = 7  # still a valid table, but not the one written
    (tmp_path / "s").write_bytes(msgpack.packb(doc))
    with pytest.raises(SnapshotError, match="checksum mismatch"):
        load_snapshot(tmp_path / "s")
    del doc["sha256"]
    (tmp_path / "s").write_bytes(msgpack.packb(doc))
    with pytest.raises(SnapshotError, match="no sha256 checksum"):
        load_snapshot(tmp_path / "s")


def test_every_single_byte_flip_is_detected(tmp_path) -> None:
    table = PlacementTable.balanced(2, 4, ["a", "b"]).replicate(0, 1, "b")
    path = tmp_path / "s"
    save_snapshot(path, table, ControllerState(next_actor=2, routers=("router-0",), transport="collective"))
    raw = path.read_bytes()
    for i in range(len(raw)):
        path.write_bytes(raw[:i] + bytes([raw[i] ^ 0xFF]) + raw[i + 1:])
        with pytest.raises(SnapshotError):
            load_snapshot(path)


def test_controller_state_round_trip(tmp_path) -> None:
    state = ControllerState(next_actor=5, routers=("router-0", "router-3"), next_router=4, transport="object_store",
                            history=({"version": 1, "reason": "x"},), autoscaler={"streaks": []})
    save_snapshot(tmp_path / "s", PlacementTable.balanced(1, 2, ["a"]), state)
    assert load_controller_snapshot(tmp_path / "s")[1] == state
