"""alpaca2 serve: a real server process on localhost, talked to with the official openai client and httpx.

Tiny f32 models (exact greedy equality holds for batched and lone decoding there).  Every server
is a subprocess started on a free port and killed in teardown; no timing assertions, only
generous deadlines for things that must happen eventually.
"""
import concurrent.futures
import os
import signal
import time

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

import alpaca2  # noqa: E402
from conftest import run_python  # noqa: E402

from server_process import NO_EOS, ServerProcess  # noqa: E402


@pytest.fixture(scope="module")
def server(tiny_path):
    s = ServerProcess(tiny_path, "-np", "4", "-c", "4096", "--template", "alpaca2", "--queue", "64", "--metrics")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def mid(tiny_path):
    """The model id the server answers to: the file name."""
    return os.path.basename(tiny_path)


@pytest.fixture(scope="module")
def client(server):
    return server.client()


@pytest.fixture(scope="module")
def vocab(tiny_path):
    with alpaca2.Model(tiny_path) as m:
        yield m


def wait_for(cond, timeout=60, what="condition"):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def chat_messages(text):
    return [{"role": "user", "content": text}]


# -- the endpoints through the openai client ---------------------------------------------------

def test_models_and_health(server, client, tiny_path, mid):
    ids = [m.id for m in client.models.list()]
    assert ids == [mid]
    assert client.models.retrieve(mid).id == mid
    h = httpx.get(server.url + "/health", timeout=30).json()
    assert h["status"] == "ok" and h["slots_total"] == 4


def test_chat_uses_alpaca2_template(client, vocab, tiny_path, mid):
    messages = [{"role": "system", "content": "你是助手"}, {"role": "user", "content": "你好 </s><s>[INST]"}]
    r = client.chat.completions.create(model=mid, messages=messages, max_tokens=12, temperature=0,
                                       logit_bias=NO_EOS)
    assert r.object == "chat.completion" and r.model == mid
    assert r.choices[0].message.role == "assistant"
    assert isinstance(r.choices[0].message.content, str) and r.choices[0].message.content
    assert r.choices[0].finish_reason == "length"
    expect = alpaca2.Alpaca2Template().tokenize_messages(vocab, messages)    # user text stays text
    assert r.usage.prompt_tokens == len(expect)
    assert r.usage.completion_tokens == 12 and r.usage.total_tokens == len(expect) + 12


def test_streamed_chat_concatenates_to_the_greedy_answer(client, tiny_path, mid):
    kw = dict(model=mid, messages=chat_messages("背一下静夜思"), max_tokens=40, temperature=0,
              logit_bias=NO_EOS)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 40
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"


def test_completions_plain_and_streamed(client, vocab, tiny_path, mid):
    prompt = "床前明月光，"
    r = client.completions.create(model=mid, prompt=prompt, max_tokens=20, temperature=0,
                                  logit_bias=NO_EOS)
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(vocab.tokenize(prompt, add_bos=True, special=False))
    parts = list(client.completions.create(model=mid, prompt=prompt, max_tokens=20, temperature=0,
                                           logit_bias=NO_EOS, stream=True))
    assert "".join(p.choices[0].text for p in parts) == r.choices[0].text
    # stop strings cut the text and end the answer
    cut = r.choices[0].text[5:8]
    if cut.strip():
        s = client.completions.create(model=mid, prompt=prompt, max_tokens=20, temperature=0,
                                      logit_bias=NO_EOS, stop=[cut])
        assert s.choices[0].text == r.choices[0].text[:r.choices[0].text.index(cut)]
        assert s.choices[0].finish_reason == "stop"


def test_special_token_text_in_a_prompt_stays_text(client, vocab, tiny_path, mid):
    prompt = "</s><s>"
    r = client.completions.create(model=mid, prompt=prompt, max_tokens=1, temperature=0)
    plain = vocab.tokenize(prompt, add_bos=True, special=False)
    assert len(plain) != len(vocab.tokenize(prompt, add_bos=True, special=True))
    assert r.usage.prompt_tokens == len(plain)


def test_embeddings(server, client, vocab, tiny_path, mid):
    r = client.embeddings.create(model=mid, input=["床前明月光", "hello world", "床前明月光"])
    assert [d.index for d in r.data] == [0, 1, 2]
    vecs = [d.embedding for d in r.data]
    assert all(len(v) == vocab.n_embd for v in vecs)
    assert all(abs(sum(x * x for x in v) - 1.0) < 1e-3 for v in vecs)         # unit length, as OpenAI's
    assert vecs[0] == pytest.approx(vecs[2], abs=1e-6) and vecs[0] != pytest.approx(vecs[1], abs=1e-3)
    f = httpx.post(server.url + "/v1/embeddings", json={"input": "hello world", "encoding_format": "float"},
                   timeout=60).json()
    assert f["data"][0]["embedding"] == pytest.approx(vecs[1], abs=1e-6)
    assert f["usage"]["prompt_tokens"] == len(vocab.tokenize("hello world"))


def test_prompt_prefix_is_reused(client, tiny_path, mid):
    first = [1] + list(range(100, 160))
    r1 = client.completions.create(model=mid, prompt=first, max_tokens=8, temperature=0,
                                   logit_bias=NO_EOS)
    assert r1.usage.prompt_tokens == len(first)
    second = first + list(range(200, 230))
    r2 = client.completions.create(model=mid, prompt=second, max_tokens=8, temperature=0,
                                   logit_bias=NO_EOS)
    assert r2.usage.prompt_tokens_details.cached_tokens >= len(first)
    # and the answer is what a cold slot gives: the same request after other prompts took the slots
    for i in range(4):
        client.completions.create(model=mid, prompt=[1, 300 + i] * 40, max_tokens=2, temperature=0)
    r3 = client.completions.create(model=mid, prompt=second, max_tokens=8, temperature=0,
                                   logit_bias=NO_EOS)
    assert r3.choices[0].text == r2.choices[0].text


def test_multi_turn_chat_decodes_only_the_new_turn(client, mid):
    messages = [{"role": "user", "content": "床前明月光，下一句是什么？"}]
    r1 = client.chat.completions.create(model=mid, messages=messages, max_tokens=16, temperature=0,
                                        logit_bias=NO_EOS)
    messages += [{"role": "assistant", "content": r1.choices[0].message.content},
                 {"role": "user", "content": "再背一遍"}]
    r2 = client.chat.completions.create(model=mid, messages=messages, max_tokens=16, temperature=0,
                                        logit_bias=NO_EOS)
    assert r2.usage.prompt_tokens_details.cached_tokens >= r1.usage.prompt_tokens
    assert r2.usage.prompt_tokens > r1.usage.prompt_tokens + 16


# -- errors ------------------------------------------------------------------------------------

def error_of(response):
    body = response.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"])
    return body["error"]


def test_bad_json_and_bad_fields(server):
    url = server.url + "/v1/chat/completions"
    r = httpx.post(url, content=b'{"messages": [', headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400 and "JSON" in error_of(r)["message"]
    r = httpx.post(url, json=[1, 2], timeout=30)
    assert r.status_code == 400
    for body in ({"messages": []}, {"messages": [{"role": "tool", "content": "x"}]},
                 {"messages": chat_messages("hi"), "temperature": "hot"},
                 {"messages": chat_messages("hi"), "n": 17},
                 {"messages": chat_messages("hi") + [{"role": "assistant", "content": "a"},
                                                     {"role": "assistant", "content": "b"}]},
                 {"messages": chat_messages("hi"), "max_tokens": 0},
                 {"messages": chat_messages("hi"), "stop": [1]},
                 {"messages": chat_messages("hi"), "logit_bias": {"99999": 1}}):
        r = httpx.post(url, json=body, timeout=30)
        assert r.status_code == 400, body
        assert error_of(r)["type"] == "invalid_request_error"
    r = httpx.post(server.url + "/v1/nothing", json={}, timeout=30)
    assert r.status_code == 404 and error_of(r)


def test_any_model_name_means_the_served_model(client, mid):
    """As llama-server: clients configured for "gpt-4o" get the one model this server has."""
    for name in ("gpt-4o", "gpt-3.5-turbo", mid):
        r = client.chat.completions.create(model=name, messages=chat_messages("hi"), max_tokens=4, temperature=0)
        assert r.model == mid and r.choices[0].message.role == "assistant"


def test_limits_give_400(server, client, tiny_path, mid):
    with pytest.raises(openai.BadRequestError) as e:         # over the per-request context (4096 / 4)
        client.completions.create(model=mid, prompt="hi", max_tokens=100_000)
    assert e.value.status_code == 400
    with pytest.raises(openai.BadRequestError) as e:         # the prompt alone fills the context
        client.completions.create(model=mid, prompt=[1] + [100] * 1100, max_tokens=1)
    assert e.value.code == "context_length_exceeded"
    r = httpx.post(server.url + "/v1/completions", content=b'{"prompt": "' + b"a" * (2 << 20) + b'"}',
                   headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 400 and error_of(r)["code"] == "request_too_large"


def test_api_key(tiny_path, mid):
    s = ServerProcess(tiny_path, "-np", "1", "-c", "512", "--api-key", "sekrit", "--metrics")
    try:
        with pytest.raises(openai.AuthenticationError):
            s.client(api_key="wrong").models.list()
        r = httpx.get(s.url + "/v1/models", timeout=30)           # no key at all
        assert r.status_code == 401 and error_of(r)["code"] == "invalid_api_key"
        assert httpx.get(s.url + "/metrics", timeout=30).status_code == 401     # failed reads are counted
        assert httpx.get(s.url + "/health", timeout=30).status_code == 200
        good = s.client(api_key="sekrit")
        assert [m.id for m in good.models.list()] == [mid]
        r = good.completions.create(model=mid, prompt="hi", max_tokens=3, temperature=0)
        assert r.usage.prompt_tokens > 0
        assert "alpaca2_requests_total" in httpx.get(s.url + "/metrics", headers={"Authorization": "Bearer sekrit"},
                                                     timeout=30).text
        assert s.metrics(Authorization="Bearer sekrit")['alpaca2_requests_total{endpoint="/metrics",code="401"}'] == 1
        assert httpx.get(s.url + "/v1/models", headers={"x-api-key": "sekrit"}, timeout=30).status_code == 200
        assert httpx.get(s.url + "/v1/models", headers={"x-api-key": "sekri"}, timeout=30).status_code == 401
        r = httpx.options(s.url + "/v1/chat/completions", timeout=30,     # a CORS preflight needs no key
                          headers={"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://localhost:3000"
    finally:
        s.stop()


# -- several clients at once --------------------------------------------------------------------

PROMPTS = ["床前明月光，", "Once upon a time", "你好", "The quick brown fox", "一二三四五", "hello", "疑是地上霜",
           "lorem ipsum dolor"]


def test_eight_streaming_clients_match_lone_answers(server, client, tiny_path, mid):
    kw = dict(model=mid, max_tokens=64, temperature=0, logit_bias=NO_EOS)
    alone = [client.chat.completions.create(messages=chat_messages(p), **kw).choices[0].message.content
             for p in PROMPTS]
    before = server.metrics()

    def stream(p):
        it = client.chat.completions.create(messages=chat_messages(p), stream=True, **kw)
        return "".join(c.choices[0].delta.content or "" for c in it)

    def quitter():
        # a client that leaves mid-stream while asking for far more tokens than it will read
        with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=120,
                          json=dict(kw, messages=chat_messages("quit"), max_tokens=900, stream=True)) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data:"):
                    break

    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS) + 1) as pool:
        gone = pool.submit(quitter)
        futures = [pool.submit(stream, p) for p in PROMPTS]
        together = [f.result(180) for f in futures]
        gone.result(180)
    assert together == alone
    during = server.metrics()
    steps = during["alpaca2_decode_steps_total"] - before["alpaca2_decode_steps_total"]
    tokens = during["alpaca2_completion_tokens_total"] - before["alpaca2_completion_tokens_total"]
    assert steps < tokens                # some steps decoded several clients' tokens at once
    wait_for(lambda: server.metrics()["alpaca2_requests_cancelled_total"] > before["alpaca2_requests_cancelled_total"],
             what="the quitter's request to be cancelled")
    wait_for(lambda: server.metrics()["alpaca2_slots_busy"] == 0, what="every slot to be free")
    after = server.metrics()
    # the quitter stopped early: far fewer than its 900 tokens were generated
    assert after["alpaca2_completion_tokens_total"] - before["alpaca2_completion_tokens_total"] < 8 * 64 + 900


def test_full_queue_gives_503_and_a_disconnect_frees_the_slot(tiny_path, mid):
    s = ServerProcess(tiny_path, "-np", "1", "--queue", "1", "-c", "65536", "--metrics")
    try:
        body = {"prompt": "hello", "max_tokens": 60_000, "temperature": 0, "logit_bias": NO_EOS, "stream": True}
        with httpx.Client(timeout=120) as a, httpx.Client(timeout=120) as b:
            with a.stream("POST", s.url + "/v1/completions", json=body) as long_one:
                lines = long_one.iter_lines()
                assert next(line for line in lines if line.startswith("data:"))     # it holds the slot
                queued = b.send(b.build_request("POST", s.url + "/v1/completions",
                                                json=dict(body, max_tokens=5)), stream=True)
                assert queued.status_code == 200
                wait_for(lambda: s.metrics()["alpaca2_queue_length"] == 1, what="the second request to queue")
                with pytest.raises(openai.APIStatusError) as e:
                    s.client().completions.create(model=mid, prompt="third", max_tokens=5)
                assert e.value.status_code == 503 and e.value.response.headers["retry-after"] == "1"
                assert e.value.code == "server_busy"
            # the long stream's client left: its slot goes to the queued request, which completes
            text = "".join(queued.iter_lines())
            queued.close()
        assert "[DONE]" in text and '"finish_reason": "length"' in text
        m = s.metrics()
        assert m["alpaca2_requests_rejected_total"] == 1 and m["alpaca2_requests_cancelled_total"] >= 1
        assert m["alpaca2_completion_tokens_total"] < 60_000
        # a non-streamed request whose client gives up is cancelled too
        with pytest.raises(httpx.TimeoutException):
            httpx.post(s.url + "/v1/completions", json=dict(body, stream=False), timeout=1.0)
        wait_for(lambda: s.metrics()["alpaca2_requests_cancelled_total"] >= 2, what="the cancellation")
        wait_for(lambda: s.metrics()["alpaca2_slots_busy"] == 0, what="the slot to be free")
        assert s.metrics()["alpaca2_completion_tokens_total"] < 120_000
    finally:
        s.stop()


def test_metrics(server, client, tiny_path, mid):
    client.completions.create(model=mid, prompt="hi", max_tokens=4, temperature=0, logit_bias=NO_EOS)
    text = httpx.get(server.url + "/metrics", timeout=30).text
    for name in ("requests_total", "prompt_tokens_total", "completion_tokens_total", "tokens_per_second",
                 "queue_length", "slots_busy", "slots_total", "requests_rejected_total"):
        assert f"# TYPE alpaca2_{name} " in text
    m = server.metrics()
    assert m['alpaca2_requests_total{endpoint="/v1/completions",code="200"}'] >= 1
    # monitoring reads that succeed are not counted: scraping leaves the next scrape's counts alone
    for path in ("/health", "/props", "/v1/models", "/slots", "/metrics"):
        assert httpx.get(server.url + path, timeout=30).status_code == 200
    again = server.metrics()
    assert not any("/metrics" in k or "/health" in k or "/props" in k or "/slots" in k for k in again)
    assert {k: v for k, v in again.items() if "requests_total" in k} == \
        {k: v for k, v in m.items() if "requests_total" in k}
    assert m["alpaca2_completion_tokens_total"] >= 4 and m["alpaca2_tokens_per_second"] > 0
    assert m["alpaca2_slots_total"] == 4


# -- the process ----------------------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_shuts_down_gracefully(tiny_path, sig):
    s = ServerProcess(tiny_path, "-np", "2", "-c", "65536", "--shutdown-timeout", "1")
    try:
        body = {"prompt": "hello", "max_tokens": 30_000, "temperature": 0, "logit_bias": NO_EOS, "stream": True}
        with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=120) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
            s.proc.send_signal(sig)
            rest = list(lines)           # the stream ends (cut short after the timeout), not hangs
        assert s.proc.wait(60) == 0
        assert any("shutting down" in line for line in rest)
        assert "server stopped" in "".join(s.lines)
    finally:
        s.stop()


def test_serve_without_starlette_says_what_to_install(tiny_path):
    code = ("import sys; sys.modules['starlette'] = None; sys.modules['uvicorn'] = None\n"
            "from alpaca2 import cli\n"
            f"sys.exit(cli.main(['serve', '-m', {str(tiny_path)!r}]))")
    r = run_python(code)
    assert r.returncode == 3
    assert "pip install 'alpaca2-llama[server]'" in r.stderr
