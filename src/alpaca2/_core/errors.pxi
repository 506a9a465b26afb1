# Errors: the one funnel from llama.cpp's failures to alpaca2's exceptions. One helper per
# convention: llama_decode's return codes (with the rollback and Ctrl+C handling every decode
# path shares), the abort flag read by llama.cpp's abort callback, the sampler's C++ exceptions,
# and the argument checks every size, count and id passes before it reaches C. Included by _core.pyx.

cdef inline int _raise_closed(str what) except -1:
    raise ClosedError(f"this {what} is closed")


def _load_error(msg, errno=None, filename=None):
    # one-argument OSError: str(err) is the message itself; errno rides along as an attribute
    err = ModelLoadError(msg)
    err.alpaca2_errno = errno
    return err


# -- arguments: ints only, range-checked, before C sees them ----------------------------------------

cdef object _int_arg(value, str name, object lo, object hi):
    """value as a Python int in [lo, hi] (None: unbounded); floats, strings, complex and bools refused."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ArgumentTypeError(f"{name} must be an int, not {type(value).__name__} ({value!r})")
    v = int(value)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        if hi is None:
            raise ArgumentValueError(f"{name} must be >= {lo}, got {v}")
        if lo is None:
            raise ArgumentValueError(f"{name} must be <= {hi}, got {v}")
        raise ArgumentValueError(f"{name} must be between {lo} and {hi}, got {v}")
    return v


cdef double _float_arg(value, str name) except? -1.0:
    """value as a finite float (NaN and infinities refused: they turn every logit into NaN)."""
    if isinstance(value, (bool, complex, str, bytes)):
        raise ArgumentTypeError(f"{name} must be a number, not {type(value).__name__} ({value!r})")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ArgumentTypeError(f"{name} must be a number, not {type(value).__name__} ({value!r})") from None
    if not math.isfinite(v):
        raise ArgumentValueError(f"{name} must be a finite number, got {v}")
    return v


# -- llama_decode: one convention, one place -------------------------------------------------------

cdef enum:
    _ABORT = 1
    _WATCH_SIGINT = 2


cdef c_bool _abort_callback(void * data) noexcept nogil:
    # data points at Context._flags; read without the GIL, once per graph node
    cdef int flags = (<int *>data)[0]
    return (flags & _ABORT) != 0 or ((flags & _WATCH_SIGINT) != 0 and alpaca2_sigint_pending() != 0)


cdef bint _decode_begin(int * flags):
    """Start of a decoding call: disarm a stale abort(); watch Ctrl+C on the main thread.

    Returns whether Ctrl+C is watched (pass it to _decode_end)."""
    cdef bint sigint = False
    flags[0] &= ~_ABORT
    if PyThread_get_thread_ident() == _main_thread_ident:
        sigint = alpaca2_sigint_install()
        if sigint:
            flags[0] |= _WATCH_SIGINT
    return sigint


cdef void _decode_end(int * flags, bint sigint):
    if sigint:
        flags[0] &= ~_WATCH_SIGINT
        alpaca2_sigint_restore()


cdef bint _rollback(llama_memory_t mem, int seq_id, int p0) noexcept nogil:
    """Drop positions >= p0 of seq_id that a failed call wrote; False when llama.cpp cannot."""
    if mem == NULL or p0 < 0:
        return True
    return llama_memory_seq_rm(mem, seq_id, p0, -1)


cdef int _raise_decode(int rc, int * flags, bint sigint, bint rolled_back, str where) except -1:
    """The exception for llama_decode's return code rc (llama.h: 1 no KV slot, 2 aborted,
    -1 invalid batch, < -1 other errors), raised after the caller rolled the cache back."""
    aborted_by_user = (flags[0] & _ABORT) != 0
    flags[0] &= ~_ABORT
    suffix = "" if rolled_back else (" (and llama.cpp could not roll the KV cache back: "
                                     "call clear() before decoding again)")
    if rc == 2:
        if sigint and alpaca2_sigint_pending():
            alpaca2_sigint_clear()
            PyErr_CheckSignals()   # runs Python's handler: KeyboardInterrupt by default
            raise KeyboardInterrupt
        raise DecodeAborted("decode was aborted" + (" by Context.abort()" if aborted_by_user else "")
                            + where + suffix)
    if rc == 1:
        raise ContextFullError("no KV-cache slot for the batch (the context is full or fragmented)"
                               + where + suffix)
    if rc == -1:
        raise InvalidBatchError("llama.cpp refused the batch as invalid (positions or sequence ids "
                                "that do not follow the cache)" + where + suffix)
    raise DecodeError(f"llama_decode failed with code {rc}" + where + suffix)


# -- the sampler's C++ exceptions ------------------------------------------------------------------

def _sampler_error(e):
    msg = str(e)
    if "grammar" in msg.lower():
        return GrammarError(f"the grammar rejects this token: {msg}")
    return SamplerError(f"llama.cpp's sampler failed: {type(e).__name__}: {msg} "
                        "(are the logits longer than the model's vocabulary?)")


def _cpp_error(e, str what):
    """A C++ exception from llama.cpp's tokenizer (bad_alloc, out_of_range, ...) as TokenizeError."""
    if isinstance(e, MemoryError):
        return OutOfMemoryError(f"{what}: out of memory")
    return TokenizeError(f"{what} failed inside llama.cpp: {type(e).__name__}: {e}")
