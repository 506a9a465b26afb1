"""Sampling defaults and presets, in one place (policy lives in Python, mechanism in Cython).

The defaults are those of Chinese-Alpaca-2's chat.sh: temp 0.5, top_k 40, top_p 0.9,
repeat_penalty 1.1 over the last 64 tokens (min_p 0.05 as llama.cpp's default).
"""
from __future__ import annotations

# chat.sh's sampling settings
DEFAULT_SAMPLING = dict(temp=0.5, top_k=40, top_p=0.9, min_p=0.05, repeat_penalty=1.1, penalty_last_n=64)
# the keyword arguments of alpaca2.Sampler that a call may override
SAMPLING_KEYS = ("temp", "top_k", "top_p", "min_p", "typical_p", "repeat_penalty", "penalty_last_n",
                 "frequency_penalty", "presence_penalty", "mirostat", "grammar", "logit_bias", "seed")
