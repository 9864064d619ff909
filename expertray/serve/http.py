"""The HTTP app every expertray Serve route hangs on: one FastAPI instance, its error shape for the layer API
({"error": "<message>"}; the OpenAI routes answer in OpenAI's shape instead) and the count of rejected requests."""

import collections
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from expertray.errors import OversizeError

api = FastAPI(title="expertray", version="0.1.0",
              description="Expert-parallel MoE layers served by an expertray cluster on Ray.")
# Non-2xx replies this process (one ingress replica) answered, by status code.
REJECTED: collections.Counter[int] = collections.Counter()
_rejected_metric: Any = None


def count_rejection(status: int) -> None:
    global _rejected_metric
    REJECTED[status] += 1
    if _rejected_metric is None:
        from ray.util.metrics import Counter

        _rejected_metric = Counter("expertray_ingress_rejected", "Requests the Serve ingress answered with an "
                                   "error status itself, by HTTP status code.", tag_keys=("code",))
    _rejected_metric.inc(tags={"code": str(status)})


def rejected_counts() -> dict[str, int]:
    """This process's error replies by status code. (A module function, not a read of REJECTED in the ingress
    class: Serve ships the class by value, with copies of the globals it names.)"""
    return {str(code): n for code, n in sorted(REJECTED.items())}


def error_reply(status: int, message: str, **headers: str) -> JSONResponse:
    """The one error shape of the API: {"error": message}; every error reply is counted."""
    count_rejection(status)
    return JSONResponse({"error": message}, status_code=status, headers=headers or None)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """FastAPI's own 404 (no such route) and 405 (wrong method) in the app's error shape."""
    return error_reply(exc.status_code, str(exc.detail), **(exc.headers or {}))


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """A malformed path or query parameter (e.g. /v1/layers/abc/forward): 422 naming the parameter."""
    problems = ["{}: {} (got {!r})".format(".".join(str(p) for p in e.get("loc", ())), e.get("msg", "invalid"),
                                           e.get("input")) for e in exc.errors()]
    return error_reply(422, "; ".join(problems) or "invalid request")


def root_cause(exc: BaseException) -> BaseException:
    return getattr(exc, "cause", None) or exc


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with OversizeError as soon as it passes `limit` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise OversizeError(f"request body of {declared} bytes is over the {limit}-byte limit")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise OversizeError(f"request body is over the {limit}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


