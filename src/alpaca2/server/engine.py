"""The scheduler and the decode thread: slots in one KV cache, one batch per step.

One background thread owns the Context (``--parallel N`` sequences, a KV-cache stream each, or one
shared cache with ``-kvu``) and
runs the decode loop; asyncio handlers hand it jobs and read text back through queues.  Each step
builds one Batch from all busy slots (one token for each generating request, prompt chunks for new
ones, up to n_batch tokens), calls llama_decode once (the GIL is released meanwhile), and samples
each slot's token with that slot's own sampler.  With speculative decoding each generating slot's
drafts go last in the same batch and its sampler then checks them (alpaca2.server.speculative).
A slot keeps its tokens in the KV cache after its request ends; a new request takes the free slot
whose tokens cover most of its prompt and decodes only the rest (prompt_cache.py: that choice, and
the host-memory cache of prompts slots gave up).  A cancelled job frees its slot at the next step.
"""
from __future__ import annotations

import asyncio
import collections
import threading
import time

import numpy as np

from alpaca2._core import Batch, Context, Model
from alpaca2.errors import Alpaca2Error, ContextFullError
from alpaca2.server import prompt_cache
from alpaca2.server.embed_job import EmbedJob
from alpaca2.server.event_queue import EventQueue
from alpaca2.server.lora import LoraSet
from alpaca2.server.prompt_cache import common_prefix, pick_slot
from alpaca2.server.checkpoints import Checkpoints, cannot_drop_last
from alpaca2.server.speculative import SlotSpeculation
from alpaca2.server.validation import APIError
from alpaca2.streaming import TextStream

RATE_WINDOW_S = 10.0           # tokens/sec in /metrics: the last 10 seconds
PROMPT_CHUNK_WHILE_GENERATING = 128   # prompt tokens per step while other slots generate


class Job:
    """One generation request as the decode thread sees it; events go back to the asyncio side."""

    def __init__(self, tokens, *, max_tokens, sampler, stop, strip_leading_space, ignore_eos, loop,
                 n_probs=0, banned=(), accept_prompt=True, id_slot=-1):
        self.tokens = tokens
        self.max_tokens = max_tokens
        self.sampler = sampler
        self.stop = stop
        self.strip_leading_space = strip_leading_space
        self.ignore_eos = ignore_eos
        self.loop = loop
        self.events = EventQueue()
        self.cancelled = False          # set by the handler (client gone); read by the decode thread
        self.completion_tokens = 0
        self.cached_tokens = 0
        self.finish_reason = None
        self.stop_type = "none"          # llama-server's: eos, word, limit
        self.stopping_word = ""
        self.n_probs = n_probs          # > 0: each token's logprob and the n_probs most likely
        self.banned = frozenset(banned)  # logit_bias -inf: never emitted, even if sampled
        self.accept_prompt = accept_prompt      # the prompt enters the sampler's history (penalties)
        self.id_slot = id_slot          # -1: any slot
        self.preserved = frozenset()    # special tokens shown as their text (a template's tool-call markup)
        self.slot_id = -1               # the slot it runs in
        self.return_progress = False    # ("progress", {...}) events while the prompt is decoded
        self.speculate = False          # its slot may draft tokens (set by the API layer; server/speculative.py)
        self.n_drafted = self.n_draft_accepted = 0
        self.generated: list[int] = []
        self._toks: list[int] = []       # sampled since the last text event
        self._probs: list[dict] = []
        self.coalesce = False           # set by a handler that reads the whole answer: text events are held
        self.held = None                # (texts, tokens, logprobs) held back, with coalesce
        self.index = 0                  # the choice (n > 1 share one events queue)
        self.seed = None
        self.t_submit = time.monotonic()
        self.t_start = self.t_prompt_done = self.t_end = None
        self.t_prompt_last = None       # when the last prompt batch was decoded
        self.n_prompt_done = 0          # prompt tokens decoded so far (not counting the cached ones)

    def cancel(self):
        self.cancelled = True

    @property
    def usage(self) -> dict:
        n_p, n_c = len(self.tokens), self.completion_tokens
        return {"prompt_tokens": n_p, "completion_tokens": n_c, "total_tokens": n_p + n_c,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}

    @property
    def timings(self) -> dict:
        """llama-server's timings: prompt (the uncached part) and generation, in ms."""
        now = time.monotonic()
        t0 = self.t_start or now
        if self.t_prompt_done is not None:          # the prompt is done: generation from then on
            t1, t2 = self.t_prompt_done, self.t_end or now
            prompt_n = len(self.tokens) - self.cached_tokens
        else:                                       # still in the prompt: as far as it got
            t1 = t2 = self.t_prompt_last or t0
            prompt_n = self.n_prompt_done
        predicted_n = self.completion_tokens
        prompt_ms, predicted_ms = (t1 - t0) * 1e3, (t2 - t1) * 1e3
        steps = max(predicted_n - 1, 0)
        drafts = {"draft_n": self.n_drafted, "draft_n_accepted": self.n_draft_accepted} if self.n_drafted else {}
        return {**drafts, "cache_n": self.cached_tokens, "prompt_n": prompt_n, "prompt_ms": prompt_ms,
                "prompt_per_token_ms": prompt_ms / prompt_n if prompt_n else 0.0,
                "prompt_per_second": prompt_n / prompt_ms * 1e3 if prompt_ms > 0 else 0.0,
                "predicted_n": predicted_n, "predicted_ms": predicted_ms,
                # as llama-server: over decode steps, not tokens (the first token comes with the prompt)
                "predicted_per_token_ms": predicted_ms / steps if steps else 0.0,
                "predicted_per_second": steps / predicted_ms * 1e3 if predicted_ms > 0 else 0.0}

    def text_event(self, text) -> tuple:
        """("text", text, token ids, their logprobs) with the tokens sampled since the last one."""
        ev = ("text", text, self._toks, self._probs)
        self._toks, self._probs = [], []
        return ev


class Slot:
    """One KV-cache sequence: what it holds (tokens), and the request decoding into it."""

    def __init__(self, seq_id):
        self.seq_id = seq_id
        self.tokens: list[int] = []      # exactly what the KV cache holds for this sequence
        self.job: Job | None = None
        self.prompt_pos = 0              # next prompt token to decode
        self.pending: int | None = None  # sampled, not yet decoded
        self.replay: list[int] = []      # kept tokens a rewound recurrent state must decode again, before pending
        self.checkpoints: list = []      # recurrent models: (n_pos, SeqCheckpoint, its tokens, LoRA scales)
        self.stream: TextStream | None = None
        self.last_used = 0


class Engine:
    """Owns the Context and the decode thread; schedules jobs onto slots, one batch per step."""

    def __init__(self, model: Model, *, n_ctx=4096, parallel=4, n_batch=512, n_ubatch=512, n_threads=None,
                 n_threads_batch=None, queue_size=64, type_k="f16", type_v="f16", flash_attn="auto",
                 pooling=None, draft_model: Model | None = None, lookup=False, n_draft=16, n_draft_min=1,
                 draft_p_min=0.0, kv_unified=False, cache_ram=0, cache_idle_slots=True, lora=None, spec_types=(),
                 spec_options=None, ctx_checkpoints=32):
        if parallel < 1:
            raise ValueError("--parallel must be at least 1")
        if n_batch < parallel:
            raise ValueError("--batch-size must be at least --parallel (one token per slot per step)")
        if queue_size < 0:
            raise ValueError("--queue must be 0 or more")
        self.model = model
        self.lora = lora if lora is not None else LoraSet()    # --lora adapters (server/lora.py)
        self.parallel = parallel
        self.queue_size = queue_size
        self.pooling = pooling
        self._ctx_args = dict(n_ctx=n_ctx, n_batch=n_batch, n_ubatch=min(n_batch, n_ubatch), n_threads=n_threads,
                              n_threads_batch=n_threads_batch, type_k=type_k, type_v=type_v)
        types = [t for t in spec_types if t != "none"] + (["draft-simple"] if draft_model is not None else [])
        self._spec_args = dict(types=list(dict.fromkeys(types)), lookup=lookup, draft_model=draft_model,
                               n_draft=n_draft, n_draft_min=n_draft_min, p_min=draft_p_min, **(spec_options or {}),
                               stats={"n_drafted": 0, "n_accepted": 0, "n_steps": 0})   # kept while asleep
        self.ctx = self.spec = None
        self.recurrent = False          # the cache cannot drop its last positions (set by the warm-up)
        self.checkpoints = Checkpoints(ctx_checkpoints, self._ctx_args["n_ubatch"])   # (recurrent models)
        # each slot gets n_ctx / parallel, a KV-cache stream of its own (as llama-server's: attention
        # reads only that slot's cells); with kv_unified (-kvu) the slots share one cache, any slot may
        # use all of it, and a step that finds it full evicts idle slots' tokens, then fails the busy requests
        self.kv_unified = kv_unified
        self._make_contexts(flash_attn)
        self.n_ctx_slot = self.ctx.n_ctx if kv_unified else self.ctx.n_ctx // parallel
        if self.n_ctx_slot < 8:
            self._close_contexts()
            raise ValueError(f"n_ctx={self.ctx.n_ctx} over {parallel} slots leaves {self.n_ctx_slot} tokens "
                             "per request; use a larger -c or a smaller --parallel")
        self.n_threads = n_threads
        self.slots = [Slot(i) for i in range(parallel)]
        self.prompt_cache = prompt_cache.make(cache_ram, self.ctx.n_ctx, idle_slots=cache_idle_slots,
                                              kv_unified=kv_unified, key_of=self.lora.kv_key)   # --cache-ram
        self._cond = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()
        self._embed_jobs: collections.deque[EmbedJob] = collections.deque()
        self._actions: collections.deque = collections.deque()   # (seq_id, fn, future): run on idle slots
        self._busy = 0
        self._asleep = False
        self._emb_running = False       # the embedding thread is using its contexts
        self._stopping = False
        self._draining = False          # shutting down: no new jobs
        self._cancel_all = False        # shutting down: end every job now
        self._use_counter = 0
        self._emb_ctx = None
        self._rerank_ctx = None
        self._rerank_error: str | None = None
        self._emb_thread = None
        self._emb_error: str | None = None
        # metrics (written by the decode thread; read by /metrics)
        self.prompt_tokens_total = 0
        self.prompt_tokens_cached_total = 0
        self.completion_tokens_total = 0
        self.embedding_tokens_total = 0
        self.embedding_decodes_total = 0
        self.decode_steps_total = 0
        self.prompt_seconds_total = 0.0        # llama-server's: prompt and generation time of ended jobs
        self.predicted_seconds_total = 0.0
        self.busy_slot_steps = 0               # busy slots summed over decode steps
        self.n_tokens_max = 0                  # the most tokens one slot has held
        self.decode_seconds_total = 0.0
        self.rejected_total = 0
        self.cancelled_total = 0
        self._recent = collections.deque()       # (time, completion tokens) per step
        # the warm-up decode runs on the decode thread: every graph of the slots' context is computed
        # by one thread, so libgomp keeps one pool of workers; a second pool (the warm-up's on this
        # thread, say) makes more OpenMP threads than cores and libgomp then barely spins before it
        # sleeps, which cost 4-5% of tg at -t = cores
        warmed = threading.Event()
        failed: list[BaseException] = []
        self._thread = threading.Thread(target=self._run_warm, args=(warmed, failed), name="alpaca2-decode",
                                        daemon=True)
        self._thread.start()
        warmed.wait()
        if failed:
            self._thread.join()
            self._close_contexts()
            raise failed[0]

    def _make_contexts(self, flash_attn="auto"):
        """The decode context (all slots: a KV-cache stream each, or one shared with -kvu) and, with
        -md/--lookup/--spec-type, the slots' speculative decoding (with the draft model's context)."""
        a, sa = self._ctx_args, self._spec_args
        self._flash_attn = flash_attn
        unified = self.kv_unified or self.parallel == 1
        self.ctx = Context(self.model, n_seq_max=self.parallel, kv_unified=unified, flash_attn=flash_attn, **a)
        if self.speculative:
            try:
                self.spec = SlotSpeculation(self.ctx, parallel=self.parallel, kv_unified=unified, **sa, **a)
                self.spec.rewind = self.recurrent      # (known after the first warm-up; again on waking)
            except BaseException:
                self.ctx.close()
                raise

    def _close_contexts(self):
        if self.spec is not None:
            self.spec.close()
        if self.ctx is not None:
            self.ctx.close()
        self.ctx = self.spec = None

    # -- sleeping (llama-server's --sleep-idle-seconds) -------------------------------------------
    @property
    def speculative(self) -> bool:
        return bool(self._spec_args["types"]) or self._spec_args["lookup"]

    @property
    def spec_stats(self) -> dict:
        """Drafted and accepted tokens, verification steps (llama-server's spec_decode_* counters)."""
        return self._spec_args["stats"]

    @property
    def sleeping(self) -> bool:
        return self._asleep

    async def sleep(self) -> bool:
        """Free the contexts (KV caches and compute buffers: the memory a server holds while idle)
        once nothing runs; the model stays loaded.  False when there was work after all."""
        return await self.slot_action(-1, lambda _: self._sleep_now())

    async def wake(self):
        """Make the contexts again (the decode thread also does it when a job finds it asleep)."""
        return await self.slot_action(-1, lambda _: self._wake_now())

    def _sleep_now(self) -> bool:
        with self._cond:
            if self._asleep or self._busy or self._waiting or self._embed_jobs or self._emb_running:
                return False
            self._asleep = True
            emb = [c for c in (self._emb_ctx, self._rerank_ctx) if c is not None]
            self._emb_ctx = self._rerank_ctx = None          # made again on first use
        for c in emb:
            c.close()
        self._close_contexts()
        for s in self.slots:
            s.tokens = []
            s.checkpoints = []
        if self.prompt_cache is not None:   # as llama-server's sleep: the host-memory cache goes too
            self.prompt_cache.clear()
        return True

    def _wake_now(self):
        if self._asleep:
            self._make_contexts(self._flash_attn)
            self._asleep = False
        return True

    def _run_warm(self, warmed, failed):
        """The decode thread: first tokenize and decode a few tokens (then forget them), before the
        server listens, so that a model that fails here never reports healthy (llama-server warms up
        the same way); then the decode loop."""
        try:
            ids = self.model.tokenize("Hello", add_bos=True, special=False)[:8] or [max(self.model.bos, 0)]
            self.ctx.decode(ids, seq_id=0)
            self.ctx.seq_rm(0, 0, -1)
            self.recurrent = cannot_drop_last(self.ctx)
            if self.spec is not None:
                self.spec.rewind = self.recurrent
        except BaseException as e:
            failed.append(e)
            return
        finally:
            warmed.set()
        self._run()

    # -- called from the event loop ------------------------------------------------------------
    def submit(self, job) -> bool:
        """Queue a job; False when every slot is busy and the queue is full."""
        with self._cond:
            if self._stopping or self._draining:
                raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
            if isinstance(job, EmbedJob):
                self._embed_jobs.append(job)
                if self._emb_thread is None:         # embeddings run on a thread of their own
                    self._emb_thread = threading.Thread(target=self._run_embeddings, name="alpaca2-embed",
                                                        daemon=True)
                    self._emb_thread.start()
            else:
                if len(self._waiting) + self._busy >= self.parallel + self.queue_size:
                    self.rejected_total += 1
                    return False
                self._waiting.append(job)
            self._cond.notify_all()
        return True

    async def slot_action(self, seq_id: int, fn):
        """Run fn(slot) on the decode thread once slot seq_id is idle (its request, if any, has
        ended; no new one starts meanwhile) and return what it returns: /slots save, restore, erase."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._cond:
            if self._stopping or self._draining:
                raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
            self._actions.append((seq_id, fn, future))
            self._cond.notify_all()
        return await future

    def _run_actions(self, actions):
        for seq_id, fn, future in actions:
            try:
                result, error = fn(self.slots[seq_id] if seq_id >= 0 else None), None
            except Exception as e:          # handed to the request that asked
                result, error = None, e
            loop = future.get_loop()

            def settle(future=future, result=result, error=error):
                if not future.done():
                    future.set_exception(error) if error is not None else future.set_result(result)
            try:
                loop.call_soon_threadsafe(settle)
            except RuntimeError:            # the loop is closed: nobody is waiting
                pass

    @property
    def queue_length(self) -> int:
        return len(self._waiting)

    @property
    def busy_slots(self) -> int:
        return self._busy

    @property
    def alive(self) -> bool:
        """Whether the decode thread runs (and takes jobs)."""
        return self._thread.is_alive() and not self._draining

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        recent = list(self._recent)
        n = sum(k for t, k in recent if now - t <= RATE_WINDOW_S)
        return n / RATE_WINDOW_S

    def drain(self):
        """Refuse new jobs (503); running and queued ones go on."""
        with self._cond:
            self._draining = True

    def cancel_all(self):
        """End every running and queued job at the next step, with a 503 error event."""
        with self._cond:
            self._draining = True
            self._cancel_all = True
            self._cond.notify_all()

    def stop(self, timeout=30.0):
        """Stop the decode thread: unfinished jobs end with an error event; the contexts close."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout)
        emb_thread = self._emb_thread
        if emb_thread is not None:
            emb_thread.join(timeout)
        gone = APIError(503, "the server shut down before this slot action ran", type="server_error")
        self._run_actions([(seq_id, lambda slot: (_ for _ in ()).throw(gone), future)
                           for seq_id, _, future in self._actions])
        self._actions.clear()
        jobs = [s.job for s in self.slots if s.job is not None] + list(self._waiting) + list(self._embed_jobs)
        for job in jobs:
            self._post([(job, ("error", 503, "the server shut down before this request finished"))])
        if not self._thread.is_alive():
            self._close_contexts()
        if emb_thread is None or not emb_thread.is_alive():
            for c in (self._emb_ctx, self._rerank_ctx):
                if c is not None:
                    c.close()

    # -- the decode thread ---------------------------------------------------------------------
    @staticmethod
    def _post(items):
        """Hand (job, event) pairs to their event loops, one callback per loop.  A job whose handler
        only wants the whole answer (coalesce) gets its text in one event, just before its next other
        event (its end): its loop is not woken for every token."""
        by_loop = {}
        for job, ev in items:
            if getattr(job, "coalesce", False):
                held = job.held
                if ev[0] == "text":
                    if held is None:
                        job.held = ([ev[1]], list(ev[2]), list(ev[3]))
                    else:
                        held[0].append(ev[1])
                        held[1].extend(ev[2])
                        held[2].extend(ev[3])
                    continue
                if held is not None:
                    job.held = None
                    by_loop.setdefault(job.loop, []).append((job, ("text", "".join(held[0]), held[1], held[2])))
            by_loop.setdefault(job.loop, []).append((job, ev))
        for loop, evs in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, evs)
            except RuntimeError:        # the loop is closed: nobody is listening any more
                pass

    def _run(self):
        batch = Batch(self.ctx.n_batch, 1)
        while True:
            with self._cond:
                while not (self._stopping or self._waiting or self._busy or self._cancel_all or self._actions):
                    self._cond.wait()
                if self._stopping:
                    return
                if self._cancel_all:
                    self._cancel_all = False
                    gone = list(self._waiting) + list(self._embed_jobs)
                    self._waiting.clear()
                    self._embed_jobs.clear()
                    gone += [s.job for s in self.slots if s.job is not None]
                    for job in gone:
                        job.cancel()
                    self._post([(job, ("error", 503, "the server is shutting down; this request was cut short"))
                                for job in gone])
                if self._waiting:
                    n = len(self._waiting)
                    self._waiting = collections.deque(j for j in self._waiting if not j.cancelled)
                    self.cancelled_total += n - len(self._waiting)
                # slot actions on idle slots run now, and those slots take no new job this step
                actions = [a for a in self._actions if a[0] < 0 or self.slots[a[0]].job is None]
                for a in actions:
                    self._actions.remove(a)
                acting = {a[0] for a in actions}
                if self._asleep and (self._waiting or any(a[0] >= 0 for a in actions)):
                    self._wake_now()            # work came in: the contexts again
                free = [s for s in self.slots if s.job is None and s.seq_id not in acting]
                assigned = []
                later = collections.deque()        # jobs asking for a slot that is busy
                while self._waiting and free:
                    job = self._waiting.popleft()
                    if job.id_slot >= 0:
                        slot = next((s for s in free if s.seq_id == job.id_slot), None)
                        if slot is None:
                            later.append(job)
                            continue
                    else:
                        slot = pick_slot(free, job.tokens)
                    free.remove(slot)
                    slot.job = job
                    self.lora.launch(slot, job)     # the job's LoRA scales (a cache made with others is dropped)
                    self._busy += 1
                    assigned.append(slot)
                self._waiting.extendleft(reversed(later))
            if actions:
                self._run_actions(actions)
            try:
                for slot in assigned:
                    self._start(slot)
                if assigned and self.prompt_cache is not None:
                    self.prompt_cache.cache_idle(self.ctx, self.slots)
                self._step(batch)
            except Exception as e:          # a bug must not kill the thread silently: fail what is running
                events = []
                for s in self.slots:
                    if s.job is not None:
                        events.append((s.job, ("error", 500, f"internal error: {e!r}")))
                        self._forget(s)
                        self._release(s)
                self._post(events)

    def _run_embeddings(self):
        """The embedding thread: its own context, so embeddings never hold up the decode steps.  It
        ends when no embedding job waits (the next one starts it again): with it go its OpenMP workers,
        which would otherwise count against the cores and make the decode thread's workers sleep
        instead of spin between graphs (libgomp's rule when it has more threads than cores)."""
        while True:
            with self._cond:
                if self._stopping or not self._embed_jobs:
                    self._emb_thread = None
                    return
                job = self._embed_jobs.popleft()
                self._emb_running = True
            try:
                self._embed(job)
            finally:
                with self._cond:
                    self._emb_running = False

    def _start(self, slot):
        job = slot.job
        if self.prompt_cache is not None:       # may load a cached prompt that suits job better
            self.prompt_cache.before_start(self.ctx, slot, job.tokens, job.id_slot >= 0)
        common = min(common_prefix(slot.tokens, job.tokens), len(job.tokens) - 1)
        try:
            self.ctx.seq_rm(slot.seq_id, common, -1)
        except ValueError:          # a recurrent state is kept whole or not at all: a checkpoint, or from the start
            common = self.checkpoints.restore(self.ctx, slot, job, common)
        del slot.tokens[common:]
        slot.prompt_pos = common
        slot.pending = None
        slot.replay = []
        slot.stream = TextStream(job.stop, job.strip_leading_space)
        job.cached_tokens = common
        job.slot_id = slot.seq_id
        job.t_start = time.monotonic()
        if job.accept_prompt:        # as llama-server: repeat penalties see the prompt too
            accept = job.sampler.accept
            for t in job.tokens:
                accept(t)
        self.prompt_tokens_total += len(job.tokens)
        self.prompt_tokens_cached_total += common
        if job.return_progress:         # as llama-server: a first report before any prompt token is decoded
            self._post([(job, self._progress(job, common))])

    def forget(self, slot):
        """Empty an idle slot's KV cache (/slots erase, a failed restore)."""
        self._forget(slot)

    @staticmethod
    def _progress(job, processed) -> tuple:
        """llama-server's prompt_progress (prompt tokens in all, from the cache, processed so far) and
        the timings at this point."""
        t0 = job.t_start or time.monotonic()
        return ("progress", {"total": len(job.tokens), "cache": job.cached_tokens, "processed": processed,
                             "time_ms": int((time.monotonic() - t0) * 1e3)}, job.timings)   # timings as of now

    def _forget(self, slot):
        """Drop a slot's KV cache (after a failed decode its contents are unknown)."""
        try:
            self.ctx.seq_rm(slot.seq_id, 0, -1)
        except Exception:
            pass
        slot.tokens = []

    def _release(self, slot):
        slot.job = None
        slot.pending = None
        slot.replay = []
        slot.stream = None
        self._use_counter += 1
        slot.last_used = self._use_counter
        with self._cond:
            self._busy -= 1

    def _step(self, batch):
        events = []
        for s in self.slots:
            if s.job is not None and s.job.cancelled:
                self.cancelled_total += 1
                self._release(s)
        batch.clear()
        room = self.ctx.n_batch
        plan = []                      # (slot, batch index) whose logits are sampled after the decode
        prompting = []                 # slots with prompt tokens in this batch
        busy = self.lora.batchable(self.ctx, [s for s in self.slots if s.job is not None])  # one LoRA set a step
        for s in busy:                 # generating slots first: one token each
            if s.pending is not None:
                if s.replay:           # (speculative decoding on a recurrent model: server/speculative.py)
                    for t in s.replay:
                        batch.add(t, len(s.tokens), s.seq_id, False)
                        s.tokens.append(t)
                    room -= len(s.replay)
                    s.replay = []
                plan.append((s, batch.add(s.pending, len(s.tokens), s.seq_id, True)))
                s.tokens.append(s.pending)
                s.pending = None
                room -= 1
        generating = list(plan)
        if room < self.ctx.n_batch:    # others are generating: a long prompt goes in smaller pieces,
            room = min(room, PROMPT_CHUNK_WHILE_GENERATING)        # so their next token is not held up
        for s in sorted(busy, key=lambda s: s.job.t_submit):      # then prompts, oldest first
            job = s.job
            n = min(room, len(job.tokens) - s.prompt_pos)
            if self.recurrent:
                n = self.checkpoints.cut(s, n)
            if n <= 0 or s.prompt_pos >= len(job.tokens):
                continue
            for k in range(s.prompt_pos, s.prompt_pos + n):
                last = k == len(job.tokens) - 1
                idx = batch.add(job.tokens[k], k, s.seq_id, last)
                if last:
                    plan.append((s, idx))
            s.tokens.extend(job.tokens[s.prompt_pos:s.prompt_pos + n])
            s.prompt_pos += n
            room -= n
            prompting.append(s)
        if self.spec is not None:          # drafts go last: the outputs before them keep their indices
            self.spec.add_drafts(batch, generating, self.ctx.n_batch - len(batch), self.n_ctx_slot)
        if len(batch) == 0:
            return
        t0 = time.perf_counter()
        try:
            try:
                self.ctx.decode_batch(batch)
            except ContextFullError:
                idle = [s for s in self.slots if s.job is None and s.tokens]
                if not idle:
                    raise
                for s in idle:                 # the shared cache is full: idle slots' tokens go first
                    self._forget(s)
                self.ctx.decode_batch(batch)
        except Alpaca2Error as e:
            why = ("context size has been exceeded (the slots together need more than the KV cache holds)"
                   if isinstance(e, ContextFullError) else f"decode failed: {e}")
            for s in busy:
                events.append((s.job, ("error", 500, why)))
                self._forget(s)
                self._release(s)
            self._post(events)
            return
        now = time.monotonic()
        for s in prompting:
            if s.job is not None:
                if self.recurrent:
                    self.checkpoints.after(self.ctx, s)
                s.job.n_prompt_done = s.prompt_pos - s.job.cached_tokens
                s.job.t_prompt_last = now
                if s.job.return_progress:
                    events.append((s.job, self._progress(s.job, s.prompt_pos)))
        n_new = 0
        for out, (s, idx) in enumerate(plan):      # plan is in batch order: out is the output index
            try:       # with drafts: the pending token's successor and every kept draft's
                new = self.spec.verify(s) if self.spec is not None else None
                new = new or [s.job.sampler.sample(self.ctx, idx)]
            except (Alpaca2Error, ValueError, RuntimeError) as e:     # this job's sampler (a grammar dead end)
                events.append((s.job, ("error", 500, f"sampling failed: {e}")))
                s.job.t_end = time.monotonic()
                self._release(s)
                continue
            for tok in new:
                n_new += self._take(s, tok, out, events)
                if s.job is None:          # ended (EOG, stop string, length): the rest is dropped
                    break
        dt = time.perf_counter() - t0
        self.decode_steps_total += 1
        self.decode_seconds_total += dt
        self.busy_slot_steps += len(busy)
        now = time.monotonic()
        self._recent.append((now, n_new))
        while self._recent and now - self._recent[0][0] > RATE_WINDOW_S:
            self._recent.popleft()
        self._post(events)

    def _take(self, slot, tok, out, events) -> int:
        """Handle a slot's sampled token; returns 1 when it counts as a completion token."""
        job = slot.job
        counted = 0
        if job.t_prompt_done is None:
            job.t_prompt_done = time.monotonic()
        if not job.ignore_eos and self.model.token_is_eog(tok):
            finish, job.stop_type = "stop", "eos"
        elif tok in job.banned:         # only when logit_bias left nothing else to sample
            finish, job.stop_type = "stop", "eos"
        else:
            counted = 1
            job.completion_tokens += 1
            job.generated.append(tok)
            job._toks.append(tok)
            if job.n_probs:
                entry = self._logprobs(out, tok, job.n_probs)
                if job.completion_tokens == 1 and job.strip_leading_space and entry["token"].startswith(" "):
                    entry["token"] = entry["token"][1:]     # as the text: the template's space is not shown
                job._probs.append(entry)
            self.completion_tokens_total += 1
            text = slot.stream.push(self.model.token_to_piece(tok, special=tok in job.preserved))
            if text:
                events.append((job, job.text_event(text)))
            if slot.stream.stopped:
                finish, job.stop_type = "stop", "word"
                gen = self.model.detokenize(job.generated)
                found = [(gen.find(s), s) for s in job.stop if s and s in gen]
                job.stopping_word = min(found)[1] if found else ""
            elif job.completion_tokens >= job.max_tokens:
                finish, job.stop_type = "length", "limit"
            else:
                slot.pending = tok
                return counted
        tail = slot.stream.finish()
        if tail or job._toks:
            events.append((job, job.text_event(tail)))
        job.finish_reason = finish
        job.t_end = time.monotonic()
        self.prompt_seconds_total += job.t_prompt_done - job.t_start
        self.predicted_seconds_total += job.t_end - job.t_prompt_done
        self.n_tokens_max = max(self.n_tokens_max, len(slot.tokens))
        events.append((job, ("end", finish)))
        self._release(slot)
        return counted

    def _logprobs(self, out, tok, n) -> dict:
        """The sampled token's log-probability and the n most likely (raw logits, as llama-server)."""
        row = np.asarray(self.ctx.logits_at(out), dtype=np.float64)      # a copy: the view dies at the next decode
        m = row.max()
        logz = m + np.log(np.exp(row - m).sum())
        top = np.argpartition(-row, min(n, row.size - 1))[:n]
        top = top[np.argsort(-row[top], kind="stable")]

        def entry(t):
            piece = self.model.token_to_piece(int(t))
            return {"id": int(t), "token": piece.decode("utf-8", "replace"), "bytes": list(piece),
                    "logprob": float(row[t] - logz)}
        out = entry(tok)
        out["top_logprobs"] = [entry(t) for t in top]
        return out

    def embeddings_context(self):
        """The context for /v1/embeddings, made on first use (decode thread only)."""
        if self._emb_ctx is None and self._emb_error is None:
            md = self.model.metadata
            own_pooling = any(k.endswith(".pooling_type") for k in md)
            # one input is one ubatch (pooling needs the whole sequence): keep the compute buffer small
            n = min(self.n_ctx_slot, self.model.n_ctx_train or self.n_ctx_slot, 2048)
            try:
                self._emb_ctx = Context(self.model, n_ctx=n, n_batch=n, n_ubatch=n, n_threads=self.n_threads,
                                        embeddings=True,
                                        pooling=self.pooling or (None if own_pooling else "mean"))
            except Exception as e:
                self._emb_error = f"this model cannot make embeddings here: {e}"
        return self._emb_ctx

    def rerank_context(self):
        """The context for /rerank, made on first use (embedding thread only).  A model with a
        classifier head (pooling type rank in its GGUF) is pooled by it; any other gets llama-server's
        behaviour for --reranking: the last token's hidden state (the first, for non-causal models),
        whose first value is the score."""
        if self._rerank_ctx is None and self._rerank_error is None:
            md = self.model.metadata
            arch = md.get("general.architecture", "")
            if md.get(f"{arch}.pooling_type") == "4":
                pooling = "rank"
            else:
                pooling = "cls" if md.get(f"{arch}.attention.causal") in ("False", "false", "0") else "last"
            n = min(self.n_ctx_slot, self.model.n_ctx_train or self.n_ctx_slot, 2048)
            try:
                self._rerank_ctx = Context(self.model, n_ctx=n, n_batch=n, n_ubatch=n, n_threads=self.n_threads,
                                           embeddings=True, pooling=pooling)
            except Exception as e:
                self._rerank_error = f"this model cannot rerank here: {e}"
        return self._rerank_ctx

    def _embed(self, job):
        if job.cancelled:
            return
        ctx = self.rerank_context() if job.rerank else self.embeddings_context()
        if ctx is None:
            self._post([(job, ("error", 400, self._rerank_error if job.rerank else self._emb_error))])
            return
        out = []
        try:
            for ids in job.inputs:
                if len(ids) > ctx.n_ctx:
                    raise APIError(400, f"input ({len(ids)} tokens) is too large to process: embeddings take at most "
                                   f"{ctx.n_ctx}",
                                   code="context_length_exceeded", param="input")
                ctx.clear()
                ctx.decode(ids)
                vec = np.array(ctx.embeddings, dtype=np.float32)
                self.embedding_decodes_total += 1           # (this thread's own counters)
                if job.rerank:
                    out.append(float(vec[0]))
                else:
                    norm = float(np.linalg.norm(vec))
                    out.append(vec / norm if norm > 0 else vec)
                self.embedding_tokens_total += len(ids)
        except APIError as e:
            self._post([(job, ("error", e.status, e.message))])
            return
        except Exception as e:
            self._post([(job, ("error", 500, f"embedding failed: {e}"))])
            return
        self._post([(job, ("embeddings", out))])


def _deliver(items):
    for job, ev in items:
        job.events.put_nowait((job.index, ev))

