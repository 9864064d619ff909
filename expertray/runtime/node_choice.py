"""Which node the next expert actor goes to, Ray-free: where the controller's actors run, and which nodes to
avoid for a while.

Ray lists a killed node as alive for ~15 s (until its health checks fail), with its resources free, so a
choice that trusted Ray's node list alone would start a replacement exactly where the old actor just died.
Two memories steer it away:
- suspect nodes: an actor there failed a ping; avoided for SUSPECT_NODE_S while another node has room;
- silent nodes: an actor there missed its latest liveness ping (most likely a node just lost); used only when
  no other node has room at all, not even a suspect one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any

from expertray.config import ClusterConfig
from expertray.errors import ConfigError, ExpertRayError
from expertray.runtime.liveness import Reply
from expertray.state.placement_table import PlacementTable
from expertray.state.ray_nodes import NodeInfo, choose_node

log = logging.getLogger(__name__)

SUSPECT_NODE_S = 60.0  # a node where an actor stopped answering gets no new actor for this long (if others can)


def actor_demand(cfg: ClusterConfig) -> dict[str, float]:
    """Resources one expert actor asks for: its CPU/GPU shares and `actor_resources` (e.g. expert_slot)."""
    return {k: v for k, v in {"CPU": cfg.actor_num_cpus, "GPU": cfg.actor_num_gpus, **cfg.actor_resources}.items()
            if v > 0}


class ActorNodes:
    """Expert actor -> node id, and the suspect and silent nodes; one instance per controller."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.of: dict[str, str | None] = {}  # actor -> node id (chosen, then observed; None: left to Ray)
        self.suspect: dict[str, float] = {}  # node id -> when an actor there stopped answering
        self.silent: dict[str, float] = {}  # node id -> when an actor there last missed a liveness ping
        self.clock = clock

    def ping_result(self, actor: str, failed: bool) -> None:
        """An actor's ping failed (its node may be gone) or succeeded (its node works)."""
        node = self.of.get(actor)
        if node is not None and failed:
            self.suspect.setdefault(node, self.clock())
        elif node is not None:
            self.suspect.pop(node, None)

    def liveness_replies(self, replies: Mapping[str, Reply], sent_at: float, held: Collection[str]) -> None:
        """One liveness round's replies. A silent actor marks its node suspect and silent (a lost node looks
        like this); one that answers clears both. One Ray reports dead while the controller still holds it
        (`held`: killed or crashed, its node answered for it) clears suspicion; one the heal already killed
        tells nothing about its node. Silent actors go last, so a node with one silent actor stays suspect."""
        for a in sorted(replies, key=lambda a: replies[a] is Reply.SILENT):
            reply = replies[a]
            if reply is Reply.SILENT or reply is Reply.ANSWERED or a in held:
                self.ping_result(a, reply is Reply.SILENT)
            node = self.of.get(a)
            if node is not None and reply is Reply.SILENT:
                self.silent[node] = sent_at
            elif node is not None and reply is Reply.ANSWERED:
                self.silent.pop(node, None)

    def observed(self, where: Mapping[str, Mapping[str, str] | None], actors: Iterable[str]) -> None:
        """Record where Ray actually placed `actors` ({"node_id": ...}, None: not placed yet)."""
        for a in actors:
            if where.get(a) is not None:
                self.of[a] = where[a]["node_id"]

    def choose(self, demand: Mapping[str, float], list_nodes: Callable[[], list[NodeInfo]],
               running: Iterable[str]) -> str | None:
        """The node for the next expert actor asking for `demand`, given the `running` actors: most room, fewest
        of our actors, avoiding suspect nodes while another has room and silent nodes unless nothing else has
        room (see the module docstring). None: no node has room (Ray queues the actor until one joins), or
        no node list (Ray places it)."""
        now = self.clock()
        self.suspect = {n: t for n, t in self.suspect.items() if now - t < SUSPECT_NODE_S}
        self.silent = {n: t for n, t in self.silent.items() if now - t < SUSPECT_NODE_S}
        used: dict[str, dict[str, float]] = {}
        actors_on: dict[str, int] = {}
        for a in running:
            node = self.of.get(a)
            if node is not None:
                actors_on[node] = actors_on.get(node, 0) + 1
                for k, v in demand.items():
                    used.setdefault(node, {})[k] = used.get(node, {}).get(k, 0.0) + v
        try:
            nodes = list_nodes()
            quiet = [n for n in nodes if n.node_id not in self.silent]
            choice = (choose_node(quiet, used, demand, actors_on, set(self.suspect))
                      or choose_node(nodes, used, demand, actors_on, set(self.suspect)))
        except ExpertRayError as exc:  # no node list: let Ray place it
            log.warning("expert actor placement: %s; leaving the node to Ray", exc)
            return None
        return None if choice is None else choice.node_id

    def keeping(self, running: Iterable[str]) -> int:
        """How many `running` actors keep their place: those not on a suspect node (those on one are likely
        gone with it and need room elsewhere)."""
        return sum(self.of.get(a) not in self.suspect for a in running)

    def report(self, list_nodes: Callable[[], list[NodeInfo]], running: Iterable[str]) -> list[dict[str, Any]]:
        """The live nodes with the `running` expert actors on each (`expertray status` shows them); one
        {"error"} entry when there is no node list."""
        try:
            nodes = list_nodes()
        except ExpertRayError as exc:
            return [{"error": str(exc)}]
        where = {a: self.of.get(a) for a in running}
        return [{"node_id": n.node_id, "ip": n.ip, "head": n.is_head, "resources": dict(n.resources),
                 "labels": dict(n.labels), "actors": sorted(a for a, node in where.items() if node == n.node_id)}
                for n in nodes]

    def replica_destination(self, table: PlacementTable, layer: int, expert: int) -> str:
        """The actor a new replica of `layer:expert` goes to: one that does not hold it, preferring a node
        without a replica yet, then the fewest slots."""
        held = {s.actor for s in table.replicas(layer, expert)}
        free = [a for a in table.actors if a not in held]
        if not free:
            raise ConfigError(f"every actor already holds expert {layer}:{expert}")
        held_nodes = {self.of.get(a) for a in held}
        return min(free, key=lambda a: (self.of.get(a) in held_nodes, len(table.slots_of(a))))
