"""The names expertray's Ray actors are registered and found under, defined once.

Every expert actor and router has a short id ("expert-3", "router-0") and is registered in Ray as
"expertray-<id>" in the NAMESPACE namespace; the controller is CONTROLLER there. Ray-free on purpose: the
API, the controller, the Serve app, the CLI and tests import it, and importing it starts nothing.
"""

from __future__ import annotations

NAMESPACE = "expertray"
CONTROLLER = "controller"


def expert_actor_id(index: int) -> str:
    """The placement-table id of the `index`-th expert actor the controller starts: "expert-<index>"."""
    return f"expert-{index}"


def router_id(index: int) -> str:
    """The id of router `index`: "router-<index>"."""
    return f"router-{index}"


def ray_name(actor_id: str) -> str:
    """The Ray actor name of an expert actor or router with id `actor_id`: "expertray-<actor_id>"."""
    return f"expertray-{actor_id}"
