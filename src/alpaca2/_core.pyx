# cython: language_level=3, boundscheck=False, cdivision=True, embedsignature=True
"""alpaca2._core: the Cython layer over llama.cpp.

One cdef class per llama.cpp handle (Model, Context, Batch, SamplerChain/Sampler), each in its own
file under _core/ (included below); the GIL is released around every call that does real work.
"""
cimport cython
cimport numpy as cnp
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from cpython.exc cimport PyErr_CheckSignals
from cpython.ref cimport Py_INCREF
from libc.stdint cimport int8_t, int32_t, int64_t, uint8_t, uint32_t
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy, strlen
from libc.math cimport isinf

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
)

cnp.import_array()

# The sampler calls can throw C++ exceptions (the grammar sampler) through llama.cpp's C API.
# Declared here with `except +` (this module is C++) so they become Python exceptions; the
# public _c/llama.pxd keeps plain C declarations that C extensions can cimport.
cdef extern from "llama.h" nogil:
    void sampler_accept_cpp "llama_sampler_accept"(llama_sampler * smpl, llama_token token) except +
    void sampler_apply_cpp "llama_sampler_apply"(llama_sampler * smpl, llama_token_data_array * cur_p) except +
    llama_token sampler_sample_cpp "llama_sampler_sample"(llama_sampler * smpl, llama_context * ctx, int32_t idx) except +

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
