# Speculative generation. A draft (a small model, or n-gram lookup in the tokens so far) proposes
# tokens, the target verifies them all in one batched decode.  Included by _core.pyx: it works on
# Context's and SamplerChain's C fields.  A step() runs its whole loop -- drafting token after
# token, the batched verification, the acceptance test per drafted token, the KV-cache trims --
# in C with the GIL released; Python sees one call per verification step.

from libcpp.vector cimport vector
from libcpp.random cimport mt19937, uniform_real_distribution
from libc.math cimport expf
from libc.string cimport strcmp

# llama.cpp's own limit for a draft/target pair (common/speculative.cpp)
cdef int _VOCAB_MAX_SIZE_DIFFERENCE = 128


def check_draft_compatible(Model target not None, Model draft not None):
    """Raise VocabMismatchError unless draft's tokens mean the same as target's.

    As llama.cpp's speculative example: same vocabulary type, same BOS/EOS, sizes within 128,
    and the same text for every token id the two share.
    """
    target._check()
    draft._check()
    cdef int n_t = target._n_vocab, n_d = draft._n_vocab, i, n
    name_t, name_d = os.path.basename(target.path), os.path.basename(draft.path)
    if llama_get_vocab_type(target.vocab) != llama_get_vocab_type(draft.vocab):
        raise VocabMismatchError(f"draft {name_d} and target {name_t} use different tokenizer types "
                                 f"({target.vocab_type} vs {draft.vocab_type}); a draft model must "
                                 "share the target's vocabulary")
    if abs(n_t - n_d) > _VOCAB_MAX_SIZE_DIFFERENCE:
        raise VocabMismatchError(f"draft {name_d} has {n_d} tokens and target {name_t} has {n_t}: "
                                 "a draft model must share the target's vocabulary")
    if (llama_vocab_bos(target.vocab) != llama_vocab_bos(draft.vocab)
            or llama_vocab_eos(target.vocab) != llama_vocab_eos(draft.vocab)):
        raise VocabMismatchError(f"draft {name_d} and target {name_t} have different BOS/EOS tokens")
    n = min(n_t, n_d)
    cdef const char * a
    cdef const char * b
    cdef int bad = -1
    with nogil:
        for i in range(n):
            a = llama_vocab_get_text(target.vocab, i)
            b = llama_vocab_get_text(draft.vocab, i)
            if (a == NULL) != (b == NULL) or (a != NULL and strcmp(a, b) != 0):
                bad = i
                break
    if bad >= 0:
        raise VocabMismatchError(
            f"token {bad} is {target.token_text(bad)!r} in target {name_t} but {draft.token_text(bad)!r} "
            f"in draft {name_d}: a draft model must share the target's vocabulary")


cdef inline int _argmax(const float * x, int n) noexcept nogil:
    cdef int i, best = 0
    cdef float v = x[0]
    for i in range(1, n):
        if x[i] > v:
            v = x[i]
            best = i
    return best


cdef inline float _max_prob(const float * x, int n, int best) noexcept nogil:
    # softmax probability of token best (the argmax)
    cdef int i
    cdef float m = x[best]
    cdef double s = 0.0
    for i in range(n):
        s += expf(x[i] - m)
    return <float>(1.0 / s)


cdef inline float _prob_of(vector[llama_token_data] & cand, size_t size, llama_token tok) noexcept nogil:
    cdef size_t i
    for i in range(size):
        if cand[i].id == tok:
            return cand[i].p
    return 0.0


cdef enum _StepError:
    _STEP_OK = 0
    _STEP_DRAFT_DECODE = 1
    _STEP_TARGET_DECODE = 2


@cython.final
cdef class Speculator:
    """Speculative decoding on a target Context (sequence 0), with a draft Context or n-gram lookup.

    Speculator(target_ctx, draft_ctx=None, *, lookup=False, n_draft=16, n_draft_min=1, p_min=0.75,
               ngram_min=1, ngram_max=4, seed=None)

    Use: ``begin(tokens, sampler, draft_sampler)`` where the target's KV cache holds ``tokens[:-1]``
    and ``tokens[-1]`` is the next token to decode, then ``step(max_new)`` until done; each step
    returns the new tokens (at least one) and leaves the cache holding every token but the last.

    With a greedy sampler (temp <= 0) a drafted token is kept when the target's sampler picks it, so
    the output is token for token the target's own.  With a sampling chain (temp > 0) each drafted
    token d is kept with probability min(1, p(d)/q(d)) and the first rejected one is replaced by a
    draw from norm(max(p - q, 0)): the tokens are distributed exactly as the target's sampler
    draws them.  p is the target sampler's distribution (after its penalties, top-k/top-p/min-p and
    temperature), q the draft sampler's (a point mass for lookup drafts).

    The number of drafted tokens adapts: it grows by 2 after a step whose drafts were all kept and
    shrinks by 1 after a step that kept fewer than half, between n_draft_min and n_draft.  A model
    draft also stops early when its greedy token's probability is below p_min.
    """
    cdef Context target
    cdef Context draft
    cdef SamplerChain sampler
    cdef SamplerChain draft_sampler
    cdef Batch tbatch
    cdef Batch dbatch
    cdef bint greedy
    cdef readonly bint lookup
    cdef readonly int n_draft
    cdef readonly int n_draft_min
    cdef readonly float p_min
    cdef readonly int ngram_min
    cdef readonly int ngram_max
    cdef int n_cur
    cdef int draft_n                        # tokens of hist held by the draft's KV cache
    cdef vector[llama_token] hist           # the target's KV cache (seq 0) + the pending token
    cdef vector[llama_token] drafted
    cdef vector[vector[llama_token_data]] q  # the draft sampler's candidates per drafted token
    cdef vector[size_t] q_size
    cdef vector[llama_token_data] cur
    cdef vector[float] dense
    cdef mt19937 rng
    cdef readonly long n_drafted
    cdef readonly long n_accepted
    cdef readonly long n_steps
    cdef readonly long n_generated

    def __init__(self, Context target not None, Context draft=None, *, bint lookup=False, int n_draft=16,
                 int n_draft_min=1, double p_min=0.75, int ngram_min=1, int ngram_max=4, seed=None):
        target._check()
        if (draft is None) == (not lookup):
            raise ValueError("give a draft context or lookup=True (exactly one)")
        if draft is not None:
            draft._check()
            if draft is target:
                raise ValueError("the draft context must be a different Context from the target's")
            check_draft_compatible(target.model, draft.model)
        if n_draft < 1 or n_draft > 256:
            raise ValueError(f"n_draft must be between 1 and 256, got {n_draft}")
        if n_draft_min < 1 or n_draft_min > n_draft:
            raise ValueError(f"n_draft_min must be between 1 and n_draft={n_draft}, got {n_draft_min}")
        if not (0.0 <= p_min <= 1.0):
            raise ValueError(f"p_min must be in [0, 1], got {p_min}")
        if ngram_min < 1 or ngram_max < ngram_min:
            raise ValueError("need 1 <= ngram_min <= ngram_max")
        if target._n_batch < n_draft + 1:
            raise ValueError(f"the target's n_batch={target._n_batch} is smaller than n_draft + 1")
        self.target = target
        self.draft = draft
        self.lookup = lookup
        self.n_draft = n_draft
        self.n_draft_min = n_draft_min
        self.n_cur = n_draft
        self.p_min = p_min
        self.ngram_min = ngram_min
        self.ngram_max = ngram_max
        self.tbatch = Batch(n_draft + 1, 1)
        self.dbatch = Batch(n_draft + 2, 1)
        self.q.resize(n_draft)
        self.q_size.resize(n_draft)
        self.dense.resize(max(target._n_vocab, draft._n_vocab if draft is not None else 0), 0.0)
        self.rng.seed(<uint32_t>(random.getrandbits(32) if seed is None else _seed(seed)))
        self.draft_n = 0

    def reset(self):
        """Forget the tokens (and empty the draft's cache): the next begin() starts afresh."""
        self.hist.clear()
        self.sampler = None
        self.draft_sampler = None
        self.draft_n = 0
        if self.draft is not None:
            with self.draft._lock:
                if self.draft.ptr != NULL:
                    llama_memory_seq_rm(self.draft.mem, 0, 0, -1)

    def reset_stats(self):
        self.n_drafted = self.n_accepted = self.n_steps = self.n_generated = 0

    @property
    def stats(self):
        """drafted/accepted tokens, acceptance rate, verification steps, tokens per step."""
        return {"n_drafted": self.n_drafted, "n_accepted": self.n_accepted,
                "acceptance_rate": <double>self.n_accepted / self.n_drafted if self.n_drafted else 0.0,
                "n_steps": self.n_steps, "n_generated": self.n_generated,
                "tokens_per_step": <double>self.n_generated / self.n_steps if self.n_steps else 0.0,
                "n_draft": self.n_cur}

    @property
    def tokens(self):
        """The target's cache contents followed by the pending token."""
        return [t for t in self.hist]

    def begin(self, tokens, SamplerChain sampler not None, SamplerChain draft_sampler=None):
        """Start (or continue) generating after tokens; the target's cache must hold tokens[:-1].

        With a draft model, the draft's cache is brought to tokens[:-1] here (its common prefix
        with what it held is kept).  ``sampler`` is the target's chain; a sampling (non-greedy)
        chain needs ``draft_sampler`` when there is a draft model: the chain the draft samples with
        (no history-dependent stages: penalties would see rejected tokens).
        """
        self.target._check()
        sampler._check()
        if isinstance(sampler, Sampler) and (<Sampler>sampler).grmr != NULL:
            raise ValueError("a Sampler with a grammar cannot verify drafts (its grammar is kept apart "
                             "from the chain): decode without speculation")
        cdef cnp.ndarray arr = _token_array(tokens, self.target._n_vocab)
        cdef int n = arr.shape[0], i, common
        if n == 0:
            raise ValueError("begin() needs at least one token")
        if n > self.target._n_ctx:
            raise ContextFullError(f"{n} tokens do not fit in n_ctx={self.target._n_ctx}")
        names = sampler.names if not isinstance(sampler, Sampler) or llama_sampler_chain_n(sampler.ptr) else None
        if names is None:
            (<Sampler>sampler)._build(self.target.model)
            names = sampler.names
        if any(name.startswith("mirostat") for name in names):
            raise ValueError("mirostat samplers are not supported with speculative decoding")
        if not names or names[-1] not in ("greedy", "dist"):
            raise ValueError("speculative decoding needs a sampler chain that ends with greedy or dist")
        self.greedy = names[-1] == "greedy"
        if not self.greedy and self.draft is not None:
            if draft_sampler is None:
                raise ValueError("a sampling target chain needs a draft_sampler for the draft model")
            draft_sampler._check()
            dnames = draft_sampler.names
            if not dnames or dnames[-1] != "dist" or any(
                    x in ("penalties", "grammar") or x.startswith("mirostat") for x in dnames):
                raise ValueError("the draft sampler must end with dist and have no penalties, grammar "
                                 "or mirostat stages")
        cdef const llama_token * c_tok = <const llama_token *>cnp.PyArray_DATA(arr)
        if self.target.n_past(0) < n - 1:
            raise ValueError(f"the target's cache holds {self.target.n_past(0)} tokens; begin() needs "
                             f"the first {n - 1} of the given tokens decoded")
        with self.target._lock:
            self.target._check()
            if not _rollback(self.target.mem, 0, n - 1):
                raise DecodeError("llama.cpp could not trim the target's KV cache to the given tokens")
        # the draft keeps what it shares with the new tokens, then catches up on the rest
        common = 0
        if self.draft is not None:
            with self.draft._lock:
                self.draft._check()
                self.draft_n = min(self.draft_n, self.draft.n_past(0))   # the draft may have been cleared
                while common < self.draft_n and common < n - 1 and self.hist[common] == c_tok[common]:
                    common += 1
                if not _rollback(self.draft.mem, 0, common):
                    common = 0
                    llama_memory_seq_rm(self.draft.mem, 0, 0, -1)
                self.draft_n = common
        self.hist.assign(c_tok, c_tok + n)
        self.sampler = sampler
        self.draft_sampler = draft_sampler if not self.greedy else None
        if self.draft is not None and common < n - 1:
            if n - 1 > self.draft._n_ctx:
                raise ContextFullError(f"{n - 1} tokens do not fit in the draft's n_ctx={self.draft._n_ctx}")
            with self.draft._lock:
                self.draft._check()
                self.draft._decode_tokens(c_tok + common, n - 1 - common, 0, False)
            self.draft_n = n - 1

    def step(self, int max_new=256):
        """One draft + verify round: returns the new tokens (1 to n_draft + 1, at most max_new)."""
        if self.sampler is None or self.hist.size() == 0:
            raise ValueError("call begin() first")
        if max_new < 1:
            raise ValueError("max_new must be >= 1")
        self.target._check()
        self.sampler._check()
        if self.draft_sampler is not None:
            self.draft_sampler._check()
        if self.draft is not None:
            self.draft._check()
        if <int>self.hist.size() > self.target._n_ctx:
            raise ContextFullError(f"the context is full (n_ctx={self.target._n_ctx})")
        self.target.model.check_rpc()         # a server that has gone: an exception, not an abort
        if self.draft is not None:
            self.draft.model.check_rpc()
        # the samplers' locks before the contexts' (the order SamplerChain.sample takes them), then
        # the pointers re-checked under the locks: a close() in another thread waits for the step
        ds = self.draft_sampler if self.draft_sampler is not None else self.sampler
        with self.sampler._lock, ds._lock, self.target._lock:
            self.target._check()
            self.sampler._check()
            ds._check()
            if self.draft is None:
                return self._step(max_new)
            with self.draft._lock:
                self.draft._check()
                return self._step(max_new)

    cdef list _step(self, int max_new):
        cdef Context T = self.target
        cdef Context D = self.draft
        cdef llama_context * tctx = T.ptr
        cdef llama_context * dctx = D.ptr if D is not None else NULL
        cdef llama_memory_t dmem = D.mem if D is not None else NULL
        cdef llama_sampler * tchain = self.sampler.ptr
        cdef llama_sampler * dchain = self.draft_sampler.ptr if self.draft_sampler is not None else NULL
        cdef llama_batch * tb = &self.tbatch.batch
        cdef llama_batch * db = &self.dbatch.batch
        cdef int n_vocab_t = T._n_vocab
        cdef int n_vocab_d = D._n_vocab if D is not None else 0
        cdef int n_past = <int>self.hist.size() - 1
        cdef llama_token pending = self.hist.back()
        cdef int k_max = self.n_cur
        # the draft Batch holds n_draft + 2 tokens; llama_decode takes at most the draft's n_batch
        cdef int d_chunk = min(self.dbatch.capacity, D._n_batch) if D is not None else 0
        cdef bint rolled_back = True
        cdef int i, j, m, k, s, L, nn, start, count, rc = 0, err = _STEP_OK, sel
        cdef bint match, sigint = False
        cdef llama_token d, t
        cdef float pd, qd, r, w, total
        cdef const float * lg
        cdef llama_token_data_array cur_p
        cdef uniform_real_distribution[double] unif = uniform_real_distribution[double](0.0, 1.0)
        cdef vector[llama_token] accepted
        # how many tokens may be drafted: the caller's budget, the contexts' room, the batches
        k_max = min(k_max, max_new - 1, T._n_ctx - n_past - 1)
        if D is not None:
            k_max = min(k_max, D._n_ctx - n_past - 1)
        k_max = max(k_max, 0)
        self.drafted.clear()
        sigint = _decode_begin(&T._flags)
        if D is not None:
            D._flags &= ~_ABORT
            if sigint:
                D._flags |= _WATCH_SIGINT
        try:
            with nogil:
                # -- draft ------------------------------------------------------------------------
                if self.lookup and k_max > 0:
                    # the most recent earlier occurrence of the longest n-gram that ends the text
                    L = <int>self.hist.size()
                    nn = min(self.ngram_max, L - 1)
                    while nn >= self.ngram_min and self.drafted.size() == 0:
                        s = L - nn - 1
                        while s >= 0:
                            match = True
                            for j in range(nn):
                                if self.hist[s + j] != self.hist[L - nn + j]:
                                    match = False
                                    break
                            if match:
                                start = s + nn
                                count = min(k_max, L - start)
                                for j in range(count):
                                    self.drafted.push_back(self.hist[start + j])
                                break
                            s -= 1
                        nn -= 1
                elif D is not None and k_max > 0:
                    # catch up: the draft decodes what it has not seen, the pending token last, in
                    # chunks that fit its batch (steps with no drafting leave it many tokens behind)
                    j = self.draft_n
                    while err == _STEP_OK and j <= n_past:
                        db.n_tokens = 0
                        while j <= n_past and db.n_tokens < d_chunk:
                            db.token[db.n_tokens] = self.hist[j]
                            db.pos[db.n_tokens] = j
                            db.n_seq_id[db.n_tokens] = 1
                            db.seq_id[db.n_tokens][0] = 0
                            db.logits[db.n_tokens] = j == n_past
                            db.n_tokens += 1
                            j += 1
                        rc = llama_decode(dctx, db[0])
                        if rc != 0:
                            err = _STEP_DRAFT_DECODE
                        else:
                            self.draft_n = j
                    i = 0
                    while err == _STEP_OK and i < k_max:
                        lg = llama_get_logits_ith(dctx, -1)
                        if self.greedy:
                            d = _argmax(lg, n_vocab_d)
                            if self.p_min > 0 and _max_prob(lg, n_vocab_d, d) < self.p_min:
                                break
                        else:
                            self.cur.resize(n_vocab_d)
                            for j in range(n_vocab_d):
                                self.cur[j].id = j
                                self.cur[j].logit = lg[j]
                                self.cur[j].p = 0.0
                            cur_p.data = self.cur.data()
                            cur_p.size = n_vocab_d
                            cur_p.selected = -1
                            cur_p.sorted = False
                            llama_sampler_apply(dchain, &cur_p)
                            if cur_p.selected < 0:
                                break
                            d = cur_p.data[cur_p.selected].id
                            self.q[i].assign(cur_p.data, cur_p.data + cur_p.size)
                            self.q_size[i] = cur_p.size
                        if d >= n_vocab_t:
                            break
                        self.drafted.push_back(d)
                        i += 1
                        if i == k_max:
                            break
                        db.token[0] = d
                        db.pos[0] = n_past + i
                        db.n_seq_id[0] = 1
                        db.seq_id[0][0] = 0
                        db.logits[0] = True
                        db.n_tokens = 1
                        rc = llama_decode(dctx, db[0])
                        if rc != 0:
                            err = _STEP_DRAFT_DECODE
                            break
                        self.draft_n = n_past + i + 1
                # -- verify: the pending token and the drafts in one batch -------------------------
                k = <int>self.drafted.size()
                if err == _STEP_OK:
                    tb.n_tokens = k + 1
                    for j in range(k + 1):
                        tb.token[j] = pending if j == 0 else self.drafted[j - 1]
                        tb.pos[j] = n_past + j
                        tb.n_seq_id[j] = 1
                        tb.seq_id[j][0] = 0
                        tb.logits[j] = True
                    rc = llama_decode(tctx, tb[0])
                    if rc != 0:
                        err = _STEP_TARGET_DECODE
                if err == _STEP_OK:
                    for i in range(k + 1):
                        if self.greedy:
                            t = sampler_sample_cpp(tchain, tctx, i)
                            accepted.push_back(t)
                            if i < k and t == self.drafted[i]:
                                continue
                            break
                        # rejection sampling against the target's distribution p
                        lg = llama_get_logits_ith(tctx, i)
                        self.cur.resize(n_vocab_t)
                        for j in range(n_vocab_t):
                            self.cur[j].id = j
                            self.cur[j].logit = lg[j]
                            self.cur[j].p = 0.0
                        cur_p.data = self.cur.data()
                        cur_p.size = n_vocab_t
                        cur_p.selected = -1
                        cur_p.sorted = False
                        sampler_apply_cpp(tchain, &cur_p)
                        sel = cur_p.selected
                        if i == k:
                            # every draft kept: the bonus token is the target's own draw
                            t = cur_p.data[sel].id
                            sampler_accept_cpp(tchain, t)
                            accepted.push_back(t)
                            break
                        d = self.drafted[i]
                        pd = _prob_of(self.cur, cur_p.size, d)
                        qd = 1.0 if self.lookup else _prob_of(self.q[i], self.q_size[i], d)
                        r = <float>unif(self.rng)
                        if qd > 0 and r * qd < pd:
                            sampler_accept_cpp(tchain, d)
                            accepted.push_back(d)
                            continue
                        # rejected: draw from norm(max(p - q, 0))
                        if self.lookup:
                            self.dense[d] = 1.0
                        else:
                            for j in range(<int>self.q_size[i]):
                                self.dense[self.q[i][j].id] = self.q[i][j].p
                        total = 0.0
                        for j in range(<int>cur_p.size):
                            w = cur_p.data[j].p - self.dense[cur_p.data[j].id]
                            total += w if w > 0 else 0
                        t = -1
                        if total > 0:
                            r = <float>unif(self.rng) * total
                            for j in range(<int>cur_p.size):
                                w = cur_p.data[j].p - self.dense[cur_p.data[j].id]
                                if w > 0:
                                    r -= w
                                    t = cur_p.data[j].id
                                    if r <= 0:
                                        break
                        if t < 0:
                            t = cur_p.data[sel].id
                        if self.lookup:
                            self.dense[d] = 0.0
                        else:
                            for j in range(<int>self.q_size[i]):
                                self.dense[self.q[i][j].id] = 0.0
                        sampler_accept_cpp(tchain, t)
                        accepted.push_back(t)
                        break
        except BaseException:
            # a sampler error mid-verification: leave the caches as they were before the step
            _rollback(T.mem, 0, n_past)
            if D is not None:
                _rollback(dmem, 0, min(self.draft_n, n_past))
                self.draft_n = min(self.draft_n, n_past)
            T._n_outputs = 0
            raise
        finally:
            if D is not None:
                D._flags &= ~_WATCH_SIGINT
            _decode_end(&T._flags, sigint)
        T._n_outputs = 0          # the step's logits are not the user's: they span trimmed positions
        T._all_logits = None
        T.model.check_rpc()       # a server that died during the step (see Context._decode_tokens)
        if D is not None:
            D.model.check_rpc()
        if err != _STEP_OK:
            rolled_back = _rollback(T.mem, 0, n_past)
            if D is not None:
                rolled_back = _rollback(dmem, 0, min(self.draft_n, n_past)) and rolled_back
                self.draft_n = min(self.draft_n, n_past)
            who = D if err == _STEP_DRAFT_DECODE else T
            other = T if err == _STEP_DRAFT_DECODE else D
            if other is not None:
                other._flags &= ~_ABORT
            _raise_decode(rc, &who._flags, sigint, rolled_back,
                          " in the draft context" if err == _STEP_DRAFT_DECODE else " in the target context")
        m = <int>accepted.size()
        k = <int>self.drafted.size()
        # keep the pending token and the accepted drafts; the last new token is the next pending one
        if not _rollback(T.mem, 0, n_past + m):
            raise DecodeError("llama.cpp could not trim the rejected drafts from the target's KV cache: "
                              "clear() it and begin() again")
        if D is not None:
            if self.draft_n > n_past + m:
                if not _rollback(dmem, 0, n_past + m):
                    self.draft_n = 0          # unknown contents: begin() re-decodes the draft
                    llama_memory_seq_rm(dmem, 0, 0, -1)
                else:
                    self.draft_n = n_past + m
        for j in range(m):
            self.hist.push_back(accepted[j])
        self.n_steps += 1
        self.n_drafted += k
        self.n_accepted += m - 1
        self.n_generated += m
        if k > 0:
            if m - 1 == k:
                self.n_cur = min(self.n_draft, self.n_cur + 2)
            elif 2 * (m - 1) < k:
                self.n_cur = max(self.n_draft_min, self.n_cur - 1)
        return [accepted[j] for j in range(m)]
