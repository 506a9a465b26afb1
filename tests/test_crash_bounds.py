"""Bounds: every size, count, id and number from Python is checked before it reaches C.

Each reproducer (from the audit of issue 14) runs in a fresh interpreter and must end in a clear
exception, never a signal, a hang or a silently wrong value.
"""
import pytest

from conftest import run_case


def open_ctx(path, **kw):
    args = ", ".join(f"{k}={v!r}" for k, v in kw.items())
    return f"""
        m = alpaca2.Model({str(path)!r})
        c = alpaca2.Context(m, n_ctx=128, n_batch=64, n_threads=1{", " + args if args else ""})
        c.decode(m.tokenize("hello world"))
    """


def test_a_chain_without_a_final_stage_refuses_to_sample(tiny_path):
    out = run_case(open_ctx(tiny_path) + """
        chain = alpaca2.SamplerChain().add("top_k", 40)
        expect(alpaca2.SamplerError, chain.sample, c)
        expect(alpaca2.SamplerError, chain.sample_logits, np.zeros(m.n_vocab, np.float32))
        expect(alpaca2.SamplerError, alpaca2.SamplerChain().sample, c)
        print("then", chain.add("greedy").sample(c) >= 0)
    """)
    # IncompleteChainError: a SamplerError and a ValueError
    assert out.count("RAISED IncompleteChainError") == 3 and "then True" in out, out


def test_speculator_catch_up_after_steps_without_drafting(tiny_path, other_path):
    out = run_case(f"""
        t = alpaca2.Model({str(tiny_path)!r}); d = alpaca2.Model({str(other_path)!r})
        tc = alpaca2.Context(t, n_ctx=256, n_batch=64, n_threads=1)
        dc = alpaca2.Context(d, n_ctx=256, n_batch=64, n_threads=1)
        spec = alpaca2.Speculator(tc, dc, n_draft=1)
        ids = t.tokenize("hello world")
        tc.decode(ids[:-1])
        spec.begin(ids, alpaca2.Sampler(temp=0))
        for _ in range(20):
            spec.step(1)                       # no drafting: the draft falls 20 tokens behind
        got = spec.step(8)                     # the catch-up: 21 tokens, a draft Batch of 3
        print("tokens", len(got) >= 1, "draft n_past", dc.n_past() <= tc.n_past() + 1)
    """)
    assert "tokens True draft n_past True" in out, out


def test_batch_sizes_are_bounded(tiny_path):
    out = run_case(f"""
        expect(alpaca2.ArgumentValueError, alpaca2.Batch, 2**31 - 1)
        expect(alpaca2.ArgumentValueError, alpaca2.Batch, 0)
        expect(alpaca2.ArgumentValueError, alpaca2.Batch, 8, 10**6)
        expect(alpaca2.ArgumentTypeError, alpaca2.Batch, 8.5)
        b = alpaca2.Batch(2)
        expect(alpaca2.ArgumentValueError, b.add, 1, -5)
        expect(alpaca2.ArgumentValueError, b.add, 1, 0, [2**40])
        expect(alpaca2.ArgumentTypeError, b.add, 1.5, 0)
        b.add(1, 0); b.add(2, 1)
        expect(IndexError, b.add, 3, 2)
    """)
    assert out.count("RAISED") == 8, out


def test_rank_pooling_needs_a_reranker(tiny_path):
    out = run_case(f"""
        m = alpaca2.Model({str(tiny_path)!r})
        expect(alpaca2.ArgumentValueError, alpaca2.Context, m, n_ctx=64, embeddings=True, pooling="rank")
    """)
    assert "RAISED ArgumentValueError" in out and "reranker" in out, out


def test_positions_never_wrap_around(tiny_path):
    out = run_case(open_ctx(tiny_path) + """
        expect(alpaca2.ArgumentValueError, c.seq_add, 0, 0, -1, 2**31 - 1)
        expect(alpaca2.ArgumentValueError, c.seq_add, 0, 0, -1, 2**31 - 10**7)
        print("n_past", c.n_past())
        expect(alpaca2.ArgumentValueError, c.seq_rm, 0, -7)
        expect(alpaca2.ArgumentTypeError, c.n_past, 0.0)
    """)
    assert out.count("RAISED") == 4, out
    n_past = int(out.split("n_past ")[1].split()[0])
    assert 0 < n_past < 128, out


@pytest.mark.parametrize("bad", ["[1.5, 2]", "['5', '6']", "[1+2j]", "np.array([1.0, 2.0])", "'abc'", "[[1, 2]]"])
def test_token_ids_must_be_ints(tiny_path, bad):
    out = run_case(open_ctx(tiny_path) + f"""
        expect(TypeError, c.decode, {bad})
        expect(TypeError, m.detokenize, {bad})
    """)
    assert out.count("RAISED ArgumentTypeError") == 2, out


@pytest.mark.parametrize("call", ["c.decode_token(1.5)", "c.decode_token('5')", "c.decode_token(True)",
                                  "m.token_to_piece(2.0)", "m.token_text('3')"])
def test_single_token_ids_must_be_ints(tiny_path, call):
    out = run_case(open_ctx(tiny_path) + f"""
        expect(TypeError, lambda: {call})
    """)
    assert "RAISED" in out, out


def test_out_of_range_token_ids(tiny_path):
    out = run_case(open_ctx(tiny_path) + """
        expect(alpaca2.TokenizeError, c.decode, [2**40])
        expect(alpaca2.TokenizeError, c.decode, [2**70])
        expect(alpaca2.TokenizeError, c.decode_token, -1)
        expect(alpaca2.TokenizeError, m.detokenize, [m.n_vocab])
    """)
    assert out.count("RAISED TokenizeError") == 4, out


def test_penalty_window_is_capped(tiny_path):
    out = run_case(f"""
        expect(alpaca2.ArgumentValueError, alpaca2.Sampler, penalty_last_n=2**31 - 1, repeat_penalty=1.1)
        expect(alpaca2.ArgumentValueError, alpaca2.SamplerChain().add, "penalties", 2**31 - 1, 1.1)
        print("max ok", len(alpaca2.SamplerChain().add("penalties", alpaca2._core.MAX_PENALTY_LAST_N, 1.1)) == 1)
    """)
    assert out.count("RAISED ArgumentValueError") == 2 and "max ok True" in out, out


def test_thread_counts_are_capped(tiny_path):
    out = run_case(f"""
        m = alpaca2.Model({str(tiny_path)!r})
        expect(alpaca2.ArgumentValueError, alpaca2.Context, m, n_ctx=64, n_threads=10000)
        expect(alpaca2.ArgumentValueError, alpaca2.Context, m, n_ctx=64, n_threads_batch=10000)
        expect(alpaca2.ArgumentValueError, alpaca2.Context, m, n_ctx=64, n_threads=0)
        c = alpaca2.Context(m, n_ctx=64, n_threads=1)
        expect(alpaca2.ArgumentValueError, c.set_n_threads, 10000)
    """)
    assert out.count("RAISED ArgumentValueError") == 4, out


def test_seeds_are_explicit(tiny_path):
    out = run_case(f"""
        for bad in (0xFFFFFFFF, -1, 2**32, 2**40):
            expect(alpaca2.ArgumentValueError, alpaca2.SamplerChain().add, "dist", seed=bad)
            expect(alpaca2.ArgumentValueError, alpaca2.Sampler, seed=bad)
        expect(alpaca2.ArgumentTypeError, alpaca2.Sampler, seed=1.5)
        s = alpaca2.SamplerChain().add("dist", seed=0xFFFFFFFE)
        r = alpaca2.SamplerChain().add("dist", seed=None)
        print("seeded", s.seed == 0xFFFFFFFE)
    """)
    assert out.count("RAISED ArgumentValueError") == 8 and "RAISED ArgumentTypeError" in out, out
    assert "seeded True" in out, out


def test_nan_parameters_are_refused(tiny_path):
    out = run_case(f"""
        m = alpaca2.Model({str(tiny_path)!r})
        nan = float("nan")
        expect(alpaca2.ArgumentValueError, alpaca2.Context, m, n_ctx=64, rope_freq_base=nan)
        expect(alpaca2.ArgumentValueError, alpaca2.Context, m, n_ctx=64, rope_freq_scale=float("inf"))
        expect(alpaca2.ArgumentValueError, alpaca2.Context, m, n_ctx=64, yarn_ext_factor=nan)
        expect(alpaca2.ArgumentValueError, alpaca2.Sampler, mirostat=2, mirostat_tau=nan)
        expect(alpaca2.ArgumentValueError, alpaca2.Sampler, mirostat=2, mirostat_eta=nan)
        expect(alpaca2.ArgumentValueError, alpaca2.SamplerChain().add, "mirostat_v2", tau=nan)
        expect(alpaca2.ArgumentValueError, alpaca2.SamplerChain().add, "temp", nan)
        expect(alpaca2.ArgumentValueError, alpaca2.SamplerChain().add, "logit_bias", m, {{5: nan}})
        print("ban ok", len(alpaca2.SamplerChain().add("logit_bias", m, {{5: float("-inf")}})) == 1)
    """)
    assert out.count("RAISED ArgumentValueError") == 8 and "ban ok True" in out, out


def test_nan_logits_raise_at_sample_time(tiny_path, tmp_path):
    import shutil

    import numpy as np
    from gguf import GGUFReader
    bad = tmp_path / "nan.gguf"
    shutil.copy(tiny_path, bad)
    reader = GGUFReader(str(bad))
    t = next(t for t in reader.tensors if t.name == "output_norm.weight")
    offset, nbytes = int(t.data_offset), int(t.n_bytes)
    del reader
    with open(bad, "r+b") as f:
        f.seek(offset)
        f.write(np.full(nbytes // 4, np.nan, dtype=np.float32).tobytes())
    out = run_case(open_ctx(bad) + """
        print("nan logits", bool(np.isnan(c.logits).all()))
        expect(alpaca2.SamplerError, alpaca2.Sampler(temp=0).sample, c)
        expect(alpaca2.SamplerError, alpaca2.Sampler(temp=0.8, seed=1).sample, c)
        expect(alpaca2.SamplerError, alpaca2.SamplerChain().add("greedy").sample_logits, c.logits)
    """)
    assert "nan logits True" in out and out.count("RAISED SamplerError") == 3, out
