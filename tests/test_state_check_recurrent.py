"""alpaca2._state_check on recurrent (Mamba) and hybrid (Granite hybrid) models: their states are
walked field by field too (the recurrent cells, the R and S rows; for a hybrid the attention KV
cache first), a round trip gives identical logits, and every damaged field is refused with a
StateError saying what is wrong, before llama.cpp reads it."""
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

import alpaca2
from alpaca2._state_check import check_state, expectations
from alpaca2.errors import StateError

from conftest import run_case

sys.path.insert(0, str(Path(__file__).parent / "fuzz"))
import state_fuzz  # noqa: E402


@pytest.fixture(scope="module", params=["mamba", "mamba2", "hybrid"])
def kind_model(request, mamba_path, mamba2_path, hybrid_path):
    m = alpaca2.Model({"mamba": mamba_path, "mamba2": mamba2_path, "hybrid": hybrid_path}[request.param])
    yield request.param, m
    m.close()


def fill(ctx, model, n_seq_max):
    for seq in range(n_seq_max):
        ctx.decode(model.tokenize("床前明月光 hello" * (seq + 1), add_bos=True), seq_id=seq)


@pytest.mark.parametrize("n_seq_max", [1, 2])
def test_round_trip_gives_identical_logits(kind_model, n_seq_max, tmp_path):
    kind, model = kind_model
    with alpaca2.Context(model, n_ctx=64, n_batch=32, n_threads=2, n_seq_max=n_seq_max) as ctx:
        fill(ctx, model, n_seq_max)
        data = ctx.save_state()
        info = check_state(data, expectations(ctx))
        assert info["checked"] == "all" and info["seq_ids"] == list(range(n_seq_max))
        assert info["n_states"] == n_seq_max and info["n_layer_rs"] == (1 if kind == "hybrid" else 2)
        assert info["kv_caches"] == (1 if kind == "hybrid" else 0)
        ctx.save_state_file(tmp_path / "s.bin", [1, 2, 3])
        want = []
        for seq in range(n_seq_max):
            ctx.decode([7, 8], seq_id=seq)
            want.append(ctx.logits.copy())
        for load in ("blob", "file"):
            ctx.clear()
            if load == "blob":
                ctx.load_state(data)
            else:
                assert ctx.load_state_file(tmp_path / "s.bin") == [1, 2, 3]
            for seq in range(n_seq_max):
                ctx.decode([7, 8], seq_id=seq)
                assert np.array_equal(ctx.logits, want[seq]), (load, seq)


def test_expectations_name_the_memory_kind(kind_model):
    kind, model = kind_model
    with alpaca2.Context(model, n_ctx=64, n_threads=2) as ctx:
        e = expectations(ctx)
    assert e["memory"] == ("hybrid" if kind == "hybrid" else "recurrent")
    # (d_conv - 1) * (d_inner + 2 * n_group * d_state) and d_state * d_inner
    assert (e["n_embd_r"], e["n_embd_s"]) == ((3 * 64, 8 * 64) if kind == "mamba" else (3 * 80, 8 * 64))


def saved(model, n_seq_max):
    with alpaca2.Context(model, n_ctx=64, n_batch=32, n_threads=2, n_seq_max=n_seq_max) as ctx:
        fill(ctx, model, n_seq_max)
        return ctx.save_state(), expectations(ctx)


def set_field(data, name, value):
    for field, off, fmt in state_fuzz.fields(data)[0]:
        if field == name:
            b = bytearray(data)
            struct.pack_into(fmt, b, off, value)
            return bytes(b)
    raise KeyError(name)


# (field, value, message)
DAMAGE = [
    ("rs cell_count", 3, "holds 3 recurrent states, this context has room for 2"),
    ("rs cell_count", 2 ** 32 - 1, "holds 4294967295 recurrent states"),
    ("rs n_seq_id 0", 0, "belongs to no sequence"),
    ("rs n_seq_id 0", 2 ** 31, "belongs to 2147483648 sequences"),
    ("rs seq_id 0.0", 2, "belongs to sequence 2, outside this context's 0..1"),
    ("rs seq_id 0.0", -1, "belongs to sequence -1"),
    ("rs seq_id 0.0", 1, "sequence 1 has two recurrent states"),
    ("rs pos 0", -1, "has position -1, below 0"),
    ("rs pos 0", "n_ctx", "larger n_ctx (it holds position"),
    ("rs s_trans", 1, "S layout flag is 1"),
    ("rs n_layer", 3, "recurrent part has 3 layers, this model has 2"),
    ("rs n_layer", 0, "recurrent part has 0 layers"),
    ("rs R type 0", 1, "has type f16; llama.cpp keeps recurrent states in f32"),
    ("rs S type 0", 99, "has type 99, not a ggml type"),
    ("rs R row 0", 2 ** 63, "R (conv) rows of recurrent layer 0 are 9223372036854775808 bytes"),
    ("rs S row 0", 2 ** 40, "too short for the data of recurrent state entry|S (SSM) rows of recurrent layer 0 are"),
    ("rs R row 0", 0, "R (conv) rows of recurrent layer 0 are 0 bytes, this model's are"),
    ("rs S row 0", 6, "not a whole number of f32"),
]


@pytest.mark.parametrize("field,value,message", DAMAGE, ids=[f"{d[0]}={d[1]}" for d in DAMAGE])
def test_damaged_recurrent_fields_are_refused(kind_model, field, value, message):
    kind, model = kind_model
    data, expect = saved(model, 2)
    if value == "n_ctx":
        value = expect["n_ctx"]                     # llama.cpp may round n_ctx up
    with pytest.raises(StateError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_state(set_field(data, field, value), expect)


def test_truncated_or_extended_states_are_refused(kind_model):
    kind, model = kind_model
    data, expect = saved(model, 2)
    for cut in sorted({off for _, off, _ in state_fuzz.fields(data)[0]} | {len(data) - 1}):
        if cut > 0:
            with pytest.raises(StateError):
                check_state(data[:cut], expect)
    # a hybrid's recurrent layer count is not in the metadata the check sees: its entries are
    # read to the end, so the 4 bytes read as the start of one more
    with pytest.raises(StateError, match="4 bytes after the end of the state's recurrent part"
                       if kind != "hybrid" else "too short for the row size of recurrent state entry 2"):
        check_state(data + b"\0" * 4, expect)


def test_a_damaged_hybrid_kv_part_is_refused(hybrid_path):
    with alpaca2.Model(hybrid_path) as model:
        data, expect = saved(model, 1)
        n_ctx = expect["n_ctx"]
        with pytest.raises(StateError, match=f"holds {n_ctx + 1} tokens, this context has room for {n_ctx}"):
            check_state(set_field(data, "kv cell_count s0", n_ctx + 1), expect)
        with pytest.raises(StateError, match="too short for the V data of layer 0"):
            check_state(set_field(data, "kv n_layer", 2), expect)
        # a whole recurrent layer's R and S rows cut out: the layer counts no longer add up
        fields = {name: off for name, off, _ in state_fuzz.fields(data)[0]}
        r0, s0 = fields["rs R type 0"], fields["rs S type 0"]
        assert fields["kv n_layer"] < r0
        with pytest.raises(StateError, match="recurrent part has 0 R/S entries"):
            check_state(data[:r0], expect)


def test_a_state_of_the_other_kind_is_refused(mamba_path, hybrid_path):
    with alpaca2.Model(mamba_path) as mamba, alpaca2.Model(hybrid_path) as hybrid:
        m_data, m_expect = saved(mamba, 1)
        h_data, h_expect = saved(hybrid, 1)
    with pytest.raises(StateError, match="saved from a 'granitehybrid' model, this one is 'mamba'"):
        check_state(h_data, m_expect)
    # the name patched: the layouts still differ
    patched = struct.pack("<I", 5) + b"mamba" + h_data[4 + 13:]
    with pytest.raises(StateError):
        check_state(patched, m_expect)


def test_the_damage_reaches_load_state_as_state_error(mamba_path):
    # in a subprocess: a miss here would mean llama.cpp reads a damaged state
    out = run_case(f"""
        import struct
        m = alpaca2.Model({mamba_path!r})
        c = alpaca2.Context(m, n_ctx=64, n_threads=1, n_seq_max=2)
        c.decode(m.tokenize("hello", add_bos=True))
        data = bytearray(c.save_state())
        struct.pack_into("<I", data, 9, 3)            # the recurrent state count
        expect(alpaca2.StateError, c.load_state, bytes(data))
        c.decode([5])
        print("DECODED")
    """)
    assert "holds 3 recurrent states" in out and "DECODED" in out


def test_a_state_shared_by_two_sequences_round_trips(kind_model):
    # seq_cp on a recurrent memory makes one state belong to both sequences (a cell with two ids)
    kind, model = kind_model
    with alpaca2.Context(model, n_ctx=64, n_batch=32, n_threads=2, n_seq_max=2) as ctx:
        ctx.decode(model.tokenize("hello 你好", add_bos=True), seq_id=0)
        ctx.seq_rm(1)
        ctx.seq_cp(0, 1)
        data = ctx.save_state()
        info = check_state(data, expectations(ctx))
        assert info["seq_ids"] == [0, 1] and info["n_states"] == 1          # one cell, ids 0 and 1
        want = []
        for seq in (0, 1):
            ctx.decode([9], seq_id=seq)
            want.append(ctx.logits.copy())
        ctx.clear()
        ctx.load_state(data)
        for seq in (0, 1):
            ctx.decode([9], seq_id=seq)
            assert np.array_equal(ctx.logits, want[seq])


def test_a_truncated_or_damaged_state_file_is_refused(kind_model, tmp_path):
    kind, model = kind_model
    with alpaca2.Context(model, n_ctx=64, n_batch=32, n_threads=2, n_seq_max=2) as ctx:
        fill(ctx, model, 2)
        ctx.save_state_file(tmp_path / "s.bin", [1, 2])
        data = (tmp_path / "s.bin").read_bytes()
        header = 12 + 4 * 2                      # magic, version, token count, the tokens
        for cut in (len(data) - 1, header + 3, header + len(data) // 2):
            (tmp_path / "t.bin").write_bytes(data[:cut])
            with pytest.raises(StateError, match="is not a valid state file"):
                ctx.load_state_file(tmp_path / "t.bin")
        bad = data[:header] + set_field(data[header:], "rs cell_count", 3)
        (tmp_path / "t.bin").write_bytes(bad)
        with pytest.raises(StateError, match="holds 3 recurrent states"):
            ctx.load_state_file(tmp_path / "t.bin")
        assert ctx.load_state_file(tmp_path / "s.bin") == [1, 2]


@pytest.mark.parametrize("n_seq_max", [1, 2])
def test_a_checkpoint_takes_a_sequence_back(kind_model, n_seq_max):
    """checkpoint_seq / restore_seq (llama-server's context checkpoints): a recurrent state cannot
    drop its last positions, but put back from a checkpoint it continues exactly as before; a
    hybrid model's attention cells after the checkpoint go too.  Other sequences are untouched."""
    kind, model = kind_model
    with alpaca2.Context(model, n_ctx=64, n_batch=32, n_threads=2, n_seq_max=n_seq_max) as ctx:
        fill(ctx, model, n_seq_max)
        seq = n_seq_max - 1
        n0 = len(model.tokenize("床前明月光 hello" * (seq + 1), add_bos=True))
        with pytest.raises(ValueError):
            ctx.seq_rm(seq, n0 - 1, -1)            # what the checkpoint is for
        ck = ctx.checkpoint_seq(seq)
        assert (ck.seq_id, ck.n_pos, ck.context) == (seq, n0, ctx) and ck.nbytes > 0
        ctx.decode([5, 6, 7], seq_id=seq)
        want = ctx.logits.copy()
        ctx.decode([9, 9], seq_id=seq)            # a draft, say, that was wrong
        assert ctx.restore_seq(ck) == n0
        ctx.decode([5, 6, 7], seq_id=seq)
        assert np.array_equal(ctx.logits, want)
        assert ctx.restore_seq(ck) == n0           # again: a checkpoint is not used up
        if n_seq_max == 2:                        # the other sequence goes on as if nothing happened
            ctx.decode([5], seq_id=0)
            with alpaca2.Context(model, n_ctx=64, n_batch=32, n_threads=2, n_seq_max=2) as fresh:
                fill(fresh, model, 2)
                fresh.decode([5], seq_id=0)
                assert np.array_equal(ctx.logits, fresh.logits)


def test_checkpoints_cannot_be_forged_or_moved(mamba_path):
    """Only the context that took a checkpoint restores it (its bytes are never checked), and
    nothing else makes one."""
    with alpaca2.Model(mamba_path) as model:
        with alpaca2.Context(model, n_ctx=64, n_threads=1) as a, alpaca2.Context(model, n_ctx=64, n_threads=1) as b:
            a.decode([1, 5, 9])
            ck = a.checkpoint_seq(0)
            with pytest.raises(ValueError, match="another context"):
                b.restore_seq(ck)
            with pytest.raises(TypeError):
                alpaca2._core.SeqCheckpoint()
            with pytest.raises(TypeError):
                a.restore_seq(b"\0" * ck.nbytes)
            with pytest.raises(AttributeError):
                ck.n_pos = 0
            with pytest.raises(ValueError):
                a.checkpoint_seq(3)                 # no such sequence
        with pytest.raises(alpaca2.errors.Alpaca2Error):
            a.restore_seq(ck)                       # the context is closed


def test_a_whole_checkpoint_moves_to_another_sequence(kind_model):
    """checkpoint_seq(full=True): the whole sequence (KV cells too), restored into any sequence
    (the server's prompt cache), unchecked; continuing from it gives identical logits."""
    kind, model = kind_model
    with alpaca2.Context(model, n_ctx=64, n_batch=32, n_threads=2, n_seq_max=2) as ctx:
        fill(ctx, model, 1)
        n0 = len(model.tokenize("床前明月光 hello", add_bos=True))
        ck = ctx.checkpoint_seq(0, full=True)
        assert ck.full and len(ck) == ck.nbytes > 0
        ctx.decode([5, 6], seq_id=0)
        want = ctx.logits.copy()
        assert ctx.restore_seq(ck, 1) == n0          # into sequence 1, which held nothing
        ctx.decode([5, 6], seq_id=1)
        assert np.array_equal(ctx.logits, want)
        with pytest.raises(ValueError):
            ctx.restore_seq(ck, 2)                   # no such sequence
