"""Requests through the server's own ASGI app, in-process: Vertex AI's /predict runs each instance
this way, and /v1/responses runs a chat completion.  The app is the routed Starlette app (not
Server.__call__): the outer request was already authenticated and counted."""
from __future__ import annotations

import asyncio
import json


def _scope(path: str, body: bytes, headers) -> dict:
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
            "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            + list(headers), "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0)}


def forwarded(request) -> list:
    """The outer request's credentials, for the inner one."""
    return [(k, v) for k, v in request.scope.get("headers", ()) if k in (b"authorization", b"x-api-key")]


async def stream(app, path: str, payload: dict, headers=()):
    """POST payload as JSON; yields (status, piece of the body) as the app sends them."""
    body = json.dumps(payload).encode()
    queue: asyncio.Queue = asyncio.Queue()
    state = {"sent": False, "status": 500}
    gone = asyncio.Event()

    async def receive():
        if not state["sent"]:
            state["sent"] = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()                     # the caller stopped reading: a disconnect
        return {"type": "http.disconnect"}

    async def send(message):
        if message["type"] == "http.response.start":
            state["status"] = message["status"]
        elif message["type"] == "http.response.body":
            await queue.put(message.get("body", b""))
            if not message.get("more_body"):
                await queue.put(None)

    task = asyncio.ensure_future(app(_scope(path, body, headers), receive, send))
    task.add_done_callback(lambda _: queue.put_nowait(None))
    try:
        while True:
            piece = await queue.get()
            if piece is None:
                break
            yield state["status"], piece
    finally:
        gone.set()
        await asyncio.gather(task, return_exceptions=True)


async def call(app, path: str, payload: dict, headers=()) -> tuple:
    """POST payload as JSON; returns (status, the body's JSON, or its text when it is not JSON)."""
    status, pieces = 500, []
    async for status, piece in stream(app, path, payload, headers):
        pieces.append(piece)
    data = b"".join(pieces)
    try:
        return status, json.loads(data) if data else None
    except ValueError:
        return status, data.decode("utf-8", "replace")


async def sse(app, path: str, payload: dict, headers=()):
    """POST a streaming request; yields (status, JSON of each `data:` line); a non-SSE (error)
    answer comes as one (status, its JSON)."""
    buf, status = b"", 500
    async for status, piece in stream(app, path, payload, headers):
        buf += piece
        while b"\n\n" in buf:
            block, buf = buf.split(b"\n\n", 1)
            for line in block.split(b"\n"):
                if line.startswith(b"data:") and line[5:].strip() != b"[DONE]":
                    try:
                        yield status, json.loads(line[5:])
                    except ValueError:
                        pass
    if buf.strip():
        try:
            yield status, json.loads(buf)
        except ValueError:
            pass
