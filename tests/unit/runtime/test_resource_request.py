"""The standing autoscaler request: sent with one bundle per actor that keeps its place plus one, withdrawn
once the table shows it met or moot, and never raised when the autoscaler cannot be reached."""

from __future__ import annotations

from expertray.runtime.resource_request import ResourceRequests, resource_request_settled

DEMAND = {"CPU": 0.1, "expert_slot": 1.0}


class Autoscaler:
    def __init__(self) -> None:
        self.sent: list[list[dict]] = []
        self.fail = False

    def __call__(self, bundles: list[dict]) -> None:
        if self.fail:
            raise ConnectionError("no GCS")
        self.sent.append(bundles)


def test_ask_sends_one_bundle_per_kept_actor_plus_one_and_records_it() -> None:
    autoscaler = Autoscaler()
    requests = ResourceRequests(autoscaler, clock=lambda: 7.0)
    assert requests.ask(DEMAND, keeping=2, why="no room", actors=("expert-0", "expert-1")) == [DEMAND] * 3
    assert autoscaler.sent == [[DEMAND] * 3]
    assert requests.last == {"bundles": 3, "bundle": DEMAND, "why": "no room", "t": 7.0}
    assert requests.asked_with == {"expert-0", "expert-1"}


def test_a_request_is_withdrawn_once_when_an_actor_joined_and_not_before() -> None:
    autoscaler = Autoscaler()
    clock = iter([1.0, 2.0])
    requests = ResourceRequests(autoscaler, clock=lambda: next(clock))
    requests.ask(DEMAND, 2, "grow", ("expert-0", "expert-1"))
    requests.settle(("expert-0", "expert-1"))  # nothing changed: the request stands
    assert len(autoscaler.sent) == 1 and "withdrawn" not in requests.last
    requests.settle(("expert-0", "expert-1", "expert-2"))
    assert autoscaler.sent[-1] == [] and requests.last["withdrawn"] == 2.0
    requests.settle(("expert-0", "expert-1", "expert-2", "expert-3"))  # already withdrawn: not sent again
    assert len(autoscaler.sent) == 2


def test_a_request_made_moot_by_a_shrinking_table_is_withdrawn() -> None:
    autoscaler = Autoscaler()
    requests = ResourceRequests(autoscaler, clock=lambda: 1.0)
    requests.ask(DEMAND, 2, "grow", ("expert-0", "expert-1"))
    requests.settle(("expert-0",))
    assert autoscaler.sent[-1] == [] and "withdrawn" in requests.last


def test_failures_are_logged_not_raised_and_leave_the_state_as_it_was(caplog) -> None:
    autoscaler = Autoscaler()
    requests = ResourceRequests(autoscaler, clock=lambda: 1.0)
    autoscaler.fail = True
    assert requests.ask(DEMAND, 0, "grow", ()) == []
    assert requests.last is None and "request_resources (1 bundles of" in caplog.text
    autoscaler.fail = False
    requests.ask(DEMAND, 0, "grow", ("expert-0",))
    autoscaler.fail = True
    requests.settle(("expert-0", "expert-1"))
    assert "withdrawn" not in requests.last and "withdrawing request_resources failed: no GCS" in caplog.text
    autoscaler.fail = False
    requests.settle(("expert-0", "expert-1"))  # still standing: withdrawn on the next change
    assert "withdrawn" in requests.last


def test_a_resource_request_is_withdrawn_once_met_or_moot() -> None:
    asked_with = frozenset({"expert-0", "expert-1"})
    assert not resource_request_settled(asked_with, ("expert-0", "expert-1"))  # still waiting for the room
    assert not resource_request_settled(asked_with, ("expert-1", "expert-0"))
    assert resource_request_settled(asked_with, ("expert-0", "expert-1", "expert-2"))  # the new actor started
    assert resource_request_settled(asked_with, ("expert-0", "expert-2"))  # a heal's replacement used the room
    assert resource_request_settled(asked_with, ("expert-0",))  # the table shrank: nobody grows it now
    assert resource_request_settled(frozenset(), ("expert-0",))  # asked at start-up, before any table
