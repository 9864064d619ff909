"""Call an expertray cluster over HTTP: msgpack for real batch sizes, JSON for small ones, and a 4xx error.

Connects to the expertray cluster running in the Ray cluster at --address (or launches a small one with
random weights), starts the Serve app on 127.0.0.1 at a free port, then sends requests and checks every
answer against the in-process layer. When it connects to a running cluster, the check assumes that cluster
serves `random_model(cfg)` weights (what `expertray up` and `expertray.launch(cfg)` do). This script starts
and stops Ray Serve itself: do not point it at a Ray cluster whose Serve apps you need.

    python examples/http_client.py [--tokens 1024 --d-model 256 --repeats 10] [--address 127.0.0.1:PORT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import urllib.error
import urllib.request
from typing import Any

import numpy as np
import torch

from expertray.api import connect, init_ray, launch, random_model
from expertray.client import free_port, post
from expertray.config import ClusterConfig, GateConfig, MoELayerConfig
from expertray.errors import ConfigError
from expertray.wire.http_codec import decode_tensor, encode_tensor, pack, unpack

APP = "expertray-http-example"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--address", default=None, help="Ray cluster HOST:PORT to join, e.g. the one `expertray up` printed (default: start a Ray of its own)")
    p.add_argument("--tokens", type=int, default=1024, help="tokens per msgpack request")
    p.add_argument("--repeats", type=int, default=10, help="msgpack requests to time")
    p.add_argument("--json-tokens", type=int, default=8, help="tokens in the JSON request")
    p.add_argument("--d-model", type=int, default=256, help="d_model when this script launches the cluster")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--actors", type=int, default=4)
    p.add_argument("--num-cpus", type=int, default=8, help="logical CPUs if this script starts Ray")
    p.add_argument("--tolerance", type=float, default=1e-4)
    p.add_argument("--port", type=int, default=None, help="loopback port for Serve's HTTP proxy (default: a free one)")
    return p.parse_args(argv)


def _cluster(args: argparse.Namespace) -> tuple[Any, list, bool]:
    """(cluster, in-process reference layers, launched here?)."""
    init_ray(args.address, args.num_cpus if args.address is None else None)
    try:
        cluster = connect(args.address)
        return cluster, random_model(cluster.cfg), False
    except ConfigError:
        cfg = ClusterConfig(layer=MoELayerConfig(d_model=args.d_model, d_ff=2 * args.d_model,
                                                 gate=GateConfig("mixtral", args.experts, 2)),
                            num_layers=2, num_expert_actors=args.actors, actor_num_cpus=0.25,
                            router_num_cpus=0.25, metrics_port=-1)
        layers = random_model(cfg)
        return launch(cfg, layers, detached=False), layers, True


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from ray import serve

    from expertray.serve.layers import run_app

    args = parse_args(argv)
    cluster, layers, launched = _cluster(args)
    d_model = cluster.cfg.layer.d_model
    try:
        base = run_app(args.port or free_port(), name=APP, quiet=True)
        with urllib.request.urlopen(f"{base}/healthz", timeout=30) as r:
            print(f"{base}/healthz -> {json.load(r)}")
        summary = _exercise(base, layers, d_model, args)
    finally:
        serve.shutdown()
        if launched:
            cluster.shutdown()
    return summary


def _exercise(base: str, layers: list, d_model: int, args: argparse.Namespace) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    url = f"{base}/v1/layers/0/forward"

    # msgpack: raw little-endian tensor bytes, for real batch sizes
    x = rng.standard_normal((args.tokens, d_model)).astype(np.float32)
    ref = layers[0](torch.from_numpy(x)).numpy()
    body = pack({"hidden": encode_tensor(x)})
    latencies_ms, msgpack_diff = [], 0.0
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        status, payload, _ = post(url, body, "application/msgpack")
        latencies_ms.append((time.perf_counter() - t0) * 1e3)
        if status != 200:
            raise RuntimeError(f"msgpack request failed: {status} {payload[:200]!r}")
        msgpack_diff = max(msgpack_diff, float(np.abs(decode_tensor(unpack(payload)["output"]) - ref).max()))
    p50 = statistics.median(latencies_ms)
    print(f"msgpack: {args.repeats} x [{args.tokens}, {d_model}] float32 ({len(body) / 2**20:.2f} MiB each): "
          f"p50 {p50:.1f} ms, mean {statistics.fmean(latencies_ms):.1f} ms, "
          f"{args.tokens / p50 * 1e3:,.0f} tokens/s at p50; max abs diff vs in-process {msgpack_diff:.1e}")

    # JSON: convenient for small inputs (the server caps JSON requests; use msgpack beyond that)
    xj = rng.standard_normal((args.json_tokens, d_model)).astype(np.float32)
    t0 = time.perf_counter()
    status, payload, _ = post(f"{base}/v1/layers/1/forward", json.dumps({"hidden": xj.tolist()}).encode(),
                           "application/json")
    json_ms = (time.perf_counter() - t0) * 1e3
    if status != 200:
        raise RuntimeError(f"JSON request failed: {status} {payload[:200]!r}")
    out = np.asarray(json.loads(payload)["output"], dtype=np.float32)
    json_diff = float(np.abs(out - layers[1](torch.from_numpy(xj)).numpy()).max())
    print(f"JSON: [{args.json_tokens}, {d_model}] in {json_ms:.1f} ms; max abs diff vs in-process {json_diff:.1e}")

    # a client error: the wrong hidden size is refused with a 4xx naming the problem
    bad = pack({"hidden": encode_tensor(np.zeros((4, d_model + 1), np.float32))})
    error_status, error_payload, _ = post(url, bad, "application/msgpack")
    error_message = json.loads(error_payload)["error"]
    print(f"wrong d_model -> HTTP {error_status}: {error_message}")

    worst = max(msgpack_diff, json_diff)
    if worst > args.tolerance or not 400 <= error_status < 500:
        raise SystemExit(f"unexpected results: max abs diff {worst}, error status {error_status}")
    return {"msgpack_requests": args.repeats, "msgpack_p50_ms": p50, "msgpack_max_abs_diff": msgpack_diff,
            "json_ms": json_ms, "json_max_abs_diff": json_diff, "error_status": error_status,
            "error_message": error_message}


if __name__ == "__main__":
    main()
