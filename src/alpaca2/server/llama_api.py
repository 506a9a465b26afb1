"""llama-server's own paths: /health, /metrics, /props, /slots, /lora-adapters, /tokenize, /detokenize,
/apply-template, and the native /completion (llama-server's response shape, with timings).

Mixed into alpaca2.server.app.Server.
"""
from __future__ import annotations

import asyncio

import alpaca2
from alpaca2.errors import Alpaca2Error
from alpaca2.server import rerank, slots
from alpaca2.server.engine import RATE_WINDOW_S
from alpaca2.server.openai_api import sse
from alpaca2.server.sse import event_stream
from alpaca2.server.validation import APIError, bad, number, read_json
from alpaca2.templates import ModelTemplate


def not_supported(message) -> APIError:
    return APIError(501, message, type="not_supported_error", code="not_supported")


def _piece(model, tok):
    """A token's text, or its bytes when they are not whole UTF-8 (as llama-server's /tokenize)."""
    b = model.token_to_piece(tok)
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return list(b)


class LlamaRoutes:
    """The llama-server-shaped endpoints (a mixin of Server)."""

    def llama_routes(self) -> list:
        """Starlette routes of llama-server's own paths."""
        from starlette.routing import Route
        return [
            Route("/health", self.health, methods=["GET"]),
            Route("/v1/health", self.health, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
            Route("/props", self.props, methods=["GET"]),
            Route("/props", self.set_props, methods=["POST"]),
            Route("/slots", self.slots, methods=["GET"]),
            Route("/slots/{id_slot}", self.slot_action, methods=["POST"]),
            Route("/tokenize", self.tokenize, methods=["POST"]),
            Route("/detokenize", self.detokenize, methods=["POST"]),
            Route("/apply-template", self.apply_template, methods=["POST"]),
            Route("/completion", self.completion, methods=["POST"]),
            Route("/completions", self.completion, methods=["POST"]),
            Route("/infill", self.infill, methods=["POST"]),
            Route("/lora-adapters", self.lora_adapters, methods=["GET"]),
            Route("/lora-adapters", self.set_lora_adapters, methods=["POST"]),
        ] + [Route(path, self.rerank, methods=["POST"])
             for path in ("/rerank", "/v1/rerank", "/reranking", "/v1/reranking")]

    async def rerank(self, request):
        return self._json(await rerank.rerank(self, request))

    async def health(self, request):
        e = self.engine
        ok = e.alive
        status = "ok" if ok else ("shutting down" if e._draining else "decode thread stopped")
        return self._json({"status": status, "slots_total": e.parallel, "slots_busy": e.busy_slots,
                           "queue_length": e.queue_length}, 200 if ok else 503)

    def generation_settings(self, job=None) -> dict:
        """The sampling settings as llama-server's params (a job's own, or the server's defaults)."""
        p = self.sampling
        out = {"seed": job.seed if job is not None else (self.seed if self.seed is not None else 0xFFFFFFFF),
               "temperature": p["temp"], "top_k": p["top_k"], "top_p": p["top_p"], "min_p": p["min_p"],
               "typical_p": p.get("typical_p", 1.0), "repeat_last_n": p["penalty_last_n"],
               "repeat_penalty": p["repeat_penalty"], "presence_penalty": p.get("presence_penalty", 0.0),
               "frequency_penalty": p.get("frequency_penalty", 0.0), "mirostat": 0,
               "adaptive_target": -1.0, "adaptive_decay": 0.9,
               "n_predict": job.max_tokens if job is not None else (self.n_predict if self.n_predict else -1),
               "n_probs": job.n_probs if job is not None else 0, "stop": list(job.stop) if job is not None else [],
               "ignore_eos": job.ignore_eos if job is not None else False, "stream": False,
               "logit_bias": [], "lora": self.engine.lora.request_fields(job)}
        if job is not None and job.ignore_eos:     # llama-server shows ignore_eos as EOG tokens banned
            eog = dict.fromkeys((self.model.eos, self.model.eot))
            out["logit_bias"] = [{"token": t, "bias": None} for t in eog if t >= 0]
        return out

    async def props(self, request):
        model = self.model
        return self._json({
            "default_generation_settings": {"params": self.generation_settings(), "n_ctx": self.engine.n_ctx_slot},
            "total_slots": self.engine.parallel, "model_alias": self.model_id, "model_path": model.path,
            "modalities": {"vision": False, "video": False, "audio": False},
            "endpoint_slots": self.slots_enabled, "endpoint_props": self.props_writable,
            "endpoint_metrics": self.metrics_enabled, "ui": False,
            "chat_template": getattr(self.template, "template", None) or model.chat_template or "",
            "bos_token": model.token_text(model.bos) if model.bos >= 0 else "",
            "eos_token": model.token_text(model.eos) if model.eos >= 0 else "",
            "build_info": f"alpaca2 {alpaca2.__version__} (llama.cpp {alpaca2.llama_cpp_version()})",
            "is_sleeping": self.engine.sleeping,
        })

    async def set_props(self, request):
        if not self.props_writable:
            raise not_supported("This server does not support changing global properties. Start it with `--props`")
        await read_json(request, self.max_body, self.body_timeout)
        return self._json({"success": True})

    async def lora_adapters(self, request):
        """GET /lora-adapters: the loaded adapters and their global scales (alpaca2.server.lora)."""
        return self._json(self.engine.lora.listing())

    async def set_lora_adapters(self, request):
        """POST /lora-adapters: [{"id": i, "scale": s}] sets the global scales; unlisted adapters get 0."""
        self.engine.lora.set_global(await read_json(request, self.max_body, self.body_timeout, array=True))
        return self._json({"success": True})

    async def slots(self, request):
        if not self.slots_enabled:
            raise not_supported("This server does not support slots endpoint. Start it with `--slots`")
        out = []
        for s in self.engine.slots:
            job = s.job
            d = {"id": s.seq_id, "n_ctx": self.engine.n_ctx_slot, "speculative": self.engine.spec is not None,
                 "is_processing": job is not None}
            if job is not None:
                d.update({"n_prompt_tokens": len(job.tokens), "n_prompt_tokens_cache": job.cached_tokens,
                          "next_token": [{"has_next_token": True, "n_remain": job.max_tokens - job.completion_tokens,
                                          "n_decoded": job.completion_tokens}]})
            out.append(d)
        return self._json(out)

    async def slot_action(self, request):
        """llama-server's /slots/{id}?action=save|restore|erase (alpaca2.server.slots)."""
        if not self.slots_enabled:
            raise not_supported("This server does not support slots endpoint. Start it with `--slots`")
        action = request.query_params.get("action")
        body = await read_json(request, self.max_body, self.body_timeout) if action != "erase" else {}
        return self._json(await slots.slot_action(self, request.path_params["id_slot"], action, body))

    async def tokenize(self, request):
        body = await read_json(request, self.max_body, self.body_timeout)
        content = body.get("content")
        if not isinstance(content, str):
            raise bad("'content' must be a string", "content")
        add_special = body.get("add_special", False)
        parse_special = body.get("parse_special", False)       # user text stays text unless asked
        with_pieces = body.get("with_pieces", False)
        for key, v in (("add_special", add_special), ("parse_special", parse_special), ("with_pieces", with_pieces)):
            if not isinstance(v, bool):
                raise bad(f"'{key}' must be true or false", key)
        ids = await asyncio.to_thread(self.model.tokenize, content, add_bos=add_special, special=parse_special)
        if with_pieces:
            return self._json({"tokens": [{"id": t, "piece": _piece(self.model, t)} for t in ids]})
        return self._json({"tokens": ids})

    async def detokenize(self, request):
        body = await read_json(request, self.max_body, self.body_timeout)
        tokens = body.get("tokens", [])
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise bad("'tokens' must be a list of token ids", "tokens")
        self.check_tokens(tokens, "tokens")
        return self._json({"content": self.model.detokenize(tokens)})

    async def apply_template(self, request):
        body = await read_json(request, self.max_body, self.body_timeout)
        if self.uses_formatter(body):     # as llama-server: the template's text, tools and all
            return self._json({"prompt": (await self.render(body))["prompt"]})
        messages = self.messages_of(body)
        if isinstance(self.template, ModelTemplate):     # llama.cpp's built-in templates: their text as it is
            try:
                return self._json({"prompt": self.template.format_messages(messages)})
            except (ValueError, RuntimeError, Alpaca2Error) as e:
                raise bad(f"cannot format these messages: {e}", "messages") from None
        try:
            ids = await asyncio.to_thread(self.template.tokenize_messages, self.model, messages)
        except (ValueError, RuntimeError, Alpaca2Error) as e:
            raise bad(f"cannot format these messages: {e}", "messages") from None
        text = self.model.detokenize(ids, special=True)
        bos = self.model.token_text(self.model.bos) if self.model.bos >= 0 else ""
        if bos and ids and ids[0] == self.model.bos and text.startswith(bos):
            text = text[len(bos):]          # as llama-server: the prompt text, without the BOS the tokenizer adds
        return self._json({"prompt": text})

    # -- the native /completion ------------------------------------------------------------------
    def _native(self, job, text, probs, tokens, final, return_tokens, post_sampling=False):
        d = {"index": job.index, "content": text, "tokens": tokens if (return_tokens or not final) else [],
             "id_slot": job.slot_id, "stop": final, "model": self.model_id, "tokens_predicted": job.completion_tokens,
             "tokens_evaluated": len(job.tokens)}
        if job.n_probs:
            d["completion_probabilities"] = [_post_sampling(p) if post_sampling else p for p in probs]
        if final:
            d.update({"generation_settings": self.generation_settings(job),
                      "prompt": self.model.detokenize(job.tokens, special=True),   # as the model saw it
                      "has_new_line": "\n" in "".join(job.text_seen),
                      "truncated": job.stop_type == "limit" and job.completion_tokens >= job.n_room,
                      "stop_type": job.stop_type, "stopping_word": job.stopping_word,
                      "tokens_cached": job.cached_tokens + job.completion_tokens, "timings": job.timings})
        return d

    def _fim_ids(self):
        md = self.model.metadata
        ids = {}
        for k in ("pre", "suf", "mid", "rep", "sep"):
            v = md.get(f"tokenizer.ggml.fim_{k}_token_id")     # metadata values come as text
            ids[k] = int(v) if v is not None and str(v).lstrip("-").isdigit() and int(v) >= 0 else None
        if any(ids[k] is None for k in ("pre", "suf", "mid")):
            raise not_supported("this model has no fill-in-the-middle tokens (tokenizer.ggml.fim_pre/suf/mid)")
        return ids

    async def infill(self, request):
        """llama-server's /infill: input_prefix, input_suffix, optional input_extra files and prompt,
        in the model's FIM format (prefix, suffix, middle), answered as /completion."""
        body = await read_json(request, self.max_body, self.body_timeout)
        ids = self._fim_ids()
        texts = {}
        for key in ("input_prefix", "input_suffix", "prompt"):
            v = body.get(key, "")
            if not isinstance(v, str):
                raise bad(f"'{key}' must be a string", key)
            texts[key] = v
        extra = body.get("input_extra", [])
        if not isinstance(extra, list):
            raise bad("'input_extra' must be a list of {filename, text} objects", "input_extra")
        for chunk in extra:
            if (not isinstance(chunk, dict) or not isinstance(chunk.get("text"), str)
                    or not isinstance(chunk.get("filename", ""), str)):
                raise bad("each 'input_extra' chunk needs a string 'text' (and an optional string 'filename')",
                          "input_extra")

        def tok(text):
            return self.model.tokenize(text, add_bos=False, special=False)
        tokens = [self.model.bos] if self.model.add_bos and self.model.bos >= 0 else []
        if extra:          # other files first, as llama-server: <fim_rep>project, <fim_sep>name, text
            if ids["rep"] is not None:
                tokens += [ids["rep"]] + tok("myproject\n")
            for chunk in extra:
                if ids["sep"] is not None:
                    tokens += [ids["sep"]] + tok(chunk.get("filename", "") + "\n")
                tokens += tok(chunk["text"])
            if ids["sep"] is not None:
                tokens += [ids["sep"]] + tok("filename\n")
        tokens += [ids["pre"]] + tok(texts["input_prefix"]) + [ids["suf"]] + tok(texts["input_suffix"])
        tokens += [ids["mid"]] + tok(texts["prompt"])
        return await self._complete(request, body, [tokens])

    async def completion(self, request):
        """llama-server's /completion: content, tokens, stop_type, timings ... (streamed as SSE).
        Several prompts in one request ([tokens, "text", {"prompt_string": ...}]) answer as a list."""
        body = await read_json(request, self.max_body, self.body_timeout)
        prompts = await self.prompts_of(body.get("prompt"))
        return await self._complete(request, body, prompts, many=len(prompts) > 1 or None)

    async def _complete(self, request, body, prompts, many=None):
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise bad("'stream' must be true or false", "stream")
        n_probs = number(body, "n_probs", 0, 100, integer=True) or 0
        return_tokens = bool(body.get("return_tokens", False))
        post = bool(body.get("post_sampling_probs", False))
        per_token_timings = body.get("timings_per_token") is True
        fields = body.get("response_fields") or []
        if not isinstance(fields, list) or not all(isinstance(f, str) for f in fields):
            raise bad("'response_fields' must be a list of strings", "response_fields")
        jobs = []
        for i, tokens in enumerate(prompts):
            job = self.jobs_for(body, tokens, False, n_probs=n_probs)[0]
            job.index, job.text_seen = i, []
            job.return_progress = stream and body.get("return_progress") is True
            if jobs:
                job.events = jobs[0].events        # one queue: events come tagged with the index
            jobs.append(job)
        self.submit(jobs)
        if stream:

            async def events():
                async for index, ev in self.events_of(jobs):
                    job = jobs[index]
                    if ev[0] == "text":
                        job.text_seen.append(ev[1])
                        if ev[1] or ev[2]:
                            d = self._native(job, ev[1], ev[3], ev[2], False, True, post)
                            if per_token_timings:
                                d["timings"] = job.timings
                            yield sse(d)
                    elif ev[0] == "progress":
                        d = self._native(job, "", [], [], False, False)
                        d["prompt_progress"] = ev[1]
                        if per_token_timings:
                            d["timings"] = ev[2]
                        yield sse(d)
                    elif ev[0] == "end":
                        yield sse(self._native(job, "", [], [], True, return_tokens))
                    else:
                        yield sse(self.error_of(ev).body())
                        return

            return event_stream(events(), headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        results = await self.collect(request, jobs)
        if results is None:
            from starlette.responses import Response
            return Response(status_code=499)
        out = []
        for job, r in zip(jobs, results):
            job.text_seen = [r["text"]]
            d = self._native(job, r["text"], r["probs"], r["tokens"], True, return_tokens, post)
            out.append(_fields(d, fields) if fields else d)
        return self._json(out if many else out[0])

    async def metrics(self, request):
        from starlette.responses import Response
        if not self.metrics_enabled:
            raise not_supported("This server does not support metrics endpoint. Start it with `--metrics`")
        e = self.engine
        lines = []

        def metric(name, kind, help, samples):
            lines.append(f"# HELP alpaca2_{name} {help}")
            lines.append(f"# TYPE alpaca2_{name} {kind}")
            for labels, value in samples:
                lab = ",".join(f'{k}="{v}"' for k, v in labels.items())
                lines.append(f"alpaca2_{name}{{{lab}}} {value}" if lab else f"alpaca2_{name} {value}")
        metric("requests_total", "counter", "HTTP requests by endpoint and status code (successful "
               "GETs of /health, /props, /models, /metrics and /slots are not counted).",
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
        # llama-server's own names, so its dashboards work unchanged; its throughput gauges cover the
        # time since the previous scrape (its metric "buckets"), not the whole run
        last = self._metrics_bucket
        now_bucket = (e.prompt_tokens_total - e.prompt_tokens_cached_total, e.prompt_seconds_total,
                      e.completion_tokens_total, e.predicted_seconds_total)
        self._metrics_bucket = now_bucket

        def rate(tokens, seconds, i):
            dt = seconds - last[i + 1]
            return round((tokens - last[i]) / dt, 3) if dt > 0 else 0
        steps = max(e.decode_steps_total, 1)
        spec = e.spec_stats
        for name, kind, help, value in (
                ("prompt_tokens_total", "counter", "Number of prompt tokens processed.",   # embeddings' too
                 e.prompt_tokens_total - e.prompt_tokens_cached_total + e.embedding_tokens_total),
                ("prompt_tokens_cached_total", "counter", "Number of prompt tokens taken from the cache.",
                 e.prompt_tokens_cached_total),
                ("prompt_seconds_total", "counter", "Prompt process time.", round(e.prompt_seconds_total, 6)),
                ("tokens_predicted_total", "counter", "Number of generation tokens processed.",
                 e.completion_tokens_total),
                ("tokens_predicted_seconds_total", "counter", "Predict process time.",
                 round(e.predicted_seconds_total, 6)),
                ("n_decode_total", "counter", "Total number of llama_decode() calls.",
                 e.decode_steps_total + e.embedding_decodes_total),
                ("n_tokens_max", "counter", "Largest observed n_tokens.", e.n_tokens_max),
                ("spec_decode_num_draft_tokens_total", "counter", "Drafted tokens (speculative decoding).",
                 spec["n_drafted"]),
                ("spec_decode_num_accepted_tokens_total", "counter", "Accepted drafted tokens.", spec["n_accepted"]),
                ("spec_decode_num_drafts_total", "counter", "Draft-and-verify steps.", spec["n_steps"]),
                ("prompt_tokens_seconds", "gauge", "Average prompt throughput in tokens/s since the last scrape.",
                 rate(e.prompt_tokens_total - e.prompt_tokens_cached_total, e.prompt_seconds_total, 0)),
                ("predicted_tokens_seconds", "gauge", "Average generation throughput in tokens/s since the last "
                 "scrape.", rate(e.completion_tokens_total, e.predicted_seconds_total, 2)),
                ("requests_processing", "gauge", "Number of requests processing.", e.busy_slots),
                ("requests_deferred", "gauge", "Number of requests deferred.", e.queue_length),
                ("n_busy_slots_per_decode", "gauge", "Average number of busy slots per llama_decode() call.",
                 round(e.busy_slot_steps / steps, 3))):
            lines += [f"# HELP llamacpp:{name} {help}", f"# TYPE llamacpp:{name} {kind}", f"llamacpp:{name} {value}"]
        return Response("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

def _fields(d: dict, paths: list) -> dict:
    """llama-server's response_fields: only these paths ("a/b" walks into objects), keyed by path."""
    out = {}
    for path in paths:
        cur, ok = d, True
        for key in path.split("/"):
            if isinstance(cur, dict) and key in cur:
                cur = cur[key]
            else:
                ok = False
                break
        if ok:
            out[path] = cur
    return out


def _post_sampling(entry):
    """llama-server's post_sampling_probs shape: probabilities instead of log-probabilities."""
    import math

    def one(e):
        return {"id": e["id"], "token": e["token"], "bytes": e["bytes"], "prob": math.exp(e["logprob"])}
    out = one(entry)
    out["top_probs"] = [one(t) for t in entry["top_logprobs"] if math.exp(t["logprob"]) > 0]
    return out


