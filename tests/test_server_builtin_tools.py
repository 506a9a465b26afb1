"""llama-server's built-in tools (--tools) on alpaca2 serve: GET/POST /tools, each tool's answers,
the x-tool-cwd / x-tool-runtime headers, the API key, CORS defaulting to localhost, and the
safety limits (timeouts that kill the whole process group, output caps, option-injection checks).

The helpers are tested directly; the endpoints on a real server subprocess with the tiny model.
"""
import json
import os
import sys
import time

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from server_process import ServerProcess  # noqa: E402

from alpaca2.server import args as server_args  # noqa: E402
from alpaca2.server.tool_edit import EditError, apply_edits  # noqa: E402
from alpaca2.server.tool_glob import glob_match, path_glob_match  # noqa: E402
from alpaca2.server.tool_io import (ContainerIO, ContainerRuntime, LocalIO, SshIO, ToolRuntimeError, make_io,  # noqa: E402
                                    run_subprocess)

KEY = "tools-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


# -- helpers, no server ------------------------------------------------------------------------
@pytest.mark.parametrize("pattern, text, expected", [
    ("*.py", "a.py", True), ("*.py", "dir/a.py", False), ("**/*.py", "dir/sub/a.py", True),
    ("**/*.py", "a.py", False),            # llama.cpp's glob: '**/' needs a '/' before the name
    ("a?c", "abc", True), ("a?c", "a/c", False), ("[a-c]x", "bx", True), ("[!a-c]x", "bx", False),
    ("[]]", "]", True), ("[-a]", "-", True), ("[abc", "[abc", True), ("**", "x/y/z", True),
    ("*a*a*a*a*a*a*a*a*b", "a" * 60, False),     # no exponential backtracking
])
def test_glob_match_as_llama_cpp(pattern, text, expected):
    assert glob_match(pattern, text) is expected


def test_path_glob_match_anchoring():
    assert path_glob_match("*.cpp", "src/deep/main.cpp")        # no '/': the base name at any depth
    assert path_glob_match("deep/*.cpp", "src/deep/main.cpp")   # '/': anchored with '**/'
    assert not path_glob_match("/deep/*.cpp", "src/deep/main.cpp")


def test_edits_are_unique_disjoint_and_fuzzy():
    assert apply_edits("a\nb\nc\n", [("b", "B"), ("c\n", "C\nD\n")], "f") == "a\nB\nC\nD\n"
    with pytest.raises(EditError, match="unique"):
        apply_edits("x\nx\n", [("x", "y")], "f")
    with pytest.raises(EditError, match="overlap"):
        apply_edits("ab\ncd\n", [("ab\nc", "1"), ("cd", "2")], "f")
    with pytest.raises(EditError, match="could not find"):
        apply_edits("abc", [("zzz", "y")], "f")
    with pytest.raises(EditError, match="no changes"):
        apply_edits("abc", [("b", "b")], "f")
    # smart quotes and trailing blanks match fuzzily; the untouched line keeps its trailing blanks
    assert apply_edits("keep  \nsay \u201chi\u201d  \n", [('say "hi"', 'say "bye"')], "f") == 'keep  \nsay "bye"\n'


def test_exec_timeout_kills_the_whole_process_group(tmp_path):
    marker = tmp_path / "late"
    t0 = time.monotonic()
    # the background child keeps stdout open: only killing the group ends the read
    res = run_subprocess(["sh", "-c", f"(sleep 3; touch {marker}) & sleep 30"], 1024, 1)
    assert time.monotonic() - t0 < 5
    assert res.timed_out
    time.sleep(3)
    assert not marker.exists()


def test_exec_output_is_capped_but_drained():
    res = run_subprocess(["sh", "-c", "head -c 100000 /dev/zero | tr '\\0' x; echo done >&2"], 1000, 10)
    assert res.exit_code == 0 and not res.timed_out
    assert res.output == "x" * 1000 + "\n[output truncated]"


def test_exec_spawn_failure_is_an_answer():
    res = run_subprocess(["sh", "-c", "true"], 100, 5, cwd="/definitely/not/here")
    assert res.output == "failed to spawn process" and res.exit_code == -1


@pytest.mark.parametrize("runtime, message", [
    ("fake:x", "unknown tool runtime: fake:x"),
    ("ssh:-oProxyCommand=touch /tmp/pwned", "invalid ssh target"),
    ("ssh:user@host;rm", "invalid ssh target"),
    ("docker-container:--privileged", "invalid container id: --privileged"),
    ("podman-container:", "invalid container id"),
    ("docker:busybox", "must name a running container"),   # spawning is --tools-runtime's, never a header's
])
def test_runtimes_that_could_inject_options_are_refused(runtime, message):
    with pytest.raises(ToolRuntimeError, match=message):
        make_io("", runtime)


FAKE_ENGINE = """#!/bin/sh
# `<engine> exec [-i] ID CMD...` run here: the isolate is this machine
[ "$1" = exec ] || exit 1
shift; [ "$1" = -i ] && shift
shift
exec "$@"
"""

FAKE_SSH = """#!/bin/sh
# ssh OPTIONS... [-n] TARGET COMMAND: the far side's shell re-parses COMMAND
for last; do :; done
exec sh -c "$last"
"""


@pytest.fixture(params=["container", "ssh"])
def isolate(request, tmp_path):
    fake = tmp_path / "fake-bin"
    fake.write_text(FAKE_ENGINE if request.param == "container" else FAKE_SSH)
    fake.chmod(0o755)
    work = tmp_path / "isolate"
    work.mkdir()
    if request.param == "container":
        return ContainerIO(str(fake), "c0ffee", str(work)), work
    io = SshIO("user@host", str(work))
    io.build_argv = lambda inner, needs_stdin, b=io.build_argv: [str(fake)] + b(inner, needs_stdin)[1:]
    return io, work


def test_isolate_io_runs_everything_as_commands_there(isolate):
    io, work = isolate
    name = "it's a \"file\" $HOME.txt"          # quotes and $: the far side must get it verbatim
    assert io.write_file(f"sub/{name}", b"one\ntwo\n")
    assert (work / "sub" / name).read_bytes() == b"one\ntwo\n"
    assert io.is_regular_file(f"sub/{name}") and io.is_directory("sub") and not io.is_directory("nope")
    assert io.file_size(f"sub/{name}") == 8
    assert io.read_file(f"sub/{name}") == b"one\ntwo\n"
    assert io.read_file("missing") is None
    (work / "node_modules").mkdir()
    (work / "node_modules" / "x.js").write_text("x")
    listing = io.list_entries(str(work), 0, "all")
    assert sorted(listing.entries) == [("node_modules", True), ("sub", True), (f"sub/{name}", False)]
    res = io.run(["sh", "-c", "pwd; exit 5"], 1000, 5)
    assert res.output == f"{work}\n" and res.exit_code == 5
    res = io.run(["sleep", "10"], 1000, 1)          # the isolate's own `timeout` ends it
    assert res.exit_code == 124


FAKE_RUN = """#!/bin/sh
# `<engine> run --rm -i --cidfile FILE IMAGE sh`: writes an id, then lives while its stdin is open
echo "cid-$$" > "$5"
exec cat > /dev/null
"""


def test_a_spawned_container_is_respawned_and_stopped(tmp_path):
    fake = tmp_path / "engine"
    fake.write_text(FAKE_RUN)
    fake.chmod(0o755)
    runtime = ContainerRuntime(str(fake), "busybox")
    first = runtime.spec()
    assert first == f"{fake}-container:cid-{runtime.proc.pid}"
    runtime.proc.kill()                 # died on its own: the next call gets a new one
    runtime.proc.wait()
    second = runtime.spec()
    assert second != first
    proc = runtime.proc
    runtime.close()                     # stdin closed: the container's shell ends (and --rm removes it)
    assert proc.poll() is not None


def test_local_paths_resolve_against_cwd_and_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    io = LocalIO(str(tmp_path / "w"))
    assert io.resolve("a/../b.txt") == str(tmp_path / "w" / "b.txt")
    assert io.resolve("/etc/../etc/hosts") == "/etc/hosts"
    assert io.resolve("~/x") == str(tmp_path / "x")


def test_tools_flags(capsys):
    a = server_args.parse_args(["-m", "x.gguf", "--tools", "all"])
    assert a.tools == ["all"] and a.cors_origins == "localhost"     # as llama-server: localhost by default
    a = server_args.parse_args(["-m", "x.gguf", "--tools", "read_file,grep_search", "--cors-origins", "*"])
    assert a.tools == ["read_file", "grep_search"] and a.cors_origins == "*"
    a = server_args.parse_args(["-m", "x.gguf"])
    assert a.tools == [] and a.cors_origins == "*"
    with pytest.raises(SystemExit) as e:
        server_args.parse_args(["-m", "x.gguf", "--tools", "read_file,web_search"])
    assert e.value.code == 2
    assert 'unknown tool "web_search"' in capsys.readouterr().err


# -- the endpoints -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tiny_path):
    s = ServerProcess(tiny_path, "-np", "1", "-c", "256", "--tools", "all", "--api-key", KEY)
    yield s
    s.stop()


def call(server, tool, params, headers=None, **body):
    r = httpx.post(server.url + "/tools", json={"tool": tool, "params": params, **body},
                   headers={**AUTH, **(headers or {})}, timeout=60)
    return r


def ok(server, tool, params, headers=None):
    r = call(server, tool, params, headers)
    assert r.status_code == 200, r.text
    assert "error" not in r.json(), r.text
    return r.json()


def test_without_tools_the_endpoints_are_disabled(tiny_path):
    s = ServerProcess(tiny_path, "-np", "1", "-c", "256")
    try:
        for r in (httpx.get(s.url + "/tools"), httpx.post(s.url + "/tools", json={"tool": "read_file"})):
            assert r.status_code == 403
            assert r.json()["error"]["type"] == "feature_disabled"
        # no tools: CORS stays open to any origin
        r = httpx.options(s.url + "/completions", headers={"Origin": "http://evil.com"})
        assert r.headers.get("Access-Control-Allow-Origin") == "http://evil.com"
    finally:
        s.stop()


def test_api_key_and_cors_guard_the_tools(server):
    r = httpx.post(server.url + "/tools", json={"tool": "get_info", "params": {}})
    assert r.status_code == 401
    r = httpx.get(server.url + "/tools")
    assert r.status_code == 401
    r = httpx.options(server.url + "/tools", headers={"Origin": "http://evil.com",
                                                      "Access-Control-Request-Method": "POST"})
    assert "Access-Control-Allow-Origin" not in r.headers
    r = httpx.options(server.url + "/tools", headers={"Origin": "http://localhost:5173",
                                                      "Access-Control-Request-Method": "POST"})
    assert r.headers["Access-Control-Allow-Origin"] == "http://localhost:5173"


def test_listing(server):
    r = httpx.get(server.url + "/tools", headers=AUTH)
    assert r.status_code == 200
    tools = r.json()
    assert [t["tool"] for t in tools] == ["read_file", "file_glob_search", "grep_search", "exec_shell_command",
                                          "write_file", "edit_file", "get_info"]
    by_name = {t["tool"]: t for t in tools}
    assert by_name["exec_shell_command"]["permissions"] == {"write": True}
    assert by_name["read_file"]["permissions"] == {"write": False}
    assert by_name["grep_search"]["definition"]["function"]["parameters"]["required"] == ["path", "pattern"]
    assert all(t["type"] == "server" and t["uses_cwd"] for t in tools)


def test_write_read_edit(server, tmp_path):
    path = str(tmp_path / "sub" / "f.txt")
    res = ok(server, "write_file", {"path": path, "content": "one\ntwo\nthree\n"})
    assert res == {"result": "file written successfully", "path": path, "bytes": 14}
    assert ok(server, "read_file", {"path": path})["plain_text_response"] == "one\ntwo\nthree\n"
    res = ok(server, "read_file", {"path": path, "start_line": 2, "end_line": 3, "append_loc": True})
    assert res["plain_text_response"] == "2\u2192two\n3\u2192three\n"
    res = ok(server, "edit_file", {"path": path, "edits": [{"old_text": "two", "new_text": "2"}]})
    assert res["edits_applied"] == 1
    assert open(path).read() == "one\n2\nthree\n"
    r = call(server, "read_file", {"path": path}, {"x-resp-type": "base64"})
    assert r.json()["size_bytes"] == 12
    # errors of a tool are answers (200 with "error"), as llama-server's
    r = call(server, "edit_file", {"path": path, "edits": []})
    assert r.status_code == 200 and r.json() == {"error": "\"edits\" must be a non-empty array"}
    r = call(server, "read_file", {"path": str(tmp_path / "missing")})
    assert r.json()["error"].startswith("cannot stat file")


def test_read_file_size_limit(server, tmp_path):
    big = tmp_path / "big.txt"
    big.write_text("".join(f"line {i}\n" for i in range(5000)))
    r = call(server, "read_file", {"path": str(big)})
    assert "file too large" in r.json()["error"]
    res = ok(server, "read_file", {"path": str(big), "start_line": 10, "end_line": 11})
    assert res["plain_text_response"] == "line 9\nline 10\n"


def test_grep_and_glob(server, tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.py").write_text("x = 1\nneedle here\ny = 2\n")
    (tmp_path / "node_modules").mkdir()
    (tmp_path / "node_modules" / "b.py").write_text("needle\n")
    res = ok(server, "grep_search", {"path": str(tmp_path), "pattern": "needle", "context_lines": 1})
    assert res["plain_text_response"] == ("src/a.py-1-x = 1\nsrc/a.py:2:needle here\nsrc/a.py-3-y = 2\n--\n"
                                          "\n---\nTotal matches: 1\n")
    res = ok(server, "grep_search", {"path": str(tmp_path / "src" / "a.py"), "pattern": "NEEDLE",
                                     "ignore_case": True, "return_line_numbers": True})
    assert f"{tmp_path}/src/a.py:2:needle here" in res["plain_text_response"]
    assert "invalid regex" in call(server, "grep_search", {"path": str(tmp_path), "pattern": "("}).json()["error"]
    res = ok(server, "file_glob_search", {"path": str(tmp_path), "type": "all"})
    assert {(e["path"], e["type"]) for e in res["entries"]} == {("src", "dir"), ("src/a.py", "file"),
                                                               ("node_modules", "dir")}
    assert res["base"] == str(tmp_path)
    assert "invalid limit" in call(server, "file_glob_search", {"path": str(tmp_path), "limit": 0}).json()["error"]


def test_exec_and_cwd_header(server, tmp_path):
    res = ok(server, "exec_shell_command", {"command": "pwd; echo err >&2; exit 3", "cwd": "/"},
             {"x-tool-cwd": str(tmp_path)})
    assert res["plain_text_response"] == f"{tmp_path}\nerr\n\n[exit code: 3]"
    t0 = time.monotonic()
    res = ok(server, "exec_shell_command", {"command": "sleep 20", "timeout": 1})
    assert time.monotonic() - t0 < 5
    assert res["plain_text_response"].endswith("[exit due to timed out]")
    res = ok(server, "exec_shell_command", {"command": "seq 1 100000", "max_output_size": 1 << 30})
    assert len(res["plain_text_response"]) < 16 * 1024 + 100          # capped at 16 KB whatever is asked
    assert ok(server, "get_info", {}, {"x-tool-cwd": str(tmp_path)})["cwd"] == str(tmp_path)


def _events(r):
    return [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]


def test_exec_streams(server):
    with httpx.stream("POST", server.url + "/tools", headers=AUTH, timeout=30, json={
            "tool": "exec_shell_command", "params": {"command": "echo a; echo b"}, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = _events(r)
    assert events[-1] == {"done": True}
    assert "".join(e["chunk"] for e in events[:-1]) == "a\nb\n\n[exit code: 0]"
    # an error inside a stream ends it with the error, the status is already 200
    with httpx.stream("POST", server.url + "/tools", headers={**AUTH, "x-tool-runtime": "nope:x"}, timeout=30,
                      json={"tool": "exec_shell_command", "params": {"command": "true"}, "stream": True}) as r:
        assert _events(r) == [{"done": True, "error": "unknown tool runtime: nope:x"}]


def test_a_client_that_leaves_a_stream_ends_the_command(server, tmp_path):
    marker = tmp_path / "still-running"
    with httpx.stream("POST", server.url + "/tools", headers=AUTH, timeout=30, json={
            "tool": "exec_shell_command", "params": {"command": f"echo start; sleep 2; touch {marker}"},
            "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break
    time.sleep(3.5)
    assert not marker.exists()


@pytest.mark.parametrize("body, status, words", [
    ({"tool": "web_search", "params": {}}, 404, 'unknown tool "web_search"'),
    ({"tool": "read_file", "params": {}, "stream": True}, 404, "does not support stream"),
    ({"tool": "read_file", "params": {}}, 400, "missing parameter 'path'"),
    ({"tool": "read_file", "params": {"path": 3}}, 400, "must be a string"),
    ({"params": {}}, 400, "'tool' is required"),
    ({"tool": "read_file", "params": []}, 400, "'params' must be an object"),
])
def test_bad_requests(server, body, status, words):
    r = httpx.post(server.url + "/tools", json=body, headers=AUTH, timeout=30)
    assert r.status_code == status, r.text
    # llama-server's shape for /tools errors, which llama.cpp's web UI reads
    assert r.json() == {"code": status, "message": r.json()["message"], "type": "invalid_request_error"}
    assert words in r.json()["message"]


@pytest.mark.parametrize("runtime, words", [
    ("fake:does-not-exist", "unknown tool runtime"),
    ("ssh:-oProxyCommand=touch /tmp/pwned", "invalid ssh target"),
    ("docker-container:--privileged", "invalid container id"),
])
def test_runtime_header_errors_are_500(server, runtime, words):
    r = call(server, "exec_shell_command", {"command": "echo hi"}, {"x-tool-runtime": runtime})
    assert r.status_code == 500
    assert r.json()["type"] == "server_error" and words in r.json()["message"]
    assert not os.path.exists("/tmp/pwned")


def test_lone_surrogates_get_answers_not_crashes(server, tmp_path):
    body = ('{"tool": "write_file", "params": {"path": "%s/\\ud800.txt", "content": "x"}}' % tmp_path).encode()
    r = httpx.post(server.url + "/tools", content=body, headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 200
    assert r.json()["error"].startswith("failed to write file")
    body = b'{"tool": "exec_shell_command", "params": {"command": "echo \\ud800"}}'
    r = httpx.post(server.url + "/tools", content=body, headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 200 and "[exit code: -1]" in r.json()["plain_text_response"]


def test_tools_runtime_routes_every_call_to_the_isolate(tiny_path, tmp_path):
    fake_dir = tmp_path / "bin"
    fake_dir.mkdir()
    docker = fake_dir / "docker"
    # the fake engine tells which container the command ran in
    docker.write_text(FAKE_ENGINE.replace('shift\nexec "$@"', 'IN_ISOLATE=$1; export IN_ISOLATE; shift\nexec "$@"'))
    docker.chmod(0o755)
    env = dict(os.environ, PATH=f"{fake_dir}:{os.environ['PATH']}")
    s = ServerProcess.__new__(ServerProcess)
    s.start([sys.executable, "-m", "alpaca2", "serve", "-m", str(tiny_path), "--port", "0", "-t", "1", "-np", "1",
             "-c", "256", "--tools", "exec_shell_command", "--tools-runtime", "docker-container:c0ffee"], env=env)
    try:
        res = ok(s, "exec_shell_command", {"command": "echo in=$IN_ISOLATE"})
        assert res["plain_text_response"] == "in=c0ffee\n\n[exit code: 0]"
        # the header wins over --tools-runtime
        res = ok(s, "exec_shell_command", {"command": "echo in=$IN_ISOLATE"},
                 {"x-tool-runtime": "docker-container:other1"})
        assert res["plain_text_response"] == "in=other1\n\n[exit code: 0]"
        assert [t["tool"] for t in httpx.get(s.url + "/tools").json()] == ["exec_shell_command"]
    finally:
        s.stop()
