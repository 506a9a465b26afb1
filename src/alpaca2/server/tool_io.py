"""Where the built-in tools (builtin_tools.py) do their I/O: this machine, or an isolate (a
running docker/podman container, an ssh host), as llama-server's server-tools.cpp does.

Every command is an argument list (never a host-side shell line), with a timeout that kills its
whole process group and a cap on the output kept.  A runtime named by a client (the
x-tool-runtime header) is checked before it reaches a command line: a container id or ssh target
that could be read as an option is refused, as llama-server refuses it.
"""
from __future__ import annotations

import codecs
import os
import re
import signal
import stat
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field

GIT_LS_FILES_MAX_OUTPUT = 8 * 1024 * 1024      # 8 MB
LIST_ENTRIES_TIMEOUT = 15                      # seconds for one listing, git and walker together
ISOLATE_EXEC_TIMEOUT = 15                      # seconds for the isolates' helper commands (stat, cat ...)
READ_FILE_MAX_SIZE = 64 * 1024 * 1024          # 64 MB: the most any tool reads of one file

# listed, never walked into: they can be enormous
JUNK_DIR_NAMES = (".git", ".svn", ".hg", "node_modules", "__pycache__",
                  ".venv", "venv", "dist", "build", "target", ".cache", ".idea", ".vscode")


class ToolRuntimeError(RuntimeError):
    """A runtime that cannot be used (unknown scheme, an id that looks like an option): HTTP 500,
    as llama-server answers it."""


@dataclass
class ExecResult:
    output: str = ""
    exit_code: int = -1
    timed_out: bool = False
    data: bytes = b""           # the output's bytes, as read (no marker appended)


@dataclass
class ListResult:
    entries: list = field(default_factory=list)     # (relative '/'-separated path, is_dir)
    err: str = ""
    truncated: bool = False


def run_subprocess(args: list, max_output: int, timeout: float, on_chunk=None, combine_stderr=True,
                   cwd: str | None = None, stdin_data: bytes | None = None, cancel: threading.Event | None = None
                   ) -> ExecResult:
    """Run args (a list, no shell of ours) and collect up to max_output bytes of its output.

    on_chunk(text) sees each piece as it is read; when it returns False (the client left) the
    process is killed.  After timeout seconds, or once `cancel` is set, the process group is killed."""
    res = ExecResult()
    try:
        proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT if combine_stderr else subprocess.DEVNULL,
                                cwd=cwd or None, start_new_session=True)
    except (OSError, ValueError):
        res.output = "failed to spawn process"
        return res
    done = threading.Event()
    timed_out = threading.Event()

    def kill():
        try:
            os.killpg(proc.pid, signal.SIGKILL)      # the shell's children too, or they keep the pipe open
        except (ProcessLookupError, PermissionError):
            pass

    def watch():
        deadline = time.monotonic() + timeout
        while not done.wait(0.1):
            if time.monotonic() >= deadline:
                timed_out.set()
                kill()
                return
            if cancel is not None and cancel.is_set():
                kill()
                return
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        try:        # stdin is always closed: a transport client (docker exec -i, ssh) waits on it otherwise
            if stdin_data:
                proc.stdin.write(stdin_data)
            proc.stdin.close()
        except OSError:
            pass
        out = bytearray()
        truncated = False
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        fd = proc.stdout.fileno()
        while True:
            buf = os.read(fd, 4096)
            if not buf:
                break
            if truncated:           # drain on, or the child blocks on a full pipe
                continue
            if len(out) + len(buf) > max_output:
                buf = buf[:max(0, max_output - len(out))]
                truncated = True
            out += buf
            if on_chunk is not None and buf and not on_chunk(decoder.decode(buf)) and not truncated:
                kill()
                break
        proc.stdout.close()
        code = proc.wait()
    finally:
        done.set()
        watcher.join()
        if proc.poll() is None:
            kill()
            proc.wait()
    res.exit_code = code if code >= 0 else 1        # killed by a signal: EXIT_FAILURE, as llama-server reports it
    res.timed_out = timed_out.is_set()
    res.data = bytes(out)
    res.output = res.data.decode("utf-8", errors="replace") + ("\n[output truncated]" if truncated else "")
    return res


def expand_home(path: str) -> str:
    """A leading '~' or '~/' is the home directory ('~user' is left alone)."""
    if not path.startswith("~") or (len(path) > 1 and path[1] not in "/\\"):
        return path
    home = os.environ.get("HOME", "")
    return home + path[1:] if home else path


def entry_depth(rel: str) -> int:
    """Depth of a '/'-separated relative path: 'a/b/c' is 3."""
    return 1 + rel.count("/")


def split_lines(text: str, strip_dot_slash: bool = False) -> list:
    out = []
    for line in text.split("\n"):
        line = line.rstrip("\r")
        if not line:
            continue
        if strip_dot_slash and line.startswith("./"):
            line = line[2:]
        out.append(line.replace("\\", "/"))
    return out


class LocalIO:
    """The tools' I/O on this machine; cwd (the x-tool-cwd header) resolves relative paths and is
    where commands run."""

    def __init__(self, cwd: str = ""):
        self.cwd = cwd

    def resolve(self, path: str) -> str:
        p = expand_home(path)
        if not os.path.isabs(p):
            p = os.path.join(self.cwd or os.getcwd(), p)
        return os.path.normpath(p)           # no '.' or '..' reaches git or the client

    def is_directory(self, path: str) -> bool:
        return os.path.isdir(self.resolve(path))

    def is_regular_file(self, path: str) -> bool:
        return os.path.isfile(self.resolve(path))

    def file_size(self, path: str):
        try:
            st = os.stat(self.resolve(path))
        except (OSError, ValueError):
            return None
        return st.st_size if not stat.S_ISDIR(st.st_mode) else None

    def read_file(self, path: str):
        """The file's bytes, or None (unreadable, or over READ_FILE_MAX_SIZE)."""
        try:
            with open(self.resolve(path), "rb") as f:
                data = f.read(READ_FILE_MAX_SIZE + 1)       # a bounded read: /dev/zero and FIFOs end too
        except (OSError, ValueError):
            return None
        return data if len(data) <= READ_FILE_MAX_SIZE else None

    def write_file(self, path: str, content: bytes) -> bool:
        full = self.resolve(path)
        try:
            parent = os.path.dirname(full)
            if parent:
                os.makedirs(parent, exist_ok=True)
            with open(full, "wb") as f:
                f.write(content)
        except (OSError, ValueError):
            return False
        return True

    def run(self, args: list, max_output: int, timeout: float, on_chunk=None, cancel=None) -> ExecResult:
        return run_subprocess(args, max_output, timeout, on_chunk, True, self.cwd, cancel=cancel)

    def list_entries(self, base: str, max_depth: int, kind: str) -> ListResult:
        """Entries under base (resolved already): git's view of the files (ls-files, so .gitignore
        applies) when kind is 'file' and base is in a repository, else a walk of the tree."""
        out = ListResult()
        if not os.path.isdir(base):
            out.err = "path does not exist or is not a directory"
            return out
        deadline = time.monotonic() + LIST_ENTRIES_TIMEOUT
        if kind == "file":
            res = self.run(["git", "-C", base, "ls-files", "--cached", "--others", "--exclude-standard"],
                           GIT_LS_FILES_MAX_OUTPUT, LIST_ENTRIES_TIMEOUT)
            if res.exit_code == 0 and not res.timed_out:
                for line in split_lines(res.output):
                    if max_depth > 0 and entry_depth(line) > max_depth:
                        continue
                    if os.path.isfile(os.path.join(base, line)):
                        out.entries.append((line, False))
                return out
        out.entries = self._walk(base, max_depth, kind, deadline, out)
        return out

    @staticmethod
    def _walk(base, max_depth, kind, deadline, out: ListResult) -> list:
        result = []
        stack = [(base, "", 0)]
        while stack:
            if time.monotonic() >= deadline:
                out.truncated = True
                return result
            directory, rel_dir, depth = stack.pop()
            try:
                it = os.scandir(directory)
            except PermissionError:
                continue
            except OSError:
                out.truncated = True
                continue
            with it:
                for entry in it:
                    if time.monotonic() >= deadline:
                        out.truncated = True
                        return result
                    rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
                    try:
                        is_dir = entry.is_dir()
                    except OSError:
                        continue
                    if is_dir:
                        if kind in ("dir", "all"):
                            result.append((rel, True))
                        if entry.name in JUNK_DIR_NAMES:
                            continue
                        # a link can point back to an ancestor, so it is never walked
                        if not entry.is_symlink() and (max_depth == 0 or depth + 1 < max_depth):
                            stack.append((entry.path, rel, depth + 1))
                    elif kind in ("file", "all") and entry.is_file():
                        result.append((rel, False))
        return result


def _shell_quote_join(argv: list) -> str:
    """One string a POSIX shell re-parses into exactly argv (for ssh, whose far side re-parses)."""
    return " ".join("'" + a.replace("'", "'\\''") + "'" for a in argv)


class IsolateIO:
    """The tools' I/O as commands in an isolate (a container, an ssh host) with sh, cat, wc, mkdir,
    dirname, find and timeout; paths are POSIX paths there."""

    def __init__(self, cwd: str = ""):
        self.cwd = cwd

    def build_argv(self, inner: list, needs_stdin: bool) -> list:
        raise NotImplementedError

    def resolve(self, path: str) -> str:
        if not self.cwd or path.startswith("/"):
            return path
        return self.cwd + "/" + path

    def _exec(self, inner, max_output, combine_stderr=True) -> ExecResult:
        return run_subprocess(self.build_argv(inner, False), max_output, ISOLATE_EXEC_TIMEOUT, None, combine_stderr)

    def _test(self, flag, path) -> bool:
        res = self._exec(["sh", "-c", f'[ {flag} "$1" ]', "_", path], 4096)
        return res.exit_code == 0 and not res.timed_out

    def is_directory(self, path):
        return self._test("-d", self.resolve(path))

    def is_regular_file(self, path):
        return self._test("-f", self.resolve(path))

    def file_size(self, path):
        res = self._exec(["sh", "-c", 'wc -c < "$1"', "_", self.resolve(path)], 64)
        if res.exit_code != 0 or res.timed_out:
            return None
        try:
            return int(res.output.split()[0])
        except (ValueError, IndexError):
            return None

    def read_file(self, path):
        # stderr apart: it must not be spliced into the file's bytes
        res = self._exec(["cat", "--", self.resolve(path)], READ_FILE_MAX_SIZE, combine_stderr=False)
        if res.exit_code != 0 or res.timed_out:
            return None
        return res.data

    def write_file(self, path, content: bytes) -> bool:
        # the content goes on stdin: no argv for the far side to re-parse, no temporary file here
        argv = self.build_argv(["sh", "-c", 'mkdir -p "$(dirname "$1")" && cat > "$1"', "_", self.resolve(path)], True)
        res = run_subprocess(argv, 4096, ISOLATE_EXEC_TIMEOUT, None, True, None, stdin_data=content)
        return res.exit_code == 0 and not res.timed_out

    def _with_cwd(self, inner):
        if not self.cwd:
            return inner
        return ["sh", "-c", 'cd "$1" || exit 127; shift; exec "$@"', "_", self.cwd, *inner]

    def run(self, args, max_output, timeout, on_chunk=None, cancel=None) -> ExecResult:
        # `timeout` inside the isolate too: killing the client here does not end what runs there
        inner = ["timeout", f"{int(timeout)}s", *args]
        return run_subprocess(self.build_argv(self._with_cwd(inner), True), max_output, timeout + 5, on_chunk,
                              True, cancel=cancel)

    def list_entries(self, base, max_depth, kind) -> ListResult:
        out = ListResult()
        abs_base = self.resolve(base)
        if not self.is_directory(base):
            out.err = "path does not exist or is not a directory"
            return out
        if kind == "file":
            res = self._exec(["sh", "-c", 'cd "$1" && git ls-files --cached --others --exclude-standard', "_",
                              abs_base], GIT_LS_FILES_MAX_OUTPUT)
            if res.exit_code == 0 and not res.timed_out:
                out.entries = [(rel, False) for rel in split_lines(res.output)
                               if not (max_depth > 0 and entry_depth(rel) > max_depth)]
                return out
        if kind in ("dir", "all"):
            out.entries += [(rel, True) for rel in self._find(abs_base, max_depth, True, out)]
        if kind in ("file", "all"):
            out.entries += [(rel, False) for rel in self._find(abs_base, max_depth, False, out)]
        return out

    def _find(self, abs_base, max_depth, dirs, out: ListResult) -> list:
        prune = " -o ".join(f"-name {n}" for n in JUNK_DIR_NAMES)
        cmd = 'cd "$1" && find . -mindepth 1'
        if max_depth > 0:
            cmd += f" -maxdepth {int(max_depth)}"
        cmd += f" \\( {prune} \\) -prune"
        cmd += " -print -o -type d -print" if dirs else " -o -type f -print"
        res = self._exec(["sh", "-c", cmd, "_", abs_base], GIT_LS_FILES_MAX_OUTPUT)
        out.truncated = out.truncated or res.timed_out
        return split_lines(res.output, strip_dot_slash=True)


class ContainerIO(IsolateIO):
    """A running docker/podman container, through `<engine> exec`."""

    def __init__(self, engine: str, container_id: str, cwd: str = ""):
        super().__init__(cwd)
        self.engine, self.container_id = engine, container_id

    def build_argv(self, inner, needs_stdin):
        return [self.engine, "exec", *(["-i"] if needs_stdin else []), self.container_id, *inner]


class SshIO(IsolateIO):
    """A remote host over ssh: remoting, not isolation (the tools can do what that account can)."""

    def __init__(self, target: str, cwd: str = ""):
        super().__init__(cwd)
        self.target = target

    def build_argv(self, inner, needs_stdin):
        # no console here: a prompt would hang the call, so key-based auth and a known host key only
        argv = ["ssh", "-o", "BatchMode=yes", "-o", "PasswordAuthentication=no",
                "-o", "KbdInteractiveAuthentication=no", "-o", "StrictHostKeyChecking=yes"]
        if not needs_stdin:
            argv.append("-n")
        return argv + [self.target, _shell_quote_join(inner)]


ENGINES = ("docker", "podman")
_SSH_TARGET = re.compile(r"[A-Za-z0-9._@-]+")
_CONTAINER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def parse_container_spec(spec: str):
    """'<engine>-container:<id>' -> (engine, id, True); '<engine>:<image>' -> (engine, image, False); else None."""
    for engine in ENGINES:
        if spec.startswith(engine + "-container:"):
            return engine, spec[len(engine) + len("-container:"):], True
        if spec.startswith(engine + ":"):
            return engine, spec[len(engine) + 1:], False
    return None


def valid_ssh_target(target: str) -> bool:
    """ssh reads options from its argv: a target starting with '-' (-oProxyCommand=...) would be one."""
    return bool(target) and target[0] != "-" and _SSH_TARGET.fullmatch(target) is not None


def valid_container_id(cid: str) -> bool:
    """An id starting with '-' would be an engine option (--privileged)."""
    return _CONTAINER_ID.fullmatch(cid) is not None


def make_io(cwd: str = "", runtime: str = ""):
    """The I/O for one tool call: this machine when runtime is empty, else the isolate it names
    (never this machine as a fallback)."""
    if not runtime:
        return LocalIO(cwd)
    container = parse_container_spec(runtime)
    if container is not None:
        engine, cid, attach = container
        if not attach:      # spawning belongs to --tools-runtime, a call only attaches
            raise ToolRuntimeError(f"tool runtime must name a running container: {runtime}")
        if not valid_container_id(cid):
            raise ToolRuntimeError(f"invalid container id: {cid}")
        return ContainerIO(engine, cid, cwd)
    if runtime.startswith("ssh:"):
        target = runtime[len("ssh:"):]
        if not valid_ssh_target(target):
            raise ToolRuntimeError(f"invalid ssh target: {target}")
        return SshIO(target, cwd)
    raise ToolRuntimeError(f"unknown tool runtime: {runtime}")


class StaticRuntime:
    """--tools-runtime naming a target that exists already (a container id, an ssh host)."""

    def __init__(self, spec: str):
        make_io("", spec)           # only checked, now, at start-up
        self._spec = spec

    def spec(self) -> str:
        return self._spec

    def close(self):
        pass


class ContainerRuntime:
    """--tools-runtime '<engine>:<image>': a container of our own (`<engine> run --rm -i <image> sh`,
    alive while its stdin stays open), respawned if it dies, stopped when the server stops."""

    def __init__(self, engine: str, image: str):
        if not image:
            raise ToolRuntimeError(f"--tools-runtime {engine}:<image> requires an image name")
        self.engine, self.image = engine, image
        self.proc = None
        self.container_id = ""
        self._lock = threading.Lock()
        self._spawn()

    def _spawn(self):
        self._stop()
        fd, cidfile = tempfile.mkstemp(prefix="alpaca2-tools-runtime-cid-")
        os.close(fd)
        os.unlink(cidfile)          # the engine refuses a cidfile that exists
        try:
            self.proc = subprocess.Popen([self.engine, "run", "--rm", "-i", "--cidfile", cidfile, self.image, "sh"],
                                         stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        except OSError as e:
            raise ToolRuntimeError(f"failed to spawn {self.engine} container for tools runtime "
                                   f"(image: {self.image}): {e}") from None
        cid = ""
        for _ in range(100):
            try:
                with open(cidfile) as f:
                    cid = f.readline().strip()
            except OSError:
                pass
            if cid:
                break
            time.sleep(0.1)
        try:
            os.unlink(cidfile)
        except OSError:
            pass
        if not cid:
            self._stop()
            raise ToolRuntimeError(f"timed out waiting for {self.engine} container to start (image: {self.image})")
        self.container_id = cid

    def spec(self) -> str:
        with self._lock:
            if self.proc is None or self.proc.poll() is not None:
                self._spawn()
            return f"{self.engine}-container:{self.container_id}"

    def _stop(self):
        if self.proc is None:
            return
        try:
            self.proc.stdin.close()     # the container's shell (its pid 1) exits; --rm removes it
        except OSError:
            pass
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def close(self):
        with self._lock:
            self._stop()


def make_runtime(spec: str):
    """The runtime of --tools-runtime: a container we own for '<engine>:<image>', else a checked spec."""
    container = parse_container_spec(spec)
    if container is not None and not container[2]:
        return ContainerRuntime(container[0], container[1])
    return StaticRuntime(spec)
