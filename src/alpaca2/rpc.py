"""llama.cpp's RPC backend: a model's layers on rpc-servers on other hosts.

    $ alpaca2 rpc-server --port 50052                     # on each helper host (127.0.0.1 unless --host)
    >>> Model("model.gguf", rpc_servers=["10.0.0.2:50052", "10.0.0.3:50052"], tensor_split=[1, 1, 2])

The protocol has no authentication and no encryption: whoever reaches an rpc-server's port can
run graphs on it and read what it holds.  Private networks only (see docs/rpc.md).

llama.cpp's RPC client ends the process (GGML_ABORT) when a server cannot be reached or drops
the connection.  This module keeps the cases it can away from that: a server is checked with
the protocol's own HELLO before llama.cpp connects (ModelLoadError instead of an abort), and a
model's connections are looked at before and after each decode (RPCServerError instead of an
abort).  A server that dies while a decode is waiting for it: alpaca2's patch to the client's
dispatcher thread (vendor/fetch_llama_cpp.py) completes the decode with zeros instead of
aborting, and the check after the decode raises (docs/rpc.md).
"""
from __future__ import annotations

import errno
import os
import socket
import struct
import weakref

from alpaca2.errors import ModelLoadError, RPCServerError

DEFAULT_PORT = 50052
_RPC_CMD_HELLO = 14          # ggml-rpc.cpp: "RPC_CMD_HELLO must be always 14"
_CONN_CAPS_SIZE = 24         # transport.h: RPC_CONN_CAPS_SIZE


def parse_servers(servers) -> list[str]:
    """'host:port,host:port' or a sequence of 'host:port' (or (host, port)) as a list of endpoints."""
    if servers is None:
        return []
    if isinstance(servers, str):
        servers = [s for s in servers.split(",") if s.strip()]
    out = []
    for s in servers:
        if isinstance(s, (tuple, list)) and len(s) == 2:
            s = f"{s[0]}:{s[1]}"
        if not isinstance(s, str):
            raise TypeError(f"an RPC server is 'host:port', not {s!r}")
        host, sep, port = s.strip().rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"an RPC server is 'host:port' (e.g. 192.168.1.20:{DEFAULT_PORT}), not {s!r}")
        if host.startswith("[") and host.endswith("]"):
            raise ValueError(f"{s!r}: llama.cpp's RPC client takes IPv4 addresses and host names only")
        out.append(f"{host}:{int(port)}")
    if len(set(out)) != len(out):
        raise ValueError(f"an RPC server is listed twice: {out}")
    return out


_open = weakref.WeakSet()     # the Connections of models not yet closed, in this process
_lost = {}                    # endpoint -> the RPCServerError that ended it, in this process


def check_before_load(endpoint: str, timeout: float = 5.0, major: int | None = None) -> None:
    """What Model() does before llama.cpp connects (llama.cpp ends the process on failure)."""
    if endpoint in _lost:
        raise ModelLoadError(f"RPC server {endpoint} went away earlier in this process and llama.cpp keeps "
                             f"its broken connection: load the model in a new process ({_lost[endpoint]})")
    if any(endpoint in c.endpoints and not c.closed for c in list(_open)):
        return                # llama.cpp shares its connection: a second one would wait behind it
    probe(endpoint, timeout, major)


def probe(endpoint: str, timeout: float = 5.0, major: int | None = None) -> tuple[int, int, int]:
    """Connect to an rpc-server and say HELLO, as llama.cpp's client does; its protocol version.

    Raises ModelLoadError with what went wrong: llama.cpp itself would end the process.
    """
    host, _, port = endpoint.rpartition(":")
    hint = f"start one there with 'alpaca2 rpc-server --host <its address> --port {port}'"
    try:
        sock = socket.create_connection((host, int(port)), timeout=timeout)
    except socket.timeout:
        raise ModelLoadError(f"RPC server {endpoint} did not accept a connection within {timeout:g} s "
                             "(unreachable, or a firewall drops the packets)") from None
    except ConnectionRefusedError:
        raise ModelLoadError(f"no RPC server at {endpoint} (connection refused): {hint}") from None
    except OSError as e:
        raise ModelLoadError(f"cannot reach RPC server {endpoint}: {e.strerror or e}") from None
    try:
        sock.settimeout(timeout)
        sock.sendall(struct.pack("<BQ", _RPC_CMD_HELLO, _CONN_CAPS_SIZE) + bytes(_CONN_CAPS_SIZE))
        head = _recv_exactly(sock, 8)
        (size,) = struct.unpack("<Q", head)
        if size < 3 or size > 4096:
            raise ModelLoadError(f"{endpoint} does not speak llama.cpp's RPC protocol (HELLO answered with "
                                 f"{size} bytes)")
        body = _recv_exactly(sock, size)
    except socket.timeout:
        raise ModelLoadError(f"RPC server {endpoint} accepted the connection but did not answer within "
                             f"{timeout:g} s: an rpc-server serves one client at a time, so another "
                             "program (or another Model) is probably using it") from None
    except (ConnectionError, EOFError) as e:
        raise ModelLoadError(f"{endpoint} closed the connection during the RPC HELLO ({e}): is it an "
                             "rpc-server of a different llama.cpp version?") from None
    finally:
        sock.close()
    version = (body[0], body[1], body[2])
    if major is not None and version[0] != major:
        raise ModelLoadError(f"RPC server {endpoint} speaks protocol {'.'.join(map(str, version))}, this build "
                             f"speaks {major}.x: run an rpc-server of the same llama.cpp (alpaca2 rpc-server)")
    return version


def _recv_exactly(sock, n):
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError("connection closed")
        buf += chunk
    return buf


def _addresses(endpoint):
    host, _, port = endpoint.rpartition(":")
    try:
        infos = socket.getaddrinfo(host, int(port), socket.AF_INET, socket.SOCK_STREAM)
    except OSError:
        return set()
    return {(info[4][0], int(port)) for info in infos}


class Connections:
    """The TCP connections llama.cpp's RPC client holds for one model, found in /proc/self/fd.

    ``check()`` peeks at each (MSG_PEEK | MSG_DONTWAIT: nothing is read): between decodes the
    protocol is idle, so end-of-stream or a reset means the server is gone.  Without /proc
    (not Linux) nothing is found and check() can only trust llama.cpp.
    """

    def __init__(self, endpoints):
        self.endpoints = list(endpoints)
        self.failed = None                       # the first error found; the model is unusable after it
        self.closed = False                      # set when the model is closed
        self._fds = {}                           # fd -> (endpoint, socket inode link)
        self._find()
        _open.add(self)

    def _find(self):
        wanted = {addr: ep for ep in self.endpoints for addr in _addresses(ep)}
        found = {}
        try:
            names = os.listdir("/proc/self/fd")
        except OSError:
            return
        for name in names:
            fd = int(name)
            try:
                link = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                continue
            if not link.startswith("socket:"):
                continue
            try:
                s = socket.socket(fileno=fd)
            except OSError:
                continue
            try:
                peer = s.getpeername() if s.family == socket.AF_INET and s.type == socket.SOCK_STREAM else None
            except OSError:
                peer = None
            finally:
                s.detach()
            if peer is not None and (peer[0], peer[1]) in wanted:
                found[fd] = (wanted[(peer[0], peer[1])], link)
        self._fds = found

    def refresh(self):
        """Look for the model's connections again (a new context may have opened one)."""
        if self.failed is None:
            self._find()

    @property
    def found(self):
        """The endpoints with at least one connection found (for tests and diagnostics)."""
        return sorted({ep for ep, _ in self._fds.values()})

    def check(self):
        """Raise RPCServerError when a server's connection has been closed or reset."""
        if self.failed is not None:
            raise self.failed
        for fd, (endpoint, link) in list(self._fds.items()):
            try:
                if os.readlink(f"/proc/self/fd/{fd}") != link:
                    continue                     # llama.cpp closed it: not ours to judge any more
                s = socket.socket(fileno=fd)
            except OSError:
                continue
            try:
                data = s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
                gone = data == b""
                why = "closed the connection"
            except BlockingIOError:
                gone = False
            except OSError as e:
                gone = e.errno not in (errno.EAGAIN, errno.EINTR)
                why = f"connection error: {e.strerror or e}"
            finally:
                s.detach()
            if gone:
                self.failed = RPCServerError(
                    f"RPC server {endpoint} {why}: the layers it held are gone. This model and its "
                    f"contexts cannot be used any more (their memory is left allocated: llama.cpp "
                    f"cannot free buffers on a server that has gone); load the model again.")
                self.failed.endpoint = endpoint
                _lost.setdefault(endpoint, self.failed)
                raise self.failed


def serve(host: str = "127.0.0.1", port: int = DEFAULT_PORT, *, n_threads: int | None = None,
          devices=None, cache: bool = False) -> None:
    """Run llama.cpp's RPC server in this process until it is killed (never returns normally).

    ``devices``: names from alpaca2.devices() to serve (default: the GPUs, else the CPU).
    ``cache``: keep received tensors in $LLAMA_CACHE/rpc (or ~/.cache/llama.cpp/rpc), so a
    client loading the same model again sends hashes instead of weights.
    """
    from alpaca2 import _core
    if not 0 < int(port) < 65536:
        raise ValueError(f"port must be 1..65535, not {port}")
    cache_dir = None
    if cache:
        base = os.environ.get("LLAMA_CACHE") or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "llama.cpp")
        cache_dir = os.path.join(base, "rpc")
        os.makedirs(cache_dir, exist_ok=True)
    if n_threads is None:
        n_threads = max(1, (os.cpu_count() or 2) // 2)
    _core._rpc_start_server(f"{host}:{int(port)}", cache_dir, int(n_threads), list(devices or []))
