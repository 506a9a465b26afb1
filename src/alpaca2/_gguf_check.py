"""Structural validation of a GGUF file before llama.cpp parses it (see issue 8).

GGUF files come from the internet.  This walks the header, the key/value section and the
tensor-info section of a file with every count, length and offset checked against the bytes that
are actually there, reading only the metadata (a 4 GB model costs a few milliseconds), and raises
ModelLoadError saying what is wrong.  The rules are those of llama.cpp's own parser
(vendor/llama.cpp/ggml/src/gguf.cpp, gguf_init_from_reader) plus what llama.cpp's model loader
checks only later (tensor data inside the file).
"""
from __future__ import annotations

import mmap
import os
import struct

from alpaca2._files import open_regular_file
from alpaca2.errors import ModelLoadError

GGUF_MAGIC = b"GGUF"
GGUF_VERSION = 3                          # the newest version llama.cpp reads
GGUF_DEFAULT_ALIGNMENT = 32
GGUF_MAX_STRING_LENGTH = 1024 * 1024 * 1024
GGUF_MAX_ARRAY_ELEMENTS = 1024 * 1024 * 1024
GGML_MAX_DIMS = 4
GGML_MAX_NAME = 64
TENSOR_ALIGNMENT = 32                     # ggml's alignment of a mapped tensor's data
LLAMA_MAX_LAYERS = 512
LLAMA_MAX_EXPERTS = 1024
INT64_MAX = 2 ** 63 - 1
SIZE_MAX = 2 ** 64 - 1

# gguf_type: (name, struct format or None for string/array)
GGUF_TYPES = {
    0: ("u8", "<B"), 1: ("i8", "<b"), 2: ("u16", "<H"), 3: ("i16", "<h"), 4: ("u32", "<I"),
    5: ("i32", "<i"), 6: ("f32", "<f"), 7: ("bool", "<b"), 8: ("str", None), 9: ("arr", None),
    10: ("u64", "<Q"), 11: ("i64", "<q"), 12: ("f64", "<d"),
}
GGUF_TYPE_STRING, GGUF_TYPE_ARRAY, GGUF_TYPE_UINT32 = 8, 9, 4

# ggml_type: (name, block size, bytes per block), as ggml_blck_size()/ggml_type_size() of the
# vendored ggml (tests/test_hardening.py checks this table against libggml-base).  Types whose
# support was removed (4, 5, 31-33, 36-38) are absent: llama.cpp refuses them too.
GGML_TYPES = {
    0: ("f32", 1, 4), 1: ("f16", 1, 2), 2: ("q4_0", 32, 18), 3: ("q4_1", 32, 20),
    6: ("q5_0", 32, 22), 7: ("q5_1", 32, 24), 8: ("q8_0", 32, 34), 9: ("q8_1", 32, 36),
    10: ("q2_K", 256, 84), 11: ("q3_K", 256, 110), 12: ("q4_K", 256, 144), 13: ("q5_K", 256, 176),
    14: ("q6_K", 256, 210), 15: ("q8_K", 256, 292), 16: ("iq2_xxs", 256, 66), 17: ("iq2_xs", 256, 74),
    18: ("iq3_xxs", 256, 98), 19: ("iq1_s", 256, 50), 20: ("iq4_nl", 32, 18), 21: ("iq3_s", 256, 110),
    22: ("iq2_s", 256, 82), 23: ("iq4_xs", 256, 136), 24: ("i8", 1, 1), 25: ("i16", 1, 2),
    26: ("i32", 1, 4), 27: ("i64", 1, 8), 28: ("f64", 1, 8), 29: ("iq1_m", 256, 56),
    30: ("bf16", 1, 2), 34: ("tq1_0", 256, 54), 35: ("tq2_0", 256, 66), 39: ("mxfp4", 32, 17),
    40: ("nvfp4", 64, 36), 41: ("q1_0", 128, 18), 42: ("q2_0", 64, 18),
}

# Keys llama.cpp reads with a fixed type and asserts on (GGML_ASSERT aborts the process).
_TYPED_KEYS = {
    "general.alignment": (GGUF_TYPE_UINT32,),
}


# architectures whose recurrent layers are Mamba-2 mixers (src/models/mamba-base.cpp build_mamba2_layer)
_MAMBA2_ARCHS = {"mamba2", "granitehybrid", "falcon-h1", "nemotron_h", "nemotron_h_moe"}

_F32_ONLY_SUFFIXES = (b"norm.weight", b".bias", b".ssm_a", b".ssm_d", b".ssm_conv1d.weight")

# i8, i16, i32, i64, f64; and q8_1, q8_K: ggml's internal activation types, not storage types
_NOT_WEIGHT_TYPES = {24, 25, 26, 27, 28, 9, 15}

# Arrays whose contents the checks below need (the rest are only skipped over): the vocabulary,
# and the per-layer hyperparameters (at most one value per layer, so short).
_KEEP_ARRAYS = {"tokenizer.ggml.tokens", "tokenizer.ggml.token_type"}
_KEEP_ARRAY_SUFFIXES = (".expert_used_count",)


def _keep(key, n):
    return key in _KEEP_ARRAYS or (key.endswith(_KEEP_ARRAY_SUFFIXES) and n <= LLAMA_MAX_LAYERS)
TOKEN_TYPE_BYTE = 6


_U64 = struct.Struct("<Q")


class _Reader:
    """Reads little-endian fields from a read-only map of the file, each bounded by the bytes
    left in the file (the map costs nothing for the tensor data, which is never touched)."""

    def __init__(self, buf, size, path):
        self.buf = buf
        self.size = size
        self.pos = 0
        self.path = path

    def fail(self, what):
        raise ModelLoadError(f"{self.path} is not a valid GGUF file: {what}")

    def need(self, n, what):
        if n > self.size - self.pos:
            self.fail(f"{what} needs {n} bytes at offset {self.pos}, but the file ends at byte "
                      f"{self.size} (truncated or corrupt)")

    def raw(self, n, what):
        self.need(n, what)
        data = self.buf[self.pos:self.pos + n]
        self.pos += n
        return data

    def skip(self, n, what):
        self.need(n, what)
        self.pos += n

    def unpack(self, fmt, what):
        size = struct.calcsize(fmt)
        self.need(size, what)
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += size
        return value

    def string_length(self, what):
        n = self.unpack("<Q", f"the length of {what}")
        if n > GGUF_MAX_STRING_LENGTH:
            self.fail(f"{what} has length {n}, over llama.cpp's limit of {GGUF_MAX_STRING_LENGTH}")
        self.need(n, f"{what} (length {n})")
        return n

    def string(self, what):
        return self.raw(self.string_length(what), what)

    def string_array(self, n, key, keep):
        """Walk n length-prefixed strings (a vocabulary has 10^5 of them: one tight loop)."""
        buf, pos, size, unpack = self.buf, self.pos, self.size, _U64.unpack_from
        out = [] if keep else None
        for j in range(n):
            if pos + 8 > size:
                self.pos = pos
                self.string_length(f"string {j} of array '{key}'")       # fails with the reason
            (length,) = unpack(buf, pos)
            pos += 8
            if length > GGUF_MAX_STRING_LENGTH or length > size - pos:
                self.pos = pos - 8
                self.string_length(f"string {j} of array '{key}'")
            if keep:
                out.append(buf[pos:pos + length])
            pos += length
        self.pos = pos
        return out


def _name(raw):
    return raw.decode("utf-8", "backslashreplace")


def validate(path) -> None:
    """Raise ModelLoadError when the file at path is not a well-formed GGUF file.

    Reads the header, the key/value pairs and the tensor infos (never the tensor data), checking
    every count and length against the file size before reading it, and checks that each tensor's
    data lies inside the file.
    """
    path = os.fspath(path)
    shown = path if isinstance(path, str) else os.fsdecode(path)
    # a regular file only: a FIFO would block the open forever, /dev/zero never end
    f = open_regular_file(path, "GGUF model file", ModelLoadError)
    with f:
        size = os.fstat(f.fileno()).st_size
        if size < 24:
            raise ModelLoadError(f"{shown} is not a valid GGUF file: {size} bytes, shorter than "
                                 "the 24-byte header (truncated)")
        try:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError):                 # not mappable (a FIFO, some file systems)
            buf = f.read()
            size = len(buf)
        try:
            _validate(_Reader(buf, size, shown))
        finally:
            if isinstance(buf, mmap.mmap):
                buf.close()


def _validate(r: _Reader) -> None:
    # -- header: magic, version, counts
    magic = r.raw(4, "the magic")
    if magic != GGUF_MAGIC:
        r.fail(f"magic {magic!r}, expected b'GGUF'")
    version = r.unpack("<I", "the version")
    if version == 0 or version & 0xFFFF == 0:
        r.fail(f"version {version:#x}: a big-endian file or a corrupt header")
    if version == 1:
        r.fail("GGUF version 1 is no longer supported by llama.cpp; convert the model again")
    if version > GGUF_VERSION:
        r.fail(f"GGUF version {version}, newer than the {GGUF_VERSION} this llama.cpp reads")
    n_tensors = r.unpack("<q", "the tensor count")
    n_kv = r.unpack("<q", "the key/value count")
    # the smallest key/value pair is 8 (length) + 1 (key) + 4 (type) + 1 (u8) bytes; the smallest
    # tensor info 8 + 1 (name) + 4 (n_dims) + 4 (type) + 8 (offset)
    left = r.size - r.pos
    if n_kv < 0 or n_kv * 14 > left:
        r.fail(f"the header claims {n_kv} key/value pairs, which cannot fit in the "
               f"{left} bytes after it")
    if n_tensors < 0 or n_tensors * 25 > left:
        r.fail(f"the header claims {n_tensors} tensors, whose infos cannot fit in the "
               f"{left} bytes after it")

    # -- key/value pairs
    seen = set()
    kv = {}                       # key -> (type, element type, count, value or None)
    for i in range(n_kv):
        key_raw = r.string(f"the key of key/value pair {i}")
        key = _name(key_raw)
        if not key_raw:
            r.fail(f"key/value pair {i} has an empty key")
        if key_raw in seen:
            r.fail(f"duplicate key '{key}' (key/value pair {i})")
        seen.add(key_raw)
        vtype = r.unpack("<i", f"the type of '{key}'")
        if vtype not in GGUF_TYPES:
            r.fail(f"key '{key}' has invalid value type {vtype}")
        if vtype == GGUF_TYPE_ARRAY:
            etype = r.unpack("<i", f"the element type of array '{key}'")
            if etype not in GGUF_TYPES or etype == GGUF_TYPE_ARRAY:
                r.fail(f"array '{key}' has invalid element type {etype}")
            n = r.unpack("<Q", f"the length of array '{key}'")
            if n > GGUF_MAX_ARRAY_ELEMENTS:
                r.fail(f"array '{key}' claims {n} elements, over llama.cpp's limit of "
                       f"{GGUF_MAX_ARRAY_ELEMENTS}")
            value = None
            if etype == GGUF_TYPE_STRING:
                r.need(8 * n, f"array '{key}' of {n} strings")
                value = r.string_array(n, key, _keep(key, n))
            else:
                fmt = GGUF_TYPES[etype][1]
                what = f"array '{key}' of {n} {GGUF_TYPES[etype][0]}"
                if _keep(key, n):
                    r.need(n * struct.calcsize(fmt), what)
                    value = struct.unpack(f"<{n}{fmt[1]}", r.raw(n * struct.calcsize(fmt), what))
                else:
                    r.skip(n * struct.calcsize(fmt), what)
            kv[key] = (vtype, etype, n, value)
        elif vtype == GGUF_TYPE_STRING:
            kv[key] = (vtype, None, 1, r.string(f"the value of '{key}'"))
        else:
            kv[key] = (vtype, None, 1, r.unpack(GGUF_TYPES[vtype][1], f"the value of '{key}'"))

    for key, types in _TYPED_KEYS.items():
        if key in kv and kv[key][0] not in types:
            r.fail(f"key '{key}' must be of type {GGUF_TYPES[types[0]][0]}, not "
                   f"{GGUF_TYPES[kv[key][0]][0]}")
    alignment = kv["general.alignment"][3] if "general.alignment" in kv else GGUF_DEFAULT_ALIGNMENT
    if alignment == 0 or alignment & (alignment - 1):
        r.fail(f"general.alignment is {alignment}, not a power of 2")
    _check_model_keys(r, kv)

    # -- tensor infos
    names = set()
    tensors = []                  # (name, offset, nbytes)
    expected_offset = 0
    for i in range(n_tensors):
        name_raw = r.string(f"the name of tensor {i}")
        name = _name(name_raw)
        if len(name_raw) >= GGML_MAX_NAME:
            r.fail(f"tensor {i} has a name of {len(name_raw)} bytes, over ggml's limit of "
                   f"{GGML_MAX_NAME - 1}")
        if name_raw in names:
            r.fail(f"duplicate tensor name '{name}' (tensor {i})")
        names.add(name_raw)
        n_dims = r.unpack("<I", f"the dimension count of tensor '{name}'")
        if n_dims > GGML_MAX_DIMS:
            r.fail(f"tensor '{name}' has {n_dims} dimensions, over ggml's {GGML_MAX_DIMS}")
        ne = [r.unpack("<q", f"dimension {j} of tensor '{name}'") for j in range(n_dims)]
        if any(d < 0 for d in ne):
            r.fail(f"tensor '{name}' has a negative dimension: {ne}")
        n_elements = 1
        for d in ne:
            n_elements *= d
        if n_elements > INT64_MAX:
            r.fail(f"tensor '{name}' has shape {ne}: {n_elements} elements overflow int64")
        ggml_type = r.unpack("<i", f"the type of tensor '{name}'")
        if ggml_type not in GGML_TYPES:
            r.fail(f"tensor '{name}' has invalid or unsupported ggml type {ggml_type}")
        type_name, block, type_size = GGML_TYPES[ggml_type]
        # ggml's CPU kernels have no matrix product or norm for these types: llama.cpp loads
        # such a weight and then crashes (SIGSEGV, or an abort in the scheduler) at the first decode
        if ggml_type in _NOT_WEIGHT_TYPES and name_raw.endswith((b".weight", b".bias")):
            r.fail(f"tensor '{name}' is of type {type_name}, which llama.cpp cannot compute with")
        # norms, biases and the Mamba mixer's conv/A/D enter element-wise ops (ggml_mul, ggml_add,
        # ssm_conv, ssm_scan) with f32 activations; ggml's CPU kernels abort on any other type
        if ggml_type != 0 and name_raw.endswith(_F32_ONLY_SUFFIXES):
            r.fail(f"tensor '{name}' is of type {type_name}; llama.cpp computes with norms, biases "
                   "and SSM conv/A/D tensors in f32 only (another type aborts the first decode)")
        row = ne[0] if ne else 1
        if row % block:
            r.fail(f"tensor '{name}' of type {type_name} has rows of {row} elements, not a "
                   f"multiple of its block size {block}")
        nbytes = n_elements // block * type_size
        offset = r.unpack("<Q", f"the data offset of tensor '{name}'")
        if offset != expected_offset:
            r.fail(f"tensor '{name}' has data offset {offset}, expected {expected_offset} "
                   f"(offsets must follow each other, aligned to {alignment})")
        tensors.append((name, offset, nbytes))
        expected_offset = offset + (nbytes + alignment - 1) // alignment * alignment

    # -- tensor data: inside the file (llama.cpp maps it without reading it)
    data_start = r.pos
    if n_tensors:
        data_start = (r.pos + alignment - 1) // alignment * alignment
    for name, offset, nbytes in tensors:
        end = data_start + offset + nbytes
        if end > r.size:
            r.fail(f"tensor '{name}' data ends at byte {end}, past the end of the file "
                   f"({r.size} bytes)")
        # llama.cpp maps the file and asserts (aborts) on tensor data that is not so aligned
        if (data_start + offset) % TENSOR_ALIGNMENT:
            r.fail(f"tensor '{name}' data starts at byte {data_start + offset}, not a multiple of "
                   f"{TENSOR_ALIGNMENT} (general.alignment {alignment} is too small for llama.cpp)")



def _scalar(kv, key):
    value = kv.get(key)
    return None if value is None or value[0] in (GGUF_TYPE_STRING, GGUF_TYPE_ARRAY) else value[3]


def _check_model_keys(r: _Reader, kv) -> None:
    """Values llama.cpp asserts on (an abort, not an error) when it loads or runs the model."""
    arch_kv = kv.get("general.architecture")
    arch = arch_kv[3].decode("utf-8", "replace") if arch_kv and arch_kv[0] == GGUF_TYPE_STRING else None
    if arch:
        n_layer = _scalar(kv, f"{arch}.block_count")
        if n_layer is not None and not 0 < n_layer <= LLAMA_MAX_LAYERS:
            r.fail(f"{arch}.block_count is {n_layer}; llama.cpp supports 1 to {LLAMA_MAX_LAYERS} layers")
        for key in (f"{arch}.attention.layer_norm_rms_epsilon", f"{arch}.attention.layer_norm_epsilon"):
            eps = _scalar(kv, key)
            if eps is not None and not (eps >= 0 and eps != float("inf")):
                r.fail(f"{key} is {eps}; it must be a finite number >= 0")
        if n_layer is not None and 0 < n_layer <= LLAMA_MAX_LAYERS:
            _check_hparams(r, kv, arch, n_layer)

    tokens_kv = kv.get("tokenizer.ggml.tokens")
    if tokens_kv is None or tokens_kv[1] != GGUF_TYPE_STRING or tokens_kv[3] is None:
        return                   # llama.cpp itself refuses a missing or mistyped vocabulary
    tokens = list(tokens_kv[3])
    for i, t in enumerate(tokens):
        if not t:
            tokens[i] = f"[EMPTY_{i}]".encode()        # what llama.cpp makes of an empty token
    if len(set(tokens)) != len(tokens):
        seen = set()
        dup = next(t for t in tokens if t in seen or seen.add(t))
        r.fail(f"tokenizer.ggml.tokens has token {_name(dup)!r} more than once (ids "
               f"{[i for i, t in enumerate(tokens) if t == dup][:4]})")
    model_kv = kv.get("tokenizer.ggml.model")
    model = model_kv[3] if model_kv and model_kv[0] == GGUF_TYPE_STRING else None
    types_kv = kv.get("tokenizer.ggml.token_type")
    types = types_kv[3] if types_kv and types_kv[1] in (4, 5) and types_kv[3] is not None else ()
    present = set(tokens)
    # llama.cpp's SPM tokenizer looks up a byte token (or the byte itself) with
    # unordered_map::at() for every character outside the vocabulary; a missing one throws through
    # its C API and terminates the process.  Only bytes that occur in UTF-8 text count.
    if model == b"llama":
        utf8_bytes = [b for b in range(256) if b not in (0xC0, 0xC1) and b < 0xF5]
        missing = [b for b in utf8_bytes
                   if f"<0x{b:02X}>".encode() not in present and bytes([b]) not in present]
        if missing:
            r.fail(f"the llama (SentencePiece) vocabulary has no byte token for {len(missing)} "
                   f"bytes of UTF-8 text (e.g. <0x{missing[0]:02X}>); llama.cpp would abort on text "
                   "that needs one")
    if model == b"bert" and TOKEN_TYPE_BYTE in types:
        r.fail("a bert (WordPiece) vocabulary with byte tokens: llama.cpp aborts when it meets one")
    if model is not None:
        _check_special_tokens(r, kv, model, len(tokens))


_INT_TYPES = {0, 1, 2, 3, 4, 5, 10, 11}


def _int(kv, key, default=None):
    """An integer-typed scalar's value; default when absent or of another type (llama.cpp throws,
    a clean error, on a mistyped key)."""
    value = kv.get(key)
    return value[3] if value is not None and value[0] in _INT_TYPES else default


def _check_hparams(r: _Reader, kv, arch, n_layer) -> None:
    """llama_model_base::load_hparams' GGML_ASSERTs (src/llama-model.cpp): the process aborts."""
    nextn = _int(kv, f"{arch}.nextn_predict_layers", 0)
    if nextn > n_layer:
        r.fail(f"{arch}.nextn_predict_layers is {nextn}, more than the {n_layer} layers")
    if arch == "wavtokenizer-dec":
        for key in (f"{arch}.posnet.block_count", f"{arch}.convnext.block_count"):
            if _int(kv, key, 0) > n_layer:
                r.fail(f"{key} is {_int(kv, key)}, more than the {n_layer} layers")

    # experts: counts, the used count (one value or one per layer) and groups
    n_expert = _int(kv, f"{arch}.expert_count", 0)
    used_kv = kv.get(f"{arch}.expert_used_count")
    used = 0
    if used_kv is not None and used_kv[0] in _INT_TYPES:
        used = used_kv[3]
    elif used_kv is not None and used_kv[0] == GGUF_TYPE_ARRAY and used_kv[3] is not None:
        if len(used_kv[3]) == n_layer:           # another length: llama.cpp refuses it cleanly
            used = max(used_kv[3], default=0)
    groups = _int(kv, f"{arch}.expert_group_count", 0)
    group_used = _int(kv, f"{arch}.expert_group_used_count", 0)
    if arch in ("hunyuan-vl", "hunyuan-dense") and n_expert <= 1:
        n_expert = used = 0                      # llama.cpp drops a single expert there
    if n_expert > LLAMA_MAX_EXPERTS:
        r.fail(f"{arch}.expert_count is {n_expert}; llama.cpp supports at most {LLAMA_MAX_EXPERTS}")
    if used > n_expert:
        r.fail(f"{arch}.expert_used_count is {used}, more than {arch}.expert_count {n_expert}")
    if n_expert > 0:
        if used <= 0:
            r.fail(f"{arch}.expert_used_count is {used}; a model with {n_expert} experts must use "
                   "at least one")
        if groups >= n_expert:
            r.fail(f"{arch}.expert_group_count is {groups}; it must be below {arch}.expert_count "
                   f"{n_expert}")
        if groups > 1:
            if n_expert % groups:
                r.fail(f"{arch}.expert_count {n_expert} is not a multiple of "
                       f"{arch}.expert_group_count {groups}")
            if not 0 < group_used < groups:
                r.fail(f"{arch}.expert_group_used_count is {group_used}; it must be between 1 and "
                       f"{groups - 1} ({arch}.expert_group_count {groups})")
    elif used or groups:
        r.fail(f"{arch}.expert_used_count/expert_group_count are {used}/{groups}, but the model "
               "has no experts")

    # ggml's rope asserts n_dims <= ne0 (the head size) and n_dims even, at the first decode;
    # llama.cpp checks n_rot against the head size for llama-like archs only
    n_embd = _int(kv, f"{arch}.embedding_length")
    n_head = _int(kv, f"{arch}.attention.head_count")
    n_rot = _int(kv, f"{arch}.rope.dimension_count")
    if n_rot is not None and n_head and n_embd is not None:
        head_k = _int(kv, f"{arch}.attention.key_length", n_embd // n_head)
        if n_rot == 0:
            r.fail(f"{arch}.rope.dimension_count is 0 in a model with attention heads; llama.cpp's "
                   "rope then never finishes the first decode")
        if n_rot % 2:
            r.fail(f"{arch}.rope.dimension_count is {n_rot}; rotary dimensions come in pairs (an "
                   "even number)")
        if n_rot > head_k:
            r.fail(f"{arch}.rope.dimension_count is {n_rot}, more than the head size {head_k} "
                   f"({arch}.attention.key_length, or embedding_length / head_count)")

    # Mamba-2 mixers split d_inner into heads (ssm.time_step_rank) and groups: a count that does
    # not divide it is a GGML_ASSERT when the context is made, a group count of 0 a division by
    # zero (SIGFPE) while the tensors load
    if arch in _MAMBA2_ARCHS:
        d_inner = _int(kv, f"{arch}.ssm.inner_size")
        for key in (f"{arch}.ssm.group_count", f"{arch}.ssm.time_step_rank"):
            count = _int(kv, key)
            if count is not None and count == 0:
                r.fail(f"{key} is 0; a Mamba-2 mixer needs at least one")
            if count and d_inner is not None and d_inner % count:
                r.fail(f"{key} is {count}, which does not divide {arch}.ssm.inner_size {d_inner}")
    if arch in _MAMBA2_ARCHS or arch in ("mamba", "jamba"):
        if _int(kv, f"{arch}.ssm.inner_size") == 0:
            r.fail(f"{arch}.ssm.inner_size is 0")

    # Mamba mixers in these hybrids support an expansion factor of 2 only (a GGML_ASSERT at load)
    if arch in ("granitehybrid", "jamba"):
        d_inner = _int(kv, f"{arch}.ssm.inner_size")
        if d_inner is not None and n_embd is not None and d_inner != 2 * n_embd:
            r.fail(f"{arch}.ssm.inner_size is {d_inner}, but llama.cpp supports only 2 x "
                   f"{arch}.embedding_length ({2 * n_embd})")

    scaling = kv.get(f"{arch}.rope.scaling.type")
    if scaling is not None and scaling[0] == GGUF_TYPE_STRING and \
            scaling[3] not in (b"none", b"linear", b"yarn", b"longrope"):
        r.fail(f"{arch}.rope.scaling.type is {_name(scaling[3])!r}; llama.cpp knows none, linear, "
               "yarn and longrope")


# tokenizer.ggml.model -> (vocabulary type, default BOS, EOS, SEP ids, add_bos, add_eos), as
# llama_vocab::impl::load sets them before reading the file's own keys (None: no such token)
_VOCAB_DEFAULTS = {
    b"llama": ("spm", 1, 2, None, True, False),
    b"bert": ("wpm", 101, None, 102, True, False),
    b"gpt2": ("bpe", 11, 11, None, False, False),
    b"hybriddna": ("bpe", 11, 11, None, False, False),
    b"whitespace": ("bpe", 11, 11, None, False, False),
    b"t5": ("ugm", None, 1, None, False, True),
    b"gemma4": ("bpe", None, None, None, True, False),
}
# BPE pre-tokenizers after which llama.cpp adds BOS by default, or has no BOS at all
_BPE_ADD_BOS = {b"llama3", b"llama-v3", b"llama-bpe", b"falcon3", b"falcon-h1", b"pixtral",
                b"midm-2.0", b"lfm2", b"jina-v5-nano", b"tekken", b"chameleon"}
_BPE_NO_BOS = {b"chatglm-bpe", b"glm4", b"glm5"}


def _check_special_tokens(r: _Reader, kv, model, n_tokens) -> None:
    """Tokenizing aborts (GGML_ASSERT in llama_vocab::impl::tokenize) when the vocabulary adds a
    BOS/EOS/SEP token that it does not have: e.g. a t5 vocabulary told to add BOS, without one."""
    if model not in _VOCAB_DEFAULTS:
        return
    vtype, bos, eos, sep, add_bos, add_eos = _VOCAB_DEFAULTS[model]
    pre_kv = kv.get("tokenizer.ggml.pre")
    pre = pre_kv[3] if pre_kv and pre_kv[0] == GGUF_TYPE_STRING else None
    if vtype == "bpe" and model != b"gemma4":
        add_bos = pre in _BPE_ADD_BOS
        if pre in _BPE_NO_BOS:
            bos = None

    def special(name, default):
        # a default outside the vocabulary is disabled; the file's id counts only inside it
        token = default if default is not None and default < n_tokens else None
        value = kv.get(f"tokenizer.ggml.{name}_token_id")
        if value is not None and value[0] == GGUF_TYPE_UINT32 and value[3] < n_tokens:
            token = value[3]
        return token

    def flag(name, default):
        value = kv.get(f"tokenizer.ggml.add_{name}_token")
        return bool(value[3]) if value is not None and value[0] == 7 else default

    bos, eos, sep = special("bos", bos), special("eos", eos), special("seperator", sep)
    add_bos, add_eos = flag("bos", add_bos), flag("eos", add_eos)
    if model == b"gemma4":
        add_bos = True                            # llama.cpp forces it for Gemma 4
    what = f"the {_name(model)} vocabulary"
    if vtype == "wpm":
        if bos is None or sep is None:
            r.fail(f"{what} has no {'BOS' if bos is None else 'SEP'} token (tokenizer.ggml."
                   f"{'bos' if bos is None else 'seperator'}_token_id), which llama.cpp adds to "
                   "every text: it would abort in the first tokenize")
        return
    if add_bos and bos is None:
        r.fail(f"{what} adds a BOS token but has none (tokenizer.ggml.bos_token_id missing or out "
               "of range): llama.cpp would abort in the first tokenize")
    if add_eos and eos is None:
        r.fail(f"{what} adds an EOS token but has none (tokenizer.ggml.eos_token_id missing or out "
               "of range): llama.cpp would abort in the first tokenize")
