"""Speculative decoding in the server (alpaca2.server.speculative): the drafters against plain-loop
oracles, and greedy answers token for token the plain server's, with one slot and with three
slots decoding at once (their drafts verified in one batch)."""
import concurrent.futures
import random
import re
import socket
import subprocess
import sys
import time

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from alpaca2._common import NgramSpeculator  # noqa: E402
from alpaca2.server.speculative import lookup_draft, synth_probs  # noqa: E402
from server_process import NO_EOS, ServerProcess  # noqa: E402

PROMPTS = ["一二三四五六七八九十一二三四五六七八九十", "hello hello hello hello hello",
           "床前明月光，疑是地上霜。", "the cat sat on the mat, the cat sat on the mat, the cat"]
# four tokens raised far above the rest: the answers run in loops over them, as a copy would, so
# n-gram lookup finds drafts (the random tiny model's own text seldom repeats itself)
LOOPS = {**NO_EOS, **{str(t): 30 for t in (100, 101, 102, 103)}}
BODY = {"n_predict": 48, "temperature": 0, "logit_bias": LOOPS, "return_tokens": True}


# -- the drafters ----------------------------------------------------------------------------------

def ngram_simple_oracle(tokens, sampled, n, m):
    """llama.cpp's common_ngram_simple_draft (common/ngram-map.cpp), loop for loop."""
    cur_len = len(tokens)
    if cur_len <= n + m + 1:
        return []
    pattern = tokens[cur_len - n + 1:] + [sampled]
    match_pos = 0
    for j in range(cur_len - n - 1, 0, -1):
        if all(tokens[j + k] == pattern[k] for k in range(len(pattern))):
            match_pos = j
            break
    if match_pos == 0:
        return []
    copy_max = min(m, cur_len - (match_pos + n))
    if copy_max < n:
        return []
    return tokens[match_pos + n:match_pos + n + copy_max]


def lookup_oracle(hist, n_max):
    """The longest of the last 4 .. 1 tokens, its latest earlier start, then up to n_max tokens."""
    L = len(hist)
    for n in range(min(4, L - 1), 0, -1):
        for s in range(L - n - 1, -1, -1):
            if hist[s:s + n] == hist[L - n:]:
                return hist[s + n:s + n + min(n_max, L - s - n)]
    return []


def test_drafters_match_the_plain_loops():
    """ngram-simple (llama.cpp's own, through NgramSpeculator) and --lookup against plain loops."""
    rng = random.Random(0)
    n_drafts = 0
    sizes = [(1, 1), (2, 3), (3, 8), (4, 4), (12, 48)]
    specs = {nm: NgramSpeculator(["ngram-simple"], 1, simple_size_n=nm[0], simple_size_m=nm[1]) for nm in sizes}
    for _ in range(3000):
        vocab = rng.choice([2, 3, 5, 20])
        hist = [rng.randrange(vocab) for _ in range(rng.randrange(1, 60))]
        if rng.random() < 0.5 and len(hist) > 8:          # a copied stretch, as in a rewrite
            a = rng.randrange(len(hist) - 4)
            hist += hist[a:a + rng.randrange(4, 20)]
        n, m = rng.choice(sizes)
        specs[n, m].begin(0, [])              # each history is a new generation
        got = specs[n, m].draft(0, hist[:-1], hist[-1], 1000)
        assert got == ngram_simple_oracle(hist[:-1], hist[-1], n, m), (hist, n, m)
        assert specs[n, m].draft(0, hist[:-1], hist[-1], 2) == got[:2]       # n_max cuts the draft
        n_drafts += bool(got)
        k = rng.randrange(0, 10)
        assert lookup_draft(hist, k) == lookup_oracle(hist, k) if k else lookup_draft(hist, k) == []
    assert n_drafts > 100


# -- the server ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def plain_answers(tiny_path):
    plain = ServerProcess(tiny_path, "-np", "1", "-c", "1024")
    try:
        prompts = list(PROMPTS)
        answers = [post(plain, dict(BODY, prompt=p))["tokens"] for p in prompts]
        # a prompt that is an answer, three times over (token ids): its continuation copies it, which
        # ngram-cache needs (it learns n-grams from the prompt, not from one-token steps)
        prompts.append(answers[3] * 3)
        answers.append(post(plain, dict(BODY, prompt=prompts[-1]))["tokens"])
        return prompts, answers
    finally:
        plain.stop()


def post(server, body):
    r = httpx.post(server.url + "/completion", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def metric(text, name):
    return float(re.search(rf"^llamacpp:{name} (\S+)", text, re.M).group(1))


FLAGS = {"ngram-simple": ["--spec-type", "ngram-simple", "--spec-ngram-simple-size-n", "2",
                          "--spec-ngram-simple-size-m", "6"],
         "ngram-map-k": ["--spec-type", "ngram-map-k", "--spec-ngram-map-k-size-n", "2",
                         "--spec-ngram-map-k-size-m", "6"],
         "ngram-map-k4v": ["--spec-type", "ngram-map-k4v", "--spec-ngram-map-k4v-size-n", "2",
                           "--spec-ngram-map-k4v-size-m", "6", "--spec-ngram-map-k4v-min-hits", "2"],
         "ngram-mod": ["--spec-type", "ngram-mod", "--spec-ngram-mod-n-match", "3", "--spec-ngram-mod-n-min", "1",
                       "--spec-ngram-mod-n-max", "6"],
         "ngram-cache": ["--spec-type", "ngram-cache"],
         "lookup": ["--lookup", "--draft-max", "8"],
         "other-draft": ["-md", "OTHER", "--draft-p-min", "0", "--draft-max", "4"],
         "self-draft": ["-md", "SELF", "--draft-p-min", "0", "--draft-max", "6"]}


@pytest.mark.parametrize("np_", [1, 3])
@pytest.mark.parametrize("mode", list(FLAGS))
def test_greedy_answers_equal_plain_ones(tiny_path, other_path, plain_answers, mode, np_):
    """Greedy: the same tokens as plain decoding, whatever the drafts; with -np 3 the prompts run
    at once, so one batch verifies several slots' drafts."""
    if np_ == 1 and mode in ("other-draft", "ngram-map-k", "ngram-map-k4v", "ngram-mod", "ngram-cache"):
        pytest.skip("covered with three slots (one slot: by ngram-simple and self-draft)")
    flags = [{"OTHER": str(other_path), "SELF": str(tiny_path)}.get(f, f) for f in FLAGS[mode]]
    spec = ServerProcess(tiny_path, "-np", str(np_), "-c", str(1024 * np_), "--metrics", "--slots", *flags)
    try:
        with concurrent.futures.ThreadPoolExecutor(np_) as pool:
            answers = list(pool.map(lambda p: post(spec, dict(BODY, prompt=p)), plain_answers[0]))
        metrics = httpx.get(spec.url + "/metrics", timeout=30).text
        slots = httpx.get(spec.url + "/slots", timeout=30).json()
        with concurrent.futures.ThreadPoolExecutor(np_) as pool:      # sampling: runs, full length
            sampled = list(pool.map(lambda i: post(spec, dict(BODY, prompt=PROMPTS[i], temperature=0.9, seed=i)),
                                    range(np_)))
    finally:
        spec.stop()
    assert [a["tokens"] for a in answers] == plain_answers[1]
    drafted, accepted = metric(metrics, "spec_decode_num_draft_tokens_total"), \
        metric(metrics, "spec_decode_num_accepted_tokens_total")
    steps = metric(metrics, "spec_decode_num_drafts_total")
    assert 0 <= accepted <= drafted and 0 < drafted and 0 < steps
    assert sum(a["timings"].get("draft_n", 0) for a in answers) == drafted
    assert sum(a["timings"].get("draft_n_accepted", 0) for a in answers) == accepted
    if mode == "self-draft":                 # its own drafts: all kept, several tokens per step
        assert accepted == drafted and steps < len(answers) * 47 / 3
    elif mode == "ngram-cache":              # it drafts the copy only: every draft kept
        assert 0 < accepted
    elif mode == "other-draft":              # (the draft does not see the request's logit_bias)
        assert accepted < drafted
    else:
        assert 0 < accepted < drafted
    assert all(s["speculative"] for s in slots) and len(slots) == np_
    assert all(s["tokens_predicted"] == 48 for s in sampled)


@pytest.mark.parametrize("args, words", [
    (["--spec-type", "draft-eagle3"], "not supported by alpaca2 serve"),
    (["--spec-type", "ngram-mod", "--spec-ngram-mod-n-match", "0"], "--spec-ngram-mod-n-match"),
    (["--spec-type", "ngram-what"], "unknown type"),
    (["--spec-type", "draft-simple"], "needs a draft model"),
])
def test_bad_spec_types_are_usage_errors(tiny_path, args, words):
    r = subprocess.run([sys.executable, "-m", "alpaca2", "serve", "-m", str(tiny_path), "--port", "0", *args],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr


def test_bad_lookup_cache_is_one_line(tiny_path, tmp_path):
    """-lcs with a file that is not an n-gram cache: llama-server aborts; alpaca2 says so and exits 1."""
    bad = tmp_path / "bad.lcs"
    bad.write_bytes(b"\1\0\0\0" * 4 + b"\0\0\0\0")         # an n-gram followed by zero next tokens
    r = subprocess.run([sys.executable, "-m", "alpaca2", "serve", "-m", str(tiny_path), "--port", "0",
                        "--spec-type", "ngram-cache", "-lcs", str(bad)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1] == f"alpaca2: the lookup cache {bad} is not an n-gram cache " \
        "(record 0: no token count)"


@pytest.mark.parametrize("arch", ["mamba", "hybrid"])
def test_recurrent_models_draft_and_rewind(arch, mamba_path, hybrid_path):
    """A recurrent state cannot drop rejected drafts: as llama-server's checkpoints, each drafting
    slot's state is saved before the step, put back after a rejection, and the kept tokens are decoded
    again.  Greedy answers equal plain decoding's, with drafts both kept and rejected, on Mamba and on
    a hybrid (attention + Mamba-2) model, one slot and three at once."""
    path = {"mamba": mamba_path, "hybrid": hybrid_path}[arch]
    plain = ServerProcess(path, "-np", "1", "-c", "1024")
    try:
        want = [post(plain, dict(BODY, prompt=p))["tokens"] for p in PROMPTS]
    finally:
        plain.stop()
    for np_, flags in [(1, FLAGS["ngram-simple"]), (3, FLAGS["lookup"])]:
        spec = ServerProcess(path, "-np", str(np_), "-c", str(1024 * np_), "--metrics", *flags)
        try:
            with concurrent.futures.ThreadPoolExecutor(np_) as pool:
                got = list(pool.map(lambda p: post(spec, dict(BODY, prompt=p)), PROMPTS))
            # a second round: the slots start from what the first left (a recurrent state is reused whole or not at all)
            with concurrent.futures.ThreadPoolExecutor(np_) as pool:
                again = list(pool.map(lambda p: post(spec, dict(BODY, prompt=p)), PROMPTS))
            metrics = httpx.get(spec.url + "/metrics", timeout=30).text
        finally:
            spec.stop()
        assert [a["tokens"] for a in got] == want and [a["tokens"] for a in again] == want, (np_, flags)
        drafted, accepted = metric(metrics, "spec_decode_num_draft_tokens_total"), \
            metric(metrics, "spec_decode_num_accepted_tokens_total")
        assert 0 < accepted < drafted, (np_, flags, accepted, drafted)
    # after sleeping (the contexts made again) the slots still rewind
    spec = ServerProcess(path, "-np", "1", "-c", "1024", "--metrics", "--sleep-idle-seconds", "1", *FLAGS["ngram-simple"])
    try:
        first = post(spec, dict(BODY, prompt=PROMPTS[3]))
        deadline = time.monotonic() + 15
        while not httpx.get(spec.url + "/props", timeout=30).json()["is_sleeping"]:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        woken = post(spec, dict(BODY, prompt=PROMPTS[3]))
    finally:
        spec.stop()
    assert first["tokens"] == woken["tokens"] == want[3]
    assert 0 < woken["timings"]["draft_n_accepted"] < woken["timings"]["draft_n"]


def test_synthetic_acceptance_rates():
    """--spec-synth-len L: rates p, p^2 ... whose sum is L - 1 (the mean kept drafts); the chances
    per draft are the rates' ratios, as llama-server's."""
    probs = synth_probs(None, 3.0, 8)
    rates = [probs[0]]
    for q in probs[1:]:
        rates.append(rates[-1] * q)
    assert sum(rates) == pytest.approx(2.0, abs=1e-6) and all(q == pytest.approx(probs[0]) for q in probs)
    assert synth_probs([1.0, 0.5, 0.25], None, 3) == [1.0, 0.5, 0.5]
    assert synth_probs(None, 4.0, 3) == [1.0, 1.0, 1.0] and synth_probs(None, 1.0, 3) == [0.0, 0.0, 0.0]
    for rates, length in (([0.5, 0.6, 0.1], None), ([1.0], None), (None, 9.0), ([1.0, 1.0, 1.0], 2.0)):
        with pytest.raises(ValueError):
            synth_probs(rates, length, 3)


ORACLE_FLAGS = {"ngram-simple": FLAGS["ngram-simple"], "ngram-map-k": FLAGS["ngram-map-k"],
                "ngram-map-k4v": FLAGS["ngram-map-k4v"], "ngram-mod": FLAGS["ngram-mod"],
                "ngram-cache": FLAGS["ngram-cache"]}


@pytest.mark.parametrize("mode", list(ORACLE_FLAGS))
def test_ngram_drafts_equal_llama_servers(tiny_path, plain_answers, mode):
    """llama-server (built from the vendored tree) as the oracle: one slot, the same requests one
    after the other; each answer's tokens and its drafted and kept token counts are llama-server's."""
    from test_common import llama_server_bin
    binary = llama_server_bin()
    prompts = plain_answers[0]
    spec = ServerProcess(tiny_path, "-np", "1", "-c", "1024", *ORACLE_FLAGS[mode])
    try:
        ours = [post(spec, dict(BODY, prompt=p)) for p in prompts]
    finally:
        spec.stop()
    oracle = ServerProcess.__new__(ServerProcess)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([binary, "-m", str(tiny_path), "--host", "127.0.0.1", "--port", str(port), "-np", "1",
                             "-c", "1024", "-t", "1", *ORACLE_FLAGS[mode]],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    oracle.proc, oracle.url = proc, f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(oracle.url + "/health", timeout=10).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, "llama-server exited"
            time.sleep(0.1)
        theirs = [post(oracle, dict(BODY, prompt=p)) for p in prompts]
    finally:
        proc.terminate()
        proc.wait(30)
    counts = [(a["timings"].get("draft_n", 0), a["timings"].get("draft_n_accepted", 0)) for a in ours]
    assert [a["tokens"] for a in ours] == [a["tokens"] for a in theirs]
    assert counts == [(a["timings"].get("draft_n", 0), a["timings"].get("draft_n_accepted", 0)) for a in theirs]
    assert sum(n for n, _ in counts) > 0


@pytest.mark.parametrize("p_min", [0.0, 0.02])
def test_draft_model_drafts_slots_together_as_one_by_one(tiny_path, other_path, p_min):
    """DraftModel.draft_many (one draft-model decode per position for all slots) gives each slot the
    tokens it gets drafting alone, with its own logit_bias and history (shared prefixes, edits)."""
    import alpaca2
    from alpaca2.server.speculative import DraftModel
    target_model, draft_model = alpaca2.Model(tiny_path), alpaca2.Model(other_path)
    target = alpaca2.Context(target_model, n_ctx=1024, n_seq_max=3)
    together = DraftModel(target, draft_model, parallel=3, p_min=p_min, kv_unified=False, n_ctx=1024)
    alone = DraftModel(target, draft_model, parallel=3, p_min=p_min, kv_unified=False, n_ctx=1024)
    rng = random.Random(3)
    hists = [[rng.randrange(3, 200) for _ in range(n)] for n in (5, 29, 100)]    # 100: caught up on its own
    n_total = 0
    try:
        for step in range(12):
            reqs = []
            for seq, h in enumerate(hists):
                if rng.random() < 0.3:
                    h[:] = h[:rng.randrange(1, len(h) + 1)]          # drafts rejected, or a new request
                h.append(rng.randrange(3, 200))
                bias = {100: 5.0, 7: -100.0} if seq == 1 else None
                reqs.append((seq, list(h), rng.randrange(0, 7), bias))
            got = together.draft_many(reqs)
            want = {seq: alone.draft(seq, h, n, b) for seq, h, n, b in reqs}
            assert got == want
            n_total += sum(len(d) for d in got.values())
    finally:
        together.close()
        alone.close()
        target.close()
    assert n_total > 20


def test_a_history_llama_cpp_refuses_means_no_drafts_not_a_failed_step(tiny_path):
    """If a slot's tokens ever shrank under llama.cpp's n-gram drafters (ngram-map asserts on that),
    the step goes on without drafts for it and the drafters start that slot over."""
    import types

    import alpaca2
    from alpaca2.server.speculative import SlotSpeculation
    model = alpaca2.Model(tiny_path)
    ctx = alpaca2.Context(model, n_ctx=512, n_seq_max=1)
    spec = SlotSpeculation(ctx, types=["ngram-map-k"], parallel=1, ngram=dict(map_k_size_n=2, map_k_size_m=4))
    job = types.SimpleNamespace(speculate=True, max_tokens=100, completion_tokens=0)
    slot = types.SimpleNamespace(seq_id=0, job=job, tokens=[5, 6, 7, 8] * 10)
    batch = alpaca2.Batch(64, 1)
    try:
        spec.add_drafts(batch, [(slot, 0)], 32, 512)
        assert len(batch) > 0                   # the repeat drafts
        slot.tokens = slot.tokens[:12]          # shorter than llama.cpp last saw
        batch.clear()
        spec.add_drafts(batch, [(slot, 0)], 32, 512)
        assert len(batch) == 0 and spec.begun[0] is None
        spec.add_drafts(batch, [(slot, 0)], 32, 512)       # begun again from these tokens
        assert spec.begun[0] is job
    finally:
        spec.close()
        ctx.close()
