# Sampling: SamplerChain (llama.cpp's sampler chain, one primitive at a time) and Sampler (the
# usual chain with llama.cpp's defaults). Included by _core.pyx.

# the stages that pick the token: a chain must end with one (llama.cpp asserts it, ending the process)
_SELECTING = ("greedy", "dist", "mirostat", "mirostat_v2")
# the longest penalty window: llama.cpp keeps a ring buffer of this many tokens and scans it per token
MAX_PENALTY_LAST_N = 1 << 16


def _greedy_pick(logits):
    """The greedy fast path's pick over a 1-d float32 array (for tests: it must equal llama.cpp's
    greedy sampler, SamplerChain().add("greedy").sample_logits(logits), on any input)."""
    cdef float[::1] lv = np.ascontiguousarray(logits, dtype=np.float32)
    if lv.shape[0] == 0 or lv.shape[0] > 0x7fffffff:
        raise ValueError("1 to 2**31-1 logits")
    return alpaca2_first_max(&lv[0], <int>lv.shape[0])


@cython.no_gc_clear          # a grammar stage points into self._models' vocabularies
cdef class SamplerChain:
    """A llama.cpp sampler chain built one primitive at a time.

    SamplerChain().add("top_k", 40).add("top_p", 0.9).add("temp", 0.7).add("dist", seed=1)
    Primitives: greedy, dist(seed), top_k(k), top_p(p), min_p(p), typical(p), temp(t),
    temp_ext(t, delta, exponent), xtc(p, t, seed), top_n_sigma(n),
    penalties(last_n, repeat, freq, present), mirostat_v2(tau, eta, seed); with a model:
    logit_bias(model, {token: bias}), grammar(model, gbnf, root), mirostat(model, tau, eta, seed),
    grammar_lazy(model, gbnf, patterns=[regex, ...], tokens=[id, ...]) (starts at a trigger).
    A chain samples only when it ends with greedy, dist or mirostat (SamplerError otherwise).
    ``seed=None`` draws a random seed (llama.cpp's LLAMA_DEFAULT_SEED, 0xFFFFFFFF, means that);
    a seed is otherwise an int in [0, 0xFFFFFFFE].  A chain with a model-bound stage keeps the
    model alive and is closed with it.
    """

    def __cinit__(self, *args, **kwargs):
        cdef llama_sampler_chain_params p = llama_sampler_chain_default_params()
        p.no_perf = False
        self._lock = threading.RLock()
        self._models = []
        self._names = []
        self.ptr = llama_sampler_chain_init(p)
        if self.ptr == NULL:
            raise MemoryError()
        self.owner = True

    def __dealloc__(self):
        if self.ptr != NULL and self.owner:
            llama_sampler_free(self.ptr)
        self.ptr = NULL

    cdef int _check(self) except -1:
        if self.ptr == NULL:
            _raise_closed(type(self).__name__)
        return 0

    cdef int _check_selects(self) except -1:
        if not self._names or self._names[-1] not in _SELECTING:
            raise IncompleteChainError(f"this chain ({', '.join(self._names) or 'empty'}) has no final stage that "
                               "picks a token: end it with 'dist', 'greedy' or 'mirostat'")
        return 0

    def close(self):
        """Free the chain.  Safe to call twice; waits for a sample() running in another thread."""
        with self._lock:
            if self.ptr != NULL and self.owner:
                llama_sampler_free(self.ptr)
            self.ptr = NULL
            self._models = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def closed(self):
        """True after close() (or after the model a stage belongs to was closed)."""
        return self.ptr == NULL

    def __len__(self):
        with self._lock:
            self._check()
            return llama_sampler_chain_n(self.ptr)

    @property
    def names(self):
        """The primitives in the chain, in order, as llama.cpp names them."""
        with self._lock:
            self._check()
            return [llama_sampler_name(llama_sampler_chain_get(self.ptr, i)).decode()
                    for i in range(llama_sampler_chain_n(self.ptr))]

    def add(self, str kind, *args, **kwargs):
        """Append a primitive (see the class docstring); returns self for chaining."""
        cdef llama_sampler * s
        with self._lock:
            self._check()
            s = _make_primitive(self, kind, args, kwargs)
            llama_sampler_chain_add(self.ptr, s)   # the chain owns it now
            self._names.append(kind)
        return self

    def sample(self, Context ctx not None, int idx=-1):
        """Sample a token from ctx's logits at output idx and accept it into the chain's history."""
        cdef llama_token tok
        cdef int c_idx = idx
        cdef const float * lg
        with self._lock:
            self._check()
            self._check_selects()
            with ctx._lock:
                ctx._check()
                ctx._check_out(idx)
                if ctx._all_logits is not None:
                    return self.sample_logits(ctx._all_logits[idx])
                # no logits (a state loaded without them, another context's state): llama.cpp would crash
                lg = llama_get_logits_ith(ctx.ptr, c_idx)
                if lg == NULL:
                    raise SamplerError(f"there are no logits at output {idx} to sample from: decode first")
                if (len(self._names) == 1 and self._names[0] == "greedy"
                        and llama_get_sampled_token_ith(ctx.ptr, c_idx) == -1):
                    # greedy alone: llama_sampler_sample would copy the whole vocabulary into
                    # candidates (3 MB on a 262k vocabulary) for one pass; the same pass on the
                    # logits picks the same token (the first largest), then the chain accepts it
                    with nogil:
                        tok = alpaca2_first_max(lg, ctx._n_vocab)
                        llama_sampler_accept(self.ptr, tok)
                    if isnan(lg[tok]):
                        raise SamplerError("the logits are NaN (NaN weights or parameters?): no token can be sampled")
                    return tok
                try:
                    with nogil:
                        tok = sampler_sample_cpp(self.ptr, ctx.ptr, c_idx)
                except (RuntimeError, IndexError, ValueError) as e:
                    raise _sampler_error(e) from None
                lg = llama_get_logits_ith(ctx.ptr, c_idx)
                if tok < 0 or tok >= ctx._n_vocab or lg == NULL or isnan(lg[tok]):
                    raise SamplerError("the logits are NaN (NaN weights or parameters?): no token can be sampled")
        return tok

    def sample_logits(self, logits):
        """Sample from a 1-d float array of logits (any source) and accept the token."""
        cdef float[::1] lv = np.ascontiguousarray(logits, dtype=np.float32)
        cdef Py_ssize_t n = lv.shape[0], i
        if n == 0:
            raise ValueError("empty logits")
        if n > 0x7fffffff:
            raise ArgumentValueError(f"{n} logits: more than a vocabulary can hold")
        cdef llama_token_data * cand
        cdef llama_token_data_array arr
        cdef llama_token tok
        with self._lock:
            self._check()
            self._check_selects()
            for m in self._models:
                if n > (<Model>m)._n_vocab:
                    raise SamplerError(f"{n} logits for a chain built for a vocabulary of "
                                       f"{(<Model>m)._n_vocab} tokens")
            cand = <llama_token_data *>malloc(n * sizeof(llama_token_data))
            if cand == NULL:
                raise MemoryError()
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
                        raise SamplerError("the chain selected no token (end it with 'dist' or 'greedy')")
                    tok = arr.data[arr.selected].id
                    if tok < 0 or tok >= n or isnan(lv[tok]):
                        raise SamplerError("the logits are NaN: no token can be sampled")
                    sampler_accept_cpp(self.ptr, tok)
                except (RuntimeError, IndexError) as e:
                    raise _sampler_error(e) from None
            finally:
                free(cand)
        return tok

    def accept(self, token):
        """Add a token to the history (penalties, grammar) without sampling it."""
        if isinstance(token, bool) or not isinstance(token, (int, np.integer)):
            raise ArgumentTypeError(f"a token id must be an int, not {type(token).__name__}")
        with self._lock:
            self._check()
            for m in self._models:
                _token_arg(token, (<Model>m)._n_vocab)
            if not 0 <= token <= 0x7fffffff:
                raise TokenizeError(f"token id {token} is out of range")
            try:
                sampler_accept_cpp(self.ptr, <llama_token>token)
            except (RuntimeError, IndexError) as e:
                raise _sampler_error(e) from None

    def reset(self):
        """Forget the history (penalty window, grammar state); a seeded dist sampler restarts its sequence."""
        with self._lock:
            self._check()
            llama_sampler_reset(self.ptr)

    @property
    def seed(self):
        with self._lock:
            self._check()
            return llama_sampler_get_seed(self.ptr)

    def perf(self):
        cdef llama_perf_sampler_data d
        with self._lock:
            self._check()
            d = llama_perf_sampler(self.ptr)
        return {"t_sample_ms": d.t_sample_ms, "n_sample": d.n_sample}


cdef uint32_t _seed(seed) except? 0xFFFFFFFF:
    """None: a random seed (LLAMA_DEFAULT_SEED); else an int in [0, 0xFFFFFFFE], never truncated."""
    if seed is None:
        return LLAMA_DEFAULT_SEED
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ArgumentTypeError(f"seed must be an int or None, not {type(seed).__name__} ({seed!r})")
    if not 0 <= seed < LLAMA_DEFAULT_SEED:
        raise ArgumentValueError(f"seed must be between 0 and {LLAMA_DEFAULT_SEED - 1}, or None for a random "
                                 f"one (llama.cpp reads {LLAMA_DEFAULT_SEED} as 'random'); got {seed}")
    return <uint32_t>seed


cdef inline Model _model_arg(obj, str kind):
    if not isinstance(obj, Model):
        raise ArgumentTypeError(f"the {kind!r} sampler needs the Model first, got {type(obj).__name__}")
    return <Model>obj


cdef llama_sampler * _make_primitive(SamplerChain chain, str kind, tuple args, dict kw) except NULL:
    """A new llama_sampler for kind; a stage that needs a vocabulary registers chain with its model
    (under the model's lock, so that Model.close() sees it and closes the chain first)."""
    cdef llama_sampler * s = NULL
    cdef Model model
    cdef llama_logit_bias * biases
    cdef int i
    cdef bytes gbnf, root
    cdef const char * c_gbnf
    cdef const char * c_root
    if kind == "greedy":
        s = llama_sampler_init_greedy()
    elif kind == "dist":
        s = llama_sampler_init_dist(_seed(kw.get("seed", args[0] if args else None)))
    elif kind == "top_k":
        s = llama_sampler_init_top_k(_int_arg(args[0] if args else kw["k"], "top_k", 0, 0x7fffffff))
    elif kind in ("top_p", "min_p", "typical"):
        p = _float_arg(args[0] if args else kw["p"], kind)
        min_keep = _int_arg(kw.get("min_keep", args[1] if len(args) > 1 else 1), "min_keep", 0, 0x7fffffff)
        if not (0.0 <= p <= 1.0):
            raise ArgumentValueError(f"{kind} must be in [0, 1], got {p}")
        if kind == "top_p":
            s = llama_sampler_init_top_p(p, min_keep)
        elif kind == "min_p":
            s = llama_sampler_init_min_p(p, min_keep)
        else:
            s = llama_sampler_init_typical(p, min_keep)
    elif kind == "temp":
        s = llama_sampler_init_temp(_float_arg(args[0] if args else kw["t"], "temp"))
    elif kind == "temp_ext":
        s = llama_sampler_init_temp_ext(_float_arg(args[0], "temp"), _float_arg(args[1], "delta"),
                                        _float_arg(args[2], "exponent"))
    elif kind == "xtc":
        s = llama_sampler_init_xtc(_float_arg(args[0], "xtc probability"), _float_arg(args[1], "xtc threshold"),
                                   _int_arg(kw.get("min_keep", 1), "min_keep", 0, 0x7fffffff),
                                   _seed(kw.get("seed")))
    elif kind == "top_n_sigma":
        s = llama_sampler_init_top_n_sigma(_float_arg(args[0], "top_n_sigma"))
    elif kind == "penalties":
        last_n = _int_arg(kw.get("last_n", args[0] if args else 64), "penalty_last_n", 0, MAX_PENALTY_LAST_N)
        repeat = _float_arg(kw.get("repeat", args[1] if len(args) > 1 else 1.0), "repeat_penalty")
        freq = _float_arg(kw.get("freq", args[2] if len(args) > 2 else 0.0), "frequency_penalty")
        present = _float_arg(kw.get("present", args[3] if len(args) > 3 else 0.0), "presence_penalty")
        if not repeat > 0:
            raise ArgumentValueError(f"repeat_penalty must be a positive number, got {repeat}")
        s = llama_sampler_init_penalties(0, last_n, repeat, freq, present)
    elif kind == "mirostat_v2":
        s = llama_sampler_init_mirostat_v2(_seed(kw.get("seed")), _float_arg(kw.get("tau", 5.0), "mirostat_tau"),
                                           _float_arg(kw.get("eta", 0.1), "mirostat_eta"))
    elif kind in ("mirostat", "logit_bias", "grammar", "grammar_lazy"):
        model = _model_arg(args[0] if args else kw.get("model"), kind)
        with model._lock:
            model._check()
            if kind == "mirostat":
                s = llama_sampler_init_mirostat(
                    model._n_vocab, _seed(kw.get("seed")), _float_arg(kw.get("tau", 5.0), "mirostat_tau"),
                    _float_arg(kw.get("eta", 0.1), "mirostat_eta"),
                    _int_arg(kw.get("m", 100), "mirostat m", 1, model._n_vocab))
            elif kind == "logit_bias":
                bias = dict(args[1] if len(args) > 1 else kw["bias"])
                checked = [(_token_arg(tok, model._n_vocab), _float_arg_or_inf(b)) for tok, b in bias.items()]
                biases = <llama_logit_bias *>malloc(max(len(checked), 1) * sizeof(llama_logit_bias))
                if biases == NULL:
                    raise MemoryError()
                try:
                    for i in range(len(checked)):
                        biases[i].token = checked[i][0]
                        biases[i].bias = checked[i][1]
                    s = llama_sampler_init_logit_bias(model._n_vocab, len(checked), biases)
                finally:
                    free(biases)
            elif kind == "grammar_lazy":
                s = _make_grammar_lazy(model, args, kw)
            else:
                text = args[1] if len(args) > 1 else kw["grammar"]
                root_name = kw.get("root", args[2] if len(args) > 2 else "root")
                if not isinstance(text, (str, bytes)) or not isinstance(root_name, (str, bytes)):
                    raise ArgumentTypeError("a grammar and its root are GBNF text (str or bytes)")
                # the pre-check first: llama.cpp's parser recurses (deep nesting ends the process) and
                # builds some grammars in quadratic time
                from alpaca2._grammar_check import check_grammar
                check_grammar(text, root_name if isinstance(root_name, str) else root_name.decode("utf-8", "replace"),
                              model._n_vocab)
                gbnf = _to_bytes(text)
                root = _to_bytes(root_name)
                c_gbnf = gbnf
                c_root = root
                try:
                    with nogil:
                        s = sampler_init_grammar_cpp(model.vocab, c_gbnf, c_root)
                except (RuntimeError, IndexError, ValueError, MemoryError) as e:
                    raise GrammarError(f"llama.cpp could not build the grammar: {e}") from None
                if s == NULL:
                    raise GrammarError("the GBNF grammar could not be parsed (Model(..., verbose=True) shows where)")
            if s != NULL and chain is not None:
                # the stage points into model's vocabulary: keep it alive, close the chain with it
                chain._models.append(model)
                model._dependents.add(chain)
    else:
        raise ValueError(f"unknown sampler primitive {kind!r}")
    if s == NULL:
        raise Alpaca2Error(f"llama.cpp could not create the {kind!r} sampler")
    return s


cdef llama_sampler * _make_grammar_lazy(Model model, tuple args, dict kw) except NULL:
    # grammar_lazy(model, gbnf, patterns=[regex...], tokens=[id...], root="root"): free text until a
    # trigger (a pattern matching the output so far, or a token), then the grammar (tool calls:
    # ChatFormatter.apply()'s grammar, lazy_patterns and lazy_tokens). Called with model._lock held.
    text = args[1] if len(args) > 1 else kw["grammar"]
    root_name = kw.get("root", "root")
    if not isinstance(text, (str, bytes)) or not isinstance(root_name, (str, bytes)):
        raise ArgumentTypeError("a grammar and its root are GBNF text (str or bytes)")
    from alpaca2._grammar_check import check_grammar
    check_grammar(text, root_name if isinstance(root_name, str) else root_name.decode("utf-8", "replace"),
                  model._n_vocab)
    gbnf = _to_bytes(text)
    root = _to_bytes(root_name)
    patterns = [_to_bytes(p) for p in kw.get("patterns", ())]
    tokens = [_token_arg(t, model._n_vocab) for t in kw.get("tokens", ())]
    if not patterns and not tokens:
        raise ArgumentValueError("a lazy grammar needs trigger patterns or trigger tokens")
    cdef const char ** c_patterns = <const char **>malloc(max(len(patterns), 1) * sizeof(char *))
    cdef llama_token * c_tokens = <llama_token *>malloc(max(len(tokens), 1) * sizeof(llama_token))
    cdef llama_sampler * s = NULL
    cdef Py_ssize_t i
    try:
        if c_patterns == NULL or c_tokens == NULL:
            raise MemoryError()
        for i in range(len(patterns)):
            c_patterns[i] = <bytes>patterns[i]
        for i in range(len(tokens)):
            c_tokens[i] = tokens[i]
        try:
            s = sampler_init_grammar_lazy_cpp(model.vocab, gbnf, root, c_patterns, len(patterns),
                                              c_tokens, len(tokens))
        except Exception as e:
            raise GrammarError(f"the lazy grammar or its trigger patterns could not be compiled: {e}") from None
    finally:
        free(c_patterns)
        free(c_tokens)
    if s == NULL:
        raise GrammarError("the GBNF grammar could not be parsed (Model(..., verbose=True) shows where)")
    return s


cdef float _float_arg_or_inf(value) except? -1.0:
    """A logit bias: a number, -inf allowed (bans the token), NaN refused."""
    if isinstance(value, (bool, complex, str, bytes)):
        raise ArgumentTypeError(f"a logit bias must be a number, not {type(value).__name__}")
    v = float(value)
    if math.isnan(v):
        raise ArgumentValueError("a logit bias must not be NaN")
    return v


cdef int _accept_vocab(Sampler s) except -1:
    # the vocabulary size token ids are checked against (the chain is built once a model is known)
    if llama_sampler_chain_n(s.ptr) == 0:
        raise ValueError("this Sampler needs a model (grammar/logit_bias) before it can accept tokens: "
                         "pass model= when creating it")
    return (<Model>s._model)._n_vocab if s._model is not None else 0x7fffffff


@cython.no_gc_clear          # the grammar (grmr) points into a model's vocabulary
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
        self._fast_k = 0
        self._extra = NULL
        self._n_extra = 0

    def __dealloc__(self):
        if self.grmr != NULL:
            llama_sampler_free(self.grmr)
            self.grmr = NULL
        free(self._cur)
        self._cur = NULL
        free(self._extra)
        self._extra = NULL

    def __init__(self, *, double temp=0.8, int top_k=40, double top_p=0.95, double min_p=0.05,
                 double typical_p=1.0, double repeat_penalty=1.0, int penalty_last_n=64,
                 double frequency_penalty=0.0, double presence_penalty=0.0, int mirostat=0,
                 double mirostat_tau=5.0, double mirostat_eta=0.1, grammar=None, logit_bias=None,
                 seed=None, Model model=None):
        for name, v in (("temp", temp), ("top_p", top_p), ("min_p", min_p), ("typical_p", typical_p),
                        ("repeat_penalty", repeat_penalty), ("frequency_penalty", frequency_penalty),
                        ("presence_penalty", presence_penalty), ("mirostat_tau", mirostat_tau),
                        ("mirostat_eta", mirostat_eta)):
            if not math.isfinite(v):
                raise ArgumentValueError(f"{name} must be a finite number, got {v}")
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
        if not 0 <= penalty_last_n <= MAX_PENALTY_LAST_N:
            raise ArgumentValueError(f"penalty_last_n must be between 0 and {MAX_PENALTY_LAST_N}, got {penalty_last_n}")
        if mirostat not in (0, 1, 2):
            raise ValueError(f"mirostat must be 0, 1 or 2, got {mirostat}")
        if grammar is not None and not isinstance(grammar, (str, bytes)):
            raise TypeError("grammar must be GBNF text")
        if logit_bias is not None:
            logit_bias = {_int_arg(k, "a logit_bias token id", 0, 0x7fffffff): _float_arg_or_inf(v)
                          for k, v in dict(logit_bias).items()}
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
        self._check()
        if llama_sampler_chain_n(self.ptr) > 0:
            llama_sampler_free(self.ptr)
            self.ptr = llama_sampler_chain_init(llama_sampler_chain_default_params())
            self._names = []
            self._models = []
        if self.grmr != NULL:
            llama_sampler_free(self.grmr)
            self.grmr = NULL
        if p["grammar"] is not None:
            # kept apart from the chain; registered with the model like a chain stage (closed with it)
            self.grmr = _make_primitive(self, "grammar", (model, p["grammar"]), {})
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
        self._model = model               # the model-bound stages registered the chain with it (add)
        self._plan_fast(p)

    def _plan_fast(self, dict p):
        """Whether sample() may run the chain over the top-k candidates only (_fastpick.h): a top_k
        stage, and before it only stages that lower logits or touch listed tokens."""
        cdef int i
        self._fast_k = 0
        free(self._extra)
        self._extra = NULL
        self._n_extra = 0
        penalties = "penalties" in self._names
        bias = list(p["logit_bias"] or ())
        m = (p["penalty_last_n"] if penalties else 0) + len(bias)
        if ("top_k" not in self._names or p["repeat_penalty"] < 1.0 or p["frequency_penalty"] < 0.0
                or p["presence_penalty"] < 0.0 or p["top_k"] + m > 4096):
            return
        if bias:
            self._extra = <llama_token *>malloc(len(bias) * sizeof(llama_token))
            if self._extra == NULL:
                raise MemoryError()
            for i in range(len(bias)):
                self._extra[i] = bias[i]
            self._n_extra = len(bias)
        self._n_pre = self._names.index("top_k")
        self._fast_m = m
        self._fast_k = p["top_k"]

    @property
    def names(self):
        """The stages, as llama.cpp names them: "grammar" (kept apart) first, then the chain's."""
        with self._lock:
            self._check()
            return (["grammar"] if self.grmr != NULL else []) + [
                llama_sampler_name(llama_sampler_chain_get(self.ptr, i)).decode()
                for i in range(llama_sampler_chain_n(self.ptr))]

    def close(self):
        """Free the chain and the grammar.  Safe to call twice; waits for a sample() in another thread."""
        with self._lock:
            if self.grmr != NULL:
                llama_sampler_free(self.grmr)
                self.grmr = NULL
            SamplerChain.close(self)

    def reset(self):
        """Forget the history (penalty window, grammar state); a seeded dist sampler restarts its sequence."""
        with self._lock:
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

    cdef llama_token _fast_pick(self, const float * logits, int n) except -3:
        """The chain's pick over its top-k candidates, not accepted; -1: sample the plain way."""
        cdef llama_token tok
        cdef llama_token_data * buf
        if self._fast_k <= 0:
            return -1
        buf = self._candidates(self._fast_k + self._fast_m + 2 + self._n_extra)
        try:
            with nogil:
                tok = alpaca2_sample_topk(self.ptr, self._n_pre, self._fast_k, self._fast_m, logits, n,
                                          self._extra, self._n_extra, buf)
        except (RuntimeError, IndexError, ValueError) as e:
            raise _sampler_error(e) from None
        if tok == -2:
            raise SamplerError("the chain selected no token")
        self._fast_picks += tok >= 0
        return tok

    cdef llama_token _sample_grammar(self, const float * logits, int n) except? -1:
        """common_sampler_sample with a grammar, then common_sampler_accept(token, is_generated)."""
        cdef llama_token_data * cur
        cdef llama_token_data_array arr
        cdef llama_token_data single
        cdef llama_token_data_array one
        cdef llama_token tok = -1
        cdef int i
        cdef bint rejected
        try:
            tok = self._fast_pick(logits, n)                   # the chain picks ...
            if tok < 0:
                cur = self._candidates(n)
                with nogil:
                    for i in range(n):
                        cur[i].id = i
                        cur[i].logit = logits[i]
                        cur[i].p = 0
                    arr.data = cur
                    arr.size = n
                    arr.selected = -1
                    arr.sorted = False
                    sampler_apply_cpp(self.ptr, &arr)
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
                cur = self._candidates(n)
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
        """Sample a token from ctx's logits at output idx and accept it (chain and grammar);
        builds the chain from the context's model at first use."""
        cdef const float * logits
        cdef llama_token tok
        cdef int c_idx = idx
        with self._lock:
            self._check()
            if llama_sampler_chain_n(self.ptr) == 0:
                self._build(ctx.model)
            if self.grmr == NULL and self._fast_k == 0:
                return SamplerChain.sample(self, ctx, idx)
            with ctx._lock:
                ctx._check()
                ctx._check_out(idx)
                if ctx._all_logits is not None:
                    return self.sample_logits(ctx._all_logits[idx])
                logits = llama_get_logits_ith(ctx.ptr, c_idx)
                if logits == NULL:
                    raise SamplerError(f"there are no logits at output {idx} to sample from: decode first")
                if self.grmr != NULL:
                    tok = self._sample_grammar(logits, ctx._n_vocab)
                else:
                    tok = -1
                    if llama_get_sampled_token_ith(ctx.ptr, c_idx) == -1:
                        tok = self._fast_pick(logits, ctx._n_vocab)
                    if tok < 0:
                        return SamplerChain.sample(self, ctx, idx)
                    self._accept_picked(tok)
                if isnan(logits[tok]):
                    raise SamplerError("the logits are NaN (NaN weights or parameters?): no token can be sampled")
        return tok

    def sample_logits(self, logits):
        """Sample from a 1-d float array of logits (any source) and accept the token."""
        cdef float[::1] lv
        cdef int n_vocab
        cdef llama_token tok
        with self._lock:
            self._check()
            if llama_sampler_chain_n(self.ptr) == 0:
                raise ValueError("this Sampler needs a model (grammar/logit_bias): pass model= when creating it")
            if self.grmr == NULL:
                arr = np.ascontiguousarray(logits, dtype=np.float32)
                if (self._fast_k > 0 and arr.ndim == 1 and 0 < arr.shape[0] <= 0x7fffffff
                        and all(arr.shape[0] <= (<Model>m)._n_vocab for m in self._models)):
                    lv = arr
                    tok = self._fast_pick(&lv[0], <int>lv.shape[0])
                    if tok >= 0:
                        self._accept_picked(tok)
                        return tok
                return SamplerChain.sample_logits(self, logits)
            lv = np.ascontiguousarray(logits, dtype=np.float32)
            n_vocab = (<Model>self._model)._n_vocab
            if lv.shape[0] != n_vocab:
                raise SamplerError(f"a grammar needs logits for the whole vocabulary ({n_vocab}), "
                                   f"got {lv.shape[0]}")
            tok = self._sample_grammar(&lv[0], n_vocab)
            if isnan(lv[tok]):
                raise SamplerError("the logits are NaN: no token can be sampled")
            return tok

    cdef int _accept_picked(self, llama_token tok) except -1:
        """Accept a token the fast path picked (what llama_sampler_sample does after its pick)."""
        try:
            with nogil:
                sampler_accept_cpp(self.ptr, tok)
        except (RuntimeError, IndexError, ValueError) as e:
            raise _sampler_error(e) from None
        return 0

    def accept(self, token, bint grammar=True):
        """Add a generated token to the history (penalties and, with grammar=True, the grammar)."""
        cdef llama_token tok
        if isinstance(token, bool) or not isinstance(token, (int, np.integer)):
            raise ArgumentTypeError(f"a token id must be an int, not {type(token).__name__}")
        with self._lock:
            self._check()
            tok = _token_arg(token, _accept_vocab(self))
            try:
                if grammar and self.grmr != NULL:
                    sampler_accept_cpp(self.grmr, tok)
                sampler_accept_cpp(self.ptr, tok)
            except (RuntimeError, IndexError, ValueError) as e:
                raise _sampler_error(e) from None

    def accept_many(self, tokens, bint grammar=False):
        """Add tokens to the history in one C loop, the GIL released: a prompt, by default into
        the chain only (common_sampler_accept(token, is_generated=false), as llama.cpp's tools
        feed the prompt); ``grammar=True`` feeds the grammar too (tokens that were generated)."""
        cdef cnp.ndarray arr
        cdef const llama_token * toks
        cdef Py_ssize_t i, n
        cdef llama_sampler * chain
        cdef llama_sampler * grmr
        with self._lock:
            self._check()
            arr = _token_array(tokens, _accept_vocab(self))
            toks = <const llama_token *>cnp.PyArray_DATA(arr)
            n = arr.shape[0]
            chain = self.ptr
            grmr = self.grmr if grammar else NULL
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
