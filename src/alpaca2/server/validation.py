"""Request validation shared by the API layers: the OpenAI error shape, numbers, bodies, messages."""
from __future__ import annotations

import asyncio
import itertools
import json
import math
import re


class APIError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None, headers: dict | None = None,
                 extra: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = headers or {}
        self.extra = extra or {}       # more fields of the error object (llama-server's n_ctx ...)

    def body(self) -> dict:
        return {"error": dict({"message": self.message, "type": self.type, "param": self.param, "code": self.code},
                              **self.extra)}


def check_text(text: str, field: str) -> str:
    """User text reaches llama.cpp as C strings in places (chat templates): a NUL would silently
    cut it there, so it is refused; other control characters are kept as they are."""
    if "\x00" in text:
        raise bad(f"'{field}' contains a NUL character (U+0000), which cannot be passed to the model", field)
    return text


def bad(message, param=None, code=None):
    return APIError(400, message, param=param, code=code)

def number(body, key, lo, hi, integer=False):
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
        raise bad(f"'{key}' must be {'an integer' if integer else 'a number'}, got {json.dumps(v)}", key)
    if not (lo <= v <= hi) or (isinstance(v, float) and not math.isfinite(v)):
        raise bad(f"'{key}' must be between {lo} and {hi}, got {v}", key)
    return v



MAX_DEPTH = 128          # JSON nesting: any real request is far below; 10,000 levels is an attack
_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)


def json_depth(data: bytes) -> int:
    """How deep the arrays and objects of a JSON text nest, without parsing it (linear, no recursion)."""
    if data.count(b"[") + data.count(b"{") <= MAX_DEPTH:
        return 0 if not (b"[" in data or b"{" in data) else 1     # cannot be deeper than MAX_DEPTH
    brackets = _STRING.sub(b"", data).translate(None, _NOT_BRACKETS)
    return max(itertools.accumulate(1 if c in b"[{" else -1 for c in brackets), default=0)


async def read_body(request, max_body: int, timeout: float | None = None) -> bytes:
    """The request's body; 400 when it is over max_body bytes, 408 when it does not arrive within
    timeout seconds."""
    chunks, size = [], 0

    async def read():
        nonlocal chunks, size
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body:
                # read on (discarding) a little longer, so a client still sending gets the answer
                # rather than a reset connection; a much larger body is cut off
                if size > 8 * max_body:
                    break
                chunks = []
                continue
            chunks.append(chunk)
    try:
        await asyncio.wait_for(read(), timeout)
    except asyncio.TimeoutError:
        raise APIError(408, f"the request body did not arrive within {timeout:g} s", code="request_timeout") from None
    if size > max_body:
        raise bad(f"the request body is over the limit of {max_body} bytes", code="request_too_large")
    return b"".join(chunks)


async def read_json(request, max_body: int, timeout: float | None = None, array: bool = False):
    """The request's body as a JSON object (array=True: a JSON array); 400 when it is too large, too
    deep, not JSON, or not an object (array), or when it does not arrive within timeout seconds (408)."""
    data = await read_body(request, max_body, timeout)
    if json_depth(data) > MAX_DEPTH:
        raise bad(f"the JSON body nests deeper than {MAX_DEPTH} levels", code="json_too_deep")
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise bad(f"the body is not valid JSON: {e}") from None
    if array:
        if not isinstance(body, list):
            raise bad("Request body must be an array")
    elif not isinstance(body, dict):
        raise bad("the body must be a JSON object")
    return body


async def wait_disconnect(request):
    """Return when the client of a (body-read) request disconnects."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
