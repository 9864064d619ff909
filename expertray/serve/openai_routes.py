"""The OpenAI-compatible routes of the Serve ingress: GET /v1/models, POST /v1/completions and
/v1/chat/completions, streaming (server-sent events, `data: [DONE]` last) or not.

The ingress tokenizes (the checkpoint's tokenizer, its chat template for chat), sends token ids to an engine
replica (expertray.serve.engines) and turns the token stream into text, applying `stop` strings. A request whose
engine replica dies is sent again to another replica with the prompt plus the tokens already received as its new
prompt and what is left of max_tokens: the client sees one stream without a repeated token, and a greedy answer is
the one it would have had. Overload answers 429 (engine queue full) or 503 (no replica can take it) with
Retry-After; a client that disconnects cancels its sequence in the engine at once.
"""

import asyncio
import dataclasses
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import ray
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from expertray.errors import BackpressureError, InputError, OversizeError
from expertray.serve.http import api, count_rejection, read_body, root_cause
from expertray.serving import openai_api as oa
from expertray.serving.text import TextStream

log = logging.getLogger(__name__)
MAX_BODY_BYTES = 4 << 20
RETRY_PAUSE_S = 0.5
RETRY_WINDOW_S = 60.0  # how long a request whose replica died keeps looking for another


def openai_error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 **headers: str) -> JSONResponse:
    count_rejection(status)
    return JSONResponse(oa.error_body(message, kind, param, status), status_code=status, headers=headers or None)


def _mapped(exc: BaseException) -> JSONResponse:
    """The reply for an error before any token was sent."""
    cause = root_cause(exc)
    if isinstance(cause, oa.ProtocolError):
        return openai_error(cause.status, str(cause), cause.kind, cause.param)
    if isinstance(cause, OversizeError):
        return openai_error(413, str(cause))
    if isinstance(cause, InputError):
        return openai_error(400, str(cause))
    if isinstance(cause, BackpressureError):
        return openai_error(429, str(cause), "rate_limit_error", **{"Retry-After": "1"})
    if isinstance(cause, ray.serve.exceptions.BackPressureError | _Unavailable):
        return openai_error(503, f"overloaded: {cause}", "server_error", **{"Retry-After": "1"})
    log.exception("generation failed", exc_info=cause)
    return openai_error(500, f"internal error: {type(cause).__name__}: {cause}", "server_error")


class _Unavailable(RuntimeError):
    """No engine replica answered within RETRY_WINDOW_S."""


def _replica_gone(exc: BaseException) -> bool:
    from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError

    return isinstance(exc, ray.exceptions.RayActorError | ReplicaUnavailableError | DeploymentUnavailableError)


class OpenAIRoutes:
    """Mixed into the Serve ingress; `setup_openai` must run in its constructor."""

    def setup_openai(self, model: str, engine: Any, served_name: str, api_key: str) -> None:
        """model: checkpoint directory ('' = no model served: the routes answer 404); engine: the engine
        deployment's handle; served_name: the `model` clients name; api_key: required bearer token ('' = none)."""
        self.engine = engine
        self.api_key = api_key
        self.served_name = served_name or (Path(model).name if model else "")
        self.created = int(time.time())
        self.tokenizer = None
        self.context_len = 0
        if model and engine is not None:
            from transformers import AutoConfig, AutoTokenizer

            from expertray.models.generate import has_tokenizer

            if not has_tokenizer(model):
                raise InputError(f"{model} has no tokenizer: the OpenAI routes need one (tokenizer.json)")
            self.tokenizer = AutoTokenizer.from_pretrained(model)  # local files only; no remote code
            text = AutoConfig.from_pretrained(model).get_text_config()
            self.context_len = int(getattr(text, "max_position_embeddings", 0) or 1 << 30)

    def refused(self, request: Request) -> JSONResponse | None:
        """The 401 reply when an api_key is set and the request does not bear it; None when it may pass."""
        given = request.headers.get("authorization", "")
        if not self.api_key or hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            return None
        return openai_error(401, "missing or wrong API key (Authorization: Bearer ...)", "authentication_error")

    # ---- routes ---------------------------------------------------------------------------------------------
    @api.get("/v1/models", summary="The served model (OpenAI list shape)")
    async def models(self, request: Request) -> Response:
        if (refused := self.refused(request)) is not None:
            return refused
        return JSONResponse(oa.model_list(self.served_name, self.created) if self.tokenizer else
                            {"object": "list", "data": []})

    @api.post("/v1/completions", summary="OpenAI completions (stream or not)")
    async def completions(self, request: Request) -> Response:
        return await self._serve(request, oa.CompletionRequest)

    @api.post("/v1/chat/completions", summary="OpenAI chat completions (stream or not)")
    async def chat_completions(self, request: Request) -> Response:
        return await self._serve(request, oa.ChatRequest)

    # ---- one request ----------------------------------------------------------------------------------------
    async def _serve(self, request: Request, kind: type) -> Response:
        if (refused := self.refused(request)) is not None:
            return refused
        try:
            body = await read_body(request, MAX_BODY_BYTES)
            try:
                doc = json.loads(body)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise oa.ProtocolError(f"malformed JSON body: {exc}") from None
            req = oa.parse(kind, doc)
            if self.tokenizer is None:
                raise oa.ProtocolError("no model is served here (start the app with model=PATH)", 404, "model",
                                       "model_not_found")
            if req.model != self.served_name:
                raise oa.ProtocolError(f"model {req.model!r} does not exist (served: {self.served_name!r})", 404,
                                       "model", "model_not_found")
            prompt_ids = self._prompt_ids(req)
            max_tokens = oa.requested_max_tokens(req, len(prompt_ids), self.context_len)
            if len(prompt_ids) + max_tokens > self.context_len:
                raise oa.ProtocolError(f"context too long: {len(prompt_ids)} prompt tokens + max_tokens "
                                       f"{max_tokens} > the model's context of {self.context_len}", param="max_tokens")
            params = req.sampling(max_tokens)
        except Exception as exc:  # noqa: BLE001 - every refusal becomes an OpenAI error reply
            return _mapped(exc)
        chat = kind is oa.ChatRequest
        rid = oa.new_id("chatcmpl" if chat else "cmpl")
        text = TextStream(self.tokenizer, req.stop)
        tokens = self._tokens(prompt_ids, params)
        try:  # the first event before any header: a refusal still gets its status code
            first = await tokens.__anext__()
        except StopAsyncIteration:
            first = None
        except Exception as exc:  # noqa: BLE001
            return _mapped(exc)
        if req.stream:
            return StreamingResponse(self._sse(rid, req, chat, len(prompt_ids), first, tokens, text),
                                     media_type="text/event-stream")
        return await self._whole(rid, req, chat, len(prompt_ids), first, tokens, text)

    def _prompt_ids(self, req: Any) -> list[int]:
        if isinstance(req, oa.ChatRequest):
            messages = [{"role": m.role, "content": m.text()} for m in req.messages]
            if not getattr(self.tokenizer, "chat_template", None):
                raise oa.ProtocolError("the served model's tokenizer has no chat template: use /v1/completions",
                                       param="messages")
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        elif isinstance(req.prompt, str) or (req.prompt and isinstance(req.prompt[0], str)):
            text = req.prompt if isinstance(req.prompt, str) else req.prompt[0]
            ids = self.tokenizer(text)["input_ids"]
        else:
            ids = list(req.prompt)
        if not ids:
            raise oa.ProtocolError("the prompt has no tokens", param="prompt")
        return [int(i) for i in ids]

    async def _tokens(self, prompt_ids: list[int], params: Any) -> AsyncIterator[tuple[list[int], str | None]]:
        """(new token ids, finish reason or None) from an engine replica; another replica takes over from the
        tokens received so far when one dies."""
        received: list[int] = []
        gone_since: float | None = None
        while True:
            left = params.max_tokens - len(received)
            stream = self.engine.options(stream=True).generate.remote(
                prompt_ids + received, {**dataclasses.asdict(params), "max_tokens": left})
            try:
                async for item in stream:
                    gone_since = None
                    received.extend(item["token_ids"])
                    yield item["token_ids"], item["finish_reason"]
                    if item["finish_reason"] is not None:
                        return
                raise RuntimeError("the engine's stream ended without a finish reason")
            except Exception as exc:  # noqa: BLE001 - only a lost replica is retried
                if not _replica_gone(exc):
                    raise
                now = time.monotonic()
                gone_since = gone_since or now
                if now - gone_since > RETRY_WINDOW_S:
                    raise _Unavailable(f"no engine replica took the request within {RETRY_WINDOW_S:.0f} s") from exc
                log.warning("engine replica lost mid-request (%s): re-running from %d received token(s)",
                            type(exc).__name__, len(received))
                await asyncio.sleep(RETRY_PAUSE_S)
            finally:
                stream.cancel()

    async def _whole(self, rid: str, req: Any, chat: bool, n_prompt: int, first: Any, tokens: Any,
                     text: TextStream) -> Response:
        try:
            pieces = [piece async for piece in _pieces(first, tokens, text)]
        except Exception as exc:  # noqa: BLE001
            return _mapped(exc)
        finally:
            await tokens.aclose()
        content = "".join(c for c, _, _ in pieces)
        _, finish, n_out = pieces[-1] if pieces else ("", None, 0)
        use = oa.usage(n_prompt, n_out)
        body = (oa.chat_completion(rid, req.model, content, finish, use) if chat else
                oa.completion(rid, req.model, content, finish, use))
        return JSONResponse(body.model_dump(exclude_none=True))

    async def _sse(self, rid: str, req: Any, chat: bool, n_prompt: int, first: Any, tokens: Any,
                   text: TextStream) -> AsyncIterator[bytes]:
        created, last = int(time.time()), ("", None, 0)

        def piece(content: str, done: str | None) -> bytes:
            if chat:
                return oa.sse(oa.chat_chunk(rid, req.model, created, text=content, finish=done))
            return oa.sse(oa.completion_chunk(rid, req.model, created, content, done))

        try:
            if chat:
                yield oa.sse(oa.chat_chunk(rid, req.model, created, role=True, text=""))
            async for last in _pieces(first, tokens, text):
                content, finish, _ = last
                if content or finish is not None:
                    yield piece(content, finish)
            if req.include_usage:
                use = oa.usage(n_prompt, last[2])
                yield oa.sse(oa.chat_chunk(rid, req.model, created, use=use) if chat else
                             oa.completion_chunk(rid, req.model, created, use=use))
            yield oa.sse("[DONE]")
        except Exception as exc:  # noqa: BLE001 - headers are sent: the error goes in the stream
            cause = root_cause(exc)
            log.warning("stream %s failed: %s", rid, cause)
            yield oa.sse(json.dumps(oa.error_body(f"{type(cause).__name__}: {cause}", "server_error")))
        finally:
            await tokens.aclose()


async def _pieces(first: Any, tokens: Any, text: TextStream) -> AsyncIterator[tuple[str, str | None, int]]:
    """(text now safe to send, finish reason (last piece only), output tokens so far) from the engine's token
    stream, starting at its `first` event: a stop string ends it with "stop"; the last piece carries the text
    held back until then."""
    n_out, item = 0, first
    while item is not None:
        ids, finish = item
        n_out += len(ids)
        content = text.push(ids)
        if text.stopped:
            finish = "stop"
        if finish is not None:
            yield content + text.flush(), finish, n_out
            return
        yield content, None, n_out
        item = await anext(tokens, None)
