"""The Ray-free exchange: a router (rank 0) and expert members in plain torch.multiprocessing processes over
gloo, on EXPERTRAY_DEVICE (members share the one GPU there), plus the locked-down rendezvous store."""

from __future__ import annotations

import datetime
import os
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from expertray.errors import TransportError
from expertray.layer.slots import SlotStore
from expertray.wire.collective import (
    SealedStore,
    join,
    member_exchange,
    new_secret,
    open_master_store,
    router_exchange,
)

D, F, TIMEOUT_S = 16, 24, 60.0


def _weights(rank: int) -> dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(rank)
    return {(0, e): (torch.randn(2 * F, D, generator=g) / D**0.5, torch.randn(D, F, generator=g) / F**0.5)
            for e in (rank, rank + 10)}


def _member(rank: int, world: int, port: int, secret: str, device: str, counts: list[int], results: Any) -> None:
    try:
        dev = torch.device(device)
        slots = SlotStore(f"m{rank}", dev, torch.float32)
        slots.add(_weights(rank))
        group = join("gloo", "127.0.0.1", port, secret, rank, world, TIMEOUT_S, dev)
        member_exchange(group, sum(counts), D, torch.float32,
                        lambda rows: slots.compute(0, [rank, rank + 10], counts, rows))
        results.put((rank, "ok"))
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which fails the test with it
        results.put((rank, repr(exc)))


def _expected(rows: torch.Tensor, per_member: list[list[int]], device: torch.device) -> torch.Tensor:
    outs, start = [], 0
    for rank, counts in enumerate(per_member, start=1):
        slots = SlotStore("ref", device, torch.float32)
        slots.add(_weights(rank))
        n = sum(counts)
        outs.append(slots.compute(0, [rank, rank + 10], counts, rows[start:start + n]))
        start += n
    return torch.cat(outs)


@pytest.mark.parametrize("per_member", [[[3, 2], [0, 4]], [[5, 0], [1, 1], [0, 0]]], ids=["2members", "3members"])
def test_router_gets_each_members_outputs_back_in_plan_order(per_member: list[list[int]], device: torch.device
                                                            ) -> None:
    world = len(per_member) + 1
    store, port = open_master_store("127.0.0.1", TIMEOUT_S)
    secret = new_secret()
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_member, args=(r, world, port, secret, str(device), per_member[r - 1], results))
             for r in range(1, world)]
    for p in procs:
        p.start()
    try:
        group = join("gloo", "127.0.0.1", port, secret, 0, world, TIMEOUT_S, device, master_store=store)
        rows = torch.randn(sum(map(sum, per_member)), D, device=device)
        out = router_exchange(group, rows, [sum(c) for c in per_member])
        reports = dict(results.get(timeout=TIMEOUT_S) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=TIMEOUT_S)
            if p.is_alive():
                p.kill()
    assert reports == {r: "ok" for r in range(1, world)}
    assert out.device == rows.device and out.shape == rows.shape
    torch.testing.assert_close(out, _expected(rows, per_member, device))


def test_exchange_rejects_splits_that_do_not_cover_the_rows() -> None:
    group_like = type("G", (), {"rank": 0, "world_size": 3})()
    with pytest.raises(ValueError, match="do not cover"):
        router_exchange(group_like, torch.zeros(5, D), [2, 2])  # type: ignore[arg-type]


# --- the rendezvous store is bound to one address and sealed with the group secret ---------------------

def _listening_addresses(port: int) -> list[str]:
    """Local addresses of sockets in LISTEN state on `port`, from /proc/net/tcp{,6} (hex, kernel order)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        with open(table) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                addr, hex_port = local.split(":")
                if state == "0A" and int(hex_port, 16) == port:
                    found.append(addr)
    return found


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="needs Linux /proc/net/tcp")
def test_store_listens_on_the_given_address_only() -> None:
    store, port = open_master_store("127.0.0.1", 10.0)
    addrs = _listening_addresses(port)
    assert addrs == ["0100007F"], f"store on port {port} listens on {addrs}, expected 127.0.0.1 only"
    assert "00000000" not in addrs
    del store


def test_a_client_without_the_secret_sees_only_sealed_keys_and_values() -> None:
    store, port = open_master_store("127.0.0.1", 10.0)
    member = SealedStore(store, new_secret())
    member.set("rank_0/address", b"10.0.0.7:41234")
    assert member.get("rank_0/address") == b"10.0.0.7:41234"
    outsider = dist.TCPStore("127.0.0.1", port, is_master=False, wait_for_workers=False,
                             timeout=datetime.timedelta(seconds=10))
    names = outsider.list_keys()
    assert len(names) == 1 and "rank_0" not in names[0]
    raw = outsider.get(names[0])
    assert b"10.0.0.7" not in raw and b"41234" not in raw
    # A guess of the secret reads nothing either, and a forged value is refused, not used.
    assert SealedStore(outsider, new_secret()).check(["rank_0/address"]) is False
    outsider.set(names[0], b"\x00" * 80)
    with pytest.raises(TransportError, match="failed authentication"):
        member.get("rank_0/address")


def test_sealed_store_refuses_a_short_secret() -> None:
    store, _ = open_master_store("127.0.0.1", 10.0)
    with pytest.raises(ValueError, match="at least"):
        SealedStore(store, "abcd")


# --- each member's gloo pairs use its own node address, not what the hostname resolves to ---------------

def _gloo_member(port: int, secret: str, local_host: str, results: Any, release: Any) -> None:
    try:
        group = join("gloo", "127.0.0.2", port, secret, 1, 2, TIMEOUT_S, torch.device("cpu"), local_host=local_host)
        member_exchange(group, 3, D, torch.float32, lambda rows: rows * 2)
        results.put("ok")
        release.wait(TIMEOUT_S)  # the group (and its connection) stays up while the parent looks at it
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which fails the test with it
        results.put(repr(exc))


def _tcp_sockets() -> list[tuple[str, str, str]]:
    """(local, remote, state) of IPv4 sockets as /proc/net/tcp lists them: hex ADDR:PORT, state 0A listen,
    01 established."""
    with open("/proc/net/tcp") as f:
        return [(r[1], r[2], r[3]) for r in (line.split() for line in f.readlines()[1:])]


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="needs Linux /proc/net/tcp (and 127/8 on lo)")
def test_gloo_pairs_connect_between_the_members_node_addresses() -> None:
    """Two "nodes" on distinct loopback addresses (127.0.0.2: the router, 127.0.0.3: a member): each gloo
    member listens on its own node address and the pair connects to one of those listeners, not to what
    this machine's hostname resolves to."""
    store, port = open_master_store("127.0.0.2", TIMEOUT_S)
    secret = new_secret()
    ctx = mp.get_context("spawn")
    results, release = ctx.Queue(), ctx.Event()
    member = ctx.Process(target=_gloo_member, args=(port, secret, "127.0.0.3", results, release))
    member.start()
    try:
        group = join("gloo", "127.0.0.2", port, secret, 0, 2, TIMEOUT_S, torch.device("cpu"), store,
                     local_host="127.0.0.2")
        rows = torch.randn(3, D)
        out = router_exchange(group, rows, [3])
        report = results.get(timeout=TIMEOUT_S)
        sockets = _tcp_sockets()
    finally:
        release.set()
        member.join(timeout=TIMEOUT_S)
        if member.is_alive():
            member.kill()
    assert report == "ok"
    torch.testing.assert_close(out, rows * 2)
    store_end = f"0200007F:{port:04X}"  # 127.0.0.2 in /proc's byte order
    listening = {local for local, _, state in sockets if state == "0A" and local != store_end}
    member_listens = {a for a in listening if a.startswith("0300007F:")}
    assert member_listens, f"the member (node 127.0.0.3) does not listen on its node address: {sorted(listening)}"
    gloo_pairs = [(local, remote) for local, remote, state in sockets
                  if state == "01" and remote in listening and remote.split(":")[0] in ("0200007F", "0300007F")]
    assert gloo_pairs, f"no gloo connection to a node-address listener: {sockets}"
