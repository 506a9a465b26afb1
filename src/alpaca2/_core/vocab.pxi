# Tokenization over a model's llama_vocab: text -> token ids -> text. Model's tokenize(),
# detokenize() and token_to_piece() call these. Included by _core.pyx.


cdef bytes _to_bytes(text):
    if isinstance(text, bytes):
        return <bytes>text
    if isinstance(text, str):
        return (<str>text).encode("utf-8", "surrogatepass")
    raise TypeError(f"expected str or bytes, got {type(text).__name__}")


cdef cnp.ndarray _token_array(tokens, int n_vocab):
    """Token ids as a contiguous int32 array, checked against the vocabulary.

    Ints only: floats, strings and complex numbers are refused, never truncated or parsed."""
    if isinstance(tokens, (int, np.integer, str, bytes)):
        raise ArgumentTypeError(f"tokens must be a sequence of ints, not a single {type(tokens).__name__}")
    try:
        arr = np.asarray(tokens)
    except (TypeError, ValueError, OverflowError) as e:
        raise ArgumentTypeError(f"tokens must be a sequence of ints: {e}") from None
    if arr.ndim != 1:
        raise ArgumentTypeError(f"tokens must be one-dimensional, got shape {arr.shape}")
    if arr.shape[0] == 0:
        return np.empty(0, dtype=np.int32)
    if arr.dtype.kind not in "iu":
        if arr.dtype.kind == "O" and all(isinstance(x, (int, np.integer)) and not isinstance(x, bool)
                                         for x in arr):
            bad = next(int(x) for x in arr if not 0 <= x < n_vocab)   # ints too big for int64
            raise TokenizeError(f"token id {bad} is out of range for a vocabulary of {n_vocab} tokens")
        bad = next((x for x in arr.tolist() if isinstance(x, bool) or not isinstance(x, int)), arr[0])
        raise ArgumentTypeError(f"token ids must be ints, got {type(bad).__name__} ({bad!r})")
    if arr.min() < 0 or arr.max() >= n_vocab:
        bad = int(arr[(arr < 0) | (arr >= n_vocab)][0])
        raise TokenizeError(f"token id {bad} is out of range for a vocabulary of {n_vocab} tokens")
    return np.ascontiguousarray(arr, dtype=np.int32)


cdef llama_token _token_arg(token, int n_vocab) except? -1:
    """One token id: an int (not a bool, float or str) in [0, n_vocab)."""
    if isinstance(token, bool) or not isinstance(token, (int, np.integer)):
        raise ArgumentTypeError(f"a token id must be an int, not {type(token).__name__} ({token!r})")
    if not 0 <= token < n_vocab:
        raise TokenizeError(f"token id {token} is out of range for a vocabulary of {n_vocab} tokens")
    return <llama_token>token


cdef list _tokenize(Model model, text, bint add_bos, bint special):
    """Token ids of text (str or UTF-8 bytes); see Model.tokenize."""
    cdef bytes data = _to_bytes(text)
    cdef const char * c_text = PyBytes_AS_STRING(data)
    cdef Py_ssize_t length = len(data)
    if length > 0x7fffffff // 2:
        raise TokenizeError("text is too long to tokenize (over 1 GiB)")
    cdef int32_t n_max = <int32_t>length + 8
    cdef int32_t n
    cdef const llama_vocab * vocab
    cdef cnp.ndarray out = np.empty(n_max, dtype=np.int32)
    with model._lock:
        model._check()
        vocab = model.vocab
        try:
            with nogil:
                n = tokenize_cpp(vocab, c_text, <int32_t>length, <llama_token *>cnp.PyArray_DATA(out),
                                 n_max, add_bos, special)
            if n < 0:
                if n == -2147483648:
                    raise TokenizeError("tokenization overflowed")
                n_max = -n
                out = np.empty(n_max, dtype=np.int32)
                with nogil:
                    n = tokenize_cpp(vocab, c_text, <int32_t>length,
                                     <llama_token *>cnp.PyArray_DATA(out), n_max, add_bos, special)
        except (MemoryError, RuntimeError, IndexError, ValueError, OverflowError) as e:
            raise _cpp_error(e, "tokenization") from None
    if n < 0:
        raise TokenizeError("tokenization failed")
    return out[:n].tolist()


cdef bytes _token_to_piece(Model model, token, bint special):
    """The bytes one token stands for; see Model.token_to_piece."""
    cdef char buf[128]
    cdef int32_t n
    cdef llama_token tok
    cdef bytearray big
    with model._lock:
        model._check()
        tok = _token_arg(token, model._n_vocab)
        try:
            n = token_to_piece_cpp(model.vocab, tok, buf, sizeof(buf), 0, special)
            if n >= 0:
                return buf[:n]
            big = bytearray(-n)
            n = token_to_piece_cpp(model.vocab, tok, <char *>big, -n, 0, special)
        except (MemoryError, RuntimeError, IndexError, ValueError, OverflowError) as e:
            raise _cpp_error(e, "token_to_piece") from None
    if n < 0:
        raise TokenizeError(f"token_to_piece failed for token {tok}")
    return bytes(big[:n])


cdef bytes _detokenize_bytes(Model model, tokens, bint special):
    """The UTF-8 bytes of token ids; see Model.detokenize_bytes."""
    model._check()
    cdef cnp.ndarray arr = _token_array(tokens, model._n_vocab)
    cdef int32_t n_tok = arr.shape[0]
    cdef const llama_token * c_tok
    cdef int32_t cap, n
    cdef bytearray buf
    cdef char * c_buf
    cdef const llama_vocab * vocab
    with model._lock:
        model._check()
        vocab = model.vocab
        if n_tok > 0 and not special and arr[0] == llama_vocab_bos(vocab):
            # drop a leading BOS so llama.cpp strips the SPM space prefix: detokenize(tokenize(s)) == s
            arr = arr[1:]
            n_tok -= 1
        if n_tok == 0:
            return b""
        if n_tok > 0x7fffffff // 16:
            raise TokenizeError(f"too many tokens to detokenize at once ({n_tok})")
        c_tok = <const llama_token *>cnp.PyArray_DATA(arr)
        cap = n_tok * 8 + 16
        buf = bytearray(cap)
        c_buf = buf
        try:
            with nogil:
                n = detokenize_cpp(vocab, c_tok, n_tok, c_buf, cap, False, special)
            if n < 0:
                cap = -n
                buf = bytearray(cap)
                c_buf = buf
                with nogil:
                    n = detokenize_cpp(vocab, c_tok, n_tok, c_buf, cap, False, special)
        except (MemoryError, RuntimeError, IndexError, ValueError, OverflowError) as e:
            raise _cpp_error(e, "detokenization") from None
    if n < 0:
        raise TokenizeError("detokenization failed")
    return bytes(buf[:n])
