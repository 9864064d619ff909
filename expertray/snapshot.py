"""Controller snapshots: the placement table and policy state, as msgpack, written atomically.

Layout: {"format": "expertray-snapshot", "version": 1, "table": {...}, "state": {...}}.
A corrupted or foreign file raises SnapshotError naming the file and the problem.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import msgpack

from expertray.errors import ExpertRayError
from expertray.placement import PlacementTable

FORMAT = "expertray-snapshot"
VERSION = 1


class SnapshotError(ExpertRayError, ValueError):
    """A snapshot file cannot be used."""


def save_snapshot(path: str | Path, table: PlacementTable, state: dict[str, Any]) -> None:
    """Write atomically: a reader sees the old snapshot or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"format": FORMAT, "version": VERSION, "table": table.to_dict(), "state": state}
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
    except (KeyError, TypeError, ExpertRayError) as exc:
        raise SnapshotError(f"snapshot {path}: bad placement table ({exc})") from exc
    state = doc.get("state")
    if not isinstance(state, dict):
        raise SnapshotError(f"snapshot {path}: state must be a map")
    return table, state
