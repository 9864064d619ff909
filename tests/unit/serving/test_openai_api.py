"""The OpenAI protocol: requests refused by name, bodies that the `openai` client's own types read back."""

from __future__ import annotations

import json

import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from expertray.serving import openai_api as oa


@pytest.mark.parametrize("doc,needle", [
    ([], "must be a JSON object"),
    ({"prompt": "x"}, "model: Field required"),
    ({"model": "m", "prompt": "x", "temperature": 3}, "temperature"),
    ({"model": "m", "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"model": "m", "prompt": "x", "n": 2}, "only n=1"),
    ({"model": "m", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "at most 4 stop"),
    ({"model": "m", "prompt": "x", "logprobs": 2}, "logprobs are not served"),
    ({"model": "m", "prompt": ["a", "b"]}, "one prompt per request"),
    ({"model": "m", "prompt": "x", "echo": True}, "echo is not served"),
    ({"model": "m", "prompt": "x", "presence_penalty": 0.5}, "presence_penalty"),
])
def test_bad_completion_requests_are_refused_naming_the_field(doc, needle) -> None:
    with pytest.raises(oa.ProtocolError, match=needle) as err:
        oa.parse(oa.CompletionRequest, doc)
    assert err.value.status == 400


def test_chat_requests_need_messages_and_text_parts() -> None:
    with pytest.raises(oa.ProtocolError, match="messages"):
        oa.parse(oa.ChatRequest, {"model": "m", "messages": []})
    req = oa.parse(oa.ChatRequest, {"model": "m", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}], "max_completion_tokens": 3, "stop": "x"})
    assert req.messages[0].text() == "ab" and req.stop == ["x"]
    assert oa.requested_max_tokens(req, 5, 100) == 3
    image = oa.parse(oa.ChatRequest, {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]})
    with pytest.raises(oa.ProtocolError, match="image_url"):
        image.messages[0].text()
    with pytest.raises(oa.ProtocolError, match="context too long"):
        oa.requested_max_tokens(oa.parse(oa.ChatRequest, {"model": "m", "messages": [{"role": "user"}]}), 100, 100)


def test_bodies_read_back_as_openai_types() -> None:
    use = oa.usage(3, 2)
    whole = Completion.model_validate(oa.completion("cmpl-1", "m", "hi", "length", use).model_dump())
    piece = Completion.model_construct(**json.loads(oa.sse(oa.completion_chunk("cmpl-1", "m", 1, "h"))[6:]))
    assert piece.choices[0].finish_reason is None and piece.choices[0].text == "h"
    assert whole.choices[0].text == "hi" and whole.usage.total_tokens == 5
    chat = ChatCompletion.model_validate(oa.chat_completion("c-1", "m", "yo", "stop", use).model_dump())
    assert chat.choices[0].message.content == "yo" and chat.choices[0].finish_reason == "stop"
    event = oa.sse(oa.chat_chunk("c-1", "m", 1, text="x", finish="length"))
    assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    chunk = ChatCompletionChunk.model_validate(json.loads(event[6:]))
    assert chunk.choices[0].delta.content == "x" and chunk.choices[0].finish_reason == "length"
    usage_only = ChatCompletionChunk.model_validate(oa.chat_chunk("c-1", "m", 1, use=use).model_dump())
    assert usage_only.choices == [] and usage_only.usage.prompt_tokens == 3
    assert oa.sse("[DONE]") == b"data: [DONE]\n\n"
    assert oa.error_body("bad", param="n")["error"] == {"message": "bad", "type": "invalid_request_error",
                                                        "param": "n", "code": None}
