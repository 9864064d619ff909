"""Ray Serve application: HTTP front door of an expertray cluster (`serve run expertray.serve:app`).

POST /v1/layers/{layer}/forward  — JSON {"hidden": [[...], ...]} for small inputs, or application/msgpack
                                   {"hidden": {"dtype", "shape", "data"}} for real sizes; the reply uses the
                                   request's format.
GET  /v1/experts, /v1/placement, /healthz.
The ingress connects to the running cluster's controller (or launches one from $EXPERTRAY_CONFIG / the
default config when none runs). Backpressure: over `max_inflight_tokens` → 503 with Retry-After.
"""


import asyncio
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve

from expertray.codec import decode_tensor, encode_tensor, pack, unpack
from expertray.errors import (
    BackpressureError,
    ExpertUnavailableError,
    InputError,
    OversizeError,
    UnknownExpertError,
)

log = logging.getLogger(__name__)
MSGPACK = "application/msgpack"
MAX_JSON_TOKENS = 4096

api = FastAPI(title="expertray", version="0.1.0",
              description="Expert-parallel MoE layers served by an expertray cluster on Ray.")


def _error(status: int, message: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers or None)


def _root_cause(exc: BaseException) -> BaseException:
    return getattr(exc, "cause", None) or exc


@serve.deployment(name="ExpertRayIngress", ray_actor_options={"num_cpus": 0.25},
                  autoscaling_config={"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8})
@serve.ingress(api)
class ExpertRayIngress:
    def __init__(self, max_inflight_tokens: int = 65536) -> None:
        from expertray.api import connect, launch
        from expertray.cli import load_config
        from expertray.errors import ConfigError

        try:
            self.cluster = connect(None)
        except ConfigError:
            path = os.environ.get("EXPERTRAY_CONFIG")
            log.info("no expertray cluster running: launching one (%s)", path or "default config")
            self.cluster = launch(load_config(Path(path) if path else None))
        self.max_inflight_tokens = max_inflight_tokens
        self.inflight_tokens = 0

    @api.post("/v1/layers/{layer}/forward", summary="Run one MoE layer on hidden states [T, d_model]")
    async def forward(self, layer: int, request: Request) -> Response:
        wants_msgpack = MSGPACK in request.headers.get("content-type", "")
        body = await request.body()
        try:
            hidden = self._parse(body, wants_msgpack)
            self.cluster._check(layer, hidden)
        except UnknownExpertError as exc:
            return _error(404, str(exc))
        except OversizeError as exc:
            return _error(413, str(exc))
        except InputError as exc:
            return _error(400, str(exc))
        tokens = hidden.shape[0] if hidden.ndim > 1 else 0
        if self.inflight_tokens + tokens > self.max_inflight_tokens:
            return _error(503, f"overloaded: {self.inflight_tokens} tokens in flight", **{"Retry-After": "1"})
        self.inflight_tokens += tokens
        try:
            out = np.asarray(await self.cluster.forward_ref(layer, hidden))
        except Exception as exc:  # noqa: BLE001 - mapped to a status below; nothing is swallowed
            cause = _root_cause(exc)
            if isinstance(cause, BackpressureError):
                return _error(503, str(cause), **{"Retry-After": "1"})
            if isinstance(cause, InputError | UnknownExpertError):
                return _error(400, str(cause))
            if isinstance(cause, ExpertUnavailableError):
                return _error(503, str(cause), **{"Retry-After": "1"})
            log.exception("forward failed")
            return _error(500, f"internal error: {type(cause).__name__}: {cause}")
        finally:
            self.inflight_tokens -= tokens
        if wants_msgpack:
            return Response(pack({"output": encode_tensor(out.astype(hidden.dtype, copy=False))}),
                            media_type=MSGPACK)
        return JSONResponse({"output": out.tolist()})

    def _parse(self, body: bytes, wants_msgpack: bool) -> np.ndarray:
        if wants_msgpack:
            doc = unpack(body)
            if not isinstance(doc, dict) or "hidden" not in doc:
                raise InputError("msgpack body must be a map with key 'hidden'")
            return decode_tensor(doc["hidden"])
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InputError(f"malformed JSON body: {exc}") from exc
        if not isinstance(doc, dict) or "hidden" not in doc:
            raise InputError("JSON body must be an object with key 'hidden' (a [tokens][d_model] array)")
        rows = doc["hidden"]
        if not isinstance(rows, list) or not rows or not all(isinstance(r, list) for r in rows):
            raise InputError("hidden must be a non-empty list of rows, each a list of numbers")
        if len(rows) > MAX_JSON_TOKENS:
            raise OversizeError(f"JSON request of {len(rows)} tokens is over the {MAX_JSON_TOKENS}-token limit for "
                             "JSON; send application/msgpack")
        width = len(rows[0])
        if any(len(r) != width for r in rows):
            raise InputError("hidden rows have different lengths")
        try:
            return np.asarray(rows, dtype=np.float32)
        except (ValueError, TypeError) as exc:
            raise InputError(f"hidden must contain only numbers: {exc}") from exc

    @api.get("/v1/placement", summary="The current placement table")
    async def placement(self) -> dict[str, Any]:
        return await self.cluster.controller.get_table.remote()

    @api.get("/v1/experts", summary="Per logical expert: replicas and their actors")
    async def experts(self) -> list[dict[str, Any]]:
        from expertray.placement import PlacementTable

        table = PlacementTable.from_dict(await self.cluster.controller.get_table.remote())
        return [{"layer": layer, "expert": e, "actors": [s.actor for s in table.replicas(layer, e)]}
                for layer in range(table.num_layers) for e in range(table.num_experts)]

    @api.get("/healthz", summary="Cluster health: controller, routers and expert actors reachable")
    async def healthz(self) -> Response:
        try:
            status = await asyncio.wait_for(self.cluster.controller.status.remote(), timeout=10)
        except Exception as exc:  # noqa: BLE001 - reported as unhealthy
            return _error(503, f"cluster unreachable: {_root_cause(exc)}")
        return JSONResponse({"status": "ok", "table_version": status["table"]["version"],
                             "actors": len(status["actors"]), "routers": len(status["routers"]),
                             "transport": status["transport"]})


app = ExpertRayIngress.bind()


def run_app(port: int = 8000, host: str = "127.0.0.1", name: str = "expertray", quiet: bool = False,
            **ingress_kwargs: Any) -> str:
    """Start Serve's HTTP proxy on host:port (loopback by default), deploy the ingress, return its base URL."""
    logging_config = {"log_level": "WARNING", "enable_access_log": False} if quiet else None
    serve.start(http_options={"host": host, "port": port}, logging_config=logging_config)
    serve.run(ExpertRayIngress.bind(**ingress_kwargs), name=name, route_prefix="/", logging_config=logging_config)
    return f"http://{host}:{port}"
