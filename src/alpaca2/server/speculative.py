"""Speculative decoding in the server's decode step: every generating slot's drafts are verified in
the step's one batch, next to the other slots' tokens and prompt chunks.

Drafts come from (the first that drafts anything wins):

- llama.cpp's own n-gram drafters (``--spec-type`` ngram-simple, ngram-map-k, ngram-map-k4v,
  ngram-mod, ngram-cache), run through :class:`alpaca2._common.NgramSpeculator` over the slot's
  tokens, tried in llama.cpp's order (simple, map-k, map-k4v, mod, cache) as llama-server does;
- ``lookup`` (alpaca2's ``--lookup``, prompt-lookup decoding): the longest of the last 4 .. 1
  tokens found earlier, then as many of the tokens that followed it as the slot's draft length
  allows; that length adapts (+2 after a step that kept every draft, -1 after one that kept fewer
  than half) between ``--draft-min`` and ``--draft-max``;
- ``draft-simple`` (``-md``): a smaller model with the same vocabulary drafts greedily, up to
  ``--draft-max`` tokens, stopping at a token less likely than ``--draft-p-min``; it keeps one
  sequence per slot in a context of its own.

Verification is llama-server's: after the decode, the slot's own sampler samples at its pending
token's output, then at each draft's output for as long as what it samples is the draft.  The
drafts are point masses, so this is exact for any sampler: a draft is kept with the probability the
sampler gives it, and at the first mismatch the sampled token is a draw from the sampler's
distribution without the draft.  With greedy sampling the text is the one plain decoding gives.
The rejected drafts' positions are then dropped from the slot's KV-cache sequence.
"""
from __future__ import annotations

import random

import numpy as np

from alpaca2._common import NGRAM_SPEC_TYPES, NgramSpeculator
from alpaca2._core import Batch, Context, check_draft_compatible
from alpaca2.errors import Alpaca2Error

SPEC_TYPES = ("none", "draft-simple") + NGRAM_SPEC_TYPES
UNSUPPORTED_SPEC_TYPES = ("draft-eagle3", "draft-mtp", "draft-dflash", "draft-dspark")
LOOKUP_NGRAM_MAX = 4            # --lookup: the longest n-gram looked up
CATCH_UP_IN_BATCH = 64          # -md: tokens a slot's draft sequence catches up in the first draft decode


def synth_probs(rates, length, n_max) -> list:
    """llama-server's --spec-synth-rates / --spec-synth-len (benchmarking): the chance that draft i is
    kept once drafts 0 .. i-1 were (common_speculative_synth_rates_resolve, then rate[i] / rate[i-1])."""
    if rates is None and length is None:
        return []
    if rates is not None and length is not None:
        raise ValueError("--spec-synth-len and --spec-synth-rates are mutually exclusive")
    if rates is not None:
        if len(rates) != n_max:
            raise ValueError(f"--spec-synth-rates must hold {n_max} values (the most drafted tokens), got {len(rates)}")
        if any(not 0.0 <= r <= 1.0 for r in rates) or any(b > a for a, b in zip(rates, rates[1:])):
            raise ValueError("--spec-synth-rates must be within [0, 1] and never increase")
    else:
        if not 1.0 <= length <= n_max + 1:
            raise ValueError(f"--spec-synth-len must be within [1, {n_max + 1}]")
        p = 1.0 if length == n_max + 1 else 0.0
        if 1.0 < length < n_max + 1:         # p + p^2 + ... + p^n_max = length - 1, by bisection
            lo, hi = 0.0, 1.0
            for _ in range(32):
                p = 0.5 * (lo + hi)
                lo, hi = (p, hi) if sum(p ** (j + 1) for j in range(n_max)) < length - 1.0 else (lo, p)
            p = 0.5 * (lo + hi)
        rates = [p ** (i + 1) for i in range(n_max)]
    out, prev = [], 1.0
    for r in rates:
        out.append(r / prev if prev > 0 else 0.0)
        prev = r
    return out


def _last_match(arr, pattern, lo, end) -> int:
    """The largest s in [lo, end) with arr[s:s + len(pattern)] == pattern, else -1."""
    if end <= lo:
        return -1
    hit = arr[lo:end] == pattern[0]
    for k in range(1, len(pattern)):
        hit &= arr[lo + k:end + k] == pattern[k]
    found = np.flatnonzero(hit)
    return lo + int(found[-1]) if found.size else -1


def lookup_draft(hist, n_max) -> list:
    """Prompt lookup: after the latest earlier occurrence of the longest n-gram (4 .. 1 tokens) that
    ends hist, up to n_max tokens."""
    L = len(hist)
    if n_max <= 0 or L < 2:
        return []
    arr = np.asarray(hist, dtype=np.int64)
    for n in range(min(LOOKUP_NGRAM_MAX, L - 1), 0, -1):
        s = _last_match(arr, arr[L - n:], 0, L - n)
        if s >= 0:
            return hist[s + n:s + n + min(n_max, L - s - n)]
    return []


class DraftModel:
    """draft-simple: a second model drafts greedily, one KV-cache sequence per slot; the slots that
    draft in a step do so together, one decode of the draft model per drafted position."""

    def __init__(self, target: Context, model, *, parallel, p_min, kv_unified=True, **ctx_args):
        check_draft_compatible(target.model, model)
        self.ctx = Context(model, **dict(ctx_args, n_ctx=target.n_ctx, n_seq_max=parallel, kv_unified=kv_unified))
        self.p_min = p_min
        self.held = [[] for _ in range(parallel)]      # what each sequence of the draft's cache holds
        self.batch = Batch(parallel * (CATCH_UP_IN_BATCH + 1), parallel)

    def _rewind(self, seq_id, hist) -> list:
        """Drop what the draft's cache holds past its common prefix with hist; the tokens of hist it
        still has to decode (the last one, hist's pending token, always)."""
        held = self.held[seq_id]
        common = 0
        for a, b in zip(held, hist[:-1]):
            if a != b:
                break
            common += 1
        self.ctx.seq_rm(seq_id, common, -1)
        self.held[seq_id] = hist[:common]
        todo = hist[common:]
        if len(todo) > CATCH_UP_IN_BATCH:       # a new prompt: on its own, in n_batch pieces
            self.ctx.decode(todo[:-1], seq_id=seq_id, logits=None)
            self.held[seq_id] += todo[:-1]
            todo = todo[-1:]
        return todo

    def _pick(self, logits, logit_bias):
        """The greedy token (the request's logit_bias applied, as its sampler does), or None when it is
        less likely than p_min."""
        if logit_bias:
            ids = [t for t in logit_bias if t < logits.size]
            logits[ids] += np.array([logit_bias[t] for t in ids], dtype=np.float32)
        d = int(logits.argmax())
        if self.p_min > 0:
            z = np.exp(logits - logits[d], dtype=np.float64)
            if 1.0 / z.sum() < self.p_min:
                return None
        return d

    def draft(self, seq_id, hist, n_max, logit_bias=None) -> list:
        """Up to n_max greedy tokens after hist."""
        return self.draft_many([(seq_id, hist, n_max, logit_bias)])[seq_id]

    def draft_many(self, requests) -> dict:
        """requests: (seq_id, hist, n_max, logit_bias) of different sequences; {seq_id: drafts}.  Each
        round decodes one token of every sequence still drafting, in one batch."""
        out = {r[0]: [] for r in requests}
        live = []
        for seq_id, hist, n_max, bias in requests:
            if n_max > 0 and hist:
                live.append([seq_id, self._rewind(seq_id, hist), n_max, bias])
        batch = self.batch
        while live:
            batch.clear()        # the tokens each sequence has to decode; logits for its last one
            for seq_id, todo, _, _ in live:
                base = len(self.held[seq_id])
                for j, t in enumerate(todo):
                    batch.add(t, base + j, seq_id, j == len(todo) - 1)
            self.ctx.decode_batch(batch)
            still = []
            for i, entry in enumerate(live):       # output i: the i-th sequence's last token
                seq_id, todo, n_max, bias = entry
                self.held[seq_id] += todo
                d = self._pick(self.ctx.logits_at(i), bias)
                if d is None:
                    continue
                out[seq_id].append(d)
                if len(out[seq_id]) < n_max:
                    entry[1] = [d]
                    still.append(entry)
            live = still
        return out

    def forget(self, seq_id):
        self.held[seq_id] = []
        self.ctx.seq_rm(seq_id, 0, -1)

    def close(self):
        self.ctx.close()


class SlotSpeculation:
    """Drafts for the generating slots of one step, and their verification after its decode."""

    def __init__(self, ctx: Context, *, types=("ngram-simple",), lookup=False, draft_model=None, parallel=1,
                 n_draft=16, n_draft_min=1, p_min=0.0, ngram=None, synth_len=None, synth_rates=None,
                 stats=None, kv_unified=True, **draft_ctx_args):
        self.ctx = ctx
        self.types = [t for t in types if t != "none"]
        if lookup:
            self.types.append("lookup")
        self.n_draft, self.n_draft_min = n_draft, max(1, min(n_draft_min, n_draft))
        self.ngram = None                     # llama.cpp's n-gram drafters, one table set per slot
        ngram_types = [t for t in self.types if t in NGRAM_SPEC_TYPES]
        if ngram_types:
            self.ngram = NgramSpeculator(ngram_types, parallel, **(ngram or {}))
        self.others = [t for t in self.types if t not in NGRAM_SPEC_TYPES]      # after the n-grams
        n_max = max(([self.ngram.n_max] if self.ngram is not None else []) + [n_draft] * len(self.others))
        self.synth = synth_probs(synth_rates, synth_len, n_max)
        self.drafter = None
        if "draft-simple" in self.types:
            self.drafter = DraftModel(ctx, draft_model, parallel=parallel, p_min=p_min, kv_unified=kv_unified,
                                      **draft_ctx_args)
        self.n_cur = [n_draft] * parallel      # --lookup's adaptive draft length, per slot
        self.begun = [None] * parallel         # the job whose generation the n-gram drafters know, per slot
        self.step_drafts = {}                  # seq_id -> (the pending token's batch index, drafts, their indices)
        self.from_ngram = set()                # seq_ids whose drafts this step are the n-gram drafters'
        self.rewind = False                    # a recurrent cache (set by the engine): checkpoints before drafts
        self.snaps = {}                        # seq_id -> its checkpoint from before this step's decode
        self.stats = stats if stats is not None else {"n_drafted": 0, "n_accepted": 0, "n_steps": 0}

    def _rewind(self, slot, checkpoint):
        """Put back the slot's state from before the step; what it kept is decoded again next step."""
        try:
            n = self.ctx.restore_seq(checkpoint)
        except BaseException:
            slot.tokens = []             # (a failed restore leaves the sequence empty)
            raise
        slot.replay = slot.tokens[n:]
        del slot.tokens[n:]

    def _draft_cheap(self, slot, n_max) -> list:
        """The n-gram drafters' draft (llama.cpp's, then --lookup), or []."""
        hist = slot.tokens            # the cache's tokens and, last, the pending one
        seq = slot.seq_id
        if self.ngram is not None:
            if self.begun[seq] is not slot.job:       # a new generation: as llama-server, its prompt
                self.ngram.begin(seq, hist[:-1])
                self.begun[seq] = slot.job
            d = self.ngram.draft(seq, hist[:-1], hist[-1], n_max)
            if d:
                self.from_ngram.add(seq)
                return d
        if "lookup" in self.others:
            return lookup_draft(hist, min(n_max, self.n_cur[seq]))
        return []

    def add_drafts(self, batch, generating, room, n_ctx_slot):
        """Add each generating slot's drafts after everything else in batch (the outputs before them
        keep their indices); generating: (slot, batch index of its pending token).  The n-gram
        drafters go first; the slots they leave without a draft ask the draft model, all at once."""
        self.step_drafts = {}
        self.snaps = {}
        self.from_ngram.clear()
        found, want = [], []
        for slot, idx in generating:
            job = slot.job
            if not job.speculate or room <= 0:
                continue
            # the cache keeps a free position, and a draft never outruns the answer's length
            n_max = min(room, n_ctx_slot - len(slot.tokens) - 1, job.max_tokens - job.completion_tokens - 1)
            if n_max <= 0:
                continue
            try:
                drafts = self._draft_cheap(slot, n_max)
            except ValueError:           # (llama.cpp's drafters refused this history: they start over)
                self.begun[slot.seq_id] = None
                drafts = []
            if drafts:
                found.append((slot, idx, drafts))
                room -= len(drafts)
            elif self.drafter is not None:             # room kept for the draft model's tokens
                n = min(n_max, self.n_draft)
                want.append((slot, idx, n))
                room -= n
        if want:
            reqs = [(s.seq_id, s.tokens, n, getattr(s.job.sampler, "params", {}).get("logit_bias"))
                    for s, _, n in want]
            try:
                got = self.drafter.draft_many(reqs)
            except (Alpaca2Error, ValueError):     # the draft model's context is full, say: no drafts
                got = {}
                for s, _, _ in want:
                    self.drafter.forget(s.seq_id)
            for s, idx, _ in want:
                d = got.get(s.seq_id, [])
                if len(d) >= self.n_draft_min:     # as llama-server: too short, not worth it
                    found.append((s, idx, d))
        for slot, idx, drafts in found:
            if self.rewind:
                self.snaps[slot.seq_id] = self.ctx.checkpoint_seq(slot.seq_id)
            pos = len(slot.tokens)
            idxs = [batch.add(t, pos + i, slot.seq_id, True) for i, t in enumerate(drafts)]
            self.step_drafts[slot.seq_id] = (idx, drafts, idxs)

    def verify(self, slot):
        """The slot's new tokens after the decode (its sampler's, drafts kept while they match), with
        the cache trimmed to the kept ones; None when the slot had no drafts this step."""
        entry = self.step_drafts.pop(slot.seq_id, None)
        if entry is None:
            return None
        idx, drafts, idxs = entry
        job = slot.job
        sampler = job.sampler
        new = []
        try:
            if self.synth:
                self._verify_synth(job, [idx] + idxs, drafts, new)
            else:
                new.append(sampler.sample(self.ctx, idx))
                for d, i in zip(drafts, idxs):
                    if new[-1] != d:
                        break
                    new.append(sampler.sample(self.ctx, i))
        finally:              # kept drafts enter the slot's tokens; the others leave the cache
            kept = drafts[:max(len(new) - 1, 0)]
            slot.tokens += kept
            if not self.rewind:
                self.ctx.seq_rm(slot.seq_id, len(slot.tokens), -1)
            else:
                checkpoint = self.snaps.pop(slot.seq_id)
                if len(kept) < len(drafts):
                    self._rewind(slot, checkpoint)
        n_ok = len(new) - 1
        if slot.seq_id in self.from_ngram:
            self.ngram.accept(slot.seq_id, n_ok)
        st = self.stats
        st["n_drafted"] += len(drafts)
        st["n_accepted"] += n_ok
        st["n_steps"] += 1
        job.n_drafted += len(drafts)
        job.n_draft_accepted += n_ok
        n = self.n_cur[slot.seq_id]
        if n_ok == len(drafts):
            self.n_cur[slot.seq_id] = min(self.n_draft, n + 2)
        elif 2 * n_ok < len(drafts):
            self.n_cur[slot.seq_id] = max(self.n_draft_min, n - 1)
        return new

    def _verify_synth(self, job, idxs, drafts, new):
        """llama-server's synthetic acceptance (benchmarking): draft i is kept with probability
        synth[i] whatever the model samples (an end-of-generation draft never is), by a generator
        seeded with the request's seed.  (The sampler has seen its own token, not the kept draft:
        exact for chains without penalties, which is what this is for.)"""
        if getattr(job, "synth_rng", None) is None:
            job.synth_rng = random.Random(job.seed)
        for i, d in enumerate(drafts):
            tok = job.sampler.sample(self.ctx, idxs[i])
            if job.synth_rng.random() < self.synth[i] and not self.ctx.model.token_is_eog(d):
                new.append(d)
                continue
            new.append(tok)
            return
        new.append(job.sampler.sample(self.ctx, idxs[len(drafts)]))

    def close(self):
        if self.drafter is not None:
            self.drafter.close()
            self.drafter = None
        if self.ngram is not None:
            self.ngram.close()
            self.ngram = None
