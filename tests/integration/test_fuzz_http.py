"""Fuzz the Serve app over loopback HTTP: no 5xx, no hang.

1. schemathesis (4.x) generates requests for every operation in the app's OpenAPI schema, positive and
   negative data, bounded at 30 examples per operation and mode.
2. The forward operation reads its body itself (JSON or msgpack), so the schema does not describe it:
   Hypothesis generates the bodies — arbitrary bytes, arbitrary JSON / msgpack documents and near-valid wire
   tensors — under both content types.
Every request has a 10 s timeout; a timeout fails the test (a hang), as does any status >= 500.
"""

from __future__ import annotations

import json

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from expertray.api import launch, random_model
from expertray.client import post
from expertray.config import ClusterConfig, GateConfig, MoELayerConfig
from expertray.wire.http_codec import WIRE_DTYPES

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is not installed (pip install '.[dev]')")

pytestmark = pytest.mark.ray
D = 16
TIMEOUT_S = 10.0
FUZZ = settings(max_examples=30, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def base_url(ray_session, serve_port):
    from ray import serve

    from expertray.serve.layers import run_app

    cfg = ClusterConfig(layer=MoELayerConfig(d_model=D, d_ff=32, gate=GateConfig("mixtral", 4, 2)), num_layers=2,
                        num_expert_actors=2, actor_num_cpus=0.25, router_num_cpus=0.25, max_request_tokens=128,
                        metrics_port=-1)
    cluster = launch(cfg, random_model(cfg), detached=False)
    yield run_app(serve_port, name="expertray-fuzz", quiet=True)
    serve.delete("expertray-fuzz")
    cluster.shutdown()


@pytest.mark.parametrize("mode", list(schemathesis.GenerationMode), ids=lambda m: m.value)
def test_schema_operations_never_5xx(base_url, mode) -> None:
    # Strategies per operation with plain Hypothesis: schemathesis' lazy pytest loader
    # (schemathesis.pytest.from_fixture) breaks on pytest 9.2 (it sets Function._nodeid, which pytest removed).
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/layers/{layer}/forward", "/healthz", "/v1/experts"}
    calls = []
    for operation in operations:
        if mode is schemathesis.GenerationMode.NEGATIVE and not list(operation.iter_parameters()):
            continue  # nothing to make invalid

        @FUZZ
        @given(case=operation.as_strategy(generation_mode=mode))
        def check(case) -> None:
            response = case.call(base_url=base_url, timeout=TIMEOUT_S)
            calls.append(response.status_code)
            assert response.status_code < 500, (f"{case.method} {case.formatted_path}: {response.status_code} "
                                                f"{response.text[:300]}")

        check()
    assert len(calls) >= 30, calls


# --- forward bodies --------------------------------------------------------------------------------
_scalars = st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() | st.text(max_size=8)


def _documents(leaves: st.SearchStrategy) -> st.SearchStrategy:
    return st.recursive(leaves, lambda inner: st.lists(inner, max_size=4) |
                        st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=12)


_wire_tensors = st.fixed_dictionaries({
    "dtype": st.sampled_from(sorted(WIRE_DTYPES)) | st.text(max_size=8),
    "shape": st.lists(st.integers(-2, 2**64 - 1), max_size=3) | st.sampled_from([[1, D], [3, D], [0, D], [129, D]]),
    "data": st.binary(max_size=4 * 3 * D)})
_json_bodies = st.one_of(
    _documents(_scalars).map(lambda d: json.dumps(d).encode()),
    st.lists(st.lists(st.floats(width=32) | st.integers(-3, 3), min_size=D - 1, max_size=D + 1), max_size=5)
    .map(lambda rows: json.dumps({"hidden": rows}).encode()),
    st.binary(max_size=64))
_msgpack_bodies = st.one_of(
    _documents(_scalars | st.binary(max_size=16)).map(lambda d: msgpack.packb(d, use_bin_type=True)),
    _wire_tensors.map(lambda t: msgpack.packb({"hidden": t}, use_bin_type=True)),
    st.binary(max_size=64))


@FUZZ
@given(layer=st.integers(-1, 2), content=st.one_of(_json_bodies.map(lambda b: ("application/json", b)),
                                                   _msgpack_bodies.map(lambda b: ("application/msgpack", b))))
def test_forward_bodies_never_5xx(base_url, layer: int, content: tuple[str, bytes]) -> None:
    content_type, body = content
    status, payload, _ = post(f"{base_url}/v1/layers/{layer}/forward", body, content_type, TIMEOUT_S)
    assert status < 500, f"{status} {payload[:300]!r} for {content_type} body {body[:200]!r}"
    if status >= 400:
        assert json.loads(payload)["error"], payload
