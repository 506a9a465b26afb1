"""Hostile clients: a deadline for each request's head, a cap on open connections, a quiet log.

uvicorn (h11) waits forever for a request's headers and accepts every connection until the
process runs out of file descriptors; then asyncio's accept loop logs a traceback per retry.
Here, on top of uvicorn's own protocol:

- the request head (request line and headers) must arrive within ``header_timeout`` seconds of
  the connection (or of the previous response): else 408 and the connection is closed;
- at most ``max_connections`` are open; one more gets 503 (Retry-After) and is closed at once;
  the cap and the accept backlog are kept under the process's RLIMIT_NOFILE, so descriptors never
  run out;
- "out of system resource" accept errors are logged once a minute, without the traceback.

The body's deadline (``--timeout``) is kept by alpaca2.server.validation.read_json.
"""
from __future__ import annotations

import logging
import time

from alpaca2.server import chunked_body

FD_RESERVE = 64           # descriptors kept for the model, threads, logs and the listening sockets


def limits_for(requested: int) -> tuple[int, int]:
    """(connection cap, accept backlog) under the descriptor limit (first raised to its hard limit).

    asyncio accepts up to ``backlog`` connections in one go before any of them is seen by the
    protocol, so the cap leaves room for one such burst: descriptors then never run out (running
    out made the accept loop retry and log a traceback per failed accept)."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard != resource.RLIM_INFINITY and soft < hard:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
                soft = hard
            except (ValueError, OSError):
                pass
        elif hard == resource.RLIM_INFINITY and soft != resource.RLIM_INFINITY and soft < 65536:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (65536, hard))
                soft = 65536
            except (ValueError, OSError):
                pass
    except ImportError:          # not on POSIX
        return requested, 128
    if soft == resource.RLIM_INFINITY:
        return requested, 128
    backlog = max(8, min(128, soft // 8))
    return max(1, min(requested, soft - max(FD_RESERVE, soft // 8) - backlog)), backlog


def _response(status: bytes, message: str, extra: bytes = b"") -> bytes:
    import json
    body = json.dumps({"error": {"message": message, "type": "server_error", "param": None,
                                 "code": status.split(b" ")[0].decode()}}).encode()
    return (b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\nconnection: close\r\n" + extra +
            b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def guarded_protocol(header_timeout: float, max_connections: int):
    """uvicorn's h11 protocol class with the head deadline and the connection cap."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    busy = _response(b"503 Service Unavailable", f"too many open connections (at most {max_connections}); "
                     "retry later", b"retry-after: 1\r\n")
    late = _response(b"408 Request Timeout", f"the request's headers did not arrive within {header_timeout:g} s")

    class GuardedH11Protocol(H11Protocol):
        refused = 0

        def connection_made(self, transport):
            if len(self.connections) >= max_connections:
                self._refused = True
                self.transport = transport
                GuardedH11Protocol.refused += 1
                transport.write(busy)
                transport.close()
                return
            self._refused = False
            super().connection_made(transport)
            self._head_timer = None
            self._arm()

        def _arm(self):
            self._disarm()
            self._head_timer = self.loop.call_later(header_timeout, self._head_late)

        def _disarm(self):
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_late(self):
            self._head_timer = None
            if not self.transport.is_closing():
                self.transport.write(late)
                self.transport.close()

        def connection_lost(self, exc):
            if self._refused:
                return
            self._disarm()
            super().connection_lost(exc)

        def handle_events(self):
            cycle = self.cycle
            super().handle_events()
            if self.cycle is not cycle:           # a whole request head arrived
                self._disarm()
                if self.cycle is not None:
                    chunked_body.install(self.cycle)     # its chunked body framed without h11's state machine

        def on_response_complete(self):
            super().on_response_complete()
            if not self.transport.is_closing() and self.cycle is not None and self.cycle.response_complete:
                self._arm()                       # the next request's head has the same deadline

    return GuardedH11Protocol


class RateLimitedAcceptErrors(logging.Filter):
    """asyncio's 'socket.accept() out of system resource' at most once a minute, no traceback."""

    def __init__(self, period: float = 60.0):
        super().__init__()
        self.period = period
        self.last = -period

    def filter(self, record):
        msg = record.getMessage()
        if "out of system resource" not in msg and "Too many open files" not in msg:
            return True
        now = time.monotonic()
        if now - self.last < self.period:
            return False
        self.last = now
        record.exc_info = None
        record.exc_text = None
        record.msg, record.args = "alpaca2: out of file descriptors; accepting again in a second", ()
        return True


def quiet_accept_errors():
    logger = logging.getLogger("asyncio")
    if not any(isinstance(f, RateLimitedAcceptErrors) for f in logger.filters):
        logger.addFilter(RateLimitedAcceptErrors())
