"""The actors a router avoids until the controller installs a healed table, Ray-free.

A transport failure names the actors that died or hung (`failed_actors`), or the controller's liveness pings
push the actors that stopped answering (expertray/runtime/liveness.py); until a healed table arrives, replica
selection avoids them wherever an expert has another replica (PlacementTable.masked_route), so requests flow on
the survivors without waiting for the heal.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from expertray.errors import TransportError
from expertray.state.placement_table import PlacementTable


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
