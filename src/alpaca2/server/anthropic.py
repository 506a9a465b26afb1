"""Anthropic's Messages API: POST /v1/messages (streamed as Anthropic's events) and
/v1/messages/count_tokens, over the same engine and chat template.  Mixed into Server.

Anthropic's request becomes OpenAI-shaped messages (the system prompt first, text blocks joined),
and the answer goes back as Anthropic's content blocks.  With a Jinja template (server/tools.py),
as llama-server: tools and tool_choice become OpenAI's, tool_use blocks assistant tool_calls,
tool_result blocks "tool" messages, and the answer's tool calls come back as tool_use blocks
(thinking as a thinking block).
"""
from __future__ import annotations

import asyncio
import json
import uuid

from alpaca2.errors import Alpaca2Error
from alpaca2.server.tools import tool_calls_json
from alpaca2.server.validation import APIError, bad, number, read_json
from alpaca2.server.sse import event_stream

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}
# fields passed on to the OpenAI-shaped request as they are (logit_bias, seed: alpaca2's extension)
PASSED_ON = ("temperature", "top_p", "top_k", "stream", "chat_template_kwargs", "logit_bias", "seed")


def _block_message(role, content, where) -> list:
    """One Anthropic message with content blocks as OpenAI messages: the message (text, tool_use as
    tool_calls, thinking as reasoning_content), then a "tool" message per tool_result."""
    texts, calls, results, thinking = [], [], [], ""
    for block in content:
        if not isinstance(block, dict):
            raise bad(f"{where}: each content block must be an object", "messages")
        kind = block.get("type")
        if kind == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif kind == "thinking":
            thinking += str(block.get("thinking", ""))
        elif kind == "redacted_thinking":
            continue
        elif kind == "tool_use":
            if not isinstance(block.get("name"), str) or not isinstance(block.get("input", {}), dict):
                raise bad(f"{where}: a tool_use block needs a name and an input object", "messages")
            calls.append({"id": str(block.get("id", "")), "type": "function",
                          "function": {"name": block["name"], "arguments": json.dumps(block.get("input", {}))}})
        elif kind == "tool_result":
            results.append({"role": "tool", "tool_call_id": str(block.get("tool_use_id", "")),
                            "content": _text_of(block.get("content", ""), where)})
        elif kind == "image":
            raise APIError(500, "image input is not supported by this server", type="api_error")
        else:
            raise bad(f"{where}: unsupported content block type {kind!r}", "messages")
    out = []
    if texts or calls or thinking:
        msg = {"role": role, "content": "".join(texts)}
        if calls:
            msg["tool_calls"] = calls
        if thinking:
            msg["reasoning_content"] = thinking
        out.append(msg)
    return out + results


def to_openai(body) -> dict:
    """An Anthropic Messages request as an OpenAI chat request (llama-server's conversion; a named
    tool_choice stays named)."""
    messages = body.get("messages")
    if not isinstance(messages, list):      # empty is allowed, as llama-server: the template's start only
        raise bad("'messages' must be a list", "messages")
    out = []
    if body.get("system") is not None:
        out.append({"role": "system", "content": _text_of(body["system"], "system")})
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise bad(f"messages[{i}]: role must be user or assistant", "messages")
        content = m.get("content", "")
        if isinstance(content, list):
            out += _block_message(m["role"], content, f"messages[{i}]")
        elif isinstance(content, str):
            out.append({"role": m["role"], "content": content})
        else:
            raise bad(f"messages[{i}]: content must be a string or a list of blocks", "messages")
    oai = {"messages": out, "max_tokens": body.get("max_tokens")}
    if body.get("stop_sequences") is not None:
        oai["stop"] = body["stop_sequences"]
    for key in PASSED_ON:
        if key in body:
            oai[key] = body[key]
    thinking = body.get("thinking")
    if isinstance(thinking, dict) and thinking.get("type") == "enabled":     # as llama-server: a budget
        budget = thinking.get("budget_tokens", 10000)
        if isinstance(budget, bool) or not isinstance(budget, int):
            raise bad("'thinking.budget_tokens' must be an integer", "thinking")
        oai["thinking_budget_tokens"] = budget
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
            raise bad("'tools' must be a list of tool objects", "tools")
        oai["tools"] = [{"type": "function", "function": {
            "name": t.get("name"), "description": t.get("description", ""),
            "parameters": t.get("input_schema", {})}} for t in tools]
    choice = body.get("tool_choice")
    if choice is not None:
        kind = choice.get("type") if isinstance(choice, dict) else None
        if kind not in ("auto", "any", "tool", "none"):
            raise bad("'tool_choice' must be {\"type\": auto, any, tool or none}", "tool_choice")
        oai["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}.get(kind) or {
            "type": "function", "function": {"name": choice.get("name")}}
        if choice.get("disable_parallel_tool_use"):
            oai["parallel_tool_calls"] = False
    return oai


def _text_of(content, where) -> str:
    """An Anthropic content (a string or blocks) as text; images are refused (no vision here)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad(f"{where}: content must be a string or a list of blocks", "messages")
    parts = []
    for block in content:
        if not isinstance(block, dict):
            raise bad(f"{where}: each content block must be an object", "messages")
        kind = block.get("type")
        if kind == "text" and isinstance(block.get("text"), str):
            parts.append(block["text"])
        elif kind == "tool_result":
            parts.append(_text_of(block.get("content", ""), where))
        elif kind == "image":
            raise APIError(500, "image input is not supported by this server", type="api_error")
        elif kind in ("tool_use", "thinking", "redacted_thinking"):
            continue
        else:
            raise bad(f"{where}: unsupported content block type {kind!r}", "messages")
    return "".join(parts)


def _message_end(event, reason, seq, output_tokens):
    """The last two events of a streamed message: its stop reason and usage, then message_stop."""
    yield event("message_delta", {"delta": {"stop_reason": reason, "stop_sequence": seq},
                                  "usage": {"output_tokens": output_tokens}})
    yield event("message_stop", {})


class AnthropicRoutes:
    """/v1/messages and /v1/messages/count_tokens (a mixin of Server)."""

    def anthropic_routes(self) -> list:
        from starlette.routing import Route
        return [Route("/v1/messages", self.messages, methods=["POST"]),
                Route("/v1/messages/count_tokens", self.count_tokens, methods=["POST"])]

    def _anthropic_messages(self, body):
        messages = body.get("messages")
        if not isinstance(messages, list):
            raise bad("'messages' must be a list", "messages")
        out = []
        system = body.get("system")
        if system is not None:
            out.append({"role": "system", "content": _text_of(system, "system")})
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
                raise bad(f"messages[{i}]: role must be user or assistant", "messages")
            out.append({"role": m["role"], "content": _text_of(m.get("content", ""), f"messages[{i}]")})
        return self.messages_of({"messages": out}) if out else []

    async def _anthropic_tokens(self, body):
        oai = to_openai(body)
        if self.uses_formatter(oai):
            return (await self.render(oai, allow_empty=True))["prompt_tokens"]
        messages = self._anthropic_messages(body)
        try:
            tokens = await asyncio.to_thread(self.template.tokenize_messages, self.model, messages)
        except (ValueError, RuntimeError, Alpaca2Error) as e:
            raise bad(f"cannot format these messages: {e}", "messages") from None
        if not tokens:
            raise bad("the prompt is empty: give at least one message", "messages")
        return tokens

    async def count_tokens(self, request):
        body = await read_json(request, self.max_body, self.body_timeout)
        return self._json({"input_tokens": len(await self._anthropic_tokens(body))})

    async def messages(self, request):
        body = await read_json(request, self.max_body, self.body_timeout)
        oai = to_openai(body)
        if self.uses_formatter(oai):
            return await self.formatter_messages_answer(request, body, oai)
        self.check_no_tools(oai)
        tokens = await self._anthropic_tokens(body)
        stop = body.get("stop_sequences")
        fields = {"max_tokens": number(body, "max_tokens", 1, 1 << 31, integer=True), "stop": stop}
        for key in ("temperature", "top_p", "top_k"):
            if body.get(key) is not None:
                fields[key] = body[key]
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise bad("'stream' must be true or false", "stream")
        jobs = self.jobs_for(fields, tokens, self.template.strip_leading_space)
        job = jobs[0]
        self.submit(jobs)
        mid = "msg_" + uuid.uuid4().hex
        head = {"id": mid, "type": "message", "role": "assistant", "model": self.model_id}

        def usage(output):
            return {"input_tokens": len(tokens), "output_tokens": output,
                    "cache_read_input_tokens": job.cached_tokens, "cache_creation_input_tokens": 0}

        def stop_info():
            if job.stop_type == "word":
                return "stop_sequence", job.stopping_word
            return STOP_REASONS.get(job.finish_reason, "end_turn"), None

        if stream:

            def event(kind, data):
                return f"event: {kind}\ndata: " + json.dumps(dict(data, type=kind), ensure_ascii=False) + "\n\n"

            async def events():
                yield event("message_start", {"message": dict(head, content=[], stop_reason=None,
                                                              stop_sequence=None, usage=usage(0))})
                yield event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
                async for _, ev in self.events_of(jobs):
                    if ev[0] == "text":
                        if ev[1]:
                            yield event("content_block_delta", {"index": 0,
                                                                "delta": {"type": "text_delta", "text": ev[1]}})
                    elif ev[0] == "end":
                        yield event("content_block_stop", {"index": 0})
                        for e in _message_end(event, *stop_info(), job.completion_tokens):
                            yield e
                    else:
                        yield event("error", {"error": {"type": "api_error", "message": ev[2]}})
                        return

            return event_stream(events(), headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        results = await self.collect(request, jobs)
        if results is None:
            from starlette.responses import Response
            return Response(status_code=499)
        reason, seq = stop_info()
        return self._json(dict(head, content=[{"type": "text", "text": results[0]["text"]}], stop_reason=reason,
                               stop_sequence=seq, usage=usage(job.completion_tokens)))

    # -- through the Jinja template (tools, thinking) -------------------------------------------
    async def formatter_messages_answer(self, request, body, oai):
        """/v1/messages rendered by the Jinja formatter: tool calls come back as tool_use blocks."""
        number(body, "max_tokens", 1, 1 << 31, integer=True)
        res = await self.render(oai, allow_empty=True)
        if not res["prompt_tokens"]:
            raise bad("the prompt is empty: give at least one message", "messages")
        jobs = self.formatter_jobs(oai, res, 1, 0)
        job = jobs[0]
        self.submit(jobs)
        head = {"id": "msg_" + uuid.uuid4().hex, "type": "message", "role": "assistant", "model": self.model_id}

        def usage(output):
            return {"input_tokens": len(job.tokens), "output_tokens": output,
                    "cache_read_input_tokens": job.cached_tokens, "cache_creation_input_tokens": 0}

        def stop_info(msg):
            if job.stop_type == "word":
                return "stop_sequence", job.stopping_word
            return STOP_REASONS.get(self.finish_of(job.finish_reason, msg), "end_turn"), None

        if not oai.get("stream"):
            results = await self.collect(request, jobs)
            if results is None:
                from starlette.responses import Response
                return Response(status_code=499)
            msg = self.parse_answer(res, results[0]["text"], results[0]["finish"])
            blocks = []
            if msg.get("reasoning_content"):
                blocks.append({"type": "thinking", "thinking": msg["reasoning_content"], "signature": ""})
            if msg.get("content"):
                blocks.append({"type": "text", "text": msg["content"]})
            for call in tool_calls_json(msg):
                blocks.append(dict(type="tool_use", **call))
            reason, seq = stop_info(msg)
            return self._json(dict(head, content=blocks, stop_reason=reason, stop_sequence=seq,
                                   usage=usage(job.completion_tokens)))

        parser = self.formatter.stream(res)

        def event(kind, data):
            return f"event: {kind}\ndata: " + json.dumps(dict(data, type=kind), ensure_ascii=False) + "\n\n"

        async def events():
            yield event("message_start", {"message": dict(head, content=[], stop_reason=None, stop_sequence=None,
                                                          usage=usage(0))})
            index, open_kind, open_call = -1, None, None

            def switch(kind, call=None, block=None):
                """Close the open block (if another kind or tool call comes) and open the next."""
                nonlocal index, open_kind, open_call
                out = []
                if open_kind == kind and open_call == call:
                    return out
                if open_kind is not None:
                    out.append(event("content_block_stop", {"index": index}))
                index += 1
                open_kind, open_call = kind, call
                out.append(event("content_block_start", {"index": index, "content_block": block}))
                return out

            def blocks_of(deltas):
                out = []
                for d in deltas:
                    if d.get("reasoning_content"):
                        out += switch("thinking", block={"type": "thinking", "thinking": ""})
                        out.append(event("content_block_delta", {"index": index, "delta": {
                            "type": "thinking_delta", "thinking": d["reasoning_content"]}}))
                    if d.get("content"):
                        out += switch("text", block={"type": "text", "text": ""})
                        out.append(event("content_block_delta", {"index": index, "delta": {
                            "type": "text_delta", "text": d["content"]}}))
                    for tc in d.get("tool_calls", []):
                        fn = tc.get("function", {})
                        out += switch("tool_use", tc["index"], {"type": "tool_use", "id": tc.get("id", ""),
                                                                "name": fn.get("name", ""), "input": {}})
                        if fn.get("arguments"):
                            out.append(event("content_block_delta", {"index": index, "delta": {
                                "type": "input_json_delta", "partial_json": fn["arguments"]}}))
                return out

            async for _, ev in self.events_of(jobs):
                if ev[0] == "text":
                    try:
                        deltas = parser.update(ev[1]) if ev[1] else []
                    except (ValueError, Alpaca2Error):
                        deltas = [{"content": ev[1]}]
                    for e in blocks_of(deltas):
                        yield e
                elif ev[0] == "end":
                    try:
                        deltas, msg = parser.finish(), parser.message
                    except (ValueError, Alpaca2Error):
                        deltas, msg = [], {}
                    for e in blocks_of(deltas):
                        yield e
                    if open_kind is None:
                        for e in switch("text", block={"type": "text", "text": ""}):
                            yield e
                    yield event("content_block_stop", {"index": index})
                    for e in _message_end(event, *stop_info(msg), job.completion_tokens):
                        yield e
                else:
                    yield event("error", {"error": {"type": "api_error", "message": ev[2]}})
                    return

        return event_stream(events(), headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
