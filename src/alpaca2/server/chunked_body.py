"""The body of a streamed (chunked) response, framed here instead of by h11: the per-token cost
of a stream.

uvicorn's h11 protocol sends each ASGI body message by building an ``h11.Data`` event and running
it through h11's state machine, which for a chunk of a chunked body in progress changes nothing
and writes ``b"%x\\r\\n" % len(data) + data + b"\\r\\n"``.  ``install`` gives a request's
RequestResponseCycle a ``send`` that writes that frame itself while the response is a chunked
body in progress (started, not complete, no HEAD, the client still there, writing not paused,
h11 in SEND_BODY with its ChunkedWriter); every other message (the start, the last body message,
a paused or closed connection, anything unusual) goes to uvicorn's own send as before.  The bytes
on the wire are the same: h11's framing is checked once (``h11_frames_as_we_do``) and the fast
path stays off if this h11 frames differently or lacks what it relies on.
"""
from __future__ import annotations

_checked = None


def frame(data) -> bytes:
    """One chunk of a chunked body (h11's ChunkedWriter: nothing for empty data)."""
    return b"%x\r\n%b\r\n" % (len(data), data) if data else b""


def h11_frames_as_we_do() -> bool:
    """Whether this h11 writes a chunked body's Data events as ``frame`` does (checked once)."""
    global _checked
    if _checked is None:
        try:
            import h11
            from h11._writers import ChunkedWriter
            conn = h11.Connection(h11.SERVER)
            conn.receive_data(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n")
            conn.next_event()
            conn.next_event()
            conn.send(h11.Response(status_code=200, headers=[]))
            samples = (b"x", b"data: {}\n\n" * 300, "é🦙\r\n".encode(), bytearray(b"ab"), memoryview(b"cd"))
            _checked = (type(conn._writer) is ChunkedWriter and conn.our_state is h11.SEND_BODY and
                        all(conn.send(h11.Data(data=d)) == frame(d) for d in samples) and
                        conn.our_state is h11.SEND_BODY)
        except Exception:
            _checked = False
    return _checked


def install(cycle):
    """Give uvicorn's RequestResponseCycle (h11) the fast send for its chunked body messages."""
    if not h11_frames_as_we_do():
        return
    import h11
    from h11._writers import ChunkedWriter
    try:
        slow, conn, transport, flow = cycle.send, cycle.conn, cycle.transport, cycle.flow
        if cycle.scope["method"] == "HEAD" or not all(
                hasattr(cycle, a) for a in ("response_started", "response_complete", "disconnected")):
            return
        flow.write_paused       # (the attribute uvicorn's send reads)
    except (AttributeError, KeyError, TypeError):
        return
    SEND_BODY = h11.SEND_BODY

    async def send(message):
        if (message["type"] == "http.response.body" and message.get("more_body", False) and cycle.response_started
                and not cycle.response_complete and not cycle.disconnected and not flow.write_paused
                and conn.our_state is SEND_BODY and type(conn._writer) is ChunkedWriter):
            body = message.get("body", b"")
            if body:
                transport.write(b"%x\r\n%b\r\n" % (len(body), body))
            return
        await slow(message)
    cycle.send = send
