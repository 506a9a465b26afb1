"""Shared fixtures: tiny GGUF models made once per test session with alpaca2.testing."""
import os
import subprocess
import textwrap
import sys
from pathlib import Path

import pytest

import alpaca2
from alpaca2 import testing

ROOT = Path(__file__).resolve().parents[1]
LLAMA_CPP_DIR = Path(os.environ.get("ALPACA2_LLAMA_CPP_DIR") or ROOT / "vendor" / "llama.cpp")
# The real Chinese-LLaMA-2 tokenizer, when this checkout sits beside ../shared (never copied here).
REAL_TOKENIZER = Path(os.environ.get("ALPACA2_TOKENIZER_MODEL")
                      or ROOT.parent / "shared" / "data" / "chinese-llama-2-tokenizer.model")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tokenizer_path(model_dir):
    """A SentencePiece BPE vocabulary (800 pieces, byte fallback) trained on mixed zh/en text."""
    return testing.train_tokenizer(model_dir / "spm.model", vocab_size=800)


@pytest.fixture(scope="session")
def tiny(model_dir, tokenizer_path):
    """(path, Weights) of the tiny f32 llama model: 2 layers, n_embd 64, GQA 4/2 heads."""
    return testing.make_model(model_dir / "tiny.gguf", tokenizer=tokenizer_path, return_weights=True)


@pytest.fixture(scope="session")
def tiny_path(tiny):
    return tiny[0]


@pytest.fixture(scope="session")
def other_path(model_dir, tokenizer_path):
    """Same vocabulary and shape as tiny, different random weights."""
    return testing.make_model(model_dir / "other.gguf", tokenizer=tokenizer_path, seed=7)


@pytest.fixture(scope="module")
def model(tiny_path):
    m = alpaca2.Model(tiny_path)
    yield m
    m.close()


@pytest.fixture
def ctx(model):
    c = alpaca2.Context(model, n_ctx=256, n_batch=64, n_threads=2, type_k="f32", type_v="f32",
                        flash_attn=False)
    yield c
    c.close()


def run_python(code, timeout=120, **kwargs):
    """Run code in a fresh interpreter; returns CompletedProcess (for crash-prone cases)."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=timeout, **kwargs)


# The prelude of a crash reproducer: expect(exc, fn, ...) prints what fn raised, or that it raised nothing.
CASE_PRELUDE = """
import alpaca2, numpy as np
def expect(exc, fn, *a, **k):
    try:
        fn(*a, **k)
    except exc as e:
        print("RAISED", type(e).__name__, "|", e)
        return e
    print("NO EXCEPTION from", getattr(fn, "__name__", fn), a, k)
"""


def run_case(code, timeout=120):
    """Run a crash reproducer in a fresh interpreter: it must exit cleanly (no signal) and every
    expect() in it must have seen its exception.  Returns its stdout."""
    r = run_python(CASE_PRELUDE + textwrap.dedent(code), timeout=timeout)
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    assert "NO EXCEPTION" not in r.stdout, r.stdout
    return r.stdout


@pytest.fixture(scope="session")
def mamba_path(model_dir, tokenizer_path):
    """A tiny Mamba model (recurrent memory: conv and SSM states, no KV cache), 2 layers."""
    from alpaca2 import testing_archs
    return testing_archs.make_mamba_model(model_dir / "mamba.gguf", tokenizer=tokenizer_path)


@pytest.fixture(scope="session")
def hybrid_path(model_dir, tokenizer_path):
    """A tiny Granite hybrid model: layer 0 Mamba-2, layer 1 attention (a KV cache and a
    recurrent state)."""
    from alpaca2 import testing_archs
    return testing_archs.make_granite_hybrid_model(model_dir / "hybrid.gguf", tokenizer=tokenizer_path)


@pytest.fixture(scope="session")
def mamba2_path(model_dir, tokenizer_path):
    """A tiny Mamba-2 model (4 heads, 1 group), 2 layers."""
    from alpaca2 import testing_archs
    return testing_archs.make_mamba2_model(model_dir / "mamba2.gguf", tokenizer=tokenizer_path)
