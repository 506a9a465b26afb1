"""llama-server's built-in tools for agents (--tools, experimental there too): GET /tools lists
them, POST /tools {"tool": name, "params": {...}, "stream": false} runs one.

read_file, file_glob_search, grep_search, exec_shell_command (the only one that streams),
write_file, edit_file and get_info, with llama-server's parameters, limits and answers
({"plain_text_response": ...} or {"error": ...}, both with status 200), then the tools of MCP
servers (mcp.py: --mcp-servers-config/-json).  Off unless --tools names them or MCP servers are
configured; the API key applies; with either on, CORS allows only this machine's origins unless
--cors-origins says otherwise (args.py).  Headers: x-tool-cwd (where relative paths resolve and
commands run; a "cwd" in the params is ignored), x-tool-runtime (an isolate: docker-container:<id>,
podman-container:<id>, ssh:<target>; else --tools-runtime's) and x-resp-type: base64 (read_file).
"""
from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import json
import os
import re
import sys
import threading

from alpaca2.server.tool_edit import EditError, apply_edits
from alpaca2.server.tool_glob import path_glob_match
from alpaca2.server.tool_io import ToolRuntimeError, make_io, make_runtime
from alpaca2.server.validation import APIError, bad, read_json

READ_FILE_MAX_SIZE = 16 * 1024                  # 16 KB of text per read_file answer
READ_FILE_MAX_SIZE_BASE64 = 32 * 1024 * 1024    # 32 MB with x-resp-type: base64
FILE_SEARCH_MAX_RESULTS = 100
GREP_SEARCH_MAX_RESULTS = 100
EXEC_MAX_OUTPUT = 16 * 1024                     # 16 KB
EXEC_MAX_TIMEOUT = 60                           # seconds
GET_INFO_MAX_OUTPUT, GET_INFO_TIMEOUT = 4096, 5
WORKERS = 8         # tool calls run at once; more wait (their own threads: tokenizing never waits on them)


class ToolParamError(ValueError):
    """A parameter missing or of the wrong type: 400, as llama-server's JSON errors."""


def _required(params: dict, key: str) -> str:
    if key not in params:
        raise ToolParamError(f"missing parameter '{key}'")
    if not isinstance(params[key], str):
        raise ToolParamError(f"parameter '{key}' must be a string")
    return params[key]


def _opt_str(params, key, default):
    v = params.get(key)
    return v if isinstance(v, str) else default         # absent, null or another type: the default


def _opt_bool(params, key, default):
    v = params.get(key)
    return v if isinstance(v, bool) else default


def _opt_int(params, key, default):
    v = params.get(key)
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v == v and abs(v) < 2 ** 62:
        return int(v)
    return default


def _function(name, description, properties, required=None):
    params = {"type": "object", "properties": properties}
    if required is not None:
        params["required"] = required
    return {"type": "function", "function": {"name": name, "description": description, "parameters": params}}


def _prop(kind, description):
    return {"type": kind, "description": description}


class Stream:
    """Where a streaming tool sends its output; alive() turns False once the client has gone."""

    def __init__(self, push, cancel: threading.Event):
        self.push, self.cancel = push, cancel

    def alive(self) -> bool:
        return not self.cancel.is_set()


class Tool:
    name = display_name = ""
    kind = "server"             # "mcp": a tool of an MCP server (mcp.py)
    permission_write = False
    support_stream = False
    uses_cwd = True
    takes_headers = True        # gets x-tool-cwd, x-tool-runtime and x-resp-type as params

    def definition(self) -> dict:
        raise NotImplementedError

    def invoke(self, params: dict, stream: Stream | None = None) -> dict | None:
        raise NotImplementedError

    def to_json(self) -> dict:
        return {"display_name": self.display_name, "tool": self.name, "type": self.kind,
                "permissions": {"write": self.permission_write}, "uses_cwd": self.uses_cwd,
                "definition": self.definition()}


def _io(params):
    return make_io(_opt_str(params, "cwd", ""), _opt_str(params, "runtime", ""))


def _lines(data: bytes) -> list:
    """Lines as std::getline gives them: split on '\\n', no empty last line after a final '\\n'."""
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return lines


class ReadFile(Tool):
    name, display_name = "read_file", "Read file"

    def definition(self):
        return _function(self.name, "Read the contents of a file. Optionally specify a 1-based line range. "
                         "If append_loc is true, each line is prefixed with its line number (e.g. \"1\u2192...\").", {
                             "path": _prop("string", "Path to the file"),
                             "start_line": _prop("integer", "First line to read, 1-based (default: 1)"),
                             "end_line": _prop("integer", "Last line to read, 1-based inclusive (default: end of file)"),
                             "append_loc": _prop("boolean", "Prefix each line with its line number")}, ["path"])

    def invoke(self, params, stream=None):
        path = _required(params, "path")
        start_line = _opt_int(params, "start_line", 1)
        end_line = _opt_int(params, "end_line", -1)          # -1: to the end
        append_loc = _opt_bool(params, "append_loc", False)
        as_base64 = _opt_str(params, "resp_type", "") == "base64"     # the x-resp-type header only
        io = _io(params)
        size = io.file_size(path)
        if size is None:
            return {"error": f"cannot stat file: {path}"}
        if as_base64:
            if size > READ_FILE_MAX_SIZE_BASE64:
                return {"error": f"file too large ({size} bytes, max {READ_FILE_MAX_SIZE_BASE64})"}
            content = io.read_file(path)
            if content is None:
                return {"error": f"failed to open file: {path}"}
            return {"base64": base64.b64encode(content).decode(), "size_bytes": len(content)}
        if size > READ_FILE_MAX_SIZE and end_line == -1:
            return {"error": f"file too large ({size} bytes, max {READ_FILE_MAX_SIZE}). "
                             "Use start_line/end_line to read a portion."}
        content = io.read_file(path)
        if content is None:
            return {"error": f"failed to open file: {path}"}
        out = bytearray()
        for lineno, line in enumerate(_lines(content), 1):
            if lineno < start_line:
                continue
            if end_line != -1 and lineno > end_line:
                break
            piece = (f"{lineno}\u2192".encode() if append_loc else b"") + line + b"\n"
            if len(out) + len(piece) > READ_FILE_MAX_SIZE:
                out += b"[output truncated]"
                break
            out += piece
        return {"plain_text_response": out.decode("utf-8", errors="replace")}


class FileGlobSearch(Tool):
    name, display_name = "file_glob_search", "File search"
    KINDS = ("file", "dir", "all")

    def definition(self):
        return _function(self.name, (
            "Recursively search for files matching a glob pattern under a directory. Automatically skips files "
            "ignored by .gitignore (when the directory is inside a git repo) and common junk directories (.git, "
            "node_modules, build, dist, etc.) otherwise. A pattern with no '/' (e.g. \"*.cpp\") matches the file's "
            "basename at any depth. A pattern containing '/' matches the full relative path; unless already "
            "anchored with \"**/\" or a leading '/', it is automatically prefixed with \"**/\". Use type=\"dir\" or "
            "\"all\" to also list directories; directory entries are suffixed with '/' in the output. Note: "
            "directory listings do not apply .gitignore filtering."), {
                "path": _prop("string", "Base directory to search in"),
                "include": _prop("string", "Glob pattern for files to include (e.g. \"*.cpp\" or \"src/**/*.cpp\"). "
                                 "Default: **"),
                "exclude": _prop("string", "Glob pattern for files to exclude"),
                "type": _prop("string", "Entry type to return: \"file\" (default), \"dir\" or \"all\""),
                "max_depth": _prop("integer", "Maximum depth to descend into subdirectories (default: 0 = "
                                   "unlimited; 1 = direct children only)"),
                "limit": _prop("integer", f"Maximum number of results to return, capped at {FILE_SEARCH_MAX_RESULTS} "
                               f"(default {FILE_SEARCH_MAX_RESULTS})")}, ["path"])

    def invoke(self, params, stream=None):
        io = _io(params)
        path = _required(params, "path")
        base = io.resolve(path)
        include = _opt_str(params, "include", "**")
        exclude = _opt_str(params, "exclude", "")
        kind = _opt_str(params, "type", "file")
        max_depth = max(0, _opt_int(params, "max_depth", 0))
        limit = _opt_int(params, "limit", FILE_SEARCH_MAX_RESULTS)
        if limit < 1:
            return {"error": f"invalid limit: {limit} (expected 1 or more)"}
        limit = min(limit, FILE_SEARCH_MAX_RESULTS)
        if kind not in self.KINDS:
            return {"error": f"invalid type: {kind} (expected \"file\", \"dir\" or \"all\")"}
        listing = io.list_entries(base, max_depth, kind)
        if listing.err:
            return {"error": f"{listing.err}: {path}"}
        matches = [(rel, is_dir) for rel, is_dir in listing.entries
                   if path_glob_match(include, rel) and not (exclude and path_glob_match(exclude, rel))]
        shown = matches[:limit]
        text = "".join(rel + ("/" if is_dir else "") + "\n" for rel, is_dir in shown)
        text += f"\n---\nTotal matches: {len(matches)}\n"
        if len(matches) > len(shown):
            text += (f"[{len(shown)} results limit reached ({len(matches)} total matches). "
                     "Refine the glob pattern to narrow the search.]\n")
        if listing.truncated:
            text += "[results truncated: time budget or unreadable directory]\n"
        # base is absolute, so a client (a UI's picker) can join the relative entries onto it
        return {"plain_text_response": text,
                "entries": [{"path": rel, "type": "dir" if is_dir else "file"} for rel, is_dir in shown],
                "base": base}


class GrepSearch(Tool):
    name, display_name = "grep_search", "Grep search"

    def definition(self):
        return _function(self.name, (
            "Search for a pattern in files under a path. Returns matching lines with file paths (and, unless "
            "searching a single file, paths relative to the given directory). Automatically skips files ignored by "
            ".gitignore (when the directory is inside a git repo) and common junk directories (.git, node_modules, "
            "build, dist, etc.) otherwise. include/exclude: a pattern with no '/' matches the basename at any "
            "depth; a pattern containing '/' matches the full relative path (auto-anchored with \"**/\" unless "
            "already anchored)."), {
                "path": _prop("string", "File or directory to search in"),
                "pattern": _prop("string", "Pattern to search for (regular expression unless literal is true)"),
                "include": _prop("string", "Glob pattern to filter files (default: **)"),
                "exclude": _prop("string", "Glob pattern to exclude files"),
                "return_line_numbers": _prop("boolean", "If true, include line numbers in results"),
                "literal": _prop("boolean", "Treat pattern as a literal string instead of a regular expression "
                                 "(default: false)"),
                "ignore_case": _prop("boolean", "Case-insensitive search (default: false)"),
                "context_lines": _prop("integer", "Number of lines of context to show before and after each match "
                                       "(default: 0)")}, ["path", "pattern"])

    def invoke(self, params, stream=None):
        path = _required(params, "path")
        pattern_text = _required(params, "pattern")
        include = _opt_str(params, "include", "**")
        exclude = _opt_str(params, "exclude", "")
        show_lineno = _opt_bool(params, "return_line_numbers", False)
        literal = _opt_bool(params, "literal", False)
        ignore_case = _opt_bool(params, "ignore_case", False)
        ctx_lines = max(0, _opt_int(params, "context_lines", 0))
        try:
            pattern = re.compile(re.escape(pattern_text) if literal else pattern_text,
                                 re.IGNORECASE if ignore_case else 0)
        except (re.error, RecursionError, OverflowError) as e:
            return {"error": f"invalid regex: {e}"}
        io = _io(params)
        abs_path = io.resolve(path)
        if io.is_regular_file(abs_path):
            files = [(abs_path, path)]
        elif io.is_directory(abs_path):
            listing = io.list_entries(abs_path, 0, "file")
            if listing.err:
                return {"error": f"{listing.err}: {path}"}
            files = [(os.path.join(abs_path, rel), rel) for rel, _ in listing.entries
                     if path_glob_match(include, rel) and not (exclude and path_glob_match(exclude, rel))]
        else:
            return {"error": f"path does not exist: {path}"}
        out, total, limit_reached = [], 0, False
        show_num = show_lineno or ctx_lines > 0
        for full, shown in files:
            if limit_reached:
                break
            content = io.read_file(full)
            if content is None:
                continue
            lines = [line.decode("utf-8", errors="replace") for line in _lines(content)]
            for i, line in enumerate(lines):
                if total >= GREP_SEARCH_MAX_RESULTS:
                    limit_reached = True
                    break
                if not pattern.search(line):
                    continue
                for j in range(max(0, i - ctx_lines), min(len(lines) - 1, i + ctx_lines) + 1):
                    sep = ":" if j == i else "-"
                    out.append(f"{shown}{sep}" + (f"{j + 1}{sep}" if show_num else "") + lines[j] + "\n")
                if ctx_lines > 0:
                    out.append("--\n")
                total += 1
        out.append(f"\n---\nTotal matches: {total}\n")
        if limit_reached:
            out.append(f"[{GREP_SEARCH_MAX_RESULTS} matches limit reached. "
                       "Narrow the path/pattern/include to see more.]\n")
        return {"plain_text_response": "".join(out)}


class ExecShellCommand(Tool):
    name, display_name = "exec_shell_command", "Execute shell command"
    permission_write = True
    support_stream = True

    def definition(self):
        return _function(self.name, "Execute a shell command and return its output (stdout and stderr combined).", {
            "command": _prop("string", "Shell command to execute"),
            "timeout": _prop("integer", f"Timeout in seconds (default 10, max {EXEC_MAX_TIMEOUT})"),
            "max_output_size": _prop("integer", f"Maximum output size in bytes (default {EXEC_MAX_OUTPUT})")},
            ["command"])

    def invoke(self, params, stream=None):
        command = _required(params, "command")
        timeout = min(_opt_int(params, "timeout", 10), EXEC_MAX_TIMEOUT)
        max_output = _opt_int(params, "max_output_size", EXEC_MAX_OUTPUT)
        max_output = EXEC_MAX_OUTPUT if max_output < 0 else min(max_output, EXEC_MAX_OUTPUT)
        # the command line is the tool's whole point: it goes to `sh -c` as one argument
        args = ["sh", "-c", command]
        io = _io(params)
        if stream is not None:
            res = io.run(args, max_output, timeout, on_chunk=lambda c: stream.push(c) or stream.alive(),
                         cancel=stream.cancel)
            if not stream.alive():
                return None
            stream.push(f"\n[exit code: {res.exit_code}]" + (" [exit due to timed out]" if res.timed_out else ""))
            return None
        res = io.run(args, max_output, timeout)
        text = res.output + f"\n[exit code: {res.exit_code}]" + (" [exit due to timed out]" if res.timed_out else "")
        return {"plain_text_response": text}


class WriteFile(Tool):
    name, display_name = "write_file", "Write file"
    permission_write = True

    def definition(self):
        return _function(self.name, "Write content to a file, creating it (including parent directories) if it "
                         "does not exist. May use with edit_file for more complex edits.", {
                             "path": _prop("string", "Path of the file to write"),
                             "content": _prop("string", "Content to write")}, ["path", "content"])

    def invoke(self, params, stream=None):
        path = _required(params, "path")
        data = _required(params, "content").encode("utf-8", errors="surrogateescape")
        if not _io(params).write_file(path, data):
            return {"error": f"failed to write file: {path}"}
        return {"result": "file written successfully", "path": path, "bytes": len(data)}


class EditFile(Tool):
    name, display_name = "edit_file", "Edit file"
    permission_write = True

    def definition(self):
        item = {"type": "object", "properties": {
            "old_text": _prop("string", "Exact text to find; must be unique in the file and must not overlap with "
                              "other edits"),
            "new_text": _prop("string", "Text to replace old_text with")}, "required": ["old_text", "new_text"]}
        return _function(self.name, (
            "Edit a file using exact text replacement. Each edits[].old_text must be unique in the file and is "
            "matched against the original content, not incrementally. Merge nearby changes into one edit instead "
            "of overlapping edits. Use write_file to replace the whole file."), {
                "path": _prop("string", "Path to the file to edit"),
                "edits": {"type": "array", "description": "One or more exact text replacements to apply",
                          "items": item}}, ["path", "edits"])

    def invoke(self, params, stream=None):
        path = _required(params, "path")
        if "edits" not in params:
            raise ToolParamError("missing parameter 'edits'")
        edits_json = params["edits"]
        if not isinstance(edits_json, list) or not edits_json:
            return {"error": "\"edits\" must be a non-empty array"}
        edits = []
        for e in edits_json:
            if not isinstance(e, dict):
                raise ToolParamError("each of 'edits' must be an object with old_text and new_text")
            old, new = _required(e, "old_text"), _required(e, "new_text")
            if not old:
                return {"error": f"edits[{len(edits)}].old_text must not be empty"}
            edits.append((old, new))
        io = _io(params)
        raw = io.read_file(path)
        if raw is None:
            return {"error": f"failed to open file: {path}"}
        try:
            # surrogateescape: bytes that are not UTF-8 come back out unchanged
            new_content = apply_edits(raw.decode("utf-8", errors="surrogateescape"), edits, path)
        except EditError as e:
            return {"error": str(e)}
        if not io.write_file(path, new_content.encode("utf-8", errors="surrogateescape")):
            return {"error": f"failed to write file: {path}"}
        return {"result": "file edited successfully", "path": path, "edits_applied": len(edits)}


class GetInfo(Tool):
    name, display_name = "get_info", "Get Runtime Info"

    def definition(self):
        return _function(self.name, "Returns runtime info: the OS name/version and the current working directory",
                         {})

    def invoke(self, params, stream=None):
        io = _io(params)
        res = io.run(["uname", "-a"], GET_INFO_MAX_OUTPUT, GET_INFO_TIMEOUT)
        os_info = res.output.strip() if res.exit_code == 0 and not res.timed_out else "unknown"
        cwd = _opt_str(params, "cwd", "")
        if not cwd:
            if not _opt_str(params, "runtime", ""):
                cwd = os.getcwd()
            else:
                pwd = io.run(["pwd"], GET_INFO_MAX_OUTPUT, GET_INFO_TIMEOUT)
                cwd = pwd.output.strip() if pwd.exit_code == 0 and not pwd.timed_out else "unknown"
        return {"os": os_info, "cwd": cwd}


ALL_TOOLS = (ReadFile, FileGlobSearch, GrepSearch, ExecShellCommand, WriteFile, EditFile, GetInfo)
TOOL_NAMES = tuple(t.name for t in ALL_TOOLS)


def check_tool_names(names) -> list:
    """The names --tools gives, checked ('all' for every tool); raises ValueError on an unknown one."""
    for name in names:
        if name != "all" and name not in TOOL_NAMES:
            raise ValueError(f"unknown tool \"{name}\". available tools: {', '.join(TOOL_NAMES)}")
    return list(names)


def _ascii_json(data, status=200):
    """JSON escaped to ASCII: paths or text with lone surrogates (names that are not UTF-8, JSON
    escapes in the request) stay valid JSON instead of failing to encode."""
    from starlette.responses import Response
    return Response(json.dumps(data), status_code=status, media_type="application/json")


def _header(request, name: str) -> str:
    value = request.headers.get(name, "")
    return value.encode("latin-1", errors="replace").decode("utf-8", errors="replace")   # paths in UTF-8


class BuiltinTools:
    """The /tools endpoints of a server started with --tools (and --tools-runtime)."""

    def __init__(self, enabled, runtime: str = "", max_body: int = 1 << 20, body_timeout: float | None = None,
                 mcp=None):
        enabled = set(check_tool_names(enabled))
        self.tools = [cls() for cls in ALL_TOOLS if "all" in enabled or cls.name in enabled]
        self.max_body, self.body_timeout = max_body, body_timeout
        self.runtime = make_runtime(runtime) if runtime else None       # raises ToolRuntimeError
        self.mcp = mcp          # alpaca2.server.mcp.McpManager (after its warmup), or None
        if mcp is not None:
            self._add_mcp_tools(mcp)
        self._pool = concurrent.futures.ThreadPoolExecutor(WORKERS, thread_name_prefix="alpaca2-tools")

    def _add_mcp_tools(self, mcp):
        """The MCP servers' tools after the built-in ones; a name already taken is skipped, as
        llama-server skips it."""
        from alpaca2.server.mcp import McpTool
        seen = {t.name for t in self.tools}
        for tool_def in mcp.registry:
            tool = McpTool(tool_def, mcp)
            if tool.name in seen:
                print(f"alpaca2: WARNING: MCP tool \"{tool.name}\" from server \"{tool_def.server_name}\" "
                      "collides with an existing tool, skipping", file=sys.stderr)
                continue
            seen.add(tool.name)
            self.tools.append(tool)

    def stop(self):
        """Server shutdown has begun: calls waiting on an MCP server return at once."""
        if self.mcp is not None:
            self.mcp.shutdown()

    def close(self):
        self.stop()
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self.runtime is not None:
            self.runtime.close()
        if self.mcp is not None:
            self.mcp.close()

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def listing(self) -> list:
        return [t.to_json() for t in self.tools]

    def _find(self, name: str, stream: bool) -> Tool:
        for tool in self.tools:
            if tool.name == name:
                if stream and not tool.support_stream:
                    raise APIError(404, f"tool \"{name}\" does not support stream = true")
                return tool
        raise APIError(404, f"unknown tool \"{name}\"")

    async def call(self, request):
        """POST /tools: the tool's JSON answer, or its output as server-sent events with stream.

        A failed call is answered in llama-server's shape for /tools, {"code", "message", "type"}
        (not OpenAI's {"error": {...}}): llama.cpp's web UI reads `message` (a string `error` is a
        tool's own answer, with status 200)."""
        try:
            return await self._call(request)
        except APIError as e:
            return _ascii_json({"code": e.status, "message": e.message, "type": e.type}, e.status)

    async def _call(self, request):
        body = await read_json(request, self.max_body, self.body_timeout)
        name = body.get("tool")
        if not isinstance(name, str):
            raise bad("'tool' is required: the name of a tool (see GET /tools)", "tool")
        params = body.get("params")
        if params is None:
            params = {}
        if not isinstance(params, dict):
            raise bad("'params' must be an object", "params")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise bad("'stream' must be a boolean", "stream")
        tool = self._find(name, stream)
        if tool.takes_headers:
            # only the headers set where the tools run; the model's params never do
            params = {k: v for k, v in params.items() if k not in ("cwd", "runtime", "resp_type")}
            for header, key in (("x-tool-cwd", "cwd"), ("x-tool-runtime", "runtime"), ("x-resp-type", "resp_type")):
                value = _header(request, header)
                if value:
                    params[key] = value
        try:
            if tool.takes_headers and "runtime" not in params and self.runtime is not None:
                params["runtime"] = await self._run(self.runtime.spec)
            if stream:
                return self._stream(tool, params)
            result = await self._run(tool.invoke, params, None)
        except ToolParamError as e:
            raise bad(str(e)) from None
        except ToolRuntimeError as e:
            raise APIError(500, str(e), type="server_error") from None
        return _ascii_json(result)

    def _stream(self, tool: Tool, params: dict):
        from starlette.responses import StreamingResponse

        async def events():
            loop = asyncio.get_running_loop()
            queue: asyncio.Queue = asyncio.Queue()
            cancel = threading.Event()

            def put(item):
                try:
                    loop.call_soon_threadsafe(queue.put_nowait, item)
                except RuntimeError:        # the loop has closed (shutdown)
                    cancel.set()

            def push(chunk):
                if chunk:
                    put({"chunk": chunk})

            def work():
                done = {"done": True}
                try:
                    tool.invoke(params, Stream(push, cancel))
                except (ToolParamError, ToolRuntimeError, OSError) as e:
                    done["error"] = str(e)
                except Exception as e:          # never a traceback to the client
                    done["error"] = f"internal error: {type(e).__name__}"
                put(done)

            loop.run_in_executor(self._pool, work)
            try:
                while True:
                    item = await queue.get()
                    yield f"data: {json.dumps(item)}\n\n"
                    if item.get("done"):
                        return
            finally:
                cancel.set()            # the client left: the command is killed

        return StreamingResponse(events(), media_type="text/event-stream")
