"""Sampler and SamplerChain against fixed logits, checked with numpy models of llama.cpp's samplers.

The expected distributions follow vendor/llama.cpp/src/llama-sampler.cpp exactly:

* Sampler's chain order is  penalties -> top_k -> typical -> top_p -> min_p -> temp -> dist (the grammar
  kept apart, as llama.cpp's common sampler: it checks the drawn token, and goes first only on a rejection),
  so top_p and min_p see the logits *before* the temperature is applied;
* top_k keeps the k highest logits (k <= 0: off);
* top_p takes a softmax of the remaining candidates and keeps the smallest prefix (by descending
  probability) whose cumulative probability is >= p (at least min_keep=1 token);
* min_p keeps the candidates with logit >= max_logit + log(p), i.e. prob >= p * max_prob;
* temp divides the logits by t (t <= 0: only the argmax survives);
* dist draws from the softmax of what is left with a seeded std::mt19937 that advances per draw;
* penalties: for a token seen `count` times in the last `last_n` accepted tokens, a positive logit is
  divided by `repeat` and a non-positive one multiplied by it, then count*freq + present is subtracted.
"""
import math

import numpy as np
import pytest

import alpaca2

# ------------------------------------------------------------------------------------------------
# Chi-square goodness of fit without scipy (not installed in the test environment).


def chi2_sf(x, df):
    """Exact survival function of the chi-square distribution for an integer df >= 1."""
    if x <= 0:
        return 1.0
    half = x / 2.0
    if df % 2 == 0:
        term = total = 1.0
        for i in range(1, df // 2):
            term *= half / i
            total += term
        return math.exp(-half) * total
    total = math.erfc(math.sqrt(half))
    if df > 1:
        term = math.sqrt(2.0 * x / math.pi) * math.exp(-half)
        total += term
        for i in range(2, (df + 1) // 2):
            term *= x / (2 * i - 1)
            total += term
    return total


def test_chi2_sf_matches_tables():
    # critical values at p = 0.001 and p = 0.05 from standard chi-square tables
    for df, crit in [(1, 10.828), (2, 13.816), (3, 16.266), (4, 18.467), (5, 20.515), (7, 24.322),
                     (10, 29.588), (15, 37.697)]:
        assert chi2_sf(crit, df) == pytest.approx(1e-3, rel=2e-3)
    for df, crit in [(1, 3.841), (6, 12.592), (11, 19.675)]:
        assert chi2_sf(crit, df) == pytest.approx(0.05, rel=2e-3)


def chi2_pvalue(counts, probs, min_expected=5.0):
    """Pearson's chi-square p-value of observed counts against probs (cells with expected < 5 pooled)."""
    counts = np.asarray(counts, dtype=np.float64)
    probs = np.asarray(probs, dtype=np.float64)
    n = counts.sum()
    expected = probs * n
    big = expected >= min_expected
    obs_cells = list(counts[big])
    exp_cells = list(expected[big])
    if (~big).any():
        pooled_obs, pooled_exp = counts[~big].sum(), expected[~big].sum()
        if pooled_exp >= min_expected or not exp_cells:
            obs_cells.append(pooled_obs)
            exp_cells.append(pooled_exp)
        else:                              # too small on its own: fold into the smallest cell
            j = int(np.argmin(exp_cells))
            obs_cells[j] += pooled_obs
            exp_cells[j] += pooled_exp
    obs_cells, exp_cells = np.array(obs_cells), np.array(exp_cells)
    if len(obs_cells) < 2:
        return 1.0
    stat = float(((obs_cells - exp_cells) ** 2 / exp_cells).sum())
    return chi2_sf(stat, len(obs_cells) - 1)


def test_chi2_pvalue_rejects_a_wrong_distribution():
    rng = np.random.default_rng(0)
    p = np.array([0.5, 0.3, 0.15, 0.05])
    counts = np.bincount(rng.choice(4, size=4000, p=p), minlength=4)
    assert chi2_pvalue(counts, p) > 1e-3
    assert chi2_pvalue(counts, [0.45, 0.33, 0.16, 0.06]) < 1e-3


# ------------------------------------------------------------------------------------------------
# numpy model of the chain

P_REJECT = 1e-3
N_DRAWS = 4000

# 16 distinct logits in a fixed shuffled order (so token id order is not probability order).
_VALUES = np.array([3.0, 2.6, 2.2, 1.9, 1.5, 1.2, 0.8, 0.5, 0.1, -0.3, -0.8, -1.2, -2.0, -2.5, -3.0, -4.0])
LOGITS = _VALUES[np.random.default_rng(42).permutation(len(_VALUES))].astype(np.float32)


def softmax(x):
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


def expected_distribution(logits, temp=1.0, top_k=0, top_p=1.0, min_p=0.0, temp_first=False):
    """Probabilities over all token ids after top_k -> top_p -> min_p -> temp -> dist.

    ``temp_first=True`` models the *wrong* order (temperature before the filters), used to show
    that the tests can tell the orders apart.
    """
    logits = np.asarray(logits, dtype=np.float64)
    work = logits / temp if temp_first else logits.copy()
    kept = np.argsort(-work, kind="stable")
    if top_k > 0:
        kept = kept[:top_k]
    if top_p < 1.0:
        cum = np.cumsum(softmax(work[kept]))
        n = int(np.argmax(cum >= top_p)) + 1 if (cum >= top_p).any() else len(kept)
        # a threshold too close to a cumulative sum would make float32 rounding decide the set
        assert np.min(np.abs(cum - top_p)) > 1e-3, "top_p too close to a cumulative probability"
        kept = kept[:max(n, 1)]
    if min_p > 0.0:
        thr = work[kept].max() + math.log(min_p)
        assert np.min(np.abs(work[kept] - thr)) > 1e-3, "min_p too close to a candidate"
        kept = kept[work[kept] >= thr]
    out = np.zeros(len(logits))
    out[kept] = softmax(work[kept] if temp_first else work[kept] / temp)
    return out


def draw(sampler, logits, n=N_DRAWS):
    return np.bincount([sampler.sample_logits(logits) for _ in range(n)], minlength=len(logits))


def fresh_sampler(temp=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=1234):
    return alpaca2.Sampler(temp=temp, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed)


# ------------------------------------------------------------------------------------------------
# greedy

def test_greedy_picks_argmax():
    rng = np.random.default_rng(1)
    s0 = alpaca2.Sampler(temp=0)
    s_neg = alpaca2.Sampler(temp=-1.0)        # temp <= 0 also means greedy
    chain = alpaca2.SamplerChain().add("greedy")
    assert s0.names == ["greedy"]
    for _ in range(50):
        logits = rng.standard_normal(1000).astype(np.float32) * 3
        best = int(np.argmax(logits))
        assert s0.sample_logits(logits) == best
        assert s_neg.sample_logits(logits) == best
        assert chain.sample_logits(logits) == best
    # temp=0 inside a chain keeps only the argmax for dist
    chain = alpaca2.SamplerChain().add("temp", 0.0).add("dist", seed=3)
    for _ in range(20):
        logits = rng.standard_normal(64).astype(np.float32)
        assert chain.sample_logits(logits) == int(np.argmax(logits))


# ------------------------------------------------------------------------------------------------
# distributions

CONFIGS = {
    "temp": dict(temp=0.7),
    "temp_hot": dict(temp=1.8),
    "top_k": dict(top_k=5),
    "top_p": dict(top_p=0.7),
    "min_p": dict(min_p=0.1),
    "combined": dict(temp=0.7, top_k=5, top_p=0.9, min_p=0.05),
    "combined_hot": dict(temp=1.5, top_k=10, top_p=0.85, min_p=0.15),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_sampler_distribution(name):
    cfg = CONFIGS[name]
    probs = expected_distribution(LOGITS, **cfg)
    kept = set(np.flatnonzero(probs))
    filtering = any(k in cfg for k in ("top_k", "top_p", "min_p"))
    if filtering:
        assert 1 < len(kept) < len(LOGITS), "the configuration should cut some, not all, tokens"
    counts = draw(fresh_sampler(**cfg), LOGITS)
    seen = set(np.flatnonzero(counts))
    assert seen <= kept, f"tokens outside the kept set were sampled: {sorted(seen - kept)}"
    p = chi2_pvalue(counts, probs)
    assert p > P_REJECT, f"{name}: chi-square p={p:.2e}; counts={counts.tolist()} expected={(probs * N_DRAWS).round(1).tolist()}"


def test_sampler_distribution_is_not_temp_first():
    """Power check: with temp > 1 the two chain orders keep different sets, and the draws reject
    the temperature-first model (which llama.cpp does not use)."""
    cfg = CONFIGS["combined_hot"]
    right = expected_distribution(LOGITS, **cfg)
    wrong = expected_distribution(LOGITS, temp_first=True, **cfg)
    assert set(np.flatnonzero(right)) != set(np.flatnonzero(wrong))
    counts = draw(fresh_sampler(seed=99, **cfg), LOGITS)
    assert chi2_pvalue(counts, right) > P_REJECT
    assert chi2_pvalue(counts, wrong) < P_REJECT


@pytest.mark.parametrize("steps, probs_kw", [
    ([("top_k", 4), ("dist",)], dict(top_k=4)),
    ([("top_p", 0.6), ("dist",)], dict(top_p=0.6)),
    ([("min_p", 0.3), ("dist",)], dict(min_p=0.3)),
    ([("temp", 0.5), ("dist",)], dict(temp=0.5)),
    # SamplerChain applies primitives in the order they are added: temp first changes top_p's view
    ([("temp", 2.0), ("top_p", 0.7), ("dist",)], dict(temp=2.0, top_p=0.7, temp_first=True)),
])
def test_sampler_chain_distribution(steps, probs_kw):
    chain = alpaca2.SamplerChain()
    for step in steps:
        if step[0] == "dist":
            chain.add("dist", seed=77)
        else:
            chain.add(*step)
    probs = expected_distribution(LOGITS, **probs_kw)
    counts = draw(chain, LOGITS)
    assert set(np.flatnonzero(counts)) <= set(np.flatnonzero(probs))
    p = chi2_pvalue(counts, probs)
    assert p > P_REJECT, f"chi-square p={p:.2e}; counts={counts.tolist()}"


def test_top_k_top_p_min_keep_one():
    """A dominant token: top_p and min_p keep just it (min_keep=1), top_k=1 likewise."""
    logits = np.array([0.0, 12.0, 0.5, -1.0], dtype=np.float32)
    for kw in (dict(top_p=0.5), dict(min_p=0.5), dict(top_k=1)):
        s = fresh_sampler(temp=5.0, **kw)
        assert {s.sample_logits(logits) for _ in range(200)} == {1}


# ------------------------------------------------------------------------------------------------
# seeds

FLAT = np.linspace(0.0, 0.3, 20).astype(np.float32)


def _seq(sampler, n=50):
    return [sampler.sample_logits(FLAT) for _ in range(n)]


def test_same_seed_same_sequence():
    a = _seq(fresh_sampler(seed=2024))
    b = _seq(fresh_sampler(seed=2024))
    assert a == b
    assert len(set(a)) > 5                  # it really is sampling, not a constant
    c = alpaca2.SamplerChain().add("dist", seed=2024)
    assert _seq(c) == a                      # the same RNG stream as Sampler's dist


def test_different_seeds_different_sequences():
    seqs = {tuple(_seq(fresh_sampler(seed=s))) for s in range(6)}
    assert len(seqs) == 6


def test_rng_advances_per_draw():
    s = fresh_sampler(seed=5)
    first = _seq(s)
    second = _seq(s)
    assert first != second


def test_seed_property():
    assert fresh_sampler(seed=31337).seed == 31337
    assert alpaca2.SamplerChain().add("top_k", 3).add("dist", seed=7).seed == 7


def test_reset_reseeds_fixed_seed():
    # llama.cpp's dist reset re-seeds its RNG with the sampler's seed, so a fixed-seed sampler
    # replays its sequence after reset() (the SamplerChain.reset docstring says "reseed nothing").
    s = fresh_sampler(seed=11)
    a = _seq(s)
    s.reset()
    assert _seq(s) == a


# ------------------------------------------------------------------------------------------------
# penalties

A, B = 3, 7          # A: the argmax, B: the runner-up
OTHERS = [10, 11, 12, 13, 14, 15]


def _pen_logits(a, b):
    logits = np.full(20, -5.0, dtype=np.float32)
    logits[A], logits[B] = a, b
    return logits


def _penalized_greedy(logits, accepted, last_n=64, repeat=1.0, freq=0.0, present=0.0, sampler=False):
    if sampler:
        s = alpaca2.Sampler(temp=0, repeat_penalty=repeat, penalty_last_n=last_n,
                            frequency_penalty=freq, presence_penalty=present)
        # llama.cpp swaps a disabled penalties sampler (last_n=0) for a no-op named "?penalties"
        assert s.names == ["penalties" if last_n else "?penalties", "greedy"]
    else:
        s = alpaca2.SamplerChain().add("penalties", last_n, repeat, freq, present).add("greedy")
    for t in accepted:
        s.accept(t)
    return s.sample_logits(logits)


@pytest.mark.parametrize("sampler", [False, True])
def test_repeat_penalty_divides_positive_logits(sampler):
    logits = _pen_logits(4.0, 3.0)
    assert _penalized_greedy(logits, [], repeat=1.5, sampler=sampler) == A
    # 4.0 / 1.5 = 2.67 < 3.0 ; 4.0 / 1.25 = 3.2 > 3.0
    assert _penalized_greedy(logits, [A], repeat=1.5, sampler=sampler) == B
    assert _penalized_greedy(logits, [A], repeat=1.25, sampler=sampler) == A
    # the count does not matter for the repeat penalty
    assert _penalized_greedy(logits, [A, A, A], repeat=1.25, sampler=sampler) == A
    # penalising the runner-up changes nothing
    assert _penalized_greedy(logits, [B], repeat=1.5, sampler=sampler) == A


@pytest.mark.parametrize("sampler", [False, True])
def test_repeat_penalty_multiplies_negative_logits(sampler):
    logits = _pen_logits(-1.0, -1.2)
    # -1.0 * 1.5 = -1.5 < -1.2 (dividing would have made A *more* likely: -0.67)
    assert _penalized_greedy(logits, [A], repeat=1.5, sampler=sampler) == B
    assert _penalized_greedy(logits, [A], repeat=1.1, sampler=sampler) == A      # -1.1 > -1.2
    # a penalty below 1 raises a negative logit: B at -1.2 * 0.5 = -0.6 now beats A at -1.0
    assert _penalized_greedy(logits, [B], repeat=0.5, sampler=sampler) == B


@pytest.mark.parametrize("sampler", [False, True])
def test_frequency_and_presence_penalties(sampler):
    logits = _pen_logits(4.0, 3.0)
    # A seen twice: 4.0 - 2*freq - present
    assert _penalized_greedy(logits, [A, A], freq=0.4, present=0.3, sampler=sampler) == B   # 2.9
    assert _penalized_greedy(logits, [A, A], freq=0.3, present=0.3, sampler=sampler) == A   # 3.1
    assert _penalized_greedy(logits, [A], freq=0.4, present=0.3, sampler=sampler) == A      # 3.3
    assert _penalized_greedy(logits, [A], freq=0.0, present=1.1, sampler=sampler) == B      # 2.9
    assert _penalized_greedy(logits, [A, A, A], freq=0.0, present=0.9, sampler=sampler) == A  # 3.1
    # repeat then freq/present: 4.0 / 1.2 - 0.2 - 0.1 = 3.03 > 3 ; - 0.15 more -> < 3
    assert _penalized_greedy(logits, [A], repeat=1.2, freq=0.2, present=0.1, sampler=sampler) == A
    assert _penalized_greedy(logits, [A], repeat=1.2, freq=0.35, present=0.1, sampler=sampler) == B


@pytest.mark.parametrize("sampler", [False, True])
def test_penalty_window(sampler):
    logits = _pen_logits(4.0, 3.0)
    last_n = 3
    # A and last_n - 1 others: A is still inside the window
    assert _penalized_greedy(logits, [A] + OTHERS[:last_n - 1], last_n=last_n, repeat=2.0, sampler=sampler) == B
    # A followed by last_n others: A has left the window
    assert _penalized_greedy(logits, [A] + OTHERS[:last_n], last_n=last_n, repeat=2.0, sampler=sampler) == A
    # a window of 0 disables the penalty
    assert _penalized_greedy(logits, [A], last_n=0, repeat=2.0, sampler=sampler) == A


def test_penalty_compare_probabilities():
    """penalties + dist: the sampled distribution is the softmax of the penalised logits."""
    logits = np.array([2.0, 1.5, 1.0, -0.5, 0.5, -1.0], dtype=np.float32)
    hist = [0, 0, 3, 1]
    repeat, freq, present = 1.6, 0.2, 0.1
    pen = logits.astype(np.float64)
    for tok in set(hist):
        pen[tok] = pen[tok] / repeat if pen[tok] > 0 else pen[tok] * repeat
        pen[tok] -= hist.count(tok) * freq + present
    # sample_logits accepts what it samples (changing the history), and reset() would re-seed
    # dist to the same seed: so one fresh chain, with its own seed, per draw
    n = 2000
    counts = np.zeros(len(logits), dtype=np.int64)
    for i in range(n):
        c = alpaca2.SamplerChain().add("penalties", 64, repeat, freq, present).add("dist", seed=i)
        for t in hist:
            c.accept(t)
        counts[c.sample_logits(logits)] += 1
    p = chi2_pvalue(counts, softmax(pen))
    assert p > P_REJECT, f"p={p:.2e} counts={counts.tolist()} expected={(softmax(pen) * n).round(1).tolist()}"
    assert chi2_pvalue(counts, softmax(logits)) < P_REJECT     # the unpenalised model is rejected


def test_sample_logits_accepts_into_history():
    logits = _pen_logits(4.0, 3.0)
    s = alpaca2.SamplerChain().add("penalties", 8, 2.0).add("greedy")
    assert s.sample_logits(logits) == A       # accepted -> penalised from now on
    assert s.sample_logits(logits) == B
    # now both are penalised: 2.0 vs 1.5
    assert s.sample_logits(logits) == A


def test_reset_clears_penalty_history():
    logits = _pen_logits(4.0, 3.0)
    for s in (alpaca2.Sampler(temp=0, repeat_penalty=2.0, penalty_last_n=16),
              alpaca2.SamplerChain().add("penalties", 16, 2.0).add("greedy")):
        s.accept(A)
        assert s.sample_logits(logits) == B
        s.reset()
        assert s.sample_logits(logits) == A


# ------------------------------------------------------------------------------------------------
# validation

@pytest.mark.parametrize("kwargs", [
    dict(top_p=0.0), dict(top_p=1.5), dict(top_p=-0.1), dict(min_p=-0.1), dict(min_p=1.5),
    dict(repeat_penalty=0.0), dict(repeat_penalty=-1.0), dict(temp=float("nan")),
    dict(temp=float("inf")), dict(mirostat=3), dict(mirostat=-1), dict(penalty_last_n=-2),
    dict(top_k=-1), dict(seed=-1), dict(typical_p=0.0), dict(frequency_penalty=float("nan")),
])
def test_sampler_invalid_values(kwargs):
    with pytest.raises(ValueError):
        alpaca2.Sampler(**kwargs)


@pytest.mark.parametrize("args, kwargs", [
    (("top_p", 1.5), {}), (("min_p", -0.1), {}), (("temp", float("nan")), {}),
    (("penalties", -2, 1.1), {}), (("penalties", 64, 0.0), {}), (("dist",), {"seed": -1}),
    (("no_such_sampler",), {}),
])
def test_sampler_chain_invalid_values(args, kwargs):
    with pytest.raises(ValueError):
        alpaca2.SamplerChain().add(*args, **kwargs)


def test_sample_logits_needs_logits_and_a_selector():
    with pytest.raises(ValueError):
        alpaca2.Sampler(temp=0).sample_logits(np.zeros(0, dtype=np.float32))
    with pytest.raises(ValueError):      # a chain without greedy/dist selects nothing
        alpaca2.SamplerChain().add("top_k", 3).sample_logits(LOGITS)


# ------------------------------------------------------------------------------------------------
# on a real context

def test_sample_from_context_is_argmax(model, ctx):
    ctx.decode(model.tokenize("床前明月光，疑是地上霜。"))
    logits = np.array(ctx.logits, copy=True)
    assert logits.shape == (model.n_vocab,)
    assert np.isfinite(logits).all() and logits.std() > 0
    assert alpaca2.Sampler(temp=0).sample(ctx) == int(np.argmax(logits))
    # the same through sample_logits, and again after one more token
    assert alpaca2.Sampler(temp=0).sample_logits(logits) == int(np.argmax(logits))
    tok = int(np.argmax(logits))
    ctx.decode([tok])
    assert alpaca2.Sampler(temp=0).sample(ctx) == int(np.argmax(ctx.logits))


def _hard_logits(rng, n):
    """Logits full of what an argmax can get wrong: ties at the top, NaN, +-inf, +-0."""
    x = rng.choice(np.array([0.0, -0.0, 1.0, 2.0, 2.0, -np.inf, np.inf, np.nan, 5.0], dtype=np.float32), n)
    if rng.random() < 0.5:
        x = np.where(rng.random(n) < 0.9, rng.normal(size=n).astype(np.float32), x)
    if rng.random() < 0.3:
        x[rng.integers(n)] = x.max()        # a tie for the top
    return x.astype(np.float32)


def test_greedy_fast_path_equals_llama_cpp_greedy():
    """A chain that is only greedy skips llama_sampler_sample's copy of the vocabulary and scans the
    logits itself; its pick must be llama.cpp's greedy sampler's on any input: the first of tied
    maxima, a NaN never picked unless it comes first, any length (blocks of 512, runs of 8)."""
    from alpaca2._core import _greedy_pick
    rng = np.random.default_rng(7)
    oracle = alpaca2.SamplerChain().add("greedy")
    sizes = [1, 2, 7, 8, 9, 511, 512, 513, 1024, 1031, 4099]
    for case in range(1500):
        n = sizes[case % len(sizes)] if case < 400 else int(rng.integers(1, 3000))
        x = _hard_logits(rng, n)
        try:
            want = oracle.sample_logits(x)
        except alpaca2.SamplerError:         # llama.cpp picked a NaN (only a NaN first logit can be)
            want = 0
            assert np.isnan(x[0])
        assert _greedy_pick(x) == want, (case, x.tolist() if n < 40 else n)
    x = np.full(1000, -np.inf, dtype=np.float32)
    assert _greedy_pick(x) == oracle.sample_logits(x) == 0
    x[700] = x[900] = -1.0
    assert _greedy_pick(x) == oracle.sample_logits(x) == 700
    x = np.zeros(3000, dtype=np.float32)
    x[0] = np.nan
    x[2000] = 9.0
    assert _greedy_pick(x) == 0                    # llama.cpp keeps a NaN first logit (then refuses it)
    with pytest.raises(alpaca2.SamplerError):
        oracle.sample_logits(x)


def test_greedy_fast_path_on_a_context_and_its_history(model, ctx):
    """Through a context (the fast path) the pick equals the slow path's on the same logits, and the
    token still enters the chain's history (a penalty stage after it would see it)."""
    toks = model.tokenize("白日依山尽，黄河入海流。欲穷千里目，更上一层楼。")
    ctx.decode(toks, logits="all")       # all rows kept by the binding: the fast path is skipped here
    chain = alpaca2.SamplerChain().add("greedy")
    ctx.decode([toks[-1]])                # the last row only: sample() reads llama.cpp's logits
    fast = chain.sample(ctx)
    slow = alpaca2.SamplerChain().add("greedy").sample_logits(np.array(ctx.logits, copy=True))
    assert fast == slow
    s = alpaca2.Sampler(temp=0)
    gen = []
    for _ in range(12):
        t = s.sample(ctx)
        gen.append(t)
        ctx.decode([t])
    assert gen == [int(t) for t in gen] and all(0 <= t < model.n_vocab for t in gen)


def test_sample_from_context_all_logits(model, ctx):
    toks = model.tokenize("白日依山尽，黄河入海流。")
    ctx.decode(toks, logits="all")
    s = alpaca2.Sampler(temp=0)
    for i in range(len(toks)):
        assert s.sample(ctx, idx=i) == int(np.argmax(ctx.logits_at(i)))
    with pytest.raises(IndexError):
        s.sample(ctx, idx=len(toks))


def test_sample_from_context_with_penalty(model, ctx):
    ctx.decode(model.tokenize("春眠不觉晓，"))
    logits = np.array(ctx.logits, copy=True)
    best = int(np.argmax(logits))
    s = alpaca2.Sampler(temp=0, repeat_penalty=1e6, penalty_last_n=4)
    s.accept(best)
    masked = logits.copy()
    masked[best] = -np.inf
    assert s.sample(ctx) == int(np.argmax(masked))


# ------------------------------------------------------------------------------------------------
# grammar

GRAMMAR_AB = 'root ::= "a" | "b"'


def _allowed_ab(model):
    return [t for t in range(model.n_vocab) if model.token_to_piece(t) in (b"a", b"b")]


def test_grammar_restricts_tokens(model):
    allowed = _allowed_ab(model)
    # "a"/"b" as normal pieces and as byte-fallback tokens <0x61>/<0x62>
    assert len(allowed) >= 2
    assert {model.token_to_piece(t) for t in allowed} == {b"a", b"b"}
    s = alpaca2.Sampler(temp=0, grammar=GRAMMAR_AB, model=model)
    assert s.names == ["grammar", "greedy"]
    rng = np.random.default_rng(3)
    for _ in range(30):
        logits = rng.standard_normal(model.n_vocab).astype(np.float32)
        # make a token that is *not* allowed the global favourite, including pieces such as "ar"
        # that start with "a" but do not match the whole grammar
        logits[int(rng.integers(model.n_vocab))] = 50.0
        tok = s.sample_logits(logits)
        assert model.token_to_piece(tok) in (b"a", b"b")
        assert tok == allowed[int(np.argmax(logits[allowed]))]
        # the grammar is complete: only end-of-generation is allowed now
        assert s.sample_logits(logits) == model.eos
        s.reset()


def test_grammar_rejects_longer_pieces(model):
    """A piece that starts with "a" but continues ("ar", "an", ...) cannot match root ::= "a" | "b"."""
    longer = [t for t in range(model.n_vocab)
              if model.token_to_piece(t)[:1] in (b"a", b"b") and len(model.token_to_piece(t)) > 1]
    assert longer
    logits = np.zeros(model.n_vocab, dtype=np.float32)
    logits[longer] = 100.0
    s = alpaca2.Sampler(temp=0, grammar=GRAMMAR_AB, model=model)
    assert model.token_to_piece(s.sample_logits(logits)) in (b"a", b"b")


def test_grammar_with_dist(model):
    allowed = set(_allowed_ab(model))
    seen = set()
    for seed in range(40):
        # a fresh sampler per draw: reset() would also re-seed dist and repeat the same draw
        s = alpaca2.Sampler(temp=1.0, top_k=0, top_p=1.0, min_p=0.0, grammar=GRAMMAR_AB,
                            model=model, seed=seed)
        assert s.names == ["grammar", "?temp", "dist"]     # temp=1.0 is a no-op in llama.cpp
        tok = s.sample_logits(np.zeros(model.n_vocab, dtype=np.float32))
        assert tok in allowed
        seen.add(tok)
    assert seen == allowed        # flat logits: every allowed token turns up in 40 draws


def test_grammar_built_lazily_from_context(model, ctx):
    s = alpaca2.Sampler(temp=0, grammar=GRAMMAR_AB)      # no model yet
    with pytest.raises(ValueError):
        s.sample_logits(np.zeros(model.n_vocab, dtype=np.float32))
    ctx.decode(model.tokenize("你好"))
    tok = s.sample(ctx)
    assert model.token_to_piece(tok) in (b"a", b"b")


def test_invalid_grammar_raises(model):
    with pytest.raises(alpaca2.GrammarError):
        alpaca2.Sampler(temp=0, grammar="root ::= (", model=model)
    with pytest.raises(ValueError):       # GrammarError is a ValueError
        alpaca2.SamplerChain().add("grammar", model, "root ::= (")
    with pytest.raises(alpaca2.GrammarError):   # no rule named root
        alpaca2.SamplerChain().add("grammar", model, 'start ::= "a"')


_CRASH_CASES = {
    "accept_disallowed": "s.accept(%(bad)d)",
    "logits_longer_than_vocab": "s.sample_logits(np.zeros(m.n_vocab + 5, dtype=np.float32))",
    "no_allowed_token_in_logits": "s.sample_logits(np.zeros(50, dtype=np.float32))",
}


# C++ exceptions from llama.cpp's grammar sampler become Python exceptions (except + in the .pxd)
@pytest.mark.parametrize("case", list(_CRASH_CASES))
def test_grammar_misuse_raises_instead_of_aborting(tiny_path, model, case):
    from conftest import run_python
    bad = [t for t in range(model.n_vocab) if model.token_to_piece(t) == b"ar"]
    bad = bad[0] if bad else 5
    code = (
        "import alpaca2, numpy as np\n"
        f"m = alpaca2.Model({str(tiny_path)!r}, vocab_only=True)\n"
        f"s = alpaca2.Sampler(temp=0, grammar={GRAMMAR_AB!r}, model=m)\n"
        "try:\n"
        f"    {_CRASH_CASES[case] % {'bad': bad}}\n"
        "except Exception as e:\n"
        "    print('raised', type(e).__name__, isinstance(e, alpaca2.Alpaca2Error))\n"
        "else:\n"
        "    print('no error')\n"
    )
    r = run_python(code, timeout=60)
    assert r.returncode == 0, f"process died with {r.returncode}: {r.stderr[-400:]}"
    assert "raised" in r.stdout and r.stdout.strip().endswith("True"), r.stdout
