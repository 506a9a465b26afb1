"""One sequence's state: Context.save_seq_state / load_seq_state and the sequence state files that
llama-server's /slots save and restore write (llama_state_seq_save_file's format).

The state is checked before llama.cpp reads it: llama.cpp itself takes a negative or repeated
position, or one past n_ctx, and goes on with a damaged cache (shown below with the check off).
"""
import struct

import numpy as np
import pytest

import alpaca2
from alpaca2 import _state_check
from conftest import run_case

CELLS_AT = 16          # u32 magic, i32 seq id, u32 n_stream, u32 cell count, then 12 bytes per cell


@pytest.fixture
def ctx(model):
    c = alpaca2.Context(model, n_ctx=256, n_batch=64, n_seq_max=4, kv_unified=True, n_threads=1)
    yield c
    c.close()


def test_a_sequence_moves_to_another_and_decodes_as_a_fresh_one(model, ctx):
    ctx.decode([5, 6, 7, 8, 9], seq_id=1)
    blob = ctx.save_seq_state(1)
    assert ctx.load_seq_state(blob, 2) == 5 and ctx.n_past(2) == 5
    ctx.decode([10], seq_id=2)
    moved = ctx.logits
    fresh = alpaca2.Context(model, n_ctx=256, n_threads=1)
    fresh.decode([5, 6, 7, 8, 9, 10])
    np.testing.assert_allclose(moved, fresh.logits, atol=1e-4)
    assert ctx.n_past(1) == 5               # the source is untouched
    fresh.close()


def test_restoring_replaces_what_the_sequence_held(ctx):
    ctx.decode([5, 6, 7], seq_id=0)
    ctx.decode([11, 12, 13, 14, 15, 16, 17], seq_id=3)
    assert ctx.load_seq_state(ctx.save_seq_state(0), 3) == 3
    assert ctx.n_past(3) == 3


def test_an_empty_sequence_round_trips(ctx):
    ctx.decode([5, 6], seq_id=1)
    assert ctx.load_seq_state(ctx.save_seq_state(0), 1) == 0


def test_a_file_round_trips_with_its_tokens_in_both_token_layouts(ctx, tmp_path):
    ctx.decode([5, 6, 7, 8], seq_id=1)
    blob = ctx.save_seq_state(1)
    path = tmp_path / "slot.bin"
    size = _state_check.write_seq_state_file(path, [5, 6, 7, 8], blob)
    assert size == path.stat().st_size == 12 + 16 + len(blob) - 8
    assert path.read_bytes()[:4] == b"qsgg"             # 'ggsq', as llama_state_seq_save_file writes
    tokens, blob2, info = _state_check.read_seq_state_file(path, _state_check.expectations(ctx))
    assert tokens == [5, 6, 7, 8] and info["n_cells"] == 4 and ctx.load_seq_state(blob2, 0) == 4
    # llama-server's newer files: a packed token list (LLAMA_TOKEN_NULL, version, n, tokens)
    data = path.read_bytes()
    packed = struct.pack("<III", 0x67677371, 3, 7) + struct.pack("<iii", -1, 1, 4) + data[12:]
    path.write_bytes(packed)
    tokens, _, _ = _state_check.read_seq_state_file(path, _state_check.expectations(ctx))
    assert tokens == [5, 6, 7, 8]


@pytest.mark.parametrize("mutation,message", [
    ("negative position", "below 0"),
    ("repeated position", "comes twice"),
    ("position past n_ctx", "larger n_ctx"),
    ("cell count", "too short"),
    ("two sequences in a cell", "several sequences"),
    ("truncated", "too short"),
    ("wrong magic", "magic"),
    ("layer count", "layers"),
])
def test_a_damaged_sequence_state_is_refused(ctx, mutation, message):
    ctx.decode([5, 6, 7, 8, 9], seq_id=1)
    b = bytearray(ctx.save_seq_state(1))
    cell = lambda i: CELLS_AT + 12 * i                            # noqa: E731
    if mutation == "negative position":
        struct.pack_into("<i", b, cell(2), -5)
    elif mutation == "repeated position":
        struct.pack_into("<i", b, cell(2), 1)
    elif mutation == "position past n_ctx":
        struct.pack_into("<i", b, cell(4), 2 ** 31 - 1)
    elif mutation == "cell count":
        struct.pack_into("<I", b, 12, 255)
    elif mutation == "two sequences in a cell":
        struct.pack_into("<I", b, cell(1) + 4, 2)
    elif mutation == "truncated":
        del b[-3:]
    elif mutation == "wrong magic":
        b[0] ^= 1
    elif mutation == "layer count":
        struct.pack_into("<I", b, cell(5) + 4, 7)
    with pytest.raises(alpaca2.StateError, match=message):
        ctx.load_seq_state(bytes(b), 2)
    assert ctx.n_past(2) == 0


def test_without_the_check_llama_cpp_takes_damaged_positions(tiny_path):
    """Why the check: llama.cpp restores a negative or repeated position and decodes on."""
    out = run_case(f"""
        import struct
        from alpaca2 import _state_check
        m = alpaca2.Model({str(tiny_path)!r})
        c = alpaca2.Context(m, n_ctx=256, n_seq_max=4, kv_unified=True, n_threads=1)
        c.decode([5, 6, 7, 8, 9], seq_id=1)
        b = bytearray(c.save_seq_state(1))
        struct.pack_into("<i", b, {CELLS_AT} + 24, -5)
        expect(alpaca2.StateError, c.load_seq_state, bytes(b), 2)
        _state_check.check_seq_state = lambda *a, **k: None
        print("llama.cpp alone loads", c.load_seq_state(bytes(b), 2))
    """)
    assert "RAISED StateError" in out and "llama.cpp alone loads" in out, out


def test_random_damage_never_ends_the_process(tiny_path):
    out = run_case(f"""
        import random, struct
        m = alpaca2.Model({str(tiny_path)!r})
        c = alpaca2.Context(m, n_ctx=256, n_seq_max=4, kv_unified=True, n_threads=1)
        c.decode(list(range(5, 40)), seq_id=1)
        good = c.save_seq_state(1)
        rng = random.Random(14)
        loaded = refused = 0
        for i in range(400):
            b = bytearray(good)
            for _ in range(rng.randint(1, 4)):
                at = rng.randrange(min(len(b), 8 + 8 + 35 * 12 + 64))     # mostly the metadata
                if rng.random() < 0.5:
                    b[at] = rng.randrange(256)
                else:
                    struct.pack_into("<I", b, min(at, len(b) - 4), rng.choice([0, 1, 2, 255, 2**31, 2**32 - 1]))
            if rng.random() < 0.2:
                del b[rng.randrange(len(b)):]
            try:
                c.load_seq_state(bytes(b), 2)
                c.decode([3], seq_id=2)
                loaded += 1
            except alpaca2.Alpaca2Error:
                refused += 1
            c.seq_rm(2, 0, -1)
        print("loaded", loaded, "refused", refused)
    """, timeout=300)
    print("\nsequence state damage:", out.strip().splitlines()[-1])
    assert "refused" in out, out
