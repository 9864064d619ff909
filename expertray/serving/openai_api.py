"""The OpenAI-compatible protocol: requests validated at the edge, responses and stream chunks built from the
`openai` package's own types, errors in OpenAI's shape. No HTTP and no Ray here (expertray.serve.models serves it).

Supported: /v1/completions (prompt: a string, a list of one string, or token ids) and /v1/chat/completions
(messages through the tokenizer's chat template), `max_tokens` (chat also `max_completion_tokens`),
`temperature`, `top_p`, `seed`, `stop` (a string or up to 4), `n` = 1, `stream` with
`stream_options.include_usage`. Anything else a client may send is ignored, except features that would change
the answer and are not served (n > 1, logprobs, echo, best_of > 1, logit_bias, penalties, tools): those are
refused with 400 naming the parameter rather than silently dropped.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from openai.types import Completion, CompletionChoice, CompletionUsage, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessage
from openai.types.chat.chat_completion import Choice as ChatChoice
from openai.types.chat.chat_completion_chunk import Choice as ChunkChoice
from openai.types.chat.chat_completion_chunk import ChoiceDelta
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from expertray.errors import InputError
from expertray.serving.sampling import SamplingParams

MAX_STOP = 4


class ProtocolError(InputError):
    """A request the API refuses: `status` (400 bad parameters, 404 unknown model, ...), `param` (the field)."""

    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.param, self.kind = status, param, kind


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | int | None = None) -> dict[str, Any]:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = Field(None, validate_default=True)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: Any = None
    logit_bias: dict[str, float] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences, got {len(stops)}")
        return stops

    def refuse_unserved(self) -> None:
        """400 for parameters that would change the answer and are not served."""
        if self.n != 1:
            raise ProtocolError(f"n={self.n}: only n=1 is served", param="n")
        if self.logprobs not in (None, False, 0):
            raise ProtocolError("logprobs are not served", param="logprobs")
        if self.logit_bias:
            raise ProtocolError("logit_bias is not served", param="logit_bias")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise ProtocolError(f"{name} is not served (only 0)", param=name)

    def sampling(self, max_tokens: int) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, seed=self.seed)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int]
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def refuse_unserved(self) -> None:
        super().refuse_unserved()
        if self.echo:
            raise ProtocolError("echo is not served", param="echo")
        if self.best_of not in (None, 1):
            raise ProtocolError("best_of > 1 is not served", param="best_of")
        if self.suffix:
            raise ProtocolError("suffix is not served", param="suffix")
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str) and len(self.prompt) > 1:
            raise ProtocolError("a batch of prompts is not served: send one prompt per request", param="prompt")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ProtocolError(f"message content part of type {part.get('type')!r} is not served (text only)",
                                    param="messages")
            parts.append(part["text"])
        return "".join(parts)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[Any] | None = None

    def refuse_unserved(self) -> None:
        super().refuse_unserved()
        if self.tools:
            raise ProtocolError("tools are not served", param="tools")


def parse(kind: type[_Sampling], doc: Any) -> _Sampling:
    """Validate a request body; ProtocolError (400) naming the first bad field."""
    if not isinstance(doc, dict):
        raise ProtocolError("the request body must be a JSON object")
    try:
        request = kind.model_validate(doc)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or None
        raise ProtocolError(f"{where}: {first.get('msg', 'invalid')}" if where else str(exc), param=where) from None
    request.refuse_unserved()
    return request


def requested_max_tokens(request: _Sampling, prompt_len: int, context_len: int) -> int:
    """max_tokens as asked (chat: max_completion_tokens first), else what the context leaves after the prompt."""
    asked = getattr(request, "max_completion_tokens", None) or request.max_tokens
    if asked is not None:
        return asked
    left = context_len - prompt_len
    if left < 1:
        raise ProtocolError(f"context too long: the prompt has {prompt_len} tokens, the model's context "
                            f"{context_len}", param="messages")
    return left


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> CompletionUsage:
    return CompletionUsage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                           total_tokens=prompt_tokens + completion_tokens)


def completion(rid: str, model: str, text: str, finish: str, use: CompletionUsage) -> Completion:
    """A whole completion."""
    return Completion(id=rid, object="text_completion", created=int(time.time()), model=model,
                      choices=[CompletionChoice(index=0, text=text, finish_reason=finish, logprobs=None)], usage=use)


def completion_chunk(rid: str, model: str, created: int, text: str = "", finish: str | None = None,
                     use: CompletionUsage | None = None) -> Completion:
    """One streamed piece of a completion (OpenAI streams `text_completion` objects): text, finish reason, or
    (no choices) the usage. Built unvalidated because a piece's finish_reason is null until the last one, which
    the type's Literal does not admit (the API and the client both use null)."""
    choices = [] if use is not None else [
        CompletionChoice.model_construct(index=0, text=text, finish_reason=finish, logprobs=None)]
    return Completion.model_construct(id=rid, object="text_completion", created=created, model=model,
                                      choices=choices, usage=use)


def chat_completion(rid: str, model: str, text: str, finish: str, use: CompletionUsage) -> ChatCompletion:
    message = ChatCompletionMessage(role="assistant", content=text)
    return ChatCompletion(id=rid, object="chat.completion", created=int(time.time()), model=model,
                          choices=[ChatChoice(index=0, message=message, finish_reason=finish, logprobs=None)],
                          usage=use)


def chat_chunk(rid: str, model: str, created: int, *, role: bool = False, text: str | None = None,
               finish: str | None = None, use: CompletionUsage | None = None) -> ChatCompletionChunk:
    """One stream chunk: the role (first), a piece of content, the finish reason, or (no choices) the usage."""
    choices = [] if use is not None else [
        ChunkChoice(index=0, delta=ChoiceDelta(role="assistant" if role else None, content=text),
                    finish_reason=finish)]
    return ChatCompletionChunk(id=rid, object="chat.completion.chunk", created=created, model=model,
                               choices=choices, usage=use)


def model_list(name: str, created: int) -> dict[str, Any]:
    return {"object": "list", "data": [Model(id=name, object="model", created=created,
                                              owned_by="expertray").model_dump()]}


def sse(item: BaseModel | str) -> bytes:
    """One server-sent event: a chunk's JSON, or the literal `[DONE]`."""
    data = item if isinstance(item, str) else item.model_dump_json(warnings=False)
    return f"data: {data}\n\n".encode()
