"""MCP servers behind /tools (--mcp-servers-config / --mcp-servers-json) and the web UI's CORS proxy
(--ui-mcp-proxy) on alpaca2 serve.

The MCP servers are real child processes: a small Python script written by the tests (JSON-RPC over
stdio, one message a line) with tools that echo, sleep, crash, report their pid / env / cwd, and
surround their replies with noise.  The manager is tested directly; the endpoints on a real server
subprocess with the tiny model.
"""
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from server_process import ServerProcess  # noqa: E402

from alpaca2.server import args as server_args  # noqa: E402
from alpaca2.server.cors_proxy import forwarded_headers, target_url  # noqa: E402
from alpaca2.server.mcp import (McpConfigError, McpManager, McpServerConfig, _result_to_response,  # noqa: E402
                                load_configs, parse_config)
from alpaca2.server.validation import APIError  # noqa: E402

KEY = "mcp-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}

MCP_SERVER = textwrap.dedent('''\
    import json, os, subprocess, sys, time
    if "--grandchild" in sys.argv:      # a child that inherits our pipes and outlives us
        with open(sys.argv[-1], "w") as f:
            f.write(str(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]).pid))
    TOOLS = [{"name": n, "description": "the " + n + " tool",
              "inputSchema": {"type": "object", "properties": {"message": {"type": "string"}}}}
             for n in ("echo", "sleep", "crash", "whoami", "noisy", "fail")]
    def reply(req_id, result=None, error=None):
        msg = {"jsonrpc": "2.0", "id": req_id}
        msg.update({"error": error} if error else {"result": result})
        return json.dumps(msg) + "\\n"
    def text(t):
        return {"content": [{"type": "text", "text": t}]}
    out = os.fdopen(1, "w")
    for line in sys.stdin:
        req = json.loads(line)
        if "id" not in req:
            continue                                    # notifications/initialized
        method, rid, params = req["method"], req["id"], req.get("params") or {}
        if method == "initialize":
            out.write(reply(rid, {"protocolVersion": "2024-11-05", "capabilities": {"tools": {}},
                                  "serverInfo": {"name": "t", "version": "1"}}))
        elif method == "tools/list":
            out.write(reply(rid, {"tools": TOOLS}))
        elif method == "tools/call":
            name, args = params["name"], params.get("arguments") or {}
            if name == "echo":
                out.write(reply(rid, text(json.dumps(args, sort_keys=True))))
            elif name == "sleep":
                time.sleep(args.get("seconds", 1))
                out.write(reply(rid, text("slept")))
            elif name == "crash":
                os._exit(3)
            elif name == "whoami":
                out.write(reply(rid, text(json.dumps({"pid": os.getpid(), "cwd": os.getcwd(),
                                                      "env": os.environ.get("MCP_TEST_VAR")}))))
            elif name == "noisy":                   # all in one write: progress, garbage, a stale id, the reply
                out.write(json.dumps({"jsonrpc": "2.0", "method": "notifications/progress", "params": {}}) + "\\n"
                          + "THIS IS NOT JSON\\n" + reply(rid - 1000, text("stale")) + "\\r\\n"
                          + reply(rid, {"content": [{"type": "text", "text": "a"}, {"type": "image", "data": ""},
                                                    {"type": "text", "text": "b"}]}))
            elif name == "fail":
                out.write(reply(rid, {"content": [{"type": "text", "text": "it broke"}], "isError": True}))
            else:
                out.write(reply(rid, error={"code": -32602, "message": "unknown tool " + name}))
        else:
            out.write(reply(rid, error={"code": -32601, "message": "no method " + method}))
        out.flush()
''')


@pytest.fixture(scope="module")
def script(tmp_path_factory):
    path = tmp_path_factory.mktemp("mcp") / "mcp_test_server.py"
    path.write_text(MCP_SERVER)
    return str(path)


def cfg(script, name="t", *extra, **kw):
    return McpServerConfig(name, sys.executable, [script, *extra], **kw)


@pytest.fixture
def manager():
    made = []

    def make(*configs, warm=True):
        m = McpManager(list(configs))
        made.append(m)
        if warm:
            m.warmup()
        return m
    yield make
    for m in made:
        m.close()


def text_of(answer):
    assert "error" not in answer, answer
    return answer["plain_text_response"]


# -- config ------------------------------------------------------------------------------------
def test_config_parsing(tmp_path, capsys):
    servers = parse_config(json.dumps({"mcpServers": {
        "a": {"command": "x", "args": ["1", "2"], "env": {"K": "v"}, "cwd": "/tmp", "timeout_ms": 500},
        "b": {"command": ""},                                   # no command: skipped with a warning
        "c": {"command": "y"}}}))
    assert [(s.name, s.command, s.args, s.env, s.cwd, s.timeout_ms) for s in servers] == [
        ("a", "x", ["1", "2"], {"K": "v"}, "/tmp", 500), ("c", "y", [], {}, "", 30000)]
    assert "'b' has no command" in capsys.readouterr().err
    assert parse_config("{}") == [] and parse_config('{"mcpServers": []}') == []
    for bad_doc, words in [("not json", "failed to parse"), ('{"mcpServers": {"a": 1}}', "must be an object"),
                           ('{"mcpServers": {"a": {"command": "x", "args": [1]}}}', "array of strings"),
                           ('{"mcpServers": {"a": {"command": "x", "env": {"K": 1}}}}', "object of strings"),
                           ('{"mcpServers": {"a": {"command": "x", "timeout_ms": 0}}}', "positive integer")]:
        with pytest.raises(McpConfigError, match=words):
            parse_config(bad_doc)
    path = tmp_path / "mcp.json"
    path.write_text(json.dumps({"mcpServers": {"a": {"command": "from-file"}}}))
    both = load_configs(str(path), json.dumps({"mcpServers": {"a": {"command": "inline"}, "b": {"command": "z"}}}))
    assert [(s.name, s.command) for s in both] == [("a", "from-file"), ("b", "z")]    # the first 'a' wins
    with pytest.raises(McpConfigError, match="failed to open MCP config file"):
        load_configs(str(tmp_path / "missing.json"), None)


def test_flags(tmp_path, capsys):
    inline = json.dumps({"mcpServers": {"e": {"command": "x"}}})
    a = server_args.parse_args(["-m", "x.gguf", "--mcp-servers-json", inline])
    assert [c.name for c in a.mcp_configs] == ["e"] and a.cors_origins == "localhost"
    a = server_args.parse_args(["-m", "x.gguf", "--webui-mcp-proxy"])
    assert a.ui_mcp_proxy and a.cors_origins == "localhost" and a.tools == []
    a = server_args.parse_args(["-m", "x.gguf", "--ui-mcp-proxy", "--cors-origins", "*"])
    assert a.ui_mcp_proxy and a.cors_origins == "*"
    a = server_args.parse_args(["-m", "x.gguf", "-ag"])
    assert a.ui_mcp_proxy and a.tools == ["all"]
    a = server_args.parse_args(["-m", "x.gguf"])
    assert not a.ui_mcp_proxy and a.mcp_configs == [] and a.cors_origins == "*"
    for argv, words in [(["--mcp-servers-json", "not json"], "failed to parse MCP config JSON"),
                        (["--mcp-servers-config", str(tmp_path / "nope.json")], "failed to open MCP config file")]:
        with pytest.raises(SystemExit) as e:
            server_args.parse_args(["-m", "x.gguf", *argv])
        assert e.value.code == 2
        assert words in capsys.readouterr().err


def test_results_as_tools_answer():
    assert _result_to_response({"content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}) == \
        {"plain_text_response": "a\nb"}
    assert _result_to_response({"content": [], "isError": True}) == {"error": "MCP tool returned an error"}
    assert _result_to_response({}) == {"plain_text_response": ""}


# -- the manager, on real child processes ------------------------------------------------------
def test_warmup_lists_tools_and_stops_the_servers(script, manager, capsys):
    m = manager(cfg(script, "good"), McpServerConfig("bad", "this_executable_does_not_exist_12345"))
    assert [(d.server_name, d.name) for d in m.registry][:2] == [("good", "echo"), ("good", "sleep")]
    assert m.registry[0].input_schema["properties"] == {"message": {"type": "string"}}
    assert "bad" in capsys.readouterr().err
    assert not m._sessions                      # warmup sessions are closed; calls spawn their own
    assert json.loads(text_of(m.call_tool("good", "echo", {"message": "hi", "n": 1}))) == {"message": "hi", "n": 1}
    assert m.call_tool("bad", "x", {}) == {"error": "MCP server unavailable: bad"}


def test_noise_around_a_reply_is_skipped(script, manager):
    m = manager(cfg(script), warm=False)
    assert text_of(m.call_tool("t", "noisy", {})) == "a\nb"     # text parts only, joined
    assert text_of(m.call_tool("t", "noisy", {})) == "a\nb"     # the stale reply was not taken for this one
    assert m.call_tool("t", "fail", {}) == {"error": "it broke"}
    assert m.call_tool("t", "nope", {}) == {"error": "unknown tool nope"}


def test_timeout_then_the_late_reply_is_skipped(script, manager):
    m = manager(cfg(script, timeout_ms=400), warm=False)
    t0 = time.monotonic()
    assert m.call_tool("t", "sleep", {"seconds": 1.5}) == {"error": "request timed out"}
    assert time.monotonic() - t0 < 1.2
    # the server answers the sleep late, then this call: its own reply is the one returned
    m.configs["t"].timeout_ms = 5000
    assert json.loads(text_of(m.call_tool("t", "echo", {"message": "after"}))) == {"message": "after"}


def test_a_crashed_server_is_respawned(script, manager):
    m = manager(cfg(script), warm=False)
    first = json.loads(text_of(m.call_tool("t", "whoami", {})))["pid"]
    assert m.call_tool("t", "crash", {}) == {"error": "transport closed"}
    second = json.loads(text_of(m.call_tool("t", "whoami", {})))["pid"]
    assert second != first
    os.kill(second, signal.SIGKILL)         # killed behind our back: the next call still gets an answer
    time.sleep(0.2)
    third = json.loads(text_of(m.call_tool("t", "whoami", {})))["pid"]
    assert third not in (first, second)


def test_env_and_cwd(script, manager, tmp_path):
    m = manager(cfg(script, env={"MCP_TEST_VAR": "set"}, cwd=str(tmp_path)), warm=False)
    info = json.loads(text_of(m.call_tool("t", "whoami", {})))
    assert info["env"] == "set" and info["cwd"] == str(tmp_path)


def test_concurrent_calls_get_their_own_replies(script, manager):
    m = manager(cfg(script), warm=False)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: m.call_tool("t", "echo", {"message": f"m{i}"}), range(24)))
    assert [json.loads(text_of(a))["message"] for a in answers] == [f"m{i}" for i in range(24)]
    assert len(m._sessions) == 1


def test_shutdown_cancels_a_waiting_call(script, manager):
    m = manager(cfg(script), warm=False)
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(m.call_tool, "t", "sleep", {"seconds": 20})
        time.sleep(1.0)
        t0 = time.monotonic()
        m.shutdown()
        assert future.result(5) == {"error": "cancelled"}
        assert time.monotonic() - t0 < 1
    assert m.call_tool("t", "echo", {}) == {"error": "MCP server unavailable: t"}


def test_close_kills_grandchildren_and_does_not_hang(script, manager, tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    m = manager(cfg(script, "t", "--grandchild", str(pid_file)), warm=False)
    assert text_of(m.call_tool("t", "echo", {})) == "{}"
    grandchild = int(pid_file.read_text())
    t0 = time.monotonic()
    m.close()
    assert time.monotonic() - t0 < 2.5
    time.sleep(0.2)
    assert not running(grandchild)              # killed with its group


def running(pid: int) -> bool:
    """True while pid is a live process (a zombie that init has not reaped yet is not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# -- the CORS proxy's rules --------------------------------------------------------------------
def test_proxy_target_urls():
    assert target_url("http://h:81/p?q=1#frag") == "http://h:81/p?q=1"
    assert target_url("https://h") == "https://h/"
    for url, words in [(None, "missing 'url'"), ("ftp://h/", "unsupported URL scheme"),
                       ("file:///etc/passwd", "unsupported URL scheme"), ("http:///p", "missing host"),
                       ("http://u:p@h/", "authentication"), ("http://h:port/", "invalid target URL")]:
        with pytest.raises(APIError, match=words) as e:
            target_url(url)
        assert e.value.status == 400


def test_proxy_forwards_only_the_explicit_headers():
    prefix = "x-llama-server-proxy-header-"
    got = forwarded_headers({"authorization": "Bearer ours", "cookie": "c", "x-api-key": "k",
                             prefix + "authorization": "Bearer theirs", prefix: "empty name",
                             "X-Llama-Server-Proxy-Header-Mcp-Session-Id": "s",
                             prefix + "host": "evil", prefix + "accept-encoding": "gzip"})
    assert got == {"accept-encoding": "identity", "authorization": "Bearer theirs", "mcp-session-id": "s"}


# -- the endpoints -----------------------------------------------------------------------------
class Target(BaseHTTPRequestHandler):
    """The proxied site: records what it got, answers with a status, cookies, CORS headers and a
    body sent in pieces."""
    def _answer(self):
        length = int(self.headers.get("content-length") or 0)
        self.server.seen.append((self.command, self.path, dict(self.headers), self.rfile.read(length)))
        if self.path.startswith("/redirect"):
            self.send_response(302)
            self.send_header("Location", "/final")
            self.end_headers()
            return
        self.send_response(201)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Set-Cookie", "site=1")
        self.send_header("Access-Control-Allow-Origin", "*")
        self.send_header("Mcp-Session-Id", "abc")
        self.end_headers()
        for piece in (b"data: one\n\n", b"data: two\n\n"):
            self.wfile.write(piece)
            self.wfile.flush()
    do_GET = do_POST = _answer

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def target():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Target)
    srv.seen = []
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def server(tiny_path, script):
    mcp = {"mcpServers": {"t": {"command": sys.executable, "args": [script]},
                          "gone": {"command": "this_executable_does_not_exist_12345"}}}
    s = ServerProcess(tiny_path, "-np", "1", "-c", "256", "--api-key", KEY, "--ui-mcp-proxy",
                      "--mcp-servers-json", json.dumps(mcp))
    yield s
    s.stop()


def call(server, tool, params, headers=None, **body):
    return httpx.post(server.url + "/tools", json={"tool": tool, "params": params, **body},
                      headers={**AUTH, **(headers or {})}, timeout=60)


def test_mcp_tools_in_the_listing(server):
    r = httpx.get(server.url + "/tools")
    assert r.status_code == 401
    tools = httpx.get(server.url + "/tools", headers=AUTH).json()
    assert [t["tool"] for t in tools] == ["t_echo", "t_sleep", "t_crash", "t_whoami", "t_noisy", "t_fail"]
    assert tools[0] == {"display_name": "t_echo", "tool": "t_echo", "type": "mcp", "permissions": {"write": False},
                        "uses_cwd": False, "definition": {"type": "function", "function": {
                            "name": "t_echo", "description": "the echo tool",
                            "parameters": {"type": "object", "properties": {"message": {"type": "string"}}}}}}
    # CORS: this machine's origins only, as with the built-in tools
    r = httpx.options(server.url + "/tools", headers={"Origin": "http://evil.com"})
    assert "Access-Control-Allow-Origin" not in r.headers


def test_mcp_tool_calls(server):
    # the x-tool-* headers are for the built-in tools: an MCP server gets the params as they came
    r = call(server, "t_echo", {"message": "hi"}, headers={"x-tool-cwd": "/tmp", "x-resp-type": "base64"})
    assert r.status_code == 200
    assert json.loads(r.json()["plain_text_response"]) == {"message": "hi"}
    assert call(server, "t_fail", {}).json() == {"error": "it broke"}
    r = call(server, "t_echo", {}, stream=True)
    assert r.status_code == 404 and "does not support stream" in r.json()["message"]
    assert call(server, "t_crash", {}).json() == {"error": "transport closed"}
    assert call(server, "t_echo", {"message": "again"}).status_code == 200
    r = call(server, "gone_x", {})
    assert r.status_code == 404         # its server never started: no tools of it are listed


def test_cors_proxy(server, target):
    base = f"http://127.0.0.1:{target.server_port}"
    target.seen.clear()
    r = httpx.post(server.url + "/cors-proxy", params={"url": base + "/mcp?x=1"}, content=b'{"jsonrpc": "2.0"}',
                   headers={**AUTH, "Cookie": "ours=1", "x-llama-server-proxy-header-content-type": "application/json",
                            "x-llama-server-proxy-header-authorization": "Bearer site-token"}, timeout=30)
    assert r.status_code == 201
    assert r.text == "data: one\n\ndata: two\n\n"
    assert r.headers["mcp-session-id"] == "abc" and r.headers["content-type"] == "text/event-stream"
    assert "set-cookie" not in r.headers and "access-control-allow-origin" not in r.headers
    method, path, headers, body = target.seen[-1]
    headers = {k.lower(): v for k, v in headers.items()}
    assert (method, path, body) == ("POST", "/mcp?x=1", b'{"jsonrpc": "2.0"}')
    assert headers["authorization"] == "Bearer site-token" and headers["content-type"] == "application/json"
    assert "cookie" not in headers and "x-api-key" not in headers
    assert not any(k.startswith("x-llama-server-proxy-header") for k in headers)
    # redirects are followed
    r = httpx.get(server.url + "/cors-proxy", params={"url": base + "/redirect"}, headers=AUTH, timeout=30)
    assert r.status_code == 201 and target.seen[-1][1] == "/final"
    # the API key applies; bad targets are the client's error, dead ones a gateway error
    assert httpx.get(server.url + "/cors-proxy", params={"url": base}).status_code == 401
    r = httpx.get(server.url + "/cors-proxy", params={"url": "file:///etc/passwd"}, headers=AUTH)
    assert r.status_code == 400 and "unsupported URL scheme" in r.json()["error"]["message"]
    r = httpx.get(server.url + "/cors-proxy", params={"url": "http://127.0.0.1:1/"}, headers=AUTH, timeout=30)
    assert r.status_code == 502 and r.json()["error"]["code"] == "proxy_error"
    assert httpx.put(server.url + "/cors-proxy", params={"url": base}, headers=AUTH).status_code == 405


def test_without_the_flags_both_are_disabled(tiny_path):
    s = ServerProcess(tiny_path, "-np", "1", "-c", "256")
    try:
        for r in (httpx.get(s.url + "/cors-proxy", params={"url": "http://127.0.0.1/"}), httpx.get(s.url + "/tools")):
            assert r.status_code == 403 and r.json()["error"]["type"] == "feature_disabled"
    finally:
        s.stop()


def test_shutdown_does_not_wait_for_a_slow_mcp_call(tiny_path, tmp_path):
    script = str(tmp_path / "slow_mcp_server.py")     # its own copy: pgrep finds only this server's child
    with open(script, "w") as f:
        f.write(MCP_SERVER)
    mcp = {"mcpServers": {"slow": {"command": sys.executable, "args": [script], "timeout_ms": 60000}}}
    s = ServerProcess(tiny_path, "-np", "1", "-c", "256", "--mcp-servers-json", json.dumps(mcp))
    try:
        with ThreadPoolExecutor(1) as pool:
            future = pool.submit(call, s, "slow_sleep", {"seconds": 30})
            time.sleep(1.5)
            t0 = time.monotonic()
            s.proc.send_signal(signal.SIGTERM)
            s.proc.wait(10)
            assert time.monotonic() - t0 < 4
            try:
                r = future.result(10)
                assert r.json() == {"error": "cancelled"}
            except httpx.TransportError:
                pass
        children = subprocess.run(["pgrep", "-f", script], capture_output=True, text=True).stdout.split()
        assert not children, "the MCP server outlived alpaca2"
    finally:
        s.stop()
