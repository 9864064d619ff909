"""ExpertActor: hosts physical expert slots and computes grouped SwiGLU for the rows routed to it."""

from __future__ import annotations

import datetime
import logging
import os
import threading
import time
from collections import deque
from typing import Any

import numpy as np
import ray
import torch
import torch.distributed as dist

from expertray.errors import UnknownExpertError
from expertray.experts import swiglu
from expertray.validation import tensor_view

log = logging.getLogger(__name__)

ExpertKey = tuple[int, int]  # (layer, logical expert)
WeightBlob = dict[ExpertKey, tuple[np.ndarray, np.ndarray]]  # key -> (gate_up [2F, D], down [D, F])


def make_group(backend: str, host: str, port: int, prefix: str, rank: int, world_size: int,
               timeout_s: float, is_master: bool = False) -> tuple[Any, Any]:
    """A standalone torch.distributed process group (no default group), so groups can be re-formed freely.

    Returns (process_group, store); rank 0 passes is_master=True and hosts the TCPStore.
    """
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, port, is_master=is_master, wait_for_workers=False, timeout=timeout)
    prefixed = dist.PrefixStore(prefix, store)
    if backend == "nccl":
        pg = dist.ProcessGroupNCCL(prefixed, rank, world_size, dist.ProcessGroupNCCL.Options())
    else:
        pg = dist.ProcessGroupGloo(prefixed, rank, world_size, timeout)
    return pg, store


@ray.remote(max_concurrency=16)
class ExpertActor:
    """One device's worth of experts. Threaded: one in-flight call per router group plus control calls."""

    def __init__(self, actor_id: str, num_threads: int = 1, dtype: str = "float32") -> None:
        torch.set_num_threads(max(1, num_threads))
        self.actor_id = actor_id
        self.device = torch.device("cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu")
        self.dtype = getattr(torch, dtype)
        self._slots: dict[ExpertKey, tuple[torch.Tensor, torch.Tensor]] = {}
        self._groups: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._slowdown = 1.0
        self._tokens: dict[ExpertKey, int] = {}
        self._compute_ms: deque[float] = deque(maxlen=512)
        self._ms_per_krow: deque[float] = deque(maxlen=64)  # cost per 1k rows: load-independent speed
        self._calls = 0

    # --- weights -------------------------------------------------------------------------------------
    def load(self, weights: WeightBlob) -> int:
        """Add slots; returns bytes now held."""
        for key, (gate_up, down) in weights.items():
            self._slots[tuple(key)] = (torch.as_tensor(np.array(gate_up), dtype=self.dtype, device=self.device),
                                       torch.as_tensor(np.array(down), dtype=self.dtype, device=self.device))
        return self.memory_bytes()

    def unload(self, keys: list[ExpertKey]) -> int:
        for key in keys:
            self._slots.pop(tuple(key), None)
        return self.memory_bytes()

    def export(self, keys: list[ExpertKey]) -> WeightBlob:
        """Weights of held slots, as numpy (the source side of replication and migration)."""
        out = {}
        for key in keys:
            gate_up, down = self._slot(tuple(key))
            out[tuple(key)] = (gate_up.cpu().numpy(), down.cpu().numpy())
        return out

    def holds(self) -> list[ExpertKey]:
        return sorted(self._slots)

    def memory_bytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self._slots.values())

    def _slot(self, key: ExpertKey) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            return self._slots[key]
        except KeyError:
            raise UnknownExpertError(f"actor {self.actor_id} holds no slot for expert {key[0]}:{key[1]}") from None

    # --- compute -------------------------------------------------------------------------------------
    def _run(self, layer: int, experts: list[int], counts: list[int], rows: torch.Tensor
             ) -> tuple[torch.Tensor, float]:
        t0 = time.perf_counter()
        out = torch.empty_like(rows)
        start = 0
        for e, n in zip(experts, counts):
            gate_up, down = self._slot((layer, e))
            swiglu(rows[start:start + n], gate_up, down, out=out[start:start + n])
            start += n
        if self._slowdown > 1.0:
            time.sleep((self._slowdown - 1.0) * (time.perf_counter() - t0))
        ms = (time.perf_counter() - t0) * 1e3
        with self._lock:
            self._calls += 1
            self._compute_ms.append(ms)
            if rows.shape[0]:
                self._ms_per_krow.append(ms * 1e3 / rows.shape[0])
            for e, n in zip(experts, counts):
                self._tokens[(layer, e)] = self._tokens.get((layer, e), 0) + n
        return out, ms

    def compute(self, layer: int, experts: list[int], counts: list[int], rows: np.ndarray
                ) -> tuple[np.ndarray, float]:
        """Object-store transport: rows [n, D] grouped by expert in; (outputs [n, D], compute ms) out."""
        x = tensor_view(rows).to(self.device, self.dtype)
        if sum(counts) != x.shape[0]:
            raise ValueError(f"actor {self.actor_id}: counts sum {sum(counts)} != {x.shape[0]} rows received")
        out, ms = self._run(layer, experts, counts, x)
        return out.cpu().numpy(), ms

    # --- collective transport ------------------------------------------------------------------------
    def join_group(self, name: str, backend: str, host: str, port: int, rank: int, world_size: int,
                   timeout_s: float) -> str:
        pg, store = make_group(backend, host, port, name + "/", rank, world_size, timeout_s)
        self._groups[name] = (pg, store, rank, world_size)
        return self.actor_id

    def leave_group(self, name: str) -> None:
        self._groups.pop(name, None)

    def collective_compute(self, name: str, layer: int, experts: list[int], counts: list[int],
                           d_model: int) -> float:
        """Receive this actor's bucket from the router (rank 0) by all-to-all, compute, send it back."""
        pg, _, rank, world = self._groups[name]
        n = sum(counts)
        recv = torch.empty(n, d_model, dtype=self.dtype, device=self.device)
        empty = torch.empty(0, d_model, dtype=self.dtype, device=self.device)
        zeros = [0] * world
        from_router = [n] + [0] * (world - 1)
        pg.alltoall_base(recv, empty, from_router, zeros).wait()
        out, ms, error = recv, 0.0, None
        try:
            if n:
                out, ms = self._run(layer, experts, counts, recv)
        except Exception as exc:  # noqa: BLE001 - re-raised below, after the exchange completes
            error = exc
        # Complete the exchange even on failure so the router is not left blocked in the collective;
        # the error, returned through this Ray call, makes the router fail the batch instead.
        pg.alltoall_base(empty, out, zeros, from_router).wait()
        if error is not None:
            raise error
        return ms

    # --- observability and fault injection -----------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        with self._lock:
            ms = sorted(self._compute_ms)
            per_krow = sorted(self._ms_per_krow)
            return {"actor": self.actor_id, "pid": os.getpid(), "calls": self._calls,
                    "tokens": {f"{k[0]}:{k[1]}": v for k, v in self._tokens.items()},
                    "compute_ms_p50": ms[len(ms) // 2] if ms else 0.0,
                    "compute_ms_p99": ms[min(len(ms) - 1, int(0.99 * len(ms)))] if ms else 0.0,
                    "ms_per_krow_p50": per_krow[len(per_krow) // 2] if per_krow else 0.0,
                    "memory_bytes": self.memory_bytes(), "slots": len(self._slots),
                    "slowdown": self._slowdown}

    def set_slowdown(self, factor: float) -> None:
        """Fault injection: every compute call takes `factor`x its real time (a straggling device)."""
        if not factor >= 1.0:
            raise ValueError(f"slowdown factor must be >= 1, got {factor}")
        self._slowdown = float(factor)

    def ping(self) -> str:
        return self.actor_id
