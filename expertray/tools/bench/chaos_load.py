"""Steady mixed load for `expertray bench chaos`: one client thread per interface, every answer checked.

Interfaces: `blocking` (Cluster.forward), `future` (Cluster.forward_future, several in flight), `async`
(Cluster.forward_async on an event loop of its own, several coroutines), `direct` (the direct client path,
Cluster.direct().forward) and `http` (POST /v1/layers/{layer}/forward on the Serve ingress, msgpack).
Every answer is compared with the in-process layer (atol 1e-5). A request still unanswered at its deadline
(request_timeout_s) plus HUNG_GRACE_S is hung; so is one answered only after that. The bench's own waits
are bounded: a blocking call that never returns only leaves its daemon thread behind.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from expertray.layer.reference import MoELayer
from expertray.wire.http_codec import decode_tensor, encode_tensor, pack, unpack

CLIENT_KINDS = ("blocking", "future", "async", "direct", "http")
HUNG_GRACE_S = 10.0
IN_FLIGHT = 3  # requests kept in flight by the future and async clients
SAMPLES = 12  # distinct inputs per layer


@dataclass(frozen=True)
class Sample:
    """One request body: layer, input x [T, D], the in-process answer [T, D] and the experts its tokens need."""

    layer: int
    x: torch.Tensor
    expected: torch.Tensor
    experts: frozenset[int]


@dataclass(frozen=True)
class Record:
    """A finished request; times are seconds since the run's start. outcome: correct, wrong, error or hung."""

    client: str
    layer: int
    experts: frozenset[int]
    sent_s: float
    done_s: float
    outcome: str
    error: str = ""


def make_samples(layers: list[MoELayer], tokens: int, seed: int = 0) -> list[Sample]:
    """SAMPLES inputs per layer with their in-process answers and needed experts (top-k of every token)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for layer, moe in enumerate(layers):
        for _ in range(SAMPLES):
            x = torch.randn(tokens, moe.cfg.d_model, generator=gen)
            needed = {int(e) for e in moe.route(x)[1].flatten() if e >= 0}
            out.append(Sample(layer, x, moe(x), frozenset(needed)))
    return out


class Load:
    """The client threads, the requests in flight and the finished records."""

    def __init__(self, cluster: Any, samples: list[Sample], clients: tuple[str, ...], base_url: str,
                 deadline_s: float, t0: float, think_s: float = 0.02) -> None:
        self.cluster, self.samples, self.base_url, self.t0, self.think_s = cluster, samples, base_url, t0, think_s
        self.bound_s = deadline_s + HUNG_GRACE_S
        self.records: list[Record] = []
        self.in_flight: dict[int, tuple[str, Sample, float]] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self._ids = itertools.count()
        runs: dict[str, Callable[[], None]] = {"blocking": self._blocking, "future": self._future,
                                               "async": lambda: asyncio.run(self._async()),
                                               "direct": self._direct, "http": self._http}
        self.threads = [threading.Thread(target=runs[c], name=f"chaos-{c}", daemon=True) for c in clients]

    def now(self) -> float:
        return time.monotonic() - self.t0

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def finish(self) -> int:
        """Stop sending, wait (bounded) for what is in flight; returns how many requests are still unanswered."""
        self.stop.set()
        end = time.monotonic() + self.bound_s + 1.0
        for t in self.threads:
            t.join(timeout=max(0.0, end - time.monotonic()))
        with self.lock:
            for client, sample, sent in self.in_flight.values():
                self.records.append(Record(client, sample.layer, sample.experts, sent, self.now(), "hung"))
            stuck = len(self.in_flight)
            self.in_flight.clear()
        return stuck

    def _pick(self, i: int) -> Sample:
        return self.samples[i % len(self.samples)]

    def _begin(self, client: str, sample: Sample) -> int:
        rid = next(self._ids)
        with self.lock:
            self.in_flight[rid] = (client, sample, self.now())
        return rid

    def _end(self, rid: int, out: Any = None, error: str = "") -> None:
        """Record a request's answer (`out`, a tensor) or `error` (an error kind, or "hung")."""
        done = self.now()
        with self.lock:
            entry = self.in_flight.pop(rid, None)
        if entry is None:  # already counted as hung by finish()
            return
        client, sample, sent = entry
        if error == "hung" or (not error and done - sent > self.bound_s):
            outcome = "hung"
        elif error:
            outcome = "error"
        else:
            ok = out.shape == sample.expected.shape and torch.allclose(out, sample.expected, atol=1e-5, rtol=0)
            outcome = "correct" if ok else "wrong"
        with self.lock:
            self.records.append(Record(client, sample.layer, sample.experts, sent, done, outcome,
                                       error if outcome == "error" else ""))

    def _closed_loop(self, client: str, call: Callable[[Sample], torch.Tensor], offset: int) -> None:
        for i in itertools.count(offset):
            if self.stop.is_set():
                return
            sample = self._pick(i)
            rid = self._begin(client, sample)
            try:
                out = call(sample)
            except Exception as exc:  # noqa: BLE001 - counted by kind: a clear error is allowed, silence is not
                self._end(rid, error=error_kind(exc))
            else:
                self._end(rid, out)
            time.sleep(self.think_s)

    def _blocking(self) -> None:
        self._closed_loop("blocking", lambda s: self.cluster.forward(s.layer, s.x), 0)

    def _direct(self) -> None:
        self._closed_loop("direct", lambda s: self.cluster.direct().forward(s.layer, s.x), 5)

    def _http(self) -> None:
        self._closed_loop("http", self._post, 7)

    def _post(self, s: Sample) -> torch.Tensor:
        req = urllib.request.Request(f"{self.base_url}/v1/layers/{s.layer}/forward",
                                     data=pack({"hidden": encode_tensor(s.x)}),
                                     headers={"content-type": "application/msgpack"})
        try:
            with urllib.request.urlopen(req, timeout=self.bound_s) as r:
                return torch.from_numpy(np.array(decode_tensor(unpack(r.read())["output"])))
        except urllib.error.HTTPError as exc:
            raise HttpStatusError(exc.code) from None
        except (TimeoutError, urllib.error.URLError) as exc:
            if isinstance(exc, TimeoutError) or isinstance(exc.reason, TimeoutError):
                raise BoundReached from None  # the socket timeout is bound_s: no answer by deadline + grace
            raise

    def _future(self) -> None:
        pending: dict[concurrent.futures.Future, tuple[int, float]] = {}
        index = itertools.count(3)
        while True:
            while len(pending) < IN_FLIGHT and not self.stop.is_set():
                sample = self._pick(next(index))
                rid = self._begin("future", sample)
                pending[self.cluster.forward_future(sample.layer, sample.x)] = (rid, time.monotonic())
            if not pending:
                return
            done, _ = concurrent.futures.wait(pending, timeout=0.2, return_when=concurrent.futures.FIRST_COMPLETED)
            for f in done:
                rid, _ = pending.pop(f)
                exc = f.exception()
                self._end(rid, None if exc else f.result(), error_kind(exc) if exc else "")
            for f, (rid, sent) in list(pending.items()):
                if time.monotonic() - sent > self.bound_s:
                    pending.pop(f)
                    f.cancel()
                    self._end(rid, error="hung")
            time.sleep(self.think_s)

    async def _async(self) -> None:
        async def worker(offset: int) -> None:
            for i in itertools.count(offset, IN_FLIGHT):
                if self.stop.is_set():
                    return
                sample = self._pick(i)
                rid = self._begin("async", sample)
                try:
                    out = await asyncio.wait_for(self.cluster.forward_async(sample.layer, sample.x), self.bound_s)
                except asyncio.TimeoutError:
                    self._end(rid, error="hung")
                except Exception as exc:  # noqa: BLE001 - counted by kind
                    self._end(rid, error=error_kind(exc))
                else:
                    self._end(rid, out)
                await asyncio.sleep(self.think_s)

        await asyncio.gather(*(worker(9 + k) for k in range(IN_FLIGHT)))


class HttpStatusError(Exception):
    """An HTTP error answer (counted by its status: `http_503`)."""

    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


class BoundReached(Exception):
    """The bench's own wait (deadline + HUNG_GRACE_S) passed with no answer."""


def error_kind(exc: BaseException) -> str:
    """What a failed request is counted as: `hung` (BoundReached), `http_<status>`, else its exception class."""
    if isinstance(exc, BoundReached):
        return "hung"
    if isinstance(exc, HttpStatusError):
        return f"http_{exc.status}"
    return type(exc).__name__
