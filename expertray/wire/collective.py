"""The collective exchange, Ray-free: the router (rank 0) sends each expert actor (ranks 1..W-1) its rows
with an all-to-all of uneven split sizes, and gets the outputs back the same way.

Group formation is locked down because the rendezvous store is a network server:
- The router binds the store's listening socket to its node address (never 0.0.0.0): it creates the
  socket itself and hands it to torch's TCPStore (`master_listen_fd`). The port travels to members only,
  inside the Ray call that asks them to join.
- Each group has a fresh random secret, also sent only to members. Every key is stored under
  HMAC-SHA256(secret, key), and every value is encrypted (SHA-256 counter-mode keystream) and
  authenticated (HMAC-SHA256) by `SealedStore`. A process that reaches the port without the secret sees
  opaque key names and ciphertext; a value it writes fails authentication, so the join fails with a
  TransportError naming the bad key instead of joining a forged peer. (A prefix secret alone is not
  enough: TCPStore's `list_keys` would reveal it.) What stays possible for such a process is denial of
  service (deleting keys, filling memory) from hosts that can reach the node address: keep the node
  network private, as Ray requires anyway.
- Every member's gloo device listens and connects on that member's own node address (Ray's node IP,
  `join(local_host=...)`), never on what the machine's hostname resolves to (often loopback).

Split sizes travel in the small metadata call that tells each actor what it computes; the rows travel
here. `backend` is gloo or nccl, the same code; gloo moves CUDA rows through host memory.
`to_host_array` / `from_host_array` are the object store's wire format: numpy, bf16 carried as its bits.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import secrets
import socket
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from expertray.errors import TransportError
from expertray.validation import tensor_view
from expertray.wire.devices import host_staging

SECRET_BYTES = 16
_NONCE_BYTES = 16
_TAG_BYTES = 32


def new_secret() -> str:
    """A fresh per-group secret (hex), sent only to the group's members."""
    return secrets.token_hex(SECRET_BYTES)


class SealedStore(dist.Store):
    """A c10d Store over another store that hides key names and seals values with the group secret.

    Implements what gloo and NCCL rendezvous use: set, get, wait, check, add, delete_key, num_keys."""

    def __init__(self, inner: dist.Store, secret: str) -> None:
        super().__init__()
        self._inner = inner
        self._key = bytes.fromhex(secret)
        if len(self._key) < SECRET_BYTES:
            raise ValueError(f"group secret must be at least {SECRET_BYTES} bytes, got {len(self._key)}")

    def _name(self, key: str) -> str:
        return hmac.new(self._key, key.encode(), hashlib.sha256).hexdigest()

    def _stream(self, nonce: bytes, length: int) -> bytes:
        blocks = (length + 31) // 32
        return b"".join(hashlib.sha256(self._key + nonce + i.to_bytes(8, "big")).digest()
                        for i in range(blocks))[:length]

    def seal(self, name: str, value: bytes) -> bytes:
        nonce = secrets.token_bytes(_NONCE_BYTES)
        body = bytes(a ^ b for a, b in zip(value, self._stream(nonce, len(value))))
        tag = hmac.new(self._key, name.encode() + nonce + body, hashlib.sha256).digest()
        return nonce + body + tag

    def unseal(self, name: str, sealed: bytes) -> bytes:
        if len(sealed) < _NONCE_BYTES + _TAG_BYTES:
            raise TransportError(f"rendezvous value under {name[:12]}… is too short to be from a group member")
        nonce, body, tag = sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:-_TAG_BYTES], sealed[-_TAG_BYTES:]
        expect = hmac.new(self._key, name.encode() + nonce + body, hashlib.sha256).digest()
        if not hmac.compare_digest(tag, expect):
            raise TransportError(f"rendezvous value under {name[:12]}… failed authentication: "
                                 "written by a process without the group secret")
        return bytes(a ^ b for a, b in zip(body, self._stream(nonce, len(body))))

    def set(self, key: str, value: bytes | str) -> None:
        name = self._name(key)
        self._inner.set(name, self.seal(name, value.encode() if isinstance(value, str) else bytes(value)))

    def get(self, key: str) -> bytes:
        name = self._name(key)
        return self.unseal(name, self._inner.get(name))

    def wait(self, keys: list[str], timeout: datetime.timedelta | None = None) -> None:
        names = [self._name(k) for k in keys]
        if timeout is None:
            self._inner.wait(names)
        else:
            self._inner.wait(names, timeout)

    def check(self, keys: list[str]) -> bool:
        return self._inner.check([self._name(k) for k in keys])

    def add(self, key: str, amount: int) -> int:  # counters are not secret; their names are hidden
        return self._inner.add(self._name(key), amount)

    def delete_key(self, key: str) -> bool:
        return self._inner.delete_key(self._name(key))

    def num_keys(self) -> int:
        return self._inner.num_keys()

    def set_timeout(self, timeout: datetime.timedelta) -> None:
        self._inner.set_timeout(timeout)


def open_master_store(host: str, timeout_s: float) -> tuple[dist.TCPStore, int]:
    """The rendezvous server of one group, listening on `host` only. Returns (store, port)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.bind((host, 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    store = dist.TCPStore(host, port, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=timeout_s), master_listen_fd=sock.fileno())
    sock.detach()  # the store's server owns the descriptor now
    return store, port


@dataclass
class Group:
    """One member's view of a formed group. `device` is where this member computes; rows cross the wire
    on that device, or in host memory when the backend needs it (gloo with CUDA rows)."""

    pg: Any
    backend: str
    rank: int
    world_size: int
    device: torch.device
    stores: tuple[Any, ...]  # kept alive while the process group uses them

    @property
    def staged(self) -> bool:
        return host_staging(self.backend, self.device)

    @property
    def wire_device(self) -> torch.device:
        return torch.device("cpu") if self.staged else self.device


class Memberships:
    """The groups one member belongs to, by name, thread-safe (joins, batches and leaves run on different
    threads of an expert actor).

    A router that gives up forming a group (its deadline passed, the table switch was cancelled) tells every
    member to leave it, and that can reach a member before its join returns: the name is remembered (the last
    `remember` left names), so a join that completes afterwards is dropped instead of kept for good."""

    def __init__(self, remember: int = 1024) -> None:
        self._groups: dict[str, Group] = {}
        self._left: OrderedDict[str, None] = OrderedDict()
        self._remember = remember
        self._lock = threading.Lock()

    def add(self, name: str, group: Group) -> bool:
        """Keep `group` under `name`; False (dropped) when the member was told to leave it already."""
        with self._lock:
            if name in self._left:
                return False
            self._groups[name] = group
            return True

    def leave(self, name: str) -> None:
        with self._lock:
            self._groups.pop(name, None)
            self._left[name] = None
            while len(self._left) > self._remember:
                self._left.popitem(last=False)

    def get(self, name: str) -> Group:
        with self._lock:
            group = self._groups.get(name)
        if group is None:
            raise TransportError(f"not a member of group {name} (never joined, or left it)")
        return group

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._groups)


def join(backend: str, host: str, port: int, secret: str, rank: int, world_size: int, timeout_s: float,
         device: torch.device, master_store: dist.TCPStore | None = None, *, local_host: str | None = None
         ) -> Group:
    """Form (rank 0 passes the store from open_master_store) or join a standalone group: no default group,
    so groups can be re-formed freely as the placement changes.

    `host`:`port` is the rendezvous store (the router's node address). `local_host` is this member's own
    node address (Ray's node IP): gloo listens and connects its pairs there. Without it gloo resolves the
    machine's hostname, which on many hosts (an /etc/hosts entry `127.0.x.1 <hostname>`) is loopback:
    every peer on another node would then dial its own loopback and the group would never form. NCCL
    picks its bootstrap interface itself (NCCL_SOCKET_IFNAME)."""
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"collective backend must be gloo or nccl, got {backend!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a group of {world_size}")
    timeout = datetime.timedelta(seconds=timeout_s)
    store = master_store or dist.TCPStore(host, port, is_master=False, wait_for_workers=False, timeout=timeout)
    sealed = SealedStore(store, secret)
    if backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        pg = dist.ProcessGroupNCCL(sealed, rank, world_size, options)
    elif local_host is not None:
        gloo = dist.ProcessGroupGloo._Options()
        gloo._devices = [dist.ProcessGroupGloo.create_device(hostname=local_host)]
        gloo._timeout = timeout
        pg = dist.ProcessGroupGloo(sealed, rank, world_size, gloo)
    else:
        pg = dist.ProcessGroupGloo(sealed, rank, world_size, timeout)
    return Group(pg, backend, rank, world_size, device, (store, sealed))


def router_exchange(group: Group, rows: torch.Tensor, splits: Sequence[int]) -> torch.Tensor:
    """Rank 0: send rows [N, D] (contiguous per member, splits[i] rows for rank i+1) and return the members'
    outputs [N, D] in the same order, on the rows' device."""
    if group.rank != 0:
        raise ValueError(f"router_exchange runs on rank 0, not rank {group.rank}")
    if len(splits) != group.world_size - 1 or sum(splits) != rows.shape[0]:
        raise ValueError(f"splits {list(splits)} do not cover {rows.shape[0]} rows over "
                         f"{group.world_size - 1} members")
    wire = rows.to(group.wire_device).contiguous()
    none = [0] * group.world_size
    to_members = [0, *splits]
    empty = wire.new_empty(0, rows.shape[1])
    group.pg.alltoall_base(empty, wire, none, to_members).wait()
    back = torch.empty_like(wire)
    group.pg.alltoall_base(back, empty, to_members, none).wait()
    return back.to(rows.device)


def member_exchange(group: Group, num_rows: int, d_model: int, wire_dtype: torch.dtype,
                    compute: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Rank r ≥ 1: receive num_rows rows [n, D] from rank 0, run `compute` on them (on group.device), send the
    outputs [n, D] back. The send happens even when `compute` raises, so rank 0 is never left blocked in the
    collective; the error is re-raised afterwards for the metadata call to report."""
    none = [0] * group.world_size
    from_router = [num_rows] + [0] * (group.world_size - 1)
    recv = torch.empty(num_rows, d_model, dtype=wire_dtype, device=group.wire_device)
    empty = recv.new_empty(0, d_model)
    group.pg.alltoall_base(recv, empty, from_router, none).wait()
    out, error = recv, None
    try:
        if num_rows:
            out = compute(recv.to(group.device)).to(group.wire_device, wire_dtype)
    except Exception as exc:  # noqa: BLE001 - re-raised below, after the exchange completes
        error = exc
    group.pg.alltoall_base(empty, out.contiguous(), none, from_router).wait()
    if error is not None:
        raise error


def to_host_array(rows: torch.Tensor) -> tuple[np.ndarray, str]:
    """Rows [n, D] as a host numpy array plus the torch dtype name; bfloat16 (numpy has none) travels as
    its raw 16-bit patterns, so nothing is widened or rounded on the way."""
    host = rows.detach().cpu()
    name = str(host.dtype).removeprefix("torch.")
    return (host.view(torch.int16) if host.dtype == torch.bfloat16 else host).numpy(), name


def from_host_array(array: np.ndarray, dtype: str) -> torch.Tensor:
    """Inverse of to_host_array, zero-copy over the (possibly read-only) array."""
    t = tensor_view(array)
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t
