# Reading a Context's outputs: logits and embeddings, as numpy arrays that own their memory.
#
# llama.cpp's output buffer is freed by close() and reallocated by a larger decode, and keeping the
# Context object alive keeps neither from happening: a view into it would read freed memory. So
# each access returns a copy (one row: n_vocab floats, ~1 MB for a 262k vocabulary; sampling reads
# the logits in C and never pays for it).  Included by _core.pyx.


cdef object _float_copy(const float * data, Py_ssize_t n):
    """A new float32 numpy array (n,) holding a copy of data."""
    cdef cnp.ndarray out = np.empty(n, dtype=np.float32)
    if n > 0:
        memcpy(cnp.PyArray_DATA(out), data, <size_t>n * sizeof(float))
    return out


cdef object _logits_at(Context ctx, int i, bint last):
    """Logits of output i of ctx's last decode (negative i counts from the end), copied."""
    cdef float * p
    with ctx._lock:
        ctx._check()
        if ctx._n_outputs == 0:
            if last:
                raise ValueError("no logits: decode tokens (with logits='last' or 'all') first")
            raise ValueError("no logits: decode tokens first")
        if i < -ctx._n_outputs or i >= ctx._n_outputs:
            raise IndexError(f"output {i} out of range ({ctx._n_outputs} outputs)")
        if ctx._all_logits is not None:
            return ctx._all_logits[i].copy()
        if i >= 0:
            i -= ctx._n_outputs     # negative indices count outputs (not batch positions) in llama.cpp
        p = llama_get_logits_ith(ctx.ptr, i)
        if p == NULL:
            if last:
                raise ValueError("no logits for the last position")
            raise IndexError(f"no logits for output {i}")
        return _float_copy(p, ctx._n_vocab)


cdef object _embeddings_seq(Context ctx, seq_id):
    """Embedding of seq_id (pooled), or of the last token (no pooling), copied.

    float32 (n_embd,); with pooling="rank" the (n_cls_out,) scores of a reranker."""
    cdef float * p
    cdef Py_ssize_t n
    cdef int pooling
    with ctx._lock:
        ctx._check()
        if not ctx._embeddings:
            raise ValueError("this context was made without embeddings=True")
        ctx._check_seq(seq_id)
        pooling = llama_get_pooling_type(ctx.ptr)
        if pooling == LLAMA_POOLING_TYPE_NONE:
            p = llama_get_embeddings_ith(ctx.ptr, -1) if ctx._n_outputs > 0 else NULL
        else:
            p = llama_get_embeddings_seq(ctx.ptr, seq_id)
        if p == NULL:
            raise ValueError("no embeddings: decode tokens first")
        # as many floats as llama.cpp wrote for this pooling type, never more
        n = llama_model_n_cls_out(ctx.model.ptr) if pooling == LLAMA_POOLING_TYPE_RANK else \
            llama_model_n_embd_out(ctx.model.ptr)
        return _float_copy(p, n)
