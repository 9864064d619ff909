"""One routed batch through a transport, Ray-free: gate → policy → plan → `transport.exchange` → combine.

The RouterActor's `run_batch` is this function plus bookkeeping; tests run it with an in-process transport
(`InProcessTransport`) and compare with MoELayer.forward.

`Failover` is the router's mask of suspect actors: a transport failure names the actors that died or hung, or
the controller's liveness pings push the actors that stopped answering (expertray/runtime/liveness.py); until
the controller installs a healed table, replica selection avoids them wherever an expert has another replica
(PlacementTable.masked_route), so requests flow on the survivors without waiting for the heal.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from expertray.config import MoELayerConfig
from expertray.errors import TransportError
from expertray.layer.experts import ExpertWeights, SharedExpert, swiglu
from expertray.layer.gating import GateWeights
from expertray.layer.route import PreparedBatch, ReplicaSelector, RoutingPolicy, finish, prepare
from expertray.seams import Transport
from expertray.state.placement_table import PlacementTable


@dataclass
class LayerParams:
    """What a router holds per layer: the gate, and the shared expert (computed at the router)."""

    gate: GateWeights
    shared: SharedExpert | None

    def to(self, device: torch.device) -> LayerParams:
        """The same parameters on `device` (once, when a router starts on its GPU): gate math then runs
        where the hidden states are."""
        return LayerParams(_tensors_to(self.gate, device), None if self.shared is None
                           else _tensors_to(self.shared, device))


def _tensors_to(obj: Any, device: torch.device) -> Any:
    """A copy of dataclass `obj` with every tensor field moved to `device` (None fields stay None)."""
    return dataclasses.replace(obj, **{f.name: getattr(obj, f.name).to(device) for f in dataclasses.fields(obj)
                                       if isinstance(getattr(obj, f.name), torch.Tensor)})


@dataclass
class BatchResult:
    """A finished batch: output [T, D], the prepared batch, the transport's stats, and the four timestamps
    (start, prepared, exchanged, combined; perf_counter seconds)."""

    output: torch.Tensor
    batch: PreparedBatch
    transport_stats: Any
    times: tuple[float, float, float, float]


async def run_layer(hidden: torch.Tensor, layer: int, cfg: MoELayerConfig, params: LayerParams,
                    policy: RoutingPolicy, selector: ReplicaSelector, table: PlacementTable, transport: Transport,
                    expert_load: torch.Tensor | None = None, dtype: torch.dtype | None = None,
                    suspects: frozenset[str] = frozenset(),
                    on_prepared: Callable[[PreparedBatch], None] | None = None) -> BatchResult:
    """Route hidden [T, D] through `layer` on `table`, exchange the buckets, combine.

    The gate sees `hidden` (and computes in float32); rows go out, and the combine and shared expert run,
    in the serving `dtype` (None: hidden's), as MoELayer.forward does; output [T, D] is in that dtype.
    suspects: actor ids to avoid wherever an expert has another replica (`Failover.suspects`).
    on_prepared: told the planned batch before its rows go out (the router learns which actors it waits on)."""
    t0 = time.perf_counter()
    route = table.masked_route(layer, suspects)
    batch = prepare(hidden, layer, cfg, params.gate, policy, selector, route, len(table.actors),
                    expert_load=expert_load, rows_dtype=dtype)
    if on_prepared is not None:
        on_prepared(batch)
    t1 = time.perf_counter()
    rows_out, tstats = await transport.exchange(batch)
    t2 = time.perf_counter()
    out = finish(batch, rows_out, hidden if dtype is None else hidden.to(dtype), params.shared)
    return BatchResult(out, batch, tstats, (t0, t1, t2, time.perf_counter()))


def waits_on(batch: PreparedBatch, actors: tuple[str, ...], every_member: bool) -> frozenset[str]:
    """The actor ids a batch in flight waits for: those its plan sends rows to, or every actor when the
    transport is a collective group (`every_member`: an all-to-all stalls while any member is missing)."""
    if every_member:
        return frozenset(actors)
    return frozenset(actors[b.actor] for b in batch.buckets if b.num_rows)


def failed_actors(exc: BaseException) -> tuple[str, ...]:
    """The actor ids a transport failure names as dead or unresponsive (TransportError.actors); () if none."""
    return exc.actors if isinstance(exc, TransportError) else ()


@dataclass
class Failover:
    """The actors a router avoids until the controller installs a healed table (Ray-free).

    suspects: actor ids named by transport failures, or pushed by the controller's liveness pings, since the
    last healed table."""

    suspects: frozenset[str] = frozenset()

    def mark(self, table: PlacementTable, actors: Iterable[str]) -> bool:
        """Add `actors` (those in `table`) to the suspects; True when at least one was named and every logical
        expert still has a replica off the suspects, i.e. a retry can be served at once without a heal."""
        named = frozenset(a for a in actors if a in table.actors)
        if not named:
            return False
        self.suspects |= named
        return not table.stranded(self.suspects)

    def suspect(self, table: PlacementTable, actors: Iterable[str], recovered: Iterable[str] = ()) -> frozenset[str]:
        """The controller's liveness verdict: `actors` (those in `table`) stopped answering and are masked now;
        `recovered` answer again and are un-masked. Returns the actors newly masked (a batch in flight that
        waits on one of them should be dropped and retried)."""
        named = frozenset(a for a in actors if a in table.actors)
        new = named - self.suspects
        self.suspects = (self.suspects - frozenset(recovered)) | named
        return new

    def install(self, table: PlacementTable, healed: bool) -> None:
        """A new table is in use: a healed one (the controller re-checked every actor) clears the mask; any
        other keeps the suspects it still names."""
        self.suspects = frozenset() if healed else frozenset(a for a in self.suspects if a in table.actors)


@dataclass
class InProcessStats:
    """TransportStats-shaped stats of the in-process transport."""

    bytes_out: list[int] = field(default_factory=list)
    compute_ms: dict[int, float] = field(default_factory=dict)

    @property
    def max_compute_ms(self) -> float:
        return max(self.compute_ms.values(), default=0.0)


class InProcessTransport(Transport):
    """Computes every bucket in this process from full expert weights per layer (tests, simulation)."""

    name = "in_process"
    every_member = False

    def __init__(self, experts: list[ExpertWeights]) -> None:
        self.experts = experts

    async def exchange(self, batch: PreparedBatch) -> tuple[torch.Tensor, InProcessStats]:
        out = torch.empty_like(batch.rows)
        weights = self.experts[batch.layer]
        for b in batch.buckets:
            start = b.row_start
            for e, n in zip(b.experts, b.counts):
                swiglu(batch.rows[start:start + n], weights.gate_up[e], weights.down[e], out=out[start:start + n])
                start += n
        per_row = batch.rows.shape[1] * batch.rows.element_size()
        return out, InProcessStats([b.num_rows * per_row for b in batch.buckets], {})

    async def close(self) -> None:
        return None
