"""alpaca2.server.chunked_body: a streamed response's chunks framed without h11's state machine
give the same bytes as uvicorn's own send, and the connection stays usable after them."""
import asyncio
import json
import socket

import pytest

h11 = pytest.importorskip("h11")
pytest.importorskip("uvicorn")
pytest.importorskip("starlette")

from alpaca2.server import chunked_body  # noqa: E402
from server_process import NO_EOS, ServerProcess  # noqa: E402


def test_this_h11_frames_chunks_as_the_fast_path_does():
    assert chunked_body.h11_frames_as_we_do()      # else the fast path would be off (and untested)


class Transport:
    def __init__(self):
        self.out = []

    def write(self, data):
        self.out.append(bytes(data))

    def is_closing(self):
        return False

    def pause_reading(self):
        pass

    def resume_reading(self):
        pass


def run_cycle(messages, fast, method="POST"):
    """The bytes uvicorn's RequestResponseCycle writes for these ASGI messages."""
    from uvicorn.protocols.http.flow_control import FlowControl
    from uvicorn.protocols.http.h11_impl import RequestResponseCycle

    async def main():
        conn = h11.Connection(h11.SERVER)
        conn.receive_data(f"{method} / HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n".encode())
        conn.next_event()
        transport = Transport()
        scope = {"type": "http", "method": method, "headers": [], "path": "/", "query_string": b"",
                 "http_version": "1.1", "client": None, "root_path": ""}
        cycle = RequestResponseCycle(scope=scope, conn=conn, transport=transport, flow=FlowControl(transport),
                                     logger=None, access_logger=None, access_log=False, default_headers=[],
                                     message_event=asyncio.Event(), on_response=lambda: None)
        if fast:
            chunked_body.install(cycle)
            installed = getattr(cycle.send, "__func__", None) is not RequestResponseCycle.send
            assert installed == (method != "HEAD")          # a HEAD answer has no body to frame
        for m in messages:
            await cycle.send(m)
        return b"".join(transport.out), conn.our_state
    return asyncio.run(main())


MESSAGES = [{"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]},
            {"type": "http.response.body", "body": b"data: {\"a\": 1}\n\n", "more_body": True},
            {"type": "http.response.body", "body": b"", "more_body": True},
            {"type": "http.response.body", "body": "data: é🦙\n\n".encode(), "more_body": True},
            {"type": "http.response.body", "body": bytearray(b"x" * 5000), "more_body": True},
            {"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": True},
            {"type": "http.response.body", "body": b"", "more_body": False}]


@pytest.mark.parametrize("method", ["POST", "HEAD"])
def test_fast_path_writes_what_uvicorn_writes(method):
    slow, slow_state = run_cycle(MESSAGES, fast=False, method=method)
    fast, fast_state = run_cycle(MESSAGES, fast=True, method=method)
    assert fast == slow
    assert fast_state == slow_state == h11.DONE
    if method == "POST":
        assert b"\r\n\r\n10\r\ndata: {\"a\": 1}\n\n\r\n" in fast and fast.endswith(b"0\r\n\r\n")


@pytest.fixture(scope="module")
def server(tiny_path):
    s = ServerProcess(tiny_path, "-np", "1", "-c", "512")
    yield s
    s.stop()


def test_streams_on_one_keep_alive_connection_parse_as_http(server):
    """Two streamed completions and a plain request on one connection: h11 as the client reads
    every chunk, and the connection is reused (its state stayed right after the framed chunks)."""
    host, port = server.url.rsplit("/", 1)[1].rsplit(":", 1)
    body = json.dumps({"prompt": "Once upon a time", "max_tokens": 12, "temperature": 0, "stream": True,
                       "logit_bias": NO_EOS}).encode()
    client = h11.Connection(h11.CLIENT)
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        for path in ("/v1/completions", "/v1/completions", "/health"):
            post = path != "/health"
            headers = [("host", host), ("content-type", "application/json")]
            headers += [("content-length", str(len(body)))] if post else []
            sock.sendall(client.send(h11.Request(method="POST" if post else "GET", target=path, headers=headers)))
            if post:
                sock.sendall(client.send(h11.Data(data=body)))
            sock.sendall(client.send(h11.EndOfMessage()))
            data, status = b"", None
            while True:
                event = client.next_event()
                if event is h11.NEED_DATA:
                    client.receive_data(sock.recv(65536))
                    continue
                if isinstance(event, h11.Response):
                    status = event.status_code
                    assert (b"transfer-encoding", b"chunked") in event.headers or not post
                elif isinstance(event, h11.Data):
                    data += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
            assert status == 200
            if post:
                events = [line[6:] for line in data.decode().split("\n\n") if line.startswith("data: ")]
                assert events[-1] == "[DONE]"
                chunks = [json.loads(e) for e in events[:-1]]
                assert sum(1 for c in chunks if c["choices"] and c["choices"][0]["text"]) >= 1
                assert chunks[-1]["choices"][0]["finish_reason"] == "length"
            client.start_next_cycle()
