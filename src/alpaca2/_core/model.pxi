# Model: a GGUF model loaded by llama.cpp (llama_model), with the pre-checks before llama.cpp
# sees the file. Tokenization lives in vocab.pxi. Included by _core.pyx.


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


def _check_gguf_file(path):
    """Cheap checks before llama.cpp sees the file, so the common mistakes get a clear message."""
    # by stat() alone, before opening: a FIFO would block the open forever, a device never end
    from alpaca2._files import check_regular_file
    check_regular_file(path, "model file", ModelLoadError)
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


@cython.no_gc_clear          # __dealloc__ reads self._rpc
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
        self._lock = threading.RLock()
        self._closing = False
        self.vocab_only = False

    def __init__(self, path, *, n_gpu_layers=-1, bint use_mmap=True, bint use_mlock=False,
                 bint vocab_only=False, progress=None, bint verbose=False, main_gpu=0,
                 bint check_tensors=False, rpc_servers=None, tensor_split=None, double rpc_timeout=5.0):
        if self.ptr != NULL:
            raise Alpaca2Error("Model.__init__ called twice")
        n_gpu_layers = _int_arg(n_gpu_layers, "n_gpu_layers", -1, 0x7fffffff)
        main_gpu = _int_arg(main_gpu, "main_gpu", 0, 0x7fffffff)
        if not (rpc_timeout > 0 and math.isfinite(rpc_timeout)):
            raise ArgumentValueError(f"rpc_timeout must be a positive number of seconds, got {rpc_timeout}")
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
        split = [_float_arg(x, "tensor_split") for x in tensor_split] if tensor_split is not None else []
        if tensor_split is not None:
            limit = len(devs) if devs else n_max_devices
            if len(split) > limit:
                raise ValueError(f"tensor_split has {len(split)} shares for {limit} devices" +
                                 (f" ({len(devs) - 1} remote, 1 local)" if devs else ""))
            if any(not x >= 0 for x in split) or not sum(split) > 0:
                raise ValueError(f"tensor_split must be shares >= 0, not all zero; got {list(tensor_split)}")
        cdef ggml_backend_dev_t * c_devices = NULL
        cdef float * c_split = NULL
        cdef size_t i, n_split
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
                # llama.cpp reads one share per device it uses: as many as the device list, which
                # with RPC servers may be longer than llama_max_devices(); it copies the array
                n_split = max(<size_t>n_max_devices, <size_t>len(devs), <size_t>len(split))
                c_split = <float *>malloc(n_split * sizeof(float))
                if c_split == NULL:
                    raise MemoryError()
                for i in range(n_split):
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
        self.vocab_only = vocab_only
        self.vocab = llama_model_get_vocab(self.ptr)
        self._n_vocab = llama_vocab_n_tokens(self.vocab)
        if devs:
            self._rpc = rpc.Connections(endpoints)

    cdef int _check(self) except -1:
        if self.ptr == NULL or self._closing:
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
        """Free the model (and close every Context and sampler made from it).  Safe to call twice;
        waits for a call running in another thread."""
        with self._lock:
            if self.ptr == NULL:
                return
            self._closing = True             # no new dependents from here on (they check under the lock)
        # not under the model's lock: a dependent's own lock is taken before the model's elsewhere
        for dep in list(self._dependents):
            dep.close()
        with self._lock:
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
        with self._lock:
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
        with self._lock:
            self._check()
            return self._n_vocab

    @property
    def n_ctx_train(self):
        with self._lock:
            self._check()
            return llama_model_n_ctx_train(self.ptr)

    @property
    def n_embd(self):
        with self._lock:
            self._check()
            return llama_model_n_embd(self.ptr)

    @property
    def n_layer(self):
        with self._lock:
            self._check()
            return llama_model_n_layer(self.ptr)

    @property
    def n_head(self):
        with self._lock:
            self._check()
            return llama_model_n_head(self.ptr)

    @property
    def n_head_kv(self):
        with self._lock:
            self._check()
            return llama_model_n_head_kv(self.ptr)

    @property
    def n_params(self):
        with self._lock:
            self._check()
            return llama_model_n_params(self.ptr)

    @property
    def size(self):
        """Bytes of all tensors."""
        with self._lock:
            self._check()
            return llama_model_size(self.ptr)

    @property
    def desc(self):
        cdef char buf[256]
        with self._lock:
            self._check()
            n = llama_model_desc(self.ptr, buf, sizeof(buf))
            return buf[:max(n, 0)].decode("utf-8", "replace")

    @property
    def ftype(self):
        """The file's quantization type, as llama.cpp names it (e.g. 'Q4_0', 'F16')."""
        with self._lock:
            self._check()
            return llama_ftype_name(llama_model_ftype(self.ptr)).decode()

    @property
    def bos(self):
        with self._lock:
            self._check()
            return llama_vocab_bos(self.vocab)

    @property
    def eos(self):
        with self._lock:
            self._check()
            return llama_vocab_eos(self.vocab)

    @property
    def eot(self):
        with self._lock:
            self._check()
            return llama_vocab_eot(self.vocab)

    @property
    def sep(self):
        """The separator token (-1 when the vocabulary has none)."""
        with self._lock:
            self._check()
            return llama_vocab_sep(self.vocab)

    @property
    def add_eos(self):
        """Whether the vocabulary asks for EOS at the end of a prompt (BERT-like vocabularies)."""
        with self._lock:
            self._check()
            return bool(llama_vocab_get_add_eos(self.vocab))

    @property
    def add_sep(self):
        """Whether the vocabulary asks for SEP between a pair of texts (rerankers)."""
        with self._lock:
            self._check()
            return bool(llama_vocab_get_add_sep(self.vocab))

    @property
    def add_bos(self):
        """Whether the vocabulary asks for BOS at the start of a prompt."""
        with self._lock:
            self._check()
            return bool(llama_vocab_get_add_bos(self.vocab))

    @property
    def vocab_type(self):
        with self._lock:
            self._check()
            return {LLAMA_VOCAB_TYPE_NONE: "none", LLAMA_VOCAB_TYPE_SPM: "spm", LLAMA_VOCAB_TYPE_BPE: "bpe",
                    LLAMA_VOCAB_TYPE_WPM: "wpm", LLAMA_VOCAB_TYPE_UGM: "ugm", LLAMA_VOCAB_TYPE_RWKV: "rwkv",
                    LLAMA_VOCAB_TYPE_PLAMO2: "plamo2"}.get(llama_get_vocab_type(self.vocab), "other")

    @property
    def chat_template(self):
        """The model's own chat template (tokenizer.chat_template), or None."""
        cdef const char * t
        with self._lock:
            self._check()
            t = llama_model_chat_template(self.ptr, NULL)
            return t.decode("utf-8", "replace") if t != NULL else None

    @property
    def metadata(self):
        """Every GGUF key/value of the file, values as llama.cpp renders them (strings)."""
        cdef int32_t i, n, count
        cdef char * buf
        cdef size_t size
        with self._lock:
            self._check()
            count = llama_model_meta_count(self.ptr)
            buf = NULL
            size = 1024
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

    def token_is_eog(self, token):
        """True for end-of-generation tokens (EOS, EOT, ...)."""
        with self._lock:
            self._check()
            return bool(llama_vocab_is_eog(self.vocab, _token_arg(token, self._n_vocab)))

    def token_is_control(self, token):
        with self._lock:
            self._check()
            return bool(llama_vocab_is_control(self.vocab, _token_arg(token, self._n_vocab)))

    def token_text(self, token):
        """The vocabulary entry of a token as stored in the file (e.g. '▁the' or '<0x0A>')."""
        with self._lock:
            self._check()
            return llama_vocab_get_text(self.vocab, _token_arg(token, self._n_vocab)).decode("utf-8", "replace")

    def token_score(self, token):
        with self._lock:
            self._check()
            return llama_vocab_get_score(self.vocab, _token_arg(token, self._n_vocab))

    def _check_token(self, token):
        _token_arg(token, self._n_vocab)

    # -- tokenizer (vocab.pxi) ----------------------------------------------------------------
    def tokenize(self, text, bint add_bos=True, bint special=False):
        """Token ids of text (str or UTF-8 bytes).

        ``add_bos`` adds BOS when the vocabulary asks for it; ``special=False`` (the default)
        treats text like "</s>" or "[INST]" as plain text, never as control tokens.
        """
        return _tokenize(self, text, add_bos, special)

    def token_to_piece(self, token, bint special=False):
        """The bytes one token stands for (a piece may be part of a UTF-8 character)."""
        return _token_to_piece(self, token, special)

    def detokenize(self, tokens, bint special=False, bint errors_replace=True):
        """Text of token ids.  ``special=True`` renders control tokens such as ``</s>``."""
        return _detokenize_bytes(self, tokens, special).decode("utf-8", "replace" if errors_replace else "strict")

    def detokenize_bytes(self, tokens, bint special=False):
        """Like detokenize, but the raw UTF-8 bytes (which may end inside a character)."""
        return _detokenize_bytes(self, tokens, special)
