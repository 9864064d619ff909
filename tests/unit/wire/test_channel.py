"""Standing channels (expertray/wire/channel.py) between threads of this process: answers land in their rows
exactly (float32 and bf16), bad frames and wrong tokens close a connection without harming the server, and a
dead, hung or stale actor is named in a ChannelError instead of a hang."""

from __future__ import annotations

import socket
import threading
import time

import msgpack
import pytest
import torch

from expertray.errors import UnknownExpertError
from expertray.layer.route import ActorBucket
from expertray.wire.channel import LENGTH, ChannelError, ChannelServer, ChannelSet, Endpoint


def scale_by_expert(layer: int, experts: list[int], counts: list[int], rows: torch.Tensor
                    ) -> tuple[torch.Tensor, float]:
    """Row i of expert e comes back times (e + 1 + layer)."""
    scale = torch.cat([torch.full((n, 1), float(e + 1 + layer)) for e, n in zip(experts, counts)]) if experts \
        else torch.empty(0, 1)
    return (rows.float() * scale).to(rows.dtype), 0.5


def expected(rows: torch.Tensor, buckets: list[ActorBucket], layer: int) -> torch.Tensor:
    out = torch.empty_like(rows)
    for b in buckets:
        out[b.row_start:b.row_start + b.num_rows] = scale_by_expert(
            layer, b.experts, b.counts, rows[b.row_start:b.row_start + b.num_rows])[0]
    return out


@pytest.fixture
def servers() -> list[ChannelServer]:
    made = [ChannelServer(f"expert-{i}", "127.0.0.1", scale_by_expert) for i in range(3)]
    yield made
    for s in made:
        s.close()


BUCKETS = [ActorBucket(0, 0, 3, [0, 2], [1, 2]), ActorBucket(1, 3, 0, [], []), ActorBucket(2, 3, 4, [5], [4])]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_answers_land_in_their_rows_exactly(servers: list[ChannelServer], dtype: torch.dtype) -> None:
    channels = ChannelSet.to([s.endpoint for s in servers])
    rows = torch.randn(7, 16).to(dtype)
    for layer in (0, 3):  # the channel stands: a second exchange reuses it
        out, ms = channels.exchange(layer, rows, BUCKETS, timeout_s=10)
        assert out.dtype == dtype and torch.equal(out, expected(rows, BUCKETS, layer))
        assert ms == {0: 0.5, 2: 0.5}  # the idle actor got nothing
    assert [s.requests for s in servers] == [2, 0, 2] and servers[1].connections == 0
    channels.close()


def test_a_wrong_token_is_refused(servers: list[ChannelServer]) -> None:
    e = servers[0].endpoint
    bad = ChannelSet.to([Endpoint(e.actor, e.host, e.port, "0" * 32)])
    assert list(bad.connect(timeout_s=5)) == ["expert-0"]
    with pytest.raises(ChannelError, match="expert-0") as info:
        bad.exchange(0, torch.ones(1, 4), [ActorBucket(0, 0, 1, [0], [1])], 5)
    assert info.value.actors == ("expert-0",)


def _raw(endpoint: Endpoint) -> socket.socket:
    sock = socket.create_connection((endpoint.host, endpoint.port), timeout=5)
    body = msgpack.packb({"token": endpoint.token})
    sock.sendall(LENGTH.pack(len(body)) + body)
    sock.recv(1024)  # the hello's answer
    return sock


@pytest.mark.parametrize("header", [
    {"layer": 0, "experts": [1], "counts": [2], "d": 4, "dtype": "float32", "nbytes": 999},  # size mismatch
    {"layer": 0, "experts": [1], "counts": [2], "d": 4, "dtype": "int64", "nbytes": 64},  # not a float dtype
    {"layer": -1, "experts": [1], "counts": [2], "d": 4, "dtype": "float32", "nbytes": 32},
    {"layer": 0, "experts": [1, 2], "counts": [2], "d": 4, "dtype": "float32", "nbytes": 32},
    {"layer": 0, "experts": "x", "counts": [2], "d": 4, "dtype": "float32", "nbytes": 32},
    [1, 2, 3],  # not a map
])
def test_a_bad_frame_closes_its_connection_and_the_server_serves_on(servers: list[ChannelServer],
                                                                     header: object) -> None:
    sock = _raw(servers[0].endpoint)
    body = msgpack.packb(header)
    sock.sendall(LENGTH.pack(len(body)) + body)
    assert sock.recv(1024) == b""  # closed, nothing computed
    sock.close()
    out, _ = ChannelSet.to([servers[0].endpoint]).exchange(0, torch.ones(2, 4), [ActorBucket(0, 0, 2, [1], [2])], 5)
    assert torch.equal(out, torch.full((2, 4), 2.0))


def test_an_oversized_header_is_refused(servers: list[ChannelServer]) -> None:
    sock = _raw(servers[0].endpoint)
    sock.sendall(LENGTH.pack(1 << 30))
    assert sock.recv(1024) == b""
    sock.close()


def test_a_dead_actor_is_named_and_the_others_answer_next_time(servers: list[ChannelServer]) -> None:
    channels = ChannelSet.to([s.endpoint for s in servers])
    rows = torch.randn(7, 16)
    channels.exchange(0, rows, BUCKETS, 5)
    servers[2].close()  # its process died: listening socket and connections gone
    with pytest.raises(ChannelError) as info:
        channels.exchange(0, rows, BUCKETS, 5)
    assert info.value.actors == ("expert-2",)
    alive = [ActorBucket(0, 0, 7, [0], [7]), ActorBucket(1, 7, 0, [], []), ActorBucket(2, 7, 0, [], [])]
    out, _ = channels.exchange(0, rows, alive, 5)
    assert torch.equal(out, expected(rows, alive, 0))


def test_a_hung_actor_is_named_at_the_deadline_and_abort_ends_a_wait() -> None:
    release = threading.Event()

    def hang(layer: int, experts: list[int], counts: list[int], rows: torch.Tensor) -> tuple[torch.Tensor, float]:
        release.wait(30)
        return rows, 0.0

    fast = ChannelServer("fast", "127.0.0.1", scale_by_expert)
    hung = ChannelServer("hung", "127.0.0.1", hang)
    try:
        channels = ChannelSet.to([fast.endpoint, hung.endpoint])
        buckets = [ActorBucket(0, 0, 1, [0], [1]), ActorBucket(1, 1, 1, [0], [1])]
        with pytest.raises(ChannelError, match="hung") as info:
            channels.exchange(0, torch.ones(2, 4), buckets, timeout_s=0.3)
        assert info.value.actors == ("hung",)

        caught: list[BaseException] = []
        waiter = threading.Thread(target=lambda: _catch(caught, channels.exchange, 0, torch.ones(2, 4), buckets, 60))
        waiter.start()
        time.sleep(0.3)
        channels.abort()  # a dropped batch: the exchange ends now, not at its 60 s deadline
        waiter.join(10)
        assert not waiter.is_alive() and isinstance(caught[0], ChannelError) and caught[0].actors == ("hung",)
    finally:
        release.set()
        fast.close()
        hung.close()


def _catch(into: list[BaseException], fn, *args) -> None:  # noqa: ANN001
    try:
        fn(*args)
    except BaseException as exc:  # noqa: BLE001
        into.append(exc)


def test_a_missing_slot_says_the_table_is_stale() -> None:
    def no_slot(layer: int, experts: list[int], counts: list[int], rows: torch.Tensor) -> tuple[torch.Tensor, float]:
        raise UnknownExpertError(f"holds no slot for expert {layer}:{experts[0]}")

    server = ChannelServer("moved", "127.0.0.1", no_slot)
    try:
        channels = ChannelSet.to([server.endpoint])
        with pytest.raises(ChannelError, match="no slot") as info:
            channels.exchange(0, torch.ones(1, 4), [ActorBucket(0, 0, 1, [3], [1])], 5)
        assert info.value.unknown_slot and info.value.actors == ()
        with pytest.raises(ChannelError):  # the connection stood: the actor answered again
            channels.exchange(0, torch.ones(1, 4), [ActorBucket(0, 0, 1, [3], [1])], 5)
        assert server.connections == 1
    finally:
        server.close()


def test_an_abort_that_lands_after_its_exchange_ended_blames_no_one(servers: list[ChannelServer]) -> None:
    """A dropped batch's abort can race with the exchange finishing: the shut-down sockets are reopened before
    the next exchange instead of failing it (and naming live actors as dead)."""
    channels = ChannelSet.to([s.endpoint for s in servers])
    rows = torch.randn(7, 16)
    channels.exchange(0, rows, BUCKETS, 5)
    for channel in channels.channels:
        channel.abort()  # what ChannelSet.abort does to the channels of an exchange in flight
    out, _ = channels.exchange(0, rows, BUCKETS, 5)
    assert torch.equal(out, expected(rows, BUCKETS, 0))


def test_abort_ends_a_handshake_with_a_stopped_actor() -> None:
    """A SIGSTOPped actor's kernel still accepts connections but never answers the token: a channel opened to it
    then (e.g. by a router started during the stop) must be abortable, not stuck until its deadline."""
    stopped = socket.socket()
    stopped.bind(("127.0.0.1", 0))
    stopped.listen(8)  # never accepted: the handshake's answer never comes
    fast = ChannelServer("fast", "127.0.0.1", scale_by_expert)
    try:
        channels = ChannelSet.to([fast.endpoint, Endpoint("stopped", "127.0.0.1", stopped.getsockname()[1], "x")])
        buckets = [ActorBucket(0, 0, 1, [0], [1]), ActorBucket(1, 1, 1, [0], [1])]
        caught: list[BaseException] = []
        waiter = threading.Thread(target=lambda: _catch(caught, channels.exchange, 0, torch.ones(2, 4), buckets, 60))
        started = time.monotonic()
        waiter.start()
        time.sleep(0.3)
        channels.abort()
        waiter.join(10)
        assert not waiter.is_alive() and time.monotonic() - started < 5
        assert isinstance(caught[0], ChannelError) and caught[0].actors == ("stopped",)
    finally:
        stopped.close()
        fast.close()


def test_a_cancelled_exchange_waiting_for_the_channels_never_starts() -> None:
    release = threading.Event()
    calls: list[int] = []

    def slow(layer: int, experts: list[int], counts: list[int], rows: torch.Tensor) -> tuple[torch.Tensor, float]:
        calls.append(layer)
        release.wait(30)
        return rows, 0.0

    server = ChannelServer("slow", "127.0.0.1", slow)
    try:
        channels = ChannelSet.to([server.endpoint])
        buckets = [ActorBucket(0, 0, 1, [0], [1])]
        first = threading.Thread(target=lambda: _catch([], channels.exchange, 1, torch.ones(1, 4), buckets, 30))
        first.start()
        time.sleep(0.2)  # the first exchange holds the channels, its actor busy
        cancelled = threading.Event()
        caught: list[BaseException] = []
        second = threading.Thread(target=lambda: _catch(caught, channels.exchange, 2, torch.ones(1, 4), buckets, 30,
                                                        cancelled))
        second.start()
        cancelled.set()  # its caller gave up (the batch was dropped) while it waited
        time.sleep(0.1)
        release.set()
        first.join(10)
        second.join(10)
        assert "cancelled before it started" in str(caught[0]) and calls == [1]
        with pytest.raises(ChannelError, match="previous exchange still held the channels"):
            release.clear()
            blocker = threading.Thread(target=lambda: _catch([], channels.exchange, 3, torch.ones(1, 4), buckets, 30))
            blocker.start()
            time.sleep(0.2)
            channels.exchange(4, torch.ones(1, 4), buckets, timeout_s=0.3)
    finally:
        release.set()
        server.close()
