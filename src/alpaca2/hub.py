"""Model names and Hugging Face repo ids for ``-m``: the Chinese-LLaMA-2 / Alpaca-2 GGUF releases.

``-m`` takes a path, or a repo id ("hfl/chinese-alpaca-2-7b-gguf"), or a short name
("chinese-alpaca-2-7b"), optionally with a quantization ("chinese-alpaca-2-7b:q8_0", default
q4_0) or an exact file ("hfl/chinese-alpaca-2-7b-gguf/ggml-model-q6_k.gguf").  Files come through
``huggingface_hub`` into its usual cache (HF_HOME / HF_HUB_CACHE), with its progress bar; with
HF_HUB_OFFLINE=1 only the cache is used.  Needs ``pip install 'alpaca2-llama[hub]'``.
"""
from __future__ import annotations

import os
import re

from alpaca2.errors import ModelLoadError

# The authors' GGUF releases (hfl/*-gguf): files are named ggml-model-<quant>.gguf.
KNOWN_REPOS = {
    f"chinese-{kind}-2-{size}": f"hfl/chinese-{kind}-2-{size}-gguf"
    for kind in ("alpaca", "llama") for size in ("1.3b", "7b", "13b", "7b-16k", "13b-16k", "7b-64k")
}
QUANTS = ("q2_k", "q3_k", "q4_0", "q4_k", "q5_0", "q5_k", "q6_k", "q8_0", "f16")
DEFAULT_QUANT = "q4_0"


def parse_spec(spec: str) -> tuple[str, str]:
    """(repo_id, filename) for a name or repo id; ValueError when spec is neither."""
    name, _, quant = spec.partition(":")
    quant = (quant or DEFAULT_QUANT).lower()
    key = name.lower()
    if key in KNOWN_REPOS:
        repo = KNOWN_REPOS[key]
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        repo = name
    elif re.fullmatch(r"[\w.-]+/[\w.-]+/.+\.gguf", name):
        owner, rname, filename = name.split("/", 2)
        return f"{owner}/{rname}", filename
    else:
        raise ValueError(f"{spec!r} is neither a file nor a model name or Hugging Face repo id")
    if quant not in QUANTS:
        raise ValueError(f"unknown quantization {quant!r}; one of {', '.join(QUANTS)}")
    return repo, f"ggml-model-{quant}.gguf"


def resolve_model(spec: str) -> str:
    """A local path for spec: the path itself, or the file fetched (or found cached) from the hub."""
    if os.path.exists(spec) or spec.endswith(".gguf") and spec.count("/") != 2:
        return spec
    if spec.startswith((".", "/", "~")) or os.path.isdir(spec.split("/", 1)[0]):
        return spec          # a local path that does not exist: Model() says so
    repo, filename = parse_spec(spec)
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise ModelLoadError(f"{spec} names a Hugging Face model; downloading it needs huggingface_hub: "
                             "pip install 'alpaca2-llama[hub]'") from None
    try:
        return hf_hub_download(repo_id=repo, filename=filename)
    except Exception as e:   # offline, not cached, no such repo/file: one clear message
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0")
        why = "it is not in the local cache and HF_HUB_OFFLINE is set" if offline else f"{type(e).__name__}: {e}"
        raise ModelLoadError(f"could not get {filename} from {repo}: {why}") from None
