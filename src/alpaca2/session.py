"""Multi-turn chat: ``ChatSession`` keeps the history, reuses the KV cache, and saves/loads itself.

    >>> session = alpaca2.ChatSession(llm)
    >>> for piece in session.send("你好"):
    ...     print(piece, end="", flush=True)
    >>> session.save("chat.json"); session = alpaca2.ChatSession.load(llm, "chat.json")

The sampler lives as long as the conversation, as llama-cli's does: it has seen every token of
the conversation (each turn's prompt tokens, then the answer's), so repeat penalties reach back
into the question and the earlier turns, and a seeded conversation draws one random sequence.
"""
from __future__ import annotations

import json
import math
import os
import stat
from typing import Sequence

from alpaca2._files import write_atomically
from alpaca2.errors import ContextFullError, StateError
from alpaca2.llm import Llama
from alpaca2.sampling import SAMPLING_KEYS
from alpaca2.templates import DEFAULT_SYSTEM_PROMPT

SESSION_FORMAT = "alpaca2.ChatSession/1"
MAX_SESSION_BYTES = 256 * 1024 * 1024     # a session's JSON is text; larger is not one of ours


class ChatSession:
    """A multi-turn conversation that keeps its history and reuses the KV cache.

    Turn N decodes only its new tokens: the answers' generated token ids are kept with the
    history, so the next prompt starts with exactly what the cache holds.  When the history no
    longer fits (prompt + max_tokens > n_ctx), the oldest turns are dropped, the system prompt
    kept, and the conversation after the system prompt is decoded again (the system prompt's
    tokens stay in the cache).
    """

    def __init__(self, llm: Llama, system: str | None = DEFAULT_SYSTEM_PROMPT, *, max_tokens: int = 512,
                 stop: Sequence[str] = (), **sampling):
        self.llm = llm
        self.system = system
        self.max_tokens = max_tokens
        self.stop = list(stop)
        self.sampling = sampling
        self._history: list[dict] = []        # user/assistant messages (assistant ones keep "tokens")
        self.dropped_turns = 0
        self.last_stats: dict = {}
        self._sampler = None                  # kept across turns (llama-cli's one sampler) ...
        self._sampler_params: dict | None = None
        self._sampler_seen: list[int] = []    # ... with every token it has accepted, in order

    @property
    def messages(self) -> list[dict]:
        """The conversation as OpenAI-style messages (system first when set)."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + [{"role": m["role"], "content": m["content"]} for m in self._history]

    def _full(self, history):
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + history

    def reset(self, system: str | None = ...):
        """Forget the conversation (optionally with a new system prompt)."""
        if system is not ...:
            self.system = system
        self._history = []
        self.dropped_turns = 0
        self._sampler = None

    def send(self, text: str, stream: bool = True, max_tokens: int | None = None, **sampling):
        """Add a user message and answer it: an iterator of text pieces, or the text (stream=False)."""
        if not isinstance(text, str):
            raise TypeError("text must be a str")
        gen = self._send(text, self.max_tokens if max_tokens is None else max_tokens, {**self.sampling, **sampling})
        return gen if stream else "".join(gen)

    def _send(self, text, max_tokens, sampling):
        llm = self.llm
        template = llm.template
        history = self._history + [{"role": "user", "content": text}]
        ids = template.tokenize_messages(llm.model, self._full(history))
        dropped = 0
        while len(ids) + max_tokens > llm.n_ctx and len(history) > 1:
            # drop the oldest user/assistant pair; the system prompt stays
            cut = 2 if len(history) > 2 and history[1]["role"] == "assistant" else 1
            history = history[cut:]
            dropped += 1
            ids = template.tokenize_messages(llm.model, self._full(history))
        if len(ids) >= llm.n_ctx:
            raise ContextFullError(f"the message needs {len(ids)} tokens; the context holds {llm.n_ctx}")
        budget = min(max_tokens, llm.n_ctx - len(ids))
        sampler = self._sampler_for(ids, sampling)
        answer = {"role": "assistant", "content": "", "tokens": []}
        pieces = []
        llm.last_stats = {}                   # an error before generation leaves no stale tokens behind
        try:
            for piece, _ in llm._generate(ids, budget, self.stop, sampling, template.strip_leading_space,
                                          sampler=sampler):
                pieces.append(piece)
                yield piece
        finally:
            # also after Ctrl+C or an abandoned iterator: the partial answer joins the history
            stats = dict(llm.last_stats)
            self._sampler_seen = ids + stats.get("sampled", [])
            answer["content"] = "".join(pieces)
            answer["tokens"] = stats.get("tokens", [])
            self._history = history + [answer]
            self.dropped_turns += dropped
            stats["dropped_turns"] = dropped
            self.last_stats = stats

    def _sampler_for(self, ids: list[int], sampling: dict):
        """The conversation's sampler, brought up to date with this turn's prompt.

        It carries on (its penalty history and random sequence continue, as llama-cli's) while it
        has seen a prefix of ``ids``; a changed setting, dropped turns or a reset start a new one
        that accepts the whole prompt.  Speculative decoding accepts drafted tokens the answer may
        not keep, so there each turn starts a new one."""
        llm = self.llm
        seen = self._sampler_seen
        if (self._sampler is None or self._sampler_params != sampling or llm.speculator is not None
                or len(seen) > len(ids) or ids[:len(seen)] != seen):
            self._sampler = None                 # a bad setting must not leave the old one behind
            self._sampler = llm.make_sampler(ids, **sampling)
            self._sampler_params = dict(sampling)
        elif len(ids) > len(seen):
            self._sampler.accept_many(ids[len(seen):], grammar=False)
        self._sampler_seen = list(ids)
        return self._sampler

    # -- persistence -------------------------------------------------------------------------------
    def save(self, path, include_state: bool = False):
        """Write the session as JSON (atomically); with include_state, also the KV cache next to it."""
        path = os.fspath(path)
        data = {"format": "alpaca2.ChatSession/1", "system": self.system, "max_tokens": self.max_tokens,
                "stop": self.stop, "sampling": self.sampling, "history": self._history,
                "state_file": None}
        if include_state:
            state_path = path + ".kv"
            self.llm.ctx.save_state_file(state_path, self.llm._tokens)
            data["state_file"] = os.path.basename(state_path)
        # temp file + fsync + rename: a crash mid-save leaves the old session or the new one
        write_atomically(path, json.dumps(data, ensure_ascii=False, indent=1))

    @classmethod
    def load(cls, llm: Llama, path) -> "ChatSession":
        """Read a session written by save(); restores the KV cache too when it was saved.

        A file that is not such a session (not JSON, wrong fields, not a regular file) raises
        StateError (an Alpaca2Error and OSError) saying what is wrong."""
        path = os.fspath(path)
        data = _read_session_json(path)
        try:
            system, max_tokens, stop, sampling, history, state_file = _check_session(data, llm)
            s = cls(llm, system, max_tokens=max_tokens, stop=stop, **sampling)
            llm.make_sampler(**sampling)                     # the settings must make a sampler
        except (TypeError, ValueError) as e:
            raise StateError(f"{path}: not a usable alpaca2 chat session: {e}") from None
        s._history = history
        if state_file:
            state = os.path.join(os.path.dirname(path), state_file)
            llm._tokens = llm.ctx.load_state_file(state)
        return s


def _read_session_json(path: str):
    """The parsed JSON of a session file; StateError for anything that is not one (a FIFO or a
    device is refused without blocking: opened non-blocking, checked with fstat)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise StateError(f"cannot open chat session {path}: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise StateError(f"{path} is not a regular file (a chat session is a JSON file)")
        if st.st_size > MAX_SESSION_BYTES:
            raise StateError(f"{path} is {st.st_size} bytes: too large to be an alpaca2 chat session")
        with os.fdopen(fd, "rb") as f:
            fd = -1
            raw = f.read(MAX_SESSION_BYTES + 1)
    except OSError as e:
        if isinstance(e, StateError):
            raise
        raise StateError(f"cannot read chat session {path}: {e.strerror or e}") from None
    finally:
        if fd >= 0:
            os.close(fd)
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise StateError(f"{path} is not an alpaca2 chat session file (not JSON: {type(e).__name__})") from None


def _check_session(data, llm):
    """The fields of a session's JSON, type- and range-checked; ValueError/TypeError says what is wrong."""
    if not isinstance(data, dict) or data.get("format") != SESSION_FORMAT:
        raise ValueError(f"it has no \"format\": \"{SESSION_FORMAT}\"")
    system = data.get("system")
    if system is not None and not isinstance(system, str):
        raise TypeError("\"system\" must be a string or null")
    max_tokens = data.get("max_tokens", 512)
    if type(max_tokens) is not int or max_tokens < 0:
        raise ValueError("\"max_tokens\" must be an integer >= 0")
    stop = data.get("stop", [])
    if not isinstance(stop, list) or not all(isinstance(x, str) for x in stop):
        raise TypeError("\"stop\" must be a list of strings")
    sampling = data.get("sampling", {})
    if not isinstance(sampling, dict):
        raise TypeError("\"sampling\" must be an object")
    unknown = set(sampling) - set(SAMPLING_KEYS)
    if unknown:
        raise ValueError(f"unknown sampling settings {sorted(unknown)}")
    for k, v in sampling.items():
        if k in ("grammar",):
            if v is not None and not isinstance(v, str):
                raise TypeError("\"grammar\" must be GBNF text or null")
        elif k == "logit_bias":
            if v is not None and not isinstance(v, dict):
                raise TypeError("\"logit_bias\" must be an object")
        elif v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                                or (isinstance(v, float) and not math.isfinite(v))):
            raise TypeError(f"sampling setting {k!r} must be a number")
    history = data.get("history", [])
    if not isinstance(history, list):
        raise TypeError("\"history\" must be a list of messages")
    n_vocab = llm.model.n_vocab
    out = []
    for i, m in enumerate(history):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant") \
                or not isinstance(m.get("content"), str):
            raise ValueError(f"history[{i}] must be {{\"role\": \"user\"|\"assistant\", \"content\": str}}")
        msg = {"role": m["role"], "content": m["content"]}
        if m["role"] == "assistant":
            toks = m.get("tokens")
            if toks is not None:
                if not isinstance(toks, list) or not all(type(t) is int and 0 <= t < n_vocab for t in toks):
                    raise ValueError(f"history[{i}][\"tokens\"] must be token ids of this model (0..{n_vocab - 1})")
                msg["tokens"] = list(toks)
        out.append(msg)
    state_file = data.get("state_file")
    if state_file is not None and (not isinstance(state_file, str) or not state_file
                                   or os.path.basename(state_file) != state_file):
        raise ValueError("\"state_file\" must be a file name next to the session file")
    return system, max_tokens, stop, sampling, out, state_file
