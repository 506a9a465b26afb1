"""MCP servers behind /tools (llama-server's --mcp-servers-config / --mcp-servers-json, experimental
there too): each configured server is a child process speaking JSON-RPC 2.0 over its stdin/stdout,
one JSON message a line (MCP's stdio transport).

The config is Cursor's: {"mcpServers": {"<name>": {"command", "args", "env", "cwd", "timeout_ms"}}}.
At start-up each server is spawned once, asked for its tools (10 s at most) and stopped; its tools
join GET /tools as "<name>_<tool>" (type "mcp"), and POST /tools runs one through a session that is
spawned on first use and respawned when it has died (a server that fails to spawn is left alone for
5 s).  Calls to one server are serialised (one request in flight per session); notifications and
stale replies are skipped by id; each call waits timeout_ms at most (default 30 s), and server
shutdown cancels waiting calls at once.  A session's process group is killed when it closes, so a
grandchild that inherited the pipes cannot keep it alive; the pipes are read with a poll, never a
blocking read, so teardown never waits on an EOF that does not come.
"""
from __future__ import annotations

import json
import os
import queue
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from alpaca2.server.builtin_tools import Tool

PROTOCOL_VERSION = "2024-11-05"
DEFAULT_TIMEOUT_MS = 30000          # per call
WARMUP_TIMEOUT = 10.0               # seconds for one server's tool listing at start-up
COOLDOWN = 5.0                      # seconds before a server that failed to spawn is tried again
MAX_LINE = 8 * 1024 * 1024          # a longer line from a server is dropped
MAX_QUEUED = 65536                  # messages read ahead of the caller (unsolicited ones pile up here)
STDERR_TAIL = 4096                  # bytes of a server's stderr kept for the log when it dies
POLL = 0.05                         # seconds: how often blocked readers and writers re-check for shutdown
EXIT_GRACE = 0.5                    # seconds a server gets to exit after its stdin closes


class McpConfigError(ValueError):
    """An MCP config that cannot be read or parsed: the server does not start."""


@dataclass
class McpServerConfig:
    """One entry of "mcpServers"."""
    name: str
    command: str
    args: list = field(default_factory=list)
    env: dict = field(default_factory=dict)         # merged over this process's environment
    cwd: str = ""
    timeout_ms: int = DEFAULT_TIMEOUT_MS


@dataclass
class McpToolDef:
    """A tool as a server lists it (name without the "<server>_" prefix)."""
    server_name: str
    name: str
    description: str = ""
    input_schema: object = None


def _strings(value, what: str) -> list:
    if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
        raise McpConfigError(f"{what} must be an array of strings")
    return value


def parse_config(text: str) -> list:
    """The servers of one Cursor-style JSON document; no "mcpServers" object: none.  An entry
    without a command is skipped (with a warning), as llama-server does."""
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise McpConfigError(f"failed to parse MCP config JSON: {e}") from None
    servers = doc.get("mcpServers") if isinstance(doc, dict) else None
    if not isinstance(servers, dict):
        return []
    out = []
    for name, entry in servers.items():
        if not isinstance(entry, dict):
            raise McpConfigError(f"MCP server '{name}': its entry must be an object")
        command = entry.get("command", "")
        if not isinstance(command, str):
            raise McpConfigError(f"MCP server '{name}': 'command' must be a string")
        if not command:
            print(f"alpaca2: WARNING: MCP server '{name}' has no command, skipping", file=sys.stderr)
            continue
        env = entry.get("env", {})
        if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
            raise McpConfigError(f"MCP server '{name}': 'env' must be an object of strings")
        cwd = entry.get("cwd", "")
        timeout_ms = entry.get("timeout_ms", DEFAULT_TIMEOUT_MS)
        if not isinstance(cwd, str):
            raise McpConfigError(f"MCP server '{name}': 'cwd' must be a string")
        if isinstance(timeout_ms, bool) or not isinstance(timeout_ms, int) or timeout_ms <= 0:
            raise McpConfigError(f"MCP server '{name}': 'timeout_ms' must be a positive integer")
        out.append(McpServerConfig(name, command, list(_strings(entry.get("args", []), f"MCP server '{name}': 'args'")),
                                   dict(env), cwd, timeout_ms))
    return out


def load_configs(config_path: str | None, inline_json: str | None) -> list:
    """--mcp-servers-config's file, then --mcp-servers-json's servers; a name seen twice keeps the first."""
    texts = []
    if config_path:
        try:
            with open(config_path, encoding="utf-8") as f:
                texts.append(f.read())
        except (OSError, UnicodeDecodeError) as e:
            raise McpConfigError(f"failed to open MCP config file: {config_path} ({e})") from None
    if inline_json:
        texts.append(inline_json)
    configs, names = [], set()
    for text in texts:
        parsed = parse_config(text)
        if not parsed:
            print("alpaca2: WARNING: MCP config: no servers found in JSON", file=sys.stderr)
        for cfg in parsed:
            if cfg.name in names:
                print(f"alpaca2: WARNING: MCP config: duplicate server name '{cfg.name}', skipping", file=sys.stderr)
                continue
            names.add(cfg.name)
            configs.append(cfg)
    return configs


class NotDelivered(Exception):
    """The request never reached the server (its stdin was closed): safe to send again elsewhere."""


def _error_message(reply: dict) -> str:
    err = reply.get("error")
    if isinstance(err, dict) and isinstance(err.get("message"), str):
        return err["message"]
    return err if isinstance(err, str) else "unknown error"


def _result_to_response(result) -> dict:
    """An MCP tools/call result as /tools answers: the text parts joined by newlines, or an error."""
    texts = []
    content = result.get("content") if isinstance(result, dict) else None
    for part in content if isinstance(content, list) else ():
        if isinstance(part, dict) and part.get("type") == "text":
            text = part.get("text", "")
            texts.append(text if isinstance(text, str) else json.dumps(text))
    text = "\n".join(texts)
    if isinstance(result, dict) and result.get("isError") is True:
        return {"error": text or "MCP tool returned an error"}
    return {"plain_text_response": text}


class StdioSession:
    """One running MCP server: a child process, a thread reading its stdout into a queue and one
    draining its stderr.  Requests are written by the caller, under the session's lock."""

    def __init__(self, config: McpServerConfig):
        self.config = config
        self.name = config.name
        self.last_error = ""
        self._lock = threading.Lock()           # one request in flight; guards the fields below
        self._next_id = 1
        self._initialized = False
        self._tools: list | None = None
        self._replies: queue.Queue = queue.Queue(MAX_QUEUED)
        self._running = threading.Event()
        self._proc: subprocess.Popen | None = None
        self._threads: list = []
        self._stderr_tail = b""

    # -- process -------------------------------------------------------------------------------
    def start(self) -> bool:
        env = None
        if self.config.env:
            env = dict(os.environ, **self.config.env)
        try:
            # its own process group: closing kills whatever it started too
            self._proc = subprocess.Popen([self.config.command, *self.config.args], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                                          cwd=self.config.cwd or None, start_new_session=True)
        except (OSError, ValueError) as e:
            self.last_error = f"failed to spawn '{self.config.command}': {e}"
            return False
        os.set_blocking(self._proc.stdin.fileno(), False)
        self._running.set()
        self._threads = [threading.Thread(target=self._read_stdout, daemon=True, name=f"mcp-{self.name}-out"),
                         threading.Thread(target=self._read_stderr, daemon=True, name=f"mcp-{self.name}-err")]
        for t in self._threads:
            t.start()
        return True

    @property
    def alive(self) -> bool:
        """False once the server's stdout has ended or the session was closed (never blocks)."""
        return self._running.is_set() and self._proc is not None and self._proc.poll() is None

    def close(self):
        """Stop the server: close its stdin, give it EXIT_GRACE seconds, then kill its process
        group.  Idempotent; returns promptly even if a grandchild holds the pipes."""
        proc = self._proc
        if proc is None:
            return
        self._running.clear()
        try:
            proc.stdin.close()
        except OSError:
            pass
        try:
            proc.wait(EXIT_GRACE)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)     # the group outlives its leader while a grandchild lives
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
        for t in self._threads:
            t.join(1.0)
        for f in (proc.stdout, proc.stderr):
            try:
                f.close()
            except OSError:
                pass

    def diagnostics(self) -> str:
        tail = self._stderr_tail.decode("utf-8", errors="replace").strip()
        return "; ".join(x for x in (self.last_error, tail and f"last stderr: {tail}") if x)

    def _pump(self, f, on_line):
        """Call on_line for each line of f until EOF or close(); polled, so a pipe that a
        grandchild holds open cannot block teardown.  Over-long lines are dropped."""
        fd = f.fileno()
        buf, skipping = b"", False
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        while self._running.is_set():
            if not poller.poll(POLL * 1000):
                continue
            try:
                chunk = os.read(fd, 65536)
            except InterruptedError:
                continue
            except OSError:
                break
            if not chunk:
                break
            buf += chunk
            lines = buf.split(b"\n")
            buf = lines.pop()
            for line in lines:
                if skipping:            # the end of a dropped line
                    skipping = False
                    continue
                line = line.rstrip(b"\r")
                if line:
                    on_line(line)
            if len(buf) > MAX_LINE:
                print(f"alpaca2: WARNING: MCP '{self.name}': dropping a line over {MAX_LINE} bytes", file=sys.stderr)
                buf, skipping = b"", True

    def _read_stdout(self):
        def put(line):
            try:
                self._replies.put_nowait(line)
            except queue.Full:          # nobody asked: unsolicited messages, dropped
                pass
        try:
            self._pump(self._proc.stdout, put)
        finally:
            self._running.clear()       # after the last line is queued: a reader seeing this has seen all

    def _read_stderr(self):
        def keep(line):
            self._stderr_tail = (self._stderr_tail + line + b"\n")[-STDERR_TAIL:]
        self._pump(self._proc.stderr, keep)

    def _write(self, message: dict, deadline: float, should_stop) -> None:
        """Send one message; NotDelivered when nothing of it could be written."""
        data = json.dumps(message).encode() + b"\n"
        fd, sent = self._proc.stdin.fileno(), 0
        while sent < len(data):
            if should_stop() or time.monotonic() >= deadline:
                raise NotDelivered("cancelled") if sent == 0 else OSError("write interrupted")
            try:
                sent += os.write(fd, data[sent:])
            except BlockingIOError:
                select.select([], [fd], [], POLL)
            except (OSError, ValueError) as e:
                if sent == 0:
                    raise NotDelivered(str(e)) from None
                raise

    # -- JSON-RPC ------------------------------------------------------------------------------
    def _rpc(self, method: str, params: dict | None, should_stop) -> dict:
        """Send a request and wait for the reply with its id (the lock is held): the reply, or
        {"error": {...}} for a timeout, cancellation or a dead server.  Raises NotDelivered."""
        request = {"jsonrpc": "2.0", "id": self._next_id, "method": method}
        self._next_id += 1
        if params is not None:
            request["params"] = params
        deadline = time.monotonic() + self.config.timeout_ms / 1000
        if not self.alive:
            raise NotDelivered("transport closed")
        while True:             # what came before this request is stale (notifications, late replies)
            try:
                self._replies.get_nowait()
            except queue.Empty:
                break
        try:
            self._write(request, deadline, should_stop)
        except OSError:
            return {"error": {"code": -32603, "message": "transport closed"}}
        while True:
            if should_stop():
                return {"error": {"code": -32603, "message": "cancelled"}}
            if time.monotonic() >= deadline:
                return {"error": {"code": -32603, "message": "request timed out"}}
            try:
                line = self._replies.get(timeout=POLL)
            except queue.Empty:
                if not self._running.is_set():
                    return {"error": {"code": -32603, "message": "transport closed"}}
                continue
            try:
                reply = json.loads(line)
            except ValueError:
                continue                # a malformed line: skipped
            # no id: a notification; another id: the late reply of a request that timed out
            if isinstance(reply, dict) and reply.get("id") == request["id"] and "method" not in reply:
                return reply

    def _ensure_init(self, should_stop) -> bool:
        if self._initialized:
            return True
        reply = self._rpc("initialize", {"protocolVersion": PROTOCOL_VERSION, "capabilities": {},
                                         "clientInfo": {"name": "alpaca2", "version": "1.0"}}, should_stop)
        if "result" not in reply:
            self.last_error = f"initialize failed: {_error_message(reply)}"
            return False
        try:
            self._write({"jsonrpc": "2.0", "method": "notifications/initialized"},
                        time.monotonic() + self.config.timeout_ms / 1000, should_stop)
        except OSError:
            pass                        # the next request finds out
        self._initialized = True
        return True

    def list_tools(self, should_stop) -> list:
        """The server's tools (asked once per session); [] on failure (see last_error)."""
        with self._lock:
            try:
                if not self._ensure_init(should_stop):
                    return []
                if self._tools is not None:
                    return self._tools
                reply = self._rpc("tools/list", None, should_stop)
            except NotDelivered as e:
                self.last_error = f"tools/list failed: {e}"
                return []
            result = reply.get("result")
            if not isinstance(result, dict):
                self.last_error = f"tools/list failed: {_error_message(reply)}"
                return []
            tools = []
            for t in result.get("tools") or ():
                if isinstance(t, dict) and isinstance(t.get("name"), str) and t["name"]:
                    desc = t.get("description")
                    tools.append(McpToolDef(self.name, t["name"], desc if isinstance(desc, str) else "",
                                            t.get("inputSchema")))
            self._tools = tools
            return tools

    def call_tool(self, tool: str, arguments: dict, should_stop) -> dict:
        """{"plain_text_response": text} or {"error": message}; raises NotDelivered."""
        with self._lock:
            if not self._ensure_init(should_stop):
                return {"error": self.last_error}
            reply = self._rpc("tools/call", {"name": tool, "arguments": arguments}, should_stop)
        if "error" in reply:
            return {"error": _error_message(reply)}
        if "result" in reply:
            return _result_to_response(reply["result"])
        return {"error": "invalid response from MCP server"}


class McpManager:
    """The configured MCP servers: their tools (found at start-up) and a live session per server."""

    def __init__(self, configs: list):
        self.configs = {c.name: c for c in configs}
        self.registry: list = []
        self._sessions: dict = {}
        self._dead_until: dict = {}       # name -> time.monotonic() before which no spawn is tried
        self._lock = threading.Lock()
        self._stopping = threading.Event()

    def warmup(self):
        """Spawn each server once, list its tools (WARMUP_TIMEOUT seconds at most), stop it."""
        found = []
        for cfg in self.configs.values():
            session = StdioSession(cfg)
            if not session.start():
                print(f"alpaca2: WARNING: MCP warmup: {cfg.name}: {session.diagnostics()}", file=sys.stderr)
                continue
            deadline = time.monotonic() + WARMUP_TIMEOUT
            try:
                tools = session.list_tools(lambda: self._stopping.is_set() or time.monotonic() >= deadline)
            finally:
                session.close()
            if not tools and session.last_error:
                print(f"alpaca2: WARNING: MCP warmup: {cfg.name}: {session.diagnostics()}", file=sys.stderr)
            print(f"alpaca2: MCP warmup: '{cfg.name}' discovered {len(tools)} tools", file=sys.stderr)
            found += tools
        self.registry = found

    def _session(self, name: str) -> StdioSession | None:
        stale = None
        try:
            with self._lock:
                if self._stopping.is_set():
                    return None
                now = time.monotonic()
                if self._dead_until.get(name, 0.0) > now:
                    return None
                session = self._sessions.get(name)
                if session is not None and session.alive:
                    return session
                if session is not None:
                    print(f"alpaca2: WARNING: MCP '{name}' is no longer alive: {session.diagnostics()}",
                          file=sys.stderr)
                    stale = self._sessions.pop(name)
                cfg = self.configs.get(name)
                if cfg is None:
                    return None
                fresh = StdioSession(cfg)
                if not fresh.start():
                    print(f"alpaca2: WARNING: MCP '{name}': {fresh.diagnostics()}", file=sys.stderr)
                    self._dead_until[name] = now + COOLDOWN
                    return None
                self._sessions[name] = fresh
                return fresh
        finally:
            if stale is not None:
                stale.close()

    def call_tool(self, server: str, tool: str, arguments: dict) -> dict:
        """Run one tool: its answer, or {"error": ...} (a server that is down, a timeout ...)."""
        should_stop = self._stopping.is_set
        for _ in range(2):          # once more on a fresh session when the request never reached a dead one
            session = self._session(server)
            if session is None:
                return {"error": f"MCP server unavailable: {server}"}
            try:
                return session.call_tool(tool, arguments, should_stop)
            except NotDelivered as e:
                if should_stop():
                    return {"error": "cancelled"}
                last = str(e)
        return {"error": f"MCP server unavailable: {server} ({last})"}

    def shutdown(self):
        """Cancel waiting calls and refuse new ones (server shutdown); close() stops the servers."""
        self._stopping.set()

    def close(self):
        self.shutdown()
        with self._lock:
            sessions, self._sessions = list(self._sessions.values()), {}
        for s in sessions:
            s.close()


class McpTool(Tool):
    """One MCP server's tool in /tools: "<server>_<tool>", its own schema, no cwd, no stream."""
    kind = "mcp"
    uses_cwd = False
    takes_headers = False       # x-tool-cwd / x-tool-runtime / x-resp-type are not passed to MCP servers

    def __init__(self, tool_def: McpToolDef, manager: McpManager):
        self.tool_def, self.manager = tool_def, manager
        self.name = self.display_name = f"{tool_def.server_name}_{tool_def.name}"

    def definition(self) -> dict:
        schema = self.tool_def.input_schema
        return {"type": "function", "function": {"name": self.name, "description": self.tool_def.description,
                                                 "parameters": schema if isinstance(schema, dict) else {}}}

    def invoke(self, params: dict, stream=None) -> dict:
        return self.manager.call_tool(self.tool_def.server_name, self.tool_def.name, params)
