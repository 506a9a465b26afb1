# Errors: the helpers that turn llama.cpp's failures into alpaca2's exceptions, and the abort flag
# read by llama.cpp's abort callback. Included by _core.pyx.


cdef inline int _raise_closed(str what) except -1:
    raise ClosedError(f"this {what} is closed")


def _load_error(msg, errno=None, filename=None):
    # one-argument OSError: str(err) is the message itself; errno rides along as an attribute
    err = ModelLoadError(msg)
    err.alpaca2_errno = errno
    return err


cdef enum:
    _ABORT = 1
    _WATCH_SIGINT = 2


cdef c_bool _abort_callback(void * data) noexcept nogil:
    # data points at Context._flags; read without the GIL, once per graph node
    cdef int flags = (<int *>data)[0]
    return (flags & _ABORT) != 0 or ((flags & _WATCH_SIGINT) != 0 and alpaca2_sigint_pending() != 0)


def _sampler_error(e):
    msg = str(e)
    if "grammar" in msg.lower():
        return GrammarError(f"the grammar rejects this token: {msg}")
    return SamplerError(f"llama.cpp's sampler failed: {type(e).__name__}: {msg} "
                        "(are the logits longer than the model's vocabulary?)")
