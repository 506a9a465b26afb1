"""alpaca2._state_check: saved states are checked field by field before llama.cpp reads them.

Real states come from Context.save_state()/save_state_file() on the tiny test models (F32 and F16
KV, several n_ctx, several sequences, flash attention on and off); every one passes, and every
truncated or structurally mutated copy (a seeded loop) is refused with StateError.  What the check
lets through, llama.cpp loads.
"""
import os
import random
import struct
import subprocess
import sys

import numpy as np
import pytest

import alpaca2
from alpaca2 import _state_check
from alpaca2._state_check import check_state, check_state_file, expectations
from alpaca2.errors import StateError

from conftest import run_python

# (n_ctx, n_seq_max, kv type, flash_attn)
CONFIGS = [(256, 1, "f32", False), (512, 1, "f16", False), (128, 1, "f16", True),
           (256, 3, "f32", False), (384, 2, "f16", True)]


def make_ctx(model, n_ctx, n_seq_max, kv, flash_attn):
    return alpaca2.Context(model, n_ctx=n_ctx, n_batch=64, n_threads=2, n_seq_max=n_seq_max,
                           type_k=kv, type_v=kv, flash_attn=flash_attn)


def expect_for(ctx, kv, flash_attn):
    # the Context does not (yet) say its cache types and V layout: pass them
    return expectations(ctx, type_k=kv, type_v=kv, v_trans=not flash_attn)


def fill(ctx, model, n_seq_max, seed=0):
    """Decode a prompt into each sequence, one copied prefix shared by two (cells with 2 ids)."""
    rng = random.Random(seed)
    n = 0
    for seq in range(n_seq_max):
        ids = [rng.randrange(3, model.n_vocab) for _ in range(20 + 7 * seq)]
        ctx.decode(ids, seq_id=seq)
        n += len(ids)
    if n_seq_max > 1:
        ctx.seq_rm(1)
        ctx.seq_cp(0, 1, 0, 10)          # cells 0..9 now belong to sequences 0 and 1
        n -= 27
    return n


@pytest.fixture(scope="module", params=CONFIGS, ids=lambda c: f"n_ctx{c[0]}-seq{c[1]}-{c[2]}-fa{int(c[3])}")
def saved(request, model):
    """(ctx, expectations, state bytes, number of cells) for one configuration."""
    n_ctx, n_seq_max, kv, fa = request.param
    ctx = make_ctx(model, n_ctx, n_seq_max, kv, fa)
    n_cells = fill(ctx, model, n_seq_max)
    data = ctx.save_state()
    yield ctx, expect_for(ctx, kv, fa), data, n_cells
    ctx.close()


def test_real_states_pass_and_load(saved):
    ctx, expect, data, n_cells = saved
    info = check_state(data, expect)
    assert info["checked"] == "all" and info["arch"] == "llama"
    assert info["n_cells"] == n_cells and info["n_layer"] == 2 and info["n_streams"] == 1
    assert info["type_k"] == expect["type_k"] and info["v_trans"] == expect["v_trans"]
    assert info["seq_ids"] == list(range(ctx.n_seq_max))
    assert info["has_logits"] is False and info["n_outputs"] == 0
    ctx.load_state(data)                            # and llama.cpp takes it
    assert check_state(ctx.save_state(), expect)["n_cells"] == n_cells


def test_real_state_files_pass(saved, tmp_path):
    ctx, expect, _, n_cells = saved
    path = tmp_path / "s.kv"
    ctx.save_state_file(path, [5, 6, 7])
    info = check_state_file(path, expect)
    assert info["n_tokens"] == 3 and info["n_cells"] == n_cells
    assert ctx.load_state_file(path) == [5, 6, 7]


def test_an_empty_context_state_passes_and_has_no_logits(model):
    with make_ctx(model, 256, 1, "f16", False) as ctx:
        info = check_state(ctx.save_state(), expect_for(ctx, "f16", False))
        assert info["n_cells"] == 0 and info["has_logits"] is False


def test_a_state_from_a_larger_context_is_refused_with_its_n_ctx(model):
    with make_ctx(model, 512, 1, "f32", False) as big, make_ctx(model, 256, 1, "f32", False) as small:
        big.decode(list(range(3, 303)))
        with pytest.raises(StateError, match="holds 300 tokens, this context has room for 256"):
            check_state(big.save_state(), expect_for(small, "f32", False))
        big.seq_rm(0, 0, 200)                        # 100 cells left, at positions 200..299
        with pytest.raises(StateError, match="larger n_ctx .*position 299.*n_ctx 160"):
            check_state(big.save_state(), dict(expect_for(small, "f32", False), n_ctx=160))


def test_cache_type_and_layout_mismatches_are_refused(model):
    with make_ctx(model, 256, 1, "f16", False) as ctx:
        ctx.decode([5, 6, 7])
        data = ctx.save_state()
        with pytest.raises(StateError, match="K cache is f16, this context's is f32"):
            check_state(data, expect_for(ctx, "f32", False))
        with pytest.raises(StateError, match="transposed.*flash_attn"):
            check_state(data, expect_for(ctx, "f16", True))
        with pytest.raises(StateError, match="sequence 0|n_seq_max"):
            check_state(data, dict(expect_for(ctx, "f16", False), n_stream=2))
        with pytest.raises(StateError, match="2 layers.*this model has 1"):
            check_state(data, dict(expect_for(ctx, "f16", False), n_layer=1))
        with pytest.raises(StateError, match="rows of layer 0 are 64 bytes, this model's are 128"):
            check_state(data, dict(expect_for(ctx, "f16", False), n_embd_k_gqa=64))
        # a state of another architecture (the name mutated in place)
        bad = data.replace(b"llama", b"llamb", 1)
        with pytest.raises(StateError, match="saved from a 'llamb' model, this one is 'llama'"):
            check_state(bad, expect_for(ctx, "f16", False))


def test_the_audits_9_byte_state_is_refused_without_allocating(model):
    with pytest.raises(StateError, match="9 bytes, too short"):
        check_state(b"\xff\xff\xff\xff12345")
    # llama.cpp alone would allocate and zero a buffer of the claimed 4 GiB; the check needs none
    code = r"""
import resource, alpaca2
from alpaca2._state_check import check_state
try:
    check_state(b"\xff\xff\xff\xfe12345")
except alpaca2.StateError as e:
    print("StateError", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""
    r = run_python(code)
    assert r.stdout.startswith("StateError"), r.stderr
    assert int(r.stdout.split()[1]) < 1024 * 1024            # KiB: well under 1 GiB


def test_the_audits_21_byte_state_file_is_refused(tmp_path):
    path = tmp_path / "bad.kv"
    path.write_bytes(struct.pack("<III", 0x6767736E, 10, 0) + b"\xff\xff\xff\xff12345")
    with pytest.raises(StateError, match="9 bytes, too short"):
        check_state_file(path)


@pytest.mark.parametrize("header,message", [
    (struct.pack("<III", 0x6767736F, 10, 0), "magic"),
    (struct.pack("<III", 0x6767736E, 9, 0), "version 9"),
    (struct.pack("<III", 0x6767736E, 10, 1000), "1000 tokens, more than this context's n_ctx 256"),
    (struct.pack("<IIIi", 0x6767736E, 10, 1, 900), "token 900 is outside"),
    (struct.pack("<IIIi", 0x6767736E, 10, 1, -1), "token -1 is outside"),
    (b"ggs", "3 bytes, too short"),
])
def test_state_file_headers_are_checked(tmp_path, header, message):
    path = tmp_path / "h.kv"
    body = struct.pack("<I", 5) + b"llama" + struct.pack("<II", 1, 0) if len(header) >= 12 else b""
    path.write_bytes(header + body)
    with pytest.raises(StateError, match=message):
        check_state_file(path, {"n_ctx": 256, "n_vocab": 800, "arch": "llama"})


def test_a_fifo_or_device_is_refused_without_opening_it(tmp_path):
    fifo = tmp_path / "state.fifo"
    os.mkfifo(fifo)
    # in a subprocess: an open() of the FIFO would block it forever (the timeout then fails the test)
    code = f"""
import alpaca2
from alpaca2._state_check import check_state_file
for p in [{str(fifo)!r}, "/dev/zero", {str(tmp_path)!r}]:
    try:
        check_state_file(p)
    except alpaca2.StateError as e:
        print("StateError:", e)
"""
    r = run_python(code, timeout=60)
    lines = r.stdout.splitlines()
    assert len(lines) == 3, (r.stdout, r.stderr)
    assert "FIFO" in lines[0] and "character device" in lines[1] and "directory" in lines[2]


# -- a seeded loop of truncated and mutated states ------------------------------------------------

def fields(data):
    """(offset, format, name) of every structural field of a single-cache llama state."""
    out = []
    pos = 0
    (n,) = struct.unpack_from("<I", data, pos)
    out.append((pos, "<I", "arch length"))
    pos += 4 + n
    out.append((pos, "<I", "n_stream"))
    n_stream = struct.unpack_from("<I", data, pos)[0]
    pos += 4
    for _ in range(n_stream):
        out.append((pos, "<I", "cell_count"))
        (cells,) = struct.unpack_from("<I", data, pos)
        pos += 4
        if not cells:
            continue
        for i in range(cells):
            out.append((pos, "<i", f"pos of cell {i}"))
            n_seq = struct.unpack_from("<I", data, pos + 4)[0]
            out.append((pos + 4, "<I", f"n_seq_id of cell {i}"))
            for j in range(n_seq):
                out.append((pos + 8 + 4 * j, "<i", f"seq id {j} of cell {i}"))
            pos += 8 + 4 * n_seq
        v_trans, n_layer = struct.unpack_from("<II", data, pos)
        out += [(pos, "<I", "v_trans"), (pos + 4, "<I", "n_layer")]
        pos += 8
        for il in range(n_layer):
            out += [(pos, "<i", f"k type {il}"), (pos + 4, "<Q", f"k row {il}")]
            row = struct.unpack_from("<Q", data, pos + 4)[0]
            pos += 12 + row * cells
        for il in range(n_layer):
            if not v_trans:
                out += [(pos, "<i", f"v type {il}"), (pos + 4, "<Q", f"v row {il}")]
                row = struct.unpack_from("<Q", data, pos + 4)[0]
                pos += 12 + row * cells
            else:
                out += [(pos, "<i", f"v type {il}"), (pos + 4, "<I", f"v elem {il}"),
                        (pos + 8, "<I", f"v width {il}")]
                elem, width = struct.unpack_from("<II", data, pos + 4)
                pos += 12 + elem * width * cells
    assert pos == len(data)
    return out


def bad_values(fmt, value, name, expect):
    """Values of a field that make the state invalid for a context with these expectations."""
    n_ctx, n_seq_max = expect["n_ctx"], expect["n_seq_max"]
    big = [2 ** 32 - 1, 2 ** 31, 2 ** 31 - 1, 2 ** 24, 65536] if fmt != "<Q" else [2 ** 64 - 1, 2 ** 63, 2 ** 40, 2 ** 32]
    if name == "arch length":
        return [0, 4, 6, 1000] + big
    if name == "n_stream":
        return [0, 2 if n_seq_max != 2 else 3, 257] + big
    if name == "cell_count":
        return [value + 1, value - 1 if value else 1, n_ctx + 1] + big
    if name.startswith("pos"):
        return [-1, -2 ** 31, n_ctx, n_ctx + 5]
    if name.startswith("n_seq_id"):
        return [0 if n_seq_max == 1 else n_seq_max + 1, n_seq_max + 1, 300] + big
    if name.startswith("seq id"):
        return [-1, n_seq_max, 1000]
    if name == "v_trans":
        return [1 - value, 2, 255]
    if name == "n_layer":
        return [0, 1, 3, 513] + big
    if name.startswith(("k type", "v type")):
        other = 0 if value == 1 else 1
        return [other, 4, 5, 8, 99, -1]
    if name.startswith(("k row", "v row")):
        return [0, value - 1, value + 1, value * 2, value // 2] + big
    if name.startswith(("v elem", "v width")):
        return [0, value - 1, value + 1, value * 2] + big
    raise AssertionError(name)


N_MUTATIONS = int(os.environ.get("ALPACA2_STATE_MUTATIONS", "400"))


def test_truncated_and_mutated_states_are_refused(saved):
    ctx, expect, data, _ = saved
    rng = random.Random(sum(map(ord, repr(expect))))
    fs = fields(data)
    offsets = sorted({f[0] for f in fs} | {len(data) - 1})
    cuts = set()
    for off in offsets:
        cuts.update((off - 1, off, off + 1, off + 4))
    cuts.update(rng.randrange(1, len(data)) for _ in range(50))
    refused = 0
    for cut in sorted(c for c in cuts if 0 <= c < len(data)):
        with pytest.raises(StateError):
            check_state(data[:cut], expect)
        refused += 1
    # longer: a trailing byte, or a second copy
    for tail in (b"\0", data[4:12], data):
        with pytest.raises(StateError):
            check_state(data + tail, expect)
    for _ in range(N_MUTATIONS):
        off, fmt, name = rng.choice(fs)
        (value,) = struct.unpack_from(fmt, data, off)
        new = rng.choice([v for v in bad_values(fmt, value, name, expect) if v != value])
        size = struct.calcsize(fmt)
        lo, hi = (-2 ** (8 * size - 1), 2 ** (8 * size - 1) - 1) if fmt[1].islower() else (0, 2 ** (8 * size) - 1)
        new = min(max(new, lo), hi)
        if new == value:
            continue
        mutated = bytearray(data)
        struct.pack_into(fmt, mutated, off, new)
        with pytest.raises(StateError):
            check_state(bytes(mutated), expect)
            pytest.fail(f"{name} = {new} (was {value}) was accepted")
        refused += 1
    assert refused > N_MUTATIONS // 2


def test_what_the_check_accepts_llama_cpp_loads(saved):
    # K/V data bytes are not checked (any bytes are values): flipped ones pass and load
    ctx, expect, data, _ = saved
    rng = random.Random(7)
    fs = fields(data)
    structural = set()
    for off, fmt, _ in fs:
        structural.update(range(off, off + struct.calcsize(fmt)))
    structural.update(range(0, 4 + 5))
    for _ in range(20):
        mutated = bytearray(data)
        for _ in range(8):
            off = rng.randrange(len(data))
            if off not in structural:
                mutated[off] ^= 1 << rng.randrange(8)
        check_state(bytes(mutated), expect)
        ctx.load_state(bytes(mutated))


def test_the_check_copies_nothing_and_reads_only_metadata(model, tmp_path):
    # a 100 MB state file: the check reads its metadata (pread), never the K/V data
    with make_ctx(model, 256, 1, "f32", True) as ctx:          # flash_attn: V in rows, as K
        ctx.decode(list(range(3, 103)))
        data = ctx.save_state()
        expect = expect_for(ctx, "f32", True)
    # the same layout with rows 2048x wider (as a large model's): 100 cells x 2 layers x 2 x 256 KiB
    fs = fields(data)
    path = tmp_path / "big.kv"
    head = struct.pack("<III", 0x6767736E, 10, 0)
    width = 256 * 1024
    with open(path, "wb") as f:
        f.write(head)
        pos = 0
        for off, fmt, name in fs:
            if name.startswith(("k row", "v row")):
                f.write(data[pos:off] + struct.pack("<Q", width))
                f.write(b"\0" * (width * 100))
                row = struct.unpack_from("<Q", data, off)[0]
                pos = off + 8 + row * 100
        f.write(data[pos:])
    assert os.path.getsize(path) > 100 * 10 ** 6
    expect = dict(expect, n_embd_k_gqa=None, n_embd_v_gqa=None)
    code = f"""
import resource, alpaca2
from alpaca2._state_check import check_state_file
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
info = check_state_file({str(path)!r}, {expect!r})
print(info["n_cells"], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""
    r = run_python(code)
    n_cells, grown_kib = map(int, r.stdout.split())
    assert n_cells == 100
    assert grown_kib < 20 * 1024, grown_kib                     # not the file's 100 MB
