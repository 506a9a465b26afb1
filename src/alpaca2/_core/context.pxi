# Context: a llama_context (KV cache and compute buffers) over a Model: decode, the KV cache,
# state save/load. Logits and embeddings are read in logits.pxi. Included by _core.pyx.

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


# the highest KV-cache position a shift or a Batch may name (room above it: no int32 wrap-around)
_POS_MAX = 0x7fffffff - (1 << 24)


def _state_checker():
    """alpaca2._state_check (validates state blobs and files before llama.cpp reads them)."""
    from alpaca2 import _state_check
    return _state_check


# ggml's GGML_MAX_N_THREADS: more threads than this end the process inside the thread pool
MAX_THREADS = 512


def default_threads():
    """Threads for generation: the physical cores this process may use (at least 1)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    return max(1, n)


@cython.no_gc_clear          # __dealloc__ reads self.model
cdef class Context:
    """A llama.cpp context (KV cache + compute buffers) over a Model.

    Context(model, n_ctx=4096, n_batch=512, n_ubatch=512, n_threads=None, n_seq_max=1,
            flash_attn="auto", embeddings=False, ...)

    One thread at a time: calls from a second thread wait for the first (a lock per context).
    ``n_threads`` is at most MAX_THREADS (512, ggml's limit).  Floating-point parameters (rope,
    yarn) must be finite: NaN would make every logit NaN.
    """

    def __cinit__(self):
        self.ptr = NULL
        self.mem = NULL
        self._flags = 0
        self._lock = threading.RLock()

    def __init__(self, Model model not None, *, n_ctx=4096, n_batch=512, n_ubatch=512,
                 n_threads=None, n_threads_batch=None, n_seq_max=1, flash_attn="auto",
                 bint embeddings=False, pooling=None, rope_freq_base=None, rope_freq_scale=None,
                 rope_scaling=None, yarn_ext_factor=None, yarn_attn_factor=None, yarn_beta_fast=None,
                 yarn_beta_slow=None, yarn_orig_ctx=None, type_k="f16", type_v="f16",
                 bint offload_kqv=True, bint kv_unified=True, bint swa_full=True, bint no_perf=False):
        if self.ptr != NULL:
            raise Alpaca2Error("Context.__init__ called twice")
        model._check()
        if model.vocab_only:
            raise ModelLoadError(f"{model.path} was loaded with vocab_only=True: it has no weights to "
                                 "make a Context from (load it again without vocab_only)")
        # positions are int32 in llama.cpp: n_ctx (padded to 256) must stay below 2**31
        n_ctx = _int_arg(n_ctx, "n_ctx", 0, 0x7fffff00)
        n_batch = _int_arg(n_batch, "n_batch", 1, 0x7fffff00)
        n_ubatch = _int_arg(n_ubatch, "n_ubatch", 1, 0x7fffff00)
        n_seq_max = _int_arg(n_seq_max, "n_seq_max", 1, <int>llama_max_parallel_sequences())
        if flash_attn not in _FLASH_ATTN:
            raise ValueError(f"flash_attn must be 'auto', True or False, got {flash_attn!r}")
        if rope_scaling not in _ROPE_SCALING:
            raise ValueError(f"rope_scaling must be one of {list(_ROPE_SCALING)}, got {rope_scaling!r}")
        if pooling not in _POOLING:
            raise ValueError(f"pooling must be one of {list(_POOLING)}, got {pooling!r}")
        if pooling == "rank":
            arch = model.metadata.get("general.architecture")
            if model.metadata.get(f"{arch}.pooling_type") != str(<int>LLAMA_POOLING_TYPE_RANK):
                raise ArgumentValueError("pooling='rank' needs a reranker model (a classification head, "
                                         "pooling_type rank in its GGUF); this model has none")
        if type_k not in _CACHE_TYPES or type_v not in _CACHE_TYPES:
            raise ValueError(f"type_k/type_v must be one of {list(_CACHE_TYPES)}")
        if n_threads is None:
            n_threads = default_threads()
        if n_threads_batch is None:
            n_threads_batch = n_threads
        n_threads = _int_arg(n_threads, "n_threads", 1, MAX_THREADS)
        n_threads_batch = _int_arg(n_threads_batch, "n_threads_batch", 1, MAX_THREADS)
        floats = {}
        for name, v in (("rope_freq_base", rope_freq_base), ("rope_freq_scale", rope_freq_scale),
                        ("yarn_ext_factor", yarn_ext_factor), ("yarn_attn_factor", yarn_attn_factor),
                        ("yarn_beta_fast", yarn_beta_fast), ("yarn_beta_slow", yarn_beta_slow)):
            if v is not None:
                floats[name] = _float_arg(v, name)
        for name in ("rope_freq_base", "rope_freq_scale"):
            if floats.get(name, 1.0) < 0:
                raise ArgumentValueError(f"{name} must be >= 0 (0 = the model's own), got {floats[name]}")
        if yarn_orig_ctx is not None:
            yarn_orig_ctx = _int_arg(yarn_orig_ctx, "yarn_orig_ctx", 0, 0x7fffff00)
        if n_ctx and n_ctx < n_batch:
            n_batch = n_ctx
        if n_ubatch > n_batch:
            n_ubatch = n_batch
        # the KV cache must fit in host memory (policy in alpaca2._memory)
        from alpaca2._memory import check_kv_cache
        check_kv_cache(model, n_ctx, type_k, type_v, bool(offload_kqv and supports_gpu_offload()))
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
            p.rope_freq_base = floats["rope_freq_base"]
        if rope_freq_scale is not None:
            p.rope_freq_scale = floats["rope_freq_scale"]
        if yarn_ext_factor is not None:
            p.yarn_ext_factor = floats["yarn_ext_factor"]
        if yarn_attn_factor is not None:
            p.yarn_attn_factor = floats["yarn_attn_factor"]
        if yarn_beta_fast is not None:
            p.yarn_beta_fast = floats["yarn_beta_fast"]
        if yarn_beta_slow is not None:
            p.yarn_beta_slow = floats["yarn_beta_slow"]
        if yarn_orig_ctx is not None:
            p.yarn_orig_ctx = yarn_orig_ctx
        p.abort_callback = _abort_callback
        p.abort_callback_data = <void *>&self._flags
        cdef llama_model * c_model
        with model._lock:                    # the model is not freed under us; close() sees us
            model._check()
            c_model = model.ptr
            with nogil:
                self.ptr = llama_init_from_model(c_model, p)
            if self.ptr != NULL:
                model._dependents.add(self)
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
        self.type_k = type_k
        self.type_v = type_v
        self.kv_unified = kv_unified
        self.flash_attn = {"on": True, "enabled": True, "off": False, "disabled": False}.get(flash_attn, flash_attn)
        self._batch = Batch(self._n_batch, 1)
        self._all_logits = None
        self._n_outputs = 0
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
        with self._lock:
            if self.ptr != NULL:
                if not self.model._rpc_gone():    # else left allocated: llama.cpp would abort
                    with nogil:
                        llama_free(self.ptr)
                self.ptr = NULL
                self.mem = NULL
                self._n_outputs = 0
                self._all_logits = None

    def __dealloc__(self):
        if self.ptr != NULL:
            if self.model is None or not self.model._rpc_gone():
                llama_free(self.ptr)
            self.ptr = NULL

    def __enter__(self):
        with self._lock:
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
        with self._lock:
            self._check()
            return self._n_ctx

    @property
    def n_batch(self):
        with self._lock:
            self._check()
            return self._n_batch

    @property
    def n_ubatch(self):
        with self._lock:
            self._check()
            return llama_n_ubatch(self.ptr)

    @property
    def n_seq_max(self):
        with self._lock:
            self._check()
            return self._n_seq_max

    @property
    def n_vocab(self):
        return self._n_vocab

    @property
    def n_threads(self):
        with self._lock:
            self._check()
            return llama_n_threads(self.ptr)

    def set_n_threads(self, n_threads, n_threads_batch=None):
        n_threads = _int_arg(n_threads, "n_threads", 1, MAX_THREADS)
        n_threads_batch = n_threads if n_threads_batch is None else _int_arg(
            n_threads_batch, "n_threads_batch", 1, MAX_THREADS)
        with self._lock:
            self._check()
            llama_set_n_threads(self.ptr, n_threads, n_threads_batch)

    def _check_seq(self, seq_id):
        if isinstance(seq_id, bool) or not isinstance(seq_id, (int, np.integer)):
            raise ArgumentTypeError(f"seq_id must be an int, not {type(seq_id).__name__}")
        if seq_id < 0 or seq_id >= self._n_seq_max:
            raise ArgumentValueError(f"seq_id {seq_id} is out of range (n_seq_max={self._n_seq_max})")

    def n_past(self, seq_id=0):
        """Number of positions held in the KV cache for seq_id (the next position to decode)."""
        with self._lock:
            self._check()
            self._check_seq(seq_id)
            return <int64_t>llama_memory_seq_pos_max(self.mem, seq_id) + 1

    # -- decoding -----------------------------------------------------------------------------
    def decode(self, tokens, seq_id=0, logits="last"):
        """Decode tokens at the end of sequence seq_id.

        Input longer than n_batch is split into n_batch chunks.  ``logits="last"`` keeps the
        logits of the last token (``ctx.logits``); ``logits="all"`` keeps every position
        (``ctx.logits_at(i)``), ``logits=None`` none.  Raises ContextFullError when the
        tokens do not fit, DecodeAborted after abort(), KeyboardInterrupt on Ctrl+C; in every
        error case the KV cache is left as it was before the call.
        """
        if logits not in ("last", "all", None):
            raise ValueError(f"logits must be 'last', 'all' or None, got {logits!r}")
        self._check_seq(seq_id)
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
        # the caller holds self._lock and has checked self.ptr, the tokens and seq_id
        if self.model._rpc is not None:
            self.model._rpc.check()          # a server that has gone: an exception, not llama.cpp's abort
        cdef int64_t pos_max = llama_memory_seq_pos_max(self.mem, seq_id)
        if pos_max + 1 + n > self._n_ctx:
            raise ContextFullError(
                f"{n} tokens do not fit: {pos_max + 1} of n_ctx={self._n_ctx} positions are in use "
                f"(sequence {seq_id}); use a larger n_ctx or drop old tokens")
        cdef int n_past = <int>(pos_max + 1)
        cdef llama_batch * b = &self._batch.batch
        cdef int start = 0, chunk, i, rc = 0
        cdef int n_batch = self._n_batch
        cdef bint many = all_logits and n > n_batch
        cdef bint rolled_back = True
        cdef float * src
        cdef float * dst = NULL
        cdef cnp.ndarray all_out
        self._all_logits = None
        self._n_outputs = 0
        if many:
            all_out = np.empty((n, self._n_vocab), dtype=np.float32)
            dst = <float *>cnp.PyArray_DATA(all_out)
        cdef bint sigint = _decode_begin(&self._flags)
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
                if rc != 0:
                    # leave the cache as it was: drop whatever part of this call reached it
                    rolled_back = _rollback(self.mem, seq_id, n_past)
        finally:
            _decode_end(&self._flags, sigint)
        if rc != 0:
            _raise_decode(rc, &self._flags, sigint, rolled_back, "")
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

    def decode_token(self, token, int seq_id=0):
        """Decode one token at the end of seq_id (the generation hot path: no array conversion)."""
        cdef llama_token tok = _token_arg(token, self._n_vocab)
        if seq_id < 0 or seq_id >= self._n_seq_max:
            self._check_seq(seq_id)
        with self._lock:
            self._check()
            self._decode_tokens(&tok, 1, seq_id, False)

    def decode_batch(self, Batch batch not None):
        """Decode a hand-built Batch (several sequences, explicit positions) in one llama_decode.

        As decode(): on an error (including abort() and Ctrl+C) the positions the batch wrote are
        dropped again, so the KV cache is left as it was before the call.  The batch's lock is held
        from the checks to the end of the decode: another thread's Batch.add() waits."""
        with batch._lock:
            self._decode_batch(batch)

    def _decode_batch(self, Batch batch):
        cdef int rc = 0, i, j, s, n = batch.batch.n_tokens
        cdef bint rolled_back = True, sigint
        if n == 0:
            raise ValueError("the batch is empty")
        if n > self._n_batch:
            raise ValueError(f"the batch has {n} tokens, more than n_batch={self._n_batch}")
        n_out = 0
        first_pos = {}                       # per sequence: the lowest position the batch writes
        for i in range(n):
            if batch.batch.token[i] < 0 or batch.batch.token[i] >= self._n_vocab:
                raise TokenizeError(f"token id {batch.batch.token[i]} is out of range")
            if batch.batch.pos[i] < 0 or batch.batch.pos[i] > 0x7fffffff - n:
                raise ArgumentValueError(f"position {batch.batch.pos[i]} is out of range")
            for j in range(batch.batch.n_seq_id[i]):
                s = batch.batch.seq_id[i][j]
                self._check_seq(s)
                first_pos[s] = min(first_pos.get(s, batch.batch.pos[i]), batch.batch.pos[i])
            n_out += batch.batch.logits[i] != 0
        with self._lock:
            self._check()
            if self.model._rpc is not None:
                self.model._rpc.check()
            self._all_logits = None
            self._n_outputs = 0
            sigint = _decode_begin(&self._flags)
            try:
                with nogil:
                    rc = llama_decode(self.ptr, batch.batch)
                if rc != 0:
                    for s, p0 in first_pos.items():
                        if not _rollback(self.mem, s, p0):
                            rolled_back = False
            finally:
                _decode_end(&self._flags, sigint)
            if rc != 0:
                _raise_decode(rc, &self._flags, sigint, rolled_back, "")
            if self.model._rpc is not None:
                self.model._rpc.check()       # a server that died during the decode (see _decode_tokens)
            self._n_outputs = n_out
            self._out_flags = PyBytes_FromStringAndSize(<char *>batch.batch.logits, n)

    def synchronize(self):
        """Wait for queued work (a GPU backend computes asynchronously) to finish."""
        with self._lock:
            self._check()
            with nogil:
                llama_synchronize(self.ptr)

    def abort(self):
        """Ask a decode running in another thread to stop (it raises DecodeAborted)."""
        self._flags |= _ABORT

    @property
    def logits(self):
        """Logits of the last decoded position: a float32 numpy array (n_vocab,) of its own.

        A copy per access (llama.cpp's buffer does not outlive close() or the next decode);
        samplers read the logits in C and never make one.
        """
        return _logits_at(self, -1, True)

    def logits_at(self, int i):
        """Logits of output i of the last decode (negative i counts from the end), copied."""
        return _logits_at(self, i, False)

    @property
    def embeddings(self):
        """Embedding of sequence 0 (pooled) or of the last token (no pooling), float32 (n_embd,)."""
        return _embeddings_seq(self, 0)

    def embeddings_seq(self, seq_id=0):
        """Embedding of sequence seq_id (pooled contexts), copied; see ``embeddings``."""
        return _embeddings_seq(self, seq_id)

    # -- memory (KV cache) ----------------------------------------------------------------------
    def clear(self):
        """Empty the KV cache of every sequence."""
        with self._lock:
            self._check()
            llama_memory_clear(self.mem, True)
            self._n_outputs = 0
            self._all_logits = None

    def seq_rm(self, seq_id=0, p0=0, p1=-1):
        """Remove positions [p0, p1) of seq_id (p1=-1: to the end; seq_id=-1: every sequence)."""
        p0 = _int_arg(p0, "p0", 0, _POS_MAX)
        p1 = _int_arg(p1, "p1", -1, _POS_MAX)
        with self._lock:
            self._check()
            if seq_id != -1:
                self._check_seq(seq_id)
            if not llama_memory_seq_rm(self.mem, seq_id, p0, p1):
                raise ValueError(f"cannot remove positions [{p0}, {p1}) of sequence {seq_id}")

    def seq_cp(self, src, dst, p0=0, p1=-1):
        """Copy positions [p0, p1) of sequence src to sequence dst (shares the cells)."""
        p0 = _int_arg(p0, "p0", 0, _POS_MAX)
        p1 = _int_arg(p1, "p1", -1, _POS_MAX)
        with self._lock:
            self._check()
            self._check_seq(src)
            self._check_seq(dst)
            llama_memory_seq_cp(self.mem, src, dst, p0, p1)

    def seq_keep(self, seq_id):
        """Drop every sequence but seq_id."""
        with self._lock:
            self._check()
            self._check_seq(seq_id)
            llama_memory_seq_keep(self.mem, seq_id)

    def seq_add(self, seq_id, p0, p1, delta):
        """Shift positions [p0, p1) of seq_id by delta (context shift)."""
        p0 = _int_arg(p0, "p0", 0, _POS_MAX)
        p1 = _int_arg(p1, "p1", -1, _POS_MAX)
        delta = _int_arg(delta, "delta", -_POS_MAX, _POS_MAX)
        with self._lock:
            self._check()
            self._check_seq(seq_id)
            if not llama_memory_can_shift(self.mem):
                raise ValueError("this model's memory cannot be shifted")
            pos_max = llama_memory_seq_pos_max(self.mem, seq_id)
            if pos_max + delta > _POS_MAX:
                raise ArgumentValueError(f"shifting by {delta} would move position {pos_max} past {_POS_MAX}")
            llama_memory_seq_add(self.mem, seq_id, p0, p1, delta)

    # -- state ------------------------------------------------------------------------------------
    cdef void _outputs_after_load(self):
        # this llama.cpp's state is the model's arch and the KV cache (llama_context::state_read_data),
        # no logits: what the output buffer holds now belongs to an earlier decode. Decode the next
        # token before sampling (ChatSession saves every token but the last for that reason).
        self._out_flags = None
        self._all_logits = None
        self._n_outputs = 0

    def save_state(self):
        """The whole context state (KV cache, logits, RNG) as bytes."""
        cdef size_t size, n
        cdef uint8_t * dst
        with self._lock:
            self._check()
            size = llama_state_get_size(self.ptr)
            data = PyBytes_FromStringAndSize(NULL, size)
            dst = <uint8_t *>PyBytes_AS_STRING(data)
            with nogil:
                n = llama_state_get_data(self.ptr, dst, size)
        if n != size:
            raise StateError(f"state size changed while saving ({n} != {size})")
        return data

    def load_state(self, const unsigned char[::1] data not None):
        """Restore a state made by save_state() on a context of the same model and size.

        The blob is checked (header, sizes against its length, the model and n_ctx it belongs
        to) before llama.cpp reads it: a damaged or foreign one raises StateError.  A state holds
        the KV cache, not logits: decode the next token before sampling or reading ``logits``."""
        cdef size_t n, size = data.shape[0]
        if size == 0:
            raise StateError("empty state")
        check = _state_checker()
        with self._lock:
            self._check()
            check.check_state(data, check.expectations(self))
            with nogil:
                n = llama_state_set_data(self.ptr, &data[0], size)
            if n == 0:
                self._n_outputs = 0
                raise StateError("the state does not fit this context (another model or n_ctx?)")
            self._outputs_after_load()

    def save_state_file(self, path, tokens=()):
        """Write the state (and the tokens it holds) to path atomically (temp file + rename)."""
        cdef cnp.ndarray arr = _token_array(tokens, self._n_vocab)
        path = os.fspath(path)
        # a name of its own per call (two threads may save to one path), in the target's folder
        tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
        cdef bytes c_tmp = os.fsencode(tmp)
        cdef const char * c_tmp_p = c_tmp
        cdef bint ok
        try:
            with self._lock:
                self._check()
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
        """Restore a state written by save_state_file; returns the tokens saved with it.

        Only a regular file is opened (a FIFO would block); it is checked as load_state's blob."""
        path = os.fspath(path)
        from alpaca2._files import check_regular_file
        check_regular_file(path, "state file", StateError)
        check = _state_checker()
        cdef bytes c_path = os.fsencode(path)
        cdef const char * c_path_p = c_path
        cdef size_t cap, n_out = 0
        cdef cnp.ndarray out
        cdef bint ok
        with self._lock:
            self._check()
            check.check_state_file(path, check.expectations(self))
            cap = self._n_ctx
            out = np.empty(max(cap, 1), dtype=np.int32)
            with nogil:
                ok = llama_state_load_file(self.ptr, c_path_p, <llama_token *>cnp.PyArray_DATA(out), cap, &n_out)
            if not ok:
                self._n_outputs = 0
                raise StateError(f"could not load the state from {path} (another model or n_ctx, or a damaged file)")
            self._outputs_after_load()
        return out[:n_out].tolist()

    # -- one sequence's state (llama-server's slot save/restore) -----------------------------------
    def save_seq_state(self, seq_id=0):
        """The KV cache of sequence seq_id as bytes (llama_state_seq_get_data), for load_seq_state()."""
        cdef size_t size, n
        cdef uint8_t * dst
        cdef int s
        with self._lock:
            self._check()
            self._check_seq(seq_id)
            s = seq_id
            size = llama_state_seq_get_size(self.ptr, s)
            data = PyBytes_FromStringAndSize(NULL, size)
            dst = <uint8_t *>PyBytes_AS_STRING(data)
            with nogil:
                n = llama_state_seq_get_data(self.ptr, dst, size, s)
        if n != size:
            raise StateError(f"could not save sequence {seq_id} ({n} of {size} bytes)")
        return data

    def load_seq_state(self, const unsigned char[::1] data not None, seq_id=0):
        """Put a sequence's state (from save_seq_state, of any sequence of a context of the same model)
        into sequence seq_id, replacing what it held; returns the number of positions it now holds.

        Checked before llama.cpp reads it, as load_state's blob; on a failure seq_id is left empty."""
        cdef size_t n, size = data.shape[0]
        cdef int s
        check = _state_checker()
        with self._lock:
            self._check()
            self._check_seq(seq_id)
            s = seq_id
            check.check_seq_state(data, check.expectations(self))
            # llama.cpp keeps what the sequence held when the state is empty
            if not llama_memory_seq_rm(self.mem, s, -1, -1):
                raise StateError(f"could not empty sequence {seq_id}")
            with nogil:
                n = llama_state_seq_set_data(self.ptr, &data[0], size, s)
            if n == 0:
                llama_memory_seq_rm(self.mem, s, -1, -1)
                raise StateError(f"the sequence state does not fit this context (another model, or no room "
                                 f"for it in the KV cache)")
            # the last decode's outputs (other sequences') stay valid: llama.cpp leaves them alone
            return <int64_t>llama_memory_seq_pos_max(self.mem, s) + 1

    # -- one sequence's checkpoint (llama-server's context checkpoints) ---------------------------
    def checkpoint_seq(self, seq_id=0, full=False):
        """A checkpoint of sequence seq_id, which restore_seq() puts back: its partial state
        (llama.cpp's PARTIAL_ONLY: the recurrent state of a recurrent or hybrid model), how a cache
        that cannot drop its last positions goes back (llama-server's context checkpoints); with
        full=True all of it, KV cells too (as save_seq_state, but restored without a check: a
        server's prompt cache in host memory)."""
        cdef size_t size, n
        cdef uint8_t * dst
        cdef int s
        cdef llama_state_seq_flags flags = 0 if full else LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY
        cdef SeqCheckpoint ck
        with self._lock:
            self._check()
            self._check_seq(seq_id)
            s = seq_id
            size = llama_state_seq_get_size_ext(self.ptr, s, flags)
            data = PyBytes_FromStringAndSize(NULL, size)
            dst = <uint8_t *>PyBytes_AS_STRING(data)
            with nogil:
                n = llama_state_seq_get_data_ext(self.ptr, dst, size, s, flags)
            n_pos = <int64_t>llama_memory_seq_pos_max(self.mem, s) + 1
        if n != size:
            raise StateError(f"could not checkpoint sequence {seq_id} ({n} of {size} bytes)")
        ck = SeqCheckpoint.__new__(SeqCheckpoint)
        ck.context, ck.seq_id, ck.n_pos, ck._data, ck.full = self, seq_id, n_pos, data, bool(full)
        return ck

    def restore_seq(self, SeqCheckpoint checkpoint not None, seq_id=None):
        """Put back a checkpoint this context took (checkpoint_seq) into its sequence (or into seq_id:
        a whole one fits any; a partial one only the sequence whose other cells it was taken with):
        the sequence is as it was then, its later positions gone from the rest of its cache too.
        Returns the positions it holds.  The bytes are llama.cpp's own, for this very context, so
        they are not checked again; on a failure the sequence is left empty."""
        cdef size_t n
        cdef int s
        cdef bytes data = checkpoint._data
        cdef const uint8_t * src = <const uint8_t *>PyBytes_AS_STRING(data)
        cdef size_t size = len(data)
        cdef llama_state_seq_flags flags = 0 if checkpoint.full else LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY
        if checkpoint.context is not self:
            raise ValueError("the checkpoint was taken by another context")
        target = checkpoint.seq_id if seq_id is None else seq_id
        with self._lock:
            self._check()
            self._check_seq(target)
            s = target
            # a whole state goes into an empty sequence (llama.cpp keeps what it held when it is empty)
            if checkpoint.full and not llama_memory_seq_rm(self.mem, s, -1, -1):
                raise StateError(f"could not empty sequence {s}")
            with nogil:
                n = llama_state_seq_set_data_ext(self.ptr, src, size, s, flags)
            if n == 0 or not llama_memory_seq_rm(self.mem, s, checkpoint.n_pos, -1):
                llama_memory_seq_rm(self.mem, s, -1, -1)
                raise StateError(f"could not restore the checkpoint of sequence {s}")
            return <int64_t>llama_memory_seq_pos_max(self.mem, s) + 1

    def perf(self):
        """llama.cpp's own timings for this context (ms and counts)."""
        cdef llama_perf_context_data d
        with self._lock:
            self._check()
            llama_synchronize(self.ptr)     # counts are booked when queued work completes
            d = llama_perf_context(self.ptr)
            return {"t_load_ms": d.t_load_ms, "t_p_eval_ms": d.t_p_eval_ms, "t_eval_ms": d.t_eval_ms,
                    "n_p_eval": d.n_p_eval, "n_eval": d.n_eval, "n_reused": d.n_reused}

    def perf_reset(self):
        with self._lock:
            self._check()
            llama_perf_context_reset(self.ptr)


cdef class SeqCheckpoint:
    """A sequence's partial state, from Context.checkpoint_seq(); only that context restores it
    (Context.restore_seq).  It cannot be made any other way, so its bytes need no check."""

    def __init__(self):
        raise TypeError("a SeqCheckpoint comes from Context.checkpoint_seq()")

    @property
    def nbytes(self):
        return len(self._data)

    def __len__(self):
        return len(self._data)

    def __repr__(self):
        return (f"<SeqCheckpoint seq_id={self.seq_id} n_pos={self.n_pos} {'full' if self.full else 'partial'} "
                f"{len(self._data)} bytes>")
