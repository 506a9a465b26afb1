"""Sampling defaults and presets, in one place (policy lives in Python, mechanism in Cython).

The defaults of chat, generate and the Python API are those of Chinese-Alpaca-2's chat.sh: temp 0.5,
top_k 40, top_p 0.9, repeat_penalty 1.1 over the last 64 tokens (min_p 0.05 as llama.cpp's default).
The server's are llama-server's (llama.cpp's common defaults).
"""
from __future__ import annotations

# chat.sh's sampling settings
DEFAULT_SAMPLING = dict(temp=0.5, top_k=40, top_p=0.9, min_p=0.05, repeat_penalty=1.1, penalty_last_n=64)
# llama.cpp's own defaults (common_params_sampling): what llama-server samples with, so `alpaca2
# serve` does too (a drop-in for llama-server answers as it does, for the same seed)
LLAMA_CPP_SAMPLING = dict(temp=0.8, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.0, penalty_last_n=64)
# the keyword arguments of alpaca2.Sampler that a call may override
SAMPLING_KEYS = ("temp", "top_k", "top_p", "min_p", "typical_p", "repeat_penalty", "penalty_last_n",
                 "frequency_penalty", "presence_penalty", "mirostat", "grammar", "logit_bias", "seed")
