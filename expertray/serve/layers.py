"""Ray Serve application: HTTP front door of an expertray cluster (`serve run expertray.serve:app`).

POST /v1/layers/{layer}/forward  — JSON {"hidden": [...]} for small inputs, or application/msgpack
                                   {"hidden": {"dtype", "shape", "data"}} for real sizes; hidden states have
                                   shape [..., d_model] and the output has the same shape; the reply uses the
                                   request's format. Other content types → 415 (see expertray.wire.http_codec).
GET  /v1/experts, /v1/placement, /healthz.
Every error reply of these, FastAPI's own 404/405/422 included, is {"error": "<message>"}.
With model=PATH the same ingress serves the model over OpenAI's API (expertray.serve.openai_routes:
/v1/models, /v1/completions, /v1/chat/completions) from engine replicas (expertray.serve.engines).

The ingress connects to the running cluster's controller, or launches one from $EXPERTRAY_CONFIG / the default
config when none runs — with random weights (said in the log and in /healthz "weights") and its CPU asks
shrunk to what the Ray cluster has free, so `serve run` on a 2-core machine does not wait forever.
Backpressure: over `max_inflight_tokens` → 503 with Retry-After.

Rejections the ingress answers itself (400/404/413/415/422/503, before or instead of a router) are counted
per ingress replica: /healthz "rejected" (by status code) and the Ray metric
`expertray_ingress_rejected_total{code}` (exported with Ray's metrics; summed over replicas by Prometheus).
Requests a router refuses are counted by the router (`expertray status`, `expertray_requests_total{outcome}`).
"""

import asyncio
import dataclasses
import logging
import os
import socket
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from fastapi import Request
from fastapi.responses import JSONResponse, Response
from ray import serve

from expertray.api import to_wire
from expertray.config import ClusterConfig, load_config
from expertray.errors import (
    BackpressureError,
    ConfigError,
    ExpertUnavailableError,
    InputError,
    OversizeError,
    RequestTimeoutError,
    RouterUnavailableError,
    UnknownExpertError,
)
from expertray.serve.engines import ENGINE_MAX_REPLICAS, ENGINE_NUM_CPUS, ENGINE_TARGET_ONGOING, EngineReplica
from expertray.serve.http import api, error_reply, read_body, rejected_counts, root_cause
from expertray.serve.openai_routes import OpenAIRoutes
from expertray.serving.engine import EngineConfig
from expertray.wire.collective import from_host_array
from expertray.wire.http_codec import (
    MAX_JSON_BYTES,
    MAX_WIRE_BYTES,
    MSGPACK,
    MediaTypeError,
    decode_json_hidden,
    decode_tensor,
    encode_tensor,
    media_type,
    pack,
    unpack,
)

__all__ = ["ExpertRayIngress", "app", "build", "fit_to_cpus", "run_app"]

log = logging.getLogger(__name__)
INGRESS_NUM_CPUS = 0.25
INGRESS_MAX_REPLICAS = 4
# The ingress awaits (a router, an engine's token stream): a streaming completion holds its slot for its whole
# length, so Serve's default of 5 in flight would cap the engines' batches at 5 per ingress replica.
INGRESS_MAX_ONGOING = 256

def fit_to_cpus(cfg: ClusterConfig, free_cpus: float, reserve_cpus: float = 0.0) -> ClusterConfig:
    """`cfg` with its routers' and expert actors' CPU asks shrunk so that all of them fit in
    `free_cpus - reserve_cpus` (never raised; at least 0.01 each, Ray's fractional resources allow it)."""
    pieces = cfg.num_expert_actors + cfg.num_routers
    asked = cfg.num_expert_actors * cfg.actor_num_cpus + cfg.num_routers * cfg.router_num_cpus
    budget = free_cpus - reserve_cpus
    if asked <= budget:
        return cfg
    share = max(0.01, round(budget / pieces, 2) if budget > 0 else 0.0)
    return dataclasses.replace(cfg, actor_num_cpus=min(cfg.actor_num_cpus, share),
                               router_num_cpus=min(cfg.router_num_cpus, share))


def _decode(body: bytes, kind: str) -> np.ndarray | torch.Tensor:
    if kind == MSGPACK:
        doc = unpack(body)
        if not isinstance(doc, dict) or "hidden" not in doc:
            raise InputError("msgpack body must be a map with key 'hidden'")
        return decode_tensor(doc["hidden"])
    return decode_json_hidden(body)


@serve.deployment(name="ExpertRayIngress", ray_actor_options={"num_cpus": INGRESS_NUM_CPUS},
                  max_ongoing_requests=INGRESS_MAX_ONGOING,
                  autoscaling_config={"min_replicas": 1, "max_replicas": INGRESS_MAX_REPLICAS,
                                      "target_ongoing_requests": 32})
@serve.ingress(api)
class ExpertRayIngress(OpenAIRoutes):
    def __init__(self, max_inflight_tokens: int = 65536, model: str = "", dtype: str = "", config: str = "",
                 engine: Any = None, served_model_name: str = "", api_key: str = "") -> None:
        """Attach to the running expertray cluster; with none running, launch one from `config` (path; else
        $EXPERTRAY_CONFIG, else the default) serving checkpoint `model` (a Hugging Face directory) in `dtype`,
        or random weights when no model is given (said in a log line and in /healthz). With `engine` (the
        engine deployment's handle) the OpenAI routes serve `model` as `served_model_name` (default: the
        directory's name), behind `api_key` when one is given."""
        import ray

        from expertray.api import connect, launch

        self.weights = "as loaded by the running expertray cluster"
        try:
            self.cluster = connect(None)
        except ConfigError:
            path = config or os.environ.get("EXPERTRAY_CONFIG")
            free = ray.available_resources().get("CPU", 0.0)
            cfg = load_config(Path(path) if path else None)
            if model or dtype:
                cfg = dataclasses.replace(cfg, model=model or cfg.model, dtype=dtype or cfg.dtype)
            reserve = (INGRESS_MAX_REPLICAS - 1) * INGRESS_NUM_CPUS + (2 * ENGINE_NUM_CPUS if engine is not None else 0.0)
            cfg = fit_to_cpus(cfg, free, reserve_cpus=reserve)
            if cfg.model:
                self.weights = f"checkpoint {cfg.model} ({cfg.dtype}), launched by this ingress"
                log.warning("no expertray cluster running: launching one serving %s", cfg.model)
            else:
                self.weights = (f"random (seed {cfg.seed}): no expertray cluster was running, this ingress "
                                "launched one")
                log.warning("no expertray cluster running: launching one from %s with RANDOM weights (seed %d), "
                            "%g CPU per expert actor and %g per router (%.2f CPUs free); start your cluster "
                            "first (`expertray up`, expertray.launch) or pass model=PATH to serve real weights",
                            path or "the default config", cfg.seed, cfg.actor_num_cpus, cfg.router_num_cpus, free)
            self.cluster = launch(cfg)
        self.replica = f"{socket.gethostname()}:{os.getpid()}"
        self.max_inflight_tokens = max_inflight_tokens
        self.inflight_tokens = 0
        self.setup_openai(model, engine, served_model_name, api_key)

    @api.post("/v1/layers/{layer}/forward", summary="Run one MoE layer on hidden states [..., d_model]")
    async def forward(self, layer: int, request: Request) -> Response:
        try:
            kind = media_type(request.headers.get("content-type"))
            body = await read_body(request, MAX_WIRE_BYTES if kind == MSGPACK else MAX_JSON_BYTES)
            hidden = _decode(body, kind)
            x = self.cluster.validate(layer, hidden)
        except UnknownExpertError as exc:
            return error_reply(404, str(exc))
        except MediaTypeError as exc:
            return error_reply(415, str(exc))
        except OversizeError as exc:
            return error_reply(413, str(exc))
        except InputError as exc:
            return error_reply(400, str(exc))
        tokens = int(np.prod(hidden.shape[:-1]))
        if self.inflight_tokens + tokens > self.max_inflight_tokens:
            return error_reply(503, f"overloaded: {self.inflight_tokens} tokens in flight", **{"Retry-After": "1"})
        self.inflight_tokens += tokens
        try:
            wire, wire_dtype = to_wire(x)
            answer = await self.cluster.forward_wire(layer, wire, wire_dtype)
            out = from_host_array(np.asarray(answer), wire_dtype).reshape(tuple(hidden.shape))
        except Exception as exc:  # noqa: BLE001 - mapped to a status below; nothing is swallowed
            cause = root_cause(exc)
            if isinstance(cause, BackpressureError):
                return error_reply(503, str(cause), **{"Retry-After": "1"})
            if isinstance(cause, InputError | UnknownExpertError):
                return error_reply(400, str(cause))
            if isinstance(cause, ExpertUnavailableError | RouterUnavailableError):
                return error_reply(503, str(cause), **{"Retry-After": "1"})
            if isinstance(cause, RequestTimeoutError):
                return error_reply(504, str(cause))
            log.exception("forward failed")
            return error_reply(500, f"internal error: {type(cause).__name__}: {cause}")
        finally:
            self.inflight_tokens -= tokens
        if kind == MSGPACK:
            same = out if isinstance(hidden, torch.Tensor) else out.numpy().astype(hidden.dtype, copy=False)
            return Response(pack({"output": encode_tensor(same)}),
                            media_type=MSGPACK)
        return JSONResponse({"output": out.tolist()})

    @api.get("/v1/placement", summary="The current placement table")
    async def placement(self) -> dict[str, Any]:
        return await self.cluster.controller.get_table.remote()

    @api.get("/v1/experts", summary="Per logical expert: replicas and their actors")
    async def experts(self) -> list[dict[str, Any]]:
        from expertray.state.placement_table import PlacementTable

        table = PlacementTable.from_dict(await self.cluster.controller.get_table.remote())
        return [{"layer": layer, "expert": e, "actors": [s.actor for s in table.replicas(layer, e)]}
                for layer in range(table.num_layers) for e in range(table.num_experts)]

    @api.get("/healthz", summary="Cluster health: controller, routers and expert actors reachable")
    async def healthz(self) -> Response:
        try:
            status = await asyncio.wait_for(self.cluster.controller.status.remote(), timeout=10)
        except Exception as exc:  # noqa: BLE001 - reported as unhealthy
            return error_reply(503, f"cluster unreachable: {root_cause(exc)}")
        return JSONResponse({"status": "ok", "table_version": status["table"]["version"],
                             "actors": len(status["actors"]), "routers": len(status["routers"]),
                             "transport": status["transport"], "weights": self.weights,
                             "ingress": {"replica": self.replica,
                                         "rejected": rejected_counts()}})


APP_ARGS = ("model", "dtype", "config", "max_inflight_tokens", "served_model_name", "api_key", "engine_replicas")
ENGINE_ARGS = tuple(f.name for f in dataclasses.fields(EngineConfig))


def app(args: dict[str, str] | None = None) -> serve.Application:
    """The Serve application builder: `serve run expertray.serve:app [model=PATH] [dtype=bfloat16]
    [config=cluster.yaml] [max_inflight_tokens=N] [served_model_name=NAME] [api_key=KEY] [micro_batches=M]
    [max_running=N] ...` (EngineConfig fields), or `args:` under the application in a Serve config file. With
    `model` the OpenAI routes serve it through engine replicas. Unknown keys are refused by name."""
    args = dict(args or {})
    unknown = sorted(set(args) - set(APP_ARGS) - set(ENGINE_ARGS))
    if unknown:
        raise ConfigError(f"expertray.serve:app: unknown argument(s) {', '.join(unknown)} "
                          f"(accepted: {', '.join(APP_ARGS + ENGINE_ARGS)})")
    numbers = ("max_inflight_tokens", "engine_replicas")
    kwargs: dict[str, Any] = {k: str(v) for k, v in args.items() if k in APP_ARGS and k not in numbers}
    kwargs.update({k: _number(args, k, int) for k in numbers if k in args})
    types = {f.name: f.type for f in dataclasses.fields(EngineConfig)}
    engine = {k: _number(args, k, float if types[k] in (float, "float") else int) for k in ENGINE_ARGS if k in args}
    return build(engine=engine, **kwargs)


def _number(args: dict[str, Any], key: str, kind: type) -> int | float:
    try:
        return kind(args[key])
    except (TypeError, ValueError):
        raise ConfigError(f"expertray.serve:app: {key} must be {'an integer' if kind is int else 'a number'}, "
                          f"got {args[key]!r}") from None


def build(model: str = "", engine: dict[str, Any] | None = None, engine_replicas: int = 1,
          **ingress_kwargs: Any) -> serve.Application:
    """The application: the ingress, and with `model` the engine deployment it streams from (`engine`:
    EngineConfig fields, checked here; `engine_replicas`: the fewest engine replicas Serve's autoscaling keeps)."""
    if not model:
        if engine:
            raise ConfigError("expertray.serve:app: engine arguments need model=PATH")
        return ExpertRayIngress.bind(**ingress_kwargs)
    EngineConfig(**(engine or {}))  # refuse bad values before anything deploys
    if not isinstance(engine_replicas, int) or engine_replicas < 1:
        raise ConfigError(f"expertray.serve:app: engine_replicas must be an integer >= 1, got {engine_replicas!r}")
    engines = EngineReplica.options(autoscaling_config={
        "min_replicas": engine_replicas, "max_replicas": max(engine_replicas, ENGINE_MAX_REPLICAS),
        "target_ongoing_requests": ENGINE_TARGET_ONGOING})
    return ExpertRayIngress.bind(model=model, engine=engines.bind(model=model, engine=engine or {}), **ingress_kwargs)


def run_app(port: int = 8000, host: str = "127.0.0.1", name: str = "expertray", quiet: bool = False,
            **app_kwargs: Any) -> str:
    """Start Serve's HTTP proxy on host:port (loopback by default), deploy the app (`build`'s arguments),
    return its base URL."""
    logging_config = {"log_level": "WARNING", "enable_access_log": False} if quiet else None
    running = _serve_running()
    serve.start(http_options={"host": host, "port": port}, logging_config=logging_config)
    if running and not _listening(host, port):  # serve.start leaves a running Serve's proxy where it is
        raise ConfigError(f"Serve is already running with its HTTP proxy elsewhere, not on {host}:{port}: deploy "
                          "on its port, or stop it first (serve.shutdown())")
    serve.run(build(**app_kwargs), name=name, route_prefix="/", logging_config=logging_config)
    return f"http://{host}:{port}"


def _serve_running() -> bool:
    """Whether a Serve instance (its controller actor) runs on this Ray cluster already."""
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        return True
    except ValueError:
        return False


def _listening(host: str, port: int) -> bool:
    """Whether something accepts connections on host:port (a running Serve's proxy is already up)."""
    try:
        with socket.create_connection((host, port), timeout=2.0):
            return True
    except OSError:
        return False
