"""Validation of saved context states before llama.cpp reads them (issue 14).

llama.cpp trusts a state's length fields: its first field, the length of the model architecture's
name, is used to allocate and zero a buffer before anything is compared, so a 9-byte state (or a
21-byte .kv file) costs 4 GiB.  This module walks a state with every count and length checked
against the bytes that are there and against what the context can hold, and raises StateError
saying what is wrong, reading only the small metadata (the K/V rows are skipped over, never copied).

The layout, as written by this llama.cpp (src/llama-context.cpp state_write_data, src/llama-kv-cache.cpp
state_write/state_write_meta/state_write_data; all little-endian):

    u32 len, len bytes    the model architecture ("llama")
    per KV cache (one; two for sliding-window models: the full-attention cache, then the SWA one)
      u32 n_stream        1, or n_seq_max for a context with kv_unified=False
      per stream
        u32 cell_count    used cells (tokens in the cache); 0 ends the stream
        per cell          i32 pos, u32 n_seq_id, [12-byte ext for M-RoPE/PLE models], i32 seq_id * n_seq_id
        u32 v_trans, u32 n_layer
        per layer         i32 k_type, u64 k_row_size, k_row_size * cell_count bytes
        v_trans == 0:     per layer: i32 v_type, u64 v_row_size, v_row_size * cell_count bytes
        v_trans == 1:     per layer: i32 v_type, u32 v_elem_size, u32 n_embd_v_gqa,
                          n_embd_v_gqa * cell_count * v_elem_size bytes

A recurrent model (Mamba, RWKV) keeps, instead of a KV cache, one conv state (R) and one SSM/WKV
state (S) per sequence (src/llama-memory-recurrent.cpp state_write/state_write_meta/state_write_data):

    u32 cell_count        used states, at most max(1, n_seq_max)
    per cell              i32 pos, u32 n_seq_id, i32 seq_id * n_seq_id
    u32 s_trans (0), u32 n_layer (all the model's layers)
    per recurrent layer   i32 r_type, u64 r_row_size, r_row_size * cell_count bytes
    per recurrent layer   i32 s_type, u64 s_row_size, s_row_size * cell_count bytes

A hybrid model (Granite hybrid, Jamba, Falcon-H1, Qwen3-Next ..., src/llama-memory-hybrid.cpp)
writes its attention layers' KV cache (one, as above) and then the recurrent part.

The state holds no logits: after a load, a decode must come before sampling (check_state reports
has_logits False and n_outputs 0).  A state file (llama_state_save_file) is

    u32 magic 'ggsn', u32 version 10, u32 n_token_count, i32 token * n_token_count, then the state.
"""
from __future__ import annotations

import os
import struct

import numpy as np

from alpaca2._files import open_regular_file, write_atomically
from alpaca2._gguf_check import GGML_TYPES
from alpaca2.errors import StateError

LLAMA_SESSION_MAGIC = 0x6767736E        # 'ggsn'
LLAMA_SESSION_VERSION = 10
LLAMA_MAX_SEQ = 256                     # llama_max_parallel_sequences()
CELL_EXT_SIZE = 12                      # llama_kv_cell_ext: i32 x, i32 y, i32 tok
MAX_ARCH_NAME = 64                      # llama.cpp's architecture names are short
MAX_KV_CACHES = 2                       # llama_kv_cache_iswa: base + SWA

# the KV cache types a Context takes (type_k / type_v), as ggml type ids
CACHE_TYPE_IDS = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8,
                  "iq4_nl": 20, "bf16": 30}
_CACHE_TYPE_NAMES = {v: k for k, v in CACHE_TYPE_IDS.items()}

_U32 = struct.Struct("<I")
_I32 = struct.Struct("<i")
_U64 = struct.Struct("<Q")

# metadata keys of models whose memory is not (only) a KV cache: recurrent (Mamba, RWKV) and
# hybrid models, and MLA models whose cache may lack V.  Their states get the header check only,
# unless their architecture is one of the two below.
_OTHER_MEMORY_KEYS = (".ssm.", ".wkv.", ".shortconv.", ".attention.kv_lora_rank",
                      ".time_mix_extra_dim", ".token_shift_count")
# llm_arch_is_recurrent(): a llama_memory_recurrent alone
RECURRENT_ARCHS = {"mamba", "mamba2", "rwkv6", "rwkv6qwen2", "rwkv7", "arwkv7"}
# llm_arch_is_hybrid() archs that llama_model::create_memory gives a plain llama_memory_hybrid
# (one KV cache, then the recurrent part) when they have no sliding window; the others
# (hybrid-iswa, hybrid-idx, their own cache types) keep the header check
HYBRID_ARCHS = {"jamba", "falcon-h1", "plamo2", "granitehybrid", "lfm2", "lfm2moe", "nemotron_h",
                "nemotron_h_moe", "qwen3next", "kimi-linear", "bailingmoe3", "kimi-k3", "qwen35",
                "qwen35moe", "minimax-01"}
# the Mamba-family archs whose recurrent row sizes follow from the ssm.* keys (n_embd_r, n_embd_s
# of src/llama-hparams.cpp), and the hybrids whose every layer is attention or Mamba, not both
_SSM_ARCHS = {"mamba", "mamba2", "granitehybrid", "jamba"}
_SPLIT_ARCHS = {"granitehybrid", "jamba"}
RS_TYPES = (0,)                         # create_memory makes the R and S states f32


def _int(meta, key):
    """A scalar integer metadata value (Model.metadata renders values as strings), else None."""
    try:
        return int(meta[key])
    except (KeyError, TypeError, ValueError):
        return None


def expectations(ctx, **overrides) -> dict:
    """What a state loaded into ctx must agree with, from the Context's and its Model's public
    properties and metadata.  Keys whose value is None are not checked; overrides replace any key
    (e.g. type_k="f16" where the Context does not say).

    arch, n_ctx, n_seq_max, n_stream, n_layer, n_layer_kv, n_vocab, n_embd_k_gqa, n_embd_v_gqa, type_k, type_v,
    v_trans, memory ("kv", "recurrent", "hybrid": checked field by field; "other": the header only),
    n_layer_rs, n_embd_r, n_embd_s, layers_split (the recurrent part's layers and row sizes)
    """
    model = ctx.model
    meta = model.metadata
    arch = meta.get("general.architecture")
    n_layer, n_head, n_head_kv, n_embd = model.n_layer, model.n_head, model.n_head_kv, model.n_embd
    # per-layer head counts (arrays) or per-layer head sizes make the row size vary by layer
    n_head_kv_meta = meta.get(f"{arch}.attention.head_count_kv", str(n_head_kv))
    uniform = (_int(meta, f"{arch}.attention.head_count_kv") is not None
               or n_head_kv_meta == str(n_head_kv)) and n_head > 0 and not any(
        f"{arch}.{key}" in meta for key in ("attention.key_length_swa", "attention.value_length_swa"))
    key_length = _int(meta, f"{arch}.attention.key_length")
    value_length = _int(meta, f"{arch}.attention.value_length")
    head_dim = n_embd // n_head if n_head else None
    kv_unified = getattr(ctx, "kv_unified", None)
    flash_attn = getattr(ctx, "flash_attn", None)
    out = {
        "arch": arch,
        "n_ctx": ctx.n_ctx,
        "n_seq_max": ctx.n_seq_max,
        "n_stream": None if kv_unified is None else (1 if kv_unified else ctx.n_seq_max),
        "n_layer": n_layer,
        # layers with a KV cache: all, except on models that share KV between layers (Gemma 3n)
        "n_layer_kv": None if f"{arch}.attention.shared_kv_layers" in meta else n_layer,
        "n_vocab": model.n_vocab,
        "n_embd_k_gqa": (key_length or head_dim) * n_head_kv if uniform and (key_length or head_dim) else None,
        "n_embd_v_gqa": (value_length or head_dim) * n_head_kv if uniform and (value_length or head_dim) else None,
        "type_k": getattr(ctx, "type_k", None),
        "type_v": getattr(ctx, "type_v", None),
        "v_trans": None if flash_attn not in (True, False) else not flash_attn,
        "memory": "other" if any(part in key for key in meta for part in _OTHER_MEMORY_KEYS) else "kv",
    }
    out.update(_memory_expectations(meta, arch, n_layer, out["memory"]))
    if out["memory"] == "hybrid":
        # the attention layers are those with n_head_kv > 0, a metadata array that Model.metadata
        # does not show: their count and KV width are left to the walk and to llama.cpp
        out.update(n_layer_kv=None, n_embd_k_gqa=None, n_embd_v_gqa=None)
    unknown = set(overrides) - set(out)
    if unknown:
        raise TypeError(f"unknown expectation(s): {sorted(unknown)}")
    out.update(overrides)
    return out


def _memory_expectations(meta, arch, n_layer, memory):
    """memory ("kv", "recurrent", "hybrid" or "other") and what the recurrent part must hold:
    n_layer_rs (layers with a recurrent state), n_embd_r and n_embd_s (f32 elements per state
    row), layers_split (every layer is either attention or recurrent).  None: not checked."""
    out = {"memory": memory, "n_layer_rs": None, "n_embd_r": None, "n_embd_s": None,
           "layers_split": arch in _SPLIT_ARCHS}
    if arch in RECURRENT_ARCHS:
        out["memory"] = "recurrent"
        out["n_layer_rs"] = n_layer
    elif arch in HYBRID_ARCHS:
        # with a sliding window llama.cpp makes a hybrid-iswa memory: two KV caches, unchecked
        out["memory"] = "other" if f"{arch}.attention.sliding_window" in meta else "hybrid"
    if out["memory"] in ("recurrent", "hybrid") and arch in _SSM_ARCHS:
        d_conv = _int(meta, f"{arch}.ssm.conv_kernel")
        d_inner = _int(meta, f"{arch}.ssm.inner_size")
        d_state = _int(meta, f"{arch}.ssm.state_size")
        n_group = _int(meta, f"{arch}.ssm.group_count") or 0
        if None not in (d_conv, d_inner, d_state):
            out["n_embd_r"] = max(d_conv - 1, 0) * (d_inner + 2 * n_group * d_state)
            out["n_embd_s"] = d_state * d_inner
    return out


def _row_size(type_id, n):
    _, block, size = GGML_TYPES[type_id]
    return n // block * size if n % block == 0 else None


class _Walker:
    """Reads fields of a state lying in a buffer (or a file) from offset base to base + size,
    each one checked against the bytes left; skip() moves over the K/V data without reading it."""

    def __init__(self, buf, base, size, what, pread=None):
        self.buf, self.base, self.size, self.what, self.pread = buf, base, size, what, pread
        self.pos = 0

    def fail(self, message):
        raise StateError(f"{self.what}: {message}")

    def left(self):
        return self.size - self.pos

    def need(self, n, field):
        if n > self.size - self.pos:
            self.fail(f"the state is {self.size} bytes, too short for {field} ({n} bytes at offset "
                      f"{self.pos}, {self.size - self.pos} left): truncated or not a state")

    def take(self, n, field):
        self.need(n, field)
        start = self.base + self.pos
        self.pos += n
        if self.pread is not None:
            data = self.pread(n, start)
            if len(data) != n:
                self.fail(f"the file changed while it was checked (short read at {start})")
            return data
        return self.buf[start:start + n]

    def u32(self, field):
        return _U32.unpack(self.take(4, field))[0]

    def i32(self, field):
        return _I32.unpack(self.take(4, field))[0]

    def u64(self, field):
        return _U64.unpack(self.take(8, field))[0]

    def skip(self, n, field):
        self.need(n, field)
        self.pos += n


def _check_cells(w, cell_count, ext, expect, info, where):
    """The per-cell metadata: positions >= 0, 1..n_seq_max sequence ids each, all in range.

    In a sequence's state (info["single"]) each cell has exactly one id, which llama.cpp discards
    (the cells go to the destination sequence), and no position comes twice."""
    n_seq_max = expect.get("n_seq_max") or LLAMA_MAX_SEQ
    base = 8 + (CELL_EXT_SIZE if ext else 0)
    w.need(cell_count * (base + 4), f"the metadata of {cell_count} cells{where}")
    start = w.pos
    # the common case, one sequence per cell: a fixed stride, checked by numpy in one go
    stride = (base + 4) // 4
    rec = np.frombuffer(w.take(cell_count * stride * 4, "cells"), dtype="<i4").reshape(cell_count, stride)
    if (rec[:, 1] == 1).all():
        pos, seq = rec[:, 0], rec[:, stride - 1]
    else:
        w.pos = start
        pos_list, seq_list = [], []
        for i in range(cell_count):
            pos_list.append(w.i32(f"the position of cell {i}{where}"))
            n_seq_id = w.u32(f"the sequence count of cell {i}{where}")
            if n_seq_id == 0:
                w.fail(f"cell {i}{where} belongs to no sequence (a saved cell has one at least)")
            if n_seq_id > n_seq_max:
                w.fail(f"cell {i}{where} belongs to {n_seq_id} sequences, more than this context's "
                       f"n_seq_max {n_seq_max}")
            if ext:
                w.skip(CELL_EXT_SIZE, f"the position extension of cell {i}{where}")
            ids = w.take(4 * n_seq_id, f"the sequence ids of cell {i}{where}")
            ids = np.frombuffer(ids, dtype="<i4")
            seq_list.append(ids)
            if len(ids) == 0:
                seq_list[-1] = np.zeros(0, dtype="<i4")
        pos = np.asarray(pos_list, dtype=np.int64)
        seq = np.concatenate(seq_list) if seq_list else np.zeros(0, dtype="<i4")
    if info.get("single"):
        if len(seq) != cell_count:
            w.fail(f"a cell{where} of a sequence's state belongs to several sequences")
        if len(np.unique(pos)) != len(pos):
            w.fail(f"a position comes twice in a sequence's state{where}")
        seq = np.zeros(0, dtype="<i4")          # discarded by llama.cpp: any id will do
    if len(pos) and pos.min() < 0:
        i = int(np.argmax(pos < 0))
        w.fail(f"cell {i}{where} has position {int(pos[i])}, below 0")
    if len(seq) and (seq.min() < 0 or seq.max() >= n_seq_max):
        bad = int(seq[(seq < 0) | (seq >= n_seq_max)][0])
        w.fail(f"a cell{where} belongs to sequence {bad}, outside this context's 0..{n_seq_max - 1} "
               f"(saved from a context with more sequences?)")
    n_ctx = expect.get("n_ctx")
    if len(pos) and n_ctx is not None and pos.max() >= n_ctx:
        w.fail(f"the state was saved from a context with a larger n_ctx (it holds position "
               f"{int(pos.max())}{where}), this one has n_ctx {n_ctx}")
    if len(pos):
        info["max_pos"] = max(info["max_pos"], int(pos.max()))
    if len(seq):                    # ids are in 0..n_seq_max-1 here (np.unique's first call is slow)
        info["seq_ids"].update(np.flatnonzero(np.bincount(seq, minlength=n_seq_max)).tolist())


def _check_layers(w, cell_count, n_layer, expect, info, where):
    """K then V of n_layer layers: types, row sizes and the data lengths they imply."""
    want_k = expect.get("type_k")
    want_v = expect.get("type_v")
    for part, want, n_embd in (("K", want_k, expect.get("n_embd_k_gqa")),
                               ("V", want_v, expect.get("n_embd_v_gqa"))):
        v_trans = part == "V" and info["v_trans"]
        for il in range(n_layer):
            layer = f"layer {il}{where}"
            type_id = w.i32(f"the {part} type of {layer}")
            if type_id not in GGML_TYPES:
                w.fail(f"the {part} cache of {layer} has type {type_id}, not a ggml type")
            name = GGML_TYPES[type_id][0]
            if want is not None and CACHE_TYPE_IDS.get(want, type_id) != type_id:
                w.fail(f"the state's {part} cache is {name}, this context's is {want} "
                       f"(type_{part.lower()}): save and load with the same cache types")
            info["type_k" if part == "K" else "type_v"] = _CACHE_TYPE_NAMES.get(type_id, name)
            if not v_trans:
                row = w.u64(f"the {part} row size of {layer}")
                if n_embd is not None:
                    want_row = _row_size(type_id, n_embd)
                    if want_row is not None and row != want_row:
                        w.fail(f"the {part} rows of {layer} are {row} bytes, this model's are "
                               f"{want_row} ({n_embd} x {name}): a state of another model")
                if row == 0:
                    w.fail(f"the {part} rows of {layer} are 0 bytes")
                w.skip(row * cell_count, f"the {part} data of {layer} ({cell_count} rows of {row} bytes)")
            else:
                elem = w.u32(f"the V element size of {layer}")
                if elem != GGML_TYPES[type_id][2] or GGML_TYPES[type_id][1] != 1:
                    w.fail(f"the V cache of {layer} has element size {elem}, but {name} "
                           f"{'is a block type, which a transposed V cache cannot hold' if GGML_TYPES[type_id][1] != 1 else f'elements are {GGML_TYPES[type_id][2]} bytes'}")
                n_embd_v = w.u32(f"the V width of {layer}")
                if n_embd is not None and n_embd_v != n_embd:
                    w.fail(f"the V cache of {layer} is {n_embd_v} wide, this model's is {n_embd}: "
                           "a state of another model")
                if n_embd_v == 0:
                    w.fail(f"the V cache of {layer} is 0 wide")
                w.skip(n_embd_v * cell_count * elem, f"the V data of {layer} ({n_embd_v} x {cell_count} "
                       f"elements of {elem} bytes)")


def _check_kv_cache(w, expect, info, cache_index, ext):
    where = "" if cache_index == 0 else f" of KV cache {cache_index + 1}"
    n_ctx = expect.get("n_ctx")
    n_seq_max = expect.get("n_seq_max")
    n_stream = w.u32(f"the stream count{where}")
    if not 1 <= n_stream <= LLAMA_MAX_SEQ:
        w.fail(f"the state has {n_stream} KV streams{where}; llama.cpp has 1 to {LLAMA_MAX_SEQ}")
    want = expect.get("n_stream")
    if want is not None and n_stream != want:
        w.fail(f"the state has {n_stream} KV streams, this context has {want} (n_seq_max {n_seq_max}, "
               "kv_unified): save and load with the same n_seq_max and kv_unified")
    if n_seq_max is not None and n_stream not in (1, n_seq_max):
        w.fail(f"the state has {n_stream} KV streams, but this context has n_seq_max {n_seq_max}: "
               "saved from a context with another n_seq_max")
    info["n_streams"] = n_stream
    cache_layers = 0
    for s in range(n_stream):
        at = where + (f", stream {s}" if n_stream > 1 else "")
        cell_count = w.u32(f"the cell count{at}")
        if n_ctx is not None:
            room = n_ctx if n_stream == 1 else n_ctx // n_stream
            if cell_count > room:
                w.fail(f"the state holds {cell_count} tokens{at}, this context has room for {room} "
                       f"(n_ctx {n_ctx}{f', {n_stream} streams' if n_stream > 1 else ''}): load it "
                       "into a context with a larger n_ctx")
        if cell_count == 0:
            continue
        _check_cells(w, cell_count, ext, expect, info, at)
        if cache_index == 0:
            info["n_cells"] += cell_count
        v_trans = w.u32(f"the V layout{at}")
        if v_trans not in (0, 1):
            w.fail(f"the V layout flag{at} is {v_trans}, not 0 or 1")
        if expect.get("v_trans") is not None and bool(v_trans) != expect["v_trans"]:
            saved = "transposed (saved with flash_attn off)" if v_trans else "in rows (saved with flash_attn on)"
            w.fail(f"the state's V cache is {saved}, this context's is "
                   f"{'transposed' if expect['v_trans'] else 'in rows'}: use the same flash_attn")
        info["v_trans"] = bool(v_trans)
        n_layer = w.u32(f"the layer count{at}")
        want_layers = expect.get("n_layer")
        if n_layer == 0 or (want_layers is not None and n_layer > want_layers):
            w.fail(f"the state has {n_layer} layers{at}, this model has {want_layers}: a state of "
                   "another model")
        if cache_layers and n_layer != cache_layers:
            w.fail(f"the state's streams have {cache_layers} and {n_layer} layers{where}")
        cache_layers = n_layer
        _check_layers(w, cell_count, n_layer, expect, info, at)
    info["n_layer"] += cache_layers


def _walk(w, expect, single=False) -> dict:
    """A whole state (the architecture's name, then the KV caches) or, with single, one
    sequence's (the KV caches only, as llama_state_seq_* write them after their own header)."""
    if single:
        info = {"arch": None, "size": w.size, "n_cells": 0, "n_streams": 0, "n_layer": 0, "type_k": None,
                "type_v": None, "v_trans": None, "max_pos": -1, "seq_ids": set(), "kv_caches": 0,
                "n_outputs": 0, "has_logits": False, "checked": "header", "single": True}
        if expect.get("memory", "kv") != "kv":
            w.fail("the state of one sequence of a recurrent or hybrid model cannot be checked: "
                   "save and restore the whole context instead")
        return _walk_caches(w, expect, info)
    arch_len = w.u32("the length of the model architecture's name")
    if arch_len > MAX_ARCH_NAME or arch_len > w.left():
        w.need(arch_len, f"the model architecture's name of {arch_len} bytes")
        w.fail(f"the model architecture's name claims {arch_len} bytes: not a state")
    arch = bytes(w.take(arch_len, "the model architecture's name")).decode("utf-8", "replace")
    want = expect.get("arch")
    if want is not None and arch != want:
        w.fail(f"the state was saved from a '{arch}' model, this one is '{want}'")
    info = {"arch": arch, "size": w.size, "n_cells": 0, "n_streams": 0, "n_layer": 0, "type_k": None,
            "type_v": None, "v_trans": None, "max_pos": -1, "seq_ids": set(), "kv_caches": 0,
            "n_outputs": 0, "has_logits": False, "checked": "header"}
    memory = expect.get("memory", "kv")
    if memory in ("kv", "recurrent", "hybrid") and w.left() == 0:
        w.fail(f"the state ends after the model architecture's name ({w.size} bytes): its "
               f"{'KV cache' if memory != 'recurrent' else 'recurrent state'} is missing (truncated)")
    if memory == "recurrent":
        _check_recurrent(w, expect, info)
        if w.left():
            w.fail(f"{w.left()} bytes after the end of the state's recurrent part (a damaged or "
                   "concatenated state)")
        info["seq_ids"] = sorted(info["seq_ids"])
        info["checked"] = "all"
        return info
    if memory == "hybrid":
        return _walk_hybrid(w, expect, info)
    if memory != "kv":
        info["seq_ids"] = sorted(info["seq_ids"])
        return info
    return _walk_caches(w, expect, info)


def _walk_caches(w, expect, info) -> dict:
    start = w.pos
    first_error = None
    for ext in (False, True):           # cells carry a 12-byte extension on M-RoPE / PLE models
        w.pos = start
        trial = dict(info, seq_ids=set())
        try:
            while w.left() > 0:
                at = w.pos
                trailing = (f"{w.size - at} bytes after the end of the state's KV cache (a damaged "
                            "or concatenated state)")
                if trial["kv_caches"] == MAX_KV_CACHES:
                    w.fail(trailing)
                try:
                    _check_kv_cache(w, expect, trial, trial["kv_caches"], ext)
                except StateError:
                    if trial["kv_caches"] == 0:
                        raise
                    w.fail(trailing)            # not a second (sliding-window) cache either
                trial["kv_caches"] += 1
        except StateError as e:
            first_error = first_error or e
            continue
        want_layers = expect.get("n_layer_kv")
        if want_layers is not None and trial["n_layer"] not in (0, want_layers):
            first_error = first_error or StateError(
                f"{w.what}: the state's KV cache has {trial['n_layer']} layers, this model has "
                f"{want_layers}: a state of another model")
            continue
        trial["seq_ids"] = sorted(trial["seq_ids"])
        trial.pop("single", None)
        trial["checked"] = "all"
        trial["cell_ext"] = ext
        return trial
    raise first_error


def _check_recurrent(w, expect, info):
    """The recurrent part (llama_memory_recurrent::state_write): cells, then the R and S rows."""
    n_seq_max = expect.get("n_seq_max")
    n_ctx = expect.get("n_ctx")
    size = max(1, n_seq_max) if n_seq_max is not None else LLAMA_MAX_SEQ
    cell_count = w.u32("the recurrent state count")
    if cell_count > size:
        w.fail(f"the state holds {cell_count} recurrent states, this context has room for {size} "
               f"(one per sequence, n_seq_max {n_seq_max}): load it into a context with a larger "
               "n_seq_max")
    w.need(cell_count * 12, f"the metadata of {cell_count} recurrent states")
    owner = {}                                  # sequence -> the state that holds it
    for i in range(cell_count):
        pos = w.i32(f"the position of recurrent state {i}")
        n_seq_id = w.u32(f"the sequence count of recurrent state {i}")
        if n_seq_id == 0:
            w.fail(f"recurrent state {i} belongs to no sequence (a saved state has one at least)")
        if n_seq_id > size:
            w.fail(f"recurrent state {i} belongs to {n_seq_id} sequences, more than this context's "
                   f"n_seq_max {n_seq_max}")
        for j in range(n_seq_id):
            seq = w.i32(f"sequence id {j} of recurrent state {i}")
            if not 0 <= seq < size:
                w.fail(f"recurrent state {i} belongs to sequence {seq}, outside this context's "
                       f"0..{size - 1} (saved from a context with more sequences?)")
            if seq in owner:
                w.fail(f"sequence {seq} has two recurrent states ({owner[seq]} and {i}): a damaged state")
            owner[seq] = i
        if pos < 0:
            w.fail(f"recurrent state {i} has position {pos}, below 0")
        if n_ctx is not None and pos >= n_ctx:
            w.fail(f"the state was saved from a context with a larger n_ctx (it holds position "
                   f"{pos}), this one has n_ctx {n_ctx}")
        info["max_pos"] = max(info["max_pos"], pos)
    info["seq_ids"].update(owner)
    info["n_states"] = cell_count
    s_trans = w.u32("the S layout of the recurrent state")
    if s_trans != 0:
        w.fail(f"the recurrent state's S layout flag is {s_trans}; llama.cpp writes and reads 0 only")
    n_layer = w.u32("the layer count of the recurrent state")
    want_layers = expect.get("n_layer")
    if n_layer == 0 or (want_layers is not None and n_layer != want_layers):
        w.fail(f"the state's recurrent part has {n_layer} layers, this model has {want_layers}: a "
               "state of another model")
    # R rows of the recurrent layers, then their S rows: each entry i32 type, u64 row size, data.
    # How many layers are recurrent is known for pure recurrent models (all); for hybrids it is
    # in a metadata array this check does not see, so the entries are read till the end and split.
    n_rs = expect.get("n_layer_rs")
    rows = []
    while w.left() > 0 and (n_rs is None or len(rows) < 2 * n_rs):
        what = f"recurrent state entry {len(rows)}"
        type_id = w.i32(f"the type of {what}")
        if type_id not in RS_TYPES:
            name = GGML_TYPES[type_id][0] if type_id in GGML_TYPES else f"{type_id}, not a ggml type"
            w.fail(f"{what} has type {name}; llama.cpp keeps recurrent states in f32")
        row = w.u64(f"the row size of {what}")
        if row % 4:
            w.fail(f"the rows of {what} are {row} bytes, not a whole number of f32")
        # the first entry is an R row; with the layer count known, every entry's part is known
        if n_rs is not None or not rows:
            _check_rs_row(w, expect, "R (conv)" if len(rows) < (n_rs or 1) else "S (SSM)",
                          len(rows) if len(rows) < (n_rs or 1) else len(rows) - n_rs, row)
        w.skip(row * cell_count, f"the data of {what} ({cell_count} rows of {row} bytes)")
        rows.append(row)
    k = len(rows)
    if n_rs is not None and k < 2 * n_rs:
        w.need(12, f"the R and S states of {n_rs} recurrent layers (the state has {k} of {2 * n_rs})")
    if k == 0 or k % 2 or k > 2 * n_layer:
        w.fail(f"the state's recurrent part has {k} R/S entries; {n_layer} layers have an even "
               f"number from 2 to {2 * n_layer}")
    for part, half in (("R (conv)", rows[:k // 2]), ("S (SSM)", rows[k // 2:])):
        for il, row in enumerate(half):
            _check_rs_row(w, expect, part, il, row)
    info["n_layer_rs"] = k // 2


def _check_rs_row(w, expect, part, il, row):
    want = expect.get("n_embd_r" if part.startswith("R") else "n_embd_s")
    if want is not None and row != want * 4:
        w.fail(f"the {part} rows of recurrent layer {il} are {row} bytes, this model's are "
               f"{want * 4} ({want} x f32): a state of another model")


def _walk_hybrid(w, expect, info):
    """A hybrid model's state: the attention layers' KV cache, then the recurrent part."""
    start = w.pos
    first_error = None
    for ext in (False, True):           # cells carry a 12-byte extension on M-RoPE models
        w.pos = start
        trial = dict(info, seq_ids=set())
        try:
            _check_kv_cache(w, expect, trial, 0, ext)
            want_layers = expect.get("n_layer_kv")
            if want_layers is not None and trial["n_layer"] not in (0, want_layers):
                w.fail(f"the state's KV cache has {trial['n_layer']} layers, this model has "
                       f"{want_layers} attention layers: a state of another model")
            trial["kv_caches"] = 1
            kv_seqs = set(trial["seq_ids"])
            trial["seq_ids"] = set()
            _check_recurrent(w, expect, trial)
            n_layer = expect.get("n_layer")
            if expect.get("layers_split") and n_layer is not None and trial["n_layer"] and \
                    trial["n_layer"] + trial["n_layer_rs"] != n_layer:
                w.fail(f"the state has {trial['n_layer']} attention and {trial['n_layer_rs']} "
                       f"recurrent layers, this model has {n_layer} layers in all: a state of another model")
            if w.left():
                w.fail(f"{w.left()} bytes after the end of the state's recurrent part (a damaged "
                       "or concatenated state)")
        except StateError as e:
            first_error = first_error or e
            continue
        trial["seq_ids"] = sorted(kv_seqs | trial["seq_ids"])
        trial["checked"] = "all"
        trial["cell_ext"] = ext
        return trial
    raise first_error


def check_state(data, expect=None) -> dict:
    """Raise StateError unless data (bytes-like, e.g. from Context.save_state) is a whole state
    that a context with the expectations can load.  Reads only the metadata, without a copy.

    expect: a dict from expectations(ctx) (None: the state's own consistency only).
    Returns {arch, size, n_cells, n_streams, n_layer, type_k, type_v, v_trans, max_pos, seq_ids,
    kv_caches, n_outputs, has_logits, checked}: has_logits is always False (this llama.cpp saves
    no logits, so a decode must follow a load before sampling).
    """
    # not released explicitly: numpy views of the metadata may still refer to it (a traceback)
    flat = memoryview(data)
    if flat.format != "B" or flat.ndim != 1:
        flat = flat.cast("B")
    return _walk(_Walker(flat, 0, flat.nbytes, "invalid state"), expect or {})


def check_state_file(path, expect=None) -> dict:
    """Raise StateError unless path is a regular file holding a state as llama_state_save_file
    writes it (Context.save_state_file) that a context with the expectations can load.

    Refuses a FIFO or device without opening it; reads the header, the tokens (checked against
    n_vocab and n_ctx) and the state's metadata with pread, never the K/V data.  Returns
    check_state's dict plus n_tokens.
    """
    expect = expect or {}
    path = os.fspath(path)
    shown = path if isinstance(path, str) else os.fsdecode(path)
    what = f"{shown} is not a valid state file"
    with open_regular_file(path, "state file", StateError) as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        w = _Walker(None, 0, size, what, pread=lambda n, at: os.pread(fd, n, at))
        if size < 12:
            w.fail(f"{size} bytes, too short for the 12-byte header (magic, version, token count)")
        magic, version, n_tokens = struct.unpack("<III", w.take(12, "the header"))
        if magic != LLAMA_SESSION_MAGIC:
            w.fail(f"magic {magic:#010x}, expected {LLAMA_SESSION_MAGIC:#010x} ('ggsn')")
        if version != LLAMA_SESSION_VERSION:
            w.fail(f"version {version}, this llama.cpp reads version {LLAMA_SESSION_VERSION}")
        n_ctx = expect.get("n_ctx")
        if n_ctx is not None and n_tokens > n_ctx:
            w.fail(f"it holds {n_tokens} tokens, more than this context's n_ctx {n_ctx}")
        tokens = np.frombuffer(w.take(4 * n_tokens, f"{n_tokens} tokens"), dtype="<i4")
        n_vocab = expect.get("n_vocab")
        if len(tokens) and (tokens.min() < 0 or (n_vocab is not None and tokens.max() >= n_vocab)):
            bad = int(tokens[(tokens < 0) | (tokens >= (n_vocab or 2 ** 31))][0])
            w.fail(f"token {bad} is outside this model's vocabulary (n_vocab {n_vocab})")
        state = _Walker(None, w.pos, size - w.pos, what, pread=w.pread)
        info = _walk(state, expect)
    info["n_tokens"] = n_tokens
    return info


# One sequence's state.  llama_state_seq_get_data writes u32 SEQ_IO_MAGIC, i32 the sequence id,
# then the KV caches as above (no architecture name); llama_state_seq_save_file writes
# u32 'ggsq', u32 version 3, u32 n_tokens, i32 tokens, then the KV caches (no magic, no id).
SEQ_IO_MAGIC = 0xAF143CD8
LLAMA_STATE_SEQ_MAGIC = 0x67677371      # 'ggsq'
LLAMA_STATE_SEQ_VERSION = 3


def check_seq_state(data, expect=None) -> dict:
    """Raise StateError unless data (from Context.save_seq_state) is one sequence's state that a
    context with the expectations can restore into any of its sequences.  Returns check_state's
    dict (seq_ids empty: the ids are replaced by the destination's)."""
    flat = memoryview(data)
    if flat.format != "B" or flat.ndim != 1:
        flat = flat.cast("B")
    w = _Walker(flat, 0, flat.nbytes, "invalid sequence state")
    if flat.nbytes < 8:
        w.fail(f"{flat.nbytes} bytes, too short for the 8-byte header (magic, sequence id)")
    magic = w.u32("the magic")
    if magic != SEQ_IO_MAGIC:
        w.fail(f"magic {magic:#010x}, expected {SEQ_IO_MAGIC:#010x} (a state of one sequence)")
    w.i32("the sequence id")
    return _walk(_Walker(flat, 8, flat.nbytes - 8, w.what), expect or {}, single=True)


def read_seq_state_file(path, expect=None, max_bytes=None):
    """Read a sequence state file (llama_state_seq_save_file's format, which llama-server's slot
    save writes) and check it; returns (tokens, blob) where blob goes to Context.load_seq_state.

    Refuses a FIFO or device without opening it.  llama-server's newer files hold a packed token
    list (-1, version, n, tokens); both that and a plain list are read."""
    expect = expect or {}
    path = os.fspath(path)
    shown = path if isinstance(path, str) else os.fsdecode(path)
    what = f"{shown} is not a valid sequence state file"
    with open_regular_file(path, "sequence state file", StateError) as f:
        size = os.fstat(f.fileno()).st_size
        w = _Walker(None, 0, size, what, pread=lambda n, at: os.pread(f.fileno(), n, at))
        if size < 12:
            w.fail(f"{size} bytes, too short for the 12-byte header (magic, version, token count)")
        if max_bytes is not None and size > max_bytes:
            w.fail(f"{size} bytes, more than a state of this context can be ({max_bytes})")
        magic, version, n_words = struct.unpack("<III", w.take(12, "the header"))
        if magic != LLAMA_STATE_SEQ_MAGIC:
            w.fail(f"magic {magic:#010x}, expected {LLAMA_STATE_SEQ_MAGIC:#010x} ('ggsq')")
        if version != LLAMA_STATE_SEQ_VERSION:
            w.fail(f"version {version}, this llama.cpp reads version {LLAMA_STATE_SEQ_VERSION}")
        words = np.frombuffer(w.take(4 * n_words, f"{n_words} token words"), dtype="<i4")
        payload = bytes(w.take(size - w.pos, "the state"))
    tokens = words
    if len(words) >= 3 and words[0] == -1:               # packed: LLAMA_TOKEN_NULL, version, n
        n = int(words[2])
        if n < 0 or 3 + n > len(words):
            raise StateError(f"{what}: its packed token list claims {n} tokens in {len(words) - 3} words")
        tokens = words[3:3 + n]
    n_ctx = expect.get("n_ctx")
    if n_ctx is not None and len(tokens) > n_ctx:
        raise StateError(f"{what}: it holds {len(tokens)} tokens, more than this context's n_ctx {n_ctx}")
    n_vocab = expect.get("n_vocab")
    if len(tokens) and (tokens.min() < 0 or (n_vocab is not None and tokens.max() >= n_vocab)):
        bad = int(tokens[(tokens < 0) | (tokens >= (n_vocab or 2 ** 31))][0])
        raise StateError(f"{what}: token {bad} is outside this model's vocabulary (n_vocab {n_vocab})")
    blob = struct.pack("<Ii", SEQ_IO_MAGIC, 0) + payload
    try:
        info = check_seq_state(blob, expect)
    except StateError as e:
        raise StateError(f"{what}: {str(e).split(': ', 1)[-1]}") from None
    return tokens.tolist(), blob, info


def write_seq_state_file(path, tokens, blob) -> int:
    """Write a sequence state file (llama_state_seq_save_file's format) atomically; returns its size.
    blob: Context.save_seq_state's bytes."""
    if len(blob) < 8 or struct.unpack_from("<I", blob)[0] != SEQ_IO_MAGIC:
        raise StateError("not a sequence state (Context.save_seq_state's bytes)")
    toks = np.asarray(tokens, dtype="<i4")
    data = struct.pack("<III", LLAMA_STATE_SEQ_MAGIC, LLAMA_STATE_SEQ_VERSION, len(toks)) + toks.tobytes() + \
        bytes(memoryview(blob)[8:])
    return write_atomically(path, data)
