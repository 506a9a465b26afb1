"""LoRA adapters in the server, as llama-server has them: --lora / --lora-scaled /
--lora-init-without-apply, GET and POST /lora-adapters, and a request's own "lora" field.

The oracle is greedy decoding in alpaca2's own Context with the adapters applied (and, where the
build has it, llama.cpp's llama-completion with --lora-scaled): the server's tokens must be exactly
those, for every scale, also when requests with different scales run at the same time.
"""
import concurrent.futures
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

import alpaca2  # noqa: E402
from alpaca2 import testing  # noqa: E402
from alpaca2.server.args import parse_args  # noqa: E402
from server_process import ServerProcess  # noqa: E402

PROMPT = "Hello there"
N = 12
EXACT = ("-ctk", "f32", "-ctv", "f32", "-fa", "off")       # the oracle's KV cache and attention


@pytest.fixture(scope="module")
def loras(tiny, model_dir):
    """Two adapters for the tiny model: A (all layers and the output) and B (attn_k only)."""
    _, w = tiny
    a, _ = testing.make_lora(model_dir / "srv-lora-a.gguf", w, rank=4, alpha=8.0)
    b, _ = testing.make_lora(model_dir / "srv-lora-b.gguf", w, rank=2, alpha=4.0, seed=5, targets=("attn_k",),
                             output=False)
    return a, b


@pytest.fixture(scope="module")
def server(tiny_path, loras):
    a, b = loras
    s = ServerProcess(tiny_path, "-np", "4", "-c", "1024", "-b", "64", *EXACT, "--lora", a, "--lora-scaled", f"{b}:0.5")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def greedy(tiny_path, loras):
    """greedy(scales, n) -> the tokens greedy decoding gives after PROMPT with the adapters at those
    scales (end-of-generation tokens banned, as the requests' ignore_eos)."""
    model = alpaca2.Model(tiny_path)
    adapters = [alpaca2.LoraAdapter(model, p) for p in loras]
    eog = np.array([model.token_is_eog(t) for t in range(model.n_vocab)])
    prompt = model.tokenize(PROMPT, add_bos=True, special=False)
    memo = {}

    def run(scales, n=N):
        key = (tuple(scales), n)
        if key not in memo:
            with alpaca2.Context(model, n_ctx=256, n_batch=64, n_threads=1, type_k="f32", type_v="f32",
                                 flash_attn=False) as ctx:
                for adapter, scale in zip(adapters, scales):
                    if scale:
                        adapter.apply(ctx, scale)
                ctx.decode(prompt)
                out = []
                for _ in range(n):
                    logits = np.array(ctx.logits, dtype=np.float64)
                    logits[eog] = -np.inf
                    out.append(int(np.argmax(logits)))
                    ctx.decode_token(out[-1])
            memo[key] = out
        return memo[key]
    run.model = model
    yield run
    model.close()


def complete(server, n=N, **fields):
    body = {"prompt": PROMPT, "n_predict": n, "temperature": 0, "ignore_eos": True, "return_tokens": True, **fields}
    return httpx.post(server.url + "/completion", json=body, timeout=120)


def tokens(server, **fields):
    r = complete(server, **fields)
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


def set_global(server, entries):
    r = httpx.post(server.url + "/lora-adapters", json=entries, timeout=30)
    assert r.status_code == 200 and r.json() == {"success": True}, r.text


def test_the_adapter_changes_the_answer(greedy):
    # else the comparisons below would prove nothing
    assert greedy([0, 0]) != greedy([1, 0]) != greedy([0.5, 0]) != greedy([0, 0])
    assert greedy([1, 0]) != greedy([1, 0.5])


def test_lists_the_adapters_with_their_start_up_scales(server, loras):
    r = httpx.get(server.url + "/lora-adapters", timeout=30)
    assert r.status_code == 200
    assert r.json() == [{"id": 0, "path": loras[0], "scale": 1.0, "task_name": "", "prompt_prefix": ""},
                        {"id": 1, "path": loras[1], "scale": 0.5, "task_name": "", "prompt_prefix": ""}]


@pytest.mark.parametrize("scales", [[0, 0], [1, 0], [0.5, 0], [1, 0.5], [-0.7, 2.0]])
def test_a_requests_scales_give_the_core_apis_answer(server, greedy, scales):
    lora = [{"id": i, "scale": s} for i, s in enumerate(scales) if s]      # unlisted adapters: scale 0
    assert tokens(server, lora=lora or [{"id": 0, "scale": 0}]) == greedy(scales)


def test_without_a_lora_field_the_global_scales_apply_and_post_changes_them(server, greedy):
    assert tokens(server) == greedy([1, 0.5])                       # --lora A --lora-scaled B:0.5
    assert tokens(server, lora=[]) == greedy([1, 0.5])              # an empty list: the global scales too
    try:
        set_global(server, [{"id": 1, "scale": 2.0}])               # A is not listed: 0
        assert [a["scale"] for a in httpx.get(server.url + "/lora-adapters").json()] == [0.0, 2.0]
        assert tokens(server) == greedy([0, 2.0])
        assert tokens(server, lora=[{"id": 0, "scale": 1}]) == greedy([1, 0])      # the request's own win
        set_global(server, [])
        assert tokens(server) == greedy([0, 0])                     # all off: the base model
    finally:
        set_global(server, [{"id": 0, "scale": 1.0}, {"id": 1, "scale": 0.5}])


def test_openai_routes_take_the_field_too(server, greedy):
    r = httpx.post(server.url + "/v1/completions", json={
        "prompt": PROMPT, "max_tokens": N, "temperature": 0, "ignore_eos": True,
        "lora": [{"id": 0, "scale": 0.5}]}, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == greedy.model.detokenize(greedy([0.5, 0]))

    def chat(**fields):
        r = httpx.post(server.url + "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": PROMPT}], "max_tokens": N, "temperature": 0,
            "ignore_eos": True, **fields}, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]
    default = chat()
    assert chat(lora=[{"id": 0, "scale": 1}, {"id": 1, "scale": 0.5}]) == default      # the global scales
    assert chat(lora=[{"id": 0, "scale": 0}]) != default
    assert httpx.post(server.url + "/v1/chat/completions", json={
        "messages": [{"role": "user", "content": PROMPT}], "lora": [{"id": 9, "scale": 1}]}).status_code == 400


def test_concurrent_requests_with_different_scales_do_not_leak(server, greedy):
    """More requests than slots, four configurations interleaved: each gets its own scales' answer
    (batching only equal scales together), none another's."""
    configs = [[0, 0], [1, 0], [0.5, 0], None, [1, 0], [0, 0], [0.5, 0], None]
    n = 24

    def one(scales):
        fields = {} if scales is None else {"lora": [{"id": i, "scale": s} for i, s in enumerate(scales)]}
        return tokens(server, n=n, **fields)

    with concurrent.futures.ThreadPoolExecutor(len(configs)) as pool:
        got = list(pool.map(one, configs))
    for scales, toks in zip(configs, got):
        assert toks == greedy([1, 0.5] if scales is None else scales, n), scales


def test_a_slots_cache_is_reused_only_with_the_same_scales(server, greedy):
    def run(scale):
        r = complete(server, lora=[{"id": 0, "scale": scale}], id_slot=3)
        assert r.status_code == 200, r.text
        return r.json()["tokens"], r.json()["timings"]["cache_n"]
    run(0.25)
    toks, cached = run(0.25)
    assert cached > 0 and toks == greedy([0.25, 0])            # same scales: the prompt comes from the cache
    toks, cached = run(1.0)
    assert cached == 0 and toks == greedy([1, 0])              # other scales: computed again


@pytest.mark.parametrize("lora", [
    {"id": 0, "scale": 1}, "x", [1], [{"id": 2, "scale": 1}], [{"id": -1, "scale": 1}], [{"id": "0", "scale": 1}],
    [{"id": 0.5, "scale": 1}], [{"scale": 1}], [{"id": 0, "scale": "1"}], [{"id": 0, "scale": None}],
    [{"id": True, "scale": 1}], [{"id": 0, "scale": math.inf}]])
def test_bad_lora_fields_get_400(server, lora):
    r = httpx.post(server.url + "/completion", content=json.dumps(
        {"prompt": PROMPT, "n_predict": 2, "lora": lora}), timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and "lora" in err["message"]


@pytest.mark.parametrize("body", ['{"id": 0, "scale": 1}', '[{"id": 5, "scale": 1}]', '[{"id": 0, "scale": "a"}]',
                                  '[{"id": 0, "scale": NaN}]', "[1, 2]", "not json"])
def test_bad_lora_adapter_posts_get_400_and_change_nothing(server, body):
    r = httpx.post(server.url + "/lora-adapters", content=body, timeout=30)
    assert r.status_code == 400 and "error" in r.json(), r.text
    assert [a["scale"] for a in httpx.get(server.url + "/lora-adapters").json()] == [1.0, 0.5]


def test_init_without_apply_starts_at_scale_0(tiny_path, loras, greedy):
    s = ServerProcess(tiny_path, "-np", "1", "-c", "256", *EXACT, "--lora", loras[0], "--lora-init-without-apply")
    try:
        assert [a["scale"] for a in httpx.get(s.url + "/lora-adapters").json()] == [0.0]
        assert tokens(s) == greedy([0, 0])
        assert tokens(s, lora=[{"id": 0, "scale": 1}]) == greedy([1, 0])
        assert httpx.get(s.url + "/lora-adapters").json()[0]["scale"] == 0.0     # a request changes no global
    finally:
        s.stop()


def test_speculative_decoding_and_sleep_keep_the_scales(tiny_path, loras, greedy):
    """With --lookup (-np 1) the verifying decodes use the request's scales; after sleeping, the
    new context gets the adapters again."""
    import time
    s = ServerProcess(tiny_path, "-np", "1", "-c", "256", *EXACT, "--lookup", "--sleep-idle-seconds", "1",
                      "--lora", loras[0])
    try:
        for scales in ([1, 0], [0.5, 0], [0, 0]):
            assert tokens(s, n=24, lora=[{"id": 0, "scale": scales[0]}]) == greedy(scales, 24)
        deadline = time.monotonic() + 30
        while not httpx.get(s.url + "/props").json()["is_sleeping"]:
            assert time.monotonic() < deadline, "the server did not go to sleep"
            time.sleep(0.2)
        assert tokens(s, n=24) == greedy([1, 0], 24)
    finally:
        s.stop()


def test_without_adapters_the_field_is_refused_and_the_list_empty(tiny_path):
    s = ServerProcess(tiny_path, "-np", "1", "-c", "256")
    try:
        assert httpx.get(s.url + "/lora-adapters").json() == []
        r = complete(s, n=2, lora=[{"id": 0, "scale": 1}])
        assert r.status_code == 400 and "--lora" in r.json()["error"]["message"]
        assert complete(s, n=2, lora=[]).status_code == 200
    finally:
        s.stop()


def test_llama_completion_agrees(loras, greedy, tiny_path):
    """llama.cpp's own tool with --lora-scaled gives the bytes the core API's greedy tokens spell."""
    from alpaca2 import _build_info
    tool = os.path.join(getattr(_build_info, "TOOLS_DIR", None) or "", "llama-completion")
    if not os.path.exists(tool):
        pytest.skip("llama-completion is not built (ALPACA2_BUILD_TOOLS=1)")
    for scales in ([1, 0], [0.5, 2.0]):
        args = [a for i, sc in enumerate(scales) if sc for a in ("--lora-scaled", f"{loras[i]}:{sc}")]
        r = subprocess.run([tool, "-m", tiny_path, *args, "-p", PROMPT, "-n", str(N), "--temp", "0", "-t", "1",
                            "-c", "256", "-ctk", "f32", "-ctv", "f32", "-fa", "off", "-no-cnv", "--no-warmup",
                            "--no-display-prompt", "--ignore-eos"], capture_output=True, timeout=120,
                           stdin=subprocess.DEVNULL)
        # llama-completion prints through common_log's worker thread, which at exit sometimes loses the
        # tail (tests/test_equality.py): a whole run ends with the "\n\n" printed when n_predict ran out
        for _ in range(9):
            if r.returncode != 0 or r.stdout.endswith(b"\n\n"):
                break
            r = subprocess.run(r.args, capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
        assert r.returncode == 0, r.stderr[-2000:]
        want = b"".join(greedy.model.token_to_piece(t) for t in greedy(scales))
        assert r.stdout.rstrip(b"\n") == want.rstrip(b"\n")


def test_lora_flags_parse_as_llama_servers():
    a = parse_args(["-m", "x.gguf", "--lora", "a.gguf,b.gguf", "--lora-scaled", "c.gguf:0.5,d.gguf:-1",
                    "--lora", "e.gguf", "--lora-scaled", "f.gguf", "2"])
    assert a.lora_adapters == [("a.gguf", 1.0), ("b.gguf", 1.0), ("c.gguf", 0.5), ("d.gguf", -1.0), ("e.gguf", 1.0),
                               ("f.gguf", 2.0)]
    assert parse_args(["-m", "x.gguf"]).lora_adapters == [] and not parse_args(["-m", "x"]).lora_init_without_apply
    for bad in (["--lora-scaled", "c.gguf"], ["--lora-scaled", "c.gguf:x"], ["--lora-scaled", "c.gguf:inf"]):
        r = subprocess.run([sys.executable, "-m", "alpaca2", "serve", "-m", "x.gguf", *bad], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 2 and "--lora-scaled takes FNAME:SCALE" in r.stderr and "Traceback" not in r.stderr


def test_an_adapter_that_does_not_fit_is_a_clear_start_up_error(tiny_path, other_path, tmp_path):
    r = subprocess.run([sys.executable, "-m", "alpaca2", "serve", "-m", tiny_path, "--port", "0",
                        "--lora", str(tmp_path / "missing.gguf")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "missing.gguf" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "alpaca2", "serve", "-m", tiny_path, "--port", "0",
                        "--lora", other_path], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "LoRA" in r.stderr and "Traceback" not in r.stderr


def test_llama_server_gives_the_same_answers(server, tiny_path, loras, greedy):
    """llama-server itself, with the same flags, as the oracle of the whole route: global scales,
    per-request scales at the same time, and the listing.  cache_prompt is off, as in llama.cpp's
    own test_lora: llama-server reuses a slot's cache made with other scales for a request without
    a "lora" field (its launch_slot_with_task checks only per-request scales), alpaca2 does not
    (test_a_slots_cache_is_reused_only_with_the_same_scales)."""
    import socket
    import time
    from alpaca2 import _build_info
    tool = os.path.join(getattr(_build_info, "TOOLS_DIR", None) or "", "llama-server")
    if not os.path.exists(tool):
        pytest.skip("llama-server is not built (ALPACA2_BUILD_TOOLS=1)")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([tool, "-m", tiny_path, "--port", str(port), "-t", "1", "-np", "4", "-c", "1024",
                             "-b", "64", *EXACT, "--lora", loras[0], "--lora-scaled", f"{loras[1]}:0.5"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        ref = type("Ref", (), {"url": url})()
        assert httpx.get(url + "/lora-adapters").json() == httpx.get(server.url + "/lora-adapters").json()
        configs = [None, [{"id": 0, "scale": 0.3}], [{"id": 1, "scale": 1.5}], [{"id": 0, "scale": 0.0}],
                   [{"id": 0, "scale": 0.7}, {"id": 1, "scale": -1.0}], None]
        scales = [[1, 0.5], [0.3, 0], [0, 1.5], [0, 0], [0.7, -1.0], [1, 0.5]]

        def answers(srv):
            def one(lora):
                return tokens(srv, n=16, cache_prompt=False, **({} if lora is None else {"lora": lora}))
            with concurrent.futures.ThreadPoolExecutor(len(configs)) as pool:
                return list(pool.map(one, configs))
        want = [greedy(sc, 16) for sc in scales]
        assert answers(server) == answers(ref) == want
    finally:
        proc.terminate()
        proc.wait(30)
