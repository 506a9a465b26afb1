"""Anthropic's Messages API: POST /v1/messages (streamed as Anthropic's events) and
/v1/messages/count_tokens, over the same engine and chat template.  Mixed into Server.

Anthropic's request becomes OpenAI-shaped messages (the system prompt first, text blocks joined;
tool_result blocks as text), and the answer goes back as Anthropic's content blocks.
"""
from __future__ import annotations

import asyncio
import json
import uuid

from alpaca2.errors import Alpaca2Error
from alpaca2.server.validation import APIError, bad, number, read_json

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens"}


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


class AnthropicRoutes:
    """/v1/messages and /v1/messages/count_tokens (a mixin of Server)."""

    def anthropic_routes(self) -> list:
        from starlette.routing import Route
        return [Route("/v1/messages", self.messages, methods=["POST"]),
                Route("/v1/messages/count_tokens", self.count_tokens, methods=["POST"])]

    def _anthropic_messages(self, body):
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise bad("'messages' must be a non-empty list", "messages")
        out = []
        system = body.get("system")
        if system is not None:
            out.append({"role": "system", "content": _text_of(system, "system")})
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
                raise bad(f"messages[{i}]: role must be user or assistant", "messages")
            out.append({"role": m["role"], "content": _text_of(m.get("content", ""), f"messages[{i}]")})
        return self.messages_of({"messages": out})

    async def _anthropic_tokens(self, body):
        messages = self._anthropic_messages(body)
        try:
            return await asyncio.to_thread(self.template.tokenize_messages, self.model, messages)
        except (ValueError, RuntimeError, Alpaca2Error) as e:
            raise bad(f"cannot format these messages: {e}", "messages") from None

    async def count_tokens(self, request):
        body = await read_json(request, self.max_body, self.body_timeout)
        return self._json({"input_tokens": len(await self._anthropic_tokens(body))})

    async def messages(self, request):
        body = await read_json(request, self.max_body, self.body_timeout)
        if body.get("tools") and (body.get("tool_choice") or {}).get("type") != "none":
            raise bad("tools are not supported yet", "tools")
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
            from starlette.responses import StreamingResponse

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
                        reason, seq = stop_info()
                        yield event("message_delta", {"delta": {"stop_reason": reason, "stop_sequence": seq},
                                                      "usage": {"output_tokens": job.completion_tokens}})
                        yield event("message_stop", {})
                    else:
                        yield event("error", {"error": {"type": "api_error", "message": ev[2]}})
                        return

            return StreamingResponse(events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        results = await self.collect(request, jobs)
        if results is None:
            from starlette.responses import Response
            return Response(status_code=499)
        reason, seq = stop_info()
        return self._json(dict(head, content=[{"type": "text", "text": results[0]["text"]}], stop_reason=reason,
                               stop_sequence=seq, usage=usage(job.completion_tokens)))
