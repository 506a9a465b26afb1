"""alpaca2._common.NgramSpeculator: llama.cpp's n-gram drafters (common/speculative.h) through
alpaca2's shim.  What they draft is checked against llama-server in test_server_speculative.py;
here: each drafts a repeat, and bad calls are exceptions, never llama.cpp's GGML_ASSERT aborts."""
import subprocess
import sys
import textwrap

import pytest

from alpaca2 import ClosedError
from alpaca2._common import NGRAM_SPEC_TYPES, NgramSpeculator

SMALL = dict(simple_size_n=2, simple_size_m=6, map_k_size_n=2, map_k_size_m=6, map_k4v_size_n=2,
             map_k4v_size_m=6, mod_n_match=3, mod_n_min=1, mod_n_max=8)
LOOP = [5, 6, 7, 8, 9, 10, 11] * 12           # a history that repeats itself


@pytest.mark.parametrize("kind", NGRAM_SPEC_TYPES)
def test_each_type_drafts_the_repeat(kind):
    with NgramSpeculator(kind, 2, **SMALL) as sp:
        assert sp.types == (kind,) and sp.n_seq == 2 and sp.n_max >= 6
        sp.begin(1, LOOP[:40])
        d = sp.draft(1, LOOP[:-1], LOOP[-1], 16)
        assert d and d == (LOOP * 2)[len(LOOP):len(LOOP) + len(d)]      # the loop goes on
        assert sp.draft(1, LOOP[:-1], LOOP[-1], 2) == d[:2]            # n_max cuts it
        assert sp.draft(1, LOOP[:-1], LOOP[-1], 0) == []
        sp.accept(1, 2)
        sp.accept(1, 2)                     # no draft since the last accept: a no-op
        assert sp.draft(0, [1, 2, 3], 4, 16) == []                      # the other sequence knows nothing
    assert sp.closed
    with pytest.raises(ClosedError):
        sp.draft(1, LOOP, 5, 4)
    sp.close()


def test_first_type_that_drafts_wins_in_llama_cpps_order():
    """Given as mod, simple: llama.cpp tries ngram-simple first (its size_m caps the draft)."""
    with NgramSpeculator(["ngram-mod", "ngram-simple"], 1, **dict(SMALL, simple_size_m=3)) as sp:
        sp.begin(0, LOOP[:40])
        assert len(sp.draft(0, LOOP[:-1], LOOP[-1], 16)) == 3
        assert sp.types == ("ngram-mod", "ngram-simple")


@pytest.mark.parametrize("args, kw, exc", [
    (([], 1), {}, ValueError),
    ((["draft-simple"], 1), {}, ValueError),
    ((["ngram-what"], 1), {}, ValueError),
    ((["ngram-mod"], 0), {}, ValueError),
    ((["ngram-mod"], 1), {"mod_n_match": 0}, ValueError),
    ((["ngram-mod"], 1), {"mod_n_max": 1025}, ValueError),
    ((["ngram-map-k"], 1), {"map_k_size_n": 0}, ValueError),
    ((["ngram-map-k"], 1), {"map_k_min_hits": 70000}, ValueError),
    ((["ngram-simple"], 1), {"simple_size_m": 2 ** 40}, ValueError),
    ((["ngram-simple"], 1), {"simple_size_m": 1.5}, TypeError),
    ((["ngram-simple"], 1), {"size_m": 4}, TypeError),
])
def test_bad_settings(args, kw, exc):
    with pytest.raises(exc):
        NgramSpeculator(*args, **kw)


def test_bad_calls_are_exceptions():
    sp = NgramSpeculator(list(NGRAM_SPEC_TYPES), 2, **SMALL)
    for bad in (-1, 2, 2 ** 31 - 1):
        with pytest.raises(ValueError, match="out of range"):
            sp.draft(bad, LOOP, 5, 4)
        with pytest.raises(ValueError, match="out of range"):
            sp.begin(bad, LOOP)
        with pytest.raises(ValueError, match="out of range"):
            sp.accept(bad, 1)
    with pytest.raises(OverflowError):
        sp.draft(0, [2 ** 31], 5, 4)
    with pytest.raises(TypeError):
        sp.draft(0, ["a"], 5, 4)
    sp.begin(0, LOOP[:30])
    sp.draft(0, LOOP[:50], 5, 4)
    with pytest.raises(ValueError, match="begin a new generation"):    # ngram-map would abort
        sp.draft(0, LOOP[:20], 5, 4)
    sp.begin(0, LOOP[:10])
    assert isinstance(sp.draft(0, LOOP[:20], 5, 4), list)
    sp.accept(0, 10 ** 6)                   # more than drafted: llama.cpp's accept gets the draft's length


def test_random_use_never_aborts():
    """Histories that grow as a generation's do, new generations at random, odd tokens (-1, big ids),
    every type: in a subprocess, which must exit 0 (llama.cpp's asserts would be SIGABRT)."""
    code = textwrap.dedent("""
        import random
        from alpaca2._common import NgramSpeculator, NGRAM_SPEC_TYPES
        r = random.Random(0)
        for it in range(60):
            types = r.sample(NGRAM_SPEC_TYPES, r.randint(1, 5))
            sp = NgramSpeculator(types, 2, simple_size_n=r.randint(1, 5), simple_size_m=r.randint(1, 9),
                                 map_k_size_n=r.randint(1, 5), map_k_size_m=r.randint(1, 9),
                                 map_k4v_size_n=r.randint(1, 5), map_k4v_size_m=r.randint(1, 9),
                                 map_k_min_hits=r.randint(1, 3), map_k4v_min_hits=r.randint(1, 3),
                                 mod_n_match=r.randint(1, 6), mod_n_min=r.randint(0, 5), mod_n_max=r.randint(0, 9))
            hists = [[], []]
            for k in range(150):
                seq = r.randrange(2)
                vocab = r.choice([2, 3, 10, 2 ** 31 - 1])
                if r.random() < 0.05 or not hists[seq]:
                    hists[seq] = [r.randrange(-1, vocab) for _ in range(r.randrange(0, 100))]
                    sp.begin(seq, hists[seq])
                d = sp.draft(seq, hists[seq], r.randrange(-1, vocab), r.randrange(-2, 40))
                n_ok = r.randrange(0, len(d) + 1) if d else 0
                hists[seq] += d[:n_ok] + [r.randrange(0, vocab)]
                if r.random() < 0.9:
                    sp.accept(seq, n_ok)
            sp.close()
        print("done")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "done", r.stderr[-2000:]


def write_cache(path, records):
    """An n-gram cache file as llama.cpp's common_ngram_cache_save writes it: per n-gram, its
    LLAMA_NGRAM_MAX (4) tokens (-1 past its length), the count of next tokens, (token, count) pairs."""
    import struct
    with open(path, "wb") as f:
        for ngram, nexts in records:
            f.write(struct.pack("<4i", *(list(ngram) + [-1] * (4 - len(ngram)))))
            f.write(struct.pack("<i", len(nexts)))
            for tok, count in nexts:
                f.write(struct.pack("<2i", tok, count))


def test_lookup_cache_files(tmp_path):
    """-lcs: a static cache of 2-grams drafts on its own, with nothing learned from the context."""
    good = tmp_path / "static.bin"
    write_cache(good, [((1, 2), [(3, 5)]), ((2, 3), [(4, 5), (9, 1)]), ((3, 4), [(1, 5)]), ((4, 1), [(2, 5)])])
    with NgramSpeculator("ngram-cache", 1, lookup_cache_static=str(good)) as sp:
        assert sp.draft(0, [7, 1], 2, 16) == [3, 4, 1, 2, 3, 4, 1, 2]       # ngram-cache drafts 8 at most
    with NgramSpeculator("ngram-cache", 1) as sp:
        assert sp.draft(0, [7, 1], 2, 16) == []
    # a file that is not a cache is a ValueError before llama.cpp reads it (its loader would abort):
    # run where an abort could not take the test run down with it
    cut, zero = tmp_path / "cut.bin", tmp_path / "zero.bin"
    cut.write_bytes(good.read_bytes()[:-3])
    write_cache(zero, [((1, 2), [(3, 0)])])
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    code = textwrap.dedent(f"""
        from alpaca2._common import NgramSpeculator
        for kw in ({{"lookup_cache_static": {str(cut)!r}}}, {{"lookup_cache_dynamic": {str(zero)!r}}},
                   {{"lookup_cache_static": {str(tmp_path / "missing.bin")!r}}}, {{"lookup_cache_static": ""}}):
            try:
                NgramSpeculator("ngram-cache", 1, **kw)
            except ValueError as e:
                print("ValueError", e)
        NgramSpeculator("ngram-cache", 1, lookup_cache_dynamic={str(empty)!r}).close()
        print("done")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert lines[-1] == "done" and len(lines) == 5 and all(x.startswith("ValueError") for x in lines[:4]), lines
    assert "not an n-gram cache" in lines[0] and "not an n-gram cache" in lines[1] and "cannot open" in lines[2]
