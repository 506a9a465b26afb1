"""``alpaca2 serve``: an OpenAI-compatible HTTP server over one model, many clients at once.

    alpaca2 serve -m MODEL [--host 127.0.0.1] [--port 8000] [--parallel 4] [--api-key KEY]

Endpoints: POST /v1/chat/completions (``stream: true`` as server-sent events), /v1/completions,
/v1/embeddings; GET /v1/models, /health, /metrics (Prometheus text).

**Why Starlette + uvicorn.**  The server needs an ASGI toolkit that streams responses, notices a
client that went away, and shuts down gracefully on SIGINT/SIGTERM -- and nothing more: no
validation framework, no dependency injection, no OpenAPI generator.  Starlette is that toolkit
(FastAPI is Starlette plus pydantic models we would not use), has two small pure-Python
dependencies (anyio, typing-extensions) and is maintained by the Encode team, who also keep
uvicorn, the reference ASGI server (h11 for HTTP/1.1, graceful shutdown with a timeout).  Both
are imported only when the server starts, so ``import alpaca2`` never needs them.

**How many clients share the model.**  One background thread owns the Context (``--parallel N``
sequences in one unified KV cache) and runs the decode loop; asyncio handlers hand it requests
and read text back through queues.  Each step builds one Batch from all busy slots (one token
for each generating request, prompt chunks for new ones, up to n_batch tokens), calls
llama_decode once (the GIL is released meanwhile), and samples each slot's token with that
slot's own sampler.  A request that finds every slot busy waits in a bounded queue
(``--queue``); past the bound it gets 503 with Retry-After.  A slot keeps its tokens in the KV
cache after its request ends; a new request takes the free slot whose tokens share the longest
prefix with its prompt and decodes only the rest (multi-turn chats decode only the new turn).
A client that disconnects has its request cancelled and its slot freed at the next step.

**Limits.**  ``-c`` is the KV cache of all slots together (as llama-server's): each request may
use n_ctx / parallel tokens, prompt and answer.  Requests over that, over ``--max-tokens``, or
over ``--max-body`` bytes get 400 in the OpenAI error shape.  User text is tokenized with
special=False: "</s>" typed by a user is those five characters, never the EOS token.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import hmac
import json
import math
import os
import random
import signal
import socket
import sys
import threading
import time
import uuid

import numpy as np

from alpaca2._core import Batch, Context, Model, Sampler
from alpaca2.sampling import DEFAULT_SAMPLING
from alpaca2.streaming import TextStream
from alpaca2.templates import choose_template
from alpaca2.errors import Alpaca2Error

EXIT_OK, EXIT_ERROR, EXIT_MISSING_DEPENDENCY = 0, 1, 3
RATE_WINDOW_S = 10.0           # tokens/sec in /metrics: the last 10 seconds


# ------------------------------------------------------------------------------------------------
# Errors in the OpenAI shape

class APIError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _bad(message, param=None, code=None):
    return APIError(400, message, param=param, code=code)


# ------------------------------------------------------------------------------------------------
# The decode thread

class Job:
    """One generation request as the decode thread sees it; events go back to the asyncio side."""

    def __init__(self, tokens, *, max_tokens, sampler, stop, strip_leading_space, ignore_eos, loop):
        self.tokens = tokens
        self.max_tokens = max_tokens
        self.sampler = sampler
        self.stop = stop
        self.strip_leading_space = strip_leading_space
        self.ignore_eos = ignore_eos
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = False          # set by the handler (client gone); read by the decode thread
        self.completion_tokens = 0
        self.cached_tokens = 0
        self.finish_reason = None
        self.t_submit = time.monotonic()

    def cancel(self):
        self.cancelled = True

    @property
    def usage(self) -> dict:
        n_p, n_c = len(self.tokens), self.completion_tokens
        return {"prompt_tokens": n_p, "completion_tokens": n_c, "total_tokens": n_p + n_c,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}


class EmbedJob:
    """Token lists to embed (on the decode thread, between steps, in a context of their own)."""

    def __init__(self, inputs, loop):
        self.inputs = inputs
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = False

    def cancel(self):
        self.cancelled = True


class Slot:
    """One KV-cache sequence: what it holds (tokens), and the request decoding into it."""

    def __init__(self, seq_id):
        self.seq_id = seq_id
        self.tokens: list[int] = []      # exactly what the KV cache holds for this sequence
        self.job: Job | None = None
        self.prompt_pos = 0              # next prompt token to decode
        self.pending: int | None = None  # sampled, not yet decoded
        self.stream: TextStream | None = None
        self.last_used = 0


def _common_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class Engine:
    """Owns the Context and the decode thread; schedules jobs onto slots, one batch per step."""

    def __init__(self, model: Model, *, n_ctx=4096, parallel=4, n_batch=512, n_threads=None,
                 queue_size=64, type_k="f16", type_v="f16"):
        if parallel < 1:
            raise ValueError("--parallel must be at least 1")
        if n_batch < parallel:
            raise ValueError("--batch-size must be at least --parallel (one token per slot per step)")
        if queue_size < 0:
            raise ValueError("--queue must be 0 or more")
        self.model = model
        self.parallel = parallel
        self.queue_size = queue_size
        self.ctx = Context(model, n_ctx=n_ctx, n_batch=n_batch, n_ubatch=min(n_batch, 512), n_threads=n_threads,
                           n_seq_max=parallel, kv_unified=True, type_k=type_k, type_v=type_v)
        self.n_ctx_slot = self.ctx.n_ctx // parallel
        if self.n_ctx_slot < 8:
            self.ctx.close()
            raise ValueError(f"n_ctx={self.ctx.n_ctx} over {parallel} slots leaves {self.n_ctx_slot} tokens "
                             "per request; use a larger -c or a smaller --parallel")
        self.n_threads = n_threads
        self.slots = [Slot(i) for i in range(parallel)]
        self._cond = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()
        self._embed_jobs: collections.deque[EmbedJob] = collections.deque()
        self._busy = 0
        self._stopping = False
        self._draining = False          # shutting down: no new jobs
        self._cancel_all = False        # shutting down: end every job now
        self._use_counter = 0
        self._emb_ctx = None
        self._emb_error: str | None = None
        # metrics (written by the decode thread; read by /metrics)
        self.prompt_tokens_total = 0
        self.prompt_tokens_cached_total = 0
        self.completion_tokens_total = 0
        self.embedding_tokens_total = 0
        self.decode_steps_total = 0
        self.decode_seconds_total = 0.0
        self.rejected_total = 0
        self.cancelled_total = 0
        self._recent = collections.deque()       # (time, completion tokens) per step
        self._thread = threading.Thread(target=self._run, name="alpaca2-decode", daemon=True)
        self._thread.start()

    # -- called from the event loop ------------------------------------------------------------
    def submit(self, job) -> bool:
        """Queue a job; False when every slot is busy and the queue is full."""
        with self._cond:
            if self._stopping or self._draining:
                raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
            if isinstance(job, EmbedJob):
                self._embed_jobs.append(job)
            else:
                if len(self._waiting) + self._busy >= self.parallel + self.queue_size:
                    self.rejected_total += 1
                    return False
                self._waiting.append(job)
            self._cond.notify()
        return True

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
            self._cond.notify()

    def stop(self, timeout=30.0):
        """Stop the decode thread: unfinished jobs end with an error event; the contexts close."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)
        jobs = [s.job for s in self.slots if s.job is not None] + list(self._waiting) + list(self._embed_jobs)
        for job in jobs:
            self._post([(job, ("error", 503, "the server shut down before this request finished"))])
        if not self._thread.is_alive():
            self.ctx.close()
            if self._emb_ctx is not None:
                self._emb_ctx.close()

    # -- the decode thread ---------------------------------------------------------------------
    @staticmethod
    def _post(items):
        """Hand (job, event) pairs to their event loops, one callback per loop."""
        by_loop = {}
        for job, ev in items:
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
                while not (self._stopping or self._waiting or self._embed_jobs or self._busy):
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
                embed = list(self._embed_jobs)
                self._embed_jobs.clear()
                if self._waiting:
                    n = len(self._waiting)
                    self._waiting = collections.deque(j for j in self._waiting if not j.cancelled)
                    self.cancelled_total += n - len(self._waiting)
                free = [s for s in self.slots if s.job is None]
                assigned = []
                while self._waiting and free:
                    job = self._waiting.popleft()
                    slot = self._pick_slot(free, job.tokens)
                    free.remove(slot)
                    slot.job = job
                    self._busy += 1
                    assigned.append(slot)
            for job in embed:
                self._embed(job)
            try:
                for slot in assigned:
                    self._start(slot)
                self._step(batch)
            except Exception as e:          # a bug must not kill the thread silently: fail what is running
                events = []
                for s in self.slots:
                    if s.job is not None:
                        events.append((s.job, ("error", 500, f"internal error: {e!r}")))
                        self._forget(s)
                        self._release(s)
                self._post(events)

    def _pick_slot(self, free, tokens):
        """The free slot sharing the longest prefix with tokens; else the least recently used."""
        best = max(free, key=lambda s: (_common_prefix(s.tokens, tokens), -s.last_used))
        return best

    def _start(self, slot):
        job = slot.job
        common = min(_common_prefix(slot.tokens, job.tokens), len(job.tokens) - 1)
        self.ctx.seq_rm(slot.seq_id, common, -1)
        del slot.tokens[common:]
        slot.prompt_pos = common
        slot.pending = None
        slot.stream = TextStream(job.stop, job.strip_leading_space)
        job.cached_tokens = common
        self.prompt_tokens_total += len(job.tokens)
        self.prompt_tokens_cached_total += common

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
        busy = [s for s in self.slots if s.job is not None]
        for s in busy:                 # generating slots first: one token each
            if s.pending is not None:
                plan.append((s, batch.add(s.pending, len(s.tokens), s.seq_id, True)))
                s.tokens.append(s.pending)
                s.pending = None
                room -= 1
        for s in sorted(busy, key=lambda s: s.job.t_submit):      # then prompts, oldest first
            job = s.job
            n = min(room, len(job.tokens) - s.prompt_pos)
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
        if len(batch) == 0:
            return
        t0 = time.perf_counter()
        try:
            self.ctx.decode_batch(batch)
        except Alpaca2Error as e:
            for s in busy:
                events.append((s.job, ("error", 500, f"decode failed: {e}")))
                self._forget(s)
                self._release(s)
            self._post(events)
            return
        n_new = 0
        for s, idx in plan:
            tok = s.job.sampler.sample(self.ctx, idx)
            n_new += self._take(s, tok, events)
        dt = time.perf_counter() - t0
        self.decode_steps_total += 1
        self.decode_seconds_total += dt
        now = time.monotonic()
        self._recent.append((now, n_new))
        while self._recent and now - self._recent[0][0] > RATE_WINDOW_S:
            self._recent.popleft()
        self._post(events)

    def _take(self, slot, tok, events) -> int:
        """Handle a slot's sampled token; returns 1 when it counts as a completion token."""
        job = slot.job
        counted = 0
        if not job.ignore_eos and self.model.token_is_eog(tok):
            finish = "stop"
        else:
            counted = 1
            job.completion_tokens += 1
            self.completion_tokens_total += 1
            text = slot.stream.push(self.model.token_to_piece(tok))
            if text:
                events.append((job, ("text", text)))
            if slot.stream.stopped:
                finish = "stop"
            elif job.completion_tokens >= job.max_tokens:
                finish = "length"
            else:
                slot.pending = tok
                return counted
        tail = slot.stream.finish()
        if tail:
            events.append((job, ("text", tail)))
        job.finish_reason = finish
        events.append((job, ("end", finish)))
        self._release(slot)
        return counted

    def embeddings_context(self):
        """The context for /v1/embeddings, made on first use (decode thread only)."""
        if self._emb_ctx is None and self._emb_error is None:
            md = self.model.metadata
            own_pooling = any(k.endswith(".pooling_type") for k in md)
            # one input is one ubatch (pooling needs the whole sequence): keep the compute buffer small
            n = min(self.n_ctx_slot, self.model.n_ctx_train or self.n_ctx_slot, 2048)
            try:
                self._emb_ctx = Context(self.model, n_ctx=n, n_batch=n, n_ubatch=n, n_threads=self.n_threads,
                                        embeddings=True, pooling=None if own_pooling else "mean")
            except Exception as e:
                self._emb_error = f"this model cannot make embeddings here: {e}"
        return self._emb_ctx

    def _embed(self, job):
        if job.cancelled:
            return
        ctx = self.embeddings_context()
        if ctx is None:
            self._post([(job, ("error", 400, self._emb_error))])
            return
        out = []
        try:
            for ids in job.inputs:
                if len(ids) > ctx.n_ctx:
                    raise APIError(400, f"an input has {len(ids)} tokens; embeddings take at most {ctx.n_ctx}",
                                   code="context_length_exceeded", param="input")
                ctx.clear()
                ctx.decode(ids)
                vec = np.array(ctx.embeddings, dtype=np.float32)
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
        job.events.put_nowait(ev)


# ------------------------------------------------------------------------------------------------
# Request parsing

def _number(body, key, lo, hi, integer=False):
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
        raise _bad(f"'{key}' must be {'an integer' if integer else 'a number'}, got {json.dumps(v)}", key)
    if not (lo <= v <= hi) or (isinstance(v, float) and not math.isfinite(v)):
        raise _bad(f"'{key}' must be between {lo} and {hi}, got {v}", key)
    return v


class Server:
    """The HTTP side: parses OpenAI requests, hands jobs to the Engine, formats the answers."""

    def __init__(self, model: Model, engine: Engine, *, model_id: str, template="auto", api_key=None,
                 max_body=1 << 20, max_tokens_limit=None, n_predict=-1, sampling=None, seed=None,
                 shutdown_timeout=10.0):
        self.model = model
        self.engine = engine
        self.model_id = model_id
        self.model_names = {model_id, os.path.basename(model.path)}
        self.template = choose_template(model, template)
        self.api_key = api_key.encode() if api_key else None
        self.max_body = max_body
        self.max_tokens_limit = max_tokens_limit or engine.n_ctx_slot
        self.n_predict = n_predict
        self.sampling = dict(DEFAULT_SAMPLING, **(sampling or {}))
        self.seed = seed
        self.shutdown_timeout = shutdown_timeout
        self.created = int(time.time())
        self.requests = collections.Counter()      # (endpoint, status) -> count
        self.latency_sum = collections.Counter()   # endpoint -> seconds
        self.app = self._build_app()

    # -- ASGI ----------------------------------------------------------------------------------
    def _build_app(self):
        from starlette.applications import Starlette
        from starlette.routing import Route

        routes = [
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/embeddings", self.embeddings, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{model_id:path}", self.model_info, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
        ]
        app = Starlette(routes=routes)
        app.add_exception_handler(APIError, self._api_error)
        app.add_exception_handler(404, self._not_found)
        app.add_exception_handler(405, self._not_allowed)
        app.add_exception_handler(Exception, self._internal_error)
        self._paths = {r.path for r in routes}
        return app

    async def __call__(self, scope, receive, send):
        """Authentication and per-request metrics around the Starlette app."""
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = path if path in self._paths else ("/v1/models/{id}" if path.startswith("/v1/models/") else "other")
        status = [0]
        t0 = time.monotonic()

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
        try:
            if self.api_key is not None and path != "/health" and not self._authorized(scope):
                err = APIError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                               code="invalid_api_key")
                await self._send_error(err, send_status)
                return
            await self.app(scope, receive, send_status)
        finally:
            self.requests[(endpoint, status[0] or 499)] += 1
            self.latency_sum[endpoint] += time.monotonic() - t0

    def _authorized(self, scope) -> bool:
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    return hmac.compare_digest(token.strip(), self.api_key)     # constant time
        return False

    @staticmethod
    async def _send_error(err: APIError, send):
        body = json.dumps(err.body()).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers += [(k.lower().encode(), str(v).encode()) for k, v in err.headers.items()]
        await send({"type": "http.response.start", "status": err.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    @staticmethod
    def _json(data, status=200, headers=None):
        from starlette.responses import Response
        return Response(json.dumps(data, ensure_ascii=False), status_code=status, headers=headers,
                        media_type="application/json")

    async def _api_error(self, request, exc: APIError):
        return self._json(exc.body(), exc.status, exc.headers)

    async def _not_found(self, request, exc):
        return self._json(APIError(404, f"no such endpoint: {request.method} {request.url.path}",
                                   code="not_found").body(), 404)

    async def _not_allowed(self, request, exc):
        return self._json(APIError(405, f"{request.method} is not allowed on {request.url.path}",
                                   code="method_not_allowed").body(), 405)

    async def _internal_error(self, request, exc):
        return self._json(APIError(500, f"internal error: {exc!r}", type="server_error").body(), 500)

    async def _read_json(self, request) -> dict:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body:
                # read on (discarding) a little longer, so a client still sending gets the answer
                # rather than a reset connection; a much larger body is cut off
                if size > 8 * self.max_body:
                    break
                chunks = []
                continue
            chunks.append(chunk)
        if size > self.max_body:
            raise _bad(f"the request body is over the limit of {self.max_body} bytes", code="request_too_large")
        try:
            body = json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError) as e:
            raise _bad(f"the body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise _bad("the body must be a JSON object")
        return body

    def _check_model(self, body):
        name = body.get("model")
        if name is None:
            return
        if not isinstance(name, str) or name not in self.model_names:
            raise APIError(404, f"the model {name!r} does not exist; this server has {self.model_id!r}",
                           param="model", code="model_not_found")

    # -- generation requests ---------------------------------------------------------------------
    def _sampler_for(self, body):
        """A Sampler from the request's OpenAI parameters (and our extensions: top_k, min_p,
        repeat_penalty, ignore_eos); what the request leaves out comes from the server's flags."""
        p = dict(self.sampling)
        temp = _number(body, "temperature", 0.0, 2.0)
        if temp is not None:
            p["temp"] = float(temp)
        for key, lo, hi, integer in (("top_p", 0.0, 1.0, False), ("top_k", 0, 1 << 20, True),
                                     ("min_p", 0.0, 1.0, False), ("repeat_penalty", 0.0, 10.0, False),
                                     ("presence_penalty", -2.0, 2.0, False),
                                     ("frequency_penalty", -2.0, 2.0, False)):
            v = _number(body, key, lo, hi, integer)
            if v is not None:
                p[key] = v
        seed = _number(body, "seed", -(1 << 63), (1 << 64) - 1, integer=True)
        seed = self.seed if seed is None else seed
        p["seed"] = (seed if seed is not None else random.getrandbits(32)) & 0xFFFFFFFF
        bias = body.get("logit_bias")
        if bias is not None:
            if not isinstance(bias, dict):
                raise _bad("'logit_bias' must be an object of token id -> bias", "logit_bias")
            out = {}
            for k, v in bias.items():
                try:
                    tok = int(k)
                except ValueError:
                    raise _bad(f"'logit_bias' keys must be token ids, got {k!r}", "logit_bias") from None
                if not 0 <= tok < self.model.n_vocab:
                    raise _bad(f"token id {tok} in 'logit_bias' is out of range", "logit_bias")
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not -100 <= v <= 100:
                    raise _bad("'logit_bias' values must be numbers from -100 to 100", "logit_bias")
                out[tok] = float("-inf") if v <= -100 else float(v)
            p["logit_bias"] = out
        try:
            return Sampler(model=self.model, **p)
        except (ValueError, TypeError, Alpaca2Error) as e:
            raise _bad(f"bad sampling parameters: {e}") from None

    def _job_for(self, body, tokens, strip_leading_space):
        for key in ("n", "best_of"):
            if body.get(key) not in (None, 1):
                raise _bad(f"'{key}' must be 1: this server makes one choice per request", key)
        if body.get("logprobs") not in (None, False) or body.get("echo") or body.get("suffix"):
            raise _bad("logprobs, echo and suffix are not supported")
        if body.get("tools") or body.get("functions"):
            raise _bad("tools and function calling are not supported", "tools")
        rf = body.get("response_format")
        if rf is not None and (not isinstance(rf, dict) or rf.get("type") != "text"):
            raise _bad("only response_format {'type': 'text'} is supported", "response_format")
        n_slot = self.engine.n_ctx_slot
        if len(tokens) >= n_slot:
            raise _bad(f"this model's maximum context length is {n_slot} tokens; the prompt has "
                       f"{len(tokens)}", "messages" if "messages" in body else "prompt", "context_length_exceeded")
        key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = _number(body, key, 1, 1 << 31, integer=True)
        if max_tokens is None:
            room = n_slot - len(tokens)
            max_tokens = room if self.n_predict is None or self.n_predict < 0 else min(self.n_predict, room)
            max_tokens = min(max_tokens, self.max_tokens_limit)
        else:
            if max_tokens > self.max_tokens_limit:
                raise _bad(f"'{key}' is {max_tokens}; this server allows at most {self.max_tokens_limit}", key)
            if len(tokens) + max_tokens > n_slot:
                raise _bad(f"this model's maximum context length is {n_slot} tokens; the prompt has "
                           f"{len(tokens)} and '{key}' asks for {max_tokens}", key, "context_length_exceeded")
        stop = body.get("stop")
        if stop is None:
            stop = []
        elif isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or len(stop) > 16 or not all(isinstance(s, str) for s in stop):
            raise _bad("'stop' must be a string or a list of at most 16 strings", "stop")
        ignore_eos = body.get("ignore_eos", False)
        if not isinstance(ignore_eos, bool):
            raise _bad("'ignore_eos' must be true or false", "ignore_eos")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise _bad("'stream' must be true or false", "stream")
        opts = body.get("stream_options") or {}
        if not isinstance(opts, dict):
            raise _bad("'stream_options' must be an object", "stream_options")
        sampler = self._sampler_for(body)
        job = Job(tokens, max_tokens=max_tokens, sampler=sampler, stop=stop,
                  strip_leading_space=strip_leading_space, ignore_eos=ignore_eos, loop=asyncio.get_running_loop())
        return job, stream, bool(opts.get("include_usage"))

    def _messages(self, body):
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _bad("'messages' must be a non-empty list", "messages")
        out = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise _bad(f"messages[{i}] must be an object", "messages")
            role = m.get("role")
            if role == "developer":
                role = "system"
            if role not in ("system", "user", "assistant"):
                raise _bad(f"messages[{i}]: role must be system, developer, user or assistant, got {role!r}",
                           "messages")
            content = m.get("content")
            if content is None and role == "assistant":
                content = ""
            if isinstance(content, list):       # content parts: text only
                texts = []
                for part in content:
                    if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                        raise _bad(f"messages[{i}]: only text content parts are supported", "messages")
                    texts.append(part["text"])
                content = "".join(texts)
            if not isinstance(content, str):
                raise _bad(f"messages[{i}]: content must be a string or a list of text parts", "messages")
            out.append({"role": role, "content": content})
        return out

    async def chat_completions(self, request):
        body = await self._read_json(request)
        self._check_model(body)
        messages = self._messages(body)
        try:      # in a worker thread: a long prompt must not hold up the other clients' streams
            tokens = await asyncio.to_thread(self.template.tokenize_messages, self.model, messages)
        except (ValueError, RuntimeError, Alpaca2Error) as e:
            raise _bad(f"cannot format these messages: {e}", "messages") from None
        job, stream, include_usage = self._job_for(body, tokens, self.template.strip_leading_space)
        return await self._run_job(request, job, stream, include_usage, chat=True)

    async def completions(self, request):
        body = await self._read_json(request)
        self._check_model(body)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            tokens = await asyncio.to_thread(self.model.tokenize, prompt, add_bos=True, special=False)
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            if not all(0 <= t < self.model.n_vocab for t in prompt):
                raise _bad("a token id in 'prompt' is out of range", "prompt")
            tokens = list(prompt)
        else:
            raise _bad("'prompt' must be a string, a list of token ids, or a list of one of them", "prompt")
        if not tokens:
            raise _bad("the prompt is empty", "prompt")
        job, stream, include_usage = self._job_for(body, tokens, False)
        return await self._run_job(request, job, stream, include_usage, chat=False)

    def _busy_error(self):
        return APIError(503, f"all {self.engine.parallel} slots are busy and {self.engine.queue_size} requests are "
                        "waiting; retry later", type="server_error", code="server_busy",
                        headers={"Retry-After": "1"})

    async def _run_job(self, request, job, stream, include_usage, chat):
        if not self.engine.submit(job):
            raise self._busy_error()
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"
        if stream:
            from starlette.responses import StreamingResponse

            def chunk(text=None, finish=None, role=False, choices=True, usage=None):
                if chat:
                    delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
                    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                else:
                    choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
                d = {"id": rid, "object": obj, "created": created, "model": self.model_id,
                     "choices": [choice] if choices else []}
                if usage is not None:
                    d["usage"] = usage
                return "data: " + json.dumps(d, ensure_ascii=False) + "\n\n"

            async def events():
                try:
                    if chat:
                        yield chunk(role=True)
                    while True:
                        ev = await job.events.get()
                        if ev[0] == "text":
                            yield chunk(ev[1])
                        elif ev[0] == "end":
                            yield chunk(finish=ev[1])
                            if include_usage:
                                yield chunk(choices=False, usage=job.usage)
                            yield "data: [DONE]\n\n"
                            return
                        else:
                            err = APIError(ev[1], ev[2], type="server_error" if ev[1] >= 500 else "invalid_request_error")
                            yield "data: " + json.dumps(err.body()) + "\n\n"
                            return
                finally:
                    job.cancel()        # the client went away (or we are done): free the slot

            return StreamingResponse(events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        pieces = []
        ev = None
        gone = asyncio.ensure_future(_wait_disconnect(request))
        try:
            while True:
                get = asyncio.ensure_future(job.events.get())
                done, _ = await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    get.cancel()
                    job.cancel()
                    from starlette.responses import Response
                    return Response(status_code=499)
                ev = get.result()
                if ev[0] == "text":
                    pieces.append(ev[1])
                else:
                    break
        finally:
            gone.cancel()
            job.cancel()
        if ev[0] == "error":
            raise APIError(ev[1], ev[2], type="server_error" if ev[1] >= 500 else "invalid_request_error")
        text = "".join(pieces)
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": ev[1]}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": ev[1]}
        return self._json({"id": rid, "object": "chat.completion" if chat else "text_completion",
                           "created": created, "model": self.model_id, "choices": [choice], "usage": job.usage})

    # -- other endpoints -------------------------------------------------------------------------
    async def embeddings(self, request):
        body = await self._read_json(request)
        self._check_model(body)
        inp = body.get("input")
        if isinstance(inp, str) or (isinstance(inp, list) and inp and isinstance(inp[0], int)):
            inp = [inp]
        if not isinstance(inp, list) or not inp or len(inp) > 2048:
            raise _bad("'input' must be a string, a list of strings, or token ids (1 to 2048 inputs)", "input")
        fmt = body.get("encoding_format") or "float"
        if fmt not in ("float", "base64"):
            raise _bad("'encoding_format' must be 'float' or 'base64'", "encoding_format")
        if body.get("dimensions") is not None:
            raise _bad("'dimensions' is not supported", "dimensions")
        inputs = []
        for x in inp:
            if isinstance(x, str):
                ids = self.model.tokenize(x, add_bos=True, special=False)
            elif isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool) for t in x):
                if not all(0 <= t < self.model.n_vocab for t in x):
                    raise _bad("a token id in 'input' is out of range", "input")
                ids = list(x)
            else:
                raise _bad("each input must be a non-empty string or list of token ids", "input")
            if not ids:
                raise _bad("an input is empty", "input")
            inputs.append(ids)
        job = EmbedJob(inputs, asyncio.get_running_loop())
        self.engine.submit(job)
        try:
            ev = await job.events.get()
        finally:
            job.cancel()
        if ev[0] == "error":
            raise APIError(ev[1], ev[2], type="server_error" if ev[1] >= 500 else "invalid_request_error")
        data = []
        for i, vec in enumerate(ev[1]):
            emb = (base64.b64encode(vec.astype("<f4").tobytes()).decode() if fmt == "base64"
                   else [float(x) for x in vec])
            data.append({"object": "embedding", "index": i, "embedding": emb})
        n = sum(len(x) for x in inputs)
        return self._json({"object": "list", "data": data, "model": self.model_id,
                           "usage": {"prompt_tokens": n, "total_tokens": n}})

    def _model_card(self):
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "alpaca2",
                "meta": {"n_ctx_slot": self.engine.n_ctx_slot, "parallel": self.engine.parallel,
                         "n_vocab": self.model.n_vocab, "template": self.template.name, "desc": self.model.desc}}

    async def models(self, request):
        return self._json({"object": "list", "data": [self._model_card()]})

    async def model_info(self, request):
        name = request.path_params["model_id"]
        if name not in self.model_names:
            raise APIError(404, f"the model {name!r} does not exist", param="model", code="model_not_found")
        return self._json(self._model_card())

    async def health(self, request):
        e = self.engine
        ok = e.alive
        status = "ok" if ok else ("shutting down" if e._draining else "decode thread stopped")
        return self._json({"status": status, "slots_total": e.parallel, "slots_busy": e.busy_slots,
                           "queue_length": e.queue_length}, 200 if ok else 503)

    async def metrics(self, request):
        from starlette.responses import Response
        e = self.engine
        lines = []

        def metric(name, kind, help, samples):
            lines.append(f"# HELP alpaca2_{name} {help}")
            lines.append(f"# TYPE alpaca2_{name} {kind}")
            for labels, value in samples:
                lab = ",".join(f'{k}="{v}"' for k, v in labels.items())
                lines.append(f"alpaca2_{name}{{{lab}}} {value}" if lab else f"alpaca2_{name} {value}")
        metric("requests_total", "counter", "HTTP requests by endpoint and status code.",
               [({"endpoint": ep, "code": str(code)}, n) for (ep, code), n in sorted(self.requests.items())])
        metric("request_duration_seconds_total", "counter", "Time spent answering requests, by endpoint.",
               [({"endpoint": ep}, round(s, 6)) for ep, s in sorted(self.latency_sum.items())])
        metric("requests_rejected_total", "counter", "Requests answered 503 because the queue was full.",
               [({}, e.rejected_total)])
        metric("requests_cancelled_total", "counter", "Requests whose client went away before the end.",
               [({}, e.cancelled_total)])
        metric("prompt_tokens_total", "counter", "Prompt tokens of generation requests.", [({}, e.prompt_tokens_total)])
        metric("prompt_tokens_cached_total", "counter", "Prompt tokens reused from a slot's KV cache.",
               [({}, e.prompt_tokens_cached_total)])
        metric("completion_tokens_total", "counter", "Generated tokens.", [({}, e.completion_tokens_total)])
        metric("embedding_tokens_total", "counter", "Tokens embedded.", [({}, e.embedding_tokens_total)])
        metric("tokens_per_second", "gauge", f"Generated tokens per second over the last {RATE_WINDOW_S:.0f} s.",
               [({}, round(e.tokens_per_second(), 3))])
        metric("decode_steps_total", "counter", "Batched llama_decode calls.", [({}, e.decode_steps_total)])
        metric("decode_seconds_total", "counter", "Time in decode steps (decode and sampling).",
               [({}, round(e.decode_seconds_total, 6))])
        metric("queue_length", "gauge", "Requests waiting for a slot.", [({}, e.queue_length)])
        metric("slots_busy", "gauge", "Slots decoding a request.", [({}, e.busy_slots)])
        metric("slots_total", "gauge", "Slots (parallel sequences).", [({}, e.parallel)])
        return Response("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")


async def _wait_disconnect(request):
    """Return when the client of a (body-read) request disconnects."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


# ------------------------------------------------------------------------------------------------
# The command

def add_arguments(p: argparse.ArgumentParser) -> None:
    """The `alpaca2 serve` flags (the model flags come from the CLI)."""
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port)")
    p.add_argument("-np", "--parallel", type=int, default=4,
                   help="requests decoded together, one KV-cache sequence each (default 4)")
    p.add_argument("--queue", type=int, default=64,
                   help="requests that may wait for a slot; beyond, 503 with Retry-After (default 64)")
    p.add_argument("--api-key", default=os.environ.get("ALPACA2_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every endpoint but /health "
                   "(default: $ALPACA2_API_KEY; none: no key)")
    p.add_argument("-c", "--ctx-size", type=int, default=4096,
                   help="KV cache of all slots together; each request gets ctx-size/parallel (default 4096)")
    p.add_argument("-b", "--batch-size", type=int, default=512, help="most tokens per decode step (default 512)")
    p.add_argument("-ngl", "--n-gpu-layers", type=int, default=-1, help="layers on the GPU (default: all)")
    p.add_argument("-t", "--threads", type=int, default=None, help="threads (default: all cores)")
    p.add_argument("--template", choices=["auto", "alpaca2", "model", "completion"], default="auto",
                   help="chat prompt format (default: auto from the model's metadata)")
    p.add_argument("--alias", default=None, help="model id in the API (default: the file name)")
    p.add_argument("-n", "--n-predict", type=int, default=-1,
                   help="max_tokens when a request gives none (default -1: up to the context)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="largest max_tokens a request may ask for (default: the per-request context)")
    p.add_argument("--max-body", type=int, default=1 << 20, help="largest request body in bytes (default 1 MiB)")
    p.add_argument("--shutdown-timeout", type=float, default=10.0,
                   help="on SIGINT/SIGTERM, seconds to let running requests finish before cancelling them")
    p.add_argument("--temp", type=float, default=DEFAULT_SAMPLING["temp"],
                   help="default temperature (requests' 'temperature' wins; default 0.5)")
    p.add_argument("--top-k", type=int, default=DEFAULT_SAMPLING["top_k"])
    p.add_argument("--top-p", type=float, default=DEFAULT_SAMPLING["top_p"])
    p.add_argument("--min-p", type=float, default=DEFAULT_SAMPLING["min_p"])
    p.add_argument("--repeat-penalty", type=float, default=DEFAULT_SAMPLING["repeat_penalty"])
    p.add_argument("--repeat-last-n", type=int, default=DEFAULT_SAMPLING["penalty_last_n"])
    p.add_argument("--seed", type=int, default=None, help="default seed (default: random per request)")
    p.add_argument("--access-log", action="store_true", help="log every request (uvicorn's access log)")


def _listen_socket(host, port):
    """A bound, listening socket (so --port 0 can report the port it got)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(addr)
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def serve(args, model_path: str) -> int:
    """Load the model, start the decode thread and serve until SIGINT/SIGTERM; returns the exit code."""
    try:
        import starlette  # noqa: F401
        import uvicorn
    except ImportError as e:
        print(f"alpaca2: serve needs Starlette and uvicorn ({e.name} is missing): "
              "pip install 'alpaca2-llama[server]'", file=sys.stderr)
        return EXIT_MISSING_DEPENDENCY
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"alpaca2: WARNING: serving on {args.host} without --api-key: anyone who reaches this port "
              "can use the model", file=sys.stderr)
    from alpaca2.cli import _rpc_kwargs        # --rpc / --tensor-split: layers on rpc-servers
    model = Model(model_path, n_gpu_layers=args.n_gpu_layers, verbose=args.verbose, **_rpc_kwargs(args))
    try:
        engine = Engine(model, n_ctx=args.ctx_size, parallel=args.parallel, n_batch=args.batch_size,
                        n_threads=args.threads, queue_size=args.queue)
    except BaseException:
        model.close()
        raise
    try:
        sampling = dict(temp=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                        repeat_penalty=args.repeat_penalty, penalty_last_n=args.repeat_last_n)
        model_id = args.alias or os.path.basename(model_path)
        srv = Server(model, engine, model_id=model_id, template=args.template, api_key=args.api_key,
                     max_body=args.max_body, max_tokens_limit=args.max_tokens, n_predict=args.n_predict,
                     sampling=sampling, seed=args.seed, shutdown_timeout=args.shutdown_timeout)
        sock = _listen_socket(args.host, args.port)
        host, port = sock.getsockname()[:2]
        config = uvicorn.Config(srv, log_level="info" if args.verbose else "warning", access_log=args.access_log,
                                timeout_graceful_shutdown=args.shutdown_timeout + 5, lifespan="off")
        server = _uvicorn_server_class()(config, engine, args.shutdown_timeout)
        shown = f"[{host}]" if ":" in host else host
        print(f"alpaca2: serving {model_id} on http://{shown}:{port}/v1 "
              f"({engine.parallel} slots of {engine.n_ctx_slot} tokens, template {srv.template.name}"
              f"{', API key required' if args.api_key else ''})", file=sys.stderr, flush=True)
        server.run(sockets=[sock])
        print("alpaca2: server stopped", file=sys.stderr, flush=True)
    finally:
        engine.stop()
        model.close()
    return EXIT_OK


def _uvicorn_server_class():
    import uvicorn

    class UvicornServer(uvicorn.Server):
        """uvicorn's server, but a SIGINT/SIGTERM ends in a graceful shutdown and exit code 0
        (uvicorn re-raises the signal after shutting down, which would end the process with it).

        On the signal: stop accepting, refuse new requests, let running ones finish for up to
        shutdown_timeout seconds, then end them with an error event (streams end cleanly)."""

        def __init__(self, config, engine, shutdown_timeout):
            super().__init__(config)
            self.engine = engine
            self.shutdown_timeout = shutdown_timeout

        async def shutdown(self, sockets=None):
            self.engine.drain()
            timer = asyncio.get_running_loop().call_later(self.shutdown_timeout, self.engine.cancel_all)
            try:
                await super().shutdown(sockets)
            finally:
                timer.cancel()

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            sigs = [signal.SIGINT, signal.SIGTERM]
            original = {s: signal.signal(s, self.handle_exit) for s in sigs}
            try:
                yield
            finally:
                for s, h in original.items():
                    signal.signal(s, h)
    return UvicornServer
