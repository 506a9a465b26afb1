"""Speculative decoding (draft model and n-gram lookup) and batched generation.

Oracles: plain greedy decoding of the target (token for token), the target's own next-token
distribution computed from its logits (chi-square), a clean decode over the same tokens (KV
cache consistency), and single-sequence runs (batched generation).
"""
import subprocess
import sys

import numpy as np
import pytest

import alpaca2
from alpaca2 import testing

CTX = dict(n_ctx=512, n_batch=64, n_threads=2, type_k="f32", type_v="f32", flash_attn=False)
PROMPTS = ["床前明月光，疑是地上霜。", "hello world, this is a test of", "举头望明月，低头思故乡。举头望明月，",
           "The quick brown fox jumps over the lazy dog. The quick brown"]
GREEDY = dict(temp=0, repeat_penalty=1.0)


@pytest.fixture(scope="module")
def target(tiny_path):
    m = alpaca2.Model(tiny_path)
    yield m
    m.close()


@pytest.fixture(scope="module")
def other(other_path):
    m = alpaca2.Model(other_path)
    yield m
    m.close()


@pytest.fixture(scope="module")
def plain(target):
    llm = alpaca2.Llama(target, **CTX)
    yield llm
    llm.close()


def _softmax(x):
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


def _chi2_z(counts, probs):
    """Chi-square statistic of counts against probs (small bins pooled) as a Wilson-Hilferty z."""
    n = counts.sum()
    exp = probs * n
    big = exp >= 5
    o = np.append(counts[big], counts[~big].sum())
    e = np.append(exp[big], exp[~big].sum())
    keep = e > 0
    o, e = o[keep], e[keep]
    x = ((o - e) ** 2 / e).sum()
    df = len(o) - 1
    return ((x / df) ** (1 / 3) - (1 - 2 / (9 * df))) / np.sqrt(2 / (9 * df))


# -- greedy: exactly the target's tokens ------------------------------------------------------------

@pytest.mark.parametrize("drafter", ["other", "self", "lookup"])
@pytest.mark.parametrize("n_draft", [1, 4, 12])
def test_greedy_speculative_equals_plain_greedy(target, other, plain, drafter, n_draft):
    draft = {"other": other, "self": target, "lookup": None}[drafter]
    llm = alpaca2.Llama(target, draft_model=draft, lookup=drafter == "lookup", n_draft=n_draft,
                        draft_p_min=0.0, **CTX)
    try:
        drafted = accepted = 0
        for prompt in PROMPTS:
            for sampling in (GREEDY, dict(temp=0, repeat_penalty=1.3)):
                want = plain.generate(prompt, 40, **sampling)
                want_tokens = plain.last_stats["tokens"]
                got = llm.generate(prompt, 40, **sampling)
                assert llm.last_stats["tokens"] == want_tokens, (prompt, sampling)
                assert got == want
                sp = llm.last_stats["speculative"]
                if sampling is GREEDY:       # the draft has no penalties: count runs without them
                    drafted += sp["n_drafted"]
                    accepted += sp["n_accepted"]
        assert drafted > 0
        if drafter == "self":
            # the same model drafts: all but float-noise near-ties are kept
            assert accepted / drafted > 0.9
        if drafter == "other":
            assert accepted / drafted < 0.5    # a draft that disagrees often
    finally:
        llm.close()


def test_speculator_self_draft_accepts_everything_without_penalties(target):
    t = alpaca2.Context(target, **CTX)
    d = alpaca2.Context(target, **CTX)
    spec = alpaca2.Speculator(t, d, n_draft=8, p_min=0.0)
    prompt = target.tokenize(PROMPTS[0])
    t.decode(prompt[:-1], logits=None)
    spec.begin(prompt, alpaca2.Sampler(temp=0))
    out = []
    while len(out) < 60:
        new = spec.step(60 - len(out))
        assert 1 <= len(new) <= 9
        out += new
    st = spec.stats
    assert st["acceptance_rate"] >= 0.95
    assert st["tokens_per_step"] > 5          # up to 9 tokens per verification step
    assert st["n_generated"] == 60 and len(out) == 60
    assert spec.tokens == list(prompt) + out


def test_lookup_drafts_from_repeated_text(target, plain):
    text = "举头望明月，低头思故乡。" * 6
    llm = alpaca2.Llama(target, lookup=True, n_draft=8, **CTX)
    try:
        # the model is asked to continue a text that repeats: its greedy continuation is checked
        # against plain decoding; the lookup must have found n-grams to draft from
        assert llm.generate(text, 48, **GREEDY) == plain.generate(text, 48, **GREEDY)
        assert llm.last_stats["speculative"]["n_drafted"] > 0
    finally:
        llm.close()


# -- sampling: exactly the target's distribution ----------------------------------------------------

SAMPLING = dict(temp=1.0, top_k=0, top_p=1.0, min_p=0.0)


@pytest.mark.parametrize("drafter", ["other", "lookup"])
def test_speculative_sampling_matches_target_distribution(target, other, drafter):
    prompt = target.tokenize(PROMPTS[2])
    ref = alpaca2.Context(target, **CTX)
    ref.decode(prompt)
    p = _softmax(ref.logits)
    t = alpaca2.Context(target, **CTX)
    d = alpaca2.Context(other, **CTX) if drafter == "other" else None
    spec = alpaca2.Speculator(t, d, lookup=drafter == "lookup", n_draft=4, p_min=0.0, seed=1)
    t.decode(prompt[:-1], logits=None)
    n = 2000
    counts = np.zeros(len(p))
    for i in range(n):
        spec.begin(prompt, alpaca2.Sampler(seed=1000 + i, **SAMPLING),
                   alpaca2.Sampler(seed=50000 + i, **SAMPLING) if d is not None else None)
        counts[spec.step(8)[0]] += 1
    assert spec.stats["n_drafted"] > 0
    assert _chi2_z(counts, p) < 4.0             # consistent with the target's distribution
    if drafter == "other":
        ref2 = alpaca2.Context(other, **CTX)
        ref2.decode(prompt)
        q = _softmax(ref2.logits)
        assert 0.5 * np.abs(p - q).sum() > 0.5    # the draft's own distribution is far from it...
        assert _chi2_z(counts, q) > 20.0          # ...and the samples are not distributed as the draft's
        assert 0.0 < spec.stats["acceptance_rate"] < 0.6


def test_kv_caches_consistent_after_speculative_sampling(target, other):
    prompt = target.tokenize(PROMPTS[1])
    t = alpaca2.Context(target, **CTX)
    d = alpaca2.Context(other, **CTX)
    spec = alpaca2.Speculator(t, d, n_draft=6, p_min=0.0, seed=3)
    t.decode(prompt[:-1], logits=None)
    spec.begin(prompt, alpaca2.Sampler(seed=5, **SAMPLING), alpaca2.Sampler(seed=6, **SAMPLING))
    out = []
    while len(out) < 50:
        out += spec.step(50 - len(out))
    hist = spec.tokens
    assert hist == list(prompt) + out
    assert spec.stats["n_drafted"] > spec.stats["n_accepted"]      # there were rejections to trim
    # the target holds every token but the newest: decoding it gives a clean run's logits
    assert t.n_past(0) == len(hist) - 1
    t.decode([hist[-1]])
    clean = alpaca2.Context(target, **CTX)
    clean.decode(hist)
    np.testing.assert_allclose(t.logits, clean.logits, rtol=1e-4, atol=1e-4)
    # the draft holds a prefix of the same tokens
    n = d.n_past(0)
    assert 0 < n <= len(hist)
    d.decode(hist[n:])
    clean_d = alpaca2.Context(other, **CTX)
    clean_d.decode(hist)
    np.testing.assert_allclose(d.logits, clean_d.logits, rtol=1e-4, atol=1e-4)


def test_speculative_chat_session_multi_turn_equals_plain(target, other):
    spec_llm = alpaca2.Llama(target, draft_model=other, n_draft=4, draft_p_min=0.0, **CTX)
    plain_llm = alpaca2.Llama(target, **CTX)
    try:
        a = alpaca2.ChatSession(spec_llm, max_tokens=24, **GREEDY)
        b = alpaca2.ChatSession(plain_llm, max_tokens=24, **GREEDY)
        for q in ["你好", "背一下静夜思", "hello again"]:
            assert a.send(q, stream=False) == b.send(q, stream=False)
    finally:
        spec_llm.close()
        plain_llm.close()


# -- errors -----------------------------------------------------------------------------------------

def test_incompatible_draft_vocabulary(target, model_dir, tokenizer_path):
    big = testing.train_tokenizer(model_dir / "spm-big.model", vocab_size=1000)
    path = testing.make_model(model_dir / "big-vocab.gguf", tokenizer=big, vocab_size=1000)
    with pytest.raises(alpaca2.VocabMismatchError, match="tokens"):
        alpaca2.Llama(target, draft_model=path, **CTX)
    other_corpus = testing.train_tokenizer(model_dir / "spm-other.model", vocab_size=800,
                                           corpus=testing.CORPUS[::-1])
    path2 = testing.make_model(model_dir / "other-vocab.gguf", tokenizer=other_corpus)
    m = alpaca2.Model(path2)
    try:
        with pytest.raises(alpaca2.VocabMismatchError, match="token"):
            alpaca2.check_draft_compatible(target, m)
        assert isinstance(alpaca2.VocabMismatchError("x"), ValueError)
    finally:
        m.close()


def test_speculator_bad_arguments(target):
    t = alpaca2.Context(target, **CTX)
    d = alpaca2.Context(target, **CTX)
    with pytest.raises(ValueError, match="exactly one"):
        alpaca2.Speculator(t)
    with pytest.raises(ValueError, match="exactly one"):
        alpaca2.Speculator(t, d, lookup=True)
    with pytest.raises(ValueError, match="different Context"):
        alpaca2.Speculator(t, t)
    with pytest.raises(ValueError, match="n_draft"):
        alpaca2.Speculator(t, d, n_draft=0)
    with pytest.raises(ValueError, match="n_batch"):
        alpaca2.Speculator(t, d, n_draft=200)
    spec = alpaca2.Speculator(t, d, n_draft=4)
    with pytest.raises(ValueError, match="begin"):
        spec.step()
    prompt = target.tokenize("hello")
    with pytest.raises(ValueError, match="holds 0 tokens"):
        spec.begin(prompt, alpaca2.Sampler(temp=0))
    t.decode(prompt[:-1], logits=None)
    with pytest.raises(ValueError, match="mirostat"):
        spec.begin(prompt, alpaca2.Sampler(temp=0.8, mirostat=2))
    with pytest.raises(ValueError, match="draft_sampler"):
        spec.begin(prompt, alpaca2.Sampler(temp=0.8))
    with pytest.raises(ValueError, match="penalties"):
        spec.begin(prompt, alpaca2.Sampler(temp=0.8),
                   alpaca2.Sampler(temp=0.8, repeat_penalty=1.2))
    with pytest.raises(ValueError, match="not both"):
        alpaca2.Llama(target, draft_model=target, lookup=True, **CTX)
    # closed pieces are errors, not crashes
    ds = alpaca2.Sampler(temp=0.8)
    spec.begin(prompt, alpaca2.Sampler(temp=0.8), ds)
    ds.close()
    with pytest.raises(alpaca2.ClosedError):
        spec.step()
    spec.begin(prompt, alpaca2.Sampler(temp=0))
    d.close()
    with pytest.raises(alpaca2.ClosedError):
        spec.step()


def test_mirostat_falls_back_to_plain_decoding(target, plain):
    llm = alpaca2.Llama(target, lookup=True, **CTX)
    try:
        a = llm.generate(PROMPTS[0], 16, temp=0.8, mirostat=2, seed=4)
        b = plain.generate(PROMPTS[0], 16, temp=0.8, mirostat=2, seed=4)
        assert a == b
        assert "speculative" not in llm.last_stats
    finally:
        llm.close()


def test_speculative_respects_max_tokens_stop_and_context(target, other):
    llm = alpaca2.Llama(target, draft_model=target, n_draft=8, draft_p_min=0.0, **CTX)
    plain = alpaca2.Llama(target, **CTX)
    try:
        for n in (1, 2, 3, 9, 17):
            llm.generate(PROMPTS[0], n, **GREEDY)
            assert llm.last_stats["completion_tokens"] == n
        full = plain.generate(PROMPTS[3], 30, **GREEDY)
        stop = full[10:13]
        assert llm.generate(PROMPTS[3], 30, stop=[stop], **GREEDY) == plain.generate(
            PROMPTS[3], 30, stop=[stop], **GREEDY)
        small = alpaca2.Llama(target, draft_model=target, n_draft=8, draft_p_min=0.0,
                              **{**CTX, "n_ctx": 64})
        try:
            out = small.generate(PROMPTS[0], 500, logit_bias={target.eos: -1000.0}, **GREEDY)
            assert small.last_stats["finish_reason"] == "length"
            assert small.last_stats["prompt_tokens"] + small.last_stats["completion_tokens"] == small.n_ctx
            assert out
        finally:
            small.close()
    finally:
        llm.close()
        plain.close()


# -- batched generation -----------------------------------------------------------------------------

def test_generate_batch_equals_single_runs(target, plain):
    llm = alpaca2.Llama(target, n_seq_max=4, **CTX)
    try:
        prompts = PROMPTS + ["静夜思", "hello"]           # 6 prompts: a wave of 4, then 2
        want = [plain.generate(p, 24, **GREEDY) for p in prompts]
        want_tokens = []
        for p in prompts:
            plain.generate(p, 24, **GREEDY)
            want_tokens.append(plain.last_stats["tokens"])
        got = llm.generate_batch(prompts, 24, **GREEDY)
        assert got == want
        st = llm.last_stats
        assert [s["tokens"] for s in st["sequences"]] == want_tokens
        assert st["n_seq_max"] == 4 and st["completion_tokens"] == sum(map(len, want_tokens))
        # per-sequence stop rules: each sequence stops at its own string
        stops = [w[5:8] for w in want[:4]]
        got = llm.generate_batch(PROMPTS, 24, stop=stops, **GREEDY)
        for g, w, s in zip(got, want, stops):
            assert g == w[:w.find(s)]
        # the cache is left empty and the single-sequence path still works afterwards
        assert llm.ctx.n_past(0) == 0
        assert llm.generate(PROMPTS[0], 24, **GREEDY) == want[0]
    finally:
        llm.close()


def test_generate_batch_sampling_and_errors(target):
    llm = alpaca2.Llama(target, n_seq_max=4, **{**CTX, "n_ctx": 128})
    try:
        a = llm.generate_batch(["x", "x", "x"], 16, temp=1.0, seed=11)
        b = llm.generate_batch(["x", "x", "x"], 16, temp=1.0, seed=11)
        assert a == b                         # seeded: reproducible
        assert len(set(a)) > 1                # each sequence has its own sampler seed
        with pytest.raises(TypeError):
            llm.generate_batch("x")
        with pytest.raises(alpaca2.ContextFullError):
            llm.generate_batch(["床前明月光" * 30] * 4, 8)
        out = llm.generate_batch(["x"] * 4, 500, temp=0)   # budget shared fairly by the sequences
        seqs = llm.last_stats["sequences"]
        room = llm.n_ctx - sum(s["prompt_tokens"] for s in seqs)
        assert all(s["completion_tokens"] <= room // 4 for s in seqs)
        assert max(s["completion_tokens"] for s in seqs) > 16
        assert len(out) == 4
    finally:
        llm.close()


def test_sample_at_batch_position_without_logits_is_an_error(target):
    ctx = alpaca2.Context(target, n_seq_max=2, **CTX)
    s = alpaca2.Sampler(temp=0)
    ctx.decode(target.tokenize("hello world"))
    with pytest.raises(IndexError):
        s.sample(ctx, 0)          # only the last position has logits: no crash, an error
    b = alpaca2.Batch(8, 1)
    b.add(5, 0, (0,), False)
    b.add(6, 0, (1,), True)
    ctx.clear()
    ctx.decode_batch(b)
    with pytest.raises(IndexError):
        s.sample(ctx, 0)
    assert 0 <= s.sample(ctx, 1) < target.n_vocab
    np.testing.assert_array_equal(ctx.logits_at(0), ctx.logits)


# -- the command line -------------------------------------------------------------------------------

def _cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "alpaca2", *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def test_cli_draft_and_lookup(tiny_path):
    r = _cli("generate", "-m", str(tiny_path), "--draft", str(tiny_path), "--draft-p-min", "0",
             "--temp", "0", "-n", "24", "--verbose", "床前明月光，")
    assert r.returncode == 0, r.stderr
    assert "speculative:" in r.stderr and "drafted tokens accepted" in r.stderr
    plain = _cli("generate", "-m", str(tiny_path), "--temp", "0", "-n", "24", "床前明月光，")
    assert r.stdout == plain.stdout
    r = _cli("generate", "-m", str(tiny_path), "--lookup", "--temp", "0", "-n", "8", "--stats", "a b a b a b")
    assert r.returncode == 0 and "speculative:" in r.stderr
    r = _cli("generate", "-m", str(tiny_path), "--lookup", "-md", str(tiny_path), "-n", "4", "x")
    assert r.returncode != 0 and "not both" in r.stderr
