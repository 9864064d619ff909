"""The router's request state machine: per-layer queues, micro-batch assembly, retry on transport failure,
and an end-to-end deadline per request. No Ray: the RouterActor hands it a `run_batch` coroutine (gate →
plan → transport → combine) and a `heal` coroutine (ask the controller to repair the cluster).

Guarantees:
- every submitted request gets its [T, D] output, or an exception, by `request_timeout_s` after it arrived
  (RequestTimeoutError when its deadline passes first; it is then withdrawn from the queue);
- a batch whose transport fails (`is_transport_failure`, or no answer within `batch_timeout_s`) is put back
  at the front of its queue in order and each request is retried until it has failed `max_attempts` times
  (then ExpertUnavailableError); `heal` runs (at most `heal_timeout_s`) in the background;
- before the retry, `reroute` (the router's failover) masks the actors the error names; when every expert
  still has a live replica it answers True and the retry goes at once while the heal runs, otherwise
  dispatch pauses until the heal ends (requests keep their deadlines);
- batches run one at a time under `lane`, so a caller holding `lane` (a table switch) lands between batches;
- the dispatch loop never ends on an error: a failed step is logged and the loop goes on.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass

import torch

from expertray.errors import (
    BackpressureError,
    ConfigError,
    ExpertUnavailableError,
    RequestTimeoutError,
    TransportError,
)

log = logging.getLogger(__name__)

RunBatch = Callable[[int, torch.Tensor], Awaitable[torch.Tensor]]  # (layer, hidden [T, D]) -> output [T, D]
Heal = Callable[[BaseException], Awaitable[object]]
Reroute = Callable[[BaseException], bool]  # transport failure -> "masked; every expert still served"


@dataclass(frozen=True)
class BatchLimits:
    """Batching, backpressure and deadline parameters (seconds unless named otherwise)."""

    max_batch_tokens: int
    max_wait_s: float
    max_queue_tokens: int
    request_timeout_s: float
    batch_timeout_s: float
    heal_timeout_s: float
    max_attempts: int = 3

    def __post_init__(self) -> None:
        for name in ("max_batch_tokens", "max_queue_tokens", "max_attempts"):
            if getattr(self, name) < 1:
                raise ConfigError(f"batcher.{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("request_timeout_s", "batch_timeout_s", "heal_timeout_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"batcher.{name}: must be a finite number > 0, got {value}")
        if not (math.isfinite(self.max_wait_s) and self.max_wait_s >= 0):
            raise ConfigError(f"batcher.max_wait_s: must be a finite number >= 0, got {self.max_wait_s}")


@dataclass(eq=False)
class Pending:
    """One queued request: hidden [T, D], the future its caller awaits, times on the batcher's clock."""

    layer: int
    hidden: torch.Tensor
    future: asyncio.Future
    arrived: float
    deadline: float
    attempts: int = 0

    @property
    def tokens(self) -> int:
        return int(self.hidden.shape[0])


def default_transport_failure(exc: BaseException) -> bool:
    return isinstance(exc, TransportError)


@dataclass
class BatcherCounters:
    """What the batcher saw: requests failed in a batch, batches retried, deadlines missed, requests refused."""

    errors: int = 0
    retries: int = 0
    timeouts: int = 0
    rejected: int = 0
    heals: int = 0
    loop_errors: int = 0
    masked_retries: int = 0  # failed batches retried at once on surviving replicas (no wait for the heal)
    served_while_healing: int = 0  # batches answered while a heal was still running

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class Batcher:
    """Per-layer request queues and the dispatch loop over them (see the module docstring)."""

    def __init__(self, num_layers: int, limits: BatchLimits, run_batch: RunBatch, heal: Heal | None = None,
                 is_transport_failure: Callable[[BaseException], bool] = default_transport_failure,
                 clock: Callable[[], float] = time.monotonic, reroute: Reroute | None = None) -> None:
        if num_layers < 1:
            raise ConfigError(f"batcher.num_layers: must be >= 1, got {num_layers}")
        self.limits = limits
        self.run_batch = run_batch
        self.heal = heal
        self.reroute = reroute
        self.is_transport_failure = is_transport_failure
        self.clock = clock
        self.queues: list[deque[Pending]] = [deque() for _ in range(num_layers)]
        self.queued_tokens = 0
        self.lane = asyncio.Lock()  # held while a batch runs; a table switch takes it between batches
        self.counters = BatcherCounters()
        self._arrival = asyncio.Event()
        self._healthy = asyncio.Event()
        self._healthy.set()
        self._heal_task: asyncio.Task | None = None

    # --- requests ------------------------------------------------------------------------------------
    def check_room(self, tokens: int) -> None:
        """Raise BackpressureError (counted as rejected) if `tokens` more would overfill the queues."""
        if self.queued_tokens + tokens > self.limits.max_queue_tokens:
            self.counters.rejected += 1
            raise BackpressureError(f"queue is full ({self.queued_tokens} tokens queued, limit "
                                    f"{self.limits.max_queue_tokens}); retry later")

    async def submit(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Queue hidden [T, D] for `layer`; its output [T, D], or an exception, by request_timeout_s."""
        if not 0 <= layer < len(self.queues):
            raise ConfigError(f"batcher: layer {layer} is outside 0..{len(self.queues) - 1}")
        self.check_room(int(hidden.shape[0]))
        now = self.clock()
        pending = Pending(layer, hidden, asyncio.get_running_loop().create_future(), now,
                          now + self.limits.request_timeout_s)
        self.queues[layer].append(pending)
        self.queued_tokens += pending.tokens
        self._arrival.set()
        done, _ = await asyncio.wait({pending.future}, timeout=self.limits.request_timeout_s)
        if not done:
            self._withdraw(pending)
            self.counters.timeouts += 1
            raise RequestTimeoutError(f"layer {layer}: no answer within request_timeout_s="
                                      f"{self.limits.request_timeout_s:g} s ({pending.attempts} failed "
                                      f"attempt(s)); the request was withdrawn")
        return pending.future.result()

    def _withdraw(self, pending: Pending) -> None:
        """Take a request that missed its deadline out of its queue (if still there) and cancel its future."""
        try:
            self.queues[pending.layer].remove(pending)
            self.queued_tokens -= pending.tokens
        except ValueError:
            pass  # in flight in a batch: its slice of the answer is dropped when the batch returns
        pending.future.cancel()

    # --- the dispatch loop ---------------------------------------------------------------------------
    async def run(self) -> None:
        """Dispatch batches until cancelled; an error in one step is logged and the loop goes on."""
        while True:
            try:
                await self.step()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the loop must outlive any one bad step
                self.counters.loop_errors += 1
                log.exception("batcher: dispatch step failed; continuing")

    async def step(self) -> None:
        """Wait for work and health, assemble one batch for the layer with the oldest request, run it."""
        while not any(self.queues):
            self._arrival.clear()
            await self._arrival.wait()
        await self._healthy.wait()
        layer = self._oldest_layer()
        if layer is None:  # every queued request was withdrawn while we waited
            return
        await self._fill(layer)
        batch = self._take(layer)
        if batch:
            async with self.lane:
                await self._dispatch(layer, batch)

    def _oldest_layer(self) -> int | None:
        heads = [(q[0].arrived, i) for i, q in enumerate(self.queues) if q]
        return min(heads)[1] if heads else None

    async def _fill(self, layer: int) -> None:
        """Wait until the layer's queue holds max_batch_tokens or max_wait_s passed since its oldest request."""
        queue = self.queues[layer]
        while queue and sum(p.tokens for p in queue) < self.limits.max_batch_tokens:
            left = queue[0].arrived + self.limits.max_wait_s - self.clock()
            if left <= 0:
                return
            self._arrival.clear()
            try:
                await asyncio.wait_for(self._arrival.wait(), left)
            except asyncio.TimeoutError:
                return

    def _take(self, layer: int) -> list[Pending]:
        """Pop requests, oldest first, up to max_batch_tokens (the first one always, whatever its size)."""
        queue, batch, tokens = self.queues[layer], [], 0
        while queue and (not batch or tokens + queue[0].tokens <= self.limits.max_batch_tokens):
            p = queue.popleft()
            self.queued_tokens -= p.tokens
            if p.future.done():
                continue
            batch.append(p)
            tokens += p.tokens
        return batch

    async def _dispatch(self, layer: int, batch: list[Pending]) -> None:
        hidden = batch[0].hidden if len(batch) == 1 else torch.cat([p.hidden for p in batch])
        try:
            out = await asyncio.wait_for(self.run_batch(layer, hidden), self.limits.batch_timeout_s)
        except asyncio.CancelledError:
            self._requeue(layer, batch, RuntimeError("router stopping"), count=False)
            raise
        except asyncio.TimeoutError:
            self._transport_failed(layer, batch, TransportError(
                f"layer {layer}: batch of {hidden.shape[0]} tokens got no answer within "
                f"{self.limits.batch_timeout_s:g} s (an expert actor hung or is too slow)"))
            return
        except Exception as exc:  # noqa: BLE001 - every waiting request gets the error, none is left hanging
            if self.is_transport_failure(exc):
                self._transport_failed(layer, batch, exc)
            else:
                self._fail(batch, exc)
            return
        if out.shape[0] != hidden.shape[0]:
            self._fail(batch, RuntimeError(f"layer {layer}: batch answered {out.shape[0]} rows for "
                                           f"{hidden.shape[0]} tokens; refusing a partial answer"))
            return
        if self._heal_task is not None and not self._heal_task.done():
            self.counters.served_while_healing += 1
        start = 0
        for p in batch:
            if not p.future.done():
                p.future.set_result(out[start:start + p.tokens])
            start += p.tokens

    def _fail(self, batch: list[Pending], exc: BaseException) -> None:
        for p in batch:
            if not p.future.done():
                self.counters.errors += 1
                p.future.set_exception(exc)

    def _transport_failed(self, layer: int, batch: list[Pending], exc: BaseException) -> None:
        """Requeue the batch (front, in order) unless a request is out of attempts; start a heal unless one is
        running; pause dispatch until it ends unless `reroute` masked the failure with every expert served."""
        self.counters.retries += 1
        self._requeue(layer, batch, exc, count=True)
        served = self._reroute(exc)
        log.warning("batcher: batch on layer %d failed in transport (%s); %s", layer, exc,
                    "retrying on surviving replicas while healing" if served else "pausing to heal")
        if served:
            self.counters.masked_retries += 1
        if self._heal_task is None or self._heal_task.done():
            self._heal_task = asyncio.get_running_loop().create_task(self._heal(exc))
        if not served:
            self._healthy.clear()  # the running heal sets it again when it ends

    def _reroute(self, exc: BaseException) -> bool:
        if self.reroute is None:
            return False
        try:
            return bool(self.reroute(exc))
        except Exception:  # noqa: BLE001 - a failed failover falls back to waiting for the heal
            log.warning("batcher: reroute failed; waiting for the heal", exc_info=True)
            return False

    def _requeue(self, layer: int, batch: list[Pending], exc: BaseException, count: bool) -> None:
        for p in reversed(batch):
            if p.future.done():
                continue
            if count:
                p.attempts += 1
            if p.attempts >= self.limits.max_attempts:
                self.counters.errors += 1
                p.future.set_exception(ExpertUnavailableError(
                    f"layer {layer}: expert actors failed {p.attempts} times while serving this request ({exc})"))
            else:
                self.queues[layer].appendleft(p)
                self.queued_tokens += p.tokens
        self._arrival.set()

    async def _heal(self, exc: BaseException) -> None:
        """Ask for a repair (bounded by heal_timeout_s), then resume dispatch whatever the outcome."""
        self.counters.heals += 1
        try:
            if self.heal is not None:
                await asyncio.wait_for(self.heal(exc), self.limits.heal_timeout_s)
        except Exception:  # noqa: BLE001 - the retry fails cleanly if the cluster is still broken
            log.warning("batcher: heal failed or timed out; resuming (requests keep their deadlines)",
                        exc_info=True)
        finally:
            self._healthy.set()
            self._arrival.set()

    def resume(self) -> None:
        """Dispatch again now, while the heal goes on: the caller installed a table that serves every expert
        around the failed actors (e.g. the controller's stand-in for a silent sole copy)."""
        self._healthy.set()
        self._arrival.set()

    @property
    def healing(self) -> bool:
        return not self._healthy.is_set()
