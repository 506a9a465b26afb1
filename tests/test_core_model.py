"""Model, Context, decode, logits, KV cache, state: against a numpy oracle and clean reruns."""
import os
import threading
import time

import numpy as np
import pytest

import alpaca2
from alpaca2 import testing
from conftest import run_python

PROMPT = "床前明月光，疑是地上霜。举头望明月，低头思故乡。The quick brown fox 123"


def new_ctx(model, **kw):
    kw = {"n_ctx": 256, "n_batch": 64, "n_threads": 2, "type_k": "f32", "type_v": "f32",
          "flash_attn": False, **kw}
    return alpaca2.Context(model, **kw)


def rel_err(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


# -- the model ----------------------------------------------------------------------------------

def test_model_properties(model, tiny):
    _, w = tiny
    assert model.n_vocab == w.n_vocab == 800 or model.n_vocab == w.n_vocab
    assert (model.n_embd, model.n_layer, model.n_head, model.n_head_kv) == (64, 2, 4, 2)
    assert model.n_ctx_train == 512
    assert model.bos == 1 and model.eos == 2
    assert model.n_params == sum(v.size for v in w.tensors.values())
    assert model.size == 4 * model.n_params            # all f32
    assert model.ftype == "all F32"
    assert model.chat_template is None
    md = model.metadata
    assert md["general.architecture"] == "llama"
    assert md["llama.block_count"] == "2"
    assert md["general.name"] == "tiny-llama"


def test_model_is_a_context_manager_and_close_is_idempotent(tiny_path):
    with alpaca2.Model(tiny_path) as m:
        assert not m.closed
    assert m.closed
    m.close()
    with pytest.raises(alpaca2.ClosedError):
        m.tokenize("x")
    with pytest.raises(ValueError):         # ClosedError is a ValueError too
        _ = m.n_vocab


def test_closing_the_model_closes_its_contexts(tiny_path):
    m = alpaca2.Model(tiny_path)
    c = new_ctx(m)
    c.decode(m.tokenize("hello"))
    m.close()
    assert c.closed
    with pytest.raises(alpaca2.ClosedError):
        c.decode([1, 2, 3])
    with pytest.raises(alpaca2.ClosedError):
        _ = c.logits


def test_closing_the_model_closes_samplers_bound_to_its_vocabulary(tiny_path):
    m = alpaca2.Model(tiny_path)
    s = alpaca2.Sampler(temp=0, grammar='root ::= "a"', model=m)
    free = alpaca2.Sampler(temp=0)
    m.close()
    with pytest.raises(alpaca2.ClosedError):
        s.sample_logits(np.zeros(800, dtype=np.float32))
    assert free.sample_logits(np.array([0.0, 2.0, 1.0], dtype=np.float32)) == 1


def test_load_progress_callback_and_cancel(tiny_path):
    seen = []
    m = alpaca2.Model(tiny_path, progress=seen.append)
    assert seen and seen[-1] == pytest.approx(1.0) and all(0 <= p <= 1 for p in seen)
    m.close()
    with pytest.raises(alpaca2.ModelLoadError, match="cancelled"):
        alpaca2.Model(tiny_path, progress=lambda p: False)

    def boom(p):
        raise RuntimeError("from the callback")
    with pytest.raises(RuntimeError, match="from the callback"):
        alpaca2.Model(tiny_path, progress=boom)


def test_quantize_q4_0_and_q8_0(tiny_path, tmp_path, model):
    ids = model.tokenize(PROMPT)
    ref = new_ctx(model)
    ref.decode(ids)
    want = np.array(ref.logits)
    # quantization error on random weights: Q8_0 close, Q4_0 still strongly correlated
    for ftype, min_corr in (("Q8_0", 0.999), ("Q4_0", 0.9)):
        out = alpaca2.quantize(tiny_path, tmp_path / f"q.{ftype}.gguf", ftype)
        with alpaca2.Model(out) as q:
            assert q.ftype.startswith(ftype.replace("_", "_"))
            assert q.size < model.size
            c = new_ctx(q)
            c.decode(ids)
            assert np.corrcoef(np.array(c.logits), want)[0, 1] > min_corr
    assert not list(tmp_path.glob("*.tmp-*"))
    with pytest.raises(ValueError, match="unknown ftype"):
        alpaca2.quantize(tiny_path, tmp_path / "x.gguf", "Q9_9")


# -- logits against the float64 oracle ---------------------------------------------------------

def test_logits_match_numpy_reference_at_every_position(tiny, model):
    _, w = tiny
    ids = model.tokenize(PROMPT)
    ref = testing.reference_logits(w, ids)
    c = new_ctx(model)
    c.decode(ids, logits="all")
    got = np.stack([c.logits_at(i) for i in range(len(ids))])
    assert got.shape == (len(ids), model.n_vocab)
    for i in range(len(ids)):
        assert rel_err(got[i], ref[i]) < 1e-3, i
    assert rel_err(c.logits, ref[-1]) < 1e-3


def test_logits_match_when_fed_in_pieces_and_across_batches(tiny, model):
    _, w = tiny
    ids = model.tokenize(PROMPT * 4)
    assert len(ids) > 64                      # longer than n_batch: split inside decode()
    ref = testing.reference_logits(w, ids)
    c = new_ctx(model)
    c.decode(ids, logits="all")               # one call, several n_batch chunks
    for i in (0, 63, 64, len(ids) - 1):
        assert rel_err(c.logits_at(i), ref[i]) < 1e-3, i
    c2 = new_ctx(model)
    pos = 0
    for piece in (ids[:5], ids[5:6], ids[6:70], ids[70:]):
        c2.decode(piece)
        pos += len(piece)
        assert c2.n_past() == pos
        assert rel_err(c2.logits, ref[pos - 1]) < 1e-3


def test_logits_are_an_array_of_their_own(ctx, model):
    # llama.cpp's output buffer does not outlive close() or a larger decode: each access copies
    ctx.decode(model.tokenize("hello"))
    a = ctx.logits
    assert a.dtype == np.float32 and a.shape == (model.n_vocab,)
    assert a.flags.owndata and a.base is None
    b = ctx.logits
    assert np.array_equal(a, b)
    assert a.__array_interface__["data"][0] != b.__array_interface__["data"][0]


def test_embeddings_mean_pooled_and_per_token(tiny, model):
    _, w = tiny
    ids = model.tokenize(PROMPT)
    hidden = testing.reference_hidden(w, ids)
    with new_ctx(model, embeddings=True, pooling="mean") as c:
        c.decode(ids)
        e = c.embeddings
        assert e.shape == (model.n_embd,) and e.dtype == np.float32
        assert rel_err(e, hidden.mean(axis=0)) < 1e-3
    with new_ctx(model, embeddings=True, pooling="none") as c:
        c.decode(ids)
        assert rel_err(c.embeddings, hidden[-1]) < 1e-3
    with new_ctx(model) as c:
        c.decode(ids)
        with pytest.raises(ValueError, match="embeddings=True"):
            _ = c.embeddings


def test_llama_cpp_log_goes_to_python_logging(tiny_path, caplog):
    import logging
    with caplog.at_level(logging.DEBUG, logger="alpaca2.llama"):
        alpaca2.Model(tiny_path).close()                      # default: nothing below WARNING
        assert not [r for r in caplog.records if r.name == "alpaca2.llama" and r.levelno < logging.WARNING]
        try:
            alpaca2.Model(tiny_path, verbose=True).close()    # verbose: llama.cpp's INFO lines
        finally:
            alpaca2.set_log_level(logging.WARNING)
        infos = [r.getMessage() for r in caplog.records if r.name == "alpaca2.llama" and r.levelno == logging.INFO]
        assert any("llama_model_loader" in m or "print_info" in m for m in infos), infos[:5]
        assert all("\n" not in m for m in infos)                # whole lines, one record each


def test_greedy_sample_is_argmax(ctx, model):
    ctx.decode(model.tokenize(PROMPT))
    assert alpaca2.Sampler(temp=0).sample(ctx) == int(np.argmax(ctx.logits))


# -- KV cache and state ------------------------------------------------------------------------

def test_seq_rm_then_redecode_equals_clean_decode(model):
    ids = model.tokenize(PROMPT)
    c = new_ctx(model)
    c.decode(ids)
    c.seq_rm(0, 10, -1)
    assert c.n_past() == 10
    c.decode(ids[10:])
    clean = new_ctx(model)
    clean.decode(ids)
    np.testing.assert_allclose(c.logits, clean.logits, rtol=0, atol=1e-5)
    c.clear()
    assert c.n_past() == 0


def test_seq_cp_and_keep(model):
    ids = model.tokenize(PROMPT)
    c = new_ctx(model, n_seq_max=2)
    c.decode(ids[:8], seq_id=0)
    c.seq_cp(0, 1)
    assert c.n_past(1) == 8
    c.decode(ids[8:], seq_id=1)
    clean = new_ctx(model)
    clean.decode(ids)
    np.testing.assert_allclose(c.logits, clean.logits, rtol=0, atol=1e-5)
    c.seq_keep(1)
    assert c.n_past(0) == 0 and c.n_past(1) == len(ids)
    with pytest.raises(ValueError):
        c.n_past(2)


def test_save_state_then_load_into_fresh_context_is_bit_identical(model, tmp_path):
    ids = model.tokenize(PROMPT)
    c = new_ctx(model)
    c.decode(ids[:-1])
    state = c.save_state()
    assert isinstance(state, bytes) and len(state) > 0
    c.decode(ids[-1:])
    want = np.array(c.logits)
    fresh = new_ctx(model)
    fresh.load_state(state)
    assert fresh.n_past() == len(ids) - 1
    fresh.decode(ids[-1:])
    assert np.array_equal(np.array(fresh.logits), want)

    path = tmp_path / "state.bin"
    c2 = new_ctx(model)
    c2.decode(ids[:-1])
    c2.save_state_file(path, ids[:-1])
    assert not list(tmp_path.glob("*.tmp-*"))
    fresh2 = new_ctx(model)
    assert fresh2.load_state_file(path) == ids[:-1]
    fresh2.decode(ids[-1:])
    assert np.array_equal(np.array(fresh2.logits), want)


def test_bad_state_is_a_clear_error(ctx, tmp_path):
    with pytest.raises(alpaca2.StateError):
        ctx.load_state(b"\x00" * 16)
    with pytest.raises(alpaca2.StateError):
        ctx.load_state_file(tmp_path / "missing.bin")
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"garbage" * 10)
    with pytest.raises(alpaca2.StateError):
        ctx.load_state_file(bad)


def test_perf_counts_tokens(ctx, model):
    ctx.perf_reset()
    ctx.decode(model.tokenize(PROMPT))
    p = ctx.perf()
    assert p["n_p_eval"] == len(model.tokenize(PROMPT))


# -- bad input ---------------------------------------------------------------------------------

def test_bad_model_files(tmp_path):
    with pytest.raises(alpaca2.ModelLoadError, match="not found") as e:
        alpaca2.Model(tmp_path / "missing.gguf")
    assert isinstance(e.value, OSError)
    with pytest.raises(alpaca2.ModelLoadError, match="directory"):
        alpaca2.Model(tmp_path)
    zip_file = tmp_path / "model.zip"
    zip_file.write_bytes(b"PK\x03\x04" + b"\x00" * 100)
    with pytest.raises(alpaca2.ModelLoadError, match=r"not a GGUF file \(magic b'PK\\x03\\x04'\)"):
        alpaca2.Model(zip_file)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(alpaca2.ModelLoadError):
        alpaca2.Model(empty)


@pytest.mark.parametrize("fraction", [0.001, 0.01, 0.3, 0.9, 0.999])
def test_truncated_gguf_is_an_exception_not_a_crash(tiny_path, tmp_path, fraction):
    data = open(tiny_path, "rb").read()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:max(24, int(len(data) * fraction))])
    r = run_python(f"import alpaca2\ntry:\n    alpaca2.Model({str(cut)!r})\n"
                   f"except alpaca2.ModelLoadError as e:\n    print('ModelLoadError', e)\n")
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert "ModelLoadError" in r.stdout


def test_bad_decode_input(ctx, model):
    with pytest.raises(ValueError, match="at least one token"):
        ctx.decode([])
    with pytest.raises(alpaca2.TokenizeError):
        ctx.decode([model.n_vocab])
    with pytest.raises(alpaca2.TokenizeError):
        ctx.decode([-1])
    with pytest.raises(TypeError):
        ctx.decode(5)
    with pytest.raises(TypeError):
        ctx.decode(["a", "b"])
    with pytest.raises(ValueError):
        ctx.decode([1], logits="some")
    assert ctx.n_past() == 0
    with pytest.raises(ValueError, match="no logits"):
        _ = ctx.logits


def test_context_full_leaves_the_cache_unchanged(ctx, model):
    ctx.decode([5] * 200)
    with pytest.raises(alpaca2.ContextFullError, match="n_ctx=256") as e:
        ctx.decode([5] * 100)
    assert isinstance(e.value, RuntimeError)
    assert ctx.n_past() == 200
    ctx.decode([5] * 56)                      # exactly full is fine
    assert ctx.n_past() == 256


def test_invalid_context_parameters(model):
    with pytest.raises(ValueError):
        alpaca2.Context(model, n_ctx=-1)
    with pytest.raises(ValueError):
        alpaca2.Context(model, n_batch=0)
    with pytest.raises(ValueError):
        alpaca2.Context(model, flash_attn="sometimes")
    with pytest.raises(ValueError):
        alpaca2.Context(model, n_threads=0)
    with pytest.raises(TypeError):
        alpaca2.Context(None)


def test_everything_after_close_raises_closed_error(tiny_path):
    m = alpaca2.Model(tiny_path)
    c = new_ctx(m)
    s = alpaca2.Sampler(temp=0)
    c.close()
    for call in (lambda: c.decode([1]), lambda: c.logits, lambda: c.n_past(), lambda: c.save_state(),
                 lambda: c.clear(), lambda: c.seq_rm(0), lambda: s.sample(c)):
        with pytest.raises(alpaca2.ClosedError):
            call()
    s.close()
    with pytest.raises(alpaca2.ClosedError):
        s.sample_logits(np.zeros(4, dtype=np.float32))
    m.close()
    for call in (lambda: m.tokenize("a"), lambda: m.detokenize([1]), lambda: m.metadata,
                 lambda: alpaca2.Context(m)):
        with pytest.raises(alpaca2.ClosedError):
            call()


# -- threads and aborts ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_path(tmp_path_factory, tokenizer_path):
    return testing.make_model(tmp_path_factory.mktemp("small") / "small.gguf", shape="small",
                              tokenizer=tokenizer_path, ftype="f16")


def test_decode_releases_the_gil(small_path):
    with alpaca2.Model(small_path) as m:
        c = alpaca2.Context(m, n_ctx=2048, n_batch=2048, n_ubatch=512, n_threads=1)
        ids = [5 + (i % 700) for i in range(2000)]
        done = threading.Event()
        took = []

        def work():
            # decode until 0.6 s have gone by, however fast the machine is
            while sum(took) < 0.6:
                t0 = time.perf_counter()
                c.decode(ids)
                took.append(time.perf_counter() - t0)
                c.clear()
            done.set()
        t = threading.Thread(target=work)
        ticks, last, max_gap = 0, time.perf_counter(), 0.0
        t.start()
        while not done.is_set():
            now = time.perf_counter()
            max_gap = max(max_gap, now - last)
            last = now
            ticks += 1
        t.join()
        # with the GIL held during decode this thread would stall for a whole decode at a time
        assert max_gap < min(took) / 4, (max_gap, took)
        assert ticks > 1000


def test_one_context_from_two_threads_is_serialized(model):
    ids = model.tokenize(PROMPT)
    c = new_ctx(model, n_ctx=512, n_seq_max=4)
    clean = new_ctx(model)
    clean.decode(ids)
    want = np.array(clean.logits)
    errors = []

    def work(seq):
        try:
            for _ in range(5):
                c.decode(ids, seq_id=seq)
                c.seq_rm(seq, 0, -1)
        except Exception as e:       # pragma: no cover - the test fails on any
            errors.append(e)
    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    c.decode(ids, seq_id=0)
    np.testing.assert_allclose(c.logits, want, atol=1e-4)


def test_many_threads_each_with_a_context_on_one_model(model):
    ids = model.tokenize(PROMPT)
    clean = new_ctx(model)
    clean.decode(ids)
    want = np.array(clean.logits)
    results = [None] * 4

    def work(i):
        with new_ctx(model) as c:
            c.decode(ids)
            results[i] = np.array(c.logits)
    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        np.testing.assert_allclose(r, want, atol=1e-5)


def test_abort_from_another_thread_stops_a_long_decode(small_path):
    with alpaca2.Model(small_path) as m:
        c = alpaca2.Context(m, n_ctx=4096, n_batch=512, n_threads=1)
        ids = [5 + (i % 700) for i in range(4000)]
        c.decode(ids[:10])
        timer = threading.Timer(0.3, c.abort)
        timer.start()
        t0 = time.perf_counter()
        with pytest.raises(alpaca2.DecodeAborted):
            # however fast this machine is, decoding goes on until the abort lands
            for _ in range(200):
                c.decode(ids[10:])
                c.seq_rm(0, 10, -1)
        assert time.perf_counter() - t0 < 5
        assert c.n_past() == 10                # the cache is as before the aborted call
        c.decode(ids[10:15])                   # and still usable
        assert c.n_past() == 15


def test_ctrl_c_interrupts_a_long_decode(small_path):
    code = f"""
import os, signal, threading, time, alpaca2
# a shell that starts jobs in the background (CI, nohup) hands them SIGINT ignored: undo that here
signal.signal(signal.SIGINT, signal.default_int_handler)
m = alpaca2.Model({small_path!r})
c = alpaca2.Context(m, n_ctx=4096, n_batch=512, n_threads=1)
ids = [5 + (i % 700) for i in range(4000)]
c.decode(ids[:10])
sent = []
def ctrl_c():
    sent.append(time.perf_counter())
    os.kill(os.getpid(), signal.SIGINT)
threading.Timer(0.5, ctrl_c).start()
in_decode = 0
try:
    for _ in range(200):                 # however fast the machine, still decoding at 0.5 s
        t = time.perf_counter()
        c.decode(ids[10:])
        in_decode += time.perf_counter() - t
        c.seq_rm(0, 10, -1)
    print("not interrupted")
except KeyboardInterrupt:
    print("KeyboardInterrupt after %.0f ms" % ((time.perf_counter() - sent[0]) * 1000))
print("n_past", c.n_past())
c.decode(ids[10:15])
print("usable", c.n_past())
"""
    r = run_python(code)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "KeyboardInterrupt after" in r.stdout, r.stdout
    ms = float(r.stdout.split("after ")[1].split(" ms")[0])
    assert ms < 200, r.stdout
    # the loop spends nearly all its time inside decode, so that is where Ctrl+C landed: the
    # interrupted call left the cache as it was (10), or, rarely, the signal came just between calls
    assert "n_past 10" in r.stdout or "n_past 4000" in r.stdout, r.stdout
    assert "usable 15" in r.stdout or "usable 4005" in r.stdout, r.stdout
