"""The chat layer's old home, kept so ``from alpaca2.chat import ...`` goes on working.

The code now lives in modules named for what they hold: ``alpaca2.llm`` (Llama),
``alpaca2.session`` (ChatSession and its files), ``alpaca2.templates`` (prompt formats),
``alpaca2.streaming`` (UTF-8 and stop strings), ``alpaca2.openai_format`` (OpenAI-shaped results)
and ``alpaca2.sampling`` (chat.sh's defaults).
"""
from __future__ import annotations

from alpaca2.llm import Llama
from alpaca2.session import ChatSession
from alpaca2.streaming import TextStream
from alpaca2.templates import (
    DEFAULT_SYSTEM_PROMPT, Alpaca2Template, CompletionTemplate, ModelTemplate, Template, choose_template)

__all__ = ["Llama", "ChatSession", "TextStream", "DEFAULT_SYSTEM_PROMPT", "Alpaca2Template",
           "CompletionTemplate", "ModelTemplate", "Template", "choose_template"]
