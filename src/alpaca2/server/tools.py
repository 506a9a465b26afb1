"""Chat through a Jinja template, as llama-server with --jinja: tools, tool_choice,
parallel_tool_calls, reasoning_format, enable_thinking and chat_template_kwargs go to llama.cpp's
common chat library (alpaca2._common.ChatFormatter), which renders the prompt and says how to
constrain and parse the answer; generation follows the template's grammar (a lazy one starts at
the template's trigger), and the output is parsed into an assistant message with ``tool_calls``
and ``reasoning_content`` (streamed as OpenAI deltas).  Mixed into alpaca2.server.app.Server.
"""
from __future__ import annotations

import asyncio
import json

from alpaca2._core import Sampler, SamplerChain
from alpaca2.errors import Alpaca2Error
from alpaca2.server.reasoning_budget import ReasoningBudget, budget_fields, control_of, with_budget
from alpaca2.server.sse import event_stream
from alpaca2.server.validation import bad, check_text

TOOL_CHOICES = ("auto", "none", "required")
REASONING_FORMATS = ("none", "auto", "deepseek", "deepseek-legacy")
ROLES = ("system", "user", "assistant", "tool")


def _check_strings(value, field):
    """NUL in any string of a message (contents, tool-call arguments) is refused (see check_text)."""
    if isinstance(value, str):
        check_text(value, field)
    elif isinstance(value, dict):
        for v in value.values():
            _check_strings(v, field)
    elif isinstance(value, list):
        for v in value:
            _check_strings(v, field)


def lazy_grammar_sampler(model, p: dict, grammar: dict) -> SamplerChain:
    """The Sampler's chain with a lazy grammar stage before the truncation stages: free text until
    a trigger (a pattern or a token) appears, then the grammar (as llama.cpp's common sampler)."""
    chain = SamplerChain()
    if p.get("logit_bias"):
        chain.add("logit_bias", model, p["logit_bias"])
    if p["repeat_penalty"] != 1.0 or p["frequency_penalty"] != 0.0 or p["presence_penalty"] != 0.0:
        chain.add("penalties", p["penalty_last_n"], p["repeat_penalty"], p["frequency_penalty"],
                  p["presence_penalty"])
    chain.add("grammar_lazy", model, grammar["gbnf"], patterns=grammar["patterns"], tokens=grammar["tokens"])
    if p["temp"] <= 0:
        return chain.add("greedy")
    if p.get("mirostat") == 1:
        return chain.add("temp", p["temp"]).add("mirostat", model, seed=p["seed"])
    if p.get("mirostat") == 2:
        return chain.add("temp", p["temp"]).add("mirostat_v2", seed=p["seed"])
    if p["top_k"] > 0:
        chain.add("top_k", p["top_k"])
    if p.get("typical_p", 1.0) < 1.0:
        chain.add("typical", p["typical_p"], 0)
    if p["top_p"] < 1.0:
        chain.add("top_p", p["top_p"], 0)
    if p["min_p"] > 0.0:
        chain.add("min_p", p["min_p"], 0)
    return chain.add("temp", p["temp"]).add("dist", seed=p["seed"])


def grammar_sampler(model, p: dict, grammar: dict):
    """A sampler under the template's grammar (None: no grammar, the plain Sampler)."""
    if grammar is None:
        return Sampler(model=model, **p)
    if grammar["lazy"]:
        if not grammar["patterns"] and not grammar["tokens"]:
            return Sampler(model=model, **p)        # a lazy grammar with no trigger never starts
        return lazy_grammar_sampler(model, p, grammar)
    sampler = Sampler(model=model, **dict(p, grammar=grammar["gbnf"]))
    for tok in grammar["prefill"]:       # the generation prompt's tail, as common_sampler_init feeds it
        sampler.accept(tok)
    return sampler


def check_continuation(body):
    """As llama-server (with or without --jinja): continuing the last message and adding a
    generation prompt exclude each other."""
    if body.get("continue_final_message") not in (None, False) and body.get("add_generation_prompt", True):
        raise bad("Cannot set both add_generation_prompt and continue_final_message to true.",
                  "continue_final_message")


class ToolChat:
    """/v1/chat/completions through the Jinja formatter (a mixin of Server)."""

    def uses_formatter(self, body) -> bool:
        """Whether this chat request renders through the Jinja formatter: every chat when the
        server's template is the Jinja one, else requests that want tools."""
        if self.formatter is None:
            return False
        if getattr(self.template, "formatter", None) is not None:
            return True
        tools = body.get("tools")
        return bool(tools) and body.get("tool_choice", "auto") != "none"

    def check_no_tools(self, body):
        """Without a Jinja template, as llama-server without --jinja: tools are refused (tool_choice
        "none" keeps alpaca2's older leniency: the tools are ignored)."""
        tools = body.get("tools") or body.get("functions")
        choice = body.get("tool_choice") or "auto"          # null: the default, as llama-server
        if tools and choice != "none":
            raise bad(f"tools param requires --jinja flag (this server formats chats with the {self.template.name} "
                      "template; start it with --jinja and a model or --chat-template-file that has a Jinja "
                      "template)", "tools")
        if choice not in ("auto", "none"):
            raise bad("tool_choice param requires --jinja flag", "tool_choice")
        check_continuation(body)

    def formatter_messages(self, body, allow_empty=False) -> list:
        """OpenAI messages as the formatter takes them (tool_calls and role "tool" included)."""
        messages = body.get("messages")
        if not isinstance(messages, list) or not (messages or allow_empty):
            raise bad("'messages' must be a non-empty list", "messages")
        out = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise bad(f"messages[{i}] must be an object", "messages")
            role = "system" if m.get("role") == "developer" else m.get("role")
            if role not in ROLES:
                raise bad(f"messages[{i}]: role must be system, developer, user, assistant or tool, got "
                          f"{m.get('role')!r}", "messages")
            m = dict(m, role=role)
            content = m.get("content")
            if isinstance(content, list):     # text parts only; joined by the formatter, as llama-server's
                for part in content:
                    if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                        raise bad(f"messages[{i}]: only text content parts are supported", "messages")
            elif content is not None and not isinstance(content, str):
                raise bad(f"messages[{i}]: content must be a string or a list of text parts", "messages")
            _check_strings(m, "messages")
            out.append(m)
        return out

    def _formatter_options(self, body) -> dict:
        """apply()'s keyword arguments from the request, checked (llama-server's field names)."""
        tools = body.get("tools")
        if tools is not None and not isinstance(tools, list):
            raise bad("'tools' must be a list of function tools", "tools")
        choice = body.get("tool_choice")
        choice = "auto" if choice is None else choice       # null: the default, as llama-server
        if isinstance(choice, str):
            if choice not in TOOL_CHOICES:
                raise bad(f"'tool_choice' must be auto, none, required or a named function, got {choice!r}",
                          "tool_choice")
        elif not isinstance(choice, dict):
            raise bad("'tool_choice' must be auto, none, required or {\"type\": \"function\", ...}", "tool_choice")
        parallel = body.get("parallel_tool_calls")
        if parallel is not None and not isinstance(parallel, bool):
            raise bad("'parallel_tool_calls' must be true or false", "parallel_tool_calls")
        reasoning = body.get("reasoning_format", self.reasoning_format)
        if reasoning not in REASONING_FORMATS:
            raise bad(f"'reasoning_format' must be one of {', '.join(REASONING_FORMATS)}", "reasoning_format")
        kwargs = dict(self.chat_template_kwargs)
        extra = body.get("chat_template_kwargs")
        if extra is not None:
            if not isinstance(extra, dict):
                raise bad("'chat_template_kwargs' must be an object", "chat_template_kwargs")
            kwargs.update(extra)
        thinking = self.enable_thinking
        if "enable_thinking" in kwargs:
            if not isinstance(kwargs["enable_thinking"], bool):
                raise bad('invalid type for "enable_thinking" (expected boolean)', "chat_template_kwargs")
            thinking = kwargs["enable_thinking"]
        effort = body.get("reasoning_effort")
        if effort == "none":
            thinking = False
            kwargs.pop("reasoning_effort", None)
        elif isinstance(effort, str) and effort:
            kwargs["reasoning_effort"] = effort
        add_gen = body.get("add_generation_prompt", True)
        if not isinstance(add_gen, bool):
            raise bad("'add_generation_prompt' must be true or false", "add_generation_prompt")
        check_continuation(body)
        schema = self._json_schema_of(body)
        if schema == {}:
            schema = {"type": "object"}         # as llama-server: an empty schema means any object
        grammar = body.get("grammar")
        if grammar is not None and not isinstance(grammar, str):
            raise bad("'grammar' must be a GBNF grammar (a string)", "grammar")
        out = dict(tools=tools or None, tool_choice=choice, parallel_tool_calls=parallel, reasoning_format=reasoning,
                   enable_thinking=thinking, chat_template_kwargs=kwargs or None, add_generation_prompt=add_gen,
                   json_schema=schema, grammar=grammar or None)
        if "continue_final_message" in body:
            out["continue_final_message"] = body["continue_final_message"]
        return out

    async def render(self, body, allow_empty=False) -> dict:
        """The formatter's answer for this request (prompt_tokens, grammar, parser state ...)."""
        messages = self.formatter_messages(body, allow_empty)
        options = self._formatter_options(body)
        try:     # in a worker thread: a long conversation must not hold up the other clients' streams
            return await asyncio.to_thread(self.formatter.apply, messages, tokenize=True, **options)
        except Alpaca2Error as e:
            if "grammar" in type(e).__name__.lower():
                raise bad(f"the JSON schema cannot be turned into a grammar: {e}", "response_format") from None
            raise bad(f"cannot format these messages: {e}", "messages") from None
        except (ValueError, TypeError, RuntimeError) as e:
            raise bad(str(e), "tools" if body.get("tools") else "messages") from None

    def formatter_jobs(self, body, res, n, n_probs):
        """Jobs for a rendered request: the template's grammar, stops and preserved tokens, and the
        thinking budget (alpaca2.server.reasoning_budget) where the template has thinking tags."""
        budget, message = budget_fields(body, self.reasoning_budget, self.reasoning_budget_message)
        control = control_of(body)
        grammar = None
        if res["grammar"]:
            grammar = {"gbnf": res["grammar"], "lazy": res["grammar_lazy"], "patterns": res["lazy_patterns"],
                       "tokens": res["lazy_tokens"], "prefill": res["grammar_prefill_tokens"]}
        fields = body
        if grammar is not None:    # the template's grammar covers the request's; without one the request's own applies
            fields = {k: v for k, v in body.items() if k not in ("grammar", "json_schema", "response_format")}
        jobs = self.jobs_for(fields, res["prompt_tokens"], False, n=n, n_probs=n_probs, template_grammar=grammar,
                             extra_stop=res["additional_stops"], preserved=res["preserved_token_ids"])
        for job in jobs:
            sampler = with_budget(self.model, job.sampler, res, budget, message, control)
            if sampler is not job.sampler:
                job.sampler = sampler
                job.speculate = False       # drafts would be verified without the budget's forcing
        return jobs

    def parse_answer(self, res, text, finish) -> dict:
        """The assistant message in the answer's text (tool calls, reasoning); text as it is when
        the output does not parse (a length cut mid-call is parsed as partial)."""
        try:
            msg = self.formatter.parse(text, is_partial=finish == "length", state=res)
        except (ValueError, Alpaca2Error):
            msg = {"role": "assistant", "content": text}
        msg.setdefault("content", None if msg.get("tool_calls") else "")
        return msg

    @staticmethod
    def finish_of(finish, msg) -> str:
        return "tool_calls" if finish == "stop" and msg.get("tool_calls") else finish

    async def formatter_chat(self, request, body):
        from alpaca2.server.openai_api import chat_logprobs, sse
        res = await self.render(body)
        n = self._n_choices(body)
        stream, include_usage = self._stream_flags(body)
        jobs = self.formatter_jobs(body, res, n, self._logprobs_n(body, chat=True))
        head = self.chat_head(jobs, stream)
        want_probs = jobs[0].n_probs > 0
        self.submit(jobs)
        self.live_completions[head["id"]] = jobs        # for /v1/chat/completions/control
        if not stream:
            try:
                results = await self.collect(request, jobs)
            finally:
                self.live_completions.pop(head["id"], None)
            if results is None:
                from starlette.responses import Response
                return Response(status_code=499)
            choices = []
            for i, r in enumerate(results):
                msg = self.parse_answer(res, r["text"], r["finish"])
                choices.append({"index": i, "message": msg, "finish_reason": self.finish_of(r["finish"], msg),
                                "logprobs": chat_logprobs(r["probs"]) if want_probs else None})
            out = dict(head, choices=choices, usage=self._usage(jobs), timings=jobs[0].timings)
            if body.get("verbose") is True or self.verbose:     # llama-server's debug field (-v)
                out["__verbose"] = {"prompt": self.model.detokenize(jobs[0].tokens, special=True)}
            return self._json(out)

        parsers = {job.index: self.formatter.stream(res) for job in jobs}
        texts = {job.index: [] for job in jobs}

        def chunk(index, delta, finish=None, probs=None):
            lp = chat_logprobs(probs) if want_probs and probs else None
            return sse(dict(head, choices=[{"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}]))

        async def events():       # (the id leaves live_completions when the stream ends, however)
            try:
                for job in jobs:
                    yield chunk(job.index, {"role": "assistant", "content": None})
                async for index, ev in self.events_of(jobs):
                    if ev[0] == "text":
                        texts[index].append(ev[1])
                        try:
                            deltas = parsers[index].update(ev[1]) if ev[1] else []
                        except (ValueError, Alpaca2Error):
                            deltas = [{"content": ev[1]}]
                        probs = ev[3] if want_probs else None
                        for d in deltas or ([{}] if probs else []):
                            yield chunk(index, d, probs=probs)
                            probs = None
                    elif ev[0] == "end":
                        try:
                            deltas = parsers[index].finish()
                            msg = parsers[index].message
                        except (ValueError, Alpaca2Error):
                            deltas, msg = [], {}
                        for d in deltas:
                            yield chunk(index, d)
                        yield chunk(index, {}, finish=self.finish_of(ev[1], msg))
                    else:
                        yield sse(self.error_of(ev).body())
                        return
                if include_usage:
                    yield sse(dict(head, choices=[], usage=self._usage(jobs), timings=jobs[0].timings))
                yield "data: [DONE]\n\n"
            finally:
                self.live_completions.pop(head["id"], None)

        return event_stream(events(), headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def chat_control(self, request):
        """llama-server's POST /v1/chat/completions/control {"id", "action": "reasoning_end"}: end a
        live completion's thinking now (it must have asked for reasoning_control)."""
        from alpaca2.server.validation import read_json
        body = await read_json(request, self.max_body, self.body_timeout)
        cmpl_id, action = body.get("id"), body.get("action")
        if not isinstance(cmpl_id, str) or not cmpl_id:
            raise bad("missing completion id", "id")
        if action != "reasoning_end":
            raise bad("unknown control action", "action")
        jobs = self.live_completions.get(cmpl_id)
        if jobs is None:
            return self._json({"success": False, "message": "no active completion for this id"})
        budgets = [job.sampler for job in jobs if isinstance(job.sampler, ReasoningBudget)]
        if not budgets:
            return self._json({"success": False, "message": "reasoning control not enabled for this completion"})
        for b in budgets:
            b.force()
        return self._json({"success": True})

    def chat_head(self, jobs, stream) -> dict:
        import time
        import uuid
        return {"id": "chatcmpl-" + uuid.uuid4().hex, "object": "chat.completion.chunk" if stream else "chat.completion",
                "created": int(time.time()), "model": self.model_id, "system_fingerprint": self.system_fingerprint}


def tool_calls_json(msg) -> list:
    """The message's tool calls with their arguments decoded (for the Anthropic endpoint)."""
    out = []
    for tc in msg.get("tool_calls") or []:
        fn = tc.get("function", {})
        try:
            args = json.loads(fn.get("arguments") or "{}")
        except ValueError:
            args = {}
        out.append({"id": tc.get("id") or "", "name": fn.get("name", ""), "input": args})
    return out

