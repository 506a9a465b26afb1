"""Chat templates: how a list of {"role", "content"} messages becomes a prompt's token ids.

- Alpaca2Template: the Llama-2-chat format as Chinese-Alpaca-2's authors build it (BOS/EOS as
  token ids; user text never becomes control tokens), default system prompt included.
- ModelTemplate: the model's own ``tokenizer.chat_template`` through llama.cpp's built-in
  (non-Jinja) template support (llama-server's --no-jinja).
- JinjaTemplate: a Jinja chat template through llama.cpp's common chat library (llama-server's
  --jinja, its default): tools, tool calls and reasoning as llama-server renders them.
- CompletionTemplate: base models, plain continuation.
- choose_template: pick one for a model ("auto").
"""
from __future__ import annotations

import re
import uuid
from typing import Sequence

from alpaca2._core import Model, chat_apply_template

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant. 你是一个乐于助人的助手。"



class Template:
    """How a list of {"role", "content"} messages becomes the prompt's token ids."""
    name = "template"
    strip_leading_space = False   # answers follow "[/INST]" + " ": the model's first piece carries it

    def format_messages(self, messages: Sequence[dict]) -> str:  # pragma: no cover - interface
        raise NotImplementedError

    def tokenize_messages(self, model: Model, messages: Sequence[dict],
                          add_generation_prompt: bool = True) -> list[int]:  # pragma: no cover
        raise NotImplementedError


def _check_messages(messages):
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise ValueError(f"each message must be a dict with role system/user/assistant, got {m!r}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"message content must be a str, got {type(m.get('content')).__name__}")


class Alpaca2Template(Template):
    """The Llama-2-chat format, exactly as Chinese-Alpaca-2's authors build it.

    BOS + "[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{q1} [/INST]", each answer " {a}" + EOS, each
    later turn BOS + "[INST] {q} [/INST]".  BOS and EOS are token ids; every piece of text is
    tokenized with special=False, so a user who types "</s><s>[INST]" gets those characters.
    """
    name = "alpaca2"
    strip_leading_space = True

    def __init__(self, default_system: str | None = DEFAULT_SYSTEM_PROMPT):
        self.default_system = default_system

    def _turns(self, messages):
        """(system, [(user, assistant-message-or-None), ...]) from the messages."""
        _check_messages(messages)
        system = self.default_system
        rest = list(messages)
        if rest and rest[0]["role"] == "system":
            system = rest.pop(0)["content"]
        turns = []
        for m in rest:
            if m["role"] == "user":
                turns.append([m["content"], None])
            elif m["role"] == "assistant":
                if not turns or turns[-1][1] is not None:
                    raise ValueError("an assistant message must follow a user message")
                turns[-1][1] = m
            else:
                raise ValueError("a system message may only come first")
        return system, turns

    def _inst(self, question, system, first):
        if first and system:
            return f"[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{question} [/INST]"
        return f"[INST] {question} [/INST]"

    def format_messages(self, messages):
        """The prompt as text, BOS/EOS shown as <s> and </s> (for display only)."""
        system, turns = self._turns(messages)
        out = []
        for i, (q, a) in enumerate(turns):
            out.append("<s>" + self._inst(q, system, i == 0))
            if a is not None:
                out.append(f" {a['content']}</s>")
        return "".join(out)

    def tokenize_messages(self, model, messages, add_generation_prompt=True):
        """Token ids of the conversation.  An assistant message may carry "tokens" (the ids the
        model generated); they are used as they are, so a session's KV cache stays reusable."""
        system, turns = self._turns(messages)
        bos, eos = model.bos, model.eos
        ids: list[int] = []
        for i, (q, a) in enumerate(turns):
            ids.append(bos)
            ids += model.tokenize(self._inst(q, system, i == 0), add_bos=False, special=False)
            if a is not None:
                toks = a.get("tokens")
                ids += list(toks) if toks is not None else model.tokenize(a["content"], add_bos=False, special=False)
                ids.append(eos)
        return ids


class ModelTemplate(Template):
    """The model's own tokenizer.chat_template, through llama.cpp's built-in template support.

    The template's own markup may contain special tokens; message contents never do: when a
    content would tokenize differently with special parsing, the contents are tokenized apart.
    """
    name = "model"

    def __init__(self, template: str):
        self.template = template

    def format_messages(self, messages, add_generation_prompt=True):
        _check_messages(messages)
        return chat_apply_template(self.template, messages, add_generation_prompt)

    def tokenize_messages(self, model, messages, add_generation_prompt=True):
        _check_messages(messages)
        contents = [m["content"] for m in messages]
        safe = all(model.tokenize(c, add_bos=False, special=True) == model.tokenize(c, add_bos=False, special=False)
                   for c in contents)
        if safe:
            text = self.format_messages(messages, add_generation_prompt)
            return model.tokenize(text, add_bos=True, special=True)
        # render with placeholders, then tokenize markup (special) and contents (plain) apart
        marks = [f"\x01{uuid.uuid4().hex}\x02" for _ in messages]
        masked = [dict(m, content=mark) for m, mark in zip(messages, marks)]
        text = chat_apply_template(self.template, masked, add_generation_prompt)
        ids: list[int] = []
        first = True
        for part in re.split("(" + "|".join(map(re.escape, marks)) + ")", text):
            if not part:
                continue
            if part in marks:
                ids += model.tokenize(contents[marks.index(part)], add_bos=False, special=False)
            else:
                ids += model.tokenize(part, add_bos=first, special=True)
            first = False
        return ids


class JinjaTemplate(Template):
    """A Jinja chat template rendered by llama.cpp's common chat library (alpaca2._common.ChatFormatter),
    the code llama-server runs with --jinja.  The template's markup may hold special tokens; message
    texts never become them (ChatFormatter.apply(tokenize=True))."""
    name = "jinja"

    def __init__(self, formatter):
        self.formatter = formatter
        self.template = formatter.source

    def format_messages(self, messages, add_generation_prompt=True):
        _check_messages(messages)
        return self.formatter.apply(list(messages), add_generation_prompt=add_generation_prompt)["prompt"]

    def tokenize_messages(self, model, messages, add_generation_prompt=True):
        _check_messages(messages)
        res = self.formatter.apply(list(messages), add_generation_prompt=add_generation_prompt, tokenize=True)
        return res["prompt_tokens"]


class CompletionTemplate(Template):
    """Plain text continuation (base models): the contents one after another, a newline between."""
    name = "completion"

    def format_messages(self, messages):
        _check_messages(messages)
        return "\n".join(m["content"] for m in messages)

    def tokenize_messages(self, model, messages, add_generation_prompt=True):
        return model.tokenize(self.format_messages(messages), add_bos=True, special=False)


def choose_template(model: Model, template="auto") -> Template:
    """'alpaca2', 'model', 'completion', a Template, or 'auto': Alpaca/chat models chat with the
    Alpaca-2 format, models with their own chat template use it, base models complete."""
    if isinstance(template, Template):
        return template
    if template == "alpaca2":
        return Alpaca2Template()
    if template == "completion":
        return CompletionTemplate()
    if template == "model":
        if not model.chat_template:
            raise ValueError("this model has no tokenizer.chat_template")
        return ModelTemplate(model.chat_template)
    if template != "auto":
        raise ValueError(f"template must be 'auto', 'alpaca2', 'model', 'completion' or a Template, got {template!r}")
    md = model.metadata
    name = (md.get("general.name", "") + " " + md.get("general.basename", "") + " " +
            md.get("general.finetune", "")).lower()
    if "alpaca" in name or "[INST]" in (model.chat_template or "") and "<<SYS>>" in (model.chat_template or ""):
        return Alpaca2Template()
    if model.chat_template:
        return ModelTemplate(model.chat_template)
    if any(w in name for w in ("chat", "instruct", "-it")):
        return Alpaca2Template()
    return CompletionTemplate()
