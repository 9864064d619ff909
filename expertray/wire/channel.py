"""Standing channels: rows to an expert actor and back over one TCP connection set up once, with no Ray task
per batch. Ray-free.

An expert actor runs a `ChannelServer` (a listening socket on its node's address, one thread per connection,
each a persistent loop: read a request, compute, answer). A caller (a router, or a client doing its own
routing: expertray/runtime/direct.py) holds a `ChannelSet`, one `Channel` per actor of the placement table,
and `exchange`s a batch's per-actor buckets over them: every busy actor's request goes out first, then the
answers are read into the output tensor in place.

Wire format, both directions: a frame = 4-byte little-endian header length, a msgpack header, then the
payload its `nbytes` names (raw tensor bytes, row-major; bfloat16 as its bits). Nothing is pickled.
- hello (client → server, first frame): {"token"}; a wrong token closes the connection.
- request: {"layer", "experts", "counts", "d", "dtype", "nbytes"} + rows [sum(counts), d].
- answer: {"ok": True, "ms", "nbytes"} + outputs [same shape]; or {"ok": False, "error", "unknown_slot"}.
The server checks every header field against the payload before reading it (sizes, dtype, a bounded header).

Copies a row makes from the caller's plan to the expert and back: the send reads the permuted rows in place
(one kernel copy), the server receives into one buffer it computes from (one kernel copy), the answer is sent
from the output tensor (one kernel copy) and received straight into its rows of the caller's output tensor
(one kernel copy). No pickling, no object store, no intermediate concatenation.

Why channels and not Ray compiled graphs (measured, docs/BENCHMARKS.md "One layer's round trip per path"): a
compiled graph driver → router → 2 experts → router → driver costs 0.7–0.9 ms here with no compute at all, about
what a whole direct layer call costs with gate and experts; and a compiled graph is bound to its actors (rebuilt
on every placement change and after any actor death) and holds their execution loop, where a channel set follows
the table one connection at a time and a dead actor resets only its own channel.

Deadlines: `exchange` answers within its `timeout_s` or raises ChannelError naming the actors that did not
answer (dead: connection refused or reset; hung: no answer in time). A channel whose exchange failed is closed
and reconnects on next use; `abort` (from another thread) shuts the sockets in use so a cancelled exchange
ends at once.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import socket
import struct
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import msgpack
import torch

from expertray.errors import TransportError, UnknownExpertError

log = logging.getLogger(__name__)

LENGTH = struct.Struct("<I")
MAX_HEADER_BYTES = 1 << 16
MAX_PAYLOAD_BYTES = 1 << 34  # 16 GiB: a bound on what one request may ask the server to allocate
CLOSE_WAIT_S = 2.0  # the most `ChannelSet.close` waits for an exchange in progress to let go
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# (layer, experts, counts, rows on the host) -> (outputs [same shape], compute ms)
Handler = Callable[[int, list[int], list[int], torch.Tensor], tuple[torch.Tensor, float]]


class ChannelError(TransportError):
    """An exchange failed: `actors` did not answer (dead or hung). `unknown_slot`: an actor answered that it
    holds no slot asked of it (the caller's table is older than the cluster's: refresh it and retry)."""

    def __init__(self, message: str = "", actors: tuple[str, ...] | list[str] = (), unknown_slot: bool = False
                 ) -> None:
        super().__init__(message, actors)
        self.unknown_slot = unknown_slot

    def __reduce__(self) -> tuple:
        return type(self), (str(self), self.actors, self.unknown_slot)


class ProtocolError(ValueError):
    """A frame that breaks the wire format (the connection is closed)."""


@dataclass(frozen=True)
class Endpoint:
    """Where one expert actor's channel server listens, and the token its connections must present."""

    actor: str
    host: str
    port: int
    token: str

    @classmethod
    def unknown(cls, actor: str) -> Endpoint:
        """A stand-in for an actor whose endpoint is not known (it did not answer): a channel to it never
        connects, so the actor is named as failed when used."""
        return cls(actor, "127.0.0.1", 0, "")

    @property
    def known(self) -> bool:
        return self.port != 0


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A contiguous tensor's bytes, in place (no copy)."""
    return memoryview(t.view(torch.uint8).numpy()).cast("B") if t.numel() else memoryview(b"")


def _recv_exact(sock: socket.socket, view: memoryview, deadline: float | None) -> None:
    while len(view):
        if deadline is not None:
            sock.settimeout(max(1e-4, deadline - time.monotonic()))
        n = sock.recv_into(view)
        if n == 0:
            raise ConnectionResetError("connection closed by peer")
        view = view[n:]


class _Reader:
    """Frames from one socket, reading ahead into a buffer: a small frame (header and payload) costs one recv;
    a large payload goes straight from the socket into its destination."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = memoryview(bytearray(LENGTH.size + MAX_HEADER_BYTES + (1 << 16)))
        self.start = self.end = 0

    def _fill(self, need: int, deadline: float | None) -> None:
        """At least `need` (≤ the buffer) bytes buffered from `start`."""
        if self.end - self.start >= need:
            return
        if self.start + need > len(self.buf):  # move what is buffered to the front
            n = self.end - self.start
            self.buf[:n] = self.buf[self.start:self.end]
            self.start, self.end = 0, n
        while self.end - self.start < need:
            if deadline is not None:
                self.sock.settimeout(max(1e-4, deadline - time.monotonic()))
            n = self.sock.recv_into(self.buf[self.end:])
            if n == 0:
                raise ConnectionResetError("connection closed by peer")
            self.end += n

    def header(self, deadline: float | None) -> dict[str, Any]:
        self._fill(LENGTH.size, deadline)
        (length,) = LENGTH.unpack(self.buf[self.start:self.start + LENGTH.size])
        if length > MAX_HEADER_BYTES:
            raise ProtocolError(f"header of {length} bytes exceeds {MAX_HEADER_BYTES}")
        self._fill(LENGTH.size + length, deadline)
        body = bytes(self.buf[self.start + LENGTH.size:self.start + LENGTH.size + length])
        self.start += LENGTH.size + length
        header = msgpack.unpackb(body, raw=False, strict_map_key=True)
        if not isinstance(header, dict):
            raise ProtocolError(f"header is a {type(header).__name__}, not a map")
        return header

    def into(self, view: memoryview, deadline: float | None) -> None:
        """Fill `view` with the next len(view) bytes: what is buffered, then straight from the socket."""
        n = min(len(view), self.end - self.start)
        view[:n] = self.buf[self.start:self.start + n]
        self.start += n
        if self.start == self.end:
            self.start = self.end = 0
        _recv_exact(self.sock, view[n:], deadline)


def _send(sock: socket.socket, header: dict[str, Any], payload: memoryview | None = None) -> None:
    """One frame, in one sendmsg when the socket takes it all (header and payload are not concatenated)."""
    body = msgpack.packb(header, use_bin_type=True)
    parts = [memoryview(LENGTH.pack(len(body)) + body)]
    if payload is not None and len(payload):
        parts.append(payload)
    sent = sock.sendmsg(parts)
    for part in parts:  # what sendmsg left, in order
        if sent >= len(part):
            sent -= len(part)
            continue
        sock.sendall(part[sent:])
        sent = 0


def _int_list(value: Any, what: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ProtocolError(f"{what} must be a list of integers")
    return value


def check_request(header: dict[str, Any]) -> tuple[int, list[int], list[int], int, torch.dtype, int]:
    """(layer, experts, counts, d, dtype, rows) of a request header, every field checked against the others."""
    layer, d, nbytes = header.get("layer"), header.get("d"), header.get("nbytes")
    for name, v in (("layer", layer), ("d", d), ("nbytes", nbytes)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ProtocolError(f"request {name} must be an integer >= 0, got {v!r}")
    experts, counts = _int_list(header.get("experts"), "experts"), _int_list(header.get("counts"), "counts")
    if len(experts) != len(counts) or any(c < 0 for c in counts):
        raise ProtocolError(f"{len(experts)} experts for {len(counts)} counts (counts must be >= 0)")
    dtype = DTYPES.get(header.get("dtype"))  # type: ignore[arg-type]
    if dtype is None:
        raise ProtocolError(f"dtype {header.get('dtype')!r} is not one of {sorted(DTYPES)}")
    rows = sum(counts)
    if nbytes != rows * d * dtype.itemsize or nbytes > MAX_PAYLOAD_BYTES:
        raise ProtocolError(f"payload of {nbytes} bytes for {rows} rows x {d} {header['dtype']} "
                            f"(limit {MAX_PAYLOAD_BYTES})")
    return layer, experts, counts, d, dtype, rows


class ChannelServer:
    """An expert actor's side: listens on `host` (its node's address only), serves each connection on a
    thread of its own until the peer closes it. `handler` computes a request's rows."""

    def __init__(self, actor: str, host: str, handler: Handler) -> None:
        self.actor = actor
        self.handler = handler
        self.token = secrets.token_hex(16)
        self.sock = socket.create_server((host, 0), backlog=64)
        self.endpoint = Endpoint(actor, host, self.sock.getsockname()[1], self.token)
        self.requests = 0
        self._open: set[socket.socket] = set()
        self._closed = False
        threading.Thread(target=self._accept, name=f"channel-accept-{actor}", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._open.add(conn)
            threading.Thread(target=self._serve, args=(conn,), name=f"channel-{self.actor}", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.settimeout(10.0)  # the hello comes at once or never
                reader = _Reader(conn)
                hello = reader.header(None)
                if not hmac.compare_digest(str(hello.get("token", "")), self.token):
                    log.warning("%s: channel connection with a wrong token closed", self.actor)
                    return
                conn.settimeout(None)  # then it stands: requests come when the caller has rows
                _send(conn, {"ok": True, "actor": self.actor})
                while True:
                    self._one(conn, reader)
            except (ConnectionError, ProtocolError, OSError, msgpack.UnpackException, ValueError) as exc:
                if not isinstance(exc, ConnectionResetError) and not self._closed:
                    log.info("%s: channel closed: %s", self.actor, exc)
            finally:
                self._open.discard(conn)

    def _one(self, conn: socket.socket, reader: _Reader) -> None:
        header = reader.header(None)
        layer, experts, counts, d, dtype, rows = check_request(header)
        buf = torch.empty(rows * d * dtype.itemsize, dtype=torch.uint8)
        reader.into(tensor_bytes(buf), None)
        x = buf.view(dtype).view(rows, d)
        try:
            out, ms = self.handler(layer, experts, counts, x)
        except Exception as exc:  # noqa: BLE001 - the caller gets the error; the channel stands
            _send(conn, {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                         "unknown_slot": isinstance(exc, UnknownExpertError)})
            return
        out = out.to(dtype).contiguous()
        self.requests += 1
        _send(conn, {"ok": True, "ms": ms, "nbytes": out.numel() * out.element_size()}, tensor_bytes(out))

    @property
    def connections(self) -> int:
        return len(self._open)

    def close(self) -> None:
        """Stop listening and end every connection (their callers see the channel reset)."""
        self._closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept thread (close alone does not, on Linux)
        except OSError:
            pass
        self.sock.close()
        for conn in list(self._open):
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class Channel:
    """The caller's connection to one actor's server: connected (and the token presented) on first use,
    closed after a failed exchange and reconnected on the next."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.sock: socket.socket | None = None
        self.reader: _Reader | None = None
        self.aborted = False  # shut down by `abort`: reconnect before the next use
        # the socket of a handshake in progress: a hung actor (SIGSTOP) still accepts connections in the kernel
        # and never answers the token, so `abort` must reach this socket too
        self.pending: socket.socket | None = None

    def connected(self, deadline: float) -> socket.socket:
        if self.aborted:  # an exchange that was ended may have finished anyway: its socket is shut down
            self.close()
            self.aborted = False
        if self.sock is None:
            e = self.endpoint
            sock = socket.create_connection((e.host, e.port), timeout=max(1e-3, deadline - time.monotonic()))
            self.pending = sock
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                _send(sock, {"token": e.token})
                reader = _Reader(sock)
                if not reader.header(deadline).get("ok"):
                    raise ConnectionError(f"{e.actor} refused the channel")
            except BaseException:
                sock.close()
                raise
            finally:
                self.pending = None
            self.sock, self.reader = sock, reader
        return self.sock

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            finally:
                self.sock = self.reader = None

    def abort(self) -> None:
        """Wake a thread blocked on this channel (shutdown both ways); it then fails and closes it."""
        for sock in (self.sock, self.pending):
            if sock is None:
                continue
            self.aborted = self.aborted or sock is self.sock
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class Bucket(Protocol):
    """One actor's share of a batch: rows[row_start : row_start + num_rows], grouped by `experts`
    (expertray.layer.route.ActorBucket)."""

    actor: int
    row_start: int
    num_rows: int
    experts: list[int]
    counts: list[int]


class ChannelSet:
    """Channels to the actors of one placement table (index = table actor order). One exchange at a time."""

    @classmethod
    def to(cls, endpoints: Sequence[Endpoint]) -> ChannelSet:
        """New channels to `endpoints` (connected on first use, or by `connect`)."""
        return cls([Channel(e) for e in endpoints])

    def __init__(self, channels: Sequence[Channel]) -> None:
        self.channels = list(channels)
        self.endpoints = [c.endpoint for c in self.channels]
        self._lock = threading.Lock()
        self._in_use: list[Channel] = []

    def connect(self, timeout_s: float) -> dict[str, str]:
        """Connect every channel now, all within `timeout_s` (a transport opens so); returns {actor: why} for
        those that did not connect (they try again when used)."""
        deadline = time.monotonic() + timeout_s
        failed = {}
        with self._lock:
            for channel in self.channels:
                try:
                    channel.connected(deadline)
                except (OSError, ProtocolError, msgpack.UnpackException, ValueError) as exc:
                    channel.close()
                    failed[channel.endpoint.actor] = _why(exc)
        return failed

    def exchange(self, layer: int, rows: torch.Tensor, buckets: Sequence[Bucket], timeout_s: float,
                 cancelled: threading.Event | None = None) -> tuple[torch.Tensor, dict[int, float]]:
        """Send each busy bucket's rows [n, D] (host, contiguous) to its actor, receive the outputs in place
        into a tensor like `rows`; returns it and each busy actor's compute ms. ChannelError past
        `timeout_s` or when an actor is dead, names those that did not answer. `cancelled`: set by a caller
        that gave up on this exchange (it may still wait for the previous one's lock): it then never starts.
        The deadline covers the wait for that lock too."""
        deadline = time.monotonic() + timeout_s
        rows = rows.contiguous()
        out = torch.empty_like(rows)
        busy = [b for b in buckets if b.num_rows]
        d, dtype = rows.shape[1], str(rows.dtype).removeprefix("torch.")
        row_bytes = d * rows.element_size()
        src, dst = tensor_bytes(rows), tensor_bytes(out)
        if not self._lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise ChannelError(f"layer {layer}: the previous exchange still held the channels after {timeout_s:g} s")
        try:
            if cancelled is not None and cancelled.is_set():
                raise ChannelError(f"layer {layer}: exchange cancelled before it started")
            self._in_use = [self.channels[b.actor] for b in busy]
            failed: dict[int, str] = {}
            sent: list[Bucket] = []
            try:
                for b in busy:
                    try:
                        sock = self.channels[b.actor].connected(deadline)
                        sock.settimeout(max(1e-4, deadline - time.monotonic()))
                        lo, hi = b.row_start * row_bytes, (b.row_start + b.num_rows) * row_bytes
                        _send(sock, {"layer": layer, "experts": list(b.experts), "counts": list(b.counts), "d": d,
                                     "dtype": dtype, "nbytes": hi - lo}, src[lo:hi])
                        sent.append(b)
                    except (OSError, ProtocolError) as exc:
                        failed[b.actor] = _why(exc)
                ms: dict[int, float] = {}
                errors: list[str] = []
                unknown_slot = False
                for b in sent:  # every answer is needed: reading in send order waits as long as any order
                    channel = self.channels[b.actor]
                    try:
                        header = channel.reader.header(deadline)  # type: ignore[union-attr]
                        if not header.get("ok"):
                            errors.append(f"{channel.endpoint.actor}: {header.get('error')}")
                            unknown_slot = unknown_slot or bool(header.get("unknown_slot"))
                            continue
                        lo, hi = b.row_start * row_bytes, (b.row_start + b.num_rows) * row_bytes
                        if header.get("nbytes") != hi - lo:
                            raise ProtocolError(f"answer of {header.get('nbytes')} bytes for {hi - lo}")
                        channel.reader.into(dst[lo:hi], deadline)  # type: ignore[union-attr]
                        ms[b.actor] = float(header.get("ms", 0.0))
                    except (OSError, ProtocolError, msgpack.UnpackException, ValueError) as exc:
                        failed[b.actor] = _why(exc)
            finally:
                self._in_use = []
            for a in failed:
                self.channels[a].close()
            if failed:
                names = [self.endpoints[a].actor for a in failed]
                raise ChannelError(f"layer {layer}: no answer from " + ", ".join(
                    f"{self.endpoints[a].actor} ({why})" for a, why in failed.items())
                    + f" within {timeout_s:g} s", names)
            if errors:
                raise ChannelError(f"layer {layer}: " + "; ".join(errors), (), unknown_slot=unknown_slot)
            return out, ms
        finally:
            self._lock.release()

    def retarget(self, endpoints: dict[int, Endpoint]) -> None:
        """Point channels (by index) at new endpoints (an actor's, learned after the set was made); the old
        channels close. Waits for the exchange in progress."""
        with self._lock:
            for index, endpoint in endpoints.items():
                if self.endpoints[index].actor != endpoint.actor:
                    raise ValueError(f"channel {index} is {self.endpoints[index].actor}'s, not {endpoint.actor}'s")
                self.channels[index].close()
                self.channels[index] = Channel(endpoint)
                self.endpoints[index] = endpoint

    def abort(self, actors: Collection[str] | None = None) -> None:
        """End the exchange in progress (from another thread): its channels to `actors` (None: all) fail now,
        named in its ChannelError, and reconnect on next use."""
        for channel in list(self._in_use):
            if actors is None or channel.endpoint.actor in actors:
                channel.abort()

    def close(self) -> None:
        """Abort the exchange in progress, then close every channel (waiting CLOSE_WAIT_S at most for that
        exchange to let go: a caller closing a transport must not hang on an exchange stuck in a kernel call)."""
        self.abort()
        held = self._lock.acquire(timeout=CLOSE_WAIT_S)
        try:
            for channel in self.channels:
                channel.close()
        finally:
            if held:
                self._lock.release()


def _why(exc: BaseException) -> str:
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "no answer in time"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
