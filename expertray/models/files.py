"""A checkpoint directory on disk: its descriptor (plain data, persisted instead of weights) and its
tensor index (name → shard, dtype, shape), read from the safetensors headers without touching the data.

Layout handled: `config.json` plus either `model.safetensors` or shards listed in
`model.safetensors.index.json` (`weight_map`: tensor name → shard file). A safetensors file starts with
an 8-byte little-endian header length, then that many bytes of JSON: {name: {dtype, shape,
data_offsets}}. Nothing here unpickles or executes anything from the directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from expertray.errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: shard file name, safetensors dtype (F32, BF16, ...) and shape."""

    file: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ShardInfo:
    """One shard as it was when the checkpoint was described: size and sha256 of its header (the tensor
    names, dtypes, shapes and offsets), or of the whole file when described with full_digest=True."""

    file: str
    size_bytes: int
    sha256: str
    digest_of: str = "header"


@dataclass(frozen=True)
class CheckpointDescriptor:
    """What a cluster records about the checkpoint it serves (never the weights): its directory, the
    architecture named in config.json, and each shard's size and digest. `to_dict` is plain data."""

    path: str
    architecture: str
    shards: tuple[ShardInfo, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "architecture": self.architecture,
                "shards": [vars(s).copy() for s in self.shards]}

    @staticmethod
    def from_dict(data: dict[str, Any]) -> CheckpointDescriptor:
        """Rebuild from `to_dict` output, rejecting malformed records by field."""
        if not isinstance(data, dict) or not isinstance(data.get("path"), str) or not data["path"]:
            raise CheckpointError("checkpoint descriptor: 'path' must be a non-empty string")
        if not isinstance(data.get("architecture"), str) or not isinstance(data.get("shards"), list):
            raise CheckpointError(f"checkpoint descriptor for {data['path']}: needs 'architecture' (str) "
                                  "and 'shards' (list)")
        try:
            shards = tuple(ShardInfo(str(s["file"]), int(s["size_bytes"]), str(s["sha256"]),
                                     str(s.get("digest_of", "header"))) for s in data["shards"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"checkpoint descriptor for {data['path']}: bad shard record ({exc})") from None
        return CheckpointDescriptor(data["path"], data["architecture"], shards)

    def verify(self) -> None:
        """Raise CheckpointError naming the first shard that is missing or changed since described."""
        for shard in self.shards:
            now = _shard_info(Path(self.path), shard.file, full_digest=shard.digest_of == "file")
            if now.size_bytes != shard.size_bytes or now.sha256 != shard.sha256:
                raise CheckpointError(f"checkpoint {self.path}: shard {shard.file} changed since the cluster "
                                      f"recorded it (size {shard.size_bytes} -> {now.size_bytes} bytes or "
                                      f"{shard.digest_of} digest differs)")


def _unreadable(path: Path, what: str, exc: OSError) -> CheckpointError:
    return CheckpointError(f"checkpoint {path}: cannot read {what} on node {socket.gethostname()} "
                           f"({exc.strerror or exc})")


def read_config(path: Path) -> dict[str, Any]:
    """config.json as a dict (one-line CheckpointError when unreadable or not a JSON object)."""
    try:
        text = (path / "config.json").read_text()
    except OSError as exc:
        raise _unreadable(path, "config.json", exc) from None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"checkpoint {path}: config.json is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"checkpoint {path}: config.json must hold a JSON object")
    return config


def read_header(path: Path, file: str) -> tuple[bytes, int]:
    """(raw JSON header bytes, file size) of one safetensors shard."""
    try:
        with open(path / file, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"checkpoint {path}: shard {file} is truncated ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise CheckpointError(f"checkpoint {path}: shard {file} has a corrupt header length {n} "
                                      f"(file is {size} bytes)")
            return f.read(n), size
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path}: shard {file} is missing") from None
    except OSError as exc:
        raise _unreadable(path, f"shard {file}", exc) from None


def _shard_info(path: Path, file: str, full_digest: bool) -> ShardInfo:
    header, size = read_header(path, file)
    if not full_digest:
        return ShardInfo(file, size, hashlib.sha256(header).hexdigest(), "header")
    digest = hashlib.sha256()
    with open(path / file, "rb") as f:
        for block in iter(lambda: f.read(16 << 20), b""):
            digest.update(block)
    return ShardInfo(file, size, digest.hexdigest(), "file")


def _weight_map(path: Path) -> dict[str, str] | None:
    """The index's tensor → shard map, or None for a single-file checkpoint."""
    index = path / INDEX_FILE
    if not index.exists():
        return None
    try:
        data = json.loads(index.read_text())
    except OSError as exc:
        raise _unreadable(path, INDEX_FILE, exc) from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"checkpoint {path}: {INDEX_FILE} is not valid JSON ({exc})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"checkpoint {path}: {INDEX_FILE} has no 'weight_map' of tensor -> shard file")
    for file in weight_map.values():
        if Path(file).name != file:  # a shard must be a file in the directory, not a path elsewhere
            raise CheckpointError(f"checkpoint {path}: {INDEX_FILE} names shard {file!r} outside the directory")
    return weight_map


def shard_files(path: Path) -> list[str]:
    """Shard file names in order (the index's, else the single model.safetensors)."""
    weight_map = _weight_map(path)
    if weight_map is None:
        if not (path / SINGLE_FILE).exists():
            raise CheckpointError(f"checkpoint {path}: neither {INDEX_FILE} nor {SINGLE_FILE} found")
        return [SINGLE_FILE]
    return sorted(set(weight_map.values()))


def describe(path: str | os.PathLike[str], full_digest: bool = False) -> CheckpointDescriptor:
    """Describe the checkpoint at `path` (every shard must be present and readable)."""
    root = Path(path).expanduser().resolve()
    if not root.is_dir():
        raise CheckpointError(f"checkpoint {root}: not a directory readable on node {socket.gethostname()}")
    config = read_config(root)
    archs = config.get("architectures") or [config.get("model_type", "?")]
    shards = tuple(_shard_info(root, f, full_digest) for f in shard_files(root))
    return CheckpointDescriptor(str(root), str(archs[0]), shards)


def tensor_index(path: str | os.PathLike[str]) -> dict[str, TensorInfo]:
    """Every tensor of the checkpoint: name → TensorInfo, from the shard headers (data is not read).

    Raises when the index names a shard that is missing or a tensor its shard does not hold.
    """
    root = Path(path)
    weight_map = _weight_map(root)
    files = shard_files(root)
    out: dict[str, TensorInfo] = {}
    for file in files:
        raw, _ = read_header(root, file)
        try:
            header = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"checkpoint {root}: shard {file} has a corrupt header ({exc})") from None
        for name, meta in header.items():
            if name != "__metadata__":
                out[name] = TensorInfo(file, str(meta["dtype"]), tuple(int(d) for d in meta["shape"]))
    for name, file in (weight_map or {}).items():
        if name not in out or out[name].file != file:
            raise CheckpointError(f"checkpoint {root}: tensor {name} is missing from shard {file} "
                                  f"({INDEX_FILE} says it is there)")
    return out
