"""A seeded mutation fuzzer for alpaca2's GGUF loading (issue 8).

It takes a valid tiny model, makes mutated copies (truncations at every section boundary and at
random offsets, flipped bytes in the header, key/value and tensor-info sections, huge counts and
lengths, wrong types, tensor offsets past the end, duplicate keys and tensor names, and re-typed
or out-of-range values of the keys llama.cpp reads: counts, enums, token ids, flags, floats,
arrays of other lengths, dropped keys, the expert keys together; the seed architecture's own
keys such as ssm.* sizes and per-layer head counts; tensors stored in another type) and loads each
in a worker process.  The seed is a llama model, or with --arch a Mamba, Mamba-2 or Granite-hybrid
one.  Every
case must end in ModelLoadError or a successful load: a signal, a hang past the timeout or any
other exception is a failure.  A worker runs many cases in a row (a Python start costs more than a
load); when one dies, the case it was on is the culprit and a fresh worker goes on.

    python tests/fuzz/gguf_fuzz.py --cases 5000 --seed 1          # a longer run
    python tests/fuzz/gguf_fuzz.py --cases 2000 --no-precheck     # what llama.cpp alone does
    python tests/fuzz/gguf_fuzz.py --save-failures DIR            # keep the files that failed
    python tests/fuzz/gguf_fuzz.py --arch hybrid --use --category arch_metadata --category retype
"""
from __future__ import annotations

import argparse
import collections
import os
import random
import selectors
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# gguf value types
U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
SCALAR_FMT = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<b",
              U64: "<Q", I64: "<q", F64: "<d"}
HUGE = [2 ** 64 - 1, 2 ** 63 - 1, 2 ** 63, 2 ** 62, 2 ** 40, 2 ** 32 + 1, 2 ** 32, 2 ** 32 - 1,
        2 ** 31, 2 ** 30 + 1, 2 ** 30, 2 ** 24, 65536, 0, 1]
PRECHECK_PREFIX = "is not a valid GGUF file"     # alpaca2._gguf_check's messages


# -- the layout of a valid file ------------------------------------------------------------------

class Layout:
    """Where each field of a valid GGUF file lies: what the mutations aim at."""

    def __init__(self, data: bytes):
        self.data = data
        pos = 24
        self.n_tensors, self.n_kv = struct.unpack_from("<qq", data, 8)
        self.kvs = []            # dict(start, end, key, type, ...field offsets)
        self.alignment = 32
        for _ in range(self.n_kv):
            kv = {"start": pos, "len_off": pos}
            (n,) = struct.unpack_from("<Q", data, pos)
            kv["key"] = data[pos + 8:pos + 8 + n].decode()
            pos += 8 + n
            kv["type_off"] = pos
            (vtype,) = struct.unpack_from("<i", data, pos)
            kv["type"] = vtype
            pos += 4
            kv["str_len_offs"] = []
            if vtype == ARR:
                kv["etype_off"] = pos
                etype, count = struct.unpack_from("<iQ", data, pos)
                kv["etype"], kv["count_off"], kv["count"] = etype, pos + 4, count
                pos += 12
                if etype == STR:
                    for _ in range(count):
                        kv["str_len_offs"].append(pos)
                        pos += 8 + struct.unpack_from("<Q", data, pos)[0]
                else:
                    pos += count * struct.calcsize(SCALAR_FMT[etype])
            elif vtype == STR:
                kv["str_len_offs"].append(pos)
                pos += 8 + struct.unpack_from("<Q", data, pos)[0]
            else:
                if kv["key"] == "general.alignment":
                    self.alignment = struct.unpack_from("<I", data, pos)[0]
                pos += struct.calcsize(SCALAR_FMT[vtype])
            kv["end"] = pos
            self.kvs.append(kv)
        self.kv_end = pos
        self.tensors = []
        for _ in range(self.n_tensors):
            t = {"start": pos, "len_off": pos}
            (n,) = struct.unpack_from("<Q", data, pos)
            t["name"] = data[pos + 8:pos + 8 + n].decode()
            pos += 8 + n
            t["ndims_off"] = pos
            (n_dims,) = struct.unpack_from("<I", data, pos)
            pos += 4
            t["ne_offs"] = [pos + 8 * j for j in range(n_dims)]
            t["ne"] = list(struct.unpack_from(f"<{n_dims}q", data, pos))
            pos += 8 * n_dims
            t["type_off"] = pos
            t["ggml_type"] = struct.unpack_from("<i", data, pos)[0]
            pos += 4
            t["offset_off"] = pos
            t["offset"] = struct.unpack_from("<Q", data, pos)[0]
            pos += 8
            t["end"] = pos
            self.tensors.append(t)
        self.ti_end = pos
        self.data_start = (pos + self.alignment - 1) // self.alignment * self.alignment

    def boundaries(self):
        """Offsets where one section or field ends and the next begins."""
        b = {4, 8, 16, 24, self.kv_end, self.ti_end, self.data_start, len(self.data) - 1}
        for kv in self.kvs:
            b.update((kv["start"], kv["start"] + 8, kv["type_off"], kv["type_off"] + 4, kv["end"]))
            b.update(kv["str_len_offs"][:2])
        for t in self.tensors:
            b.update((t["start"], t["ndims_off"], t["type_off"], t["offset_off"], t["end"],
                      self.data_start + t["offset"]))
        return sorted(x for x in b if 0 < x < len(self.data))

    def kv(self, key):
        return next(kv for kv in self.kvs if kv["key"] == key)

    def header_and_blob(self):
        """(kv records, tensor-info records, tensor data) as raw bytes, for rebuilding."""
        d = self.data
        return ([d[kv["start"]:kv["end"]] for kv in self.kvs],
                [d[t["start"]:t["end"]] for t in self.tensors], d[self.data_start:])


# -- encoding ------------------------------------------------------------------------------------

def gstr(s):
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def kv_record(key, vtype, value, etype=None):
    out = gstr(key) + struct.pack("<i", vtype)
    if vtype == ARR:
        out += struct.pack("<iQ", etype, len(value))
        for v in value:
            out += gstr(v) if etype == STR else struct.pack(SCALAR_FMT[etype], v)
    elif vtype == STR:
        out += gstr(value)
    else:
        out += struct.pack(SCALAR_FMT[vtype], value)
    return out


def build(kv_records, ti_records, blob, alignment=32, version=3):
    """A GGUF file from raw records (so records can be repeated, dropped or replaced)."""
    head = b"GGUF" + struct.pack("<Iqq", version, len(ti_records), len(kv_records))
    body = head + b"".join(kv_records) + b"".join(ti_records)
    if ti_records:
        body += b"\0" * (-len(body) % alignment)
    return body + blob


def put(data: bytes, off: int, fmt: str, value) -> bytes:
    b = bytearray(data)
    struct.pack_into(fmt, b, off, value)
    return bytes(b)


# -- mutations: each category yields (label, bytes) forever or until exhausted -------------------

def m_truncate_boundary(lay, rng):
    cuts = [c + d for c in lay.boundaries() for d in (-1, 0, 1)]
    cuts = sorted(set(c for c in cuts if 0 < c < len(lay.data)))
    rng.shuffle(cuts)
    for c in cuts:
        yield f"truncate at boundary {c}", lay.data[:c]


def m_truncate_random(lay, rng):
    while True:
        c = rng.randrange(1, len(lay.data))
        yield f"truncate at {c}", lay.data[:c]


def _flip(lay, rng, lo, hi, what):
    while True:
        b = bytearray(lay.data)
        n = rng.choice((1, 1, 2, 4, 8))
        offs = [rng.randrange(lo, hi) for _ in range(n)]
        for off in offs:
            b[off] = rng.randrange(256) if rng.random() < 0.5 else b[off] ^ (1 << rng.randrange(8))
        yield f"flip {what} bytes {offs}", bytes(b)


def m_flip_header(lay, rng):
    return _flip(lay, rng, 0, 24, "header")


def m_flip_kv(lay, rng):
    return _flip(lay, rng, 24, lay.kv_end, "key/value")


def m_flip_tensor_info(lay, rng):
    return _flip(lay, rng, lay.kv_end, lay.ti_end, "tensor-info")


def m_huge(lay, rng):
    """Huge or edge values in counts, string lengths, array lengths and dimensions."""
    fields = [("n_tensors", 8, "<Q"), ("n_kv", 16, "<Q")]
    for kv in lay.kvs:
        fields.append((f"key length of {kv['key']}", kv["len_off"], "<Q"))
        if "count_off" in kv:
            fields.append((f"array length of {kv['key']}", kv["count_off"], "<Q"))
        for j, off in enumerate(kv["str_len_offs"][:3]):
            fields.append((f"string {j} length of {kv['key']}", off, "<Q"))
    for t in lay.tensors:
        fields.append((f"name length of {t['name']}", t["len_off"], "<Q"))
        for j, off in enumerate(t["ne_offs"]):
            fields.append((f"ne[{j}] of {t['name']}", off, "<Q"))
    size = len(lay.data)
    while True:
        what, off, fmt = rng.choice(fields)
        value = rng.choice(HUGE + [size, size + 1, size - off, size - off - 7, rng.randrange(2 ** 64)])
        yield f"{what} = {value}", put(lay.data, off, fmt, value)


def m_wrong_type(lay, rng):
    while True:
        r = rng.random()
        if r < 0.35:
            kv = rng.choice(lay.kvs)
            value = rng.choice(list(range(14)) + [255, -1, 2 ** 31 - 1])
            yield f"type of {kv['key']} = {value}", put(lay.data, kv["type_off"], "<i", value)
        elif r < 0.5:
            kv = rng.choice([kv for kv in lay.kvs if kv["type"] == ARR])
            value = rng.choice(list(range(14)) + [-1])
            yield f"element type of {kv['key']} = {value}", put(lay.data, kv["etype_off"], "<i", value)
        elif r < 0.8:
            t = rng.choice(lay.tensors)
            value = rng.choice(list(range(45)) + [-1, 1000, 2 ** 31 - 1])
            yield f"ggml type of {t['name']} = {value}", put(lay.data, t["type_off"], "<i", value)
        else:
            t = rng.choice(lay.tensors)
            value = rng.choice([0, 1, 2, 3, 4, 5, 8, 2 ** 31, 2 ** 32 - 1])
            yield f"n_dims of {t['name']} = {value}", put(lay.data, t["ndims_off"], "<I", value)


def m_tensor_offset(lay, rng):
    size = len(lay.data)
    while True:
        t = rng.choice(lay.tensors)
        value = rng.choice([size, size - lay.data_start, size - lay.data_start - 4, 2 ** 64 - 1,
                            2 ** 64 - lay.data_start, 2 ** 63, t["offset"] + 1,
                            t["offset"] + lay.alignment, max(0, t["offset"] - lay.alignment), 0,
                            rng.randrange(2 ** 64)])
        yield f"offset of {t['name']} = {value}", put(lay.data, t["offset_off"], "<Q", value)


def m_duplicate(lay, rng):
    kvs, tis, blob = lay.header_and_blob()
    while True:
        r = rng.random()
        if r < 0.4:
            i = rng.randrange(len(kvs))
            j = rng.randrange(len(kvs) + 1)
            new = kvs[:j] + [kvs[i]] + kvs[j:]
            yield f"duplicate key {lay.kvs[i]['key']}", build(new, tis, blob, lay.alignment)
        elif r < 0.7:
            i = rng.randrange(len(tis))
            new = tis + [tis[i]]
            yield f"duplicate tensor {lay.tensors[i]['name']}", build(kvs, new, blob, lay.alignment)
        else:
            # two keys that differ only in their value: the first wins in some readers
            i = rng.randrange(len(kvs))
            key = lay.kvs[i]["key"]
            other = kv_record(key, STR, "x" * rng.randrange(0, 40))
            yield f"duplicate key {key} with another type", build(kvs + [other], tis, blob, lay.alignment)


# The keys llama.cpp's llama loader reads and values it might not expect.
SEMANTIC = [
    ("llama.block_count", [(U32, 0), (U32, 2 ** 31), (U32, 2 ** 32 - 1), (U32, 1000), (STR, "2"),
                           (ARR, [1, 2], I32), (U64, 2 ** 40), (F32, 1.5)]),
    ("llama.embedding_length", [(U32, 0), (U32, 1), (U32, 2 ** 31), (U32, 2 ** 32 - 1), (STR, "x")]),
    ("llama.feed_forward_length", [(U32, 0), (U32, 2 ** 32 - 1), (ARR, [64] * 100, U32),
                                   (ARR, [], U32)]),
    ("llama.attention.head_count", [(U32, 0), (U32, 3), (U32, 2 ** 32 - 1), (ARR, [2, 2], U32),
                                    (ARR, [0], U32), (ARR, [2] * 600, U32)]),
    ("llama.attention.head_count_kv", [(U32, 0), (U32, 3), (U32, 1000), (ARR, [1], U32),
                                       (ARR, [0] * 600, U32)]),
    ("llama.context_length", [(U32, 0), (U32, 1), (U32, 2 ** 32 - 1)]),
    ("llama.rope.dimension_count", [(U32, 0), (U32, 3), (U32, 2 ** 31), (U32, 2 ** 32 - 1)]),
    ("llama.rope.freq_base", [(F32, 0.0), (F32, -1.0), (F32, float("nan")), (F32, float("inf"))]),
    ("llama.attention.layer_norm_rms_epsilon", [(F32, float("nan")), (F32, -1.0), (STR, "e")]),
    ("general.alignment", [(U32, 0), (U32, 3), (U32, 1), (U32, 2 ** 31), (U64, 32), (I32, 32),
                           (STR, "32")]),
    ("general.architecture", [(STR, ""), (STR, "gpt9"), (STR, "llama\0x"), (U32, 1),
                              (ARR, ["llama"], STR)]),
    ("general.file_type", [(U32, 2 ** 32 - 1), (U32, 1000), (STR, "f32")]),
    ("tokenizer.ggml.model", [(STR, ""), (STR, "gpt2"), (STR, "bert"), (STR, "t5"), (STR, "rwkv"),
                              (STR, "plamo2"), (STR, "none"), (STR, "unknown-model"), (U32, 0)]),
    ("tokenizer.ggml.tokens", [(ARR, [], STR), (ARR, ["a"], STR), (ARR, [""] * 600, STR),
                               (ARR, [1, 2, 3], U32), (STR, "abc"), (ARR, ["<unk>", "<s>"], STR)]),
    ("tokenizer.ggml.scores", [(ARR, [], F32), (ARR, [0.0], F32), (ARR, [1] * 600, I32),
                               (ARR, ["x"] * 600, STR), (F32, 0.0), (ARR, [float("nan")] * 600, F32)]),
    ("tokenizer.ggml.token_type", [(ARR, [], I32), (ARR, [1], I32), (ARR, [99] * 600, I32),
                                   (ARR, [-1] * 600, I32), (ARR, [6] * 600, I32),
                                   (ARR, [1] * 600, U32), (ARR, [1] * 600, U8), (I32, 1)]),
    ("tokenizer.ggml.bos_token_id", [(U32, 600), (U32, 2 ** 31), (U32, 2 ** 32 - 1), (I32, -5),
                                     (STR, "1"), (U64, 2 ** 40)]),
    ("tokenizer.ggml.eos_token_id", [(U32, 600), (U32, 2 ** 32 - 1), (I32, -1)]),
    ("tokenizer.ggml.unknown_token_id", [(U32, 600), (U32, 2 ** 32 - 2)]),
    ("tokenizer.ggml.add_bos_token", [(U32, 7), (STR, "yes"), (BOOL, 3)]),
    ("tokenizer.ggml.merges", [(ARR, ["a b", "c"], STR), (ARR, [" "], STR), (ARR, [1], U32)]),
    ("tokenizer.ggml.pre", [(STR, "unknown-pre"), (STR, "llama-bpe"), (U32, 1)]),
    ("tokenizer.chat_template", [(STR, "{{" * 1000), (STR, "\xff"), (U32, 1), (ARR, ["x"], STR)]),
]
SEMANTIC_REMOVE = ["general.architecture", "llama.block_count", "llama.embedding_length",
                   "llama.attention.head_count", "llama.context_length", "tokenizer.ggml.model",
                   "tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
                   "llama.feed_forward_length", "llama.attention.layer_norm_rms_epsilon"]


def m_semantic(lay, rng):
    """Keys llama.cpp reads, re-typed, out of range or missing (the file itself is well-formed)."""
    kvs, tis, blob = lay.header_and_blob()
    keys = [kv["key"] for kv in lay.kvs]
    # the tensors' shapes are kept: a model that still loads gets further into llama.cpp
    while True:
        if rng.random() < 0.15:
            key = rng.choice(SEMANTIC_REMOVE)
            new = [r for k, r in zip(keys, kvs) if k != key]
            yield f"remove {key}", build(new, tis, blob, lay.alignment)
            continue
        key, choices = rng.choice(SEMANTIC)
        vtype, value, *etype = rng.choice(choices)
        rec = kv_record(key, vtype, value, etype[0] if etype else None)
        new = [rec if k == key else r for k, r in zip(keys, kvs)]
        if key not in keys:
            new.append(rec)
        align = lay.alignment
        if key == "general.alignment" and vtype == U32 and value and not value & (value - 1):
            align = value
        shown = value if not isinstance(value, (list, str)) or len(value) < 8 else f"{type(value).__name__}[{len(value)}]"
        yield f"{key} = {vtype}:{shown!r}", build(new, tis, blob, align)


def m_tensor_shape(lay, rng):
    """Tensor infos with other shapes: the file stays consistent, the model does not."""
    while True:
        t = rng.choice(lay.tensors)
        j = rng.randrange(len(t["ne_offs"]))
        value = rng.choice([0, 1, 2, t["ne"][j] * 2, t["ne"][j] // 2, t["ne"][j] + 1, 2 ** 31])
        yield f"ne[{j}] of {t['name']} = {value}", put(lay.data, t["ne_offs"][j], "<q", value)


# Keys llama.cpp reads (src/llama-model.cpp load_hparams, src/llama-vocab.cpp load), by kind: the
# metadata category below re-types them, moves them to edge values, drops them, and sets the
# related ones (experts, special tokens) together.
A = "llama"
META_COUNTS = [f"{A}.{k}" for k in (
    "block_count", "embedding_length", "feed_forward_length", "attention.head_count",
    "attention.head_count_kv", "context_length", "rope.dimension_count", "expert_count",
    "expert_used_count", "expert_group_count", "expert_group_used_count", "expert_shared_count",
    "nextn_predict_layers", "attention.key_length", "attention.value_length", "vocab_size",
    "attention.sliding_window", "expert_feed_forward_length", "rope.scaling.original_context_length",
    "embedding_length_out")] + ["tokenizer.ggml.token_type_count"]
META_ENUMS = {
    f"{A}.rope.scaling.type": ["none", "linear", "yarn", "longrope", "dynamic", "", "YARN"],
    "tokenizer.ggml.model": ["llama", "gpt2", "bert", "t5", "rwkv", "plamo2", "gemma4", "none",
                             "no_vocab", "whitespace", "hybriddna", "test", "x"],
    "tokenizer.ggml.pre": ["default", "llama3", "llama-bpe", "tekken", "chatglm-bpe", "qwen2",
                           "gpt-2", "unknown", ""],
    "general.architecture": ["llama", "qwen2", "gemma3", "t5", "bert", "mamba", "rwkv6", "clip",
                             "wavtokenizer-dec", "deepseek2", "x"],
}
META_ENUM_INTS = [f"{A}.pooling_type", "general.file_type", f"{A}.rope.scaling.type_id"]
META_IDS = [f"tokenizer.ggml.{k}_token_id" for k in (
    "bos", "eos", "unknown", "seperator", "padding", "eot", "eom", "mask", "fim_pre", "fim_suf",
    "fim_mid", "fim_pad", "fim_rep", "fim_sep", "prefix", "suffix", "middle")]
META_FLAGS = [f"tokenizer.ggml.{k}" for k in ("add_bos_token", "add_eos_token", "add_sep_token",
                                             "add_space_prefix", "remove_extra_whitespaces")] + [
    f"{A}.attention.causal", f"{A}.use_parallel_residual", f"{A}.rope.scaling.finetuned"]
META_FLOATS = [f"{A}.{k}" for k in (
    "rope.freq_base", "rope.scaling.factor", "attention.layer_norm_rms_epsilon",
    "attention.layer_norm_epsilon", "attention.scale", "logit_scale", "final_logit_softcapping",
    "attn_logit_softcapping", "rope.scaling.attn_factor", "expert_weights_scale")]
META_ARRAYS = ["tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
               "tokenizer.ggml.merges", f"{A}.expert_used_count", f"{A}.feed_forward_length",
               f"{A}.attention.head_count", f"{A}.attention.head_count_kv", "tokenizer.ggml.suppress_tokens"]
COUNT_VALUES = [0, 1, 2, 3, 7, 8, 64, 511, 512, 513, 1024, 1025, 2 ** 16, 2 ** 20, 2 ** 31 - 1,
                2 ** 31, 2 ** 32 - 1]
ID_VALUES = [0, 1, 2, 3, 599, 600, 601, 2 ** 31 - 1, 2 ** 31, 2 ** 32 - 1]
FLOAT_VALUES = [0.0, -0.0, -1.0, 1e-30, 1e30, float("nan"), float("inf"), float("-inf"), 3.4e38]
TYPE_SWAPS = [U8, I8, U16, I16, U32, I32, F32, BOOL, STR, U64, I64, F64]


def _encode(vtype, value):
    """value as vtype (a re-typed key), clamped into the type's range."""
    if vtype == STR:
        return str(value)
    if vtype in (F32, F64):
        return float(value) if not isinstance(value, str) else 0.0
    if isinstance(value, float):
        value = 0 if value != value or value in (float("inf"), float("-inf")) else int(value)
    if isinstance(value, str):
        value = len(value)
    size = struct.calcsize(SCALAR_FMT[vtype])
    lo, hi = ((-2 ** (8 * size - 1), 2 ** (8 * size - 1) - 1) if SCALAR_FMT[vtype][1].islower()
              else (0, 2 ** (8 * size) - 1))
    if vtype == BOOL:
        lo, hi = -128, 127
    return min(max(int(value), lo), hi)


def m_metadata(lay, rng):
    """Metadata values: counts, enums, ids, flags and floats at edge values, re-typed, dropped,
    arrays of other lengths, and the related keys set together (experts, special tokens)."""
    kvs, tis, blob = lay.header_and_blob()
    keys = [kv["key"] for kv in lay.kvs]
    base = dict(zip(keys, kvs))
    n_vocab = lay.kv("tokenizer.ggml.tokens")["count"]
    while True:
        records = dict(base)
        labels = []
        for _ in range(rng.choice((1, 1, 1, 2, 3))):
            r = rng.random()
            if r < 0.12:
                key = rng.choice(keys + META_COUNTS[:8] + META_IDS[:4])
                records.pop(key, None)
                labels.append(f"drop {key}")
                continue
            if r < 0.3:
                key, vtype = rng.choice(META_COUNTS), U32
                value = rng.choice(COUNT_VALUES + [rng.randrange(2 ** 32)])
            elif r < 0.42:
                key = rng.choice(list(META_ENUMS))
                vtype, value = STR, rng.choice(META_ENUMS[key])
            elif r < 0.48:
                key, vtype, value = rng.choice(META_ENUM_INTS), U32, rng.choice([0, 1, 2, 3, 4, 5, 99, 2 ** 32 - 1])
            elif r < 0.6:
                key, vtype = rng.choice(META_IDS), U32
                value = rng.choice(ID_VALUES + [n_vocab - 1, n_vocab])
            elif r < 0.68:
                key, vtype, value = rng.choice(META_FLAGS), BOOL, rng.choice([0, 1, 2, -1])
            elif r < 0.76:
                key, vtype, value = rng.choice(META_FLOATS), F32, rng.choice(FLOAT_VALUES)
            elif r < 0.88:
                key = rng.choice(META_ARRAYS)
                etype = {"tokenizer.ggml.tokens": STR, "tokenizer.ggml.merges": STR,
                         "tokenizer.ggml.scores": F32}.get(key, I32 if "token" in key else U32)
                n = rng.choice([0, 1, 2, n_vocab - 1, n_vocab + 1, 513])
                if etype == STR:
                    value = [f"t{i}" for i in range(n)] if "tokens" in key else ["a b"] * n
                else:
                    fill = rng.choice([0, 1, 2, 6, 8, 99])
                    value = [float(fill) if etype == F32 else fill] * n
                rec = kv_record(key, ARR, value, etype)
                records[key] = rec
                labels.append(f"{key} = {etype}[{n}]")
                continue
            else:
                # a known key re-typed, with its value kept where the type allows
                key = rng.choice([k for k in keys if lay.kv(k)["type"] not in (ARR,)])
                kv = lay.kv(key)
                raw = lay.data[kv["type_off"] + 4:kv["end"]]
                old = (raw[8:].decode("utf-8", "replace") if kv["type"] == STR
                       else struct.unpack(SCALAR_FMT[kv["type"]], raw)[0])
                vtype = rng.choice([t for t in TYPE_SWAPS if t != kv["type"]] + [ARR])
                if vtype == ARR:
                    value, etype = [old], (STR if isinstance(old, str) else U32)
                    if etype == U32:
                        value = [_encode(U32, old)]
                    records[key] = kv_record(key, ARR, value, etype)
                    labels.append(f"{key} re-typed to an array")
                    continue
                value = old
            value = _encode(vtype, value)
            records[key] = kv_record(key, vtype, value)
            labels.append(f"{key} = {vtype}:{value!r}"[:120])
        yield "; ".join(labels), build(list(records.values()), tis, blob, lay.alignment)


def m_experts(lay, rng):
    """The expert keys set together, as a mixture-of-experts file has them."""
    kvs, tis, blob = lay.header_and_blob()
    keys = [kv["key"] for kv in lay.kvs]
    while True:
        n_expert = rng.choice([0, 1, 2, 4, 8, 60, 1024, 1025, 2 ** 20, 2 ** 32 - 1])
        used = rng.choice([0, 1, 2, n_expert, n_expert + 1, 8])
        groups = rng.choice([0, 0, 1, 2, 3, n_expert, n_expert + 1])
        group_used = rng.choice([0, 1, 2, groups, groups - 1 if groups else 0])
        new = dict(zip(keys, kvs))
        for key, value in ((f"{A}.expert_count", n_expert), (f"{A}.expert_used_count", used),
                           (f"{A}.expert_group_count", groups), (f"{A}.expert_group_used_count", group_used)):
            if rng.random() < 0.85:
                new[key] = kv_record(key, U32, _encode(U32, value))
        if rng.random() < 0.2:         # per-layer used counts
            new[f"{A}.expert_used_count"] = kv_record(f"{A}.expert_used_count", ARR, [_encode(U32, used)], U32)
        yield (f"experts {n_expert}, used {used}, groups {groups}, group used {group_used}",
               build(list(new.values()), tis, blob, lay.alignment))


def retype(data, name, ggml_type):
    """data with tensor name stored as ggml_type, the data offsets recomputed (a consistent file:
    the other tensors keep their bytes, this one reads the first bytes of its old data)."""
    from alpaca2._gguf_check import GGML_TYPES
    lay = Layout(data)
    kvs, tis, blob = lay.header_and_blob()
    records, offset = [], 0
    for t, rec in zip(lay.tensors, tis):
        ty = ggml_type if t["name"] == name else t["ggml_type"]
        n = 1
        for d in t["ne"]:
            n *= d
        _, block, size = GGML_TYPES[ty]
        records.append(rec[:t["type_off"] - t["start"]] + struct.pack("<iQ", ty, offset))
        offset += (n // block * size + lay.alignment - 1) // lay.alignment * lay.alignment
    return build(kvs, records, blob, lay.alignment)


def m_retype(lay, rng):
    """A tensor stored as another (storage) type, the file kept consistent."""
    while True:
        t = rng.choice(lay.tensors)
        ty = rng.choice([0, 1, 30, 8, 2, 12, 14])
        block = {0: 1, 1: 1, 30: 1, 8: 32, 2: 32, 12: 256, 14: 256}[ty]
        if t["ne"][0] % block or ty == t["ggml_type"]:
            ty = rng.choice([1, 30])
        yield f"{t['name']} stored as type {ty}", retype(lay.data, t["name"], ty)


# Keys of the recurrent and hybrid architectures (src/models/mamba.cpp, granite-hybrid.cpp and
# load_hparams), under the seed's own architecture prefix: counts and sizes that size tensors or
# the recurrent state, per-layer arrays, flags.
ARCH_COUNTS = ["ssm.conv_kernel", "ssm.inner_size", "ssm.state_size", "ssm.time_step_rank",
               "ssm.group_count", "embedding_length", "block_count", "feed_forward_length",
               "attention.head_count", "attention.head_count_kv", "context_length",
               "rope.dimension_count", "attention.key_length", "attention.value_length",
               "expert_count", "expert_used_count", "expert_shared_feed_forward_length",
               "attention.sliding_window", "embedding_length_out"]
ARCH_PER_LAYER = ["attention.head_count_kv", "attention.head_count", "feed_forward_length",
                  "expert_used_count"]
ARCH_FLAGS = ["ssm.dt_b_c_rms", "rope.scaling.finetuned", "attention.causal"]
ARCH_FLOATS = ["embedding_scale", "residual_scale", "logit_scale", "attention.scale",
               "attention.layer_norm_rms_epsilon", "rope.freq_base"]


def _arch(lay):
    kv = lay.kv("general.architecture")
    return lay.data[kv["type_off"] + 12:kv["end"]].decode()


def m_arch_metadata(lay, rng):
    """The seed architecture's own keys (ssm.* sizes, head counts, per-layer arrays of every
    length, flags, scales) at edge values, re-typed or dropped, one to three at a time."""
    kvs, tis, blob = lay.header_and_blob()
    keys = [kv["key"] for kv in lay.kvs]
    arch = _arch(lay)
    n_layer = next((struct.unpack_from("<I", lay.data, kv["type_off"] + 4)[0] for kv in lay.kvs
                    if kv["key"] == f"{arch}.block_count"), 2)
    while True:
        records = dict(zip(keys, kvs))
        labels = []
        for _ in range(rng.choice((1, 1, 2, 3))):
            r = rng.random()
            if r < 0.5:
                key = f"{arch}.{rng.choice(ARCH_COUNTS)}"
                vtype = rng.choice([U32] * 6 + [I32, U64, STR, F32])
                value = _encode(vtype, rng.choice(COUNT_VALUES + [4, 5, 6, 16, 32, 63, 64, 65, 128, 256]))
                records[key] = kv_record(key, vtype, value)
                labels.append(f"{key} = {vtype}:{value!r}")
            elif r < 0.75:
                key = f"{arch}.{rng.choice(ARCH_PER_LAYER)}"
                n = rng.choice([0, 1, n_layer - 1, n_layer, n_layer, n_layer, n_layer + 1, 513])
                pick = [0, 0, 1, 2, 3, 4, 8, 64, 2 ** 16, 2 ** 31, 2 ** 32 - 1]
                value = [rng.choice(pick) for _ in range(n)]
                etype = rng.choice([U32, U32, I32, U8, F32])
                if etype == F32:
                    value = [float(v) for v in value]
                elif etype != U32:
                    value = [_encode(etype, v) for v in value]
                records[key] = kv_record(key, ARR, value, etype)
                labels.append(f"{key} = {etype}{value[:8]}{'...' if n > 8 else ''}")
            elif r < 0.83:
                key = f"{arch}.{rng.choice(ARCH_FLAGS)}"
                value = rng.choice([0, 1, 2, -1])
                records[key] = kv_record(key, BOOL, value)
                labels.append(f"{key} = bool:{value}")
            elif r < 0.92:
                key = f"{arch}.{rng.choice(ARCH_FLOATS)}"
                value = rng.choice(FLOAT_VALUES)
                records[key] = kv_record(key, F32, value)
                labels.append(f"{key} = f32:{value}")
            else:
                key = rng.choice([k for k in keys if k.startswith(arch + ".")])
                records.pop(key, None)
                labels.append(f"remove {key}")
        yield "; ".join(labels), build(list(records.values()), tis, blob, lay.alignment)


CATEGORIES = {
    "truncate_boundary": m_truncate_boundary, "truncate_random": m_truncate_random,
    "flip_header": m_flip_header, "flip_kv": m_flip_kv, "flip_tensor_info": m_flip_tensor_info,
    "huge": m_huge, "wrong_type": m_wrong_type, "tensor_offset": m_tensor_offset,
    "duplicate": m_duplicate, "semantic": m_semantic, "tensor_shape": m_tensor_shape,
    "metadata": m_metadata, "experts": m_experts, "arch_metadata": m_arch_metadata,
    "retype": m_retype,
}


def cases(data: bytes, n: int, seed: int = 0, categories=None):
    """n mutated copies of data (made one at a time), round-robin over the categories, each
    category seeded on its own: yields (category, label, bytes)."""
    lay = Layout(data)
    gens = collections.OrderedDict()
    for i, name in enumerate(categories or CATEGORIES):
        gens[name] = iter(CATEGORIES[name](lay, random.Random(seed * 1000 + i)))
    made = 0
    while made < n and gens:
        for name in list(gens):
            if made >= n:
                break
            try:
                label, mutated = next(gens[name])
            except StopIteration:
                del gens[name]
                continue
            made += 1
            yield name, label, mutated


# -- running cases in worker processes ----------------------------------------------------------

WORKER = r"""
import os, sys, alpaca2
if os.environ.get("GGUF_FUZZ_NO_PRECHECK"):
    import alpaca2._gguf_check
    alpaca2._gguf_check.validate = lambda path: None      # what llama.cpp alone does
elif os.environ.get("GGUF_FUZZ_PRECHECK_FROM"):           # another version of the pre-check
    import importlib.util, alpaca2._gguf_check
    spec = importlib.util.spec_from_file_location("other_gguf_check", os.environ["GGUF_FUZZ_PRECHECK_FROM"])
    other = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(other)
    alpaca2._gguf_check.validate = other.validate
use = bool(os.environ.get("GGUF_FUZZ_USE"))
out = sys.stdout
out.write("READY\n"); out.flush()
for line in sys.stdin:
    idx, path = line.rstrip("\n").split(" ", 1)
    out.write(f"START {idx}\n"); out.flush()
    try:
        m = alpaca2.Model(path)
        detail = f"n_vocab={m.n_vocab}"
        if use:           # what a user does next: the vocabulary, a context, one decode
            ids = m.tokenize("hello 你好")
            m.detokenize(ids)
            with alpaca2.Context(m, n_ctx=64, n_batch=32, n_threads=1) as c:
                c.decode(ids[:8] or [0])
        m.close()
        out.write(f"DONE {idx} loaded {detail}\n")
    except alpaca2.ModelLoadError as e:
        out.write(f"DONE {idx} ModelLoadError {str(e).replace(chr(10), ' ')[:300]}\n")
    except Exception as e:
        out.write(f"DONE {idx} other {type(e).__name__}: {str(e).replace(chr(10), ' ')[:300]}\n")
    out.flush()
"""


class _Worker:
    """A worker process and a line reader on its stdout that honours a timeout."""

    def __init__(self, env, code=WORKER, args=()):
        self.proc = subprocess.Popen([sys.executable, "-c", code, *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
        self.buf = b""

    def send(self, line):
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def read_line(self, timeout):
        """The next line; "" at end of output (the worker died); None after timeout seconds."""
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buf:
            sel = selectors.DefaultSelector()
            sel.register(fd, selectors.EVENT_READ)
            ready = sel.select(max(0.0, deadline - time.monotonic()))
            sel.close()
            if not ready:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                return ""
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode("utf-8", "replace") + "\n"

    def kill(self):
        self.proc.kill()
        return self.proc.wait()

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def run_cases(case_list, workdir, timeout=20.0, precheck=True, use=False, save_failures=None,
              log=None, precheck_from=None):
    """Load each case in worker processes; returns a list of (category, label, outcome, detail).

    outcome: "loaded", "precheck" (ModelLoadError from alpaca2's pre-check), "llama" (ModelLoadError
    from llama.cpp), "other" (another exception), "crash" (the worker died: detail has the signal)
    or "hang" (no answer within timeout seconds).
    """
    env = dict(os.environ)
    env["GGML_NO_BACKTRACE"] = "1"          # ggml's abort would run gdb for a backtrace: slow
    env.pop("GGUF_FUZZ_NO_PRECHECK", None)
    env.pop("GGUF_FUZZ_USE", None)
    env.pop("GGUF_FUZZ_PRECHECK_FROM", None)
    if precheck_from:
        env["GGUF_FUZZ_PRECHECK_FROM"] = str(precheck_from)
    if not precheck:
        env["GGUF_FUZZ_NO_PRECHECK"] = "1"
    if use:
        env["GGUF_FUZZ_USE"] = "1"
    workdir = Path(workdir)
    results = []
    proc = None
    for i, (category, label, data) in enumerate(case_list):
        path = workdir / f"case-{i}.gguf"
        path.write_bytes(data)
        if proc is None:
            proc = _Worker(env)
            if proc.read_line(60) != "READY\n":
                raise RuntimeError("the fuzz worker did not start")
        proc.send(f"{i} {path}")
        outcome, detail = None, ""
        t0 = time.monotonic()
        while outcome is None:
            line = proc.read_line(max(0.0, timeout - (time.monotonic() - t0)))
            if line is None:
                proc.kill()
                outcome, detail = "hang", f"no answer in {timeout:.0f} s"
            elif line == "":
                rc = proc.kill()
                outcome, detail = "crash", f"exit status {rc}" + (f" (signal {-rc})" if rc < 0 else "")
            elif line.startswith(f"DONE {i} "):
                kind, _, detail = line.rstrip("\n")[len(f"DONE {i} "):].partition(" ")
                outcome = ("precheck" if PRECHECK_PREFIX in detail else "llama") if kind == "ModelLoadError" else kind
        if outcome in ("crash", "hang"):
            proc = None
        results.append((category, label, outcome, detail))
        if outcome in ("crash", "hang", "other") and save_failures:
            Path(save_failures).mkdir(parents=True, exist_ok=True)
            (Path(save_failures) / f"{outcome}-{i}.gguf").write_bytes(data)
            (Path(save_failures) / f"{outcome}-{i}.txt").write_text(f"{category}: {label}\n{detail}\n")
        if log and outcome in ("crash", "hang", "other"):
            log(f"case {i} {category}: {label} -> {outcome} {detail}")
        path.unlink()
    if proc is not None:
        proc.close()
    return results


def summary(results):
    """{category: Counter(outcome)} and the overall Counter."""
    by_cat = collections.defaultdict(collections.Counter)
    for category, _, outcome, _ in results:
        by_cat[category][outcome] += 1
    total = collections.Counter(o for _, _, o, _ in results)
    return by_cat, total


def tiny_fuzz_model(path):
    """The seed: a 1-layer llama model with a 600-piece vocabulary (about 200 KB)."""
    from alpaca2 import testing
    return testing.make_model(path, shape=dict(n_embd=32, n_layer=1, n_head=2, n_head_kv=1, n_ff=64,
                                               n_ctx_train=256), vocab_size=600)


def arch_fuzz_model(path, kind):
    """A seed of another architecture: "mamba" or "mamba2" (recurrent) or "hybrid" (Granite
    hybrid, Mamba-2 and attention layers), 600-piece vocabulary."""
    from alpaca2 import testing_archs
    make = {"mamba": testing_archs.make_mamba_model, "mamba2": testing_archs.make_mamba2_model,
            "hybrid": testing_archs.make_granite_hybrid_model}[kind]
    return make(path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", help="seed GGUF file (default: a tiny model made here)")
    ap.add_argument("--arch", choices=["llama", "mamba", "mamba2", "hybrid"], default="llama",
                    help="the architecture of the tiny seed model made here")
    ap.add_argument("--timeout", type=float, default=20.0)
    ap.add_argument("--no-precheck", action="store_true", help="skip alpaca2's pre-check")
    ap.add_argument("--precheck-from", metavar="FILE",
                    help="use the validate() of this _gguf_check.py (e.g. an older version)")
    ap.add_argument("--use", action="store_true", help="after a load: tokenize, a context, one decode")
    ap.add_argument("--category", action="append", choices=list(CATEGORIES))
    ap.add_argument("--save-failures", metavar="DIR")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or (tiny_fuzz_model(Path(tmp) / "seed.gguf") if args.arch == "llama"
                               else arch_fuzz_model(Path(tmp) / "seed.gguf", args.arch))
        data = Path(model).read_bytes()
        t0 = time.monotonic()
        results = run_cases(cases(data, args.cases, args.seed, args.category), tmp, args.timeout,
                            precheck=not args.no_precheck, use=args.use,
                            save_failures=args.save_failures, log=print,
                            precheck_from=args.precheck_from)
        took = time.monotonic() - t0
    by_cat, total = summary(results)
    print(f"{len(results)} cases in {took:.0f} s (seed {args.seed}, pre-check "
          f"{'off' if args.no_precheck else 'on'}{', use' if args.use else ''})")
    for category, counts in by_cat.items():
        print(f"  {category:18} " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    print("  total              " + ", ".join(f"{k} {v}" for k, v in sorted(total.items())))
    return 1 if any(total[k] for k in ("crash", "hang", "other")) else 0


if __name__ == "__main__":
    sys.exit(main())
