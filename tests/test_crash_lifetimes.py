"""Lifetimes: no array outlives its memory, no sampler outlives the vocabulary it points into.

Each reproducer runs in a fresh interpreter (a regression would end it by a signal): the test
asserts a clean exit and the exception (or the value) the case must give.
"""
import numpy as np
import pytest

from conftest import run_case

def test_logits_survive_close_of_their_context(tiny_path):
    out = run_case(f"""
        m = alpaca2.Model({tiny_path!r})
        c = alpaca2.Context(m, n_ctx=128, n_batch=32, n_threads=1)
        c.decode(m.tokenize("hello world"))
        a = c.logits
        before = a.copy()
        c.close()
        big = [np.ones(1 << 20, dtype=np.float32) * 7 for _ in range(8)]   # reuse freed memory
        print("same", np.array_equal(a, before), "finite", bool(np.isfinite(a).all()))
    """)
    assert "same True finite True" in out, out


def test_logits_survive_a_decode_that_reallocates_the_output_buffer(tiny_path):
    out = run_case(f"""
        m = alpaca2.Model({tiny_path!r})
        c = alpaca2.Context(m, n_ctx=256, n_batch=128, n_threads=1)
        c.decode(m.tokenize("hello"))
        a = c.logits
        before = a.copy()
        c.decode([5 + i % 700 for i in range(120)], logits="all")   # a larger output buffer
        row = c.logits_at(3)
        c.decode([9], logits="last")
        print("same", np.array_equal(a, before), "row", np.array_equal(row, row.copy()))
    """)
    assert "same True row True" in out, out


def test_embeddings_are_copies_too(tiny_path):
    out = run_case(f"""
        m = alpaca2.Model({tiny_path!r})
        c = alpaca2.Context(m, n_ctx=128, n_batch=32, n_threads=1, embeddings=True, pooling="mean")
        c.decode(m.tokenize("hello world"))
        e = c.embeddings
        before = e.copy()
        c.close()
        print("shape", e.shape == (m.n_embd,), "same", np.array_equal(e, before))
    """)
    assert "shape True same True" in out, out


def test_logits_own_their_memory(ctx, model):
    ctx.decode(model.tokenize("hello"))
    a = ctx.logits
    assert a.dtype == np.float32 and a.shape == (model.n_vocab,)
    assert a.flags.owndata and a.base is None
    b = ctx.logits
    assert np.array_equal(a, b) and a.__array_interface__["data"][0] != b.__array_interface__["data"][0]


def test_a_grammar_chain_is_closed_with_its_model(tiny_path):
    out = run_case(f"""
        m = alpaca2.Model({tiny_path!r})
        c = alpaca2.Context(m, n_ctx=128, n_batch=32, n_threads=1)
        chain = alpaca2.SamplerChain().add("grammar", m, 'root ::= "a"').add("greedy")
        c.decode(m.tokenize("hello"))
        saved = c.logits
        m.close()
        print("chain closed", chain.closed if hasattr(chain, "closed") else None)
        expect(alpaca2.ClosedError, chain.sample_logits, saved)
        expect(alpaca2.ClosedError, chain.sample, c)
    """)
    assert out.count("RAISED ClosedError") == 2, out


def test_a_sampler_with_a_grammar_keeps_its_model_alive(tiny_path):
    out = run_case(f"""
        import gc
        m = alpaca2.Model({tiny_path!r})
        chain = alpaca2.SamplerChain().add("grammar", m, 'root ::= [a-z]+').add("greedy")
        logits = np.zeros(m.n_vocab, dtype=np.float32)
        del m
        gc.collect()
        tok = chain.sample_logits(logits)
        print("token", tok >= 0)
    """)
    assert "token True" in out, out


def test_a_context_on_a_vocab_only_model_is_refused(tiny_path):
    out = run_case(f"""
        m = alpaca2.Model({tiny_path!r}, vocab_only=True)
        print("tokenize", len(m.tokenize("hello")) > 0)
        e = expect(alpaca2.ModelLoadError, alpaca2.Context, m, n_ctx=64)
    """)
    assert "tokenize True" in out and "RAISED ModelLoadError" in out and "vocab_only" in out, out


@pytest.mark.parametrize("order", ["model-first", "context-first"])
def test_garbage_collected_cycles_free_in_a_safe_order(tiny_path, order):
    out = run_case(f"""
        import gc
        m = alpaca2.Model({tiny_path!r})
        c = alpaca2.Context(m, n_ctx=64, n_batch=16, n_threads=1)
        chain = alpaca2.SamplerChain().add("grammar", m, 'root ::= "a"').add("greedy")
        holder = [m, c, chain]
        holder.append(holder)                 # a reference cycle through every handle
        if {order!r} == "model-first":
            del m, c, chain
        else:
            del chain, c, m
        del holder
        gc.collect()
        print("collected")
    """)
    assert "collected" in out
