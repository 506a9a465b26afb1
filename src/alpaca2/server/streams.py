"""Resumable streams, as llama-server's (tools/server/server-stream.cpp at the vendored commit).

A streamed answer (``text/event-stream``) to a POST that carries an ``X-Conversation-Id`` header
is recorded: its SSE bytes, as sent.  The generation then outlives its client: when the client
goes away the answer is still made to its end (a page reload can pick it up again).

- ``GET /v1/stream?conv_id=ID&from=N``: the recorded bytes from byte offset N (llama-server's
  ``from`` counts bytes, not events), then live bytes until the answer ends.  400 without
  conv_id, with a bad ``from`` or when the bytes at N were dropped (see the cap); 404 when no
  such stream is kept.
- ``DELETE /v1/stream?conv_id=ID``: the user's Stop: the generation is cancelled and the
  recording dropped; always 204 (idempotent).  400 without conv_id.
- ``POST /v1/streams/lookup`` with ``{"conversation_ids": [...]}``: the kept streams of those ids
  (and of ``ID::model`` variants); nothing is ever listed unasked.
- One recording per conversation: a new stream on the same id cancels and replaces the old one.

Memory is bounded: a recording keeps its last 4 MiB (as llama-server; earlier bytes are dropped and
a resume from them gets 400); a finished one is kept 5 minutes; and at most ``max_sessions`` are
kept (llama-server has no such cap): at the cap the oldest finished one goes, and when every kept
one is still running the new stream is served unrecorded (a plain stream, which ends with its
client).  The API key applies to these paths as to every other.
"""
from __future__ import annotations

import asyncio
import json
import re
import time

from alpaca2.server.sse import BODY_SEND

SESSION_MAX_BYTES = 4 << 20        # llama-server's STREAM_SESSION_MAX_BYTES
SESSION_TTL_S = 300.0              # llama-server's STREAM_SESSION_TTL_SECONDS, from the end of the stream
MAX_SESSIONS = 64                  # ours: at most 64 x 4 MiB kept
HEADER = b"x-conversation-id"
_DISCONNECT = {"type": "http.disconnect"}


class StreamSession:
    """One conversation's recorded answer: a byte buffer that keeps its last ``max_bytes``."""

    def __init__(self, conversation_id: str, max_bytes: int = SESSION_MAX_BYTES):
        self.conversation_id = conversation_id
        self.started_at = int(time.time())
        self.completed_at = 0              # unix seconds once finished, as llama-server's lookup shows
        self.finished_mono = None          # time.monotonic() once finished, for the TTL
        self.max_bytes = max_bytes
        self.buffer = bytearray()
        self.dropped = 0                   # bytes dropped from the front (over the cap)
        self.done = False
        self.cancelled = False
        self._on_cancel = []
        self._wake = asyncio.Event()

    @property
    def total_bytes(self) -> int:
        return self.dropped + len(self.buffer)

    def _notify(self):
        self._wake.set()
        self._wake = asyncio.Event()

    def append(self, data: bytes) -> bool:
        if self.done:
            return False
        if not data:
            return True
        if len(data) >= self.max_bytes:              # one piece over the cap: its tail
            self.dropped += len(self.buffer) + len(data) - self.max_bytes
            self.buffer = bytearray(data[len(data) - self.max_bytes:])
        else:
            over = len(self.buffer) + len(data) - self.max_bytes
            if over > 0:
                del self.buffer[:over]
                self.dropped += over
            self.buffer += data
        self._notify()
        return True

    def finish(self):
        if not self.done:
            self.done = True
            self.completed_at = int(time.time())
            self.finished_mono = time.monotonic()
            self._notify()

    def cancel(self):
        """Stop the generation that writes here (the recorder's receive() reports a disconnect)."""
        if not self.cancelled:
            self.cancelled = True
            for callback in self._on_cancel:
                callback()

    def on_cancel(self, callback):
        self._on_cancel.append(callback)

    async def read(self, offset: int):
        """The bytes from ``offset`` on, as they come, until the stream ends (or the bytes at the
        reader's offset were dropped: the reader fell more than the cap behind)."""
        while True:
            if offset < self.dropped:
                return
            end = self.total_bytes
            if offset < end:
                chunk = bytes(self.buffer[offset - self.dropped:])
                offset = end
                yield chunk
                continue
            if self.done:
                return
            await self._wake.wait()

    def info(self) -> dict:
        return {"conversation_id": self.conversation_id, "is_done": self.done, "total_bytes": self.total_bytes,
                "started_at": self.started_at, "completed_at": self.completed_at}


class StreamSessions:
    """The kept recordings, by conversation id; at most one per id."""

    def __init__(self, max_sessions: int = MAX_SESSIONS, max_bytes: int = SESSION_MAX_BYTES,
                 ttl_s: float = SESSION_TTL_S):
        self.max_sessions = max_sessions
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self.sessions: dict[str, StreamSession] = {}
        self.unrecorded = 0                # streams served without a recording: the cap was full of live ones

    def _expire(self):
        now = time.monotonic()
        for cid, s in list(self.sessions.items()):
            if s.done and now - s.finished_mono >= self.ttl_s:
                del self.sessions[cid]

    def create_or_replace(self, conversation_id: str) -> StreamSession | None:
        """A new recording for the id (the old one is cancelled and dropped); None when the cap is
        full of running streams."""
        self._expire()
        previous = self.sessions.pop(conversation_id, None)
        if previous is not None:
            previous.cancel()
            previous.finish()
        if len(self.sessions) >= self.max_sessions:
            finished = [s for s in self.sessions.values() if s.done]
            if not finished:
                self.unrecorded += 1
                return None
            oldest = min(finished, key=lambda s: s.finished_mono)
            del self.sessions[oldest.conversation_id]
        session = StreamSession(conversation_id, self.max_bytes)
        self.sessions[conversation_id] = session
        return session

    def get(self, conversation_id: str) -> StreamSession | None:
        self._expire()
        return self.sessions.get(conversation_id)

    def evict_and_cancel(self, conversation_id: str):
        session = self.sessions.pop(conversation_id, None)
        if session is not None:
            session.cancel()
            session.finish()

    def lookup(self, ids) -> list:
        self._expire()
        out = []
        for rid in ids:
            prefix = rid + "::"
            out += [s.info() for cid, s in self.sessions.items() if cid == rid or cid.startswith(prefix)]
        return out

    # -- the recorder, around the app (Server.__call__) --------------------------------------
    async def record(self, app, scope, receive, send):
        """Run ``app`` for a request; record its answer when it is a stream and the request names
        a conversation.  A recorded stream goes on when its client disconnects (the app is told of
        the disconnect only once the stream is cancelled: DELETE, or a new stream on the id)."""
        conversation_id = _header(scope, HEADER)
        if scope["method"] != "POST" or not conversation_id:
            scope.setdefault(BODY_SEND, send)       # (the server's own send, when it set one)
            return await app(scope, receive, send)
        session = None
        stopped = asyncio.Event()
        pending = None                 # the client's receive() in flight, kept across calls
        state = {"started": False, "complete": False}

        async def recorder_receive():
            nonlocal pending
            if stopped.is_set():
                return _DISCONNECT
            if pending is None:
                pending = asyncio.ensure_future(receive())
            stop = asyncio.ensure_future(stopped.wait())
            try:
                await asyncio.wait({pending, stop}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stop.cancel()
            if stopped.is_set():
                return _DISCONNECT
            message, pending = pending.result(), None
            if message["type"] == "http.disconnect" and session is not None:
                await stopped.wait()         # the client left a recorded stream: it is made to its end
            return message

        async def recorder_send(message):
            nonlocal session
            if message["type"] == "http.response.start":
                state["started"] = True
                if message["status"] == 200 and _content_type(message).startswith(b"text/event-stream"):
                    session = self.create_or_replace(conversation_id)
                    if session is not None:
                        session.on_cancel(stopped.set)
            elif message["type"] == "http.response.body":
                if session is not None:
                    session.append(message.get("body", b""))
                if not message.get("more_body", False):
                    state["complete"] = True
            await send(message)

        scope[BODY_SEND] = recorder_send
        try:
            await app(scope, recorder_receive, recorder_send)
            if state["started"] and not state["complete"]:     # cancelled mid-stream: end it cleanly
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            if pending is not None:
                pending.cancel()
            if session is not None:
                session.finish()

    # -- the routes ----------------------------------------------------------------------------
    def routes(self) -> list:
        from starlette.routing import Route
        return [Route("/v1/stream", self.get_stream, methods=["GET"]),
                Route("/v1/stream", self.delete_stream, methods=["DELETE"]),
                Route("/v1/streams/lookup", self.lookup_streams, methods=["POST"])]

    async def get_stream(self, request):
        from starlette.responses import StreamingResponse
        session = self.get(_conversation_id(request))
        if session is None:
            raise _api_error(404, "Stream not found or expired", type="not_found_error")
        raw = request.query_params.get("from", "").strip()
        if not raw:
            offset = 0
        elif _OFFSET.fullmatch(raw):
            offset = int(raw)
        else:
            raise _api_error(400, "Invalid 'from' offset: a byte offset (a non-negative integer)")
        if offset < session.dropped:
            raise _api_error(400, f"Stream offset lost, please restart: bytes before {session.dropped} "
                             "are no longer kept")
        return StreamingResponse(session.read(offset), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def delete_stream(self, request):
        from starlette.responses import Response
        self.evict_and_cancel(_conversation_id(request))
        return Response(status_code=204)

    async def lookup_streams(self, request):
        from starlette.responses import Response
        from alpaca2.server.validation import read_json
        body = await read_json(request, 1 << 20, 60.0)
        ids = body.get("conversation_ids", [])
        if not isinstance(ids, list):
            raise _api_error(400, "'conversation_ids' must be a list of strings")
        ids = [i for i in ids if isinstance(i, str) and i]
        return Response(json.dumps(self.lookup(ids)), media_type="application/json")


_OFFSET = re.compile(r"\+?[0-9]{1,19}")


def _api_error(status, message, type="invalid_request_error"):
    from alpaca2.server.validation import APIError
    return APIError(status, message, type=type)


def _conversation_id(request) -> str:
    conversation_id = request.query_params.get("conv_id", "")
    if not conversation_id:
        raise _api_error(400, "Missing conversation id: give it as ?conv_id=")
    return conversation_id


def _header(scope, name: bytes) -> str:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("utf-8", "replace").strip()   # as ?conv_id= is decoded
    return ""


def _content_type(message) -> bytes:
    for key, value in message.get("headers", ()):
        if key.lower() == b"content-type":
            return value.lower()
    return b""
