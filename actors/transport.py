"""Transports move a PreparedBatch's per-actor buckets to the expert actors and the outputs back.

Both produce the same [N, D] output rows in plan order; they differ only in how bytes move:
- ObjectStoreTransport: one Ray call per busy actor with its rows as a numpy view (object store).
- CollectiveTransport: the router is rank 0 of a torch.distributed group (gloo on CPU, NCCL on GPU)
  with the expert actors; rows go out and come back with all-to-all with uneven split sizes, while a
  small Ray call per actor carries the metadata (which experts, how many rows each).
"""

from __future__ import annotations

import asyncio
import socket
import uuid
from dataclasses import dataclass, field
from typing import Any

import ray
import torch

from expertray.actors.expert import make_group
from expertray.errors import TransportError
from expertray.pipeline import PreparedBatch
from expertray.validation import tensor_view


@dataclass
class TransportStats:
    """Bytes sent to each actor (the same number comes back), for metrics and the simulator comparison."""

    bytes_out: list[int] = field(default_factory=list)
    compute_ms: dict[int, float] = field(default_factory=dict)  # actor index -> compute time of its bucket

    @property
    def max_compute_ms(self) -> float:
        return max(self.compute_ms.values(), default=0.0)


class ObjectStoreTransport:
    name = "object_store"

    def __init__(self, handles: list[Any]) -> None:
        self.handles = handles

    async def exchange(self, batch: PreparedBatch) -> tuple[torch.Tensor, TransportStats]:
        rows = batch.rows.numpy()
        busy = [b for b in batch.buckets if b.num_rows]
        refs = [self.handles[b.actor].compute.remote(batch.layer, b.experts, b.counts,
                                                     rows[b.row_start:b.row_start + b.num_rows]) for b in busy]
        results = await asyncio.gather(*refs)
        outs = [tensor_view(rows_out) for rows_out, _ in results]
        out = outs[0] if len(outs) == 1 else torch.cat(outs) if outs else batch.rows.new_empty(batch.rows.shape)
        per_row = batch.rows.shape[1] * batch.rows.element_size()
        sent = [b.num_rows * per_row for b in batch.buckets]
        return out, TransportStats(sent, {b.actor: ms for b, (_, ms) in zip(busy, results)})

    async def close(self) -> None:
        return None


class CollectiveTransport:
    name = "collective"

    def __init__(self, handles: list[Any], backend: str, timeout_s: float) -> None:
        self.handles = handles
        self.backend = backend
        self.timeout_s = timeout_s
        self.group = f"g-{uuid.uuid4().hex[:12]}"
        self._pg: Any = None
        self._store: Any = None

    async def open(self) -> None:
        """Form the group: the router hosts the store (rank 0), every expert actor joins as rank 1..N."""
        host = ray.util.get_node_ip_address()
        with socket.socket() as s:  # a free port for the store on this node
            s.bind(("", 0))
            port = s.getsockname()[1]
        world = len(self.handles) + 1
        joins = [h.join_group.remote(self.group, self.backend, host, port, rank + 1, world, self.timeout_s)
                 for rank, h in enumerate(self.handles)]
        self._pg, self._store = await asyncio.to_thread(
            make_group, self.backend, host, port, self.group + "/", 0, world, self.timeout_s, True)
        await asyncio.gather(*joins)

    def _alltoall(self, rows: torch.Tensor, splits: list[int]) -> torch.Tensor:
        d = rows.shape[1]
        zeros = [0] * (len(splits) + 1)
        to_actors = [0] + splits
        self._pg.alltoall_base(rows.new_empty(0, d), rows, zeros, to_actors).wait()
        out = torch.empty_like(rows)
        self._pg.alltoall_base(out, rows.new_empty(0, d), to_actors, zeros).wait()
        return out

    async def exchange(self, batch: PreparedBatch) -> tuple[torch.Tensor, TransportStats]:
        d = batch.rows.shape[1]
        refs = [self.handles[b.actor].collective_compute.remote(self.group, batch.layer, b.experts, b.counts, d)
                for b in batch.buckets]
        try:
            out = await asyncio.to_thread(self._alltoall, batch.rows, batch.split_sizes)
        except RuntimeError as exc:  # gloo/NCCL raise RuntimeError subclasses when a peer dies or times out
            for ref in refs:
                ray.cancel(ref, force=False)
            raise TransportError(f"all-to-all in group {self.group} failed: {exc}") from exc
        compute_ms = await asyncio.gather(*refs)
        per_row = d * batch.rows.element_size()
        sent = [b.num_rows * per_row for b in batch.buckets]
        return out, TransportStats(sent, {b.actor: ms for b, ms in zip(batch.buckets, compute_ms)
                                                      if b.num_rows})

    async def close(self) -> None:
        await asyncio.gather(*[h.leave_group.remote(self.group) for h in self.handles], return_exceptions=True)
        self._pg = None
        self._store = None
