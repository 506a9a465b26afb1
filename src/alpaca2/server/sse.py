"""Server-sent events: a JSON object as one ``data:`` event, and the streamed text chunks of a
completion built from a per-request prefix (the per-token cost of a stream).

A text chunk of /v1/completions or /v1/chat/completions differs from the next only in its choice
index and its text, so ``TextChunks`` serializes the rest (id, object, created, model, ...) once
per request and puts ``json.dumps(text)`` between a prebuilt prefix and suffix: the same bytes as
``sse(dict(head, choices=[choice]))`` (tests/test_server_sse.py compares them), at a fraction of
the cost of dumping the whole dict for every token.
"""
from __future__ import annotations

import json
from json.encoder import encode_basestring as _dumps    # json.dumps(a str, ensure_ascii=False)


def sse(data) -> str:
    return "data: " + json.dumps(data, ensure_ascii=False) + "\n\n"


class TextChunks:
    """The SSE text chunks of one streamed completion: ``{**head, "choices": [choice]}`` where
    the choice is ``{"index": i, "text": t, "logprobs": null, "finish_reason": null}`` or, for
    chat, ``{"index": i, "delta": {"content": t}, "logprobs": null, "finish_reason": null}``."""

    def __init__(self, head: dict, chat: bool):
        if not head:
            raise ValueError("a chunk head has at least one field")
        self._prefix = "data: " + json.dumps(head, ensure_ascii=False)[:-1] + ', "choices": [{"index": '
        self._middle = ', "delta": {"content": ' if chat else ', "text": '
        self._suffix = ('}, "logprobs": null, "finish_reason": null}]}\n\n' if chat
                        else ', "logprobs": null, "finish_reason": null}]}\n\n')
        self._index = {}                                     # choice index -> prefix with it

    def text(self, index: int, text: str) -> str:
        """The chunk that carries ``text`` for choice ``index``."""
        start = self._index.get(index)
        if start is None:
            start = self._index[index] = self._prefix + str(index) + self._middle
        return start + _dumps(text) + self._suffix


BODY_SEND = "alpaca2.body_send"     # scope key: where body chunks may go (app.py, streams.record set it)
_response_class = None


def event_stream(chunks, headers=None):
    """Starlette's StreamingResponse (text/event-stream) over ``chunks`` (str or bytes), whose
    body messages go straight to scope[BODY_SEND] (the server's send, or the stream recorder's
    while a stream is recorded: alpaca2.server.streams) instead of through Starlette's and the
    server's own layers, which only forward them (they act on the response start): one await a
    chunk, not five.  The response start and the final empty body still pass every layer."""
    global _response_class
    if _response_class is None:
        from starlette.responses import StreamingResponse

        class EventStreamResponse(StreamingResponse):
            body_send = None

            async def __call__(self, scope, receive, send):
                self.body_send = scope.get(BODY_SEND)
                await super().__call__(scope, receive, send)

            async def stream_response(self, send):
                await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
                body_send = self.body_send or send
                async for chunk in self.body_iterator:
                    if not isinstance(chunk, (bytes, memoryview)):
                        chunk = chunk.encode("utf-8")
                    await body_send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        _response_class = EventStreamResponse
    return _response_class(chunks, media_type="text/event-stream", headers=headers)
