"""The Ray transports: they move a PreparedBatch's per-actor buckets to the expert actors and the outputs back.

Each is a `Transport` (the interface is expertray.seams.Transport) registered by name in `TRANSPORTS` (Ray's
collective backend registry is the pattern), built from the same arguments (`ActorTransport`), and produces
the same [N, D] output rows in plan order; they differ only in how bytes move:
- `object_store`: one Ray call per busy actor with its rows as a numpy view (object store).
- `collective`: the router is rank 0 of a torch.distributed group with the expert actors; rows go out and
  come back by all-to-all with uneven split sizes (`expertray.wire.collective`, Ray-free), while a small Ray call
  per actor carries the metadata (which experts, how many rows each). The backend follows what the ranks
  own (`expertray.wire.devices.choose_backend`): NCCL when every rank holds a distinct GPU, gloo otherwise.
A new transport is one class here registered under its name, plus the name in config.TRANSPORTS (and, when
its members do more than answer `compute`, their side in actors/expert.py).

Each `exchange` has a deadline (`timeout_s`): an actor that does not answer in time is named in a
TransportError, its call is cancelled, and the router treats it like a failed actor.
The rendezvous store of a collective group listens on the router's node address only and is sealed with
a per-group secret that only members receive; see `expertray.wire.collective` and docs/RELIABILITY.md.

Every CollectiveTransport forms a group of its own name, so a router switching tables forms the new group
while the old one still serves batches (an expert actor is then a member of both, keyed by name; it joins on
one of its threads while another computes) and closes the old one after the swap (expertray/runtime/switch.py).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from typing import Any

import ray
import torch

from expertray.config import TRANSPORTS as TRANSPORT_NAMES
from expertray.errors import TransportError
from expertray.layer.route import PreparedBatch
from expertray.registry import Registry
from expertray.seams import Transport, TransportStats
from expertray.wire.channel import ChannelSet, Endpoint
from expertray.wire.collective import (
    Group,
    from_host_array,
    join,
    new_secret,
    open_master_store,
    router_exchange,
    to_host_array,
)
from expertray.wire.devices import BackendChoice, choose_backend, device_identity

log = logging.getLogger(__name__)

PING_TIMEOUT_S = 2.0  # after a failed exchange: how long a live actor may take to answer a ping
# actor id @ Ray actor id -> its channel endpoint, in this (router) process. Keyed by the Ray actor too: an expert
# actor id can name a new process after a controller restart that rebuilt its counters from the running actors.
ENDPOINTS: dict[str, Endpoint] = {}
LEARN_EVERY_S = 1.0  # how often a channel transport asks again for endpoints it lacks


class ActorTransport(Transport):
    """A transport over expert actors: `handles` in table actor order, a deadline per exchange, and the
    device the router's rows live on (used by those that move rows device to device)."""

    def __init__(self, handles: list[Any], timeout_s: float, actor_names: list[str] | None = None,
                 device: torch.device | None = None) -> None:
        if not timeout_s > 0:
            raise ValueError(f"transport timeout must be > 0 seconds, got {timeout_s}")
        self.handles = handles
        self.timeout_s = timeout_s
        self.actor_names = actor_names or [f"#{i}" for i in range(len(handles))]
        if len(self.actor_names) != len(handles):
            raise ValueError(f"{len(self.actor_names)} actor names for {len(handles)} handles")
        self.device = device or torch.device("cpu")

    def _names(self, actors: list[int]) -> str:
        return ", ".join(self.actor_names[a] for a in actors)


TRANSPORTS: Registry[ActorTransport] = Registry("transport")


def _sent_bytes(batch: PreparedBatch) -> list[int]:
    per_row = batch.rows.shape[1] * batch.rows.element_size()
    return [b.num_rows * per_row for b in batch.buckets]


@TRANSPORTS.register("object_store")
class ObjectStoreTransport(ActorTransport):
    name = "object_store"

    def __init__(self, handles: list[Any], timeout_s: float, actor_names: list[str] | None = None,
                 device: torch.device | None = None, reason: str = "requested") -> None:
        super().__init__(handles, timeout_s, actor_names, device)
        self.reason = reason

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "backend": None, "reason": self.reason}

    async def exchange(self, batch: PreparedBatch) -> tuple[torch.Tensor, TransportStats]:
        rows, dtype = to_host_array(batch.rows)  # the object store carries host memory
        busy = [b for b in batch.buckets if b.num_rows]
        refs = [self.handles[b.actor].compute.remote(batch.layer, b.experts, b.counts,
                                                     rows[b.row_start:b.row_start + b.num_rows], dtype)
                for b in busy]
        tasks = [asyncio.ensure_future(_awaitable(ref)) for ref in refs]
        try:
            done, pending = (await asyncio.wait(tasks, timeout=self.timeout_s, return_when=asyncio.FIRST_EXCEPTION)
                             if tasks else (set(), set()))
        except asyncio.CancelledError:  # the batch was dropped (a table switch, a liveness suspect): stop waiting
            for t in tasks:
                t.cancel()
            raise
        for t, ref in zip(tasks, refs):
            if t in pending:
                t.cancel()
                _cancel(ref)
        failed = [t.exception() for t in tasks if t in done and t.exception() is not None]
        if failed:
            raise failed[0]  # an actor's own error (e.g. RayActorError): the router heals and retries
        if pending:
            late = [b.actor for b, t in zip(busy, tasks) if t in pending]
            raise TransportError(f"layer {batch.layer}: actor(s) {self._names(late)} did not answer within "
                                 f"{self.timeout_s:g} s; calls cancelled", [self.actor_names[a] for a in late])
        results = [t.result() for t in tasks]
        outs = [from_host_array(rows_out, dtype) for rows_out, _ in results]
        out = outs[0] if len(outs) == 1 else torch.cat(outs) if outs else batch.rows.new_empty(batch.rows.shape)
        out = out.to(batch.rows.device)
        return out, TransportStats(_sent_bytes(batch), {b.actor: ms for b, (_, ms) in zip(busy, results)})


async def _awaitable(ref: Any) -> Any:
    return await ref


def _cancel(ref: Any) -> None:
    """Best effort: Ray cancels a queued actor call; a running one finishes and its result is dropped."""
    if isinstance(ref, ray.ObjectRef):
        ray.cancel(ref, force=False)


@TRANSPORTS.register("collective")
class CollectiveTransport(ActorTransport):
    name = "collective"
    every_member = True  # one silent member stalls the all-to-all

    def __init__(self, handles: list[Any], timeout_s: float, actor_names: list[str] | None = None,
                 device: torch.device | None = None, host: str | None = None) -> None:
        super().__init__(handles, timeout_s, actor_names, device)
        self.host = host
        self.group_name = f"g-{uuid.uuid4().hex[:12]}"  # one per formed group: old and new coexist on the actors
        self.choice: BackendChoice | None = None
        self._group: Group | None = None

    async def open(self) -> None:
        """Form the group: the router hosts the store (rank 0), every expert actor joins as rank 1..N.

        The backend follows the ranks' devices; the store listens on this node's address only, and the
        port and the group secret go to members alone, in the join call."""
        try:
            await self._form()
        except BaseException:  # failed, late or cancelled (a switch past its deadline): members that joined,
            for h in self.handles:  # or will, drop the group (exchange.Memberships); fire and forget
                try:
                    h.leave_group.remote(self.group_name)
                except Exception:  # noqa: BLE001 - a dead member holds nothing; the original error matters
                    log.debug("group %s: leave not sent", self.group_name, exc_info=True)
            raise

    async def _form(self) -> None:
        host = self.host or ray.util.get_node_ip_address()
        identities = await self._within(asyncio.gather(*[h.device_identity.remote() for h in self.handles]),
                                        "report their devices")
        self.choice = choose_backend([device_identity(self.device), *identities])
        store, port = open_master_store(host, self.timeout_s)
        secret = new_secret()
        world = len(self.handles) + 1
        joins = [h.join_group.remote(self.group_name, self.choice.backend, host, port, secret, rank + 1, world,
                                     self.timeout_s) for rank, h in enumerate(self.handles)]
        self._group = await self._within(asyncio.to_thread(
            join, self.choice.backend, host, port, secret, 0, world, self.timeout_s, self.device, store,
            local_host=host),
            "form the group")
        await self._within(asyncio.gather(*joins), "join the group")
        log.info("group %s: %s (%s)", self.group_name, self.choice.backend, self.choice.reason)

    async def _within(self, aw: Any, what: str) -> Any:
        try:
            return await asyncio.wait_for(aw, self.timeout_s)
        except asyncio.TimeoutError:
            raise TransportError(f"group {self.group_name}: actors did not {what} within {self.timeout_s:g} s") from None

    async def exchange(self, batch: PreparedBatch) -> tuple[torch.Tensor, TransportStats]:
        if self._group is None:
            raise TransportError(f"group {self.group_name} is not open")
        d = batch.rows.shape[1]
        wire_dtype = str(batch.rows.dtype).removeprefix("torch.")
        refs = [self.handles[b.actor].collective_compute.remote(self.group_name, batch.layer, b.experts, b.counts,
                                                                d, wire_dtype) for b in batch.buckets]
        calls = [asyncio.ensure_future(_awaitable(ref)) for ref in refs]
        try:
            out = await asyncio.wait_for(asyncio.to_thread(router_exchange, self._group, batch.rows,
                                                           batch.split_sizes), self.timeout_s)
            compute_ms = await asyncio.wait_for(asyncio.gather(*calls), self.timeout_s)
        except (RuntimeError, asyncio.TimeoutError) as exc:  # gloo/NCCL raise RuntimeError subclasses
            late = [b.actor for b, call in zip(batch.buckets, calls) if not call.done()]
            died = [b.actor for b, call in zip(batch.buckets, calls)
                    if call.done() and not call.cancelled() and call.exception() is not None]
            for call, ref in zip(calls, refs):
                call.cancel()
                _cancel(ref)
            # One silent member stalls every member in the collective: a ping tells the hung from the waiting.
            # A member whose call failed explains the failure by itself: the others are waiting on it, and
            # pinging them on a loaded host could blame a live one (masking experts that have no other copy).
            hung = died or await self._unresponsive(late)
            raise TransportError(f"all-to-all in group {self.group_name} failed or passed its "
                                 f"{self.timeout_s:g} s deadline (unresponsive: {self._names(hung) or 'none'}; "
                                 f"still in the collective: {self._names([a for a in late if a not in hung]) or 'none'}"
                                 f"): {exc or type(exc).__name__}", [self.actor_names[a] for a in hung]) from exc
        return out, TransportStats(_sent_bytes(batch), {b.actor: ms for b, ms in zip(batch.buckets, compute_ms)
                                                        if b.num_rows})

    async def _unresponsive(self, actors: list[int]) -> list[int]:
        """Those of `actors` that do not answer a ping within PING_TIMEOUT_S (or the transport's deadline)."""
        pings = [asyncio.ensure_future(_awaitable(self.handles[a].ping.remote())) for a in actors]
        if not pings:
            return []
        done, pending = await asyncio.wait(pings, timeout=min(PING_TIMEOUT_S, self.timeout_s))
        for p in pending:
            p.cancel()
        return [a for a, p in zip(actors, pings) if p in pending or p.exception() is not None]

    async def close(self) -> None:
        await asyncio.gather(*[h.leave_group.remote(self.group_name) for h in self.handles], return_exceptions=True)
        self._group = None

    def describe(self) -> dict[str, Any]:
        if self.choice is None:
            return {"name": self.name, "backend": None, "reason": "group not formed yet"}
        return {"name": self.name, "backend": self.choice.backend, "reason": self.choice.reason}

    def fallback(self, reason: str) -> Transport:
        """The object store over the same actors: a group that lost a member (or never formed) cannot serve."""
        return ObjectStoreTransport(self.handles, self.timeout_s, self.actor_names, self.device, reason=reason)


@TRANSPORTS.register("channel")
class ChannelTransport(ActorTransport):
    """Standing channels (expertray/wire/channel.py): one TCP connection per expert actor, opened with the
    transport, each served by a persistent loop in the actor; a batch's buckets go out and come back over
    them with no Ray task. An actor's death resets its connection (named at once); a hung one is named at
    the deadline, or sooner when the liveness loop's suspect push drops the batch (`abort`)."""

    name = "channel"

    def __init__(self, handles: list[Any], timeout_s: float, actor_names: list[str] | None = None,
                 device: torch.device | None = None) -> None:
        super().__init__(handles, timeout_s, actor_names, device)
        self.channels: ChannelSet | None = None
        self.opened = False
        self.learning: asyncio.Task | None = None  # fetching the endpoints of actors that did not answer at open
        self.next_learn = 0.0

    def _key(self, index: int) -> str:
        """ENDPOINTS' key of actor `index`: its id and its Ray actor's (fakes in tests have no Ray id)."""
        actor_id = getattr(self.handles[index], "_actor_id", None)
        return f"{self.actor_names[index]}@{actor_id.hex()}" if actor_id is not None else self.actor_names[index]

    def _known(self, index: int) -> Endpoint | None:
        return ENDPOINTS.get(self._key(index))

    async def _fetch_endpoints(self, indices: list[int], wait_s: float) -> None:
        """Ask these actors for their endpoints (ENDPOINTS keeps those that answer within `wait_s`)."""
        found = await asyncio.gather(*[asyncio.wait_for(_awaitable(self.handles[i].channel_endpoint.remote()),
                                                        wait_s) for i in indices], return_exceptions=True)
        for i, e in zip(indices, found):
            if not isinstance(e, BaseException):
                ENDPOINTS[self._key(i)] = Endpoint(**e)

    async def open(self) -> None:
        """Channels to every actor: endpoints learned once per actor (ids are never reused), connections made
        now within PING_TIMEOUT_S. An actor that does not answer (hung, on a lost node) gets a channel that
        fails when used, naming it, so one silent actor does not stop a table switch; its endpoint is asked for
        again in the background (`_learn`) until it answers. The transport fails to open (and `auto` falls
        back) only when no actor answers."""
        wait_s = min(PING_TIMEOUT_S, self.timeout_s)
        names = self.actor_names
        await self._fetch_endpoints([i for i in range(len(names)) if self._known(i) is None], wait_s)
        self.channels = ChannelSet.to([self._known(i) or Endpoint.unknown(names[i])
                                       for i in range(len(names))])
        failed = await asyncio.to_thread(self.channels.connect, wait_s)
        if len(failed) == len(self.actor_names):
            raise TransportError("no actor's channel opened: " + ", ".join(f"{a} ({why})" for a, why in failed.items()),
                                 list(failed))
        if failed:
            log.warning("channels not opened (used, they fail and are named): %s", failed)
        self.opened = True

    def _learn(self) -> None:
        """Without waiting: fetch the endpoints this transport still lacks (an actor silent at open: otherwise
        its placeholder channel would fail for as long as the transport lives, even once the actor answers),
        at most every LEARN_EVERY_S; a learned one replaces its placeholder channel."""
        unknown = [i for i, e in enumerate(self.channels.endpoints) if not e.known]
        if not unknown or (self.learning is not None and not self.learning.done()) or time.monotonic() < self.next_learn:
            return
        self.next_learn = time.monotonic() + LEARN_EVERY_S

        async def learn() -> None:
            await self._fetch_endpoints(unknown, min(PING_TIMEOUT_S, self.timeout_s))
            learned = {i: e for i in unknown if (e := self._known(i)) is not None}
            if learned:
                await asyncio.to_thread(self.channels.retarget, learned)
                log.info("channels: learned the endpoints of %s", ", ".join(self.actor_names[i] for i in learned))

        self.learning = asyncio.get_running_loop().create_task(learn())

    async def exchange(self, batch: PreparedBatch) -> tuple[torch.Tensor, TransportStats]:
        if self.channels is None:
            raise TransportError("channels are not open")
        self._learn()
        rows = batch.rows if batch.rows.device.type == "cpu" else batch.rows.cpu()
        cancelled = threading.Event()
        try:
            out, ms = await asyncio.to_thread(self.channels.exchange, batch.layer, rows, batch.buckets,
                                              self.timeout_s, cancelled)
        except asyncio.CancelledError:  # the batch was dropped: end the exchange's socket waits now, and keep
            cancelled.set()  # it from starting at all if it still waits for the channels (no zombie exchanges)
            self.channels.abort()
            raise
        return out.to(batch.rows.device), TransportStats(_sent_bytes(batch), ms)

    async def close(self) -> None:
        if self.learning is not None:
            self.learning.cancel()
        if self.channels is not None:  # off the event loop: it may wait for an exchange thread to let go
            await asyncio.to_thread(self.channels.close)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "backend": "tcp", "reason": "standing channels to every actor"}

    def fallback(self, reason: str) -> Transport | None:
        """The object store when the channels did not open; none after losing members (each actor has its
        own channel: the others serve on, the lost one's reconnects once it is healed or replaced)."""
        if self.opened:
            return None
        return ObjectStoreTransport(self.handles, self.timeout_s, self.actor_names, self.device, reason=reason)


TRANSPORTS.check(set(TRANSPORT_NAMES) - {"auto"})
AUTO = "channel"  # what `auto` tries first; its `fallback` serves when it cannot open


async def open_transport(mode: str, handles: list[Any], timeout_s: float, actor_names: list[str],
                         device: torch.device) -> Transport:
    """The transport for `mode` (a registered name, or `auto`: AUTO, else its fallback), opened.

    With `auto`, a transport that fails to open falls back with a warning that says why."""
    transport = TRANSPORTS.create(AUTO if mode == "auto" else mode, handles=handles, timeout_s=timeout_s,
                                  actor_names=actor_names, device=device)
    try:
        await transport.open()
        return transport
    except Exception as exc:  # noqa: BLE001 - auto means "AUTO when it can open"; the reason is logged
        if mode != "auto":
            raise
        log.warning("%s transport failed to open (%s); falling back", AUTO, exc, exc_info=True)
        fallback = transport.fallback(f"{AUTO} transport failed to open: {exc}")
        if fallback is None:
            raise
        return fallback
