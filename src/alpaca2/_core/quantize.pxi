# quantize(): llama_model_quantize. Included by _core.pyx.

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
