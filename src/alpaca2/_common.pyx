# cython: language_level=3, embedsignature=True
# distutils: language = c++
"""alpaca2._common: llama.cpp's common library (common/chat.*, json-schema-to-grammar), as llama-server runs it.

* :func:`json_schema_to_grammar` turns a JSON schema into a GBNF grammar for ``Sampler(grammar=...)``.
* :class:`ChatFormatter` renders OpenAI-style messages and tools through the model's Jinja chat template
  (``apply``) and parses the model's answer back into an OpenAI assistant message with
  ``tool_calls`` and ``reasoning_content`` (``parse``, or a :class:`ChatStream` for streamed deltas).

The C++ work happens in alpaca2's shim (``_common_shim.cpp``) over llama.cpp's own functions: the
same code path as llama-server (``common_chat_templates_apply``, ``common_chat_parse``,
``common_chat_msg_diff::compute_diffs``), with the GIL released.
"""
from libcpp cimport bool as cbool
from libc.stdint cimport int32_t, uint32_t
from libcpp.string cimport string
from libcpp.vector cimport vector

from alpaca2._c.llama cimport llama_model
from alpaca2._c.common_shim cimport (
    STATUS_OK, STATUS_BAD_INPUT, STATUS_BAD_SCHEMA, STATUS_BAD_TEMPLATE, STATUS_BAD_OUTPUT,
    set_log_enabled, formatter, formatter_new, formatter_free, formatter_info, formatter_apply,
    chat_stream, stream_new, stream_free, stream_parse, stream_update, msg_diff,
)
from alpaca2._c cimport common_shim
from alpaca2._c cimport spec_shim
cimport alpaca2._core as core

import json
import os
import re
import threading
import uuid

from alpaca2.errors import Alpaca2Error, ClosedError, GrammarError


class ChatTemplateError(Alpaca2Error, ValueError):
    """A chat template that does not parse, or fails to render these messages."""


class ChatParseError(Alpaca2Error, ValueError):
    """The model's output does not match its chat template's format (e.g. a broken tool call)."""


# llama.cpp's common log (chat.cpp's LOG_ERR/LOG_WRN) stays quiet: failures arrive as exceptions.
set_log_enabled(False)


cdef str _check(int status, string & out):
    """The shim's result as text, or its error as the matching exception."""
    text = out.decode("utf-8", "replace")
    if status == STATUS_OK:
        return text
    if status == STATUS_BAD_INPUT:
        raise ValueError(text)
    if status == STATUS_BAD_SCHEMA:
        raise GrammarError(text)
    if status == STATUS_BAD_TEMPLATE:
        raise ChatTemplateError(text)
    if status == STATUS_BAD_OUTPUT:
        raise ChatParseError(text)
    raise RuntimeError(f"llama.cpp's common library failed: {text}")


cdef bytes _json_bytes(obj, str what):
    try:
        return json.dumps(obj, allow_nan=False).encode("ascii")
    except (TypeError, ValueError) as e:
        raise TypeError(f"{what} must be JSON-serializable: {e}") from None


def set_common_log(cbool enabled):
    """Let llama.cpp's common library print its own warnings and errors to stderr (off by default)."""
    set_log_enabled(enabled)


def json_schema_to_grammar(schema):
    """A GBNF grammar (text) that accepts exactly the JSON documents valid under ``schema``.

    ``schema`` is a dict or JSON text.  An empty schema ``{}`` means any JSON object, as in
    llama-server's ``json_schema`` field.  A schema that is not JSON, or that llama.cpp's converter
    cannot handle (unknown ``$ref``, bad ``pattern``...), raises :class:`alpaca2.GrammarError`.

    >>> grammar = json_schema_to_grammar({"type": "object", "properties": {"n": {"type": "integer"}}})
    >>> sampler = alpaca2.Sampler(grammar=grammar, model=model)
    """
    cdef string text
    if isinstance(schema, (str, bytes)):
        text = schema.encode("utf-8") if isinstance(schema, str) else schema
    elif isinstance(schema, dict):
        text = _json_bytes(schema, "schema")
    else:
        raise TypeError(f"schema must be a dict or JSON text, not {type(schema).__name__}")
    cdef string out
    cdef int status
    with nogil:
        status = common_shim.json_schema_to_grammar(text, out)
    return _check(status, out)


def chat_msg_diff(prev, new):
    """The OpenAI ``chat.completion.chunk`` deltas from assistant message ``prev`` to ``new``.

    llama.cpp's ``common_chat_msg_diff::compute_diffs``: content and reasoning_content grow by their
    new suffix; a tool call's arguments by theirs; new tool calls arrive whole (with their index).
    """
    cdef string a = _json_bytes(prev, "prev")
    cdef string b = _json_bytes(new, "new")
    cdef string out
    cdef int status
    with nogil:
        status = msg_diff(a, b, out)
    return json.loads(_check(status, out))


cdef class ChatFormatter:
    """A model's chat template, rendered and parsed by llama.cpp's common library (as llama-server does).

    ChatFormatter(model, template=None)

    ``template`` is Jinja source overriding the model's own (``tokenizer.chat_template`` in the GGUF;
    llama.cpp's chatml when it has none); the model gives the BOS/EOS strings and the vocabulary for
    the grammar triggers.  ``model=None`` needs a ``template`` and leaves token ids out of ``apply()``.

    Thread safety: one call at a time per formatter (an internal lock); the GIL is released while a
    template renders, so other Python threads run.  Streams (:meth:`stream`) are independent.
    The formatter keeps its model alive and is closed with it.
    """
    cdef formatter * ptr
    cdef readonly object model
    cdef object _lock
    cdef dict _info
    cdef object __weakref__

    def __cinit__(self):
        self.ptr = NULL

    def __init__(self, model=None, template=None):
        cdef const llama_model * mptr = NULL
        cdef string src
        cdef string error
        cdef int status = STATUS_OK
        if model is not None:
            if not isinstance(model, core.Model):
                raise TypeError(f"model must be an alpaca2.Model, not {type(model).__name__}")
            (<core.Model>model)._check()
            mptr = (<core.Model>model).ptr
        if template is not None:
            if not isinstance(template, str):
                raise TypeError("template must be Jinja source text (str)")
            if not template.strip():
                raise ChatTemplateError("the chat template is empty")
            src = template.encode("utf-8")
        elif model is None:
            raise ValueError("ChatFormatter needs a model or a template")
        with nogil:
            self.ptr = formatter_new(mptr, src, status, error)
        if self.ptr == NULL:
            _check(status if status != STATUS_OK else STATUS_BAD_TEMPLATE, error)
        self.model = model
        self._lock = threading.Lock()
        cdef string out
        status = formatter_info(self.ptr, out)
        self._info = json.loads(_check(status, out))
        if model is not None:
            (<core.Model>model)._dependents.add(self)

    def __dealloc__(self):
        if self.ptr != NULL:
            formatter_free(self.ptr)
            self.ptr = NULL

    def close(self):
        """Free the parsed templates.  Safe to call twice; called when the model closes."""
        if self._lock is None:
            return
        with self._lock:
            if self.ptr != NULL:
                formatter_free(self.ptr)
                self.ptr = NULL

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def closed(self):
        return self.ptr == NULL

    cdef int _check_open(self) except -1:
        if self.ptr == NULL:
            raise ClosedError("this ChatFormatter is closed")
        if self.model is not None:
            (<core.Model>self.model)._check()
        return 0

    @property
    def source(self):
        """The Jinja source of the default template."""
        return self._info["source"]

    @property
    def tool_use_source(self):
        """The Jinja source of the model's ``tool_use`` template variant ("" when it has none)."""
        return self._info["tool_use_source"]

    @property
    def caps(self):
        """What the template can do, as llama-server's /props reports it (supports_tools, ...)."""
        return dict(self._info["caps"])

    @property
    def supports_thinking(self):
        """Whether ``enable_thinking`` changes what this template renders."""
        return self._info["supports_thinking"]

    def apply(self, messages, *, tools=None, tool_choice="auto", parallel_tool_calls=None,
              add_generation_prompt=True, json_schema=None, grammar=None, enable_thinking=True,
              reasoning_format="deepseek", chat_template_kwargs=None, continue_final_message=None,
              prefill_assistant=True, tokenize=False):
        """Render ``messages`` (and ``tools``) into a prompt, with what sampling and parsing need.

        The arguments are llama-server's ``/v1/chat/completions`` fields: OpenAI ``messages``
        (including assistant ``tool_calls`` and ``role: "tool"`` results), ``tools`` (OpenAI
        function tools), ``tool_choice`` ("auto", "none", "required", or
        ``{"type": "function", "function": {"name": ...}}``, which keeps that tool only and
        requires a call), ``parallel_tool_calls`` (None: the template's own capability, as
        llama-server), ``json_schema`` (dict) or ``grammar`` (GBNF) for structured output,
        ``enable_thinking`` / ``reasoning_format`` ("deepseek", "auto", "none", "deepseek-legacy"),
        ``chat_template_kwargs``.  A trailing assistant message is continued (``prefill_assistant``).

        Returns a dict: ``prompt`` (text with the template's special tokens: tokenize it with
        ``parse_special=True``, as llama-server does), ``format``, ``grammar`` (GBNF, "" for none),
        ``grammar_lazy`` with ``lazy_patterns`` / ``lazy_tokens`` (its triggers as
        ``llama_sampler_init_grammar_lazy_patterns`` takes them) and ``grammar_triggers`` (as
        llama.cpp reports them), ``grammar_prefill_tokens`` (feed these to a non-lazy grammar
        first), ``preserved_tokens`` / ``preserved_token_ids``, ``additional_stops``,
        ``generation_prompt``, ``supports_thinking``, ``thinking_start_tag`` /
        ``thinking_end_tags``, and ``parser_state``: pass the whole dict as ``state=`` to
        :meth:`parse` or :meth:`stream`.

        ``tokenize=True`` (needs the model) adds ``prompt_tokens``: the prompt's token ids with the
        template's own markup parsed for special tokens and the message texts never (a user who
        types "<|im_end|>" gets those characters, not the control token).  llama-server parses
        the whole prompt; the ids are the same whenever no message text contains special-token text.

        Bad messages, tools or tool_choice raise ValueError; a bad ``json_schema``
        :class:`alpaca2.GrammarError`; a template that fails to render :class:`ChatTemplateError`.
        """
        if isinstance(tool_choice, dict):
            tools, tool_choice = _tools_for_choice(tools, tool_choice)
        elif not isinstance(tool_choice, str):
            raise TypeError("tool_choice must be 'auto', 'none', 'required' or a {'type': 'function', ...} dict")
        if grammar is not None and not isinstance(grammar, str):
            raise TypeError("grammar must be GBNF text")
        if json_schema is not None and not isinstance(json_schema, (dict, bool)):
            raise TypeError("json_schema must be a dict")
        request = {"messages": messages, "tool_choice": tool_choice,
                   "add_generation_prompt": bool(add_generation_prompt),
                   "enable_thinking": bool(enable_thinking), "reasoning_format": reasoning_format,
                   "prefill_assistant": bool(prefill_assistant)}
        if tools is not None:
            request["tools"] = tools
        if parallel_tool_calls is not None:
            request["parallel_tool_calls"] = bool(parallel_tool_calls)
        if json_schema is not None:
            request["json_schema"] = json_schema
        if grammar:
            request["grammar"] = grammar
        if chat_template_kwargs:
            request["chat_template_kwargs"] = dict(chat_template_kwargs)
        if continue_final_message is not None:
            request["continue_final_message"] = continue_final_message
        result = self._apply(request)
        if tokenize:
            if self.model is None:
                raise ValueError("tokenize=True needs the ChatFormatter's model")
            result["prompt_tokens"] = self._prompt_tokens(result, request)
        return result

    def _apply(self, dict request):
        cdef string req = _json_bytes(request, "the messages and tools")
        cdef string out
        cdef int status
        with self._lock:
            self._check_open()
            with nogil:
                status = formatter_apply(self.ptr, req, out)
        return json.loads(_check(status, out))

    def _prompt_tokens(self, dict result, dict request):
        model = self.model
        texts = []
        _message_texts(request["messages"], texts.append)
        if all(list(model.tokenize(t, add_bos=False, special=True)) == list(model.tokenize(t, add_bos=False, special=False))
               for t in texts):
            return list(model.tokenize(result["prompt"], add_bos=True, special=True))
        # render again with a placeholder for each text, then tokenize markup (special) and texts (plain) apart
        marks = {}

        def mask(text):
            mark = f"\x01{uuid.uuid4().hex}\x02"
            marks[mark] = text
            return mark

        masked = dict(request, messages=_message_texts(request["messages"], mask))
        ids = []
        first = True
        for part in re.split("(" + "|".join(map(re.escape, marks)) + ")", self._apply(masked)["prompt"]):
            if part in marks:
                ids += list(model.tokenize(marks[part], add_bos=first, special=False))
            elif part:
                ids += list(model.tokenize(part, add_bos=first, special=True))
            else:
                continue
            first = False
        return ids

    def parse(self, text, *, is_partial=False, state):
        """The OpenAI assistant message in the model's output ``text``.

        ``state`` is what :meth:`apply` returned for this request.  Returns ``{"role": "assistant",
        "content": ..., "reasoning_content": ... (when any), "tool_calls": [{"id", "type":
        "function", "function": {"name", "arguments"}}] (when any)}``; ``arguments`` is JSON text.
        ``is_partial=True`` parses a prefix while streaming (an unfinished tool call is left out or
        cut, never an error).  Output that does not match the format raises :class:`ChatParseError`.
        """
        return ChatStream(state).parse(text, is_partial=is_partial)

    def stream(self, state):
        """A :class:`ChatStream` for one streamed response to the request ``state`` came from."""
        return ChatStream(state, stream=True)

    def __repr__(self):
        if self.ptr == NULL:
            return "<alpaca2.ChatFormatter (closed)>"
        return f"<alpaca2.ChatFormatter caps={[k for k, v in self.caps.items() if v]}>"


def _message_texts(messages, fn):
    # calls fn on each text a user or tool wrote (content, text parts, reasoning); returns the messages
    # with each text replaced by fn's result
    if not isinstance(messages, list):
        return messages
    out = []
    for m in messages:
        if not isinstance(m, dict):
            out.append(m)
            continue
        m = dict(m)
        content = m.get("content")
        if isinstance(content, str) and content:
            m["content"] = fn(content)
        elif isinstance(content, list):
            m["content"] = [dict(p, text=fn(p["text"])) if isinstance(p, dict) and isinstance(p.get("text"), str)
                            and p["text"] else p for p in content]
        if isinstance(m.get("reasoning_content"), str) and m["reasoning_content"]:
            m["reasoning_content"] = fn(m["reasoning_content"])
        out.append(m)
    return out


def _tools_for_choice(tools, choice):
    # OpenAI's named tool choice: that function only, and a call is required
    fn = choice.get("function") if choice.get("type") == "function" else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str):
        raise ValueError(f"tool_choice must be 'auto', 'none', 'required' or "
                         f"{{'type': 'function', 'function': {{'name': ...}}}}, got {choice!r}")
    chosen = [t for t in (tools or []) if isinstance(t, dict) and (t.get("function") or {}).get("name") == name]
    if not chosen:
        raise ValueError(f"tool_choice names the function {name!r}, which is not in tools")
    return chosen, "required"


cdef class ChatStream:
    """The parse state of one response, as llama-server keeps it while streaming.

    ChatStream(state, stream=True)

    ``update(text)`` appends newly generated text and returns the OpenAI ``delta`` dicts since the
    last call (content, reasoning_content, and tool_calls with index/id/type/function pieces);
    ``finish()`` parses the end of the response (not partial) and returns the last deltas.
    Tool call ids stay the same from one update to the next.  One thread at a time.
    """
    cdef chat_stream * ptr
    cdef readonly dict message
    cdef object _lock

    def __cinit__(self):
        self.ptr = NULL

    def __init__(self, state, *, stream=False):
        if not isinstance(state, dict):
            raise TypeError("state must be the dict ChatFormatter.apply() returned")
        parser_state = dict(state.get("parser_state", state))
        parser_state["stream"] = bool(stream)
        cdef string st = _json_bytes(parser_state, "state")
        cdef string error
        cdef int status = STATUS_OK
        with nogil:
            self.ptr = stream_new(st, status, error)
        if self.ptr == NULL:
            _check(status if status != STATUS_OK else STATUS_BAD_INPUT, error)
        self.message = {"role": "assistant", "content": ""}
        self._lock = threading.Lock()

    def __dealloc__(self):
        if self.ptr != NULL:
            stream_free(self.ptr)
            self.ptr = NULL

    def parse(self, text, *, is_partial=False):
        """Parse ``text`` on its own (this stream's text so far is not touched)."""
        cdef string t = _text_bytes(text)
        cdef string out
        cdef int status
        cdef cbool partial = is_partial
        with self._lock:
            with nogil:
                status = stream_parse(self.ptr, t, partial, out)
        return json.loads(_check(status, out))

    def update(self, text, *, is_partial=True):
        """Append ``text`` to the response and return the new OpenAI deltas (a list of dicts)."""
        cdef string t = _text_bytes(text)
        cdef string out
        cdef int status
        cdef cbool partial = is_partial
        with self._lock:
            with nogil:
                status = stream_update(self.ptr, t, partial, out)
            res = json.loads(_check(status, out))
            self.message = res["message"]
        return res["deltas"]

    def finish(self, text=""):
        """Append the last ``text`` and parse the whole response as complete: the final deltas."""
        return self.update(text, is_partial=False)


cdef bytes _text_bytes(text):
    if isinstance(text, str):
        return (<str>text).encode("utf-8")
    if isinstance(text, bytes):
        return text
    raise TypeError(f"text must be str, not {type(text).__name__}")


include "_common_spec.pxi"
