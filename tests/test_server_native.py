"""More of llama-server's behaviour on alpaca2 serve: /rerank, response_fields, logit_bias by text,
prompt progress, -kvu (one KV cache shared by all slots), embedding inputs of every shape, and
/metrics counting embeddings.  Tiny f32 models, a real server subprocess, httpx.
"""
import json

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

import alpaca2  # noqa: E402
from server_process import NO_EOS, ServerProcess  # noqa: E402

DOCS = ["A machine is a physical system.", "Learning is acquiring knowledge.",
        "Machine learning is a field of study.", "Paris est une grande ville."]


@pytest.fixture(scope="module")
def server(tiny_path):
    s = ServerProcess(tiny_path, "-np", "2", "-c", "1024", "-n", "16", "-b", "32", "--reranking", "--metrics",
                      "--embeddings")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def vocab(tiny_path):
    with alpaca2.Model(tiny_path) as m:
        yield m


def post(server, path, body):
    return httpx.post(server.url + path, json=body, timeout=120)


def test_rerank_scores_match_the_last_tokens_hidden_state(server, tiny_path, vocab):
    r = post(server, "/rerank", {"query": "Machine learning is", "documents": DOCS, "top_n": 3})
    assert r.status_code == 200, r.text
    d = r.json()
    assert [x["index"] for x in d["results"]] and len(d["results"]) == 3
    scores = [x["relevance_score"] for x in d["results"]]
    assert scores == sorted(scores, reverse=True)
    # the oracle: the first value of the last token's (normed) hidden state of BOS query document
    ctx = alpaca2.Context(vocab, n_ctx=256, embeddings=True, pooling="last", n_threads=1)
    want = {}
    for i, doc in enumerate(DOCS):
        ids = [vocab.bos] + vocab.tokenize("Machine learning is", add_bos=False) + vocab.tokenize(doc, add_bos=False)
        ctx.clear()
        ctx.decode(ids)
        want[i] = float(ctx.embeddings[0])
    ctx.close()
    best = sorted(want, key=want.get, reverse=True)[:3]
    assert [x["index"] for x in d["results"]] == best
    for x in d["results"]:
        assert x["relevance_score"] == pytest.approx(want[x["index"]], rel=1e-4, abs=1e-5)
    n_tokens = sum(len(vocab.tokenize("Machine learning is", add_bos=True)) + len(vocab.tokenize(doc, add_bos=False))
                   for doc in DOCS)
    assert d["usage"]["prompt_tokens"] == d["usage"]["total_tokens"] == n_tokens
    # TEI's shape: a bare list with "score", and the texts on request
    t = post(server, "/v1/rerank", {"query": "Machine learning is", "texts": DOCS, "return_text": True}).json()
    assert [x["index"] for x in t] == [x["index"] for x in d["results"]] + [i for i in best[3:]] or len(t) == 4
    assert all(x["text"] == DOCS[x["index"]] for x in t)


@pytest.mark.parametrize("body", [{"query": "q", "documents": []}, {"query": "q", "documents": None},
                                  {"query": "q", "documents": 123}, {"query": "q", "documents": [1, 2]},
                                  {"documents": ["a"]}, {"query": 5, "documents": ["a"]},
                                  {"query": "q", "documents": ["a"], "top_n": "2"}])
def test_bad_rerank_requests_get_400(server, body):
    r = post(server, "/rerank", body)
    assert r.status_code == 400 and "error" in r.json()


def test_response_fields_and_the_prompt_as_the_model_saw_it(server, vocab):
    r = post(server, "/completion", {"prompt": "Hello there", "n_predict": 4, "logit_bias": NO_EOS,
                                     "response_fields": ["content", "generation_settings/n_predict", "prompt", "x/y"]})
    d = r.json()
    assert set(d) == {"content", "generation_settings/n_predict", "prompt"}
    assert d["generation_settings/n_predict"] == 4
    assert d["prompt"] == vocab.detokenize(vocab.tokenize("Hello there", add_bos=True), special=True)
    assert post(server, "/completion", {"prompt": "x", "response_fields": "content"}).status_code == 400


def test_logit_bias_by_text_bans_those_tokens(server, vocab):
    base = {"prompt": "Once upon a time", "n_predict": 24, "temperature": 0, "logit_bias": NO_EOS, "return_tokens": True}
    free = post(server, "/completion", base).json()["tokens"]
    word = vocab.detokenize(free[:1])
    banned = set(vocab.tokenize(word, add_bos=False))
    for bias in ({word: -100, "2": -100}, [[word, False], [2, False]]):
        out = post(server, "/completion", dict(base, logit_bias=bias)).json()["tokens"]
        assert not banned & set(out), (bias, out)


def test_prompt_progress_is_streamed_batch_by_batch(server, vocab):
    prompt = "the quick brown fox jumps over the lazy dog " * 8
    n = len(vocab.tokenize(prompt, add_bos=True))
    with httpx.stream("POST", server.url + "/completion", timeout=120, json={
            "prompt": prompt, "n_predict": 4, "stream": True, "return_progress": True, "timings_per_token": True,
            "cache_prompt": False, "id_slot": 1}) as s:
        chunks = [json.loads(line[5:]) for line in s.iter_lines() if line.startswith("data:")]
    progress = [c for c in chunks if "prompt_progress" in c]
    assert len(progress) >= -(-n // 32) + 1            # the first report, then one per 32-token batch
    first = progress[0]
    assert first["prompt_progress"]["processed"] == first["prompt_progress"]["cache"]
    assert first["timings"]["prompt_n"] == 0 and first["timings"]["prompt_ms"] == 0.0
    done = [p["prompt_progress"]["processed"] for p in progress]
    assert done == sorted(done) and done[-1] == n and all(p["prompt_progress"]["total"] == n for p in progress)
    ms = [p["timings"]["prompt_ms"] for p in progress]
    assert ms == sorted(ms) and ms[-1] > 0
    assert chunks[-1]["stop"] is True and "prompt_progress" not in chunks[-1]


def test_generation_rate_counts_decode_steps(server):
    one = post(server, "/completion", {"prompt": "I believe", "n_predict": 1}).json()["timings"]
    assert one["predicted_n"] == 1 and one["predicted_per_second"] == 0.0 and one["predicted_per_token_ms"] == 0.0
    t = post(server, "/completion", {"prompt": "I believe", "n_predict": 8, "logit_bias": NO_EOS}).json()["timings"]
    assert t["predicted_per_second"] == pytest.approx(1e3 / t["predicted_ms"] * 7)


@pytest.mark.parametrize("inp, n", [("", 1), ("string", 1), ([12, 34, 56], 1), ([12, 34, "string", 56], 1),
                                    (["a", "b"], 2), (["a", [12, 34]], 2), ([[12, 34], [12, "s", 34]], 2),
                                    ({"prompt_string": "s"}, 1), ({"content": [{"type": "text", "text": "s"}]}, 1),
                                    (["a", {"prompt_string": "b"}, {"content": [{"type": "text", "text": "c"}]}], 3)])
def test_embedding_inputs_of_every_shape(server, inp, n):
    r = post(server, "/v1/embeddings", {"input": inp})
    assert r.status_code == 200, r.text
    assert len(r.json()["data"]) == n


def test_content_parts_embed_as_their_text(server):
    a = post(server, "/v1/embeddings", {"input": "hello world"}).json()["data"][0]["embedding"]
    b = post(server, "/v1/embeddings", {"input": {"content": [{"type": "text", "text": "hello "},
                                                                {"type": "text", "text": "world"}]}}).json()
    assert b["data"][0]["embedding"] == a


def test_embeddings_count_in_metrics(server):
    def scrape():
        text = httpx.get(server.url + "/metrics", timeout=30).text
        return {ln.split()[0]: float(ln.split()[1]) for ln in text.splitlines() if ln.startswith("llamacpp:")}
    before = scrape()
    post(server, "/v1/embeddings", {"input": ["hello world", "goodbye world"]})
    after = scrape()
    assert after["llamacpp:prompt_tokens_total"] > before["llamacpp:prompt_tokens_total"]
    assert after["llamacpp:n_decode_total"] == before["llamacpp:n_decode_total"] + 2
    assert after["llamacpp:tokens_predicted_total"] == before["llamacpp:tokens_predicted_total"]


def test_kv_unified_lets_one_request_use_the_whole_cache(tiny_path):
    s = ServerProcess(tiny_path, "-np", "4", "-c", "1024", "-kvu")
    try:
        r = post(s, "/completion", {"prompt": "A", "n_predict": 300, "logit_bias": NO_EOS})
        assert r.status_code == 200, r.text
        assert r.json()["timings"]["predicted_n"] == 300        # more than 1024 / 4 slots
        assert httpx.get(s.url + "/props", timeout=30).json()["default_generation_settings"]["n_ctx"] == 1024
    finally:
        s.stop()
    plain = ServerProcess(tiny_path, "-np", "4", "-c", "1024")      # a KV-cache stream of 256 per slot
    try:
        assert httpx.get(plain.url + "/props", timeout=30).json()["default_generation_settings"]["n_ctx"] == 256
        r = post(plain, "/completion", {"prompt": "A", "n_predict": 300, "logit_bias": NO_EOS})
        assert r.status_code == 400 or r.json()["timings"]["predicted_n"] < 256
    finally:
        plain.stop()


def test_split_cache_pads_each_slot_as_llama_server(tiny_path):
    """Without -kvu each slot has a stream of -c / -np cells, rounded up to 256 as llama.cpp does
    (llama-server's -c 256 -np 4 gives 4 slots of 256)."""
    s = ServerProcess(tiny_path, "-np", "4", "-c", "256")
    try:
        props = httpx.get(s.url + "/props", timeout=30).json()
        assert props["default_generation_settings"]["n_ctx"] == 256
        r = post(s, "/completion", {"prompt": "A", "n_predict": 150, "logit_bias": NO_EOS})
        assert r.status_code == 200 and r.json()["timings"]["predicted_n"] == 150
    finally:
        s.stop()


def test_vertex_ai_predict_route(tiny_path):
    import os
    import sys
    s = ServerProcess.__new__(ServerProcess)
    env = dict(os.environ, AIP_MODE="PREDICTION", AIP_HEALTH_ROUTE="/healthz")
    s.start([sys.executable, "-m", "alpaca2", "serve", "-m", str(tiny_path), "--port", "0", "-t", "1", "-np", "2"],
            env=env)
    try:
        chat = {"@requestFormat": "chatCompletions", "max_tokens": 4, "stream": True, "logit_bias": NO_EOS,
                "messages": [{"role": "user", "content": "Say hello"}]}
        done = {"@requestFormat": "/completion", "prompt": "Hi", "n_predict": 2}
        r = post(s, "/predict", {"instances": [chat, done, {"@requestFormat": "nope"}, 7]})
        assert r.status_code == 200, r.text
        p = r.json()["predictions"]
        assert p[0]["choices"][0]["message"]["role"] == "assistant" and p[0]["usage"]["completion_tokens"] == 4
        assert "content" in p[1] and p[1]["tokens_predicted"] <= 2
        assert "no handler" in p[2]["error"]["message"] and "JSON object" in p[3]["error"]["message"]
        assert post(s, "/predict", {"instances": {}}).status_code == 400
        assert httpx.get(s.url + "/healthz", timeout=30).status_code == 200
    finally:
        s.stop()


def test_a_model_that_would_abort_at_the_first_tokenize_never_reports_healthy(tmp_path):
    """A t5 vocabulary told to add a BOS it lacks loads in llama.cpp, then its first tokenize aborts.
    The pre-check refuses it (one line, exit 1, never listening); with the pre-check switched off,
    the warm-up decode (before the server listens) is what meets the abort: /health is never green."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parent / "fuzz"))
    import gguf_fuzz
    seed = Path(gguf_fuzz.tiny_fuzz_model(tmp_path / "seed.gguf")).read_bytes()
    lay = gguf_fuzz.Layout(seed)
    kvs, tis, blob = lay.header_and_blob()
    records = {kv["key"]: rec for kv, rec in zip(lay.kvs, kvs)}
    records.pop("tokenizer.ggml.bos_token_id")
    records["tokenizer.ggml.model"] = gguf_fuzz.kv_record("tokenizer.ggml.model", 8, "t5")
    records["tokenizer.ggml.add_bos_token"] = gguf_fuzz.kv_record("tokenizer.ggml.add_bos_token", 7, True)
    bad = tmp_path / "t5.gguf"
    bad.write_bytes(gguf_fuzz.build(list(records.values()), tis, blob, lay.alignment))
    env = dict(os.environ, GGML_NO_BACKTRACE="1")
    r = subprocess.run([sys.executable, "-m", "alpaca2", "serve", "-m", str(bad), "--port", "0"],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 1 and "not a valid GGUF file" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert "serving" not in r.stderr
    unguarded = ("import sys, alpaca2._gguf_check as g; g.validate = lambda path: None\n"
                 "from alpaca2.server import main; sys.exit(main(sys.argv[1:]))")
    r = subprocess.run([sys.executable, "-c", unguarded, "-m", str(bad), "--port", "0"],
                       capture_output=True, text=True, timeout=120,
                       env=env)
    assert "not a valid GGUF file" not in r.stderr, r.stderr
    assert r.returncode != 0 and "serving" not in r.stderr, (r.returncode, r.stderr[-2000:])


def test_sleep_after_idle_seconds_frees_the_contexts_and_wakes_on_work(tiny_path):
    import time
    s = ServerProcess(tiny_path, "-np", "2", "-c", "512", "--sleep-idle-seconds", "1", "--metrics")

    def props():
        return httpx.get(s.url + "/props", timeout=30).json()

    def wait_sleeping(timeout=15):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if props()["is_sleeping"]:
                return True
            time.sleep(0.1)
        return False
    try:
        first = post(s, "/completion", {"prompt": "Hello", "n_predict": 8, "temperature": 0, "logit_bias": NO_EOS})
        assert first.status_code == 200 and props()["is_sleeping"] is False
        assert wait_sleeping()
        # reading endpoints leave it asleep
        for path in ("/health", "/props", "/v1/models", "/metrics", "/slots"):
            assert httpx.get(s.url + path, timeout=30).status_code == 200, path
        assert props()["is_sleeping"] is True
        # work wakes it, and the answer is the one before the sleep (same model, same greedy steps)
        again = post(s, "/completion", {"prompt": "Hello", "n_predict": 8, "temperature": 0, "logit_bias": NO_EOS})
        assert again.status_code == 200 and again.json()["content"] == first.json()["content"]
        assert again.json()["timings"]["cache_n"] == 0          # the slots' caches went with the contexts
        assert props()["is_sleeping"] is False
        assert wait_sleeping()
        assert post(s, "/tokenize", {"content": "hi"}).status_code == 200 and props()["is_sleeping"] is False
        # the throughput gauges cover the time since the previous scrape, as llama-server's
        post(s, "/completion", {"prompt": "Hello", "n_predict": 8, "logit_bias": NO_EOS})
        gauge = lambda: float([ln for ln in httpx.get(s.url + "/metrics", timeout=30).text.splitlines()  # noqa
                               if ln.startswith("llamacpp:predicted_tokens_seconds ")][0].split()[1])
        assert gauge() > 0 and gauge() == 0
    finally:
        s.stop()
    assert s.proc.returncode == 0


def test_chat_stream_reports_prompt_progress(server):
    body = {"messages": [{"role": "user", "content": "This is a test " * 12}], "max_tokens": 4, "stream": True,
            "return_progress": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=120) as s:
        chunks = [json.loads(line[5:]) for line in s.iter_lines() if line.startswith("data:") and "[DONE]" not in line]
    progress = [c["prompt_progress"] for c in chunks if "prompt_progress" in c]
    assert len(progress) >= 2 and progress[0]["cache"] == progress[0]["processed"] and progress[0]["total"] > 32
    assert [p["processed"] for p in progress] == sorted(p["processed"] for p in progress)
    assert progress[-1]["processed"] == progress[-1]["total"]
    first = next(c for c in chunks if "prompt_progress" in c)
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": None}


def test_responses_api_with_the_openai_client(server):
    openai = pytest.importorskip("openai")
    c = openai.OpenAI(api_key="none", base_url=server.url + "/v1", max_retries=0)
    msgs = [{"role": "system", "content": "Book"}, {"role": "user", "content": "What is the best book"}]
    r = c.responses.create(model="gpt-4.1", input=msgs, max_output_tokens=8, temperature=0)
    assert r.id.startswith("resp_") and r.output[0].id.startswith("msg_") and r.usage.output_tokens <= 8
    # the same request as a chat completion gives the same text (it is one)
    same = c.chat.completions.create(model="x", messages=msgs, max_tokens=8, temperature=0)
    assert r.output_text == same.choices[0].message.content
    streamed, kinds, final = "", [], None
    for ev in c.responses.create(model="gpt-4.1", input=msgs, max_output_tokens=8, temperature=0, stream=True):
        kinds.append(ev.type)
        if ev.type == "response.output_text.delta":
            streamed += ev.delta
        if ev.type == "response.completed":
            final = ev.response
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"] and kinds[-1] == "response.completed"
    assert streamed == final.output_text == r.output_text
    n = post(server, "/v1/responses/input_tokens", {"input": msgs}).json()["input_tokens"]
    assert n == same.usage.prompt_tokens
    for bad_body in ({"model": "x"}, {"input": [{"type": "function_call"}]}, {"input": 5},
                     {"input": "x", "previous_response_id": "resp_1"}):
        assert post(server, "/v1/responses", bad_body).status_code == 400


def test_responses_stream_carries_progress_and_timings(server):
    body = {"input": "This is a test " * 12, "max_output_tokens": 4, "stream": True, "timings_per_token": True,
            "return_progress": True}
    with httpx.stream("POST", server.url + "/v1/responses", json=body, timeout=120) as s:
        events = [json.loads(line[5:]) for line in s.iter_lines() if line.startswith("data:")]
    progress = [e for e in events if "prompt_progress" in e]
    assert progress and all(e["type"] == "response.in_progress" for e in progress)
    assert any(e["type"] == "response.output_text.delta" and "predicted_per_second" in e["timings"] for e in events)
    done = events[-1]
    assert done["type"] == "response.completed" and "usage" in done["response"] and "timings" in done
