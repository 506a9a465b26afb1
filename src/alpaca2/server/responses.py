"""OpenAI's Responses API (/v1/responses, /responses and their /input_tokens), as llama-server has it:
the request becomes a chat completion (server_chat_convert_responses_to_chatcmpl: instructions ->
a system message, input -> messages), which runs through this server's own /v1/chat/completions,
and its answer (or its stream) goes back in the Responses shape (response.created ...
response.output_text.delta ... response.completed).  Text in and out; images, files, function-call
items and previous_response_id get 400, as far as this server goes.
"""
from __future__ import annotations

import json
import time
import uuid

from alpaca2.server import inprocess
from alpaca2.server.validation import APIError, bad, read_json
from alpaca2.server.sse import event_stream

_TEXT_IN = ("input_text", "output_text", "text")


def to_chat(body: dict) -> dict:
    """The chat-completions request for a Responses request (raises APIError 400)."""
    if "input" not in body:
        raise bad("'input' is required", "input")
    if body.get("previous_response_id"):
        raise bad("llama.cpp does not support 'previous_response_id'.", "previous_response_id")
    messages = []
    if body.get("instructions") is not None:
        if not isinstance(body["instructions"], str):
            raise bad("'instructions' must be a string", "instructions")
        messages.append({"role": "system", "content": body["instructions"]})
    inp = body["input"]
    if isinstance(inp, str):
        messages.append({"role": "user", "content": inp})
    elif isinstance(inp, list):
        for item in inp:
            if not isinstance(item, dict) or item.get("role") not in ("user", "system", "developer", "assistant"):
                raise bad("each input item must be a message with a role (function calls are not supported here)",
                          "input")
            content = item.get("content")
            if isinstance(content, list):
                parts = []
                for c in content:
                    if not isinstance(c, dict) or c.get("type") not in _TEXT_IN or not isinstance(c.get("text"), str):
                        raise bad("content parts must be input_text or output_text with a 'text' here", "input")
                    parts.append(c["text"])
                content = "".join(parts)
            if not isinstance(content, str):
                raise bad("a message's content must be a string or a list of text parts", "input")
            role = "system" if item["role"] == "developer" else item["role"]
            messages.append({"role": role, "content": content})
    else:
        raise bad("'input' must be a string or a list of messages", "input")
    chat = {k: v for k, v in body.items() if k not in ("input", "instructions", "max_output_tokens", "store",
                                                      "text", "reasoning", "truncation", "metadata", "user")}
    if body.get("max_output_tokens") is not None:
        chat["max_tokens"] = body["max_output_tokens"]
    if chat.get("tools"):
        raise bad("tools are not supported on /v1/responses here; use /v1/chat/completions", "tools")
    chat["messages"] = messages
    return chat


def _message(msg_id, text, status="completed"):
    return {"type": "message", "id": msg_id, "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}] if status == "completed" else []}


def _response(resp_id, model, created, status, output, usage=None):
    r = {"id": resp_id, "object": "response", "created_at": created, "status": status, "model": model,
         "output": output, "error": None, "incomplete_details": None, "parallel_tool_calls": False,
         "tool_choice": "auto", "tools": []}
    if usage is not None:
        r["usage"] = {"input_tokens": usage.get("prompt_tokens", 0), "output_tokens": usage.get("completion_tokens", 0),
                      "total_tokens": usage.get("total_tokens", 0),
                      "input_tokens_details": {"cached_tokens": (usage.get("prompt_tokens_details") or {})
                                               .get("cached_tokens", 0)},
                      "output_tokens_details": {"reasoning_tokens": 0}}
    return r


async def responses(server, request):
    body = await read_json(request, server.max_body, server.body_timeout)
    chat = to_chat(body)
    resp_id, msg_id = "resp_" + uuid.uuid4().hex, "msg_" + uuid.uuid4().hex
    created = int(time.time())
    model = body.get("model") or server.model_id
    headers = inprocess.forwarded(request)
    if not body.get("stream"):
        status, d = await inprocess.call(server.app, "/v1/chat/completions", dict(chat, stream=False), headers)
        if status != 200:
            raise APIError(status, d.get("error", {}).get("message", "the chat completion failed"))
        text = d["choices"][0]["message"].get("content") or ""
        out = _response(resp_id, model, created, "completed", [_message(msg_id, text)], d.get("usage"))
        if "timings" in d:
            out["timings"] = d["timings"]
        return server._json(out)
    chat = dict(chat, stream=True, stream_options={"include_usage": True})
    return event_stream(_events(server, chat, headers, resp_id, msg_id, model, created),
                        headers={"Cache-Control": "no-cache"})


async def _events(server, chat, headers, resp_id, msg_id, model, created):
    seq = [0]

    def event(kind, **data):
        data = dict(type=kind, sequence_number=seq[0], **data)
        seq[0] += 1
        return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"
    yield event("response.created", response=_response(resp_id, model, created, "in_progress", []))
    yield event("response.in_progress", response=_response(resp_id, model, created, "in_progress", []))
    yield event("response.output_item.added", output_index=0, item=_message(msg_id, "", "in_progress"))
    part = {"type": "output_text", "text": "", "annotations": []}
    yield event("response.content_part.added", item_id=msg_id, output_index=0, content_index=0, part=part)
    text, usage, timings = [], None, None
    async for status, chunk in inprocess.sse(server.app, "/v1/chat/completions", chat, headers):
        if status != 200 or "error" in chunk:
            err = chunk.get("error", {}) if isinstance(chunk, dict) else {}
            yield event("error", code=str(err.get("code") or status), message=err.get("message", "failed"),
                        param=None)
            return
        usage = chunk.get("usage") or usage
        timings = chunk.get("timings") or timings
        extra = {"timings": chunk["timings"]} if "timings" in chunk else {}      # llama-server's telemetry
        if "prompt_progress" in chunk:
            yield event("response.in_progress", response=_response(resp_id, model, created, "in_progress", []),
                        prompt_progress=chunk["prompt_progress"], **extra)
            continue
        for choice in chunk.get("choices", []):
            delta = (choice.get("delta") or {}).get("content")
            if delta:
                text.append(delta)
                yield event("response.output_text.delta", item_id=msg_id, output_index=0, content_index=0,
                            delta=delta, logprobs=[], **extra)
    full = "".join(text)
    yield event("response.output_text.done", item_id=msg_id, output_index=0, content_index=0, text=full,
                logprobs=[])
    yield event("response.content_part.done", item_id=msg_id, output_index=0, content_index=0,
                part=dict(part, text=full))
    yield event("response.output_item.done", output_index=0, item=_message(msg_id, full))
    done = _response(resp_id, model, created, "completed", [_message(msg_id, full)], usage or {})
    yield event("response.completed", response=done, **({"timings": timings} if timings is not None else {}))


async def input_tokens(server, request):
    """/v1/responses/input_tokens: {"input_tokens": n} for what the request would put in the prompt."""
    body = await read_json(request, server.max_body, server.body_timeout)
    status, d = await inprocess.call(server.app, "/v1/chat/completions/input_tokens", to_chat(body),
                                     inprocess.forwarded(request))
    if status != 200:
        raise APIError(status, d.get("error", {}).get("message", "failed"))
    return server._json(d)
