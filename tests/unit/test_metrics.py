"""Metrics: values and labels as Prometheus parses them, top-N cardinality bound, loopback HTTP endpoint."""

from __future__ import annotations

import inspect
import socket
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from expertray.errors import ConfigError
from expertray.metrics import OTHER_EXPERT, Metrics, MetricsConfig

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(text: str | bytes) -> Samples:
    """Every sample as {(sample name, labels): value}, parsed by prometheus_client's own parser."""
    if isinstance(text, bytes):
        text = text.decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(parsed: Samples, name: str, **labels: str) -> float:
    return parsed[(name, frozenset(labels.items()))]


def expert_labels(parsed: Samples, name: str, layer: str) -> set[str]:
    return {dict(lbls)["expert"] for (n, lbls) in parsed if n == name and dict(lbls)["layer"] == layer}


def scrape(port: int) -> str:
    # No proxy: an http_proxy in the environment must not intercept a loopback scrape.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        assert resp.status == 200
        return resp.read().decode()


@pytest.fixture
def metrics() -> Iterator[Metrics]:
    m = Metrics(MetricsConfig(per_expert_top_n=2))
    yield m
    m.stop()


def test_every_observation_renders_with_its_labels(metrics: Metrics) -> None:
    metrics.observe_batch(0, [5, 1, 0, 3], [1, 0, 0, 0], balancedness=0.5, dispatch_s=0.002, combine_s=0.004)
    metrics.observe_batch(1, [2, 2], [0, 1], balancedness=1.0, dispatch_s=0.001, combine_s=0.001)
    metrics.observe_actor("actor-3", 0.0007)
    metrics.observe_actor("actor-3", 0.02)
    metrics.set_queue_depth("router-0", 42)
    metrics.set_replicas(0, [2, 1, 1, 3])
    metrics.count_action("replicate")
    metrics.count_action("replicate")
    metrics.count_action("drain")
    metrics.observe_request(0, 0.009, "ok")
    metrics.observe_request(0, 0.5, "backpressure")
    p = samples(metrics.render())

    # Layer 0: experts 0 and 3 carry the most tokens; 1 and 2 share the "other" series.
    assert value(p, "expertray_tokens_routed_total", layer="0", expert="0") == 5
    assert value(p, "expertray_tokens_routed_total", layer="0", expert="3") == 3
    assert value(p, "expertray_tokens_routed_total", layer="0", expert=OTHER_EXPERT) == 1
    assert value(p, "expertray_tokens_dropped_total", layer="0", expert="0") == 1
    assert value(p, "expertray_tokens_dropped_total", layer="0", expert=OTHER_EXPERT) == 0
    # Layer 1 has no more experts than top-N: no "other" series at all.
    assert expert_labels(p, "expertray_tokens_routed_total", "1") == {"0", "1"}
    assert value(p, "expertray_tokens_dropped_total", layer="1", expert="1") == 1

    assert value(p, "expertray_balancedness", layer="0") == 0.5
    assert value(p, "expertray_balancedness", layer="1") == 1.0
    assert value(p, "expertray_dispatch_seconds_count", layer="0") == 1
    assert value(p, "expertray_dispatch_seconds_sum", layer="0") == pytest.approx(0.002)
    assert value(p, "expertray_combine_seconds_sum", layer="0") == pytest.approx(0.004)
    assert value(p, "expertray_actor_compute_seconds_count", actor="actor-3") == 2
    assert value(p, "expertray_actor_compute_seconds_bucket", actor="actor-3", le="0.001") == 1
    assert value(p, "expertray_actor_compute_seconds_bucket", actor="actor-3", le="+Inf") == 2
    assert value(p, "expertray_queue_depth", router="router-0") == 42
    assert value(p, "expertray_replicas", layer="0", expert="0") == 2
    assert value(p, "expertray_replicas", layer="0", expert="3") == 3
    assert value(p, "expertray_replicas", layer="0", expert=OTHER_EXPERT) == 2  # experts 1 + 2
    assert value(p, "expertray_autoscale_actions_total", kind="replicate") == 2
    assert value(p, "expertray_autoscale_actions_total", kind="drain") == 1
    assert value(p, "expertray_requests_total", outcome="ok") == 1
    assert value(p, "expertray_requests_total", outcome="backpressure") == 1
    assert value(p, "expertray_request_seconds_count", layer="0") == 2


def test_a_routers_drained_observations_are_recorded(metrics: Metrics) -> None:
    metrics.observe_router("router-1", {"batches": [[0, [4, 0, 1], [0, 0, 1], 0.75, 0.001, 0.002]],
                                        "actors": [["expert-0", 0.003]], "requests": [[0, 0.01, "timeout"]],
                                        "queued_tokens": 7})
    p = samples(metrics.render())
    assert value(p, "expertray_tokens_routed_total", layer="0", expert="0") == 4
    assert value(p, "expertray_balancedness", layer="0") == 0.75
    assert value(p, "expertray_actor_compute_seconds_count", actor="expert-0") == 1
    assert value(p, "expertray_requests_total", outcome="timeout") == 1
    assert value(p, "expertray_queue_depth", router="router-1") == 7


def test_per_expert_series_are_bounded_by_top_n() -> None:
    m = Metrics(MetricsConfig(per_expert_top_n=4))
    num_experts = 64
    for step in range(20):
        counts = [1] * num_experts
        for hot in (7, 19, 33, 50):
            counts[hot] = 100 + step
        m.observe_batch(0, counts, [0] * num_experts, balancedness=0.3, dispatch_s=0.0, combine_s=0.0)
    p = samples(m.render())
    routed = expert_labels(p, "expertray_tokens_routed_total", "0")
    assert routed == {"7", "19", "33", "50", OTHER_EXPERT}
    assert expert_labels(p, "expertray_tokens_dropped_total", "0") == routed
    # Membership never changed, so the series still add up to every token routed.
    total = sum(v for (n, lbls), v in p.items() if n == "expertray_tokens_routed_total")
    assert total == 20 * 60 + 4 * sum(100 + s for s in range(20))


def test_a_new_hot_expert_takes_a_series_and_survivors_stay_monotonic(metrics: Metrics) -> None:
    zeros = [0, 0, 0, 0]
    metrics.observe_batch(0, [10, 8, 1, 0], zeros, 1.0, 0.0, 0.0)
    metrics.set_replicas(0, [2, 1, 1, 1])
    before = samples(metrics.render())
    assert expert_labels(before, "expertray_tokens_routed_total", "0") == {"0", "1", OTHER_EXPERT}

    metrics.observe_batch(0, [0, 0, 0, 30], zeros, 1.0, 0.0, 0.0)  # expert 3 overtakes expert 1
    after = samples(metrics.render())
    assert expert_labels(after, "expertray_tokens_routed_total", "0") == {"0", "3", OTHER_EXPERT}
    assert expert_labels(after, "expertray_replicas", "0") == {"0", "3", OTHER_EXPERT}
    assert value(after, "expertray_replicas", layer="0", expert=OTHER_EXPERT) == 2  # experts 1 + 2
    # The evicted series disappears instead of being folded into "other": no counter goes backwards
    # and no series jumps, so rate() stays truthful.
    for name in ("expertray_tokens_routed_total", "expertray_tokens_dropped_total"):
        for expert in ("0", OTHER_EXPERT):
            assert value(after, name, layer="0", expert=expert) >= value(before, name, layer="0", expert=expert)
    assert value(after, "expertray_tokens_routed_total", layer="0", expert="3") == 30
    assert value(after, "expertray_tokens_routed_total", layer="0", expert=OTHER_EXPERT) == 1


def test_per_expert_series_true_keeps_every_expert() -> None:
    m = Metrics(MetricsConfig(per_expert_top_n=2, per_expert_series=True))
    m.observe_batch(0, list(range(10)), [0] * 10, 0.5, 0.0, 0.0)
    p = samples(m.render())
    assert expert_labels(p, "expertray_tokens_routed_total", "0") == {str(e) for e in range(10)}


def test_instances_do_not_collide_and_stay_independent() -> None:
    a, b = Metrics(), Metrics()
    a.count_action("migrate")
    assert value(samples(a.render()), "expertray_autoscale_actions_total", kind="migrate") == 1
    assert not any(n == "expertray_autoscale_actions_total" for n, _ in samples(b.render()))


@pytest.mark.parametrize("call, match", [
    (lambda m: m.observe_batch(0, [1, 2], [0], 1.0, 0.0, 0.0), "dropped has 1 entries"),
    (lambda m: m.observe_batch(0, [1, -2], [0, 0], 1.0, 0.0, 0.0), r"expert_counts\[1\]"),
    (lambda m: m.observe_batch(0, [1, 2], [0, 0], 1.5, 0.0, 0.0), "balancedness"),
    (lambda m: m.observe_batch(0, [1, 2], [0, 0], 1.0, float("nan"), 0.0), "dispatch_s"),
    (lambda m: m.observe_actor("a", -1.0), "compute_s"),
    (lambda m: m.set_queue_depth("r", -1), "queue depth"),
    (lambda m: m.count_action(""), "kind"),
    (lambda m: m.observe_request(0, 0.1, ""), "outcome"),
])
def test_bad_observations_raise_with_the_argument_named(call, match) -> None:
    with pytest.raises(ValueError, match=match):
        call(Metrics())


def test_a_layer_keeps_its_expert_count() -> None:
    m = Metrics()
    m.observe_batch(0, [1, 2, 3], [0, 0, 0], 1.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="layer 0 has 3 experts, got 4"):
        m.set_replicas(0, [1, 1, 1, 1])


def test_config_is_validated() -> None:
    with pytest.raises(ConfigError, match="per_expert_top_n"):
        MetricsConfig(per_expert_top_n=0)


def test_serve_port_zero_binds_loopback_and_scrapes(metrics: Metrics) -> None:
    assert inspect.signature(Metrics.serve).parameters["host"].default == "127.0.0.1"
    metrics.observe_batch(0, [4, 0, 0, 0], [0, 0, 0, 0], 0.25, 0.001, 0.001)
    port = metrics.serve(0)
    assert port > 0
    assert metrics.address == ("127.0.0.1", port)
    p = samples(scrape(port))
    assert value(p, "expertray_tokens_routed_total", layer="0", expert="0") == 4
    assert value(p, "expertray_balancedness", layer="0") == 0.25

    with pytest.raises(RuntimeError, match="already serving"):
        metrics.serve(0)
    metrics.stop()
    assert metrics.address is None
    with pytest.raises(OSError):
        scrape(port)


def test_serve_is_not_reachable_on_other_interfaces(metrics: Metrics) -> None:
    port = metrics.serve(0)
    # The address this host would use to leave the machine (a UDP connect sends nothing).
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))
        except OSError:
            pytest.skip("no route off loopback")
        outward = probe.getsockname()[0]
    if outward.startswith("127."):
        pytest.skip("no non-loopback IPv4 address")
    with pytest.raises(OSError), socket.create_connection((outward, port), timeout=2):
        pass
