"""Every plug-in interface, declared once: RoutingPolicy, ReplicaSelector, Transport, GatingRule,
PlacementPolicy, AutoscalePolicy. Ray-free.

Each kind has a registry keyed by the config name (expertray.registry); an implementation is one class plus
its registration, and the registry is checked equal to the config's accepted names when its module imports:

    kind             registry                               config names
    routing          policies/routing ROUTING               config.ROUTING_POLICIES
    replica          policies/replica.py REPLICA            config.REPLICA_POLICIES
    placement        policies/placement PLACEMENT           config.PLACEMENT_POLICIES
    autoscale        policies/autoscale.py AUTOSCALE        config.AUTOSCALE_POLICIES
    transport        actors/transport.py TRANSPORTS         config.TRANSPORTS (less `auto`)
    gating family    layer/gating.py GATING                 config.GATING_FAMILIES
    checkpoint       models/families.py FAMILIES (one row per architecture)

T tokens, k choices per token, E logical experts of the layer, S_l destinations (physical slots) of it,
N rows of a prepared batch, D model width.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from expertray.errors import ConfigError

if TYPE_CHECKING:
    import numpy as np
    import torch

    from expertray.config import CapacityConfig, GateConfig
    from expertray.layer.capacity import CapacityResult
    from expertray.layer.gating import GateOutput, GateWeights
    from expertray.layer.route import PreparedBatch
    from expertray.state.decisions import Action, PlacementPlan, Signals
    from expertray.state.placement_table import LayerRoute, PlacementTable
    from expertray.state.topology import Topology


class RoutingPolicy(ABC):
    """Which logical experts each token uses: GateOutput → CapacityResult (experts [T, k], -1 for a drop;
    weights [T, k])."""

    @abstractmethod
    def route(self, gate: GateOutput, capacity: CapacityConfig,
              expert_load: torch.Tensor | None = None) -> CapacityResult:
        """Choose experts for gate.experts.shape[0] tokens.

        expert_load: [E] load each logical expert already carries (e.g. LoadStats.window_load); load-aware
        policies add this batch's own assignments to it as they go. None means no prior load.
        """

    def for_layer(self, layer: int) -> RoutingPolicy:
        """The policy to use at `layer` (policies with per-layer parameters override this)."""
        return self

    def for_route(self, route: LayerRoute) -> RoutingPolicy:
        """The policy to use with the live placement of one layer, `route` (the router calls this for every
        batch, after `for_layer`); a policy that prices load per device builds its expert -> device map from
        it. The default ignores the placement."""
        return self


class ReplicaSelector(ABC):
    """Which physical copy (destination) of its logical expert each assignment goes to."""

    @abstractmethod
    def select(self, experts: torch.Tensor, route: LayerRoute, dest_load: torch.Tensor | None = None,
               local_actors: set[int] | None = None) -> torch.Tensor:
        """Destinations [T, k] (indices into the route's S_l destinations) for logical experts [T, k];
        -1 (dropped) stays -1.

        dest_load: [S_l] load each destination already carries; local_actors: actor indices (into the
        table's actors) the caller would rather use, e.g. those on its own node.
        """


@dataclass
class TransportStats:
    """Bytes sent to each actor (the same number comes back), for metrics and the simulator comparison."""

    bytes_out: list[int] = field(default_factory=list)
    compute_ms: dict[int, float] = field(default_factory=dict)  # actor index -> compute time of its bucket

    @property
    def max_compute_ms(self) -> float:
        return max(self.compute_ms.values(), default=0.0)


class Transport(ABC):
    """Moves a PreparedBatch's per-actor buckets to the experts and their outputs back.

    What the router needs to know of a transport is declared here, never read off its name:
    every_member: an exchange involves every member, so it stalls while any one is missing (a collective
        group); otherwise it waits only on the actors its plan sends rows to.
    fallback: what to serve on once a member is lost (None: this transport carries on over the survivors).
    """

    name: ClassVar[str] = ""
    every_member: ClassVar[bool] = False

    async def open(self) -> None:
        """Set up whatever the transport needs before the first batch (default: nothing)."""
        return None

    @abstractmethod
    async def exchange(self, batch: PreparedBatch) -> tuple[torch.Tensor, TransportStats]:
        """Rows [N, D] of `batch` out, expert outputs [N, D] back in plan order."""

    async def close(self) -> None:
        """Release what `open` set up (default: nothing)."""
        return None

    def describe(self) -> dict[str, Any]:
        """What `expertray status` shows: the transport, its backend and why it was chosen."""
        return {"name": self.name, "backend": None, "reason": ""}

    def fallback(self, reason: str) -> Transport | None:
        """The transport to serve on, over the same actors, after members were lost or the transport failed to
        open (`reason` says which); None when this one needs no replacement."""
        return None


class GatingRule(ABC):
    """One gating family's rule: float32 logits [T, E] → GateOutput. Registered in GATING by family name."""

    @abstractmethod
    def __call__(self, logits: torch.Tensor, cfg: GateConfig, gw: GateWeights) -> GateOutput:
        """Choose cfg.top_k experts per token from logits [T, E] (float32)."""

    def random_router_extras(self, num_experts: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """The family's router parameters besides the weight, drawn for MoELayer.random (GateWeights fields,
        e.g. bias [E]); default: none."""
        return {}


class PlacementPolicy(ABC):
    """Where each logical expert's replicas live: window load [L, E] + topology → PlacementPlan."""

    @abstractmethod
    def plan(self, load: np.ndarray, topology: Topology, current: PlacementTable | None = None,
             expert_bytes: int = 0) -> PlacementPlan:
        """A table over topology.devices for load [L, E] (tokens per logical expert over the window).

        The table's version is current.version + 1, or 0 without a current table. `current` is the table
        the cluster runs now (a policy may keep its slots to move fewer weights); expert_bytes is one
        slot's weight bytes, used only to report bytes_moved. Bad inputs raise ConfigError (check_inputs).
        """


class AutoscalePolicy(ABC):
    """The controller's live signals → placement and capacity actions."""

    @abstractmethod
    def decide(self, signals: Signals, table: PlacementTable, now_s: float) -> list[Action]:
        """Actions to apply to `table`, in order, given the signals measured at time `now_s` (seconds)."""

    def export_state(self, now_s: float) -> dict[str, Any]:
        """The policy's own state as plain msgpack-able data, times relative to `now_s`; the controller keeps
        it in its snapshot and hands it back with `restore_state` after a restart (stateless: {})."""
        return {}

    def restore_state(self, state: dict[str, Any], now_s: float) -> None:
        """Take back what `export_state` returned (possibly in another process, with another clock)."""
        if state:
            raise ConfigError(f"autoscale: {type(self).__name__} keeps no state, got {sorted(state)}")
