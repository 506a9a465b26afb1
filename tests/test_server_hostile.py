"""alpaca2 serve against hostile clients: slow or half-sent requests, too many connections, deep
JSON.  Every test talks to 127.0.0.1 only, opens a bounded number of sockets, and waits with
generous deadlines (no timing assertions)."""
import resource
import socket
import subprocess
import sys

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from server_process import ServerProcess  # noqa: E402


@pytest.fixture(scope="module")
def server(tiny_path):
    s = ServerProcess(tiny_path, "-np", "2", "-c", "512", "--header-timeout", "1", "--timeout", "2",
                      "--max-connections", "40")
    yield s
    s.stop()


def address(server):
    host, port = server.url.rsplit("/", 1)[1].rsplit(":", 1)
    return host, int(port)


def read_all(sock):
    """Everything the server sends until it closes the connection (bounded by the socket timeout)."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, socket.timeout):
            break
        if not chunk:
            break
        data += chunk
    return data


def test_slow_headers_get_408_and_are_closed(server):
    with socket.create_connection(address(server), timeout=30) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHo")          # ... and never the rest
        reply = read_all(s)
    assert reply.startswith(b"HTTP/1.1 408")


def test_short_body_gets_408(server):
    with socket.create_connection(address(server), timeout=30) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n{\"prompt\": ")
        reply = read_all(s)
    assert b" 408 " in reply.split(b"\r\n", 1)[0] and b"did not arrive" in reply


def test_idle_connection_is_closed(server):
    with socket.create_connection(address(server), timeout=30) as s:
        assert read_all(s).startswith(b"HTTP/1.1 408")   # nothing sent at all


def test_connection_cap_refuses_gracefully_then_recovers(server):
    socks = []
    try:
        for _ in range(60):
            socks.append(socket.create_connection(address(server), timeout=30))
        refused = 0
        for s in socks[40:]:
            reply = read_all(s)
            refused += reply.startswith(b"HTTP/1.1 503")
        assert refused >= 15           # the cap is 40 (a few of the first may have timed out meanwhile)
    finally:
        for s in socks:
            s.close()
    assert httpx.get(server.url + "/health", timeout=30).status_code == 200


def test_deep_json_is_400_before_parsing(server):
    body = b'{"prompt": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"
    r = httpx.post(server.url + "/v1/completions", content=body, headers={"content-type": "application/json"},
                   timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "json_too_deep"
    assert "Recursion" not in r.text
    wide = b'{"prompt": [' + b",".join(b"[1]" for _ in range(5000)) + b"]}"       # many, but shallow
    r = httpx.post(server.url + "/v1/completions", content=wide, headers={"content-type": "application/json"},
                   timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] != "json_too_deep"


def test_descriptor_exhaustion_is_refused_quietly(tiny_path):
    """With 256 descriptors, 300 idle sockets: the server refuses past its cap instead of running
    out of descriptors (which made asyncio's accept loop spin and log a traceback per retry)."""
    def limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
    cmd = [sys.executable, "-m", "alpaca2", "serve", "-m", str(tiny_path), "--port", "0", "-t", "1",
           "-np", "1", "-c", "256", "--header-timeout", "60"]
    s = ServerProcess.__new__(ServerProcess)
    s.start(cmd, preexec_fn=limit)
    socks = []
    try:
        for _ in range(300):
            socks.append(socket.create_connection(address(s), timeout=30))
        refused = sum(read_all(x).startswith(b"HTTP/1.1 503") for x in socks[200:])
        assert refused == 100
        for x in socks:
            x.close()
        socks = []
        assert httpx.get(s.url + "/health", timeout=30).status_code == 200
    finally:
        for x in socks:
            x.close()
        s.stop()
    log = "".join(s.lines)
    assert "Traceback" not in log and "out of file descriptors" not in log and len(log) < 10_000, log[:3000]


def test_json_depth_ignores_brackets_in_strings():
    from alpaca2.server.validation import MAX_DEPTH, json_depth
    assert json_depth(b'{"a": "' + b"[" * 1000 + b'"}') <= 1
    assert json_depth(b'{"a": "\\"[[[[' + b"{" * 500 + b'"}') <= 1        # an escaped quote stays inside
    deep = b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1)
    assert json_depth(deep) == MAX_DEPTH + 1
    wide = b"[" + b",".join([b"[1]"] * 1000) + b"]"
    assert json_depth(wide) == 2
