# Reading a Context's outputs: logits and embeddings as numpy arrays. Included by _core.pyx.


cdef object _float_view(float * data, int n, object owner):
    """A read-only 1-d float32 numpy array over data; owner keeps the memory alive."""
    cdef cnp.npy_intp dims[1]
    dims[0] = n
    arr = cnp.PyArray_SimpleNewFromData(1, dims, cnp.NPY_FLOAT32, <void *>data)
    Py_INCREF(owner)
    cnp.PyArray_SetBaseObject(arr, owner)
    cnp.PyArray_CLEARFLAGS(arr, cnp.NPY_ARRAY_WRITEABLE)
    return arr


cdef object _logits_at(Context ctx, int i, bint last):
    """Logits of output i of ctx's last decode (negative i counts from the end)."""
    ctx._check()
    if ctx._n_outputs == 0:
        if last:
            raise ValueError("no logits: decode tokens (with logits='last' or 'all') first")
        raise ValueError("no logits: decode tokens first")
    if i < -ctx._n_outputs or i >= ctx._n_outputs:
        raise IndexError(f"output {i} out of range ({ctx._n_outputs} outputs)")
    if ctx._all_logits is not None:
        return ctx._all_logits[i]
    if i >= 0:
        i -= ctx._n_outputs     # negative indices count outputs (not batch positions) in llama.cpp
    cdef float * p = llama_get_logits_ith(ctx.ptr, i)
    if p == NULL:
        if last:
            raise ValueError("no logits for the last position")
        raise IndexError(f"no logits for output {i}")
    return _float_view(p, ctx._n_vocab, ctx)


cdef object _embeddings_seq(Context ctx, int seq_id):
    """Embedding of seq_id (pooled) or of the last token (no pooling), float32 (n_embd,)."""
    ctx._check()
    if not ctx._embeddings:
        raise ValueError("this context was made without embeddings=True")
    cdef float * p
    if llama_get_pooling_type(ctx.ptr) == LLAMA_POOLING_TYPE_NONE:
        p = llama_get_embeddings_ith(ctx.ptr, -1)
    else:
        p = llama_get_embeddings_seq(ctx.ptr, seq_id)
    if p == NULL:
        raise ValueError("no embeddings: decode tokens first")
    return _float_view(p, llama_model_n_embd(ctx.model.ptr), ctx)
