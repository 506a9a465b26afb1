"""State, files, grammars and the decode error funnel: clear exceptions, never an abort or a hang.

Each reproducer runs in a fresh interpreter; the test asserts a clean exit and the exception.
"""
import os

import pytest

from conftest import run_case


def test_a_state_without_logits_loads_then_sampling_raises(tiny_path):
    out = run_case(f"""
        m = alpaca2.Model({str(tiny_path)!r})
        c = alpaca2.Context(m, n_ctx=128, n_batch=32, n_threads=1)
        empty = c.save_state()                  # before any decode: no logits in it
        c.decode(m.tokenize("hello"))
        c.load_state(empty)
        expect(ValueError, alpaca2.Sampler(temp=0).sample, c)    # the last decode's logits are gone
        expect(ValueError, lambda: c.logits)
        expect(ValueError, alpaca2.SamplerChain().add("greedy").sample, c)
        c.decode(m.tokenize("hello"))
        full = c.save_state()
        c.load_state(full)                      # a state holds the KV cache, never logits
        expect(ValueError, alpaca2.Sampler(temp=0).sample, c)
        c.decode([7])
        print("after decode", alpaca2.Sampler(temp=0).sample(c) >= 0)
    """)
    assert out.count("RAISED ValueError") == 4 and "after decode True" in out, out


def test_a_tiny_state_blob_is_refused_before_llama_cpp_reads_it(tiny_path):
    out = run_case(f"""
        import resource
        m = alpaca2.Model({str(tiny_path)!r})
        c = alpaca2.Context(m, n_ctx=128, n_batch=32, n_threads=1)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        expect(alpaca2.StateError, c.load_state, b"\\xff" * 9)
        expect(alpaca2.StateError, c.load_state, b"\\x00\\x00\\x00\\x00\\xff\\xff\\xff\\x7f\\x01")
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        print("grew MiB", grown // 1024)
    """)
    assert out.count("RAISED StateError") == 2, out
    assert int(out.split("grew MiB ")[1].split()[0]) < 256, out


def test_a_tiny_state_file_is_refused(tiny_path, tmp_path):
    kv = tmp_path / "bad.kv"
    kv.write_bytes(b"ggsn" + b"\x09\x00\x00\x00" + b"\xff" * 13)   # 21 bytes: magic, version, garbage
    out = run_case(f"""
        m = alpaca2.Model({str(tiny_path)!r})
        c = alpaca2.Context(m, n_ctx=128, n_batch=32, n_threads=1)
        expect(alpaca2.StateError, c.load_state_file, {str(kv)!r})
    """)
    assert "RAISED StateError" in out, out


def test_a_state_file_round_trip_still_works(tiny_path, tmp_path):
    path = tmp_path / "ok.kv"
    out = run_case(f"""
        m = alpaca2.Model({str(tiny_path)!r})
        c = alpaca2.Context(m, n_ctx=128, n_batch=32, n_threads=1)
        ids = m.tokenize("hello world")
        c.decode(ids[:-1])
        c.save_state_file({str(path)!r}, ids[:-1])
        c.decode(ids[-1:])
        want = c.logits
        c.clear()
        got = c.load_state_file({str(path)!r})
        c.decode(ids[-1:])
        print("tokens", got == ids[:-1], "same next", bool(np.array_equal(c.logits, want)))
    """)
    assert "tokens True same next True" in out, out


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_fifos_are_refused_without_blocking(tiny_path, tmp_path):
    fifo = tmp_path / "pipe.gguf"
    os.mkfifo(fifo)
    out = run_case(f"""
        expect(alpaca2.ModelLoadError, alpaca2.Model, {str(fifo)!r})
        m = alpaca2.Model({str(tiny_path)!r})
        c = alpaca2.Context(m, n_ctx=64, n_threads=1)
        expect(alpaca2.StateError, c.load_state_file, {str(fifo)!r})
        expect(alpaca2.StateError, c.load_state_file, "/dev/zero")
    """, timeout=60)
    assert out.count("RAISED") == 3 and "FIFO" in out, out


@pytest.mark.parametrize("grammar", [
    "root ::= " + "(" * 20000 + '"a"' + ")" * 20000,
    "\n".join([f"r{i} ::= r{i + 1}" for i in range(100000)] + ['r100000 ::= "a"']).replace("r0 ::=", "root ::="),
])
def test_hostile_grammars_are_refused_before_llama_cpp_parses_them(tiny_path, tmp_path, grammar):
    g = tmp_path / "g.gbnf"
    g.write_text(grammar)
    out = run_case(f"""
        m = alpaca2.Model({str(tiny_path)!r})
        text = open({str(g)!r}).read()
        expect(alpaca2.GrammarError, alpaca2.SamplerChain().add, "grammar", m, text)
        expect(alpaca2.GrammarError, alpaca2.Sampler, grammar=text, model=m)
        ok = alpaca2.SamplerChain().add("grammar", m, 'root ::= "a" | "b"').add("greedy")
        print("a small grammar", len(ok) == 2)
    """, timeout=120)
    assert out.count("RAISED GrammarError") == 2 and "a small grammar True" in out, out


# -- the decode funnel ----------------------------------------------------------------------------

def test_a_stale_abort_does_not_stop_the_next_decode(tiny_path):
    out = run_case(f"""
        m = alpaca2.Model({str(tiny_path)!r})
        c = alpaca2.Context(m, n_ctx=128, n_batch=32, n_threads=1)
        c.abort()                                # nothing is running: forgotten at the next call
        c.decode(m.tokenize("hello"))
        b = alpaca2.Batch(4); b.add(7, c.n_past(), 0, True)
        c.abort()
        c.decode_batch(b)
        print("decoded", c.n_past())
    """)
    assert "decoded" in out and int(out.split("decoded ")[1]) > 1, out


def test_decode_batch_rolls_back_an_invalid_batch(tiny_path):
    out = run_case(f"""
        m = alpaca2.Model({str(tiny_path)!r})
        c = alpaca2.Context(m, n_ctx=128, n_batch=32, n_threads=1)
        c.decode(m.tokenize("hello world"))
        before = c.n_past()
        b = alpaca2.Batch(4)
        b.add(7, before + 5, 0, True)           # a gap: llama.cpp refuses the batch (-1)
        b.add(8, before + 2, 0, True)
        expect(alpaca2.DecodeError, c.decode_batch, b)
        print("n_past kept", c.n_past() == before)
    """)
    assert "RAISED" in out and "n_past kept True" in out, out


def test_context_full_leaves_the_cache_as_it_was(tiny_path):
    out = run_case(f"""
        m = alpaca2.Model({str(tiny_path)!r})
        c = alpaca2.Context(m, n_ctx=256, n_batch=64, n_threads=1)
        c.decode([5] * 200)
        expect(alpaca2.ContextFullError, c.decode, [6] * 100)
        print("n_past", c.n_past())
    """)
    assert "RAISED ContextFullError" in out and "n_past 200" in out, out
