# Tokenization over a model's llama_vocab: text -> token ids -> text. Model's tokenize(),
# detokenize() and token_to_piece() call these. Included by _core.pyx.


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


cdef list _tokenize(Model model, text, bint add_bos, bint special):
    """Token ids of text (str or UTF-8 bytes).

    ``add_bos`` adds BOS when the vocabulary asks for it; ``special=False`` (the default)
    treats text like "</s>" or "[INST]" as plain text, never as control tokens.
    """
    model._check()
    cdef bytes data = _to_bytes(text)
    cdef const char * c_text = PyBytes_AS_STRING(data)
    cdef Py_ssize_t length = len(data)
    if length > 0x7fffffff // 2:
        raise TokenizeError("text is too long to tokenize (over 1 GiB)")
    cdef int32_t n_max = <int32_t>length + 8
    cdef int32_t n
    cdef cnp.ndarray out = np.empty(n_max, dtype=np.int32)
    with nogil:
        n = llama_tokenize(model.vocab, c_text, <int32_t>length, <llama_token *>cnp.PyArray_DATA(out),
                           n_max, add_bos, special)
    if n < 0:
        if n == -2147483648:
            raise TokenizeError("tokenization overflowed")
        n_max = -n
        out = np.empty(n_max, dtype=np.int32)
        with nogil:
            n = llama_tokenize(model.vocab, c_text, <int32_t>length,
                               <llama_token *>cnp.PyArray_DATA(out), n_max, add_bos, special)
        if n < 0:
            raise TokenizeError("tokenization failed")
    return out[:n].tolist()


cdef bytes _token_to_piece(Model model, int token, bint special):
    """The bytes one token stands for (a piece may be part of a UTF-8 character)."""
    model._check()
    model._check_token(token)
    cdef char buf[128]
    cdef int32_t n = llama_token_to_piece(model.vocab, token, buf, sizeof(buf), 0, special)
    if n < 0:
        big = bytearray(-n)
        n = llama_token_to_piece(model.vocab, token, <char *>big, -n, 0, special)
        return bytes(big[:n])
    return buf[:n]


cdef bytes _detokenize_bytes(Model model, tokens, bint special):
    """Like detokenize, but the raw UTF-8 bytes (which may end inside a character)."""
    model._check()
    cdef cnp.ndarray arr = _token_array(tokens, model._n_vocab)
    cdef int32_t n_tok = arr.shape[0]
    if n_tok > 0 and not special and arr[0] == llama_vocab_bos(model.vocab):
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
        n = llama_detokenize(model.vocab, c_tok, n_tok, c_buf, cap, False, special)
    if n < 0:
        cap = -n
        buf = bytearray(cap)
        c_buf = buf
        with nogil:
            n = llama_detokenize(model.vocab, c_tok, n_tok, c_buf, cap, False, special)
        if n < 0:
            raise TokenizeError("detokenization failed")
    return bytes(buf[:n])
