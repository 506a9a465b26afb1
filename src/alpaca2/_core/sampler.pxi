# Sampling: SamplerChain (llama.cpp's sampler chain, one primitive at a time) and Sampler (the
# usual chain with llama.cpp's defaults). Included by _core.pyx.


cdef class SamplerChain:
    """A llama.cpp sampler chain built one primitive at a time.

    SamplerChain().add("top_k", 40).add("top_p", 0.9).add("temp", 0.7).add("dist", seed=1)
    Primitives: greedy, dist(seed), top_k(k), top_p(p), min_p(p), typical(p), temp(t),
    temp_ext(t, delta, exponent), xtc(p, t, seed), top_n_sigma(n),
    penalties(last_n, repeat, freq, present), mirostat_v2(tau, eta, seed); with a model:
    logit_bias(model, {token: bias}), grammar(model, gbnf, root), mirostat(model, tau, eta, seed).
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
    else:
        raise ValueError(f"unknown sampler primitive {kind!r}")
    if s == NULL:
        raise Alpaca2Error(f"llama.cpp could not create the {kind!r} sampler")
    return s


cdef class Sampler(SamplerChain):
    """The usual sampler, built in C as llama.cpp's common sampler (llama-cli, llama-completion,
    llama-server) builds it:

    chain: logit_bias -> penalties -> top_k -> typical -> top_p -> min_p -> temp -> dist,
    and a grammar kept apart from the chain: the chain picks a token, the grammar checks it, and
    only when it is rejected are the logits sampled again with the grammar applied first.

    ``temp=0`` (or below) means greedy.  ``mirostat=1|2`` replaces top_k..dist with mirostat.
    ``seed=None`` draws a random seed (llama.cpp's LLAMA_DEFAULT_SEED).  ``grammar`` (GBNF text)
    and ``logit_bias`` need the vocabulary: pass ``model=`` or the chain is completed at the
    first sample() from the context's model.

    The history the penalties look back on is every token accepted: ``sample()`` accepts what
    it draws; ``accept_many(prompt)`` feeds a prompt first, as llama.cpp's tools do (into the
    chain only: a grammar sees generated tokens, never the prompt).
    """

    def __cinit__(self, *args, **kwargs):
        self.grmr = NULL
        self._cur = NULL
        self._cur_cap = 0

    def __dealloc__(self):
        if self.grmr != NULL:
            llama_sampler_free(self.grmr)
            self.grmr = NULL
        free(self._cur)
        self._cur = NULL

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
        # common_sampler_init's chain (min_keep 0, its default); DRY, XTC and top-n-sigma are off
        p = self.params
        if model is not None:
            model._check()
        if llama_sampler_chain_n(self.ptr) > 0:
            llama_sampler_free(self.ptr)
            self.ptr = llama_sampler_chain_init(llama_sampler_chain_default_params())
        if self.grmr != NULL:
            llama_sampler_free(self.grmr)
            self.grmr = NULL
        if p["grammar"] is not None:
            self.grmr = _make_primitive("grammar", (model, p["grammar"]), {})
        if p["logit_bias"]:
            self.add("logit_bias", model, p["logit_bias"])
        if p["repeat_penalty"] != 1.0 or p["frequency_penalty"] != 0.0 or p["presence_penalty"] != 0.0:
            self.add("penalties", p["penalty_last_n"], p["repeat_penalty"], p["frequency_penalty"],
                     p["presence_penalty"])
        if p["temp"] <= 0:
            self.add("greedy")           # what temp <= 0 then dist picks: the first most likely token
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
                self.add("typical", p["typical_p"], 0)
            if p["top_p"] < 1.0:
                self.add("top_p", p["top_p"], 0)
            if p["min_p"] > 0.0:
                self.add("min_p", p["min_p"], 0)
            self.add("temp", p["temp"])
            self.add("dist", seed=p["seed"])
        self._model = model
        if model is not None:
            model._dependents.add(self)   # grammar/logit_bias point into the vocabulary: close with the model

    @property
    def names(self):
        """The stages, as llama.cpp names them: "grammar" (kept apart) first, then the chain's."""
        self._check()
        return (["grammar"] if self.grmr != NULL else []) + [
            llama_sampler_name(llama_sampler_chain_get(self.ptr, i)).decode()
            for i in range(llama_sampler_chain_n(self.ptr))]

    def close(self):
        if self.grmr != NULL:
            llama_sampler_free(self.grmr)
            self.grmr = NULL
        SamplerChain.close(self)

    def reset(self):
        """Forget the history (penalty window, grammar state); a seeded dist sampler restarts its sequence."""
        self._check()
        llama_sampler_reset(self.ptr)
        if self.grmr != NULL:
            llama_sampler_reset(self.grmr)

    cdef llama_token_data * _candidates(self, int n) except NULL:
        if <size_t>n > self._cur_cap:
            free(self._cur)
            self._cur = NULL
            self._cur_cap = 0
            self._cur = <llama_token_data *>malloc(max(n, 1) * sizeof(llama_token_data))
            if self._cur == NULL:
                raise MemoryError()
            self._cur_cap = n
        return self._cur

    cdef llama_token _sample_grammar(self, const float * logits, int n) except? -1:
        """common_sampler_sample with a grammar, then common_sampler_accept(token, is_generated)."""
        cdef llama_token_data * cur = self._candidates(n)
        cdef llama_token_data_array arr
        cdef llama_token_data single
        cdef llama_token_data_array one
        cdef llama_token tok = -1
        cdef int i
        cdef bint rejected
        try:
            with nogil:
                for i in range(n):
                    cur[i].id = i
                    cur[i].logit = logits[i]
                    cur[i].p = 0
                arr.data = cur
                arr.size = n
                arr.selected = -1
                arr.sorted = False
                sampler_apply_cpp(self.ptr, &arr)              # the chain picks ...
            if arr.selected < 0 or <size_t>arr.selected >= arr.size:
                raise ValueError("the chain selected no token")
            tok = arr.data[arr.selected].id
            single.id = tok
            single.logit = 1.0
            single.p = 0
            one.data = &single
            one.size = 1
            one.selected = -1
            one.sorted = False
            with nogil:
                sampler_apply_cpp(self.grmr, &one)             # ... the grammar checks ...
            rejected = isinf(single.logit) and single.logit < 0
            if rejected:
                with nogil:                                    # ... or goes first, on fresh logits
                    for i in range(n):
                        cur[i].id = i
                        cur[i].logit = logits[i]
                        cur[i].p = 0
                    arr.data = cur
                    arr.size = n
                    arr.selected = -1
                    arr.sorted = False
                    sampler_apply_cpp(self.grmr, &arr)
                    sampler_apply_cpp(self.ptr, &arr)
                if arr.selected < 0 or <size_t>arr.selected >= arr.size:
                    raise ValueError("the chain selected no token")
                tok = arr.data[arr.selected].id
            with nogil:
                sampler_accept_cpp(self.grmr, tok)
                sampler_accept_cpp(self.ptr, tok)
        except (RuntimeError, IndexError, ValueError) as e:
            raise _sampler_error(e) from None
        return tok

    def sample(self, Context ctx not None, int idx=-1):
        """Sample a token from ctx's logits at output idx and accept it (chain and grammar)."""
        self._check()
        if llama_sampler_chain_n(self.ptr) == 0:
            self._build(ctx.model)
        if self.grmr == NULL:
            return SamplerChain.sample(self, ctx, idx)
        ctx._check()
        ctx._check_out(idx)
        if ctx._all_logits is not None:
            return self.sample_logits(ctx._all_logits[idx])
        cdef const float * logits
        cdef llama_token tok
        with ctx._lock:
            ctx._check()
            logits = llama_get_logits_ith(ctx.ptr, idx)
            if logits == NULL:
                raise SamplerError(f"the context has no logits at output {idx}")
            tok = self._sample_grammar(logits, ctx._n_vocab)
        return tok

    def sample_logits(self, logits):
        """Sample from a 1-d float array of logits (any source) and accept the token."""
        self._check()
        if llama_sampler_chain_n(self.ptr) == 0:
            raise ValueError("this Sampler needs a model (grammar/logit_bias): pass model= when creating it")
        if self.grmr == NULL:
            return SamplerChain.sample_logits(self, logits)
        cdef float[::1] lv = np.ascontiguousarray(logits, dtype=np.float32)
        cdef int n_vocab = (<Model>self._model)._n_vocab
        if lv.shape[0] != n_vocab:
            raise SamplerError(f"a grammar needs logits for the whole vocabulary ({n_vocab}), "
                               f"got {lv.shape[0]}")
        return self._sample_grammar(&lv[0], n_vocab)

    def accept(self, int token, bint grammar=True):
        """Add a generated token to the history (penalties and, with grammar=True, the grammar)."""
        self._check()
        if llama_sampler_chain_n(self.ptr) == 0:
            raise ValueError("this Sampler needs a model (grammar/logit_bias) before it can accept tokens: "
                             "pass model= when creating it")
        cdef int n_vocab = (<Model>self._model)._n_vocab if self._model is not None else 0x7fffffff
        if token < 0 or token >= n_vocab:
            raise TokenizeError(f"token id {token} is out of range")
        try:
            if grammar and self.grmr != NULL:
                sampler_accept_cpp(self.grmr, token)
            sampler_accept_cpp(self.ptr, token)
        except (RuntimeError, IndexError, ValueError) as e:
            raise _sampler_error(e) from None

    def accept_many(self, tokens, bint grammar=False):
        """Add tokens to the history in one C loop, the GIL released: a prompt, by default into
        the chain only (common_sampler_accept(token, is_generated=false), as llama.cpp's tools
        feed the prompt); ``grammar=True`` feeds the grammar too (tokens that were generated)."""
        self._check()
        if llama_sampler_chain_n(self.ptr) == 0:
            raise ValueError("this Sampler needs a model (grammar/logit_bias) before it can accept tokens: "
                             "pass model= when creating it")
        cdef int n_vocab = (<Model>self._model)._n_vocab if self._model is not None else 0x7fffffff
        cdef cnp.ndarray arr = _token_array(tokens, n_vocab)
        cdef const llama_token * toks = <const llama_token *>cnp.PyArray_DATA(arr)
        cdef Py_ssize_t i, n = arr.shape[0]
        cdef llama_sampler * chain = self.ptr
        cdef llama_sampler * grmr = self.grmr if grammar else NULL
        try:
            with nogil:
                for i in range(n):
                    if grmr != NULL:
                        sampler_accept_cpp(grmr, toks[i])
                    sampler_accept_cpp(chain, toks[i])
        except (RuntimeError, IndexError, ValueError) as e:
            raise _sampler_error(e) from None

    def __repr__(self):
        shown = ", ".join(f"{k}={v!r}" for k, v in self.params.items() if v is not None)
        return f"alpaca2.Sampler({shown})"
