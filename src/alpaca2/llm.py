"""The high-level ``Llama``: a model and a context with chat.sh's defaults.

Plain Python over the Cython core (alpaca2._core), as h5py's high-level layer sits on its
low-level one.  Defaults are those of Chinese-Alpaca-2's chat.sh (alpaca2.sampling): n_ctx 4096,
temp 0.5, top_k 40, top_p 0.9, repeat_penalty 1.1 over the last 64 tokens, every layer on the GPU
when there is one.

The sampler sees the prompt as llama.cpp's tools do: every prompt token is accepted into the
sampler's history (penalties) before the first token is sampled, never into a grammar.  So
``generate(prompt, temp=0, repeat_penalty=1.1)`` answers what ``llama-completion --temp 0
--repeat-penalty 1.1 -p prompt`` answers, and a seeded run what it answers with ``--seed``.

    >>> llm = alpaca2.Llama("chinese-alpaca-2-7b.Q4_0.gguf")
    >>> print(llm.chat("背一下静夜思"))
"""
from __future__ import annotations

import os
import time
from typing import Iterator, Sequence

from alpaca2 import openai_format
from alpaca2._core import Batch, Context, LoraAdapter, Model, Sampler, Speculator
from alpaca2.errors import ContextFullError
from alpaca2.sampling import DEFAULT_SAMPLING, SAMPLING_KEYS as _SAMPLING_KEYS
from alpaca2.streaming import TextStream
from alpaca2.templates import choose_template


class Llama:
    """A model and a context with the chat.sh defaults: generate(), chat(), OpenAI-shaped calls.

    Llama(model_path_or_Model, n_ctx=4096, n_gpu_layers=-1, n_threads=None, n_batch=512,
          template="auto", seed=None, verbose=False, draft_model=None, lookup=False, n_draft=16,
          draft_p_min=0.75, **context_kwargs)

    Consecutive calls reuse the KV cache for the longest common prefix of the token sequences,
    so a growing conversation decodes only its new tokens.

    Speculative decoding: ``draft_model`` (a path or Model sharing the target's vocabulary, e.g.
    Chinese-Alpaca-2-1.3B for the 7B/13B) drafts up to ``n_draft`` tokens that the model verifies
    in one batch; ``lookup=True`` drafts by n-gram lookup in the prompt and answer instead.  Greedy
    output is token for token the same as without a draft; sampled output has the same
    distribution.  ``last_stats["speculative"]`` has the acceptance figures of each call.

    ``n_seq_max=N`` (a context keyword) lets ``generate_batch`` decode N sequences per step.

    ``lora``: GGUF LoRA adapters to apply: a path, ``(path, scale)``, a LoraAdapter, or a list of
    those (scale 1.0 unless given), as llama-cli's ``--lora FILE`` / ``--lora-scaled FILE SCALE``.
    Context keywords such as ``rope_scaling``, ``rope_freq_base``, ``rope_freq_scale``,
    ``yarn_*``, ``n_ubatch``, ``flash_attn``, ``type_k``/``type_v`` go to the Context.
    """

    def __init__(self, model, *, n_ctx=4096, n_gpu_layers=-1, n_threads=None, n_batch=512,
                 template="auto", seed=None, verbose=False, progress=None, draft_model=None,
                 lookup=False, n_draft=16, draft_p_min=0.75, lora=None, **context_kwargs):
        if isinstance(model, Model):
            self.model = model
            self._owns_model = False
        else:
            self.model = Model(model, n_gpu_layers=n_gpu_layers, verbose=verbose, progress=progress)
            self._owns_model = True
        if self.model.n_ctx_train and n_ctx > self.model.n_ctx_train:
            n_ctx = self.model.n_ctx_train
        self.ctx = Context(self.model, n_ctx=n_ctx, n_batch=n_batch, n_threads=n_threads, **context_kwargs)
        self.template = choose_template(self.model, template)
        self.seed = seed
        self._tokens: list[int] = []      # what the KV cache holds (sequence 0), in order
        self.last_stats: dict = {}
        self.draft_model = None
        self.draft_ctx = None
        self.speculator = None
        self._owns_draft = False
        self.lora: list = []               # (LoraAdapter, scale) applied to self.ctx
        try:
            for adapter, scale in _lora_specs(lora):
                if not isinstance(adapter, LoraAdapter):
                    adapter = LoraAdapter(self.model, adapter)
                adapter.apply(self.ctx, scale)
                self.lora.append((adapter, scale))
            if draft_model is not None and lookup:
                raise ValueError("give draft_model or lookup=True, not both")
            if draft_model is not None:
                if isinstance(draft_model, Model):
                    self.draft_model = draft_model
                else:
                    self.draft_model = Model(draft_model, n_gpu_layers=n_gpu_layers, verbose=verbose)
                    self._owns_draft = True
                dkw = {k: v for k, v in context_kwargs.items() if k in ("flash_attn", "type_k", "type_v")}
                self.draft_ctx = Context(self.draft_model, n_ctx=self.ctx.n_ctx, n_batch=n_batch,
                                         n_threads=n_threads, **dkw)
            if draft_model is not None or lookup:
                self.speculator = Speculator(self.ctx, self.draft_ctx, lookup=lookup, n_draft=n_draft,
                                             p_min=draft_p_min, seed=seed)
        except BaseException:
            self.close()
            raise

    # -- plumbing ----------------------------------------------------------------------------------
    def close(self):
        self.ctx.close()
        if self.draft_ctx is not None:
            self.draft_ctx.close()
        if self._owns_draft:
            self.draft_model.close()
        if self._owns_model:
            self.model.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def n_ctx(self):
        return self.ctx.n_ctx

    def tokenize(self, text, add_bos=True, special=False):
        return self.model.tokenize(text, add_bos=add_bos, special=special)

    def detokenize(self, tokens, special=False):
        return self.model.detokenize(tokens, special=special)

    def reset(self):
        """Empty the KV cache."""
        self.ctx.clear()
        self._tokens = []
        if self.speculator is not None:
            self.speculator.reset()

    def make_sampler(self, prompt: Sequence[int] = (), **params) -> Sampler:
        """A Sampler with chat.sh's defaults (and this Llama's seed), overridden by ``params``.

        ``prompt``: token ids accepted into its history first (penalties only, never a grammar),
        as llama.cpp's tools accept the prompt before they sample."""
        unknown = set(params) - set(_SAMPLING_KEYS)
        if unknown:
            raise TypeError(f"unknown sampling parameters: {sorted(unknown)}")
        merged = dict(DEFAULT_SAMPLING)
        merged["seed"] = self.seed
        merged.update({k: v for k, v in params.items() if v is not None})
        sampler = Sampler(model=self.model, **merged)
        if len(prompt):
            sampler.accept_many(prompt, grammar=False)
        return sampler

    def _prefill(self, prompt: list[int]) -> int:
        """Bring the KV cache to hold exactly `prompt`; returns how many tokens were decoded."""
        if not prompt:
            raise ValueError("the prompt is empty")
        if len(prompt) >= self.ctx.n_ctx:
            raise ContextFullError(f"the prompt has {len(prompt)} tokens; the context holds {self.ctx.n_ctx}")
        common = 0
        for a, b in zip(self._tokens, prompt):
            if a != b:
                break
            common += 1
        common = min(common, len(prompt) - 1)          # re-decode at least one token for fresh logits
        # Trim unconditionally: a Ctrl+C that lands just after ctx.decode_token() returned (before
        # _generate's bookkeeping) leaves one token in the cache that self._tokens does not list;
        # left there, the next prompt would be decoded one position too far, after a stray token.
        self.ctx.seq_rm(0, common, -1)
        self._tokens = list(prompt[:common])
        try:
            self.ctx.decode(prompt[common:])
        except BaseException:
            self._tokens = prompt[:common]
            raise
        self._tokens = list(prompt)
        return len(prompt) - common

    def _generate(self, prompt: list[int], max_tokens: int, stop: Sequence[str], sampling: dict,
                  strip_leading_space: bool, sampler: Sampler | None = None) -> Iterator[tuple[str, int | None]]:
        """Yield (text, token) while generating; stats are in last_stats at the end.

        ``sampler``: one that has already seen the prompt (a chat session's, kept across turns);
        by default a new one made from ``sampling`` that accepts the prompt first."""
        if max_tokens is not None and max_tokens < 0:
            raise ValueError("max_tokens must be >= 0")
        if sampler is None:
            sampler = self.make_sampler(prompt, **sampling)
        spec = self.speculator
        if spec is not None and (sampler.params["mirostat"] or sampler.params["grammar"] is not None):
            spec = None                    # mirostat's state follows every draw, a grammar every token
        t0 = time.perf_counter()
        n_prefill = self._prefill(prompt)
        t1 = time.perf_counter()
        stream = TextStream(stop, strip_leading_space)
        generated: list[int] = []
        eog: list[int] = []
        finish = "length"
        budget = self.ctx.n_ctx - len(self._tokens)
        if max_tokens is not None:
            budget = min(budget, max_tokens)
        if spec is not None:
            spec.reset_stats()
            source = self._speculative_tokens(spec, sampler, lambda: budget - len(generated))
        else:
            source = self._plain_tokens(sampler)
        try:
            if budget > 0:
                for tok in source:
                    if self.model.token_is_eog(tok):
                        finish = "stop"
                        eog = [tok]            # sampled (the sampler has seen it), not output
                        break
                    generated.append(tok)
                    text = stream.push(self.model.token_to_piece(tok))
                    if text:
                        yield text, tok
                    if stream.stopped:
                        finish = "stop"
                        break
                    if len(generated) >= budget:
                        break
            tail = stream.finish()
            if tail:
                yield tail, None
        finally:
            source.close()
            t2 = time.perf_counter()
            self.last_stats = {
                "prompt_tokens": len(prompt), "prompt_tokens_decoded": n_prefill,
                "completion_tokens": len(generated), "finish_reason": finish,
                "prompt_ms": (t1 - t0) * 1000, "generation_ms": (t2 - t1) * 1000,
                "tokens_per_second": len(generated) / (t2 - t1) if t2 > t1 and generated else 0.0,
                "tokens": generated, "text": stream.text, "sampled": generated + eog,
            }
            if spec is not None:
                self.last_stats["speculative"] = spec.stats

    def _plain_tokens(self, sampler):
        """Sampled tokens, one per decode; a token is decoded only when the consumer asks for the next."""
        while True:
            tok = sampler.sample(self.ctx)
            yield tok
            self.ctx.decode_token(tok)
            self._tokens.append(tok)

    def _speculative_tokens(self, spec, sampler, remaining):
        """Tokens from speculative steps (each step: draft, then one batched verification).

        The first token comes from the prompt's logits; every step leaves the cache holding all
        tokens but the newest, and self._tokens follows as the consumer takes them."""
        tok = sampler.sample(self.ctx)
        yield tok
        draft_sampler = None
        if sampler.params["temp"] > 0:
            p = sampler.params
            draft_sampler = Sampler(temp=p["temp"], top_k=p["top_k"], top_p=p["top_p"], min_p=p["min_p"],
                                    typical_p=p["typical_p"],
                                    seed=None if p["seed"] is None else (p["seed"] + 1) % 0xFFFFFFFF)
        spec.begin(self._tokens + [tok], sampler, draft_sampler)
        pending = tok
        while True:
            new = spec.step(max(1, remaining()))
            self._tokens.append(pending)
            for i, t in enumerate(new):
                yield t
                if i < len(new) - 1:
                    self._tokens.append(t)
            pending = new[-1]

    def generate_batch(self, prompts: Sequence[str], max_tokens: int = 256, *, stop: Sequence[str] = (),
                       **sampling) -> list[str]:
        """Continue several prompts at once: one llama_decode per step for all of them.

        Each prompt is a sequence of its own in the KV cache (up to the context's n_seq_max at a
        time; more prompts are done in waves), with its own sampler (seeds seed, seed+1, ... when
        a seed is set) and its own stop rules.  Greedy results equal generate() on each prompt.
        The cache is emptied before and after.  ``last_stats`` has per-sequence and total figures.
        """
        if isinstance(prompts, str):
            raise TypeError("generate_batch() takes a list of prompts; use generate() for one")
        prompts = list(prompts)
        if max_tokens is None or max_tokens < 0:
            raise ValueError("max_tokens must be >= 0")
        if isinstance(stop, str):
            stop = [stop]
        ids = [self.model.tokenize(p, add_bos=True, special=False) for p in prompts]
        for i, p in enumerate(ids):
            if not p:
                raise ValueError(f"prompt {i} is empty")
        n_seq = self.ctx.n_seq_max
        texts: list[str] = []
        per_seq: list[dict] = []
        t0 = time.perf_counter()
        try:
            for w in range(0, len(ids), n_seq):
                wave_texts, wave_stats = self._batch_wave(ids[w:w + n_seq], max_tokens, stop, sampling, w)
                texts += wave_texts
                per_seq += wave_stats
        finally:
            self.reset()
        dt = time.perf_counter() - t0
        n_gen = sum(s["completion_tokens"] for s in per_seq)
        self.last_stats = {"sequences": per_seq, "completion_tokens": n_gen, "time_ms": dt * 1000,
                           "tokens_per_second": n_gen / dt if dt > 0 else 0.0, "n_seq_max": n_seq}
        return texts

    def _batch_wave(self, ids, max_tokens, stop, sampling, first_index):
        self.reset()
        n = len(ids)
        room = self.ctx.n_ctx - sum(len(p) for p in ids)
        if room < 0 or (room < n and max_tokens > 0):
            raise ContextFullError(f"{n} prompts of {sum(len(p) for p in ids)} tokens in all leave no room "
                                   f"in n_ctx={self.ctx.n_ctx}; use a larger n_ctx or fewer sequences")
        budget = min(max_tokens, room // n)
        seed = self.seed if sampling.get("seed") is None else sampling["seed"]
        samplers = [self.make_sampler(ids[i], **{**sampling, "seed": None if seed is None else seed + first_index + i})
                    for i in range(n)]
        streams = [TextStream(stop) for _ in range(n)]
        generated: list[list[int]] = [[] for _ in range(n)]
        finish = ["length"] * n
        pos = [len(p) for p in ids]
        active: list[int] = []
        batch = Batch(self.ctx.n_batch, 1)

        def take(i, tok):
            """Handle seq i's new token; True while it goes on."""
            if self.model.token_is_eog(tok):
                finish[i] = "stop"
                return False
            generated[i].append(tok)
            streams[i].push(self.model.token_to_piece(tok))
            if streams[i].stopped:
                finish[i] = "stop"
                return False
            return len(generated[i]) < budget

        pending: dict[int, int] = {}
        # prompts: packed into batches of n_batch tokens; a sequence samples its first token
        # right after the decode that held its last prompt token
        queue = [(i, j) for i in range(n) for j in range(len(ids[i]))]
        for start in range(0, len(queue), self.ctx.n_batch):
            batch.clear()
            last = []
            for i, j in queue[start:start + self.ctx.n_batch]:
                is_last = j == len(ids[i]) - 1
                k = batch.add(ids[i][j], j, (i,), is_last)
                if is_last:
                    last.append((i, k))
            self.ctx.decode_batch(batch)
            for i, k in last:
                if budget > 0:
                    tok = samplers[i].sample(self.ctx, k)
                    if take(i, tok):
                        pending[i] = tok
        # generation: one token per live sequence per decode
        while pending:
            batch.clear()
            order = []
            for i, tok in pending.items():
                order.append((i, batch.add(tok, pos[i], (i,), True)))
                pos[i] += 1
            self.ctx.decode_batch(batch)
            pending = {}
            for i, k in order:
                tok = samplers[i].sample(self.ctx, k)
                if take(i, tok):
                    pending[i] = tok
        texts = []
        stats = []
        for i in range(n):
            streams[i].finish()
            texts.append(streams[i].text)
            stats.append({"prompt_tokens": len(ids[i]), "completion_tokens": len(generated[i]),
                          "finish_reason": finish[i], "tokens": generated[i]})
        return texts, stats

    def _run(self, prompt, max_tokens, stop, sampling, strip, stream):
        gen = self._generate(prompt, max_tokens, stop or (), sampling, strip)
        if stream:
            return (text for text, _ in gen)
        return "".join(text for text, _ in gen)

    # -- public calls ------------------------------------------------------------------------------
    def generate(self, prompt: str, max_tokens: int = 256, *, stop: Sequence[str] = (), stream: bool = False,
                 **sampling):
        """Continue text (base models).  Returns the new text, or an iterator of pieces."""
        ids = self.model.tokenize(prompt, add_bos=True, special=False)
        return self._run(ids, max_tokens, stop, sampling, False, stream)

    def chat(self, messages, max_tokens: int = 512, *, system: str | None = None, stop: Sequence[str] = (),
             stream: bool = False, **sampling):
        """Answer a conversation (a str is one user message).  Returns text or an iterator of pieces."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        messages = list(messages)
        if system is not None:
            messages = [{"role": "system", "content": system}] + [m for m in messages if m["role"] != "system"]
        ids = self.template.tokenize_messages(self.model, messages)
        return self._run(ids, max_tokens, stop, sampling, self.template.strip_leading_space, stream)

    def create_completion(self, prompt: str, max_tokens: int = 256, *, stop=(), stream=False, **sampling):
        """An OpenAI text_completion dict (or an iterator of chunk dicts when stream=True)."""
        ids = self.model.tokenize(prompt, add_bos=True, special=False)
        return self._openai(ids, max_tokens, stop, sampling, False, stream, chat=False)

    def create_chat_completion(self, messages, max_tokens: int = 512, *, stop=(), stream=False, **sampling):
        """An OpenAI chat.completion dict (or chat.completion.chunk dicts when stream=True)."""
        ids = self.template.tokenize_messages(self.model, list(messages))
        return self._openai(ids, max_tokens, stop, sampling, self.template.strip_leading_space, stream, chat=True)

    def _openai(self, ids, max_tokens, stop, sampling, strip, stream, chat):
        if isinstance(stop, str):
            stop = [stop]
        rid = openai_format.new_id(chat)
        created = openai_format.created_now()
        name = os.path.basename(self.model.path)
        gen = self._generate(ids, max_tokens, stop or (), sampling, strip)

        def final():
            s = self.last_stats
            return s["finish_reason"], openai_format.usage(s["prompt_tokens"], s["completion_tokens"])

        if not stream:
            text = "".join(t for t, _ in gen)
            finish, use = final()
            return openai_format.completion(rid, created, name, text, finish, use, chat)
        return openai_format.stream_chunks(rid, created, name, chat, (t for t, _ in gen), final)


def _lora_specs(lora):
    """[(path-or-adapter, scale)] from Llama's ``lora=`` argument."""
    if lora is None:
        return []
    if isinstance(lora, (str, bytes, os.PathLike, LoraAdapter)) or (
            isinstance(lora, tuple) and len(lora) == 2 and isinstance(lora[1], (int, float))):
        lora = [lora]
    out = []
    for item in lora:
        if isinstance(item, tuple):
            target, scale = item
        else:
            target, scale = item, 1.0
        out.append((target if isinstance(target, LoraAdapter) else os.fspath(target), float(scale)))
    return out
