"""The Serve app over real HTTP on 127.0.0.1: JSON and msgpack forwards, errors, backpressure, schema."""

from __future__ import annotations

import concurrent.futures as cf
import json
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

from expertray.api import launch, random_model
from expertray.client import forward, free_port, post
from expertray.config import ClusterConfig, GateConfig, MoELayerConfig
from expertray.errors import ConfigError
from expertray.wire.http_codec import decode_tensor, encode_tensor, pack, unpack

pytestmark = pytest.mark.ray
D = 32


@pytest.fixture(scope="module")
def served(ray_session, serve_port):
    from ray import serve

    from expertray.serve.layers import run_app

    cfg = ClusterConfig(layer=MoELayerConfig(d_model=D, d_ff=48, gate=GateConfig("mixtral", 6, 2)),
                        num_layers=2, num_expert_actors=2, actor_num_cpus=0.25, max_request_tokens=256)
    layers = random_model(cfg)
    cluster = launch(cfg, layers, detached=False)
    yield run_app(serve_port, max_inflight_tokens=96), layers
    serve.delete("expertray")
    cluster.shutdown()


def test_json_and_msgpack_forward_match_in_process(served) -> None:
    base, layers = served
    x = np.random.default_rng(0).standard_normal((7, D)).astype(np.float32)
    ref = layers[1](torch.from_numpy(x)).numpy()
    status, body, _ = post(f"{base}/v1/layers/1/forward", json.dumps({"hidden": x.tolist()}).encode(),
                            "application/json")
    assert status == 200
    np.testing.assert_allclose(np.array(json.loads(body)["output"], dtype=np.float32), ref, atol=1e-5, rtol=0)
    status, body, headers = post(f"{base}/v1/layers/1/forward", pack({"hidden": encode_tensor(x)}),
                                  "application/msgpack")
    assert status == 200 and headers["content-type"] == "application/msgpack"
    np.testing.assert_allclose(decode_tensor(unpack(body)["output"]), ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(forward(base, 1, x), ref, atol=1e-5, rtol=0)  # the client helper


@pytest.mark.parametrize("path,body,ctype,code,needle", [
    ("/v1/layers/0/forward", b"{not json", "application/json", 400, "malformed JSON"),
    ("/v1/layers/0/forward", b"\xc1", "application/msgpack", 400, "malformed msgpack"),
    ("/v1/layers/0/forward", pack({"hidden": {"dtype": "int8", "shape": [1, D], "data": b"x" * D}}),
     "application/msgpack", 400, "dtype"),
    ("/v1/layers/0/forward", pack({"hidden": {"dtype": "float32", "shape": [2, D], "data": b"\0" * 8}}),
     "application/msgpack", 400, "do not match shape"),
    ("/v1/layers/0/forward", json.dumps({"hidden": [[1.0] * (D - 1)]}).encode(), "application/json", 400,
     "d_model=32"),
    ("/v1/layers/0/forward", json.dumps({"hidden": []}).encode(), "application/json", 400, "non-empty"),
    ("/v1/layers/0/forward", json.dumps({"hidden": [[float("nan")] * D]}).encode().replace(b"NaN", b"NaN"),
     "application/json", 400, "NaN or inf"),
    ("/v1/layers/0/forward", json.dumps({"hidden": [["a"] * D]}).encode(), "application/json", 400, "numbers"),
    ("/v1/layers/5/forward", json.dumps({"hidden": [[0.0] * D]}).encode(), "application/json", 404,
     "unknown layer 5"),
    ("/v1/layers/0/forward", pack({"hidden": encode_tensor(np.zeros((300, D), np.float32))}),
     "application/msgpack", 413, "over the limit of 256"),
])
def test_bad_requests_get_clear_4xx(served, path: str, body: bytes, ctype: str, code: int, needle: str) -> None:
    base, _ = served
    status, payload, _ = post(base + path, body, ctype)
    assert status == code, payload
    assert needle in json.loads(payload)["error"]


def test_backpressure_answers_503_with_retry_after_and_nothing_else_fails(served) -> None:
    base, layers = served
    x = np.random.default_rng(1).standard_normal((40, D)).astype(np.float32)
    ref = layers[0](torch.from_numpy(x)).numpy()
    body = pack({"hidden": encode_tensor(x)})
    with cf.ThreadPoolExecutor(12) as pool:
        results = list(pool.map(lambda _: post(f"{base}/v1/layers/0/forward", body, "application/msgpack"),
                                range(24)))
    codes = [r[0] for r in results]
    assert set(codes) <= {200, 503}, codes
    assert 200 in codes
    for status, payload, headers in results:
        if status == 503:
            assert headers.get("retry-after") == "1" or headers.get("Retry-After") == "1"
        else:
            np.testing.assert_allclose(decode_tensor(unpack(payload)["output"]), ref, atol=1e-5, rtol=0)


def test_inspection_endpoints_and_openapi(served) -> None:
    base, _ = served
    with urllib.request.urlopen(f"{base}/healthz") as r:
        health = json.load(r)
    assert health["status"] == "ok"
    assert health["weights"] == "as loaded by the running expertray cluster"  # it did not launch random ones
    assert set(health["ingress"]) == {"replica", "rejected"}
    with urllib.request.urlopen(f"{base}/v1/experts") as r:
        experts = json.load(r)
    assert len(experts) == 12 and all(e["actors"] for e in experts)
    with urllib.request.urlopen(f"{base}/v1/placement") as r:
        assert json.load(r)["num_experts"] == 6
    with urllib.request.urlopen(f"{base}/openapi.json") as r:
        assert "/v1/layers/{layer}/forward" in json.load(r)["paths"]


def test_n_d_json_and_msgpack_keep_their_shape(served) -> None:
    base, layers = served
    x = np.random.default_rng(2).standard_normal((2, 3, D)).astype(np.float32)
    ref = layers[0](torch.from_numpy(x.reshape(6, D))).numpy().reshape(2, 3, D)
    status, body, _ = post(f"{base}/v1/layers/0/forward", json.dumps({"hidden": x.tolist()}).encode(),
                           "application/json")
    assert status == 200
    np.testing.assert_allclose(np.array(json.loads(body)["output"], dtype=np.float32), ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(forward(base, 0, x), ref, atol=1e-5, rtol=0)


def test_overload_503s_are_counted_by_the_ingress(served) -> None:
    base, _ = served
    with urllib.request.urlopen(f"{base}/healthz") as r:
        before = json.load(r)["ingress"]["rejected"].get("503", 0)
    body = pack({"hidden": encode_tensor(np.zeros((90, D), np.float32))})  # 90 of the 96 in-flight tokens
    with cf.ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda _: post(f"{base}/v1/layers/0/forward", body, "application/msgpack")[0],
                              range(16)))
    with urllib.request.urlopen(f"{base}/healthz") as r:
        after = json.load(r)["ingress"]["rejected"].get("503", 0)
    assert 503 in codes and after - before == codes.count(503), codes


def test_run_app_on_another_port_while_serve_runs_is_a_clear_error(served) -> None:
    from expertray.serve.layers import run_app

    with pytest.raises(ConfigError, match="already running with its HTTP proxy elsewhere"):
        run_app(free_port(), name="expertray-elsewhere", quiet=True)
