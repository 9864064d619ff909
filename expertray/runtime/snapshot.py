"""Controller snapshots: the placement table and typed controller state, as msgpack, written atomically.

Layout: {"format": "expertray-snapshot", "version": 1, "table": {...}, "state": {...}, "sha256": hex}, where
sha256 is over msgpack(table) + msgpack(state). A corrupted, tampered or foreign file raises SnapshotError
naming the file and the problem; the state is checked field by field (ControllerState.from_dict), so a
value of the wrong type (e.g. next_actor "NaN") is refused, never used.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from expertray.errors import CheckpointError, ExpertRayError
from expertray.models.files import CheckpointDescriptor
from expertray.state.placement_table import PlacementTable

FORMAT = "expertray-snapshot"
VERSION = 1


class SnapshotError(ExpertRayError, ValueError):
    """A snapshot file cannot be used."""


@dataclass(frozen=True)
class ControllerState:
    """What a restarted controller needs beyond the table.

    next_actor: the next expert actor number (ids expert-0, expert-1, ... are never reused).
    routers: router ids (actor names expertray-<id>), in order. next_router: next router number.
    transport: the transport the routers use. history: recent placement events (plain maps).
    autoscaler: the autoscale policy's own state (streaks, last actions), as the policy exported it.
    checkpoint: the served checkpoint's descriptor (CheckpointDescriptor.to_dict: path, shard sizes and
    digests; never weights); empty for a random-weight cluster.
    """

    next_actor: int = 0
    routers: tuple[str, ...] = ()
    next_router: int = 0
    transport: str | None = None
    history: tuple[dict[str, Any], ...] = ()
    autoscaler: dict[str, Any] = field(default_factory=dict)
    checkpoint: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ControllerState:
        """Validate every field's type; raise SnapshotError naming the field."""
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(d) - known, key=str)
        if unknown:
            raise SnapshotError(f"state.{unknown[0]}: unknown field")

        def count(name: str) -> int:
            v = d.get(name, 0)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise SnapshotError(f"state.{name}: expected an integer >= 0, got {v!r}")
            return v

        routers = d.get("routers", [])
        if not isinstance(routers, list) or not all(isinstance(r, str) and r for r in routers):
            raise SnapshotError(f"state.routers: expected a list of router ids, got {routers!r}")
        transport = d.get("transport")
        if transport is not None and not isinstance(transport, str):
            raise SnapshotError(f"state.transport: expected a string or nil, got {transport!r}")
        history = d.get("history", [])
        if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
            raise SnapshotError("state.history: expected a list of maps")
        autoscaler = d.get("autoscaler", {})
        if not isinstance(autoscaler, dict):
            raise SnapshotError(f"state.autoscaler: expected a map, got {type(autoscaler).__name__}")
        checkpoint = d.get("checkpoint", {})
        if not isinstance(checkpoint, dict):
            raise SnapshotError(f"state.checkpoint: expected a map, got {type(checkpoint).__name__}")
        if checkpoint:
            try:
                CheckpointDescriptor.from_dict(checkpoint)
            except CheckpointError as exc:
                raise SnapshotError(f"state.checkpoint: {exc}") from None
        return cls(count("next_actor"), tuple(routers), count("next_router"), transport, tuple(history), autoscaler,
                   checkpoint)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["routers"], d["history"] = list(self.routers), list(self.history)
        return d


def _digest(table: Any, state: Any) -> str:
    return hashlib.sha256(msgpack.packb(table, use_bin_type=True) + msgpack.packb(state, use_bin_type=True)
                          ).hexdigest()


def save_snapshot(path: str | Path, table: PlacementTable, state: dict[str, Any] | ControllerState) -> None:
    """Write atomically: a reader sees the old snapshot or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state_map = state.to_dict() if isinstance(state, ControllerState) else state
    table_map = table.to_dict()
    doc = {"format": FORMAT, "version": VERSION, "table": table_map, "state": state_map,
           "sha256": _digest(table_map, state_map)}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(msgpack.packb(doc, use_bin_type=True))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_snapshot(path: str | Path) -> tuple[PlacementTable, dict[str, Any]]:
    """(table, state map); the state map passed ControllerState's checks when it has controller fields."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise SnapshotError(f"snapshot {path}: cannot read ({exc.strerror})") from exc
    try:
        doc = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError, TypeError) as exc:
        # TypeError: a corrupted byte can turn a map key into an (unhashable) array
        raise SnapshotError(f"snapshot {path}: corrupted msgpack ({type(exc).__name__}: {exc}), "
                            f"{len(raw)} bytes") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise SnapshotError(f"snapshot {path}: not an expertray snapshot (format field is "
                            f"{doc.get('format') if isinstance(doc, dict) else type(doc).__name__!r})")
    if doc.get("version") != VERSION:
        raise SnapshotError(f"snapshot {path}: version {doc.get('version')!r} unsupported (expected {VERSION})")
    try:
        table = PlacementTable.from_dict(doc["table"])
    except (KeyError, TypeError, AttributeError, ExpertRayError) as exc:
        raise SnapshotError(f"snapshot {path}: bad placement table ({exc})") from exc
    state = doc.get("state")
    if not isinstance(state, dict):
        raise SnapshotError(f"snapshot {path}: state must be a map")
    try:
        ControllerState.from_dict(state)
    except SnapshotError as exc:
        raise SnapshotError(f"snapshot {path}: bad {exc}") from exc
    digest = doc.get("sha256")
    if not isinstance(digest, str):
        raise SnapshotError(f"snapshot {path}: no sha256 checksum; refusing an unverifiable snapshot")
    if digest != _digest(doc["table"], state):
        raise SnapshotError(f"snapshot {path}: sha256 checksum mismatch (the file was corrupted or edited)")
    return table, state


def load_controller_snapshot(path: str | Path) -> tuple[PlacementTable, ControllerState]:
    """load_snapshot with the state as a typed ControllerState."""
    table, state = load_snapshot(path)
    return table, ControllerState.from_dict(state)
