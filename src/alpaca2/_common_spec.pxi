# Included by _common.pyx: llama.cpp's n-gram speculative drafters (common/speculative.h), through
# alpaca2's shim (_spec_shim.cpp).  Mechanism only: alpaca2.server.speculative decides when to draft.

NGRAM_SPEC_TYPES = ("ngram-simple", "ngram-map-k", "ngram-map-k4v", "ngram-mod", "ngram-cache")

_NGRAM_DEFAULTS = dict(simple_size_n=12, simple_size_m=48, simple_min_hits=1,
                       map_k_size_n=12, map_k_size_m=48, map_k_min_hits=1,
                       map_k4v_size_n=12, map_k4v_size_m=48, map_k4v_min_hits=1,
                       mod_n_match=24, mod_n_min=48, mod_n_max=64, lookup_cache_static=None,
                       lookup_cache_dynamic=None)


cdef str _spec_check(int status, string & error):
    if status == spec_shim.STATUS_OK:
        return None
    text = error.decode("utf-8", "replace")
    if status == spec_shim.STATUS_BAD_INPUT:
        raise ValueError(text)
    raise RuntimeError(f"llama.cpp's speculative drafter failed: {text}")


cdef class NgramSpeculator:
    """llama.cpp's self-speculative n-gram drafters for ``n_seq`` sequences, as llama-server runs them.

    NgramSpeculator(types, n_seq, **settings)

    ``types``: names from :data:`NGRAM_SPEC_TYPES` (llama-server's ``--spec-type``); whatever order
    they are given in, llama.cpp tries them in its own (simple, map-k, map-k4v, mod, cache) and the
    first that drafts anything wins.  ``settings``: ``simple_size_n`` ... ``mod_n_max``, llama-server's
    ``--spec-ngram-*`` flags with its defaults (out of their ranges: ValueError); for ngram-cache,
    ``lookup_cache_static`` / ``lookup_cache_dynamic``: n-gram cache files (llama-server's ``-lcs`` /
    ``-lcd``, made by llama.cpp's ``llama-lookup-create``), read once, never written (a file that is
    not one: ValueError).

    Per sequence: :meth:`begin` with the prompt when its generation starts, :meth:`draft` before a
    step, :meth:`accept` with how many drafted tokens the target kept.

    Thread safety: one call at a time (an internal lock); the GIL is released while llama.cpp works.
    """
    cdef spec_shim.speculator * ptr
    cdef readonly tuple types
    cdef readonly int n_seq
    cdef object _lock

    def __cinit__(self):
        self.ptr = NULL

    def __init__(self, types, int n_seq, **settings):
        cdef spec_shim.ngram_config cfg
        cdef string error
        cdef int t
        if isinstance(types, str):
            types = [types]
        names = tuple(dict.fromkeys(types))
        if not names:
            raise ValueError("NgramSpeculator needs at least one n-gram type")
        for name in names:
            if name not in NGRAM_SPEC_TYPES:
                raise ValueError(f"not an n-gram speculative type: {name!r} (one of {', '.join(NGRAM_SPEC_TYPES)})")
            t = spec_shim.type_from_name(name.encode("ascii"))
            if t < 0:
                raise ValueError(f"llama.cpp does not know the speculative type {name!r}")
            cfg.types.push_back(t)
        unknown = set(settings) - set(_NGRAM_DEFAULTS)
        if unknown:
            raise TypeError(f"unknown n-gram setting(s): {', '.join(sorted(unknown))}")
        s = dict(_NGRAM_DEFAULTS, **settings)
        for k in ("lookup_cache_static", "lookup_cache_dynamic"):
            path = s.pop(k)
            if path is None:
                continue
            path = os.fsencode(path)
            if not path or b"\0" in path:
                raise ValueError(f"{k}: not a file name: {path!r}")
            if k == "lookup_cache_static":
                cfg.lookup_cache_static = path
            else:
                cfg.lookup_cache_dynamic = path
        for k, v in s.items():
            if not isinstance(v, int) or isinstance(v, bool):
                raise TypeError(f"{k} must be an int, not {type(v).__name__}")
            if not -(1 << 30) < v < (1 << 30):
                raise ValueError(f"{k} out of range: {v}")
        cfg.simple_size_n, cfg.simple_size_m, cfg.simple_min_hits = s["simple_size_n"], s["simple_size_m"], s["simple_min_hits"]
        cfg.map_k_size_n, cfg.map_k_size_m, cfg.map_k_min_hits = s["map_k_size_n"], s["map_k_size_m"], s["map_k_min_hits"]
        cfg.map_k4v_size_n, cfg.map_k4v_size_m, cfg.map_k4v_min_hits = \
            s["map_k4v_size_n"], s["map_k4v_size_m"], s["map_k4v_min_hits"]
        cfg.mod_n_match, cfg.mod_n_min, cfg.mod_n_max = s["mod_n_match"], s["mod_n_min"], s["mod_n_max"]
        if n_seq < 1:
            raise ValueError(f"n_seq must be at least 1, got {n_seq}")
        cdef uint32_t nseq = n_seq
        with nogil:
            self.ptr = spec_shim.speculator_new(cfg, nseq, error)
        if self.ptr == NULL:
            _spec_check(spec_shim.STATUS_BAD_INPUT if error.size() else spec_shim.STATUS_INTERNAL, error)
        self.types = names
        self.n_seq = n_seq
        self._lock = threading.Lock()

    def __dealloc__(self):
        if self.ptr != NULL:
            spec_shim.speculator_free(self.ptr)
            self.ptr = NULL

    def close(self):
        """Free llama.cpp's drafters and their tables.  Safe to call twice."""
        if self._lock is None:
            return
        with self._lock:
            if self.ptr != NULL:
                spec_shim.speculator_free(self.ptr)
                self.ptr = NULL

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def closed(self):
        return self.ptr == NULL

    cdef int _check_open(self) except -1:
        if self.ptr == NULL:
            raise ClosedError("this NgramSpeculator is closed")
        return 0

    @property
    def n_max(self):
        """The most tokens one draft can hold (llama.cpp's common_speculative_n_max)."""
        self._check_open()
        return spec_shim.speculator_n_max(self.ptr)

    def begin(self, int seq, prompt):
        """A new generation on sequence ``seq``; ``prompt``: the tokens its cache holds."""
        cdef vector[int32_t] toks = prompt
        cdef string error
        cdef int status
        with self._lock:
            self._check_open()
            with nogil:
                status = spec_shim.speculator_begin(self.ptr, seq, toks.data(), toks.size(), error)
        _spec_check(status, error)

    def draft(self, int seq, hist, int id_last, int n_max):
        """Up to ``n_max`` drafted tokens to follow ``hist`` (the cache's tokens) and ``id_last`` (the
        token sampled last); ``[]`` when no n-gram matches.  Between :meth:`begin` calls a sequence's
        ``hist`` only grows (a shorter one: ValueError)."""
        cdef vector[int32_t] toks = hist
        cdef vector[int32_t] out
        cdef string error
        cdef int status
        with self._lock:
            self._check_open()
            with nogil:
                status = spec_shim.speculator_draft(self.ptr, seq, toks.data(), toks.size(), id_last, n_max,
                                                    out, error)
        _spec_check(status, error)
        return list(out)

    def accept(self, int seq, int n_accepted):
        """The target kept ``n_accepted`` tokens of sequence ``seq``'s last draft (a no-op without one)."""
        cdef string error
        cdef int status
        with self._lock:
            self._check_open()
            status = spec_shim.speculator_accept(self.ptr, seq, n_accepted, error)
        _spec_check(status, error)
