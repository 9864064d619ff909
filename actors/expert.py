"""ExpertActor: hosts physical expert slots on the device Ray assigned it and computes SwiGLU for the rows
routed to it (one grouped GEMM per call where the device has a fast kernel, else a per-slot loop)."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from typing import Any

import numpy as np
import ray
import torch

from expertray.devices import assigned_device, device_identity, synchronize
from expertray.exchange import Group, from_host_array, join, member_exchange, to_host_array
from expertray.slots import ExpertKey, SlotStore

log = logging.getLogger(__name__)

WeightBlob = dict[ExpertKey, tuple[np.ndarray, np.ndarray]]  # key -> (gate_up [2F, D], down [D, F])


@ray.remote(max_concurrency=16)
class ExpertActor:
    """One device's worth of experts. Threaded: one in-flight call per router group plus control calls.

    Weights, buffers and compute stay on the device Ray assigned (`num_gpus`, fractions allowed: several
    actors then share one GPU); rows cross to the host only when the transport needs it."""

    def __init__(self, actor_id: str, num_threads: int = 1, dtype: str = "float32") -> None:
        torch.set_num_threads(max(1, num_threads))
        self.actor_id = actor_id
        self.device = assigned_device(len(ray.get_gpu_ids()))
        self.dtype = getattr(torch, dtype)
        self._slots = SlotStore(actor_id, self.device, self.dtype)
        self._groups: dict[str, Group] = {}
        self._lock = threading.Lock()
        self._slowdown = 1.0
        self._tokens: dict[ExpertKey, int] = {}
        self._compute_ms: deque[float] = deque(maxlen=512)
        self._ms_per_krow: deque[float] = deque(maxlen=64)  # cost per 1k rows: load-independent speed
        self._calls = 0

    # --- weights -------------------------------------------------------------------------------------
    def load(self, weights: WeightBlob) -> int:
        """Add slots; returns bytes now held."""
        self._slots.add({tuple(k): v for k, v in weights.items()})
        return self.memory_bytes()

    def unload(self, keys: list[ExpertKey]) -> int:
        self._slots.remove(tuple(k) for k in keys)
        return self.memory_bytes()

    def export(self, keys: list[ExpertKey]) -> WeightBlob:
        """Weights of held slots, as numpy (the source side of replication and migration)."""
        out = {}
        for key in keys:
            gate_up, down = self._slots.get(tuple(key))
            out[tuple(key)] = (_to_numpy(gate_up), _to_numpy(down))
        return out

    def holds(self) -> list[ExpertKey]:
        return self._slots.keys()

    def memory_bytes(self) -> int:
        return self._slots.nbytes()

    def device_identity(self) -> str | None:
        """Which physical GPU this actor computes on (None: CPU), for the group's backend choice."""
        return device_identity(self.device)

    # --- compute -------------------------------------------------------------------------------------
    def _run(self, layer: int, experts: list[int], counts: list[int], rows: torch.Tensor
             ) -> tuple[torch.Tensor, float]:
        t0 = time.perf_counter()
        out = self._slots.compute(layer, experts, counts, rows)
        synchronize(self.device)  # compute_ms feeds straggler detection: time the kernels, not their launch
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

    def compute(self, layer: int, experts: list[int], counts: list[int], rows: np.ndarray,
                wire_dtype: str = "float32") -> tuple[np.ndarray, float]:
        """Object-store transport: rows [n, D] grouped by expert in; (outputs [n, D], compute ms) out.

        Rows come and go in the router's dtype (`to_host_array` format); compute runs in this actor's."""
        x = from_host_array(rows, wire_dtype)
        if sum(counts) != x.shape[0]:
            raise ValueError(f"actor {self.actor_id}: counts sum {sum(counts)} != {x.shape[0]} rows received")
        out, ms = self._run(layer, experts, counts, x.to(self.device, self.dtype))
        return to_host_array(out.to(x.dtype))[0], ms

    # --- collective transport ------------------------------------------------------------------------
    def join_group(self, name: str, backend: str, host: str, port: int, secret: str, rank: int, world_size: int,
                   timeout_s: float) -> str:
        self._groups[name] = join(backend, host, port, secret, rank, world_size, timeout_s, self.device)
        return self.actor_id

    def leave_group(self, name: str) -> None:
        self._groups.pop(name, None)

    def collective_compute(self, name: str, layer: int, experts: list[int], counts: list[int],
                           d_model: int, wire_dtype: str = "float32") -> float:
        """Receive this actor's bucket from the router (rank 0) by all-to-all, compute, send it back.

        Rows travel in `wire_dtype` (the router's) and are computed in this actor's dtype."""
        group = self._groups[name]
        compute_ms = [0.0]

        def run(rows: torch.Tensor) -> torch.Tensor:
            out, compute_ms[0] = self._run(layer, experts, counts, rows.to(self.dtype))
            return out

        member_exchange(group, sum(counts), d_model, getattr(torch, wire_dtype), run)
        return compute_ms[0]

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
                    "memory_bytes": self.memory_bytes(), "slots": len(self._slots.keys()),
                    "slowdown": self._slowdown}

    def set_slowdown(self, factor: float) -> None:
        """Fault injection: every compute call takes `factor`x its real time (a straggling device)."""
        if not factor >= 1.0:
            raise ValueError(f"slowdown factor must be >= 1, got {factor}")
        self._slowdown = float(factor)

    def ping(self) -> str:
        return self.actor_id


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    """Host copy as numpy; bfloat16 (which numpy lacks) travels as float32."""
    t = t.detach().cpu()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()
