"""alpaca2 serve as a drop-in for llama-server: its command line, its own paths (/completion,
/tokenize, /props, /slots ...), and the OpenAI fields llama-server adds (logprobs, n, CORS ...).

Tiny f32 model, a real server subprocess on localhost, the real openai client and httpx.
"""
import math
import subprocess
import sys

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

import alpaca2  # noqa: E402
from server_process import NO_EOS, ServerProcess  # noqa: E402


@pytest.fixture(scope="module")
def server(tiny_path):
    s = ServerProcess(tiny_path, "-np", "4", "-c", "4096", "--template", "alpaca2", "-n", "64",
                      "--cors-origins", "localhost", "--slots")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def vocab(tiny_path):
    with alpaca2.Model(tiny_path) as m:
        yield m


def post(server, path, body, **kw):
    return httpx.post(server.url + path, json=body, timeout=120, **kw)


def chat(text):
    return [{"role": "user", "content": text}]


# -- the command line -------------------------------------------------------------------------------

def serve_cli(*args):
    return subprocess.run([sys.executable, "-m", "alpaca2", "serve", *args], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("args, words", [
    (["--no-such-flag"], "--no-such-flag"),
    (["--port", "70000"], "out of range"),
    (["--port", "http"], "not a port number"),
    (["-np", "two"], "not a whole number"),
    (["--temp", "nan"], "out of range"),
    (["-fa", "maybe"], "not on, off or auto"),
    ([], "a model is required"),
])
def test_bad_flags_get_one_line_and_exit_2(tiny_path, args, words):
    model = ["-m", str(tiny_path)] if args else []
    r = serve_cli(*model, *args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and "Traceback" not in r.stderr


def test_llama_server_flags_are_accepted(tiny_path):
    """The flags llama.cpp's own test suite passes: parsed, and the server starts with them."""
    s = ServerProcess(tiny_path, "--temp", "0.8", "--seed", "42", "--host", "127.0.0.1", "--alias", "tiny",
                      "--ctx-size", "512", "--parallel", "2", "--batch-size", "32", "--ubatch-size", "32",
                      "--n-predict", "8", "--no-slots", "--no-jinja", "-fa", "off", "--cont-batching",
                      "--kv-unified", "--threads-http", "2", "--no-webui", "--metrics", "-ngl", "0")
    try:
        assert [m.id for m in s.client().models.list()] == ["tiny"]
        r = post(s, "/completion", {"prompt": "hi", "logit_bias": [[2, False]]}).json()
        assert r["tokens_predicted"] == 8                      # -n caps the answer
        assert r["generation_settings"]["seed"] == 42
        assert httpx.get(s.url + "/slots", timeout=30).status_code == 501
        assert httpx.get(s.url + "/metrics", timeout=30).status_code == 200
    finally:
        s.stop()


def test_alpaca2_server_executable_shows_help():
    r = subprocess.run([sys.executable, "-m", "alpaca2.server", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--ctx-size" in r.stdout and "alpaca2-server" in r.stdout


# -- llama-server's own paths -------------------------------------------------------------------

def test_native_completion(server, vocab):
    prompt = "床前明月光，"
    body = {"prompt": prompt, "n_predict": 8, "temperature": 0, "logit_bias": NO_EOS, "return_tokens": True}
    r = post(server, "/completion", body)
    assert r.status_code == 200
    d = r.json()
    n_prompt = len(vocab.tokenize(prompt, add_bos=True))
    assert d["stop"] is True and d["stop_type"] == "limit" and d["truncated"] is False
    assert d["tokens_predicted"] == 8 and d["tokens_evaluated"] == n_prompt
    assert d["timings"]["predicted_n"] == 8 and d["timings"]["prompt_n"] + d["timings"]["cache_n"] == n_prompt
    assert len(d["tokens"]) == 8 and vocab.detokenize(d["tokens"]) == d["content"]
    assert isinstance(d["has_new_line"], bool) and 0 <= d["id_slot"] < 4
    # streamed: the same text, token ids in every chunk, the last chunk with stop=true
    with httpx.stream("POST", server.url + "/completion", json=dict(body, stream=True), timeout=120) as s:
        chunks = [httpx.Response(200, content=line[5:]).json() for line in s.iter_lines()
                  if line.startswith("data:")]
    assert [c["stop"] for c in chunks][-1] is True and not any(c["stop"] for c in chunks[:-1])
    assert "".join(c["content"] for c in chunks) == d["content"]
    assert sum(len(c["tokens"]) for c in chunks[:-1]) == 8
    # /completions (no /v1) is the native one too, as llama-server's
    assert post(server, "/completions", body).json()["content"] == d["content"]


def test_completion_stop_word_and_slot(server):
    base = {"prompt": "Once upon a time", "n_predict": 40, "temperature": 0, "logit_bias": NO_EOS}
    full = post(server, "/completion", base).json()["content"]
    word = full[10:12]
    d = post(server, "/completion", dict(base, stop=[word], id_slot=2)).json()
    assert d["stop_type"] == "word" and d["stopping_word"] == word
    assert d["content"] == full[:full.index(word)] and d["id_slot"] == 2


def test_tokenize_and_detokenize(server, vocab):
    text = "Hello 你好 </s>"
    ids = post(server, "/tokenize", {"content": text}).json()["tokens"]
    assert ids == vocab.tokenize(text, add_bos=False, special=False)     # "</s>" stays text
    assert post(server, "/tokenize", {"content": text, "add_special": True}).json()["tokens"][0] == vocab.bos
    pieces = post(server, "/tokenize", {"content": text, "with_pieces": True}).json()["tokens"]
    assert [p["id"] for p in pieces] == ids and all(p["piece"] for p in pieces)
    assert post(server, "/detokenize", {"tokens": ids}).json()["content"] == text
    assert post(server, "/detokenize", {"tokens": [10 ** 6]}).status_code == 400


def test_apply_template(server, vocab):
    r = post(server, "/apply-template", {"messages": chat("你好")})
    assert r.status_code == 200 and "你好" in r.json()["prompt"] and "[INST]" in r.json()["prompt"]


def test_props_and_slots(server, tiny_path):
    p = httpx.get(server.url + "/props", timeout=30).json()
    assert p["total_slots"] == 4 and p["default_generation_settings"]["n_ctx"] == 1024
    assert p["model_path"] == str(tiny_path) and p["default_generation_settings"]["params"]["n_predict"] == 64
    slots = httpx.get(server.url + "/slots", timeout=30).json()
    assert [s["id"] for s in slots] == [0, 1, 2, 3] and all(s["n_ctx"] == 1024 for s in slots)
    assert post(server, "/props", {"n_predict": 3}).status_code == 501          # without --props


# -- OpenAI fields llama-server has ------------------------------------------------------------------

def test_unprefixed_paths_and_fingerprint(server):
    r = post(server, "/chat/completions", {"messages": chat("hi"), "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200 and r.json()["system_fingerprint"].startswith("b")
    assert "timings" in r.json()
    assert httpx.get(server.url + "/models", timeout=30).json()["data"][0]["object"] == "model"


def test_chat_logprobs_agree_with_the_text(server):
    c = server.client()
    r = c.chat.completions.create(model="x", messages=chat("床前明月光"), max_tokens=6, temperature=0,
                                  logprobs=True, top_logprobs=3, logit_bias=NO_EOS,
                                  extra_body={"repeat_penalty": 1.0})     # logprobs are before penalties
    content = r.choices[0].logprobs.content
    assert len(content) == 6 and "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        assert t.logprob == pytest.approx(t.top_logprobs[0].logprob)       # greedy: the most likely one
        assert sum(math.exp(x.logprob) for x in t.top_logprobs) <= 1 + 1e-6
    # streamed: the same entries, chunk by chunk
    s = c.chat.completions.create(model="x", messages=chat("床前明月光"), max_tokens=6, temperature=0,
                                  logprobs=True, top_logprobs=3, logit_bias=NO_EOS, stream=True,
                                  extra_body={"repeat_penalty": 1.0})
    streamed = [t for ch in s if ch.choices and ch.choices[0].logprobs for t in ch.choices[0].logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in content]


def test_completion_logprobs(server):
    r = server.client().completions.create(model="x", prompt="hello", max_tokens=5, temperature=0, logprobs=2,
                                           logit_bias=NO_EOS)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 5 and "".join(lp.tokens) == r.choices[0].text
    assert all(x <= 0 for x in lp.token_logprobs) and all(len(t) <= 2 for t in lp.top_logprobs)


def test_n_choices(server):
    c = server.client()
    r = c.chat.completions.create(model="x", messages=chat("你好"), max_tokens=8, temperature=0, n=3,
                                  logit_bias=NO_EOS)
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    assert len({ch.message.content for ch in r.choices}) == 1              # greedy: the same answer thrice
    assert r.usage.completion_tokens == 24
    r = c.completions.create(model="x", prompt="Once", max_tokens=8, temperature=1.5, n=4, seed=3,
                             logit_bias=NO_EOS, stream=True)
    texts = {}
    for ch in r:
        for choice in ch.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
    assert sorted(texts) == [0, 1, 2, 3] and len(set(texts.values())) > 1   # seeds differ per choice


def test_logit_bias_is_honoured(server, vocab):
    base = {"prompt": "Once upon a time", "n_predict": 12, "temperature": 0, "return_tokens": True}
    greedy = post(server, "/completion", dict(base, logit_bias=NO_EOS)).json()["tokens"]
    for ban in ({**NO_EOS, str(greedy[0]): -100}, [[2, False], [greedy[0], False]]):
        tokens = post(server, "/completion", dict(base, logit_bias=ban)).json()["tokens"]
        assert len(tokens) == 12 and greedy[0] not in tokens and 2 not in tokens
    everything = {str(t): -100 for t in range(vocab.n_vocab)}
    r = post(server, "/v1/completions", dict(base, logit_bias=everything))
    assert r.status_code == 400 and "every token" in r.json()["error"]["message"]


def test_cors(server):
    hdrs = {"Origin": "http://localhost:5173", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "Authorization"}
    r = httpx.options(server.url + "/v1/chat/completions", headers=hdrs, timeout=30)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://localhost:5173"
    assert "POST" in r.headers["access-control-allow-methods"]
    r = httpx.options(server.url + "/v1/chat/completions", headers=dict(hdrs, Origin="http://localhost.evil.com"),
                      timeout=30)
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    r = httpx.get(server.url + "/v1/models", headers={"Origin": "http://127.0.0.1:8080"}, timeout=30)
    assert r.headers["access-control-allow-origin"] == "http://127.0.0.1:8080"


def test_api_keys_from_a_file(tiny_path, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# two keys\nfirst\nsecond\n")
    s = ServerProcess(tiny_path, "-np", "1", "-c", "256", "--api-key-file", str(keys))
    try:
        for key in ("first", "second"):
            assert httpx.get(s.url + "/v1/models", headers={"Authorization": f"Bearer {key}"},
                             timeout=30).status_code == 200
        r = httpx.get(s.url + "/v1/models", headers={"Authorization": "Bearer third"}, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    finally:
        s.stop()


def test_nul_in_text_is_refused_or_kept(server, vocab):
    r = post(server, "/v1/chat/completions", {"messages": chat("a\x00b"), "max_tokens": 2})
    assert r.status_code == 400 and "NUL" in r.json()["error"]["message"]
    r = post(server, "/v1/completions", {"prompt": "ab\x00cd", "max_tokens": 1}).json()
    assert r["usage"]["prompt_tokens"] == len(vocab.tokenize("ab\x00cd", add_bos=True))
    assert r["usage"]["prompt_tokens"] > len(vocab.tokenize("ab", add_bos=True))
    r = post(server, "/v1/completions", {"prompt": "a\x01\x1b[31mb", "max_tokens": 1}).json()
    assert r["usage"]["prompt_tokens"] == len(vocab.tokenize("a\x01\x1b[31mb", add_bos=True))


def test_help_lists_llama_server_flags():
    r = subprocess.run([sys.executable, "-m", "alpaca2", "serve", "--help"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and "--api-key" in r.stdout and "--cors-origins" in r.stdout


# -- grammar, infill, Anthropic -----------------------------------------------------------------

def test_grammar_constrains_the_answer(server):
    body = {"prompt": "hello", "n_predict": 12, "temperature": 1.0, "seed": 5,
            "grammar": 'root ::= "yes" | "no" | [0-9]+'}
    for _ in range(3):
        d = post(server, "/completion", body).json()
        assert d["content"] in ("yes", "no") or d["content"].isdigit(), d["content"]
    r = post(server, "/completion", dict(body, grammar="root ::= ("))
    assert r.status_code == 400 and r.json()["error"]["param"] == "grammar"


def test_json_schema_output(server):
    pytest.importorskip("alpaca2._common")
    import json
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    r = server.client().chat.completions.create(
        model="x", messages=chat("a number"), max_tokens=40, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": schema}})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content)["n"], int)
    bad_schema = {"type": "json_schema", "json_schema": {"schema": {"type": "no-such-type"}}}
    r = post(server, "/v1/chat/completions", {"messages": chat("x"), "response_format": bad_schema})
    assert r.status_code == 400


@pytest.fixture(scope="module")
def fim_path(tiny_path, tmp_path_factory):
    """The tiny model with fill-in-the-middle token ids (3, 4, 5) in its metadata."""
    gguf = pytest.importorskip("gguf")
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata
    out = tmp_path_factory.mktemp("fim") / "fim.gguf"
    reader = gguf.GGUFReader(str(tiny_path), "r")
    writer = gguf.GGUFWriter(str(out), arch="llama", endianess=reader.endianess)
    u32 = gguf.GGUFValueType.UINT32
    copy_with_new_metadata(reader, writer, {f"tokenizer.ggml.fim_{k}_token_id": MetadataDetails(u32, v)
                                            for k, v in (("pre", 3), ("suf", 4), ("mid", 5))}, [])
    return out


def test_infill(server, fim_path, vocab):
    assert post(server, "/infill", {"input_prefix": "a", "input_suffix": "b"}).status_code == 501   # no FIM ids
    s = ServerProcess(fim_path, "-np", "1", "-c", "512")
    try:
        body = {"input_prefix": "def f():\n", "input_suffix": "\n", "prompt": "  return", "n_predict": 4,
                "temperature": 0, "logit_bias": NO_EOS}
        d = post(s, "/infill", body).json()
        tok = vocab.tokenize
        expect = [1, 3] + tok("def f():\n", add_bos=False) + [4] + tok("\n", add_bos=False) + [5] + tok("  return",
                                                                                                        add_bos=False)
        assert d["tokens_evaluated"] == len(expect) and d["tokens_predicted"] == 4
        same = post(s, "/completion", {"prompt": expect, "n_predict": 4, "temperature": 0,
                                       "logit_bias": NO_EOS}).json()
        assert same["content"] == d["content"]                   # the FIM prompt is exactly those tokens
        for extra in ([{}], [{"filename": 1, "text": "x"}], "no"):
            assert post(s, "/infill", dict(body, input_extra=extra)).status_code == 400
    finally:
        s.stop()


def test_anthropic_messages(server, vocab):
    body = {"model": "claude-x", "max_tokens": 6, "system": "Be brief.", "temperature": 0,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "你好"}]}]}
    d = post(server, "/v1/messages", body).json()
    assert d["type"] == "message" and d["role"] == "assistant" and d["content"][0]["type"] == "text"
    assert d["stop_reason"] in ("end_turn", "max_tokens") and "timings" not in d
    n_in = post(server, "/v1/messages/count_tokens", body).json()["input_tokens"]
    assert d["usage"]["input_tokens"] == n_in > 0
    with httpx.stream("POST", server.url + "/v1/messages", json=dict(body, stream=True), timeout=120) as r:
        events = [line[7:] for line in r.iter_lines() if line.startswith("event: ")]
    assert events[:2] == ["message_start", "content_block_start"]
    assert events[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    img = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}
    r = post(server, "/v1/messages", dict(body, messages=[{"role": "user", "content": [img]}]))
    assert r.status_code == 500 and "image input is not supported" in r.json()["error"]["message"]


def test_input_tokens_verbose_and_timings_per_token(server, vocab):
    messages = chat("What is the best book")
    n = post(server, "/chat/completions/input_tokens", {"messages": messages}).json()["input_tokens"]
    d = post(server, "/v1/chat/completions", {"messages": messages, "max_tokens": 2, "verbose": True}).json()
    assert d["usage"]["prompt_tokens"] == n and "What is the best book" in d["__verbose"]["prompt"]
    assert "__verbose" not in post(server, "/v1/chat/completions", {"messages": messages, "max_tokens": 2}).json()
    body = {"messages": messages, "max_tokens": 5, "stream": True, "timings_per_token": True,
            "stream_options": {"include_usage": True}, "logit_bias": NO_EOS}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=120) as r:
        chunks = [httpx.Response(200, content=line[5:]).json() for line in r.iter_lines()
                  if line.startswith("data:") and "[DONE]" not in line]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": None} and "timings" not in chunks[0]
    assert all("timings" in c for c in chunks[1:])
    assert chunks[-1]["choices"] == [] and chunks[-1]["timings"]["predicted_n"] == 5


def test_completion_with_several_prompts(server, vocab):
    text = "Once upon a time"
    ids = vocab.tokenize(text, add_bos=True)
    base = {"n_predict": 6, "temperature": 0, "logit_bias": NO_EOS}
    one = post(server, "/completion", dict(base, prompt=ids)).json()
    many = post(server, "/completion", dict(base, prompt=[ids, text, {"prompt_string": text}])).json()
    assert isinstance(many, list) and [m["index"] for m in many] == [0, 1, 2]
    assert all(m["content"] == one["content"] for m in many)
    mixed = post(server, "/completion", dict(base, prompt=[1, 5, 6, "text", 7])).json()
    assert mixed["tokens_evaluated"] == 4 + len(vocab.tokenize("text", add_bos=False))
    r = post(server, "/completion", dict(base, prompt={"prompt_string": "x <__media__>", "multimodal_data": "AA=="}))
    assert r.status_code == 400
