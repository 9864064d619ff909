"""The router's batching / retry / deadline state machine, driven without Ray by fake transports."""

from __future__ import annotations

import asyncio

import pytest
import torch

from expertray.config import GateConfig, MoELayerConfig
from expertray.errors import (
    BackpressureError,
    ConfigError,
    ExpertUnavailableError,
    RequestTimeoutError,
    TransportError,
)
from expertray.layer.reference import MoELayer
from expertray.layer.route import InProcessTransport, LayerParams, run_layer
from expertray.policies.replica import REPLICA
from expertray.policies.routing import ROUTING
from expertray.runtime.batcher import Batcher, BatchLimits
from expertray.state.placement_table import PlacementTable

D = 16
CFG = MoELayerConfig(d_model=D, d_ff=24, gate=GateConfig("mixtral", 8, 2))


def _limits(**kw) -> BatchLimits:
    base = {"max_batch_tokens": 64, "max_wait_s": 0.002, "max_queue_tokens": 4096, "request_timeout_s": 5.0,
            "batch_timeout_s": 2.0, "heal_timeout_s": 1.0, "max_attempts": 3}
    return BatchLimits(**{**base, **kw})


def _run(coro_fn, batcher: Batcher):
    async def main():
        loop = asyncio.get_running_loop().create_task(batcher.run())
        try:
            return await coro_fn()
        finally:
            loop.cancel()
    return asyncio.run(main())


class _Model:
    """Two MoE layers and the in-process data path over a switchable placement table."""

    def __init__(self) -> None:
        self.layers = [MoELayer.random(CFG, seed=s) for s in (1, 2)]
        self.params = [LayerParams(m.gate_weights, m.shared) for m in self.layers]
        self.transport = InProcessTransport([m.experts for m in self.layers])
        self.policy = ROUTING.create("capacity")
        self.selector = REPLICA.create("round_robin")
        self.table = PlacementTable.balanced(2, 8, ["a", "b", "c"])
        self.versions_seen: list[int] = []

    async def run_batch(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        self.versions_seen.append(self.table.version)
        r = await run_layer(hidden.float(), layer, CFG, self.params[layer], self.policy.for_layer(layer),
                            self.selector, self.table, self.transport)
        return r.output


def test_prepare_expert_compute_finish_equals_moe_layer_forward() -> None:
    model = _Model()
    batcher = Batcher(2, _limits(), model.run_batch)
    xs = [torch.randn(3 + i, D, generator=torch.Generator().manual_seed(i)) for i in range(12)]

    async def go():
        return await asyncio.gather(*[batcher.submit(i % 2, x) for i, x in enumerate(xs)])

    outs = _run(go, batcher)
    for i, (x, out) in enumerate(zip(xs, outs)):
        torch.testing.assert_close(out, model.layers[i % 2](x), atol=1e-5, rtol=0)


def test_transport_failing_n_times_is_retried_then_answers_exactly() -> None:
    model = _Model()
    fails = {"left": 2}
    heals: list[str] = []

    async def flaky(layer: int, hidden: torch.Tensor) -> torch.Tensor:
        if fails["left"]:
            fails["left"] -= 1
            raise TransportError("peer died")
        return await model.run_batch(layer, hidden)

    async def heal(exc: BaseException) -> None:
        heals.append(str(exc))

    batcher = Batcher(2, _limits(), flaky, heal)
    x = torch.randn(5, D)
    out = _run(lambda: batcher.submit(0, x), batcher)
    torch.testing.assert_close(out, model.layers[0](x), atol=1e-5, rtol=0)
    assert batcher.counters.retries == 2 and heals == ["peer died", "peer died"]


def test_out_of_attempts_fails_clearly_and_the_loop_keeps_serving() -> None:
    """After the last retry the queues are empty; the loop must not die on them."""
    model = _Model()
    broken = {"on": True}

    async def maybe_broken(layer: int, hidden: torch.Tensor) -> torch.Tensor:
        if broken["on"]:
            raise TransportError("actor slow past the collective timeout")
        return await model.run_batch(layer, hidden)

    async def heal(exc: BaseException) -> None:
        return None

    batcher = Batcher(2, _limits(max_attempts=3), maybe_broken, heal)
    x = torch.randn(4, D)

    async def go():
        with pytest.raises(ExpertUnavailableError, match="failed 3 times"):
            await batcher.submit(1, x)
        assert not any(batcher.queues) and batcher.queued_tokens == 0
        await asyncio.sleep(0.05)  # the heal task resumes dispatch with nothing queued
        broken["on"] = False
        return await asyncio.wait_for(batcher.submit(1, x), 2.0)

    out = _run(go, batcher)
    torch.testing.assert_close(out, model.layers[1](x), atol=1e-5, rtol=0)
    assert batcher.counters.loop_errors == 0


def test_request_deadline_expires_with_a_clear_error_and_is_withdrawn() -> None:
    async def hang(layer: int, hidden: torch.Tensor) -> torch.Tensor:
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    batcher = Batcher(1, _limits(request_timeout_s=0.2, batch_timeout_s=30.0), hang)

    async def go():
        with pytest.raises(RequestTimeoutError, match="request_timeout_s=0.2"):
            await batcher.submit(0, torch.randn(2, D))
        with pytest.raises(RequestTimeoutError):  # queued behind the hung batch: withdrawn from the queue
            await batcher.submit(0, torch.randn(3, D))
        return batcher.queued_tokens

    assert _run(go, batcher) == 0
    assert batcher.counters.timeouts == 2


def test_hung_batch_is_cut_at_batch_timeout_and_retried_after_heal() -> None:
    model = _Model()
    hung = {"on": True}

    async def hangs_once(layer: int, hidden: torch.Tensor) -> torch.Tensor:
        if hung["on"]:
            await asyncio.sleep(3600)
        return await model.run_batch(layer, hidden)

    async def heal(exc: BaseException) -> None:  # the controller kills the hung actor and replaces it
        assert "no answer within" in str(exc)
        hung["on"] = False

    batcher = Batcher(2, _limits(batch_timeout_s=0.1), hangs_once, heal)
    x = torch.randn(6, D)
    torch.testing.assert_close(_run(lambda: batcher.submit(0, x), batcher), model.layers[0](x), atol=1e-5, rtol=0)


def test_heal_that_never_returns_is_bounded() -> None:
    model = _Model()
    failed = {"n": 0}

    async def fails_once(layer: int, hidden: torch.Tensor) -> torch.Tensor:
        if not failed["n"]:
            failed["n"] += 1
            raise TransportError("broken group")
        return await model.run_batch(layer, hidden)

    async def heal_hangs(exc: BaseException) -> None:  # controller gone or stuck
        await asyncio.sleep(3600)

    batcher = Batcher(2, _limits(heal_timeout_s=0.1), fails_once, heal_hangs)
    x = torch.randn(3, D)
    torch.testing.assert_close(_run(lambda: batcher.submit(1, x), batcher), model.layers[1](x), atol=1e-5, rtol=0)


def test_other_errors_fail_the_batch_without_retry() -> None:
    async def bad(layer: int, hidden: torch.Tensor) -> torch.Tensor:
        raise ValueError("bad rows")

    batcher = Batcher(1, _limits(), bad)

    async def go():
        with pytest.raises(ValueError, match="bad rows"):
            await batcher.submit(0, torch.randn(2, D))

    _run(go, batcher)
    assert batcher.counters.errors == 1 and batcher.counters.retries == 0


def test_table_switch_during_a_stream_lands_between_batches() -> None:
    model = _Model()
    batcher = Batcher(2, _limits(max_batch_tokens=8), model.run_batch)
    xs = [torch.randn(4, D, generator=torch.Generator().manual_seed(100 + i)) for i in range(40)]

    async def switch():
        for _ in range(5000):  # after the first batch ran, whatever the machine's speed (bounded: ~5 s)
            if model.versions_seen:
                break
            await asyncio.sleep(0.001)
        async with batcher.lane:  # what RouterActor.set_table does
            model.table = model.table.replicate(0, 3, "a").replicate(1, 5, "c").bump(7)

    async def go():
        async def stream():
            outs = []
            for i, x in enumerate(xs):
                outs.append(asyncio.ensure_future(batcher.submit(i % 2, x)))
                await asyncio.sleep(0.001)
            return await asyncio.gather(*outs)
        outs, _ = await asyncio.gather(stream(), switch())
        return outs

    outs = _run(go, batcher)
    for i, (x, out) in enumerate(zip(xs, outs)):
        torch.testing.assert_close(out, model.layers[i % 2](x), atol=1e-5, rtol=0)
    assert model.versions_seen[0] == 0 and model.versions_seen[-1] == 7
    assert model.versions_seen == sorted(model.versions_seen)


def test_backpressure_is_counted_as_rejected() -> None:
    batcher = Batcher(1, _limits(max_queue_tokens=4, max_batch_tokens=4), lambda layer, h: None)
    with pytest.raises(BackpressureError, match="queue is full"):
        batcher.check_room(5)
    assert batcher.counters.rejected == 1


@pytest.mark.parametrize("field,value", [("max_batch_tokens", 0), ("request_timeout_s", float("nan")),
                                         ("batch_timeout_s", 0.0), ("max_wait_s", -1.0)])
def test_limits_are_validated(field: str, value) -> None:
    with pytest.raises(ConfigError, match=f"batcher.{field}"):
        _limits(**{field: value})
