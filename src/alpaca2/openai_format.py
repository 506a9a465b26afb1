"""OpenAI-shaped results: the dicts of /v1/completions and /v1/chat/completions, in one place.

Used by ``Llama.create_completion`` / ``create_chat_completion`` and by the HTTP server, so both
answer in the same shape as OpenAI's API (and llama-cpp-python's):

    >>> resp = completion(rid, created, "model.gguf", "text", "stop", usage(5, 1), chat=False)
    >>> resp["choices"][0]["text"]
"""
from __future__ import annotations

import time
import uuid
from typing import Iterable, Iterator


def new_id(chat: bool) -> str:
    """A fresh response id: ``chatcmpl-...`` for chat, ``cmpl-...`` for text completions."""
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex


def created_now() -> int:
    """The ``created`` field: seconds since the epoch."""
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    """The ``usage`` object."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def object_name(chat: bool, stream: bool) -> str:
    """The ``object`` field of a response or of a streamed chunk."""
    if chat:
        return "chat.completion.chunk" if stream else "chat.completion"
    return "text_completion"


def completion(rid: str, created: int, model: str, text: str, finish_reason: str | None, usage_: dict,
               chat: bool) -> dict:
    """A whole (non-streamed) response: a ``chat.completion`` or a ``text_completion``."""
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    return {"id": rid, "object": object_name(chat, False), "created": created, "model": model,
            "choices": [choice], "usage": usage_}


def chunk(rid: str, created: int, model: str, chat: bool, *, text: str | None = None, role: bool = False,
          finish_reason: str | None = None, usage_: dict | None = None) -> dict:
    """One streamed chunk: the role announcement (chat, ``role=True``), a piece of text, or the last
    chunk (``finish_reason`` set, empty delta, with ``usage_`` when given)."""
    if chat:
        if role:
            delta = {"role": "assistant"}
        elif text is not None:
            delta = {"content": text}
        else:
            delta = {}
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
    out = {"id": rid, "object": object_name(chat, True), "created": created, "model": model, "choices": [choice]}
    if usage_ is not None:
        out["usage"] = usage_
    return out


def stream_chunks(rid: str, created: int, model: str, chat: bool, pieces: Iterable[str], final) -> Iterator[dict]:
    """The chunks of a streamed response: role (chat), one chunk per piece, then the last chunk.

    ``final()`` is called after the pieces run out and returns (finish_reason, usage dict)."""
    if chat:
        yield chunk(rid, created, model, chat, role=True)
    for text in pieces:
        yield chunk(rid, created, model, chat, text=text)
    finish_reason, usage_ = final()
    yield chunk(rid, created, model, chat, finish_reason=finish_reason, usage_=usage_)
