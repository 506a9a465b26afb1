"""llama.cpp's RPC backend: a model split over rpc-servers on 127.0.0.1 against the local run.

Every server is a subprocess (`python -m alpaca2 rpc-server`) killed in teardown; anything that
can end a process (llama.cpp aborts when a server dies during a decode) runs in a subprocess
with a timeout.
"""
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import alpaca2
from alpaca2 import rpc
from alpaca2.errors import ModelLoadError, RPCServerError

from conftest import LLAMA_CPP_DIR, run_python

pytestmark = pytest.mark.skipif("RPC" not in alpaca2.backends(), reason="built without the RPC backend (ALPACA2_RPC=0)")

CTX = dict(n_ctx=128, n_batch=64, n_threads=1, type_k="f32", type_v="f32", flash_attn=False)
PROMPT = "床前明月光，疑是地上霜。举头望明月，"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port, host="127.0.0.1", netns=None):
    cmd = [sys.executable, "-m", "alpaca2", "rpc-server", "--host", host, "--port", str(port), "-t", "1"]
    if netns:
        cmd = ["ip", "netns", "exec", netns] + cmd
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_ready(proc, endpoint, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"rpc-server {endpoint} exited ({proc.returncode}): {proc.stderr.read()}")
        try:
            rpc.probe(endpoint, timeout=2)
            return
        except ModelLoadError:
            time.sleep(0.1)
    raise RuntimeError(f"rpc-server {endpoint} did not start within {timeout} s")


def stop(procs):
    for p in procs:
        if p.poll() is None:
            p.kill()
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        if p.stderr:
            p.stderr.close()


@pytest.fixture(scope="module")
def servers():
    """Two rpc-servers on 127.0.0.1: their endpoints."""
    ports = [free_port(), free_port()]
    procs = [start_server(p) for p in ports]
    try:
        endpoints = [f"127.0.0.1:{p}" for p in ports]
        for proc, ep in zip(procs, endpoints):
            wait_ready(proc, ep)
        yield endpoints
    finally:
        stop(procs)


def greedy(model, n=16, all_logits=True):
    """(logits of every prompt position, n greedy tokens) with one context."""
    with alpaca2.Context(model, **CTX) as ctx:
        tokens = model.tokenize(PROMPT)
        ctx.decode(tokens, logits="all")
        logits = np.stack([np.array(ctx.logits_at(i)) for i in range(len(tokens))])
        sampler = alpaca2.Sampler(temp=0)
        out = []
        for _ in range(n):
            t = sampler.sample(ctx)
            out.append(t)
            ctx.decode_token(t)
        return logits, out


@pytest.fixture(scope="module")
def local_run(tiny_path):
    with alpaca2.Model(tiny_path) as m:
        return greedy(m)


@pytest.mark.parametrize("split", [[1, 1, 1], [1, 1, 0], [0, 1, 1]], ids=["remote+local", "remote-only", "one-remote"])
def test_split_over_two_servers_matches_the_local_run(tiny_path, servers, local_run, split, caplog):
    import logging
    alpaca2.set_log_level(logging.INFO)
    try:
        with caplog.at_level(logging.INFO, logger="alpaca2.llama"):
            model = alpaca2.Model(tiny_path, rpc_servers=servers, tensor_split=split)
    finally:
        alpaca2.set_log_level(logging.WARNING)
    with model:
        assert model.rpc_servers == servers
        # the layers really are on the servers that have a share
        held = re.findall(r"RPC\d+\[([\d.:]+)\] model buffer size", caplog.text)
        assert sorted(held) == sorted(ep for ep, share in zip(servers, split) if share), caplog.text
        logits, tokens = greedy(model)
    ref_logits, ref_tokens = local_run
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-4, atol=1e-4)
    assert tokens == ref_tokens


def test_servers_as_one_string_and_default_split(tiny_path, servers, local_run):
    with alpaca2.Model(tiny_path, rpc_servers=",".join(servers)) as model:
        logits, tokens = greedy(model, n=8)
    assert tokens == local_run[1][:8]
    np.testing.assert_allclose(logits, local_run[0], rtol=1e-4, atol=1e-4)


def test_a_second_model_in_the_process_shares_the_connection(tiny_path, servers):
    # an rpc-server serves one client at a time: llama.cpp reuses its connection, and so must we
    with alpaca2.Model(tiny_path, rpc_servers=servers[:1], tensor_split=[1, 1]) as a, \
            alpaca2.Model(tiny_path, rpc_servers=servers[:1], tensor_split=[1, 1]) as b:
        assert greedy(a, n=4)[1] == greedy(b, n=4)[1]
        # another program asking the same server waits behind us: a clear error, in bounded time
        t0 = time.monotonic()
        with pytest.raises(ModelLoadError, match="one client at a time"):
            rpc.probe(servers[0], timeout=1)
        assert time.monotonic() - t0 < 5


def test_no_server_there_is_a_load_error_not_an_abort(tiny_path):
    t0 = time.monotonic()
    with pytest.raises(ModelLoadError, match="connection refused"):
        alpaca2.Model(tiny_path, rpc_servers=[f"127.0.0.1:{free_port()}"])
    assert time.monotonic() - t0 < 5


def test_something_else_on_the_port_is_a_load_error(tiny_path):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        t0 = time.monotonic()
        with pytest.raises(ModelLoadError, match="did not answer"):
            alpaca2.Model(tiny_path, rpc_servers=[f"127.0.0.1:{port}"], rpc_timeout=1)
        assert time.monotonic() - t0 < 5


@pytest.mark.parametrize("bad", ["localhost", "host:", ":50052", "host:0", "host:99999", "[::1]:50052", 42])
def test_bad_endpoints(tiny_path, bad):
    with pytest.raises((ValueError, TypeError)):
        alpaca2.Model(tiny_path, rpc_servers=[bad])


def test_bad_tensor_split(tiny_path, servers):
    with pytest.raises(ValueError, match="3 devices"):
        alpaca2.Model(tiny_path, rpc_servers=servers, tensor_split=[1, 1, 1, 1])
    with pytest.raises(ValueError, match="not all zero"):
        alpaca2.Model(tiny_path, rpc_servers=servers, tensor_split=[0, 0, 0])
    with pytest.raises(ValueError, match=">= 0"):
        alpaca2.Model(tiny_path, rpc_servers=servers, tensor_split=[1, -1, 1])


def test_a_local_model_is_untouched(model):
    assert model.rpc_servers == []
    model.check_rpc()


KILL_BETWEEN_TOKENS = textwrap.dedent("""
    import sys, time, alpaca2
    from alpaca2.errors import RPCServerError, ModelLoadError
    sys.path.insert(0, {tests!r})
    from test_rpc import start_server, wait_ready, stop, CTX
    ports = {ports!r}
    procs = [start_server(p) for p in ports]
    try:
        eps = ["127.0.0.1:%d" % p for p in ports]
        for proc, ep in zip(procs, eps):
            wait_ready(proc, ep)
        model = alpaca2.Model({path!r}, rpc_servers=eps, tensor_split=[1, 1, 1])
        ctx = alpaca2.Context(model, **CTX)
        sampler = alpaca2.Sampler(temp=0)
        ctx.decode(model.tokenize("你好"))
        n = 0
        t_kill = None
        try:
            while n < 100:
                if n == 5:
                    procs[1].kill(); procs[1].wait(); t_kill = time.monotonic()
                t = sampler.sample(ctx)
                ctx.decode_token(t)
                n += 1
            print("NO ERROR")
        except RPCServerError as e:
            print("RAISED after %d tokens in %.3f s: %s" % (n, time.monotonic() - t_kill, e))
        try:
            ctx.decode_token(1)
        except RPCServerError:
            print("STILL RAISES")
        ctx.close(); model.close()
        print("CLOSED")
        try:
            alpaca2.Model({path!r}, rpc_servers=eps[1:])
        except ModelLoadError as e:
            print("RELOAD REFUSED:", e)
    finally:
        stop(procs)
""")


def test_server_killed_between_tokens_raises_a_clear_error(tiny_path):
    code = KILL_BETWEEN_TOKENS.format(tests=str(Path(__file__).parent), ports=[free_port(), free_port()],
                                      path=str(tiny_path))
    r = run_python(code, timeout=120, env={**os.environ, "GGML_NO_BACKTRACE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    m = re.search(r"RAISED after (\d+) tokens in ([\d.]+) s: (.*)", r.stdout)
    assert m, r.stdout + r.stderr[-3000:]
    assert int(m.group(1)) == 5 and float(m.group(2)) < 1.0
    assert "closed the connection" in m.group(3) and "load the model again" in m.group(3)
    assert "STILL RAISES" in r.stdout and "CLOSED" in r.stdout
    assert "RELOAD REFUSED" in r.stdout and "new process" in r.stdout


KILL_DURING_DECODE = textwrap.dedent("""
    import signal, sys, threading, time, alpaca2
    sys.path.insert(0, {tests!r})
    from test_rpc import start_server, wait_ready, stop, CTX
    ports = {ports!r}
    procs = [start_server(p) for p in ports]
    try:
        eps = ["127.0.0.1:%d" % p for p in ports]
        for proc, ep in zip(procs, eps):
            wait_ready(proc, ep)
        model = alpaca2.Model({path!r}, rpc_servers=eps, tensor_split=[1, 1, 1])
        ctx = alpaca2.Context(model, **CTX)
        ctx.decode(model.tokenize("你好"))
        procs[1].send_signal(signal.SIGSTOP)     # the next decode waits for it ...
        def kill():
            time.sleep(1.0)
            print("KILL", time.monotonic(), flush=True)
            procs[1].kill()                      # ... and it dies meanwhile
        threading.Thread(target=kill, daemon=True).start()
        print("DECODE", flush=True)
        try:
            ctx.decode(model.tokenize("床前明月光"))
            print("RETURNED", flush=True)
        except alpaca2.RPCServerError as e:
            print("RAISED", time.monotonic(), e, flush=True)
        try:
            ctx.decode_token(1)
        except alpaca2.RPCServerError:
            print("STILL RAISES", flush=True)
        ctx.close(); model.close()
        print("CLOSED", flush=True)
    finally:
        stop(procs)
""")


def test_server_killed_during_a_decode_raises_a_clear_error(tiny_path):
    """llama.cpp's RPC client aborts when a server dies mid-decode; as alpaca2 patches it
    (vendor/fetch_llama_cpp.py) it completes the decode, and alpaca2 raises RPCServerError."""
    code = KILL_DURING_DECODE.format(tests=str(Path(__file__).parent), ports=[free_port(), free_port()],
                                     path=str(tiny_path))
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "GGML_NO_BACKTRACE": "1"}, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)     # the servers too
        out, err = proc.communicate()
        pytest.fail(f"hung: {out} {err[-2000:]}")
    finally:
        # the aborted client leaves its servers behind: they are in its session
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert "DECODE" in out and "KILL" in out and "RETURNED" not in out, out + err[-2000:]
    assert proc.returncode == 0, (proc.returncode, err[-2000:])
    m = re.search(r"KILL ([\d.]+)\nRAISED ([\d.]+) (.*)", out)
    assert m, out + err[-2000:]
    assert float(m.group(2)) - float(m.group(1)) < 5.0           # bounded: the broken socket is seen at once
    assert "load the model again" in m.group(3)
    assert "STILL RAISES" in out and "CLOSED" in out
    assert time.monotonic() - t0 < 90


def test_cli_generate_with_rpc_matches_local(tiny_path, servers):
    args = ["generate", "-m", str(tiny_path), "-p", PROMPT, "-n", "12", "--temp", "0", "-c", "128", "-t", "1"]
    local = subprocess.run([sys.executable, "-m", "alpaca2"] + args, capture_output=True, text=True, timeout=120)
    split = subprocess.run([sys.executable, "-m", "alpaca2"] + args + ["--rpc", ",".join(servers), "-ts", "1,1,1"],
                           capture_output=True, text=True, timeout=120)
    assert local.returncode == 0, local.stderr
    assert split.returncode == 0, split.stderr
    assert split.stdout == local.stdout and local.stdout.strip()


def test_cli_info_and_bench_take_rpc(tiny_path, servers):
    import json
    r = subprocess.run([sys.executable, "-m", "alpaca2", "info", "-m", str(tiny_path), "--rpc", servers[0]],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["model"]["n_layer"] == 2
    r = subprocess.run([sys.executable, "-m", "alpaca2", "bench", "-m", str(tiny_path), "--rpc", ",".join(servers),
                        "-p", "16", "-n", "4", "-g", "0", "-r", "1", "-t", "1", "-o", "json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert all(row["backend"] == "CPU+RPC" for row in json.loads(r.stdout))


def test_cli_rpc_error_is_one_line(tiny_path):
    r = subprocess.run([sys.executable, "-m", "alpaca2", "generate", "-m", str(tiny_path), "-p", "x", "-n", "2",
                        "--rpc", f"127.0.0.1:{free_port()}"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert r.stderr.startswith("alpaca2: no RPC server at 127.0.0.1:") and "rpc-server" in r.stderr


def test_rpc_server_port_in_use_exits_with_an_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "alpaca2", "rpc-server", "--port", str(port)],
                           capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "could not serve on 127.0.0.1:%d" % port in r.stderr


def test_rpc_server_warns_when_not_on_loopback():
    # the warning comes before anything is served; the unknown device stops it there
    r = subprocess.run([sys.executable, "-m", "alpaca2", "rpc-server", "--host", "0.0.0.0", "--port", "1",
                        "--device", "no-such-device"], capture_output=True, text=True, timeout=60)
    assert "no authentication" in r.stderr and "Private networks only" in r.stderr
    assert "no device 'no-such-device'" in r.stderr


def test_ggml_rpc_pxd_matches_the_header():
    header = LLAMA_CPP_DIR / "ggml" / "include" / "ggml-rpc.h"
    if not header.exists():
        pytest.skip("llama.cpp source tree not available")
    text = header.read_text()
    pxd = (Path(alpaca2.get_include()) / "alpaca2" / "_c" / "ggml_rpc.pxd").read_text()
    names = re.findall(r"^\s+\w[\w\s*]*?\b(ggml_backend_rpc_\w+|ggml_backend_is_rpc)\(", pxd, flags=re.M)
    assert len(names) >= 6
    for name in names + ["RPC_PROTO_MAJOR_VERSION", "GGML_RPC_MAX_SERVERS"]:
        assert re.search(rf"\b{name}\b", text), name
    from alpaca2 import _core
    major = int(re.search(r"#define RPC_PROTO_MAJOR_VERSION\s+(\d+)", text).group(1))
    assert _core.RPC_PROTOCOL[0] == major


# -- optional: two network namespaces joined by a veth pair --------------------------------------

def _netns_works():
    if not shutil.which("ip") or os.geteuid() != 0:
        return False
    name = f"a2probe{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", name], capture_output=True, timeout=10)
    if r.returncode != 0:
        return False
    subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)
    return True


@pytest.fixture(scope="module")
def netns_pair():
    if not _netns_works():
        pytest.skip("ip netns does not work here (needs root and CAP_SYS_ADMIN)")
    tag = os.getpid() % 100000
    a, b = f"a2a{tag}", f"a2b{tag}"
    cmds = [["ip", "netns", "add", a], ["ip", "netns", "add", b],
            ["ip", "link", "add", f"va{tag}", "type", "veth", "peer", "name", f"vb{tag}"],
            ["ip", "link", "set", f"va{tag}", "netns", a], ["ip", "link", "set", f"vb{tag}", "netns", b],
            ["ip", "-n", a, "addr", "add", "10.231.0.1/24", "dev", f"va{tag}"],
            ["ip", "-n", b, "addr", "add", "10.231.0.2/24", "dev", f"vb{tag}"],
            ["ip", "-n", a, "link", "set", f"va{tag}", "up"], ["ip", "-n", b, "link", "set", f"vb{tag}", "up"],
            ["ip", "-n", a, "link", "set", "lo", "up"], ["ip", "-n", b, "link", "set", "lo", "up"]]
    try:
        for c in cmds:
            r = subprocess.run(c, capture_output=True, text=True, timeout=10)
            if r.returncode != 0:
                pytest.skip(f"cannot set up network namespaces: {' '.join(c)}: {r.stderr.strip()}")
        yield a, b
    finally:
        subprocess.run(["ip", "netns", "del", a], capture_output=True, timeout=10)
        subprocess.run(["ip", "netns", "del", b], capture_output=True, timeout=10)


def test_split_across_two_network_namespaces(tiny_path, netns_pair, local_run):
    a, b = netns_pair
    procs = [start_server(50052, host="10.231.0.2", netns=b), start_server(50053, host="10.231.0.2", netns=b)]
    try:
        code = textwrap.dedent(f"""
            import sys, numpy as np, alpaca2
            sys.path.insert(0, {str(Path(__file__).parent)!r})
            from test_rpc import greedy, wait_ready
            eps = ["10.231.0.2:50052", "10.231.0.2:50053"]
            model = alpaca2.Model({str(tiny_path)!r}, rpc_servers=eps, tensor_split=[1, 1, 1])
            logits, tokens = greedy(model)
            np.save(sys.argv[1], logits)
            print(tokens)
        """)
        # the client runs in namespace a; it waits for the servers in b through the veth pair
        deadline = time.monotonic() + 60
        out = Path(os.environ.get("TMPDIR", "/tmp")) / f"netns-logits-{os.getpid()}.npy"
        while True:
            r = subprocess.run(["ip", "netns", "exec", a, sys.executable, "-c",
                                "import sys; from alpaca2 import rpc; [rpc.probe(e, 2) for e in sys.argv[1:]]",
                                "10.231.0.2:50052", "10.231.0.2:50053"], capture_output=True, text=True, timeout=30)
            if r.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert r.returncode == 0, r.stderr
        r = subprocess.run(["ip", "netns", "exec", a, sys.executable, "-c", code, str(out)],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-3000:]
        assert r.stdout.strip() == str(local_run[1])
        np.testing.assert_allclose(np.load(out), local_run[0], rtol=1e-4, atol=1e-4)
        out.unlink()
    finally:
        stop(procs)
