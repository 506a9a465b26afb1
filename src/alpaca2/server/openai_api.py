"""The OpenAI API: /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models (also
without the /v1 prefix, as llama-server).

Mixed into alpaca2.server.app.Server.  User text is tokenized with special=False: "</s>" typed by
a user is those five characters, never the EOS token.
"""
from __future__ import annotations

import asyncio
import base64
import os
import time
import uuid

from alpaca2.errors import Alpaca2Error
from alpaca2.server import responses
from alpaca2.server.engine import EmbedJob
from alpaca2.server.generation import MAX_CHOICES
from alpaca2.server.sse import TextChunks, event_stream, sse
from alpaca2.server.validation import APIError, bad, check_text, number, read_json

ROLES = ("system", "user", "assistant")
__all__ = ["OpenAIRoutes", "chat_logprobs", "legacy_logprobs", "sse"]


def chat_logprobs(probs):
    """OpenAI chat logprobs from the engine's entries."""
    def one(e):
        return {"token": e["token"], "logprob": e["logprob"], "bytes": e["bytes"]}
    return {"content": [dict(one(e), top_logprobs=[one(t) for t in e["top_logprobs"]]) for e in probs]}


def legacy_logprobs(probs, offset=0):
    """OpenAI (legacy) completions logprobs from the engine's entries."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for e in probs:
        out["tokens"].append(e["token"])
        out["token_logprobs"].append(e["logprob"])
        out["top_logprobs"].append({t["token"]: t["logprob"] for t in e["top_logprobs"]})
        out["text_offset"].append(offset)
        offset += len(e["token"])
    return out


class OpenAIRoutes:
    """The OpenAI-shaped endpoints (a mixin of Server)."""

    def openai_routes(self) -> list:
        """Starlette routes: /v1/..., and /chat/completions and /models without /v1 (as llama-server)."""
        from starlette.routing import Route
        routes = [Route("/v1/completions", self.completions, methods=["POST"]),    # /completions: native
                  Route("/v1/chat/completions/control", self.chat_control, methods=["POST"]),
                  Route("/v1/embeddings", self.embeddings, methods=["POST"]),
                  Route("/embeddings", self.native_embeddings, methods=["POST"]),
                  Route("/embedding", self.native_embeddings, methods=["POST"])]
        for prefix in ("/v1", ""):
            routes += [
                Route(prefix + "/chat/completions/input_tokens", self.chat_input_tokens, methods=["POST"]),
                Route(prefix + "/chat/completions", self.chat_completions, methods=["POST"]),
                Route(prefix + "/models", self.models, methods=["GET"]),
                Route(prefix + "/models/{model_id:path}", self.model_info, methods=["GET"]),
                Route(prefix + "/responses", self.responses, methods=["POST"]),
                Route(prefix + "/responses/input_tokens", self.responses_input_tokens, methods=["POST"]),
            ]
        return routes

    def _check_model(self, body):
        name = body.get("model")
        if name is not None and not isinstance(name, str):
            raise bad("'model' must be a string", "model")
        # one model is served: any name means it, as llama-server (clients set to "gpt-4o" work)

    def _n_choices(self, body):
        n = number(body, "n", 1, MAX_CHOICES, integer=True) or 1
        if body.get("best_of") not in (None, 1, n):
            raise bad("'best_of' is not supported", "best_of")
        return n

    def _stream_flags(self, body):
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise bad("'stream' must be true or false", "stream")
        opts = body.get("stream_options") or {}
        if not isinstance(opts, dict):
            raise bad("'stream_options' must be an object", "stream_options")
        return stream, bool(opts.get("include_usage"))

    def messages_of(self, body):
        """The request's messages as {"role", "content"} dicts, checked as llama-server does."""
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise bad("'messages' must be a non-empty list", "messages")
        out = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise bad(f"messages[{i}] must be an object", "messages")
            role = m.get("role")
            if role == "developer":
                role = "system"
            if role not in ROLES:
                raise bad(f"messages[{i}]: role must be system, developer, user or assistant, got {role!r}",
                          "messages")
            content = m.get("content")
            if content is None and role == "assistant":
                content = ""
            if isinstance(content, list):       # content parts: text only
                texts = []
                for part in content:
                    if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                        raise bad(f"messages[{i}]: only text content parts are supported", "messages")
                    texts.append(part["text"])
                content = "".join(texts)
            if not isinstance(content, str):
                raise bad(f"messages[{i}]: content must be a string or a list of text parts", "messages")
            check_text(content, "messages")
            out.append({"role": role, "content": content})
        if len(out) >= 2 and out[-1]["role"] == "assistant" and out[-2]["role"] == "assistant":
            raise bad("Cannot have 2 or more assistant messages at the end of the list.", "messages")
        return out

    def _logprobs_n(self, body, chat):
        if chat:
            lp = body.get("logprobs")
            if lp not in (None, True, False):
                raise bad("'logprobs' must be true or false", "logprobs")
            top = number(body, "top_logprobs", 0, 20, integer=True)
            if top is not None and not lp:
                raise bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
            return max(1, top or 0) if lp else 0
        lp = body.get("logprobs")
        if lp is None or lp is False:
            return 0
        return max(1, number(body, "logprobs", 0, 20, integer=True))

    async def responses(self, request):
        """OpenAI's Responses API over this server's chat completions (alpaca2.server.responses)."""
        return await responses.responses(self, request)

    async def responses_input_tokens(self, request):
        return await responses.input_tokens(self, request)

    async def chat_completions(self, request):
        body = await read_json(request, self.max_body, self.body_timeout)
        self._check_model(body)
        if self.uses_formatter(body):         # a Jinja template: tools, reasoning (server/tools.py)
            return await self.formatter_chat(request, body)
        self.check_no_tools(body)
        messages = self.messages_of(body)
        try:      # in a worker thread: a long prompt must not hold up the other clients' streams
            tokens = await asyncio.to_thread(self.template.tokenize_messages, self.model, messages)
        except (ValueError, RuntimeError, Alpaca2Error) as e:
            raise bad(f"cannot format these messages: {e}", "messages") from None
        n = self._n_choices(body)
        stream, include_usage = self._stream_flags(body)
        jobs = self.jobs_for(body, tokens, self.template.strip_leading_space, n=n,
                             n_probs=self._logprobs_n(body, chat=True))
        return await self._answer(request, body, jobs, stream, include_usage, chat=True)

    async def chat_input_tokens(self, request):
        """llama-server's /chat/completions/input_tokens: how many tokens the prompt would take."""
        body = await read_json(request, self.max_body, self.body_timeout)
        if self.uses_formatter(body):
            return self._json({"input_tokens": len((await self.render(body))["prompt_tokens"])})
        messages = self.messages_of(body)
        try:
            tokens = await asyncio.to_thread(self.template.tokenize_messages, self.model, messages)
        except (ValueError, RuntimeError, Alpaca2Error) as e:
            raise bad(f"cannot format these messages: {e}", "messages") from None
        return self._json({"input_tokens": len(tokens)})

    async def completions(self, request):
        body = await read_json(request, self.max_body, self.body_timeout)
        self._check_model(body)
        if body.get("echo") or body.get("suffix"):
            raise bad("echo and suffix are not supported")
        tokens = await self.tokens_of(body.get("prompt"))
        n = self._n_choices(body)
        stream, include_usage = self._stream_flags(body)
        jobs = self.jobs_for(body, tokens, False, n=n, n_probs=self._logprobs_n(body, chat=False))
        return await self._answer(request, body, jobs, stream, include_usage, chat=False)

    def _usage(self, jobs):
        usage = dict(jobs[0].usage)
        usage["completion_tokens"] = sum(j.completion_tokens for j in jobs)
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return usage

    async def _answer(self, request, body, jobs, stream, include_usage, chat):
        for job in jobs:
            job.return_progress = stream and body.get("return_progress") is True
        self.submit(jobs)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        head = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
                "model": self.model_id, "system_fingerprint": self.system_fingerprint}
        want_probs = jobs[0].n_probs > 0
        per_token_timings = bool(body.get("timings_per_token"))
        if stream:
            fast = None if per_token_timings else TextChunks(head, chat)   # text-only chunks, prebuilt

            def chunk(index, text=None, finish=None, role=False, probs=None):
                if fast is not None and text and finish is None and not role and not (want_probs and probs):
                    return fast.text(index, text)
                if chat:
                    delta = {"role": "assistant", "content": None} if role else ({"content": text} if text else {})
                    lp = chat_logprobs(probs) if want_probs and probs else None
                    choice = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}
                else:
                    lp = legacy_logprobs(probs) if want_probs and probs else None
                    choice = {"index": index, "text": text or "", "logprobs": lp, "finish_reason": finish}
                d = dict(head, choices=[choice])
                if per_token_timings and not role:
                    d["timings"] = jobs[0].timings
                return sse(d)

            async def events():
                if chat:
                    for job in jobs:
                        yield chunk(job.index, role=True)
                async for index, ev in self.events_of(jobs):
                    if ev[0] == "text":
                        if ev[1] or (want_probs and ev[3]):
                            yield chunk(index, ev[1], probs=ev[3])
                    elif ev[0] == "end":
                        yield chunk(index, finish=ev[1])
                    elif ev[0] == "progress":        # llama-server's prompt_progress, on an empty chunk
                        empty = ({"index": index, "delta": {"role": "assistant", "content": None}} if chat
                                 else {"index": index, "text": ""})
                        d = dict(head, choices=[dict(empty, logprobs=None, finish_reason=None)],
                                 prompt_progress=ev[1])
                        if per_token_timings:
                            d["timings"] = ev[2]
                        yield sse(d)
                    else:
                        yield sse(self.error_of(ev).body())
                        return
                if include_usage:
                    yield sse(dict(head, choices=[], usage=self._usage(jobs), timings=jobs[0].timings))
                yield "data: [DONE]\n\n"

            return event_stream(events(), headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        results = await self.collect(request, jobs)
        if results is None:
            from starlette.responses import Response
            return Response(status_code=499)
        choices = []
        for i, r in enumerate(results):
            if chat:
                lp = chat_logprobs(r["probs"]) if want_probs else None
                choices.append({"index": i, "message": {"role": "assistant", "content": r["text"]}, "logprobs": lp,
                                "finish_reason": r["finish"]})
            else:
                lp = legacy_logprobs(r["probs"]) if want_probs else None
                choices.append({"index": i, "text": r["text"], "logprobs": lp, "finish_reason": r["finish"]})
        out = dict(head, object="chat.completion" if chat else "text_completion", choices=choices,
                   usage=self._usage(jobs), timings=jobs[0].timings)
        if body.get("verbose") is True or self.verbose:    # llama-server's debug field (-v): the prompt as the model saw it
            out["__verbose"] = {"prompt": self.model.detokenize(jobs[0].tokens, special=True)}
        return self._json(out)

    # -- other endpoints -------------------------------------------------------------------------
    async def _embed(self, body, key="input"):
        """The request's inputs embedded: (token lists, unit-length vectors)."""
        if self.engine.pooling == "none":
            raise bad("Pooling type 'none' is not OAI compatible. Please use a different pooling type", key)
        if body.get(key) is None:
            raise bad(f"'{key}' must be a string, token ids, or a list of them", key)
        inputs = await self.prompts_of(body[key], key)
        return inputs, await self.embed_tokens(inputs)

    async def embed_tokens(self, inputs, rerank=False) -> list:
        """Token lists embedded on the embedding thread: unit vectors, or rerank scores."""
        job = EmbedJob(inputs, asyncio.get_running_loop(), rerank=rerank)
        self.engine.submit(job)
        try:
            _, ev = await job.events.get()
        finally:
            job.cancel()
        if ev[0] == "error":
            raise APIError(ev[1], ev[2], type="server_error" if ev[1] >= 500 else "invalid_request_error")
        return ev[1]

    async def embeddings(self, request):
        body = await read_json(request, self.max_body, self.body_timeout)
        self._check_model(body)
        fmt = body.get("encoding_format") or "float"
        if fmt not in ("float", "base64"):
            raise bad("'encoding_format' must be 'float' or 'base64'", "encoding_format")
        if body.get("dimensions") is not None:
            raise bad("'dimensions' is not supported", "dimensions")
        inputs, vectors = await self._embed(body)
        data = []
        for i, vec in enumerate(vectors):
            emb = (base64.b64encode(vec.astype("<f4").tobytes()).decode() if fmt == "base64"
                   else [float(x) for x in vec])
            data.append({"object": "embedding", "index": i, "embedding": emb})
        n = sum(len(x) for x in inputs)
        return self._json({"object": "list", "data": data, "model": self.model_id,
                           "usage": {"prompt_tokens": n, "total_tokens": n}})

    async def native_embeddings(self, request):
        """llama-server's /embedding(s): [{"index", "embedding": [vector]}] (pooled, unit length)."""
        body = await read_json(request, self.max_body, self.body_timeout)
        key = "content" if "content" in body else "input"
        _, vectors = await self._embed(body, key)
        return self._json([{"index": i, "embedding": [[float(x) for x in vec]]} for i, vec in enumerate(vectors)])

    def _model_card(self):
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "alpaca2",
                "aliases": sorted(self.model_names - {os.path.basename(self.model.path)}) or [self.model_id],
                "tags": list(self.tags),
                "meta": {"n_ctx_slot": self.engine.n_ctx_slot, "parallel": self.engine.parallel,
                         "n_vocab": self.model.n_vocab, "template": self.template.name, "desc": self.model.desc}}

    async def models(self, request):
        return self._json({"object": "list", "data": [self._model_card()]})

    async def model_info(self, request):
        name = request.path_params["model_id"]
        if name not in self.model_names:
            raise APIError(404, f"the model {name!r} does not exist", param="model", code="model_not_found")
        return self._json(self._model_card())
