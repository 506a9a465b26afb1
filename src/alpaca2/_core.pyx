# cython: language_level=3, boundscheck=False, cdivision=True, embedsignature=True
"""alpaca2._core: the Cython layer over llama.cpp.

One cdef class per llama.cpp handle (Model, Context, Batch, SamplerChain/Sampler), each in its own
file under _core/ (included below); the GIL is released around every call that does real work.
"""
cimport cython
cimport numpy as cnp
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from cpython.exc cimport PyErr_CheckSignals
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy, strlen
from libc.math cimport isinf, isnan

from alpaca2._c.ggml cimport *
from alpaca2._c.ggml_backend cimport *
from alpaca2._c.llama cimport *
from alpaca2._c.ggml_rpc cimport RPC_PROTO_MAJOR_VERSION, RPC_PROTO_MINOR_VERSION, RPC_PROTO_PATCH_VERSION

import logging
import math
import os
import random
import threading
import weakref

import numpy as np

from alpaca2.errors import (
    Alpaca2Error, ModelLoadError, ContextFullError, DecodeError, DecodeAborted, ClosedError,
    TokenizeError, StateError, GrammarError, SamplerError, VocabMismatchError, OutOfMemoryError, RPCServerError,
    ArgumentTypeError, ArgumentValueError, InvalidBatchError, IncompleteChainError,
)

cnp.import_array()

# The sampler and tokenizer calls can throw C++ exceptions through llama.cpp's C API.
# Declared here with `except +` (this module is C++) so they become Python exceptions; the
# public _c/llama.pxd keeps plain C declarations that C extensions can cimport.
cdef extern from "llama.h" nogil:
    void sampler_accept_cpp "llama_sampler_accept"(llama_sampler * smpl, llama_token token) except +
    void sampler_apply_cpp "llama_sampler_apply"(llama_sampler * smpl, llama_token_data_array * cur_p) except +
    llama_token sampler_sample_cpp "llama_sampler_sample"(llama_sampler * smpl, llama_context * ctx, int32_t idx) except +
    # a trigger pattern is compiled as a std::regex: a bad one throws
    llama_sampler * sampler_init_grammar_lazy_cpp "llama_sampler_init_grammar_lazy_patterns"(
        const llama_vocab * vocab, const char * grammar_str, const char * grammar_root,
        const char ** trigger_patterns, size_t num_trigger_patterns,
        const llama_token * trigger_tokens, size_t num_trigger_tokens) except +
    # the tokenizer allocates and indexes (std::bad_alloc, std::out_of_range) inside the C API too
    int32_t tokenize_cpp "llama_tokenize"(const llama_vocab * vocab, const char * text, int32_t text_len,
                                          llama_token * tokens, int32_t n_tokens_max, bint add_special,
                                          bint parse_special) except +
    int32_t token_to_piece_cpp "llama_token_to_piece"(const llama_vocab * vocab, llama_token token, char * buf,
                                                      int32_t length, int32_t lstrip, bint special) except +
    int32_t detokenize_cpp "llama_detokenize"(const llama_vocab * vocab, const llama_token * tokens,
                                              int32_t n_tokens, char * text, int32_t text_len_max,
                                              bint remove_special, bint unparse_special) except +
    llama_sampler * sampler_init_grammar_cpp "llama_sampler_init_grammar"(
        const llama_vocab * vocab, const char * grammar_str, const char * grammar_root) except +

# picks without copying the whole vocabulary: greedy's first maximum, a top-k chain over its candidates
cdef extern from "_fastpick.h" nogil:
    llama_token alpaca2_first_max(const float * lg, int n)
    llama_token alpaca2_sample_topk(llama_sampler * chain, int n_pre, int k, int m, const float * lg, int n,
                                    const llama_token * extra, int n_extra, llama_token_data * buf) except +

cdef extern from "_sigint.h" nogil:
    int alpaca2_sigint_install()
    void alpaca2_sigint_restore()
    int alpaca2_sigint_pending()
    void alpaca2_sigint_clear()

_PKG_DIR = os.path.dirname(os.path.abspath(__file__))

cdef extern from "pythread.h":
    unsigned long PyThread_get_thread_ident()

# Ctrl+C reaches Python's main thread only; compared per decode without touching `threading`
cdef unsigned long _main_thread_ident = threading.main_thread().ident


# One file per handle or concern, read in the order a prompt travels:
# tokens (vocab) -> decode (batch, context) -> logits -> sample (sampler) -> text (vocab).
include "_core/errors.pxi"
include "_core/backends.pxi"
include "_core/model.pxi"
include "_core/vocab.pxi"
include "_core/batch.pxi"
include "_core/context.pxi"
include "_core/logits.pxi"
include "_core/sampler.pxi"
include "_core/speculative.pxi"
include "_core/lora.pxi"
include "_core/quantize.pxi"
include "_core/chat_template.pxi"
