"""llama-server's host-memory prompt cache (``--cache-ram N`` MiB, ``--cache-idle-slots``) and the
slot choice it goes with.

The cache keeps KV-cache states of whole sequences (``Context.save_seq_state``: one slot's state,
with the tokens it holds) in host memory, oldest first.  It is filled in two places, as in
llama-server (tools/server/server-context.cpp, server-task.cpp ``server_prompt_cache``):

- when a request takes a slot whose tokens it would mostly throw away (the slot was picked as the
  least recently used one, or it keeps under half of them), the slot's state is saved first, and
  a cached state that suits the new prompt better (a longer common prefix, keeping at least a
  quarter of the cached prompt) is loaded into the slot instead (and leaves the cache);
- with ``--cache-idle-slots`` (the default), each time requests start, every idle slot's state is
  saved; with ``--kv-unified`` the idle slot is then emptied, so the shared KV cache is left to
  the slots at work.

A state already contained in a cached one is not saved again; cached states contained in a new
one are dropped.  The oldest states go when the total passes the MiB limit (with no limit, when the
cached tokens pass n_ctx).  Everything here runs on the decode thread.  With the server's
``--verbose`` the steps are logged at debug level (logger ``alpaca2.server``), with the tags
llama.cpp's server tests look for.
"""
from __future__ import annotations

import logging
import time

from alpaca2.errors import Alpaca2Error

log = logging.getLogger("alpaca2.server")

MiB = 1024 * 1024
SLOT_PROMPT_SIMILARITY = 0.1    # llama-server's --slot-prompt-similarity default
KEEP_SAVE_BELOW = 0.5           # a slot keeping less than this share of its tokens is saved first
KEEP_LOAD_MIN = 0.25            # a cached prompt keeping less than this share of its tokens is left alone


def common_prefix(a, b) -> int:
    """How many leading tokens a and b share.  Runs on the decode thread for every request start
    (slot choice, each cached state), so whole 256-token slices are compared first (in C) and only
    the slice with the first difference token by token."""
    n = min(len(a), len(b))
    lo = 0
    while lo < n:
        hi = min(lo + 256, n)
        if a[lo:hi] != b[lo:hi]:
            for i in range(lo, hi):
                if a[i] != b[i]:
                    return i
        lo = hi
    return n


def pick_slot(free, tokens):
    """llama-server's choice among free slots: the one whose tokens cover the largest share of the
    prompt, when that share passes SLOT_PROMPT_SIMILARITY; else the least recently used one."""
    best, best_key = None, (0.0, 0)
    for s in free:
        if s.tokens:
            key = (common_prefix(s.tokens, tokens) / max(len(tokens), 1), -s.last_used)
            if key[0] > SLOT_PROMPT_SIMILARITY and key > best_key:
                best, best_key = s, key
    return best if best is not None else min(free, key=lambda s: s.last_used)


def wants_update(slot_tokens, tokens, by_id: bool) -> bool:
    """Whether a request about to use a slot holding slot_tokens should go through the cache first
    (llama-server's update_cache): the slot was not chosen for its prompt, or keeps under half."""
    lcp = common_prefix(slot_tokens, tokens)
    if tokens and lcp / len(tokens) > SLOT_PROMPT_SIMILARITY:       # chosen for similarity
        return lcp / len(slot_tokens) < KEEP_SAVE_BELOW
    # by id, with nothing in common: llama-server's f_keep is 0 (nan for an empty slot: no update)
    return bool(slot_tokens) or not by_id


class CachedPrompt:
    """One sequence's state in host memory and the tokens it holds (with a recurrent model's
    checkpoints taken on the way: server/checkpoints.py)."""
    __slots__ = ("tokens", "data", "key", "checkpoints")

    def __init__(self, tokens, data, key=(), checkpoints=()):
        self.tokens = tokens
        self.data = data
        self.key = key          # what else the state depends on: the LoRA scales it was computed with
        self.checkpoints = list(checkpoints)

    @property
    def size(self) -> int:
        return len(self.data) + sum(len(c[1]) for c in self.checkpoints)


def make(cache_ram_mib: int, n_ctx: int, *, idle_slots=True, kv_unified=False,
         key_of=lambda slot: ()) -> PromptCache | None:
    """The engine's prompt cache for ``--cache-ram`` (-1: no size limit, 0: none), logged as llama-server."""
    if cache_ram_mib == 0:
        log.debug("prompt cache is disabled - use `--cache-ram N` to enable it")
        if idle_slots:
            log.debug("--cache-idle-slots requires --cache-ram, disabling")
        return None
    log.debug("prompt cache is enabled, size limit: %s",
              "no limit" if cache_ram_mib < 0 else f"{cache_ram_mib} MiB")
    cache = PromptCache(max(cache_ram_mib, 0) * MiB, n_ctx, idle_slots=idle_slots, kv_unified=kv_unified,
                        key_of=key_of)
    if idle_slots:
        log.debug("idle slots will be saved to prompt cache%s upon starting a new task",
                  " and cleared" if kv_unified else "")
        log.debug("__TEST_TAG_CACHE_IDLE_SLOTS_ENABLED__")
    return cache


class PromptCache:
    """Saved prompt states, oldest first, within limit_bytes (0: none) and, with no byte limit,
    limit_tokens (0: none).  ``key_of(slot)``: what else a slot's state depends on (its LoRA
    scales); a state is loaded only into a slot with the same key."""

    def __init__(self, limit_bytes: int, limit_tokens: int, *, idle_slots=True, kv_unified=False,
                 key_of=lambda slot: ()):
        self.limit_bytes = limit_bytes
        self.limit_tokens = limit_tokens
        self.idle_slots = idle_slots
        self.kv_unified = kv_unified
        self.key_of = key_of
        self.states: list[CachedPrompt] = []

    @property
    def size(self) -> int:
        """Bytes held."""
        return sum(st.size for st in self.states)

    @property
    def n_tokens(self) -> int:
        return sum(len(st.tokens) for st in self.states)

    # -- the engine's hooks (decode thread) -----------------------------------------------------
    def before_start(self, ctx, slot, tokens, by_id: bool):
        """A request with these prompt tokens is about to use slot: save what the slot holds and
        load a better cached prompt into it, when llama-server would."""
        if not wants_update(slot.tokens, tokens, by_id):
            return
        log.debug("updating prompt cache")
        t0 = time.perf_counter()
        self.save(ctx, slot)
        self.load(ctx, slot, tokens)
        self.update()
        log.debug("prompt cache update took %.2f ms", (time.perf_counter() - t0) * 1e3)

    def cache_idle(self, ctx, slots):
        """Requests have started: save every idle slot, and with kv_unified empty it."""
        if not self.idle_slots:
            return
        for s in slots:
            if s.job is not None:
                continue
            if self.save(ctx, s):
                log.debug("slot %d: __TEST_TAG_CACHE_IDLE_SLOT__", s.seq_id)
                self.update()
            if self.kv_unified and s.tokens:
                log.debug("slot %d: clearing prompt with %d tokens", s.seq_id, len(s.tokens))
                ctx.seq_rm(s.seq_id, 0, -1)
                s.tokens = []

    def clear(self):
        """Drop every state (the server goes to sleep: its memory is given back)."""
        self.states = []

    # -- the cache ------------------------------------------------------------------------------
    def save(self, ctx, slot) -> bool:
        """Keep the state of what slot holds; False when it holds nothing, is cached already, or does
        not fit the limit."""
        tokens = slot.tokens
        if not tokens:
            return False
        key = self.key_of(slot)
        if any(st.key == key and common_prefix(st.tokens, tokens) == len(tokens) for st in self.states):
            log.debug(" - prompt is already in the cache, skipping")
            return False
        try:        # the whole state, restored without a check: it never leaves this process
            data = ctx.checkpoint_seq(slot.seq_id, full=True)
        except Alpaca2Error as e:
            log.warning("could not save slot %d to the prompt cache: %s", slot.seq_id, e)
            return False
        except MemoryError:             # as llama-server: the limit shrinks to 40% of what is held
            self.limit_bytes = max(1, int(0.4 * self.size))
            log.warning("out of memory for the prompt cache: its limit is now %.3f MiB", self.limit_bytes / MiB)
            self.update()
            return False
        log.debug(" - saving prompt with length %d, total state size = %.3f MiB", len(tokens), len(data) / MiB)
        if self.limit_bytes and len(data) > self.limit_bytes:       # would push out everything else
            log.warning(" - prompt state size %.3f MiB exceeds cache size limit %.3f MiB, skipping",
                        len(data) / MiB, self.limit_bytes / MiB)
            return False
        kept = []
        for st in self.states:          # states the new one contains are of no more use
            if st.key == key and common_prefix(st.tokens, tokens) == len(st.tokens):
                log.debug(" - removing obsolete cached prompt with length %d", len(st.tokens))
            else:
                kept.append(st)
        self.states = kept
        while self.limit_bytes and self.states and self.size + len(data) > self.limit_bytes:
            log.debug(" - making room for prompt cache entry, removing oldest entry (size = %.3f MiB)",
                      self.states[0].size / MiB)
            self.states.pop(0)
        checkpoints = [c for c in getattr(slot, "checkpoints", ()) if tokens[:c[0]] == c[2]]   # of this prompt
        self.states.append(CachedPrompt(list(tokens), data, key, checkpoints))
        return True

    def load(self, ctx, slot, tokens) -> bool:
        """Put the cached state that shares more of tokens than slot does, and keeps more of its
        own tokens, into slot (it leaves the cache).  False when loading failed (slot is then empty)."""
        lcp = common_prefix(slot.tokens, tokens)
        keep_best = lcp / len(slot.tokens) if slot.tokens else -1.0      # an empty slot: any state wins
        sim_best = lcp / max(len(tokens), 1)
        best = None
        key = self.key_of(slot)         # a state computed with other LoRA scales is of no use here
        for st in self.states:
            if st.key != key:
                continue
            lcp = common_prefix(st.tokens, tokens)
            keep, sim = lcp / len(st.tokens), lcp / max(len(tokens), 1)
            if keep >= KEEP_LOAD_MIN and keep > keep_best and sim > sim_best:
                best, keep_best, sim_best = st, keep, sim
        if best is None:
            return True
        log.debug(" - found better prompt with f_keep = %.3f, f_sim = %.3f", keep_best, sim_best)
        try:
            n = ctx.restore_seq(best.data, slot.seq_id)
        except (Alpaca2Error, ValueError) as e:     # the sequence is empty now (no room in the shared KV cache ...)
            log.warning("slot %d: failed to load prompt from cache: %s", slot.seq_id, e)
            slot.tokens = []
            return False
        slot.tokens = best.tokens[:n]
        if hasattr(slot, "checkpoints"):
            slot.checkpoints = list(best.checkpoints)
        self.states.remove(best)
        return True

    def update(self):
        """Drop the oldest states past the limits."""
        while self.limit_bytes and self.states and self.size > self.limit_bytes:
            log.debug(" - cache size limit reached, removing oldest entry (size = %.3f MiB)", self.states[0].size / MiB)
            self.states.pop(0)
        # with a byte limit, the token limit grows to what the bytes hold at the average state size per token
        per_token = max(1.0, self.size / max(1, self.n_tokens))
        limit_tokens = (max(self.limit_tokens, int(self.limit_bytes / per_token)) if self.limit_bytes
                        else self.limit_tokens)
        while self.limit_tokens and self.states and self.n_tokens > limit_tokens:
            log.debug(" - cache token limit (%d, est: %d) reached, removing oldest entry", self.limit_tokens,
                      limit_tokens)
            self.states.pop(0)
        log.debug(" - cache state: %d prompts, %.3f MiB (limits: %.3f MiB, %d tokens, %d est)", len(self.states),
                  self.size / MiB, self.limit_bytes / MiB, self.limit_tokens, limit_tokens)
