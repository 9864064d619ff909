"""ExpertActor: hosts physical expert slots on the device Ray assigned it and computes the experts for the
rows routed to it (one grouped GEMM per call where the device has a fast kernel, else a per-slot loop;
GPT-OSS's clamped SwiGLU with biases when the layer config says so).

Weights arrive three ways: `load_checkpoint` reads the actor's own slots from the checkpoint shards
(memory-mapped, only the requested tensors, in chunks so peak memory stays near the slots' bytes);
`load` takes an `ExpertBlob` exported by a live replica (`export`, replication and migration) or built
from a random-weight cluster's weight store. Slots keep the serving dtype; blobs carry it exactly
(bf16 as its raw bits, see exchange.to_host_array)."""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections import deque
from typing import Any

import numpy as np
import ray
import torch

from expertray.config import MoELayerConfig
from expertray.layer.slots import ExpertKey, SlotStore
from expertray.runtime.weights import read_slots
from expertray.wire.channel import ChannelServer
from expertray.wire.collective import Memberships, from_host_array, join, member_exchange, to_host_array
from expertray.wire.devices import assigned_device, device_identity, synchronize

log = logging.getLogger(__name__)

# {"dtype": torch dtype name, "slots": {key: [gate_up [2F, D], down [D, F]] (+ [gate_up_bias [2F],
# down_bias [D]] for layers with expert biases)}}; arrays in to_host_array's format (bf16 as its bits)
ExpertBlob = dict[str, Any]
CHUNK_BYTES = 64 << 20  # a checkpoint load reads at most this many bytes of slots per read (bounds peak RSS)


def _rss_kib(field: str) -> int:
    """This process's VmRSS / VmHWM from /proc (KiB; 0 where /proc is unavailable)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


@ray.remote(max_concurrency=16, concurrency_groups={"liveness": 1})
class ExpertActor:
    """One device's worth of experts. Threaded: one in-flight call per router group plus control calls; `ping`
    has a thread of its own (the "liveness" concurrency group), so a busy actor answers the controller's
    short liveness pings however many calls are computing or waiting on a collective.

    Weights, buffers and compute stay on the device Ray assigned (`num_gpus`, fractions allowed: several
    actors then share one GPU); rows cross to the host only when the transport needs it."""

    def __init__(self, actor_id: str, num_threads: int = 1, dtype: str = "float32",
                 layer_cfg: MoELayerConfig | None = None) -> None:
        torch.set_num_threads(max(1, num_threads))
        self.actor_id = actor_id
        self.device = assigned_device(len(ray.get_gpu_ids()))
        self.dtype = getattr(torch, dtype)
        self._slots = SlotStore(actor_id, self.device, self.dtype, layer_cfg=layer_cfg)
        self._empty_rss_kib = _rss_kib("VmRSS")  # before any weight: what the process costs by itself
        self._load_s = 0.0  # time spent reading slots from the checkpoint
        self._groups = Memberships()
        self._lock = threading.Lock()
        self._slowdown = 1.0
        self._tokens: dict[ExpertKey, int] = {}
        self._compute_ms: deque[float] = deque(maxlen=512)
        self._ms_per_krow: deque[float] = deque(maxlen=64)  # cost per 1k rows: load-independent speed
        self._calls = 0
        self._channel: ChannelServer | None = None

    # --- weights -------------------------------------------------------------------------------------
    def load(self, blob: ExpertBlob) -> int:
        """Add slots from an ExpertBlob (another actor's `export`, or the weight store); returns bytes held."""
        dtype = blob["dtype"]
        self._slots.add({tuple(k): [from_host_array(a, dtype) for a in arrays] for k, arrays in blob["slots"].items()})
        return self.memory_bytes()

    def load_checkpoint(self, descriptor: dict[str, Any], dtype: str, keys: list[ExpertKey]) -> int:
        """Read the slots `keys` from the checkpoint `descriptor` (CheckpointDescriptor.to_dict) in `dtype`
        straight from its shards (runtime.weights.read_slots: peak memory is the slots plus one chunk of
        ≤ CHUNK_BYTES); returns bytes held."""
        from expertray.models.source import cached_source

        t0 = time.perf_counter()
        source = cached_source(descriptor, dtype)
        if source.dtype != self.dtype:
            raise ValueError(f"actor {self.actor_id} serves {self.dtype} but was asked to load {dtype} slots")
        read_slots(source, keys, self._slots, CHUNK_BYTES)
        self._load_s += time.perf_counter() - t0
        return self.memory_bytes()

    def unload(self, keys: list[ExpertKey]) -> int:
        self._slots.remove(tuple(k) for k in keys)
        return self.memory_bytes()

    def export(self, keys: list[ExpertKey]) -> ExpertBlob:
        """Weights (and biases) of held slots in this actor's dtype, exactly (the source side of replication
        and migration)."""
        return {"dtype": str(self.dtype).removeprefix("torch."),
                "slots": {tuple(key): [to_host_array(t.contiguous())[0] for t in self._slots.get(tuple(key))]
                          for key in keys}}

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

    # --- channel transport ---------------------------------------------------------------------------
    def channel_endpoint(self) -> dict[str, Any]:
        """Where this actor's standing channel server listens (started on first call, on this node's address
        only) and the token a connection must present; rows then come and go with no Ray task
        (expertray/wire/channel.py). Only Ray callers (routers, clients of the controller) learn the token."""
        with self._lock:
            if self._channel is None:
                self._channel = ChannelServer(self.actor_id, ray.util.get_node_ip_address(), self._serve_channel)
        return dataclasses.asdict(self._channel.endpoint)

    def _serve_channel(self, layer: int, experts: list[int], counts: list[int], rows: torch.Tensor
                       ) -> tuple[torch.Tensor, float]:
        out, ms = self._run(layer, experts, counts, rows.to(self.device, self.dtype))
        return out.to("cpu", rows.dtype), ms

    # --- collective transport ------------------------------------------------------------------------
    def join_group(self, name: str, backend: str, host: str, port: int, secret: str, rank: int, world_size: int,
                   timeout_s: float) -> str:
        group = join(backend, host, port, secret, rank, world_size, timeout_s, self.device,
                     local_host=ray.util.get_node_ip_address())  # not the hostname's address
        if not self._groups.add(name, group):
            log.info("%s: group %s formed after the router gave up on it; dropped", self.actor_id, name)
        return self.actor_id

    def leave_group(self, name: str) -> None:
        self._groups.leave(name)

    def collective_compute(self, name: str, layer: int, experts: list[int], counts: list[int],
                           d_model: int, wire_dtype: str = "float32") -> float:
        """Receive this actor's bucket from the router (rank 0) by all-to-all, compute, send it back.

        Rows travel in `wire_dtype` (the router's) and are computed in this actor's dtype."""
        group = self._groups.get(name)
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
                    "rss_kib": _rss_kib("VmRSS"), "peak_rss_kib": _rss_kib("VmHWM"),
                    "empty_rss_kib": self._empty_rss_kib, "checkpoint_load_s": self._load_s,
                    "slowdown": self._slowdown}

    def set_slowdown(self, factor: float) -> None:
        """Fault injection: every compute call takes `factor`x its real time (a straggling device)."""
        if not factor >= 1.0:
            raise ValueError(f"slowdown factor must be >= 1, got {factor}")
        self._slowdown = float(factor)

    @ray.method(concurrency_group="liveness")
    def ping(self) -> str:
        return self.actor_id

