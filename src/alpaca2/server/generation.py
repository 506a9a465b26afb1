"""What the generation endpoints share: request fields -> Sampler and Jobs, and the job's events
back as text (streamed or collected).  Mixed into alpaca2.server.app.Server."""
from __future__ import annotations

import asyncio
import random

from alpaca2._core import Sampler
from alpaca2.errors import Alpaca2Error
from alpaca2.server.engine import Job
from alpaca2.server.tools import grammar_sampler
from alpaca2.server.validation import APIError, bad, number, wait_disconnect

MAX_CHOICES = 16


def _int_list(x) -> bool:
    return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)


class Generation:
    """Request fields -> Jobs; Jobs' events -> results (a mixin of Server)."""

    def check_tokens(self, ids, field):
        if not all(0 <= t < self.model.n_vocab for t in ids):
            raise bad(f"a token id in '{field}' is out of range (0 to {self.model.n_vocab - 1})", field)
        return list(ids)

    async def tokens_of(self, prompt, field="prompt", add_bos=True):
        """A prompt as llama-server takes it: text, token ids, or a mix of both in one list."""
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            tokens = await asyncio.to_thread(self.model.tokenize, prompt, add_bos=add_bos, special=False)
        elif isinstance(prompt, list) and prompt and all(
                isinstance(t, str) or (isinstance(t, int) and not isinstance(t, bool)) for t in prompt):
            tokens, first = [], add_bos
            for part in prompt:       # llama-server's mixed prompt: [12, 34, "text", 56]
                if isinstance(part, str):
                    tokens += self.model.tokenize(part, add_bos=first, special=False)
                else:
                    tokens += self.check_tokens([part], field)
                first = False
        else:
            raise bad(f"'{field}' must be a string, a list of token ids, or a list of one of them", field)
        if not tokens:
            raise bad("the prompt is empty", field)
        return tokens

    async def prompts_of(self, prompt, field="prompt"):
        """llama-server's prompt forms (tokenize_input_prompts): one (text, token ids, a mix in one
        list, {"prompt_string": text}, {"content": [{"type": "text", "text": ...}, ...]}), or several
        (a list of those, when the list holds no bare token id)."""
        def one(p):
            if isinstance(p, dict):
                if p.get("multimodal_data"):
                    raise bad("this server has no multimodal (image/audio) support", field)
                if "content" in p and "prompt_string" not in p:
                    parts = p["content"]
                    if not isinstance(parts, list) or not all(
                            isinstance(c, dict) and c.get("type") == "text" and isinstance(c.get("text"), str)
                            for c in parts):
                        raise bad("'content' must be a list of {\"type\": \"text\", \"text\": ...} parts", field)
                    return "".join(c["text"] for c in parts)
                p = p.get("prompt_string")
                if not isinstance(p, str):
                    raise bad("a JSON prompt needs a 'prompt_string'", field)
            return p
        if isinstance(prompt, list) and len(prompt) > 1 and not any(
                isinstance(p, int) and not isinstance(p, bool) for p in prompt):
            if len(prompt) > 2048:
                raise bad(f"at most 2048 prompts in '{field}'", field)
            return [await self.tokens_of(one(p), field) for p in prompt]
        return [await self.tokens_of(one(prompt), field)]

    def _logit_bias(self, bias) -> dict:
        """OpenAI's {"id": bias} or llama-server's [[id or text, bias or false], ...]."""
        items = []
        if isinstance(bias, dict):
            for k, v in bias.items():       # a key is a token id, or a text (its tokens), as llama-server
                try:
                    items.append((int(k), v))
                except ValueError:
                    items += [(t, v) for t in self.model.tokenize(k, add_bos=False, special=False)]
        elif isinstance(bias, list):
            for pair in bias:
                if not isinstance(pair, list) or len(pair) != 2:
                    raise bad("'logit_bias' as a list holds [token id or text, bias] pairs", "logit_bias")
                key, v = pair
                if isinstance(key, str):
                    items += [(t, v) for t in self.model.tokenize(key, add_bos=False, special=False)]
                elif isinstance(key, int) and not isinstance(key, bool):
                    items.append((key, v))
                else:
                    raise bad("'logit_bias' pairs start with a token id or a text", "logit_bias")
        else:
            raise bad("'logit_bias' must be an object of token id -> bias", "logit_bias")
        out = {}
        for tok, v in items:
            if not 0 <= tok < self.model.n_vocab:
                raise bad(f"token id {tok} in 'logit_bias' is out of range", "logit_bias")
            if v is False:
                v = -100
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not -100 <= v <= 100:
                raise bad("'logit_bias' values must be numbers from -100 to 100 (or false: banned)", "logit_bias")
            out[tok] = float("-inf") if v <= -100 else float(v)
        banned = {t for t, v in out.items() if v == float("-inf")}
        if len(banned) >= self.model.n_vocab:
            raise bad("'logit_bias' bans every token: nothing could be generated", "logit_bias")
        return out, banned

    def sampler_for(self, body, seed_offset=0, template_grammar=None):
        """A Sampler from the request's fields (OpenAI's, and llama-server's top_k, min_p,
        repeat_penalty, grammar ...); what the request leaves out comes from the server's flags.
        ``template_grammar``: a Jinja template's grammar (alpaca2.server.tools), maybe lazy.
        Returns (sampler, banned token ids, seed)."""
        p = dict(self.sampling)
        temp = number(body, "temperature", 0.0, 100.0)
        if temp is not None:
            p["temp"] = float(temp)
        for key, name, lo, hi, integer in (
                ("top_p", "top_p", 0.0, 1.0, False), ("top_k", "top_k", 0, 1 << 30, True),
                ("min_p", "min_p", 0.0, 1.0, False), ("typical_p", "typical_p", 0.0, 1.0, False),
                ("repeat_penalty", "repeat_penalty", 0.0, 100.0, False),
                ("repeat_last_n", "penalty_last_n", -1, 1 << 20, True),
                ("presence_penalty", "presence_penalty", -2.0, 2.0, False),
                ("frequency_penalty", "frequency_penalty", -2.0, 2.0, False),
                ("mirostat", "mirostat", 0, 2, True)):
            v = number(body, key, lo, hi, integer)
            if v is not None:
                p[name] = v
        if p.get("typical_p") == 0:
            p["typical_p"] = 1.0
        if p.get("top_p") == 0:
            p["top_p"] = 1e-9 if temp != 0 else 1.0
        if p.get("penalty_last_n") == -1:
            p["penalty_last_n"] = self.engine.n_ctx_slot
        seed = number(body, "seed", -(1 << 63), (1 << 64) - 1, integer=True)
        seed = self.seed if seed is None or seed == -1 or seed == 0xFFFFFFFF else seed
        # llama.cpp's seeds are 0 .. 0xFFFFFFFE: 0xFFFFFFFF (LLAMA_DEFAULT_SEED) means "random"
        seed = (seed if seed is not None else random.getrandbits(32)) % 0xFFFFFFFF
        p["seed"] = (seed + seed_offset) % 0xFFFFFFFF
        banned = set()
        bias = body.get("logit_bias")
        if bias is not None:
            p["logit_bias"], banned = self._logit_bias(bias)
        grammar = body.get("grammar")
        if grammar is not None:
            if not isinstance(grammar, str):
                raise bad("'grammar' must be a GBNF grammar (a string)", "grammar")
            if grammar.strip():
                p["grammar"] = grammar
        schema = self._json_schema_of(body)
        if schema is not None:
            if "grammar" in p:
                raise bad("give either 'grammar' or a JSON schema, not both", "grammar")
            p["grammar"] = self._grammar_for_schema(schema)
        try:
            if template_grammar is not None:
                return grammar_sampler(self.model, p, template_grammar), banned, seed
            return Sampler(model=self.model, **p), banned, seed
        except (ValueError, TypeError, Alpaca2Error) as e:
            field = "grammar" if "grammar" in p and "grammar" in str(e).lower() else None
            raise bad(f"bad sampling parameters: {e}", field) from None

    @staticmethod
    def _json_schema_of(body):
        """The JSON schema a request constrains its answer to: response_format (json_object with an
        optional schema, json_schema) or llama-server's json_schema field; None: no constraint."""
        schema = body.get("json_schema")
        rf = body.get("response_format")
        if rf is not None:
            kind = rf.get("type") if isinstance(rf, dict) else None
            if kind == "json_object":
                schema = rf.get("schema", {})
            elif kind == "json_schema":
                wrapper = rf.get("json_schema")
                if not isinstance(wrapper, dict):
                    raise bad("response_format json_schema needs a 'json_schema' object", "response_format")
                schema = wrapper.get("schema", {})
            elif kind != "text":
                raise bad("response_format type must be text, json_object or json_schema", "response_format")
        if schema is not None and not isinstance(schema, (dict, bool)):
            raise bad("a JSON schema must be an object", "response_format")
        return schema

    @staticmethod
    def _grammar_for_schema(schema) -> str:
        """llama.cpp's own JSON-schema-to-GBNF converter (common/json-schema-to-grammar)."""
        try:
            from alpaca2._common import json_schema_to_grammar
        except ImportError:
            raise APIError(501, "structured output needs alpaca2._common (llama.cpp's common library), "
                           "which this build lacks", type="not_supported_error") from None
        try:
            return json_schema_to_grammar(schema)
        except (ValueError, TypeError, RuntimeError, Alpaca2Error) as e:
            raise bad(f"the JSON schema cannot be turned into a grammar: {e}", "response_format") from None

    def max_tokens_for(self, body, n_prompt, keys=("max_completion_tokens", "max_tokens", "n_predict")):
        n_slot = self.engine.n_ctx_slot
        if n_prompt >= n_slot:
            raise APIError(400, f"the request exceeds the available context size: the prompt has {n_prompt} "
                           f"tokens, the context {n_slot}", code="context_length_exceeded",
                           type="exceed_context_size_error", extra={"n_prompt_tokens": n_prompt, "n_ctx": n_slot})
        key = next((k for k in keys if body.get(k) is not None), keys[-1])
        max_tokens = number(body, key, -1 if key == "n_predict" else 1, 1 << 31, integer=True)
        room = n_slot - n_prompt
        if max_tokens is None or max_tokens < 0:
            max_tokens = room if self.n_predict is None or self.n_predict < 0 else min(self.n_predict, room)
            max_tokens = min(max_tokens, self.max_tokens_limit)
        else:
            if max_tokens > self.max_tokens_limit:
                raise bad(f"'{key}' is {max_tokens}; this server allows at most {self.max_tokens_limit}", key)
            max_tokens = min(max_tokens, room)      # a request's own value wins over -n (llama-server's)                    # the answer ends at the slot's end
        return max_tokens

    def jobs_for(self, body, tokens, strip_leading_space, *, n=1, n_probs=0, template_grammar=None,
                 extra_stop=(), preserved=()):
        """n Jobs (choices) for one request; their sampler seeds differ by their index.  A Jinja
        template adds its grammar, stop strings, and tokens shown as text (``preserved``)."""
        max_tokens = self.max_tokens_for(body, len(tokens))
        stop = body.get("stop")
        if stop is None:
            stop = []
        elif isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or len(stop) > 16 or not all(isinstance(s, str) for s in stop):
            raise bad("'stop' must be a string or a list of at most 16 strings", "stop")
        stop = stop + [s for s in extra_stop if s not in stop]
        ignore_eos = body.get("ignore_eos", False)
        if not isinstance(ignore_eos, bool):
            raise bad("'ignore_eos' must be true or false", "ignore_eos")
        id_slot = number(body, "id_slot", -1, self.engine.parallel - 1, integer=True)
        id_slot = -1 if id_slot is None or n > 1 else id_slot
        lora = self.engine.lora.parse(body.get("lora"))      # this request's LoRA scales (None: the global ones)
        loop = asyncio.get_running_loop()
        jobs = []
        for i in range(n):
            sampler, banned, seed = self.sampler_for(body, seed_offset=i, template_grammar=template_grammar)
            constrained = (bool(body.get("grammar")) or self._json_schema_of(body) is not None
                           or template_grammar is not None)
            job = Job(tokens, max_tokens=max_tokens, sampler=sampler, stop=stop,
                      strip_leading_space=strip_leading_space, ignore_eos=ignore_eos, loop=loop,
                      n_probs=n_probs, banned=banned, accept_prompt=not constrained, id_slot=id_slot)
            job.preserved = frozenset(preserved)
            job.lora = lora
            job.index, job.seed = i, seed
            if self.engine.speculative and not n_probs and not constrained and not body.get("mirostat"):
                job.speculate = True
            job.n_room = self.engine.n_ctx_slot - len(tokens)      # the answer ends at the slot's end
            jobs.append(job)
        if n > 1:
            shared = jobs[0].events
            for job in jobs[1:]:
                job.events = shared
        return jobs

    def _busy_error(self):
        return APIError(503, f"all {self.engine.parallel} slots are busy and {self.engine.queue_size} requests are "
                        "waiting; retry later", type="server_error", code="server_busy",
                        headers={"Retry-After": "1"})

    def submit(self, jobs):
        for i, job in enumerate(jobs):
            if not self.engine.submit(job):
                for done in jobs[:i]:
                    done.cancel()
                raise self._busy_error()

    @staticmethod
    def error_of(ev) -> APIError:
        return APIError(ev[1], ev[2], type="server_error" if ev[1] >= 500 else "invalid_request_error")

    async def events_of(self, jobs):
        """(choice index, event) until every job ended; the jobs are cancelled when the consumer
        stops early (a streaming client went away)."""
        queue = jobs[0].events
        left = len(jobs)
        try:
            while left:
                index, ev = await queue.get()
                if ev[0] not in ("text", "progress"):
                    left -= 1
                yield index, ev
                if ev[0] == "error":
                    return
        finally:
            for job in jobs:
                job.cancel()

    async def collect(self, request, jobs):
        """Every job's text, tokens, logprobs and finish reason; None when the client went away."""
        results = [{"text": [], "tokens": [], "probs": [], "finish": None} for _ in jobs]
        for job in jobs:             # the text comes whole with the end, not a wake-up a token
            job.coalesce = True
        gone = asyncio.ensure_future(wait_disconnect(request))
        events = self.events_of(jobs)
        try:
            while True:
                get = asyncio.ensure_future(events.__anext__())
                done, _ = await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    get.cancel()
                    return None
                try:
                    index, ev = get.result()
                except StopAsyncIteration:
                    break
                r = results[index]
                if ev[0] == "text":
                    r["text"].append(ev[1])
                    r["tokens"] += ev[2]
                    r["probs"] += ev[3]
                elif ev[0] == "end":
                    r["finish"] = ev[1]
                elif ev[0] != "progress":
                    raise self.error_of(ev)
        finally:
            gone.cancel()
            await events.aclose()
        for r in results:
            r["text"] = "".join(r["text"])
        return results
