# cython: language_level=3, boundscheck=False, cdivision=True, embedsignature=True
"""alpaca2._core: the Cython layer over llama.cpp.

One cdef class per llama.cpp handle (Model, Context, Batch, SamplerChain/Sampler); the GIL is
released around every call that does real work; logits are exposed as numpy views without copies.
"""
cimport cython
cimport numpy as cnp
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from cpython.exc cimport PyErr_CheckSignals
from cpython.ref cimport Py_INCREF
from libc.stdint cimport int8_t, int32_t, int64_t, uint8_t, uint32_t
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy, strlen

from alpaca2._c.ggml cimport *
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
    # a trigger pattern is compiled as a std::regex: a bad one throws
    llama_sampler * sampler_init_grammar_lazy_cpp "llama_sampler_init_grammar_lazy_patterns"(
        const llama_vocab * vocab, const char * grammar_str, const char * grammar_root,
        const char ** trigger_patterns, size_t num_trigger_patterns,
        const llama_token * trigger_tokens, size_t num_trigger_tokens) except +

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

# ------------------------------------------------------------------------------------------------
# Logging: llama.cpp/ggml messages go to the Python logger "alpaca2.llama".  The level test is
# done in C first, so suppressed messages (the default: below WARNING) never take the GIL.

log = logging.getLogger("alpaca2.llama")


_EXPECTED_MESSAGES = (
    # an aborted decode (abort(), Ctrl+C) becomes an exception; llama.cpp's ERROR lines about it go
    "failed to compute graph, compute status: 1", "failed to decode, ret = 2",
    # Context(swa_full=True) is alpaca2's choice (KV reuse needs it), not a problem to warn about
    "using full-size SWA cache",
)


def _not_an_abort(record):
    """Drop llama.cpp's messages about what alpaca2 did on purpose (see _EXPECTED_MESSAGES)."""
    msg = record.getMessage()
    return not any(m in msg for m in _EXPECTED_MESSAGES)


log.addFilter(_not_an_abort)
cdef int _log_threshold = GGML_LOG_LEVEL_WARN
cdef int _log_last_level = GGML_LOG_LEVEL_INFO
_log_buffer = []
_PY_LEVELS = {
    GGML_LOG_LEVEL_DEBUG: logging.DEBUG, GGML_LOG_LEVEL_INFO: logging.INFO,
    GGML_LOG_LEVEL_WARN: logging.WARNING, GGML_LOG_LEVEL_ERROR: logging.ERROR,
}


cdef void _emit_log(int level, const char * text) noexcept with gil:
    try:
        _log_buffer.append(text.decode("utf-8", "replace"))
        joined = "".join(_log_buffer)
        if not joined.endswith("\n"):
            return
        _log_buffer.clear()
        for line in joined.rstrip("\n").split("\n"):
            log.log(_PY_LEVELS.get(level, logging.INFO), "%s", line)
    except BaseException:
        pass


cdef void _log_callback(ggml_log_level level, const char * text, void * user_data) noexcept nogil:
    global _log_last_level
    cdef int lvl = level
    if lvl == GGML_LOG_LEVEL_CONT:
        lvl = _log_last_level
    else:
        _log_last_level = lvl
    if lvl >= _log_threshold and text != NULL:
        _emit_log(lvl, text)


def set_log_level(level):
    """Set the level of llama.cpp messages passed on to the logger "alpaca2.llama".

    ``level`` is a ``logging`` level (``logging.INFO`` shows load and context details;
    the default ``logging.WARNING`` keeps llama.cpp quiet unless something is wrong).
    """
    global _log_threshold
    level = logging._checkLevel(level)
    if level <= logging.DEBUG:
        _log_threshold = GGML_LOG_LEVEL_DEBUG
    elif level <= logging.INFO:
        _log_threshold = GGML_LOG_LEVEL_INFO
    elif level <= logging.WARNING:
        _log_threshold = GGML_LOG_LEVEL_WARN
    elif level <= logging.ERROR:
        _log_threshold = GGML_LOG_LEVEL_ERROR
    else:
        _log_threshold = GGML_LOG_LEVEL_ERROR + 10


def _enable_verbose():
    """verbose=True: show llama.cpp's INFO messages on stderr (as llama-cli does)."""
    set_log_level(logging.INFO)
    if not log.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    if log.getEffectiveLevel() > logging.INFO:
        log.setLevel(logging.INFO)


# ------------------------------------------------------------------------------------------------
# Backends: built as modules next to this file and loaded once, quietly, at import.

cdef bint _backends_loaded = False


cdef _load_backends():
    global _backends_loaded, _log_threshold
    if _backends_loaded:
        return
    cdef bytes pkg = os.fsencode(_PKG_DIR)
    cdef const char * c_pkg = pkg
    cdef int saved = _log_threshold
    _log_threshold = GGML_LOG_LEVEL_ERROR + 10   # a CUDA module without a driver is not an error
    try:
        with nogil:
            ggml_backend_load_all_from_path(c_pkg)
            llama_backend_init()
    finally:
        _log_threshold = saved
    _backends_loaded = True


llama_log_set(_log_callback, NULL)
_load_backends()


def backends():
    """Names of the ggml backends loaded in this process (e.g. ['CPU'] or ['CUDA', 'CPU'])."""
    cdef size_t i
    return [ggml_backend_reg_name(ggml_backend_reg_get(i)).decode() for i in range(ggml_backend_reg_count())]


def devices():
    """The compute devices llama.cpp can use: a list of dicts (name, description, type, memory)."""
    cdef size_t i, free_mem, total_mem
    cdef ggml_backend_dev_t dev
    types = {GGML_BACKEND_DEVICE_TYPE_CPU: "cpu", GGML_BACKEND_DEVICE_TYPE_GPU: "gpu",
             GGML_BACKEND_DEVICE_TYPE_IGPU: "igpu", GGML_BACKEND_DEVICE_TYPE_ACCEL: "accel",
             GGML_BACKEND_DEVICE_TYPE_META: "meta"}
    out = []
    for i in range(ggml_backend_dev_count()):
        dev = ggml_backend_dev_get(i)
        free_mem = total_mem = 0
        ggml_backend_dev_memory(dev, &free_mem, &total_mem)
        out.append({
            "name": ggml_backend_dev_name(dev).decode(),
            "description": ggml_backend_dev_description(dev).decode("utf-8", "replace"),
            "type": types.get(ggml_backend_dev_get_type(dev), "other"),
            "backend": ggml_backend_reg_name(ggml_backend_dev_backend_reg(dev)).decode(),
            "memory_free": free_mem,
            "memory_total": total_mem,
        })
    return out


def print_system_info():
    """llama.cpp's own system-info line (CPU features and backends)."""
    return llama_print_system_info().decode("utf-8", "replace")


def supports_gpu_offload():
    """True when a loaded backend can hold model layers on a GPU of this machine."""
    # not llama_supports_gpu_offload(): that is also true whenever the RPC backend is loaded
    return (ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_GPU) != NULL or
            ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_IGPU) != NULL)


def supports_rpc():
    """True when this build has llama.cpp's RPC backend (Model(..., rpc_servers=[...]))."""
    return bool(llama_supports_rpc())


def supports_mmap():
    return bool(llama_supports_mmap())


def llama_cpp_version():
    """The version string llama.cpp reports for itself."""
    cdef const char * v = llama_version()
    return v.decode() if v != NULL else None


# ------------------------------------------------------------------------------------------------
# Helpers

cdef inline int _raise_closed(str what) except -1:
    raise ClosedError(f"this {what} is closed")


cdef bytes _to_bytes(text):
    if isinstance(text, bytes):
        return <bytes>text
    if isinstance(text, str):
        return (<str>text).encode("utf-8", "surrogatepass")
    raise TypeError(f"expected str or bytes, got {type(text).__name__}")


cdef cnp.ndarray _token_array(tokens, int n_vocab):
    """Token ids as a contiguous int32 array, checked against the vocabulary."""
    if isinstance(tokens, (int, np.integer)):
        raise TypeError("tokens must be a sequence of ints, not a single int")
    try:
        arr = np.ascontiguousarray(tokens, dtype=np.int64)
    except (TypeError, ValueError, OverflowError) as e:
        raise TypeError(f"tokens must be a sequence of ints: {e}") from None
    if arr.ndim != 1:
        raise TypeError(f"tokens must be one-dimensional, got shape {arr.shape}")
    if arr.shape[0] and (arr.min() < 0 or arr.max() >= n_vocab):
        bad = int(arr[(arr < 0) | (arr >= n_vocab)][0])
        raise TokenizeError(f"token id {bad} is out of range for a vocabulary of {n_vocab} tokens")
    return arr.astype(np.int32)


cdef object _float_view(float * data, int n, object owner):
    """A read-only 1-d float32 numpy array over data; owner keeps the memory alive."""
    cdef cnp.npy_intp dims[1]
    dims[0] = n
    arr = cnp.PyArray_SimpleNewFromData(1, dims, cnp.NPY_FLOAT32, <void *>data)
    Py_INCREF(owner)
    cnp.PyArray_SetBaseObject(arr, owner)
    cnp.PyArray_CLEARFLAGS(arr, cnp.NPY_ARRAY_WRITEABLE)
    return arr


cdef c_bool _progress_callback(float progress, void * user_data) noexcept with gil:
    cdef Model model = <Model>user_data
    try:
        if PyErr_CheckSignals() != 0:
            raise KeyboardInterrupt
        if model._progress is not None:
            if model._progress(progress) is False:
                model._progress_error = ModelLoadError(f"loading {model.path} was cancelled by the progress callback")
                return False
        return True
    except BaseException as e:
        model._progress_error = e
        return False


def _load_error(msg, errno=None, filename=None):
    # one-argument OSError: str(err) is the message itself; errno rides along as an attribute
    err = ModelLoadError(msg)
    err.alpaca2_errno = errno
    return err


def _check_gguf_file(path):
    """Cheap checks before llama.cpp sees the file, so the common mistakes get a clear message."""
    if not os.path.exists(path):
        raise _load_error(f"model file not found: {path}", 2, path)
    if os.path.isdir(path):
        raise _load_error(f"{path} is a directory, not a GGUF model file", 21, path)
    try:
        with open(path, "rb") as f:
            head = f.read(24)
    except OSError as e:
        raise _load_error(f"cannot read {path}: {e.strerror}", e.errno, path) from None
    if len(head) < 4 or head[:4] != b"GGUF":
        raise ModelLoadError(f"{path} is not a GGUF file (magic {head[:4]!r}); "
                             "convert it with llama.cpp's convert_hf_to_gguf.py")
    if len(head) < 24:
        raise ModelLoadError(f"{path} is a truncated GGUF file ({len(head)} bytes)")
    # the structural pre-check (alpaca2._gguf_check): counts, lengths, types and tensor bounds
    # against the file size, so that a hostile file never reaches llama.cpp's parser
    from alpaca2._gguf_check import validate
    validate(path)


# ------------------------------------------------------------------------------------------------
# RPC: llama.cpp's RPC backend is a run-time module, so its entry points are looked up by name.

ctypedef ggml_backend_reg_t (*_rpc_add_server_t)(const char * endpoint) noexcept nogil
ctypedef void (*_rpc_start_server_t)(const char * endpoint, const char * cache_dir, size_t n_threads,
                                     size_t n_devices, ggml_backend_dev_t * devices) noexcept nogil

RPC_PROTOCOL = (RPC_PROTO_MAJOR_VERSION, RPC_PROTO_MINOR_VERSION, RPC_PROTO_PATCH_VERSION)


cdef void * _rpc_proc(const char * name) except NULL:
    cdef ggml_backend_reg_t reg = ggml_backend_reg_by_name("RPC")
    if reg == NULL:
        raise Alpaca2Error("this alpaca2 was built without llama.cpp's RPC backend: rebuild it with "
                           "ALPACA2_RPC=1 pip install . (the default)")
    cdef void * fn = ggml_backend_reg_get_proc_address(reg, name)
    if fn == NULL:
        raise Alpaca2Error(f"the RPC backend has no {name.decode()}: a llama.cpp of another version?")
    return fn


cdef list _rpc_model_devices(list endpoints, double timeout):
    """The devices of each server (checked first: llama.cpp aborts on one it cannot reach), then the
    local ones: the GPUs llama.cpp would use, else the CPU.  Pointers as ints, in tensor_split order."""
    from alpaca2 import rpc
    cdef _rpc_add_server_t add_server = <_rpc_add_server_t>_rpc_proc(b"ggml_backend_rpc_add_server")
    cdef ggml_backend_reg_t reg
    cdef ggml_backend_dev_t dev
    cdef bytes c_endpoint
    cdef const char * c_endpoint_p
    cdef size_t i
    out = []
    for endpoint in endpoints:
        rpc.check_before_load(endpoint, timeout, major=RPC_PROTO_MAJOR_VERSION)
        c_endpoint = endpoint.encode()
        c_endpoint_p = c_endpoint
        with nogil:
            reg = add_server(c_endpoint_p)
        if reg == NULL:
            raise ModelLoadError(f"RPC server {endpoint} has no devices to offer")
        for i in range(ggml_backend_reg_dev_count(reg)):
            out.append(<size_t>ggml_backend_reg_dev_get(reg, i))
    gpus, igpus = [], []
    for i in range(ggml_backend_dev_count()):
        dev = ggml_backend_dev_get(i)
        if ggml_backend_dev_get_type(dev) == GGML_BACKEND_DEVICE_TYPE_GPU:
            gpus.append(<size_t>dev)
        elif ggml_backend_dev_get_type(dev) == GGML_BACKEND_DEVICE_TYPE_IGPU:
            igpus.append(<size_t>dev)
    # as llama.cpp's default list: integrated GPUs only without a discrete one
    local = gpus or igpus or [<size_t>ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU)]
    return out + local


def _rpc_start_server(str endpoint, cache_dir, size_t n_threads, list device_names):
    """ggml_backend_rpc_start_server: serves until the process ends; returns only on failure."""
    cdef _rpc_start_server_t start = <_rpc_start_server_t>_rpc_proc(b"ggml_backend_rpc_start_server")
    cdef ggml_backend_dev_t devs[64]
    cdef size_t i, n = 0
    cdef ggml_backend_dev_t dev
    names = {}
    for i in range(ggml_backend_dev_count()):
        dev = ggml_backend_dev_get(i)
        names[ggml_backend_dev_name(dev).decode()] = <size_t>dev
    if device_names:
        for name in device_names[:64]:
            if name not in names:
                raise ValueError(f"no device {name!r} here; there are {sorted(names)}")
            devs[n] = <ggml_backend_dev_t><size_t>names[name]
            n += 1
    else:
        # as llama.cpp's rpc-server: the accelerators, else the CPU
        for i in range(ggml_backend_dev_count()):
            dev = ggml_backend_dev_get(i)
            if n < 64 and ggml_backend_dev_get_type(dev) not in (GGML_BACKEND_DEVICE_TYPE_CPU,
                                                                  GGML_BACKEND_DEVICE_TYPE_ACCEL):
                devs[n] = dev
                n += 1
        if n == 0:
            devs[0] = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU)
            n = 1
    cdef bytes c_endpoint = endpoint.encode()
    cdef const char * c_endpoint_p = c_endpoint
    cdef bytes c_cache = os.fsencode(cache_dir) if cache_dir is not None else None
    cdef const char * c_cache_p = NULL
    if c_cache is not None:
        c_cache_p = c_cache
    with nogil:
        start(c_endpoint_p, c_cache_p, n_threads, n, devs)
    raise OSError(f"the RPC server could not serve on {endpoint} (see the message above: the port in use, "
                  "or an address that is not this host's)")


# ------------------------------------------------------------------------------------------------

cdef class Model:
    """A GGUF model loaded by llama.cpp.

    Model(path, n_gpu_layers=-1, use_mmap=True, vocab_only=False, progress=None, verbose=False)

    ``n_gpu_layers=-1`` offloads every layer when a GPU backend is present (and is harmless
    without one).  ``progress`` is called with a float in [0, 1] during the load; returning
    False cancels it.  Closing a model closes every Context made from it.

    ``rpc_servers=["host:port", ...]`` spreads the layers over llama.cpp rpc-servers
    (``alpaca2 rpc-server``) and this machine: the devices are each server's, in order, then the
    local GPUs (or, without one, the CPU).  ``tensor_split`` gives each device's share of the
    layers in that order (default: by free memory); without ``rpc_servers`` it splits over the
    local GPUs as in llama.cpp.  The RPC protocol has no authentication: private networks only.
    """

    def __cinit__(self):
        self.ptr = NULL
        self.vocab = NULL
        self._rpc = None
        self._dependents = weakref.WeakSet()

    def __init__(self, path, *, int n_gpu_layers=-1, bint use_mmap=True, bint use_mlock=False,
                 bint vocab_only=False, progress=None, bint verbose=False, int main_gpu=0,
                 bint check_tensors=False, rpc_servers=None, tensor_split=None, double rpc_timeout=5.0):
        self.path = os.fspath(path)
        if isinstance(self.path, bytes):
            self.path = os.fsdecode(self.path)
        if progress is not None and not callable(progress):
            raise TypeError("progress must be callable or None")
        _check_gguf_file(self.path)
        if verbose:
            _enable_verbose()
        from alpaca2 import rpc
        endpoints = rpc.parse_servers(rpc_servers)
        cdef size_t n_max_devices = llama_max_devices()
        cdef list devs = _rpc_model_devices(endpoints, rpc_timeout) if endpoints and not vocab_only else []
        split = [float(x) for x in tensor_split] if tensor_split is not None else []
        if tensor_split is not None:
            limit = len(devs) if devs else n_max_devices
            if len(split) > limit:
                raise ValueError(f"tensor_split has {len(split)} shares for {limit} devices" +
                                 (f" ({len(devs) - 1} remote, 1 local)" if devs else ""))
            if any(not x >= 0 for x in split) or not sum(split) > 0:
                raise ValueError(f"tensor_split must be shares >= 0, not all zero; got {list(tensor_split)}")
        cdef ggml_backend_dev_t * c_devices = NULL
        cdef float * c_split = NULL
        cdef size_t i
        cdef llama_model_params params = llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers
        params.main_gpu = main_gpu
        params.vocab_only = vocab_only
        params.check_tensors = check_tensors
        if use_mmap and use_mlock:
            params.load_mode = LLAMA_LOAD_MODE_MMAP_MLOCK
        elif use_mlock:
            params.load_mode = LLAMA_LOAD_MODE_MLOCK
        elif use_mmap:
            params.load_mode = LLAMA_LOAD_MODE_MMAP
        else:
            params.load_mode = LLAMA_LOAD_MODE_NONE
        self._progress = progress
        self._progress_error = None
        params.progress_callback = _progress_callback
        params.progress_callback_user_data = <void *>self
        cdef bytes c_path = os.fsencode(self.path)
        cdef const char * c_path_p = c_path
        try:
            if devs:
                c_devices = <ggml_backend_dev_t *>malloc((len(devs) + 1) * sizeof(ggml_backend_dev_t))
                if c_devices == NULL:
                    raise MemoryError()
                for i in range(len(devs)):
                    c_devices[i] = <ggml_backend_dev_t><size_t>devs[i]
                c_devices[len(devs)] = NULL       # the list is NULL-terminated
                params.devices = c_devices
            if split:
                c_split = <float *>malloc(n_max_devices * sizeof(float))   # llama.cpp copies it
                if c_split == NULL:
                    raise MemoryError()
                for i in range(n_max_devices):
                    c_split[i] = split[i] if i < len(split) else 0.0
                params.tensor_split = c_split
            with nogil:
                self.ptr = llama_model_load_from_file(c_path_p, params)
        finally:
            free(c_devices)
            free(c_split)
        self._progress = None
        if self.ptr == NULL:
            err = self._progress_error
            self._progress_error = None
            if err is not None:
                raise err
            raise ModelLoadError(f"llama.cpp could not load {self.path}: the file is corrupt, truncated "
                                 "or of an unsupported architecture (Model(..., verbose=True) shows why)")
        self.vocab = llama_model_get_vocab(self.ptr)
        self._n_vocab = llama_vocab_n_tokens(self.vocab)
        if devs:
            self._rpc = rpc.Connections(endpoints)

    cdef int _check(self) except -1:
        if self.ptr == NULL:
            _raise_closed("Model")
        return 0

    cdef bint _rpc_gone(self):
        # a server has gone: llama.cpp would abort on anything that talks to it (even freeing)
        if self._rpc is None:
            return False
        try:
            self._rpc.check()
        except Exception:
            return True
        return False

    @property
    def rpc_servers(self):
        """The RPC servers holding part of this model ('host:port'), or an empty list."""
        return list(self._rpc.endpoints) if self._rpc is not None else []

    def check_rpc(self):
        """Raise RPCServerError if an RPC server of this model has gone (done before each decode)."""
        if self._rpc is not None:
            self._rpc.check()

    def close(self):
        """Free the model (and close every Context made from it).  Safe to call twice."""
        for dep in list(self._dependents):
            dep.close()
        if self.ptr != NULL:
            if not self._rpc_gone():         # else left allocated: llama.cpp would abort
                with nogil:
                    llama_model_free(self.ptr)
            self.ptr = NULL
            self.vocab = NULL
            if self._rpc is not None:
                self._rpc.closed = True

    def __dealloc__(self):
        if self.ptr != NULL:
            if not self._rpc_gone():
                llama_model_free(self.ptr)
            self.ptr = NULL

    def __enter__(self):
        self._check()
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def closed(self):
        return self.ptr == NULL

    def __repr__(self):
        if self.ptr == NULL:
            return f"<alpaca2.Model {self.path!r} (closed)>"
        return f"<alpaca2.Model {self.path!r} {self.desc}>"

    # -- properties ---------------------------------------------------------------------------
    @property
    def n_vocab(self):
        self._check()
        return self._n_vocab

    @property
    def n_ctx_train(self):
        self._check()
        return llama_model_n_ctx_train(self.ptr)

    @property
    def n_embd(self):
        self._check()
        return llama_model_n_embd(self.ptr)

    @property
    def n_layer(self):
        self._check()
        return llama_model_n_layer(self.ptr)

    @property
    def n_head(self):
        self._check()
        return llama_model_n_head(self.ptr)

    @property
    def n_head_kv(self):
        self._check()
        return llama_model_n_head_kv(self.ptr)

    @property
    def n_params(self):
        self._check()
        return llama_model_n_params(self.ptr)

    @property
    def size(self):
        """Bytes of all tensors."""
        self._check()
        return llama_model_size(self.ptr)

    @property
    def desc(self):
        self._check()
        cdef char buf[256]
        n = llama_model_desc(self.ptr, buf, sizeof(buf))
        return buf[:max(n, 0)].decode("utf-8", "replace")

    @property
    def ftype(self):
        """The file's quantization type, as llama.cpp names it (e.g. 'Q4_0', 'F16')."""
        self._check()
        return llama_ftype_name(llama_model_ftype(self.ptr)).decode()

    @property
    def bos(self):
        self._check()
        return llama_vocab_bos(self.vocab)

    @property
    def eos(self):
        self._check()
        return llama_vocab_eos(self.vocab)

    @property
    def eot(self):
        self._check()
        return llama_vocab_eot(self.vocab)

    @property
    def add_bos(self):
        """Whether the vocabulary asks for BOS at the start of a prompt."""
        self._check()
        return bool(llama_vocab_get_add_bos(self.vocab))

    @property
    def vocab_type(self):
        self._check()
        return {LLAMA_VOCAB_TYPE_NONE: "none", LLAMA_VOCAB_TYPE_SPM: "spm", LLAMA_VOCAB_TYPE_BPE: "bpe",
                LLAMA_VOCAB_TYPE_WPM: "wpm", LLAMA_VOCAB_TYPE_UGM: "ugm", LLAMA_VOCAB_TYPE_RWKV: "rwkv",
                LLAMA_VOCAB_TYPE_PLAMO2: "plamo2"}.get(llama_get_vocab_type(self.vocab), "other")

    @property
    def chat_template(self):
        """The model's own chat template (tokenizer.chat_template), or None."""
        self._check()
        cdef const char * t = llama_model_chat_template(self.ptr, NULL)
        return t.decode("utf-8", "replace") if t != NULL else None

    @property
    def metadata(self):
        """Every GGUF key/value of the file, values as llama.cpp renders them (strings)."""
        self._check()
        cdef int32_t i, n, count = llama_model_meta_count(self.ptr)
        cdef char * buf = NULL
        cdef size_t size = 1024
        out = {}
        buf = <char *>malloc(size)
        if buf == NULL:
            raise MemoryError()
        try:
            for i in range(count):
                n = llama_model_meta_key_by_index(self.ptr, i, buf, size)
                if n < 0:
                    continue
                key = buf[:min(<size_t>n, size - 1)].decode("utf-8", "replace")
                n = llama_model_meta_val_str_by_index(self.ptr, i, buf, size)
                if n >= <int32_t>size:
                    free(buf)
                    size = n + 1
                    buf = <char *>malloc(size)
                    if buf == NULL:
                        raise MemoryError()
                    n = llama_model_meta_val_str_by_index(self.ptr, i, buf, size)
                out[key] = buf[:max(n, 0)].decode("utf-8", "replace") if n >= 0 else None
        finally:
            free(buf)
        return out

    def token_is_eog(self, int token):
        """True for end-of-generation tokens (EOS, EOT, ...)."""
        self._check()
        self._check_token(token)
        return bool(llama_vocab_is_eog(self.vocab, token))

    def token_is_control(self, int token):
        self._check()
        self._check_token(token)
        return bool(llama_vocab_is_control(self.vocab, token))

    def token_text(self, int token):
        """The vocabulary entry of a token as stored in the file (e.g. '▁the' or '<0x0A>')."""
        self._check()
        self._check_token(token)
        return llama_vocab_get_text(self.vocab, token).decode("utf-8", "replace")

    def token_score(self, int token):
        self._check()
        self._check_token(token)
        return llama_vocab_get_score(self.vocab, token)

    def _check_token(self, int token):
        if token < 0 or token >= self._n_vocab:
            raise TokenizeError(f"token id {token} is out of range for a vocabulary of {self._n_vocab} tokens")

    # -- tokenizer ----------------------------------------------------------------------------
    def tokenize(self, text, bint add_bos=True, bint special=False):
        """Token ids of text (str or UTF-8 bytes).

        ``add_bos`` adds BOS when the vocabulary asks for it; ``special=False`` (the default)
        treats text like "</s>" or "[INST]" as plain text, never as control tokens.
        """
        self._check()
        cdef bytes data = _to_bytes(text)
        cdef const char * c_text = PyBytes_AS_STRING(data)
        cdef Py_ssize_t length = len(data)
        if length > 0x7fffffff // 2:
            raise TokenizeError("text is too long to tokenize (over 1 GiB)")
        cdef int32_t n_max = <int32_t>length + 8
        cdef int32_t n
        cdef cnp.ndarray out = np.empty(n_max, dtype=np.int32)
        with nogil:
            n = llama_tokenize(self.vocab, c_text, <int32_t>length, <llama_token *>cnp.PyArray_DATA(out),
                               n_max, add_bos, special)
        if n < 0:
            if n == -2147483648:
                raise TokenizeError("tokenization overflowed")
            n_max = -n
            out = np.empty(n_max, dtype=np.int32)
            with nogil:
                n = llama_tokenize(self.vocab, c_text, <int32_t>length,
                                   <llama_token *>cnp.PyArray_DATA(out), n_max, add_bos, special)
            if n < 0:
                raise TokenizeError("tokenization failed")
        return out[:n].tolist()

    def token_to_piece(self, int token, bint special=False):
        """The bytes one token stands for (a piece may be part of a UTF-8 character)."""
        self._check()
        self._check_token(token)
        cdef char buf[128]
        cdef int32_t n = llama_token_to_piece(self.vocab, token, buf, sizeof(buf), 0, special)
        if n < 0:
            big = bytearray(-n)
            n = llama_token_to_piece(self.vocab, token, <char *>big, -n, 0, special)
            return bytes(big[:n])
        return buf[:n]

    def detokenize(self, tokens, bint special=False, bint errors_replace=True):
        """Text of token ids.  ``special=True`` renders control tokens such as ``</s>``."""
        return self.detokenize_bytes(tokens, special).decode("utf-8", "replace" if errors_replace else "strict")

    def detokenize_bytes(self, tokens, bint special=False):
        """Like detokenize, but the raw UTF-8 bytes (which may end inside a character)."""
        self._check()
        cdef cnp.ndarray arr = _token_array(tokens, self._n_vocab)
        cdef int32_t n_tok = arr.shape[0]
        if n_tok > 0 and not special and arr[0] == llama_vocab_bos(self.vocab):
            # drop a leading BOS so llama.cpp strips the SPM space prefix: detokenize(tokenize(s)) == s
            arr = arr[1:]
            n_tok -= 1
        if n_tok == 0:
            return b""
        cdef const llama_token * c_tok = <const llama_token *>cnp.PyArray_DATA(arr)
        cdef int32_t cap = n_tok * 8 + 16
        cdef int32_t n
        cdef bytearray buf = bytearray(cap)
        cdef char * c_buf = buf
        with nogil:
            n = llama_detokenize(self.vocab, c_tok, n_tok, c_buf, cap, False, special)
        if n < 0:
            cap = -n
            buf = bytearray(cap)
            c_buf = buf
            with nogil:
                n = llama_detokenize(self.vocab, c_tok, n_tok, c_buf, cap, False, special)
            if n < 0:
                raise TokenizeError("detokenization failed")
        return bytes(buf[:n])


# ------------------------------------------------------------------------------------------------

@cython.final
cdef class Batch:
    """A llama_batch: tokens with positions, sequence ids and output flags, for decode_batch()."""

    def __cinit__(self, int capacity=512, int n_seq_max=1):
        self.owner = False
        if capacity <= 0 or n_seq_max <= 0:
            raise ValueError("capacity and n_seq_max must be positive")
        self.batch = llama_batch_init(capacity, 0, n_seq_max)
        if self.batch.token == NULL:
            raise MemoryError()
        self.owner = True
        self.capacity = capacity
        self.n_seq_max = n_seq_max
        self.batch.n_tokens = 0

    def __dealloc__(self):
        if self.owner:
            llama_batch_free(self.batch)
            self.owner = False

    def __len__(self):
        return self.batch.n_tokens

    def clear(self):
        self.batch.n_tokens = 0

    def add(self, int token, int pos, seq_ids=(0,), bint logits=False):
        """Append one token at position pos for the given sequence ids."""
        cdef int i = self.batch.n_tokens
        cdef int j
        if i >= self.capacity:
            raise IndexError(f"batch is full ({self.capacity} tokens)")
        if isinstance(seq_ids, int):
            seq_ids = (seq_ids,)
        if not 0 < len(seq_ids) <= self.n_seq_max:
            raise ValueError(f"between 1 and {self.n_seq_max} sequence ids per token")
        self.batch.token[i] = token
        self.batch.pos[i] = pos
        self.batch.n_seq_id[i] = len(seq_ids)
        for j, s in enumerate(seq_ids):
            self.batch.seq_id[i][j] = s
        self.batch.logits[i] = logits
        self.batch.n_tokens = i + 1
        return i

    @property
    def tokens(self):
        return [self.batch.token[i] for i in range(self.batch.n_tokens)]


# ------------------------------------------------------------------------------------------------

cdef enum:
    _ABORT = 1
    _WATCH_SIGINT = 2


cdef c_bool _abort_callback(void * data) noexcept nogil:
    # data points at Context._flags; read without the GIL, once per graph node
    cdef int flags = (<int *>data)[0]
    return (flags & _ABORT) != 0 or ((flags & _WATCH_SIGINT) != 0 and alpaca2_sigint_pending() != 0)


_FLASH_ATTN = {"auto": LLAMA_FLASH_ATTN_TYPE_AUTO, True: LLAMA_FLASH_ATTN_TYPE_ENABLED,
               False: LLAMA_FLASH_ATTN_TYPE_DISABLED, "on": LLAMA_FLASH_ATTN_TYPE_ENABLED,
               "off": LLAMA_FLASH_ATTN_TYPE_DISABLED, "enabled": LLAMA_FLASH_ATTN_TYPE_ENABLED,
               "disabled": LLAMA_FLASH_ATTN_TYPE_DISABLED}
_ROPE_SCALING = {None: LLAMA_ROPE_SCALING_TYPE_UNSPECIFIED, "none": LLAMA_ROPE_SCALING_TYPE_NONE,
                 "linear": LLAMA_ROPE_SCALING_TYPE_LINEAR, "yarn": LLAMA_ROPE_SCALING_TYPE_YARN,
                 "longrope": LLAMA_ROPE_SCALING_TYPE_LONGROPE}
_POOLING = {None: LLAMA_POOLING_TYPE_UNSPECIFIED, "none": LLAMA_POOLING_TYPE_NONE,
            "mean": LLAMA_POOLING_TYPE_MEAN, "cls": LLAMA_POOLING_TYPE_CLS, "last": LLAMA_POOLING_TYPE_LAST,
            "rank": LLAMA_POOLING_TYPE_RANK}
_CACHE_TYPES = {"f32": GGML_TYPE_F32, "f16": GGML_TYPE_F16, "bf16": GGML_TYPE_BF16, "q8_0": GGML_TYPE_Q8_0,
                "q4_0": GGML_TYPE_Q4_0, "q4_1": GGML_TYPE_Q4_1, "q5_0": GGML_TYPE_Q5_0,
                "q5_1": GGML_TYPE_Q5_1, "iq4_nl": GGML_TYPE_IQ4_NL}


def default_threads():
    """Threads for generation: the physical cores this process may use (at least 1)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    return max(1, n)


cdef class Context:
    """A llama.cpp context (KV cache + compute buffers) over a Model.

    Context(model, n_ctx=4096, n_batch=512, n_ubatch=512, n_threads=None, n_seq_max=1,
            flash_attn="auto", embeddings=False, ...)

    One thread at a time: calls from a second thread wait for the first (a lock per context).
    """

    def __cinit__(self):
        self.ptr = NULL
        self.mem = NULL
        self._flags = 0

    def __init__(self, Model model not None, *, int n_ctx=4096, int n_batch=512, int n_ubatch=512,
                 n_threads=None, n_threads_batch=None, int n_seq_max=1, flash_attn="auto",
                 bint embeddings=False, pooling=None, rope_freq_base=None, rope_freq_scale=None,
                 rope_scaling=None, yarn_ext_factor=None, yarn_attn_factor=None, yarn_beta_fast=None,
                 yarn_beta_slow=None, yarn_orig_ctx=None, type_k="f16", type_v="f16",
                 bint offload_kqv=True, bint kv_unified=True, bint swa_full=True, bint no_perf=False):
        model._check()
        if n_ctx < 0:
            raise ValueError(f"n_ctx must be >= 0 (0 = the model's training context), got {n_ctx}")
        if n_batch <= 0 or n_ubatch <= 0:
            raise ValueError("n_batch and n_ubatch must be positive")
        if n_seq_max <= 0 or n_seq_max > <int>llama_max_parallel_sequences():
            raise ValueError(f"n_seq_max must be between 1 and {llama_max_parallel_sequences()}")
        if flash_attn not in _FLASH_ATTN:
            raise ValueError(f"flash_attn must be 'auto', True or False, got {flash_attn!r}")
        if rope_scaling not in _ROPE_SCALING:
            raise ValueError(f"rope_scaling must be one of {list(_ROPE_SCALING)}, got {rope_scaling!r}")
        if pooling not in _POOLING:
            raise ValueError(f"pooling must be one of {list(_POOLING)}, got {pooling!r}")
        if type_k not in _CACHE_TYPES or type_v not in _CACHE_TYPES:
            raise ValueError(f"type_k/type_v must be one of {list(_CACHE_TYPES)}")
        if n_threads is None:
            n_threads = default_threads()
        if n_threads_batch is None:
            n_threads_batch = n_threads
        if n_threads <= 0 or n_threads_batch <= 0:
            raise ValueError("n_threads must be positive")
        if n_ctx and n_ctx < n_batch:
            n_batch = n_ctx
        if n_ubatch > n_batch:
            n_ubatch = n_batch
        # The KV cache in host memory, refused before llama.cpp allocates it: an allocation the
        # kernel overcommits would otherwise end in the OOM killer, not an exception.  Only where
        # the size is exact (llama-layout attention, no GPU to hold it).
        from alpaca2._gguf_check import GGML_TYPES, available_memory
        arch = model.metadata.get("general.architecture")
        if arch in ("llama", "qwen2") and not (offload_kqv and supports_gpu_offload()):
            n_ctx_kv = -(-(n_ctx or model.n_ctx_train) // 256) * 256        # llama.cpp pads to 256
            head_dim_kv = model.n_embd // max(model.n_head, 1) * model.n_head_kv
            per_elem = {name: size / block for name, block, size in GGML_TYPES.values()}
            kv_bytes = int(n_ctx_kv * model.n_layer * head_dim_kv * (per_elem[type_k] + per_elem[type_v]))
            avail = available_memory()
            if avail is not None and kv_bytes > avail:
                raise OutOfMemoryError(
                    f"a KV cache for n_ctx={n_ctx_kv} needs {kv_bytes / 2**30:.1f} GiB "
                    f"({model.n_layer} layers x {head_dim_kv} x 2, {type_k}/{type_v}), but only "
                    f"{avail / 2**30:.1f} GiB of memory is available: use a smaller n_ctx or "
                    "type_k/type_v='q8_0'")
        self.model = model
        model.check_rpc()
        cdef llama_context_params p = llama_context_default_params()
        p.n_ctx = n_ctx
        p.n_batch = n_batch
        p.n_ubatch = n_ubatch
        p.n_seq_max = n_seq_max
        p.n_threads = n_threads
        p.n_threads_batch = n_threads_batch
        p.flash_attn_type = _FLASH_ATTN[flash_attn]
        p.rope_scaling_type = _ROPE_SCALING[rope_scaling]
        p.pooling_type = _POOLING[pooling]
        p.embeddings = embeddings
        p.offload_kqv = offload_kqv
        p.kv_unified = kv_unified
        p.swa_full = swa_full
        p.no_perf = no_perf
        p.type_k = _CACHE_TYPES[type_k]
        p.type_v = _CACHE_TYPES[type_v]
        if rope_freq_base is not None:
            p.rope_freq_base = rope_freq_base
        if rope_freq_scale is not None:
            p.rope_freq_scale = rope_freq_scale
        if yarn_ext_factor is not None:
            p.yarn_ext_factor = yarn_ext_factor
        if yarn_attn_factor is not None:
            p.yarn_attn_factor = yarn_attn_factor
        if yarn_beta_fast is not None:
            p.yarn_beta_fast = yarn_beta_fast
        if yarn_beta_slow is not None:
            p.yarn_beta_slow = yarn_beta_slow
        if yarn_orig_ctx is not None:
            p.yarn_orig_ctx = yarn_orig_ctx
        p.abort_callback = _abort_callback
        p.abort_callback_data = <void *>&self._flags
        with nogil:
            self.ptr = llama_init_from_model(model.ptr, p)
        if self.ptr == NULL:
            raise Alpaca2Error(
                f"llama.cpp could not create a context with n_ctx={n_ctx}, n_batch={n_batch}: "
                "most likely the KV cache does not fit in memory; try a smaller n_ctx")
        self.mem = llama_get_memory(self.ptr)
        self._n_vocab = model._n_vocab
        self._n_ctx = llama_n_ctx(self.ptr)
        self._n_batch = llama_n_batch(self.ptr)
        self._n_seq_max = llama_n_seq_max(self.ptr)
        self._embeddings = embeddings
        self._batch = Batch(self._n_batch, 1)
        self._lock = threading.Lock()
        self._all_logits = None
        self._n_outputs = 0
        model._dependents.add(self)
        if model._rpc is not None:
            model._rpc.refresh()             # a context may open connections the load did not

    cdef int _check(self) except -1:
        if self.ptr == NULL:
            _raise_closed("Context")
        return 0

    cdef int _check_out(self, int idx) except -1:
        """idx names a position of the last batch that has logits (negative: outputs from the end)."""
        if self._n_outputs == 0:
            raise ValueError("no logits to sample from: decode tokens first")
        if idx < 0:
            if idx < -self._n_outputs:
                raise IndexError(f"output {idx} out of range ({self._n_outputs} outputs)")
        elif self._out_flags is None:
            if idx >= self._n_outputs:
                raise IndexError(f"batch position {idx} out of range ({self._n_outputs} outputs)")
        elif idx >= len(self._out_flags) or not self._out_flags[idx]:
            raise IndexError(f"batch position {idx} has no logits (add it with logits=True)")
        return 0

    def close(self):
        """Free the context.  Safe to call twice; waits for a decode running in another thread."""
        if self.ptr == NULL:
            return
        with self._lock:
            if self.ptr != NULL:
                if not self.model._rpc_gone():    # else left allocated: llama.cpp would abort
                    with nogil:
                        llama_free(self.ptr)
                self.ptr = NULL
                self.mem = NULL

    def __dealloc__(self):
        if self.ptr != NULL:
            if self.model is None or not self.model._rpc_gone():
                llama_free(self.ptr)
            self.ptr = NULL

    def __enter__(self):
        self._check()
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def closed(self):
        return self.ptr == NULL

    def __repr__(self):
        state = "closed" if self.ptr == NULL else f"n_ctx={self._n_ctx}"
        return f"<alpaca2.Context {state}>"

    @property
    def n_ctx(self):
        self._check()
        return self._n_ctx

    @property
    def n_batch(self):
        self._check()
        return self._n_batch

    @property
    def n_ubatch(self):
        self._check()
        return llama_n_ubatch(self.ptr)

    @property
    def n_seq_max(self):
        self._check()
        return self._n_seq_max

    @property
    def n_vocab(self):
        return self._n_vocab

    @property
    def n_threads(self):
        self._check()
        return llama_n_threads(self.ptr)

    def set_n_threads(self, int n_threads, n_threads_batch=None):
        self._check()
        if n_threads <= 0:
            raise ValueError("n_threads must be positive")
        llama_set_n_threads(self.ptr, n_threads, n_threads if n_threads_batch is None else n_threads_batch)

    def _check_seq(self, int seq_id):
        if seq_id < 0 or seq_id >= self._n_seq_max:
            raise ValueError(f"seq_id {seq_id} is out of range (n_seq_max={self._n_seq_max})")

    def n_past(self, int seq_id=0):
        """Number of positions held in the KV cache for seq_id (the next position to decode)."""
        self._check()
        self._check_seq(seq_id)
        return llama_memory_seq_pos_max(self.mem, seq_id) + 1

    # -- decoding -----------------------------------------------------------------------------
    def decode(self, tokens, int seq_id=0, logits="last"):
        """Decode tokens at the end of sequence seq_id.

        Input longer than n_batch is split into n_batch chunks.  ``logits="last"`` keeps the
        logits of the last token (``ctx.logits``); ``logits="all"`` keeps every position
        (``ctx.logits_at(i)``), ``logits=None`` none.  Raises ContextFullError when the
        tokens do not fit, DecodeAborted after abort(), KeyboardInterrupt on Ctrl+C; in every
        error case the KV cache is left as it was before the call.
        """
        self._check()
        self._check_seq(seq_id)
        if logits not in ("last", "all", None):
            raise ValueError(f"logits must be 'last', 'all' or None, got {logits!r}")
        cdef cnp.ndarray arr = _token_array(tokens, self._n_vocab)
        cdef int n = arr.shape[0]
        if n == 0:
            raise ValueError("decode() needs at least one token")
        with self._lock:
            self._check()
            self._decode_tokens(<const llama_token *>cnp.PyArray_DATA(arr), n, seq_id, logits == "all")
            if logits is None:
                self._n_outputs = 0

    cdef int _decode_tokens(self, const llama_token * tokens, int n, int seq_id, bint all_logits) except -1:
        if self.model._rpc is not None:
            self.model._rpc.check()          # a server that has gone: an exception, not llama.cpp's abort
        cdef int n_past = llama_memory_seq_pos_max(self.mem, seq_id) + 1
        if n_past + n > self._n_ctx:
            raise ContextFullError(
                f"{n} tokens do not fit: {n_past} of n_ctx={self._n_ctx} positions are in use "
                f"(sequence {seq_id}); use a larger n_ctx or drop old tokens")
        cdef llama_batch * b = &self._batch.batch
        cdef int start = 0, chunk, i, rc = 0
        cdef int n_batch = self._n_batch
        cdef bint sigint = False
        cdef bint many = all_logits and n > n_batch
        cdef float * src
        cdef float * dst = NULL
        cdef cnp.ndarray all_out
        self._all_logits = None
        if many:
            all_out = np.empty((n, self._n_vocab), dtype=np.float32)
            dst = <float *>cnp.PyArray_DATA(all_out)
        if PyThread_get_thread_ident() == _main_thread_ident:
            sigint = alpaca2_sigint_install()
            if sigint:
                self._flags |= _WATCH_SIGINT
        try:
            with nogil:
                while start < n:
                    chunk = n - start
                    if chunk > n_batch:
                        chunk = n_batch
                    for i in range(chunk):
                        b.token[i] = tokens[start + i]
                        b.pos[i] = n_past + start + i
                        b.n_seq_id[i] = 1
                        b.seq_id[i][0] = seq_id
                        b.logits[i] = all_logits
                    if not all_logits:
                        b.logits[chunk - 1] = (start + chunk == n)
                    b.n_tokens = chunk
                    rc = llama_decode(self.ptr, b[0])
                    if rc != 0:
                        break
                    if many:
                        src = llama_get_logits(self.ptr)
                        memcpy(dst + <size_t>start * self._n_vocab, src,
                               <size_t>chunk * self._n_vocab * sizeof(float))
                    start += chunk
        finally:
            if sigint:
                self._flags &= ~_WATCH_SIGINT
                alpaca2_sigint_restore()
        if rc != 0:
            # leave the cache as it was: drop whatever part of this call reached it
            llama_memory_seq_rm(self.mem, seq_id, n_past, -1)
            self._n_outputs = 0
            aborted_by_user = (self._flags & _ABORT) != 0
            self._flags &= ~_ABORT
            if rc == 2:
                if sigint and alpaca2_sigint_pending():
                    alpaca2_sigint_clear()
                    PyErr_CheckSignals()   # runs Python's handler: KeyboardInterrupt by default
                    raise KeyboardInterrupt
                raise DecodeAborted("decode was aborted" + (" by Context.abort()" if aborted_by_user else ""))
            if rc == 1:
                raise ContextFullError("no KV-cache slot for the batch (the context is full or fragmented)")
            raise DecodeError(f"llama_decode failed with code {rc}")
        if self.model._rpc is not None:
            # a server that died during the decode: llama.cpp's RPC client (as alpaca2 patches it)
            # completed the decode with zeros; the result is thrown away, the error raised
            self.model._rpc.check()
        self._n_outputs = n if all_logits else 1
        # the batch positions that have outputs, for sample(ctx, idx) (llama.cpp's batch index)
        self._out_flags = None if all_logits else b"\x00" * ((n - 1) % n_batch) + b"\x01"
        if many:
            self._all_logits = all_out
        return 0

    def decode_token(self, int token, int seq_id=0):
        """Decode one token at the end of seq_id (the generation hot path: no array conversion)."""
        self._check()
        if token < 0 or token >= self._n_vocab:
            raise TokenizeError(f"token id {token} is out of range for a vocabulary of {self._n_vocab} tokens")
        if seq_id < 0 or seq_id >= self._n_seq_max:
            self._check_seq(seq_id)
        cdef llama_token tok = token
        with self._lock:
            self._check()
            self._decode_tokens(&tok, 1, seq_id, False)

    def decode_batch(self, Batch batch not None):
        """Decode a hand-built Batch (several sequences, explicit positions) in one llama_decode."""
        self._check()
        cdef int rc, i, n = batch.batch.n_tokens
        if n == 0:
            raise ValueError("the batch is empty")
        if n > self._n_batch:
            raise ValueError(f"the batch has {n} tokens, more than n_batch={self._n_batch}")
        n_out = 0
        for i in range(n):
            if batch.batch.token[i] < 0 or batch.batch.token[i] >= self._n_vocab:
                raise TokenizeError(f"token id {batch.batch.token[i]} is out of range")
            for j in range(batch.batch.n_seq_id[i]):
                self._check_seq(batch.batch.seq_id[i][j])
            n_out += batch.batch.logits[i] != 0
        with self._lock:
            self._check()
            with nogil:
                rc = llama_decode(self.ptr, batch.batch)
            if rc == 1:
                raise ContextFullError("no KV-cache slot for the batch")
            if rc == 2:
                self._flags &= ~_ABORT
                raise DecodeAborted("decode was aborted")
            if rc != 0:
                raise DecodeError(f"llama_decode failed with code {rc}")
            if self.model._rpc is not None:
                self.model._rpc.check()       # a server that died during the decode (see _decode_tokens)
            self._all_logits = None
            self._n_outputs = n_out
            self._out_flags = PyBytes_FromStringAndSize(<char *>batch.batch.logits, n)

    def synchronize(self):
        """Wait for queued work (a GPU backend computes asynchronously) to finish."""
        self._check()
        with nogil:
            llama_synchronize(self.ptr)

    def abort(self):
        """Ask a decode running in another thread to stop (it raises DecodeAborted)."""
        self._flags |= _ABORT

    @property
    def logits(self):
        """Logits of the last decoded position: float32 numpy view (n_vocab,), no copy.

        The view shows llama.cpp's output buffer; it is valid until the next decode.
        """
        self._check()
        if self._n_outputs == 0:
            raise ValueError("no logits: decode tokens (with logits='last' or 'all') first")
        if self._all_logits is not None:
            return self._all_logits[-1]
        cdef float * p = llama_get_logits_ith(self.ptr, -1)
        if p == NULL:
            raise ValueError("no logits for the last position")
        return _float_view(p, self._n_vocab, self)

    def logits_at(self, int i):
        """Logits of output i of the last decode (negative i counts from the end)."""
        self._check()
        if self._n_outputs == 0:
            raise ValueError("no logits: decode tokens first")
        if i < -self._n_outputs or i >= self._n_outputs:
            raise IndexError(f"output {i} out of range ({self._n_outputs} outputs)")
        if self._all_logits is not None:
            return self._all_logits[i]
        if i >= 0:
            i -= self._n_outputs     # negative indices count outputs (not batch positions) in llama.cpp
        cdef float * p = llama_get_logits_ith(self.ptr, i)
        if p == NULL:
            raise IndexError(f"no logits for output {i}")
        return _float_view(p, self._n_vocab, self)

    @property
    def embeddings(self):
        """Embedding of sequence 0 (pooled) or of the last token (no pooling), float32 (n_embd,)."""
        return self.embeddings_seq(0)

    def embeddings_seq(self, int seq_id=0):
        self._check()
        if not self._embeddings:
            raise ValueError("this context was made without embeddings=True")
        cdef float * p
        if llama_get_pooling_type(self.ptr) == LLAMA_POOLING_TYPE_NONE:
            p = llama_get_embeddings_ith(self.ptr, -1)
        else:
            p = llama_get_embeddings_seq(self.ptr, seq_id)
        if p == NULL:
            raise ValueError("no embeddings: decode tokens first")
        return _float_view(p, llama_model_n_embd(self.model.ptr), self)

    # -- memory (KV cache) ----------------------------------------------------------------------
    def clear(self):
        """Empty the KV cache of every sequence."""
        self._check()
        with self._lock:
            llama_memory_clear(self.mem, True)
            self._n_outputs = 0

    def seq_rm(self, int seq_id=0, int p0=0, int p1=-1):
        """Remove positions [p0, p1) of seq_id (p1=-1: to the end; seq_id=-1: every sequence)."""
        self._check()
        if seq_id != -1:
            self._check_seq(seq_id)
        with self._lock:
            if not llama_memory_seq_rm(self.mem, seq_id, p0, p1):
                raise ValueError(f"cannot remove positions [{p0}, {p1}) of sequence {seq_id}")

    def seq_cp(self, int src, int dst, int p0=0, int p1=-1):
        self._check()
        self._check_seq(src)
        self._check_seq(dst)
        with self._lock:
            llama_memory_seq_cp(self.mem, src, dst, p0, p1)

    def seq_keep(self, int seq_id):
        self._check()
        self._check_seq(seq_id)
        with self._lock:
            llama_memory_seq_keep(self.mem, seq_id)

    def seq_add(self, int seq_id, int p0, int p1, int delta):
        """Shift positions [p0, p1) of seq_id by delta (context shift)."""
        self._check()
        self._check_seq(seq_id)
        if not llama_memory_can_shift(self.mem):
            raise ValueError("this model's memory cannot be shifted")
        with self._lock:
            llama_memory_seq_add(self.mem, seq_id, p0, p1, delta)

    # -- state ------------------------------------------------------------------------------------
    def save_state(self):
        """The whole context state (KV cache, logits, RNG) as bytes."""
        self._check()
        cdef size_t size, n
        cdef uint8_t * dst
        with self._lock:
            size = llama_state_get_size(self.ptr)
            data = PyBytes_FromStringAndSize(NULL, size)
            dst = <uint8_t *>PyBytes_AS_STRING(data)
            with nogil:
                n = llama_state_get_data(self.ptr, dst, size)
        if n != size:
            raise StateError(f"state size changed while saving ({n} != {size})")
        return data

    def load_state(self, const unsigned char[::1] data not None):
        """Restore a state made by save_state() on a context of the same model and size."""
        self._check()
        cdef size_t n, size = data.shape[0]
        if size == 0:
            raise StateError("empty state")
        with self._lock:
            with nogil:
                n = llama_state_set_data(self.ptr, &data[0], size)
            if n == 0:
                raise StateError("the state does not fit this context (another model or n_ctx?)")
            self._n_outputs = 1
            self._out_flags = None
            self._all_logits = None

    def save_state_file(self, path, tokens=()):
        """Write the state (and the tokens it holds) to path atomically (temp file + rename)."""
        self._check()
        cdef cnp.ndarray arr = _token_array(tokens, self._n_vocab)
        path = os.fspath(path)
        # a name of its own per call (two threads may save to one path), in the target's folder
        tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
        cdef bytes c_tmp = os.fsencode(tmp)
        cdef const char * c_tmp_p = c_tmp
        cdef bint ok
        try:
            with self._lock:
                with nogil:
                    ok = llama_state_save_file(self.ptr, c_tmp_p, <const llama_token *>cnp.PyArray_DATA(arr),
                                               arr.shape[0])
            if not ok:
                raise StateError(f"could not write the state to {path}")
            # on disk before the rename: a crash or power cut leaves the old file or the new one
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    def load_state_file(self, path):
        """Restore a state written by save_state_file; returns the tokens saved with it."""
        self._check()
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise StateError(f"no state file at {path}")
        cdef bytes c_path = os.fsencode(path)
        cdef const char * c_path_p = c_path
        cdef size_t cap = self._n_ctx, n_out = 0
        cdef cnp.ndarray out = np.empty(max(cap, 1), dtype=np.int32)
        cdef bint ok
        with self._lock:
            with nogil:
                ok = llama_state_load_file(self.ptr, c_path_p, <llama_token *>cnp.PyArray_DATA(out), cap, &n_out)
            if not ok:
                raise StateError(f"could not load the state from {path} (another model or n_ctx, or a damaged file)")
            self._n_outputs = 1
            self._out_flags = None
            self._all_logits = None
        return out[:n_out].tolist()

    def perf(self):
        """llama.cpp's own timings for this context (ms and counts)."""
        self._check()
        llama_synchronize(self.ptr)     # counts are booked when queued work completes
        cdef llama_perf_context_data d = llama_perf_context(self.ptr)
        return {"t_load_ms": d.t_load_ms, "t_p_eval_ms": d.t_p_eval_ms, "t_eval_ms": d.t_eval_ms,
                "n_p_eval": d.n_p_eval, "n_eval": d.n_eval, "n_reused": d.n_reused}

    def perf_reset(self):
        self._check()
        llama_perf_context_reset(self.ptr)


# ------------------------------------------------------------------------------------------------

cdef class SamplerChain:
    """A llama.cpp sampler chain built one primitive at a time.

    SamplerChain().add("top_k", 40).add("top_p", 0.9).add("temp", 0.7).add("dist", seed=1)
    Primitives: greedy, dist(seed), top_k(k), top_p(p), min_p(p), typical(p), temp(t),
    temp_ext(t, delta, exponent), xtc(p, t, seed), top_n_sigma(n),
    penalties(last_n, repeat, freq, present), mirostat_v2(tau, eta, seed); with a model:
    logit_bias(model, {token: bias}), grammar(model, gbnf, root), mirostat(model, tau, eta, seed),
    grammar_lazy(model, gbnf, patterns=[regex, ...], tokens=[id, ...]) (starts at a trigger).
    """

    def __cinit__(self, *args, **kwargs):
        cdef llama_sampler_chain_params p = llama_sampler_chain_default_params()
        p.no_perf = False
        self.ptr = llama_sampler_chain_init(p)
        self.owner = True
        self._names = []

    def __dealloc__(self):
        if self.ptr != NULL and self.owner:
            llama_sampler_free(self.ptr)
        self.ptr = NULL

    cdef int _check(self) except -1:
        if self.ptr == NULL:
            _raise_closed(type(self).__name__)
        return 0

    def close(self):
        if self.ptr != NULL and self.owner:
            llama_sampler_free(self.ptr)
        self.ptr = NULL

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __len__(self):
        self._check()
        return llama_sampler_chain_n(self.ptr)

    @property
    def names(self):
        """The primitives in the chain, in order, as llama.cpp names them."""
        self._check()
        return [llama_sampler_name(llama_sampler_chain_get(self.ptr, i)).decode()
                for i in range(llama_sampler_chain_n(self.ptr))]

    def add(self, str kind, *args, **kwargs):
        """Append a primitive (see the class docstring); returns self for chaining."""
        self._check()
        cdef llama_sampler * s = _make_primitive(kind, args, kwargs)
        llama_sampler_chain_add(self.ptr, s)   # the chain owns it now
        return self

    def sample(self, Context ctx not None, int idx=-1):
        """Sample a token from ctx's logits at output idx and accept it into the chain's history."""
        self._check()
        ctx._check()
        ctx._check_out(idx)
        cdef llama_token tok
        cdef int c_idx = idx
        if ctx._all_logits is not None:
            return self.sample_logits(ctx._all_logits[idx])
        with ctx._lock:
            try:
                with nogil:
                    tok = sampler_sample_cpp(self.ptr, ctx.ptr, c_idx)
            except (RuntimeError, IndexError, ValueError) as e:
                raise _sampler_error(e) from None
        return tok

    def sample_logits(self, logits):
        """Sample from a 1-d float array of logits (any source) and accept the token."""
        self._check()
        cdef float[::1] lv = np.ascontiguousarray(logits, dtype=np.float32)
        cdef Py_ssize_t n = lv.shape[0], i
        if n == 0:
            raise ValueError("empty logits")
        cdef llama_token_data * cand = <llama_token_data *>malloc(n * sizeof(llama_token_data))
        if cand == NULL:
            raise MemoryError()
        cdef llama_token_data_array arr
        cdef llama_token tok
        try:
            with nogil:
                for i in range(n):
                    cand[i].id = <llama_token>i
                    cand[i].logit = lv[i]
                    cand[i].p = 0
                arr.data = cand
                arr.size = n
                arr.selected = -1
                arr.sorted = False
            try:
                with nogil:
                    sampler_apply_cpp(self.ptr, &arr)
                if arr.selected < 0 or <size_t>arr.selected >= arr.size:
                    raise ValueError("the chain selected no token (end it with 'dist' or 'greedy')")
                tok = arr.data[arr.selected].id
                sampler_accept_cpp(self.ptr, tok)
            except (RuntimeError, IndexError) as e:
                raise _sampler_error(e) from None
        finally:
            free(cand)
        return tok

    def accept(self, int token):
        """Add a token to the history (penalties, grammar) without sampling it."""
        self._check()
        if token < 0:
            raise TokenizeError(f"token id {token} is out of range")
        try:
            sampler_accept_cpp(self.ptr, token)
        except (RuntimeError, IndexError) as e:
            raise _sampler_error(e) from None

    def reset(self):
        """Forget the history (penalty window, grammar state); a seeded dist sampler restarts its sequence."""
        self._check()
        llama_sampler_reset(self.ptr)

    @property
    def seed(self):
        self._check()
        return llama_sampler_get_seed(self.ptr)

    def perf(self):
        self._check()
        cdef llama_perf_sampler_data d = llama_perf_sampler(self.ptr)
        return {"t_sample_ms": d.t_sample_ms, "n_sample": d.n_sample}


def _sampler_error(e):
    msg = str(e)
    if "grammar" in msg.lower():
        return GrammarError(f"the grammar rejects this token: {msg}")
    return SamplerError(f"llama.cpp's sampler failed: {type(e).__name__}: {msg} "
                        "(are the logits longer than the model's vocabulary?)")


cdef llama_sampler * _make_grammar_lazy(tuple args, dict kw) except NULL:
    # grammar_lazy(model, gbnf, patterns=[regex...], tokens=[id...], root="root"): free text until a
    # trigger (a pattern matching the output so far, or a token), then the grammar (tool calls:
    # ChatFormatter.apply()'s grammar, lazy_patterns and lazy_tokens)
    cdef Model model = args[0]
    model._check()
    gbnf = _to_bytes(args[1] if len(args) > 1 else kw["grammar"])
    root = _to_bytes(kw.get("root", "root"))
    patterns = [_to_bytes(p) for p in kw.get("patterns", ())]
    tokens = [int(t) for t in kw.get("tokens", ())]
    if not patterns and not tokens:
        raise ValueError("a lazy grammar needs trigger patterns or trigger tokens")
    for t in tokens:
        model._check_token(t)
    cdef const char ** c_patterns = <const char **>malloc(max(len(patterns), 1) * sizeof(char *))
    cdef llama_token * c_tokens = <llama_token *>malloc(max(len(tokens), 1) * sizeof(llama_token))
    cdef llama_sampler * s = NULL
    cdef Py_ssize_t i
    try:
        if c_patterns == NULL or c_tokens == NULL:
            raise MemoryError()
        for i in range(len(patterns)):
            c_patterns[i] = <bytes>patterns[i]
        for i in range(len(tokens)):
            c_tokens[i] = tokens[i]
        try:
            s = sampler_init_grammar_lazy_cpp(model.vocab, gbnf, root, c_patterns, len(patterns),
                                              c_tokens, len(tokens))
        except Exception as e:
            raise GrammarError(f"the lazy grammar's trigger patterns could not be compiled: {e}") from None
    finally:
        free(c_patterns)
        free(c_tokens)
    if s == NULL:
        raise GrammarError("the GBNF grammar could not be parsed (Model(..., verbose=True) shows where)")
    return s


cdef uint32_t _seed(seed) except? 0xFFFFFFFF:
    if seed is None:
        return LLAMA_DEFAULT_SEED
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int or None, got {seed!r}")
    return <uint32_t>(int(seed) & 0xFFFFFFFF)


cdef llama_sampler * _make_primitive(str kind, tuple args, dict kw) except NULL:
    cdef llama_sampler * s = NULL
    cdef Model model
    cdef llama_logit_bias * biases
    cdef int i
    if kind == "greedy":
        s = llama_sampler_init_greedy()
    elif kind == "dist":
        s = llama_sampler_init_dist(_seed(kw.get("seed", args[0] if args else None)))
    elif kind == "top_k":
        s = llama_sampler_init_top_k(int(args[0] if args else kw["k"]))
    elif kind in ("top_p", "min_p", "typical"):
        p = float(args[0] if args else kw["p"])
        min_keep = int(kw.get("min_keep", args[1] if len(args) > 1 else 1))
        if not (0.0 <= p <= 1.0):
            raise ValueError(f"{kind} must be in [0, 1], got {p}")
        if kind == "top_p":
            s = llama_sampler_init_top_p(p, min_keep)
        elif kind == "min_p":
            s = llama_sampler_init_min_p(p, min_keep)
        else:
            s = llama_sampler_init_typical(p, min_keep)
    elif kind == "temp":
        t = float(args[0] if args else kw["t"])
        if math.isnan(t):
            raise ValueError("temp must be a number")
        s = llama_sampler_init_temp(t)
    elif kind == "temp_ext":
        s = llama_sampler_init_temp_ext(float(args[0]), float(args[1]), float(args[2]))
    elif kind == "xtc":
        s = llama_sampler_init_xtc(float(args[0]), float(args[1]), int(kw.get("min_keep", 1)),
                                   _seed(kw.get("seed")))
    elif kind == "top_n_sigma":
        s = llama_sampler_init_top_n_sigma(float(args[0]))
    elif kind == "penalties":
        last_n = int(kw.get("last_n", args[0] if args else 64))
        repeat = float(kw.get("repeat", args[1] if len(args) > 1 else 1.0))
        freq = float(kw.get("freq", args[2] if len(args) > 2 else 0.0))
        present = float(kw.get("present", args[3] if len(args) > 3 else 0.0))
        if last_n < 0:
            raise ValueError(f"penalty_last_n must be >= 0, got {last_n}")
        if not repeat > 0 or math.isinf(repeat):
            raise ValueError(f"repeat_penalty must be a positive number, got {repeat}")
        if not (math.isfinite(freq) and math.isfinite(present)):
            raise ValueError("frequency/presence penalties must be finite")
        s = llama_sampler_init_penalties(0, last_n, repeat, freq, present)
    elif kind == "mirostat_v2":
        s = llama_sampler_init_mirostat_v2(_seed(kw.get("seed")), float(kw.get("tau", 5.0)),
                                           float(kw.get("eta", 0.1)))
    elif kind == "mirostat":
        model = args[0]
        model._check()
        s = llama_sampler_init_mirostat(model._n_vocab, _seed(kw.get("seed")), float(kw.get("tau", 5.0)),
                                        float(kw.get("eta", 0.1)), int(kw.get("m", 100)))
    elif kind == "logit_bias":
        model = args[0]
        model._check()
        bias = dict(args[1] if len(args) > 1 else kw["bias"])
        biases = <llama_logit_bias *>malloc(max(len(bias), 1) * sizeof(llama_logit_bias))
        if biases == NULL:
            raise MemoryError()
        try:
            for i, (tok, b) in enumerate(bias.items()):
                model._check_token(int(tok))
                biases[i].token = int(tok)
                biases[i].bias = float(b)
            s = llama_sampler_init_logit_bias(model._n_vocab, len(bias), biases)
        finally:
            free(biases)
    elif kind == "grammar":
        model = args[0]
        model._check()
        gbnf = _to_bytes(args[1] if len(args) > 1 else kw["grammar"])
        root = _to_bytes(kw.get("root", args[2] if len(args) > 2 else "root"))
        s = llama_sampler_init_grammar(model.vocab, gbnf, root)
        if s == NULL:
            raise GrammarError("the GBNF grammar could not be parsed (Model(..., verbose=True) shows where)")
    elif kind == "grammar_lazy":
        s = _make_grammar_lazy(args, kw)
    else:
        raise ValueError(f"unknown sampler primitive {kind!r}")
    if s == NULL:
        raise Alpaca2Error(f"llama.cpp could not create the {kind!r} sampler")
    return s


cdef class Sampler(SamplerChain):
    """The usual sampler chain, built in C, with llama.cpp's defaults and order:

    logit_bias -> penalties -> grammar -> top_k -> typical -> top_p -> min_p -> temp -> dist.

    ``temp=0`` (or below) means greedy.  ``mirostat=1|2`` replaces top_k..dist with mirostat.
    ``grammar`` (GBNF text) and ``logit_bias`` need the vocabulary: pass ``model=`` or the chain
    is completed at the first sample() from the context's model.
    """

    def __init__(self, *, double temp=0.8, int top_k=40, double top_p=0.95, double min_p=0.05,
                 double typical_p=1.0, double repeat_penalty=1.0, int penalty_last_n=64,
                 double frequency_penalty=0.0, double presence_penalty=0.0, int mirostat=0,
                 double mirostat_tau=5.0, double mirostat_eta=0.1, grammar=None, logit_bias=None,
                 seed=None, Model model=None):
        for name, v in (("temp", temp), ("top_p", top_p), ("min_p", min_p), ("typical_p", typical_p),
                        ("repeat_penalty", repeat_penalty), ("frequency_penalty", frequency_penalty),
                        ("presence_penalty", presence_penalty)):
            if not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v}")
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
        if not (0.0 < top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if not (0.0 <= min_p <= 1.0):
            raise ValueError(f"min_p must be in [0, 1], got {min_p}")
        if not (0.0 < typical_p <= 1.0):
            raise ValueError(f"typical_p must be in (0, 1], got {typical_p}")
        if repeat_penalty <= 0:
            raise ValueError(f"repeat_penalty must be > 0 (1.0 = off), got {repeat_penalty}")
        if penalty_last_n < 0:
            raise ValueError(f"penalty_last_n must be >= 0, got {penalty_last_n}")
        if mirostat not in (0, 1, 2):
            raise ValueError(f"mirostat must be 0, 1 or 2, got {mirostat}")
        if grammar is not None and not isinstance(grammar, (str, bytes)):
            raise TypeError("grammar must be GBNF text")
        if logit_bias is not None:
            logit_bias = {int(k): float(v) for k, v in dict(logit_bias).items()}
        _seed(seed)
        self.params = dict(temp=temp, top_k=top_k, top_p=top_p, min_p=min_p, typical_p=typical_p,
                           repeat_penalty=repeat_penalty, penalty_last_n=penalty_last_n,
                           frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
                           mirostat=mirostat, mirostat_tau=mirostat_tau, mirostat_eta=mirostat_eta,
                           grammar=grammar, logit_bias=logit_bias, seed=seed)
        self._model = None
        if model is not None or not self._needs_model():
            self._build(model)

    def _needs_model(self):
        p = self.params
        return p["grammar"] is not None or p["logit_bias"] or p["mirostat"] == 1

    def _build(self, Model model):
        p = self.params
        if model is not None:
            model._check()
        if llama_sampler_chain_n(self.ptr) > 0:
            llama_sampler_free(self.ptr)
            self.ptr = llama_sampler_chain_init(llama_sampler_chain_default_params())
        if p["logit_bias"]:
            self.add("logit_bias", model, p["logit_bias"])
        if p["repeat_penalty"] != 1.0 or p["frequency_penalty"] != 0.0 or p["presence_penalty"] != 0.0:
            self.add("penalties", p["penalty_last_n"], p["repeat_penalty"], p["frequency_penalty"],
                     p["presence_penalty"])
        if p["grammar"] is not None:
            self.add("grammar", model, p["grammar"])
        if p["temp"] <= 0:
            self.add("greedy")
        elif p["mirostat"] == 1:
            self.add("temp", p["temp"])
            self.add("mirostat", model, tau=p["mirostat_tau"], eta=p["mirostat_eta"], seed=p["seed"])
        elif p["mirostat"] == 2:
            self.add("temp", p["temp"])
            self.add("mirostat_v2", tau=p["mirostat_tau"], eta=p["mirostat_eta"], seed=p["seed"])
        else:
            if p["top_k"] > 0:
                self.add("top_k", p["top_k"])
            if p["typical_p"] < 1.0:
                self.add("typical", p["typical_p"])
            if p["top_p"] < 1.0:
                self.add("top_p", p["top_p"])
            if p["min_p"] > 0.0:
                self.add("min_p", p["min_p"])
            self.add("temp", p["temp"])
            self.add("dist", seed=p["seed"])
        self._model = model
        if model is not None:
            model._dependents.add(self)   # grammar/logit_bias point into the vocabulary: close with the model

    def sample(self, Context ctx not None, int idx=-1):
        self._check()
        if llama_sampler_chain_n(self.ptr) == 0:
            self._build(ctx.model)
        return SamplerChain.sample(self, ctx, idx)

    def sample_logits(self, logits):
        self._check()
        if llama_sampler_chain_n(self.ptr) == 0:
            raise ValueError("this Sampler needs a model (grammar/logit_bias): pass model= when creating it")
        return SamplerChain.sample_logits(self, logits)

    def __repr__(self):
        shown = ", ".join(f"{k}={v!r}" for k, v in self.params.items() if v is not None)
        return f"alpaca2.Sampler({shown})"


# ------------------------------------------------------------------------------------------------

_FTYPES = {
    "F32": LLAMA_FTYPE_ALL_F32, "F16": LLAMA_FTYPE_MOSTLY_F16, "BF16": LLAMA_FTYPE_MOSTLY_BF16,
    "Q4_0": LLAMA_FTYPE_MOSTLY_Q4_0, "Q4_1": LLAMA_FTYPE_MOSTLY_Q4_1, "Q5_0": LLAMA_FTYPE_MOSTLY_Q5_0,
    "Q5_1": LLAMA_FTYPE_MOSTLY_Q5_1, "Q8_0": LLAMA_FTYPE_MOSTLY_Q8_0, "Q2_K": LLAMA_FTYPE_MOSTLY_Q2_K,
    "Q3_K_S": LLAMA_FTYPE_MOSTLY_Q3_K_S, "Q3_K_M": LLAMA_FTYPE_MOSTLY_Q3_K_M,
    "Q3_K_L": LLAMA_FTYPE_MOSTLY_Q3_K_L, "Q4_K_S": LLAMA_FTYPE_MOSTLY_Q4_K_S,
    "Q4_K_M": LLAMA_FTYPE_MOSTLY_Q4_K_M, "Q5_K_S": LLAMA_FTYPE_MOSTLY_Q5_K_S,
    "Q5_K_M": LLAMA_FTYPE_MOSTLY_Q5_K_M, "Q6_K": LLAMA_FTYPE_MOSTLY_Q6_K,
    "IQ4_NL": LLAMA_FTYPE_MOSTLY_IQ4_NL,
}


def quantize(src, dst, ftype="Q4_0", n_threads=None, bint pure=False):
    """Quantize the GGUF model src into dst (written atomically) with llama_model_quantize."""
    key = str(ftype).upper()
    if key not in _FTYPES:
        raise ValueError(f"unknown ftype {ftype!r}; one of {sorted(_FTYPES)}")
    src = os.fspath(src)
    dst = os.fspath(dst)
    _check_gguf_file(src)
    if os.path.abspath(src) == os.path.abspath(dst):
        raise ValueError("dst must differ from src")
    cdef llama_model_quantize_params p = llama_model_quantize_default_params()
    p.nthread = n_threads or default_threads()
    p.ftype = _FTYPES[key]
    p.pure = pure
    tmp = f"{dst}.tmp-{os.getpid()}"
    cdef bytes c_src = os.fsencode(src), c_tmp = os.fsencode(tmp)
    cdef const char * c_src_p = c_src
    cdef const char * c_tmp_p = c_tmp
    cdef uint32_t rc
    with nogil:
        rc = llama_model_quantize(c_src_p, c_tmp_p, &p)
    if rc != 0:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise ModelLoadError(f"quantizing {src} to {key} failed (code {rc})")
    os.replace(tmp, dst)
    return dst


def chat_builtin_templates():
    """Names of the chat templates llama.cpp knows without a Jinja engine."""
    cdef const char * names[128]
    n = llama_chat_builtin_templates(names, 128)
    return [names[i].decode() for i in range(min(n, 128))]


def chat_apply_template(str tmpl, messages, bint add_assistant=True):
    """Format [{'role':..., 'content':...}] with llama.cpp's built-in template support."""
    msgs = [(_to_bytes(m["role"]), _to_bytes(m["content"])) for m in messages]
    cdef size_t n = len(msgs), i
    cdef llama_chat_message * c_msgs = <llama_chat_message *>malloc(max(n, 1) * sizeof(llama_chat_message))
    if c_msgs == NULL:
        raise MemoryError()
    cdef bytes c_tmpl = _to_bytes(tmpl)
    cdef int32_t need, cap = 256
    for r, c in msgs:
        cap += len(r) + len(c) * 2 + 64
    cdef bytearray buf
    try:
        for i in range(n):
            c_msgs[i].role = msgs[i][0]
            c_msgs[i].content = msgs[i][1]
        buf = bytearray(cap)
        need = llama_chat_apply_template(c_tmpl, c_msgs, n, add_assistant, buf, cap)
        if need > cap:
            cap = need
            buf = bytearray(cap)
            need = llama_chat_apply_template(c_tmpl, c_msgs, n, add_assistant, buf, cap)
        if need < 0:
            raise ValueError("llama.cpp does not support this chat template")
        return bytes(buf[:need]).decode("utf-8", "replace")
    finally:
        free(c_msgs)


# ------------------------------------------------------------------------------------------------

include "_speculative.pxi"
