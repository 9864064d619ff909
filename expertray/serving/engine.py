"""The engine: an iteration-level scheduler over one transformers model whose MoE blocks run on the cluster.

Each step (one pass of the engine thread):
1. cancelled sequences leave; waiting ones are admitted while `max_running` and the KV budget allow;
2. if the decode batches would outgrow the KV budget, the newest decoding sequences are preempted: their cache
   is dropped and they wait again with prompt + tokens so far as the text to prefill (recompute; nothing sent
   is taken back);
3. tasks run on the lanes: each decode micro-batch (one new token for each of its rows, one forward, so every
   MoE layer gets all the micro-batch's tokens as one call) and up to `prefill_chunk_tokens` of prompt, chunked,
   so a long prompt never stalls the running decodes for more than a chunk;
4. tokens are sampled, sent to the requests' callbacks, finished sequences leave their batch.

Ping-pong: with `micro_batches` m > 1 the decoding sequences are split into m batches, each run by its own lane
(a thread with its own connection to the experts). While one micro-batch's MoE layer is out on the experts
(the thread waits on sockets, the GIL is free), another runs its attention. `stats()` reports the time spent
in attention and in MoE round trips, and how much of it overlapped.

Ray-free: the model comes from `expertray.from_pretrained` (any backend) with its runner wrapped in `Lanes`.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from expertray.errors import BackpressureError, InputError, RequestTimeoutError, require
from expertray.serving.kv import AttentionMasks, DecodeBatch
from expertray.serving.sampling import SamplingParams, next_token

log = logging.getLogger(__name__)
_need = functools.partial(require, prefix="engine")


@dataclass(frozen=True)
class EngineConfig:
    """max_running: sequences prefilling or decoding at once; max_waiting: queued beyond them (more is refused
    with BackpressureError: shed load before memory grows); prefill_chunk_tokens: prompt tokens prefilled per
    step; kv_budget_tokens: KV cells (rows × columns of every batch, padding included) the engine may hold;
    micro_batches: decode micro-batches in flight (ping-pong; 1 turns it off); step_timeout_s: the most one
    step's forwards may take before their sequences fail."""

    max_running: int = 16
    max_waiting: int = 64
    prefill_chunk_tokens: int = 128
    kv_budget_tokens: int = 65536
    micro_batches: int = 1  # ping-pong lanes; 1 here by measurement (bench serve: 2 lanes lose on 2 shared cores)
    step_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        for name in ("max_running", "prefill_chunk_tokens", "kv_budget_tokens", "micro_batches"):
            value = getattr(self, name)
            _need(isinstance(value, int) and value >= 1, name, f"must be an integer >= 1, got {value!r}")
        _need(isinstance(self.max_waiting, int) and self.max_waiting >= 0, "max_waiting",
              f"must be an integer >= 0, got {self.max_waiting!r}")
        _need(self.micro_batches <= 8, "micro_batches", f"must be <= 8, got {self.micro_batches}")
        _need(self.step_timeout_s > 0, "step_timeout_s", f"must be > 0, got {self.step_timeout_s!r}")


@dataclass(frozen=True)
class Event:
    """What a request's callback receives: new token ids, then once `finish_reason` ("stop": an end-of-sequence
    or stop id; "length": max_tokens or the context) or `error` (the request failed; nothing more comes)."""

    token_ids: list[int]
    finish_reason: str | None = None
    error: BaseException | None = None


class EngineObserver(Protocol):
    """Where the engine reports request timings and its occupancy (Prometheus in the Serve deployment)."""

    def request_done(self, ttft_s: float, tpot_s: float | None, e2e_s: float, prompt_tokens: int,
                     output_tokens: int) -> None: ...

    def occupancy(self, running: int, waiting: int, kv_used: int, kv_budget: int) -> None: ...


@dataclass(eq=False)
class Sequence:
    """One request in the engine. `tokens`: prompt + output so far; `cached`: how many of them the sequence's
    KV holds (its own prefill cache, or its row of a decode batch)."""

    id: int
    tokens: list[int]
    prompt_len: int
    params: SamplingParams
    emit: Callable[[Event], None]
    generator: torch.Generator | None
    arrived: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    cached: int = 0
    cache: Any = None
    batch: DecodeBatch | None = None
    cancelled: bool = False
    preemptions: int = 0

    @property
    def output(self) -> list[int]:
        return self.tokens[self.prompt_len:]


class Lanes:
    """The cluster runner behind the model's MoE proxies, one per lane: a forward called from lane i's thread
    goes to runner i (its own channels to the experts), and its time is counted as MoE time."""

    def __init__(self, runners: list[Any]) -> None:
        if not runners:
            raise ValueError("Lanes needs at least one runner")
        self.runners = runners
        self.cfg = runners[0].cfg
        self._local = threading.local()
        self._lock = threading.Lock()
        self.moe_s = 0.0

    def bind(self, lane: int) -> None:
        """Make the calling thread lane `lane`."""
        self._local.lane = lane

    def forward(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        runner = self.runners[getattr(self._local, "lane", 0) % len(self.runners)]
        start = time.perf_counter()
        try:
            return runner.forward(layer, hidden)
        finally:
            spent = time.perf_counter() - start
            with self._lock:
                self.moe_s += spent

    def shutdown(self) -> None:
        """Close every distinct runner (direct layers `close`, other runners `shutdown`)."""
        for runner in {id(r): r for r in self.runners}.values():
            (getattr(runner, "close", None) or runner.shutdown)()


@dataclass
class _Task:
    lane: int
    kind: str  # "decode" | "prefill"
    seqs: list[Sequence]
    batch: DecodeBatch | None = None
    chunk: int = 0


class Engine:
    """Continuous batching over `model` (a causal LM whose MoE blocks call `lanes`). Thread-safe `submit` and
    `cancel`; the steps run on the engine's own thread (`start`)."""

    def __init__(self, model: Any, lanes: Lanes, cfg: EngineConfig | None = None,
                 observer: EngineObserver | None = None) -> None:
        self.model = model.eval()
        self.lanes = lanes
        self.cfg = cfg or EngineConfig()
        self.observer = observer
        self.masks = AttentionMasks.for_model(model)
        text = model.config.get_text_config()
        self.vocab_size = int(text.vocab_size)
        self.context_len = int(getattr(text, "max_position_embeddings", 0) or 1 << 30)
        self.eos_ids = _eos_ids(model)
        # transformers 5.x names the cache argument `cache` (`past_key_values` before)
        self._cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.batches = [DecodeBatch() for _ in range(self.cfg.micro_batches)]
        self.waiting: deque[Sequence] = deque()
        self.prefilling: list[Sequence] = []
        self.by_id: dict[int, Sequence] = {}
        self._ids = itertools.count(1)
        self._wake = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._pool = [ThreadPoolExecutor(1, f"engine-lane-{i}", initializer=lanes.bind, initargs=(i,))
                      for i in range(self.cfg.micro_batches)]
        self.counters = {"prompt_tokens": 0, "output_tokens": 0, "finished": 0, "failed": 0, "cancelled": 0,
                         "preempted": 0, "refused": 0, "steps": 0}
        self.times = {"wall_s": 0.0, "busy_s": 0.0, "moe_s": 0.0}

    # ---- requests -------------------------------------------------------------------------------------------
    def check(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise InputError naming the problem if this request can never be served."""
        if not prompt_ids:
            raise InputError("prompt: no tokens")
        bad = next((t for t in prompt_ids if not isinstance(t, int) or not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise InputError(f"prompt: token id {bad!r} is outside the vocabulary (size {self.vocab_size})")
        need = len(prompt_ids) + params.max_tokens
        if need > self.context_len:
            raise InputError(f"context too long: {len(prompt_ids)} prompt tokens + max_tokens {params.max_tokens} "
                             f"= {need} > the model's context of {self.context_len} tokens")
        if need > self.cfg.kv_budget_tokens:
            raise InputError(f"context too long: {need} tokens > the engine's KV budget of "
                             f"{self.cfg.kv_budget_tokens} (engine.kv_budget_tokens)")

    def submit(self, prompt_ids: list[int], params: SamplingParams, emit: Callable[[Event], None]) -> int:
        """Queue a request; returns its id. Raises InputError (never servable) or BackpressureError (queue full:
        try again later)."""
        self.check(prompt_ids, params)
        with self._wake:
            if len(self.waiting) >= self.cfg.max_waiting + max(0, self.cfg.max_running - self._running()):
                self.counters["refused"] += 1
                raise BackpressureError(f"engine overloaded: {len(self.waiting)} requests waiting "
                                        f"(engine.max_waiting={self.cfg.max_waiting})")
            seq = Sequence(next(self._ids), list(prompt_ids), len(prompt_ids), params, emit, params.generator())
            self.waiting.append(seq)
            self.by_id[seq.id] = seq
            self.counters["prompt_tokens"] += len(prompt_ids)
            self._wake.notify()
        return seq.id

    def cancel(self, seq_id: int) -> None:
        """Stop a request (its client went away): it leaves at the next step boundary, its KV freed."""
        with self._wake:
            seq = self.by_id.get(seq_id)
            if seq is not None:
                seq.cancelled = True
                self._wake.notify()

    # ---- lifecycle ------------------------------------------------------------------------------------------
    def start(self) -> Engine:
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()
        return self

    def alive(self) -> bool:
        """Whether the step thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop stepping; every unfinished request gets an error event."""
        with self._wake:
            self._stop = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout_s)
        for pool in self._pool:
            pool.shutdown(wait=False, cancel_futures=True)
        for seq in list(self.by_id.values()):
            self._fail(seq, RuntimeError("engine stopped"))

    def _loop(self) -> None:
        while True:
            with self._wake:
                self._wake.wait_for(lambda: self._stop or self.by_id, timeout=1.0)
                if self._stop:
                    return
                if not self.by_id:
                    continue
            try:
                self.step()
            except Exception as exc:  # noqa: BLE001 - a bug must fail the requests, not kill the engine silently
                log.exception("engine step failed")
                for seq in list(self.by_id.values()):
                    self._fail(seq, exc)

    # ---- one step -------------------------------------------------------------------------------------------
    def _running(self) -> int:
        return len(self.prefilling) + sum(len(b) for b in self.batches)

    def kv_used(self) -> int:
        return sum(b.cells for b in self.batches) + sum(s.cached for s in self.prefilling)

    def step(self) -> None:
        """One iteration: reap, admit, preempt, run the lanes' forwards, sample and emit."""
        with self._wake:
            self._reap()
            self._admit()
        self._preempt()
        tasks = self._plan()
        if not tasks:
            return
        start, moe_before = time.perf_counter(), self.lanes.moe_s
        futures = {self._pool[t.lane].submit(self._run, t): t for t in tasks}
        done, pending = wait(futures, timeout=self.cfg.step_timeout_s)
        busy = 0.0
        for future, task in futures.items():
            if future in pending:
                self._fail_task(task, RequestTimeoutError(f"engine: a {task.kind} forward took over "
                                                          f"engine.step_timeout_s={self.cfg.step_timeout_s:g} s"))
                continue
            try:
                logits, seconds = future.result()
            except Exception as exc:  # noqa: BLE001 - the cluster's error goes to the task's requests
                self._fail_task(task, exc)
                continue
            busy += seconds
            self._finish_task(task, logits)
        self.counters["steps"] += 1
        self.times["wall_s"] += time.perf_counter() - start
        self.times["busy_s"] += busy
        self.times["moe_s"] += self.lanes.moe_s - moe_before
        if self.observer is not None:
            self.observer.occupancy(self._running(), len(self.waiting), self.kv_used(), self.cfg.kv_budget_tokens)

    def _reap(self) -> None:
        for seq in [s for s in self.by_id.values() if s.cancelled]:
            self.counters["cancelled"] += 1
            self._leave(seq)

    def _admit(self) -> None:
        while self.waiting and self._running() < self.cfg.max_running:
            seq = self.waiting[0]
            headroom = self._running() + 1  # every decoding row grows one column per step
            if self._running() and self.kv_used() + len(seq.tokens) + headroom > self.cfg.kv_budget_tokens:
                return
            self.waiting.popleft()
            self.prefilling.append(seq)

    def _preempt(self) -> None:
        """Recompute-preempt the newest decoding sequences until one more column fits every batch."""
        def needed() -> int:
            return sum(b.cells + len(b) for b in self.batches) + sum(s.cached for s in self.prefilling)

        while needed() > self.cfg.kv_budget_tokens:
            decoding = [s for b in self.batches for s in b.seqs]
            if len(decoding) <= 1 and not self.prefilling:
                return  # one sequence alone always fits (check() refused any that cannot)
            victim = max(decoding, key=lambda s: s.arrived) if decoding else self.prefilling[-1]
            self._drop_kv(victim)
            victim.preemptions += 1
            self.counters["preempted"] += 1
            with self._wake:
                self.waiting.appendleft(victim)

    def _plan(self) -> list[_Task]:
        tasks = [_Task(i, "decode", list(b.seqs), batch=b) for i, b in enumerate(self.batches) if len(b)]
        budget = self.cfg.prefill_chunk_tokens
        lane_rows = [len(b) for b in self.batches]
        for seq in self.prefilling:
            if budget <= 0:
                break
            chunk = min(budget, len(seq.tokens) - seq.cached)
            lane = lane_rows.index(min(lane_rows))
            lane_rows[lane] += chunk
            tasks.append(_Task(lane, "prefill", [seq], chunk=chunk))
            budget -= chunk
        return tasks

    def _run(self, task: _Task) -> tuple[torch.Tensor, float]:
        """On a lane thread: the task's forward → last-position logits [B, V] (float32), and its seconds."""
        start = time.perf_counter()
        with torch.inference_mode():
            if task.kind == "decode":
                batch = task.batch
                position_ids, mask = batch.step_inputs(self.masks)
                input_ids = torch.tensor([[s.tokens[-1]] for s in batch.seqs])
                cache = batch.cache()
                out = self.model(input_ids=input_ids, position_ids=position_ids, attention_mask=mask,
                                 use_cache=True, logits_to_keep=1, **{self._cache_arg: cache})
                batch.absorb(_grown_cache(out), position_ids)
            else:
                from transformers import DynamicCache

                seq = task.seqs[0]
                if seq.cache is None:
                    seq.cache = DynamicCache()
                ids = torch.tensor([seq.tokens[seq.cached:seq.cached + task.chunk]])
                out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1, **{self._cache_arg: seq.cache})
                seq.cache = _grown_cache(out)
                seq.cached += task.chunk
        return out.logits[:, -1, :].float(), time.perf_counter() - start

    def _finish_task(self, task: _Task, logits_BV: torch.Tensor) -> None:
        if task.kind == "prefill":
            seq = task.seqs[0]
            if seq.cached < len(seq.tokens):
                return  # more prompt to prefill; its logits are not a prediction yet
            self.prefilling.remove(seq)
            self._emit_next(seq, logits_BV[0])
            if seq.id in self.by_id:  # still going: it joins the smallest decode batch
                batch = min(self.batches, key=len)
                batch.add(seq, seq.cache, seq.cached)
                seq.cache, seq.batch = None, batch
            return
        done = []
        for row, seq in enumerate(task.seqs):
            seq.cached += 1
            self._emit_next(seq, logits_BV[row])
            if seq.id not in self.by_id:
                done.append(seq)
        task.batch.remove(done)

    def _emit_next(self, seq: Sequence, logits_V: torch.Tensor) -> None:
        """Sample the sequence's next token, send it, and end the sequence when it is done."""
        if seq.cancelled:
            self.counters["cancelled"] += 1
            self._leave(seq)
            return
        token = next_token(logits_V, seq.params, seq.generator)
        now = time.monotonic()
        if seq.first_token_at is None:
            seq.first_token_at = now
        stop = token in self.eos_ids or token in seq.params.stop_ids
        if not stop:
            seq.tokens.append(token)
            self.counters["output_tokens"] += 1
        n_out = len(seq.output)
        reason = "stop" if stop else ("length" if n_out >= seq.params.max_tokens
                                      or len(seq.tokens) >= self.context_len else None)
        try:
            seq.emit(Event([] if stop else [token], reason))
        except Exception:  # noqa: BLE001 - a broken callback ends its own request only
            log.exception("request %d: callback failed; cancelling it", seq.id)
            reason = reason or "cancelled"
        if reason is None:
            return
        self.counters["finished"] += 1
        if self.observer is not None:
            tpot = (now - seq.first_token_at) / (n_out - 1) if n_out > 1 else None
            self.observer.request_done(seq.first_token_at - seq.arrived, tpot, now - seq.arrived, seq.prompt_len,
                                       n_out)
        self._leave(seq, keep_row=True)

    def _drop_kv(self, seq: Sequence) -> None:
        if seq.batch is not None:
            seq.batch.remove([seq])
            seq.batch = None
        if seq in self.prefilling:
            self.prefilling.remove(seq)
        seq.cache, seq.cached = None, 0

    def _leave(self, seq: Sequence, keep_row: bool = False) -> None:
        """Forget a sequence. keep_row: it sits in a decode task being finished; that task drops the row."""
        with self._wake:
            self.by_id.pop(seq.id, None)
            if seq in self.waiting:
                self.waiting.remove(seq)
        if not keep_row:
            self._drop_kv(seq)

    def _fail(self, seq: Sequence, exc: BaseException) -> None:
        self.counters["failed"] += 1
        self._leave(seq)
        try:
            seq.emit(Event([], None, exc))
        except Exception:  # noqa: BLE001 - nothing more to tell a broken callback
            log.exception("request %d: error callback failed", seq.id)

    def _fail_task(self, task: _Task, exc: BaseException) -> None:
        """A forward failed (the cluster's deadline passed): its sequences get the error and leave (a failed
        forward left its batch's cache as it was: only a finished one is absorbed)."""
        log.warning("engine: %s of %d sequence(s) failed: %s", task.kind, len(task.seqs), exc)
        for seq in task.seqs:
            if seq.id in self.by_id:
                self._fail(seq, exc)

    # ---- observation ----------------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Counters, occupancy and stage times: attention_s (forwards less their MoE calls), moe_s, and
        overlap = the share of lane busy time that ran beside another lane (0 with one micro-batch)."""
        busy, wall, moe = self.times["busy_s"], self.times["wall_s"], self.times["moe_s"]
        return {**self.counters, "running": self._running(), "waiting": len(self.waiting),
                "kv_used": self.kv_used(), "kv_budget": self.cfg.kv_budget_tokens,
                "micro_batches": self.cfg.micro_batches, "attention_s": round(max(busy - moe, 0.0), 4),
                "moe_s": round(moe, 4), "busy_s": round(busy, 4), "wall_s": round(wall, 4),
                "overlap": overlap(busy, wall)}


def overlap(busy_s: float, wall_s: float) -> float:
    """The share of lane busy time that ran beside another lane: 0 when the lanes' work took as long as the
    steps (one micro-batch), towards 1 as more of it ran at once."""
    return round(max(busy_s - wall_s, 0.0) / busy_s, 4) if busy_s else 0.0


def _eos_ids(model: Any) -> frozenset[int]:
    """The model's end-of-sequence ids (generation config first, then the model config)."""
    for source in (getattr(model, "generation_config", None), model.config):
        eos = getattr(source, "eos_token_id", None) if source is not None else None
        if eos is not None:
            return frozenset([eos] if isinstance(eos, int) else eos)
    return frozenset()



def _grown_cache(out: Any) -> Any:
    """The cache a forward returned (`cache` in transformers 5.x, `past_key_values` before)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values
