"""Small llama-architecture GGUF models for tests and benchmarks, and a numpy oracle.

Everything here is made locally in seconds: a SentencePiece vocabulary (trained on a few KB of
mixed Chinese/English text with byte fallback, as Chinese-LLaMA-2's tokenizer has, or loaded
from any ``tokenizer.model``), chosen shapes, seeded random weights, and a float64 reference
forward pass that follows llama.cpp's llama graph exactly (RMSNorm, RoPE "norm" mode, GQA,
SwiGLU).  Needs the optional packages ``gguf`` and ``sentencepiece`` (``pip install .[test]``).

    >>> from alpaca2 import testing
    >>> path = testing.make_model("tiny.gguf")                 # tiny shapes, trained vocab
    >>> path = testing.make_model("a13b.gguf", shape="1.3b",   # real Chinese-Alpaca-2 1.3B shape
    ...                           tokenizer="chinese-llama-2-tokenizer.model", ftype="f16")
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path

import numpy as np

# A few KB of text to train a tiny SentencePiece vocabulary on: classical poetry, modern prose,
# English, digits, punctuation.  Rare characters outside it are covered by byte fallback.
CORPUS = """\
床前明月光，疑是地上霜。举头望明月，低头思故乡。
白日依山尽，黄河入海流。欲穷千里目，更上一层楼。
春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。
红豆生南国，春来发几枝。愿君多采撷，此物最相思。
千山鸟飞绝，万径人踪灭。孤舟蓑笠翁，独钓寒江雪。
锄禾日当午，汗滴禾下土。谁知盘中餐，粒粒皆辛苦。
你是一个乐于助人的助手。请用中文回答问题。今天天气很好，我们去公园散步吧。
中文大语言模型可以理解和生成中文文本，也可以回答英文问题。
人工智能正在改变我们的生活和工作方式，机器学习需要大量的数据。
北京是中国的首都，上海是一个国际化的大城市。长江和黄河是中国最长的两条河流。
You are a helpful assistant. Please answer the question in English.
The quick brown fox jumps over the lazy dog. Large language models predict the next token.
Machine learning models are trained on large amounts of text data from the internet.
In 2023, the Chinese-LLaMA-2 project released models with 1.3B, 7B and 13B parameters.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14159 2.71828 42 2024 12345.
Code: def main(): print("hello, world") return 0; x = [1, 2, 3]; y = {"a": 1}.
Mixed: 我爱Python和C++。GPU加速让推理更快。Token化（tokenization）很重要！
"""

# name: (n_vocab or None for the tokenizer's, n_embd, n_layer, n_head, n_head_kv, n_ff, n_ctx_train)
SHAPES = {
    "tiny": (None, 64, 2, 4, 2, 128, 512),
    "small": (None, 256, 4, 8, 4, 512, 2048),
    # Chinese-Alpaca-2 shapes (LLaMA-2 architecture, 55,296-piece vocabulary).
    "1.3b": (None, 4096, 4, 32, 32, 11008, 4096),
    "7b": (None, 4096, 32, 32, 32, 11008, 4096),
    "13b": (None, 5120, 40, 40, 40, 13824, 4096),
}

TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6


def _require(name):
    try:
        return __import__(name)
    except ImportError:
        raise ImportError(f"alpaca2.testing needs the '{name}' package: pip install 'alpaca2-llama[test]'") from None


def train_tokenizer(path, vocab_size: int = 800, corpus: str = CORPUS, seed: int = 0) -> str:
    """Train a SentencePiece BPE model with byte fallback (like Chinese-LLaMA-2's) at path.

    Returns the path of the .model file.  Normalization is the identity and whitespace is kept,
    as in the LLaMA tokenizer, so llama.cpp and sentencepiece must agree on every string.
    """
    spm = _require("sentencepiece")
    path = str(path)
    prefix = path[:-len(".model")] if path.endswith(".model") else path
    with tempfile.TemporaryDirectory() as tmp:
        txt = os.path.join(tmp, "corpus.txt")
        with open(txt, "w", encoding="utf-8") as f:
            f.write(corpus)
        spm.SentencePieceTrainer.train(
            input=txt, model_prefix=prefix, vocab_size=vocab_size, model_type="bpe",
            byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
            remove_extra_whitespaces=False, add_dummy_prefix=True, split_digits=True,
            hard_vocab_limit=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            num_threads=1, minloglevel=2,
        )
    return prefix + ".model"


def _vocab_from_spm(tokenizer_path):
    spm = _require("sentencepiece")
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    pieces, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        pieces.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        if sp.is_unknown(i):
            types.append(TOKEN_UNKNOWN)
        elif sp.is_control(i):
            types.append(TOKEN_CONTROL)
        elif sp.is_byte(i):
            types.append(TOKEN_BYTE)
        elif sp.is_unused(i):
            types.append(TOKEN_UNUSED)
        else:
            types.append(TOKEN_NORMAL)
    return pieces, scores, types, sp


@dataclasses.dataclass
class Weights:
    """The weights of a llama model as float32 arrays, (out, in) like GGUF's numpy view."""
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_vocab: int
    rope_base: float
    eps: float
    tensors: dict

    @property
    def head_dim(self):
        return self.n_embd // self.n_head


def random_weights(n_vocab, n_embd, n_layer, n_head, n_head_kv, n_ff, seed=0, rope_base=10000.0,
                   eps=1e-5, dtype=np.float32) -> Weights:
    """Seeded random weights; scaled so activations stay O(1) and logits vary from token to token."""
    rng = np.random.default_rng(seed)
    hd = n_embd // n_head

    def mat(out, inp, scale=1.0):
        return (rng.standard_normal((out, inp), dtype=np.float32) * (scale / np.sqrt(inp))).astype(dtype)

    def norm(n):
        return (1.0 + 0.1 * rng.standard_normal(n, dtype=np.float32)).astype(np.float32)

    t = {
        "token_embd.weight": rng.standard_normal((n_vocab, n_embd), dtype=np.float32).astype(dtype),
        "output_norm.weight": norm(n_embd),
        "output.weight": mat(n_vocab, n_embd, 2.0),
    }
    for i in range(n_layer):
        p = f"blk.{i}."
        t[p + "attn_norm.weight"] = norm(n_embd)
        t[p + "attn_q.weight"] = mat(n_head * hd, n_embd, 2.0)
        t[p + "attn_k.weight"] = mat(n_head_kv * hd, n_embd, 2.0)
        t[p + "attn_v.weight"] = mat(n_head_kv * hd, n_embd)
        t[p + "attn_output.weight"] = mat(n_embd, n_head * hd)
        t[p + "ffn_norm.weight"] = norm(n_embd)
        t[p + "ffn_gate.weight"] = mat(n_ff, n_embd)
        t[p + "ffn_up.weight"] = mat(n_ff, n_embd)
        t[p + "ffn_down.weight"] = mat(n_embd, n_ff)
    return Weights(n_embd, n_layer, n_head, n_head_kv, n_ff, n_vocab, rope_base, eps, t)


def _lazy_tensors(n_vocab, n_embd, n_layer, n_head, n_head_kv, n_ff, seed, dtype):
    """(name, shape, dtype, make) per tensor, each made on demand from its own seeded generator:
    what random_weights() holds in memory at once, one tensor at a time (7B/13B shapes)."""
    hd = n_embd // n_head

    def mat(i, out, inp, scale=1.0):
        def make():
            rng = np.random.default_rng([seed, i])
            return (rng.standard_normal((out, inp), dtype=np.float32) * np.float32(scale / np.sqrt(inp))).astype(dtype)
        return (out, inp), np.dtype(dtype), make

    def norm(i, n):
        def make():
            rng = np.random.default_rng([seed, i])
            return (1.0 + 0.1 * rng.standard_normal(n, dtype=np.float32)).astype(np.float32)
        return (n,), np.dtype(np.float32), make

    specs = [("token_embd.weight",) + mat(0, n_vocab, n_embd, np.sqrt(n_embd)),
             ("output_norm.weight",) + norm(1, n_embd),
             ("output.weight",) + mat(2, n_vocab, n_embd, 2.0)]
    k = 3
    for i in range(n_layer):
        p = f"blk.{i}."
        for tname, spec in (("attn_norm", ("norm", n_embd)), ("attn_q", (n_head * hd, n_embd, 2.0)),
                            ("attn_k", (n_head_kv * hd, n_embd, 2.0)), ("attn_v", (n_head_kv * hd, n_embd)),
                            ("attn_output", (n_embd, n_head * hd)), ("ffn_norm", ("norm", n_embd)),
                            ("ffn_gate", (n_ff, n_embd)), ("ffn_up", (n_ff, n_embd)),
                            ("ffn_down", (n_embd, n_ff))):
            made = norm(k, spec[1]) if spec[0] == "norm" else mat(k, *spec)
            specs.append((p + tname + ".weight",) + made)
            k += 1
    return specs


def make_model(path, shape="tiny", tokenizer=None, ftype="f32", seed=0, vocab_size=800,
               name="tiny-llama", chat_template=None, n_layer=None, return_weights=False,
               lazy=None, added_tokens=()):
    """Write a llama-architecture GGUF model at path and return the path (and the Weights).

    ``shape``: a key of SHAPES or a dict with n_embd, n_layer, n_head, n_head_kv, n_ff, n_ctx_train.
    ``tokenizer``: a SentencePiece .model file; default: train one with vocab_size pieces next to
    the model.  ``ftype``: "f32" or "f16" (quantize further with alpaca2.quantize).
    ``lazy``: make and write one tensor at a time (other random values, same statistics), so a
    7B/13B shape needs memory for its largest tensor only; default: when it has over 1e9 weights.
    ``added_tokens``: texts appended to the vocabulary as user-defined tokens (one id each, matched
    whole in any text, as a real model's ``<think>``).
    """
    gguf = _require("gguf")
    path = Path(path)
    if isinstance(shape, str):
        _, n_embd, n_lay, n_head, n_head_kv, n_ff, n_ctx_train = SHAPES[shape]
    else:
        n_embd, n_lay, n_head, n_head_kv, n_ff, n_ctx_train = (
            shape["n_embd"], shape["n_layer"], shape["n_head"], shape["n_head_kv"], shape["n_ff"],
            shape.get("n_ctx_train", 2048))
    if n_layer is not None:
        n_lay = n_layer
    if tokenizer is None:
        tokenizer = train_tokenizer(path.with_suffix(".tokenizer.model"), vocab_size=vocab_size)
    pieces, scores, types, _ = _vocab_from_spm(tokenizer)
    for text in added_tokens:
        pieces, scores, types = pieces + [text], scores + [0.0], types + [TOKEN_USER_DEFINED]
    if ftype not in ("f32", "f16"):
        raise ValueError("ftype must be 'f32' or 'f16'; quantize with alpaca2.quantize")
    mat_dtype = np.float16 if ftype == "f16" else np.float32
    n_weights = n_lay * (2 * n_embd * n_embd + 3 * n_embd * n_ff) + 2 * len(pieces) * n_embd
    if lazy is None:
        lazy = n_weights > 1e9 and not return_weights
    if lazy and return_weights:
        raise ValueError("return_weights needs the weights in memory (lazy=False)")
    if lazy:
        specs = _lazy_tensors(len(pieces), n_embd, n_lay, n_head, n_head_kv, n_ff, seed, mat_dtype)
        w = Weights(n_embd, n_lay, n_head, n_head_kv, n_ff, len(pieces), 10000.0, 1e-5, {})
    else:
        w = random_weights(len(pieces), n_embd, n_lay, n_head, n_head_kv, n_ff, seed=seed, dtype=mat_dtype)

    tmp = path.with_name(path.name + ".part")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    writer.add_name(name)
    writer.add_context_length(n_ctx_train)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_lay)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_rope_dimension_count(n_embd // n_head)
    writer.add_rope_freq_base(w.rope_base)
    writer.add_layer_norm_rms_eps(w.eps)
    writer.add_file_type(1 if ftype == "f16" else 0)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(pieces)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    if lazy:
        for tname, tshape, tdtype, _ in specs:
            writer.add_tensor_info(tname, tshape, tdtype, int(np.prod(tshape)) * tdtype.itemsize)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for _, _, _, make in specs:
            writer.write_tensor_data(make())
    else:
        for tname, arr in w.tensors.items():
            writer.add_tensor(tname, arr)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, path)
    if return_weights:
        w.tensors = {k: v.astype(np.float32) for k, v in w.tensors.items()}
        return str(path), w
    return str(path)


def reference_logits(w: Weights, tokens) -> np.ndarray:
    """float64 forward pass of llama.cpp's llama graph: logits for every position, (n, n_vocab)."""
    return reference_hidden(w, tokens) @ w.tensors["output.weight"].astype(np.float64).T


def reference_hidden(w: Weights, tokens) -> np.ndarray:
    """The final normalized hidden states (what llama.cpp's embeddings are made of), (n, n_embd)."""
    t = {k: v.astype(np.float64) for k, v in w.tensors.items()}
    tokens = np.asarray(tokens)
    n = len(tokens)
    hd = w.head_dim
    x = t["token_embd.weight"][tokens]                     # (n, n_embd)

    def rmsnorm(v, g):
        return v / np.sqrt(np.mean(v * v, axis=-1, keepdims=True) + w.eps) * g

    pos = np.arange(n)[:, None]
    inv = w.rope_base ** (-np.arange(0, hd, 2) / hd)     # (hd/2,)
    ang = pos * inv[None, :]
    cos, sin = np.cos(ang), np.sin(ang)

    def rope(v):                                          # v: (n, heads, hd); adjacent pairs (mode 0)
        a, b = v[..., 0::2], v[..., 1::2]
        c, s = cos[:, None, :], sin[:, None, :]
        out = np.empty_like(v)
        out[..., 0::2] = a * c - b * s
        out[..., 1::2] = a * s + b * c
        return out

    mask = np.triu(np.full((n, n), -np.inf), k=1)
    group = w.n_head // w.n_head_kv
    for i in range(w.n_layer):
        p = f"blk.{i}."
        h = rmsnorm(x, t[p + "attn_norm.weight"])
        q = rope((h @ t[p + "attn_q.weight"].T).reshape(n, w.n_head, hd))
        k = rope((h @ t[p + "attn_k.weight"].T).reshape(n, w.n_head_kv, hd))
        v = (h @ t[p + "attn_v.weight"].T).reshape(n, w.n_head_kv, hd)
        heads = []
        for hh in range(w.n_head):
            kv = hh // group
            s = q[:, hh, :] @ k[:, kv, :].T / np.sqrt(hd) + mask
            s = np.exp(s - s.max(axis=-1, keepdims=True))
            s /= s.sum(axis=-1, keepdims=True)
            heads.append(s @ v[:, kv, :])
        x = x + np.concatenate(heads, axis=-1) @ t[p + "attn_output.weight"].T
        h = rmsnorm(x, t[p + "ffn_norm.weight"])
        g = h @ t[p + "ffn_gate.weight"].T
        u = h @ t[p + "ffn_up.weight"].T
        x = x + ((g / (1.0 + np.exp(-g))) * u) @ t[p + "ffn_down.weight"].T
    return rmsnorm(x, t["output_norm.weight"])


# -- LoRA adapters ---------------------------------------------------------------------------------

LORA_TARGETS = ("attn_q", "attn_v", "ffn_down")


def make_lora(path, weights: Weights, rank: int = 4, alpha: float = 8.0, targets=LORA_TARGETS, seed: int = 1,
              output: bool = True, arch: str = "llama"):
    """Write a LoRA adapter for a make_model() model in llama.cpp's GGUF LoRA format (what
    convert_lora_to_gguf.py writes): general.type "adapter", adapter.type "lora",
    adapter.lora.alpha, and per adapted weight ``<name>.lora_a`` (rank, n_in) and
    ``<name>.lora_b`` (n_out, rank), numpy's (out, in) view.

    Returns (path, {weight name: (A, B)}) in float32; ``merge_lora`` makes the reference weights.
    ``targets``: the layers' weights to adapt (blk.N.<target>.weight); ``output`` adapts
    output.weight too.
    """
    gguf = _require("gguf")
    path = Path(path)
    rng = np.random.default_rng(seed)
    names = [f"blk.{i}.{t}.weight" for i in range(weights.n_layer) for t in targets]
    if output:
        names.append("output.weight")
    pairs = {}
    for name in names:
        n_out, n_in = weights.tensors[name].shape
        a = (rng.standard_normal((rank, n_in)) / np.sqrt(n_in)).astype(np.float32)
        b = (rng.standard_normal((n_out, rank)) / np.sqrt(rank)).astype(np.float32)
        pairs[name] = (a, b)
    tmp = path.with_name(path.name + ".part")
    writer = gguf.GGUFWriter(str(tmp), arch)
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(alpha))
    for name, (a, b) in pairs.items():
        writer.add_tensor(name + ".lora_a", a)
        writer.add_tensor(name + ".lora_b", b)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, path)
    return str(path), pairs


def merge_lora(weights: Weights, pairs: dict, scale: float = 1.0, alpha: float = 8.0) -> Weights:
    """The weights with a LoRA adapter merged in, as llama.cpp applies it at run time:
    W + scale * alpha / rank * B @ A (scale alone when alpha is 0)."""
    tensors = dict(weights.tensors)
    for name, (a, b) in pairs.items():
        rank = a.shape[0]
        s = scale * alpha / rank if alpha else scale
        tensors[name] = (tensors[name].astype(np.float64) + s * (b.astype(np.float64) @ a.astype(np.float64)))
    return dataclasses.replace(weights, tensors=tensors)
