"""Tiny GGUF models of architectures other than llama, for tests of what llama.cpp does with them:
a Mamba and a Mamba-2 (recurrent: their memory is a conv and an SSM state per sequence, no KV
cache) and a Granite hybrid (Mamba-2 layers and attention layers, a KV cache and a recurrent state side by side).

Seeded random weights, the SentencePiece vocabulary of alpaca2.testing, shapes as
src/models/mamba.cpp, mamba2.cpp and granite-hybrid.cpp of the vendored llama.cpp create them (GGUF
lists dimensions innermost first, numpy outermost first, so every shape below is reversed).  No
numpy oracle: these models are for loading, state and metadata checks, not for logits.

    >>> from alpaca2 import testing_archs
    >>> path = testing_archs.make_mamba_model("mamba.gguf")
    >>> path = testing_archs.make_granite_hybrid_model("hybrid.gguf")     # layers: SSM, attention
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from alpaca2.testing import _require, _vocab_from_spm, train_tokenizer

MAMBA_SHAPE = dict(n_embd=32, n_layer=2, d_conv=4, d_state=8, dt_rank=4, n_ctx_train=256)
# n_head_kv per layer: 0 marks a recurrent (Mamba-2) layer, as llama.cpp reads it
GRANITE_HYBRID_SHAPE = dict(n_embd=32, n_head=4, n_head_kv=(0, 2), n_ff=64, d_conv=4, d_state=8,
                            n_ssm_head=4, n_group=1, n_ctx_train=256)


def _writer(path, arch, tokenizer, vocab_size, name):
    gguf = _require("gguf")
    path = Path(path)
    if tokenizer is None:
        tokenizer = train_tokenizer(path.with_suffix(".tokenizer.model"), vocab_size=vocab_size)
    pieces, scores, types, _ = _vocab_from_spm(tokenizer)
    tmp = path.with_name(path.name + ".part")
    writer = gguf.GGUFWriter(str(tmp), arch)
    writer.add_name(name)
    writer.add_file_type(0)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(pieces)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    return writer, tmp, path, len(pieces)


def _finish(writer, tensors, tmp, path):
    for tname, arr in tensors.items():
        writer.add_tensor(tname, arr)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, path)
    return str(path)


class _Random:
    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)

    def mat(self, out, inp, scale=1.0):
        return (self.rng.standard_normal((out, inp), dtype=np.float32) * np.float32(scale / np.sqrt(inp)))

    def norm(self, *shape):
        return (1.0 + 0.1 * self.rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)

    def small(self, *shape):
        return (0.1 * self.rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)


def _ssm_header(writer, s, n_layer, d_inner, d_conv, d_state, time_step_rank):
    """The keys a pure SSM model (Mamba, Mamba-2) has: no attention heads, no feed-forward."""
    writer.add_context_length(s["n_ctx_train"])
    writer.add_embedding_length(s["n_embd"])
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(0)
    writer.add_head_count(0)
    writer.add_ssm_conv_kernel(d_conv)
    writer.add_ssm_inner_size(d_inner)
    writer.add_ssm_state_size(d_state)
    writer.add_ssm_time_step_rank(time_step_rank)
    writer.add_layer_norm_rms_eps(1e-5)


def make_mamba_model(path, tokenizer=None, shape=None, seed=0, vocab_size=600, name="tiny-mamba"):
    """Write a Mamba (v1) GGUF model at path and return the path.  d_inner is 2 * n_embd, the only
    expansion llama.cpp supports; shape overrides keys of MAMBA_SHAPE."""
    s = dict(MAMBA_SHAPE, **(shape or {}))
    n_embd, n_layer, d_conv, d_state, dt_rank = s["n_embd"], s["n_layer"], s["d_conv"], s["d_state"], s["dt_rank"]
    d_inner = 2 * n_embd
    writer, tmp, path, n_vocab = _writer(path, "mamba", tokenizer, vocab_size, name)
    _ssm_header(writer, s, n_layer, d_inner, d_conv, d_state, dt_rank)
    r = _Random(seed)
    t = {"token_embd.weight": r.rng.standard_normal((n_vocab, n_embd), dtype=np.float32),
         "output_norm.weight": r.norm(n_embd), "output.weight": r.mat(n_vocab, n_embd, 2.0)}
    for i in range(n_layer):
        p = f"blk.{i}."
        t[p + "attn_norm.weight"] = r.norm(n_embd)
        t[p + "ssm_in.weight"] = r.mat(2 * d_inner, n_embd)
        t[p + "ssm_conv1d.weight"] = r.mat(d_inner, d_conv)
        t[p + "ssm_conv1d.bias"] = r.small(d_inner)
        t[p + "ssm_x.weight"] = r.mat(dt_rank + 2 * d_state, d_inner)
        t[p + "ssm_dt.weight"] = r.mat(d_inner, dt_rank)
        t[p + "ssm_dt.bias"] = r.small(d_inner)
        # A = -exp(A_log) < 0, as the converter stores it
        t[p + "ssm_a"] = -np.exp(r.small(d_inner, d_state)).astype(np.float32)
        t[p + "ssm_d"] = r.norm(d_inner)
        t[p + "ssm_out.weight"] = r.mat(n_embd, d_inner)
    return _finish(writer, t, tmp, path)


def make_mamba2_model(path, tokenizer=None, shape=None, seed=0, vocab_size=600, name="tiny-mamba2"):
    """Write a Mamba-2 GGUF model at path and return the path: per layer a norm and a Mamba-2
    mixer (heads of d_inner / n_ssm_head, n_group groups), as src/models/mamba2.cpp loads it.
    shape overrides keys of GRANITE_HYBRID_SHAPE (n_embd, d_conv, d_state, n_ssm_head, n_group)
    plus n_layer (default 2)."""
    s = dict(GRANITE_HYBRID_SHAPE, n_layer=2, **(shape or {}))
    n_embd, n_layer = s["n_embd"], s["n_layer"]
    d_conv, d_state, n_ssm_head, n_group = s["d_conv"], s["d_state"], s["n_ssm_head"], s["n_group"]
    d_inner = 2 * n_embd
    conv_dim = d_inner + 2 * n_group * d_state
    writer, tmp, path, n_vocab = _writer(path, "mamba2", tokenizer, vocab_size, name)
    _ssm_header(writer, s, n_layer, d_inner, d_conv, d_state, n_ssm_head)
    writer.add_ssm_group_count(n_group)
    r = _Random(seed)
    t = {"token_embd.weight": r.rng.standard_normal((n_vocab, n_embd), dtype=np.float32),
         "output_norm.weight": r.norm(n_embd), "output.weight": r.mat(n_vocab, n_embd, 2.0)}
    for i in range(n_layer):
        p = f"blk.{i}."
        t[p + "attn_norm.weight"] = r.norm(n_embd)
        t[p + "ssm_in.weight"] = r.mat(d_inner + conv_dim + n_ssm_head, n_embd)
        t[p + "ssm_conv1d.weight"] = r.mat(conv_dim, d_conv)
        t[p + "ssm_conv1d.bias"] = r.small(conv_dim)
        t[p + "ssm_dt.bias"] = r.small(n_ssm_head)
        t[p + "ssm_a"] = -np.exp(r.small(n_ssm_head, 1)).astype(np.float32)
        t[p + "ssm_d"] = r.norm(n_ssm_head, 1)
        t[p + "ssm_norm.weight"] = r.norm(n_group, d_inner // n_group)
        t[p + "ssm_out.weight"] = r.mat(n_embd, d_inner)
    return _finish(writer, t, tmp, path)


def make_granite_hybrid_model(path, tokenizer=None, shape=None, seed=0, vocab_size=600,
                              name="tiny-granite-hybrid"):
    """Write a Granite hybrid (granitehybrid) GGUF model at path and return the path: per layer a
    Mamba-2 mixer where n_head_kv is 0, else attention, each followed by a SwiGLU FFN.
    shape overrides keys of GRANITE_HYBRID_SHAPE (n_head_kv is a tuple, one value per layer)."""
    s = dict(GRANITE_HYBRID_SHAPE, **(shape or {}))
    n_embd, n_head, n_ff = s["n_embd"], s["n_head"], s["n_ff"]
    n_head_kv = list(s["n_head_kv"])
    n_layer = len(n_head_kv)
    d_conv, d_state, n_ssm_head, n_group = s["d_conv"], s["d_state"], s["n_ssm_head"], s["n_group"]
    d_inner = 2 * n_embd
    head_dim = n_embd // n_head
    d_in_proj = 2 * d_inner + 2 * n_group * d_state + n_ssm_head
    d_conv_ch = d_inner + 2 * n_group * d_state
    writer, tmp, path, n_vocab = _writer(path, "granitehybrid", tokenizer, vocab_size, name)
    writer.add_context_length(s["n_ctx_train"])
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_float32("granitehybrid.embedding_scale", 1.0)
    writer.add_float32("granitehybrid.residual_scale", 1.0)
    writer.add_float32("granitehybrid.logit_scale", 1.0)
    writer.add_ssm_conv_kernel(d_conv)
    writer.add_ssm_inner_size(d_inner)
    writer.add_ssm_state_size(d_state)
    writer.add_ssm_time_step_rank(n_ssm_head)
    writer.add_ssm_group_count(n_group)
    r = _Random(seed)
    t = {"token_embd.weight": r.rng.standard_normal((n_vocab, n_embd), dtype=np.float32),
         "output_norm.weight": r.norm(n_embd), "output.weight": r.mat(n_vocab, n_embd, 2.0)}
    for i in range(n_layer):
        p = f"blk.{i}."
        t[p + "attn_norm.weight"] = r.norm(n_embd)
        if n_head_kv[i] == 0:
            t[p + "ssm_in.weight"] = r.mat(d_in_proj, n_embd)
            t[p + "ssm_conv1d.weight"] = r.mat(d_conv_ch, d_conv)
            t[p + "ssm_conv1d.bias"] = r.small(d_conv_ch)
            t[p + "ssm_dt.bias"] = r.small(n_ssm_head)
            t[p + "ssm_a"] = -np.exp(r.small(n_ssm_head, 1)).astype(np.float32)
            t[p + "ssm_d"] = r.norm(n_ssm_head, 1)
            t[p + "ssm_norm.weight"] = r.norm(n_group, d_inner // n_group)
            t[p + "ssm_out.weight"] = r.mat(n_embd, d_inner)
        else:
            t[p + "attn_q.weight"] = r.mat(n_head * head_dim, n_embd, 2.0)
            t[p + "attn_k.weight"] = r.mat(n_head_kv[i] * head_dim, n_embd, 2.0)
            t[p + "attn_v.weight"] = r.mat(n_head_kv[i] * head_dim, n_embd)
            t[p + "attn_output.weight"] = r.mat(n_embd, n_head * head_dim)
        t[p + "ffn_norm.weight"] = r.norm(n_embd)
        t[p + "ffn_gate.weight"] = r.mat(n_ff, n_embd)
        t[p + "ffn_up.weight"] = r.mat(n_ff, n_embd)
        t[p + "ffn_down.weight"] = r.mat(n_embd, n_ff)
    return _finish(writer, t, tmp, path)
