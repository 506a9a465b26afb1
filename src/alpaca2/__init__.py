"""alpaca2: Chinese-LLaMA-2 / Chinese-Alpaca-2 (and any llama.cpp model) from Python.

The core is a Cython extension (alpaca2._core) compiled against a vendored llama.cpp:

    >>> import alpaca2
    >>> model = alpaca2.Model("model.gguf")
    >>> ctx = alpaca2.Context(model, n_ctx=2048)
    >>> ctx.decode(model.tokenize("床前明月光，"))
    >>> token = alpaca2.Sampler(temp=0).sample(ctx)
"""
import os as _os

from alpaca2 import _build_info

# libgomp (ggml's CPU threads) reads its settings once, when _core loads it.  Its idle workers spin
# up to 300,000 rounds after each parallel region by default, holding a core while Python runs
# between two decode steps; on 2 cores a server's event loop then waits for one (measured: one
# streaming client got 16-18 tok/s, and 35-37 with a 2,000-round spin; plain decode loops 37-41 either
# way).  So unless the user set GOMP_SPINCOUNT or OMP_WAIT_POLICY, the spin is 2,000 rounds; the
# variable is set only while _core loads, so child processes (llama-bench ...) keep their default.
OPENMP_SPIN = None if ("GOMP_SPINCOUNT" in _os.environ or "OMP_WAIT_POLICY" in _os.environ) else "2000"
if OPENMP_SPIN is not None:
    _os.environ["GOMP_SPINCOUNT"] = OPENMP_SPIN
try:
    from alpaca2._core import (
        Batch, Context, LoraAdapter, Model, Sampler, SamplerChain, Speculator,
        backends, check_draft_compatible, chat_apply_template, chat_builtin_templates, default_threads, devices,
        llama_cpp_version, print_system_info, quantize, set_log_level, supports_gpu_offload, supports_rpc,
    )
finally:
    if OPENMP_SPIN is not None:
        _os.environ.pop("GOMP_SPINCOUNT", None)
from alpaca2._common import ChatFormatter, ChatParseError, ChatStream, ChatTemplateError, json_schema_to_grammar
from alpaca2.llm import Llama
from alpaca2.session import ChatSession
from alpaca2.sampling import DEFAULT_SAMPLING
from alpaca2.streaming import TextStream
from alpaca2.templates import (
    DEFAULT_SYSTEM_PROMPT, Alpaca2Template, CompletionTemplate, ModelTemplate, Template, choose_template,
)
from alpaca2.errors import (
    Alpaca2Error, ArgumentTypeError, ArgumentValueError, ClosedError, ContextFullError, DecodeAborted,
    DecodeError, GrammarError, IncompleteChainError, InvalidBatchError, ModelLoadError, OutOfMemoryError,
    RPCServerError, SamplerError, StateError, TokenizeError, VocabMismatchError,
)

__version__ = "0.1.0"
LLAMA_CPP_COMMIT = _build_info.LLAMA_CPP_COMMIT
"""The llama.cpp commit this build was compiled from."""

_PKG_DIR = _os.path.dirname(_os.path.abspath(__file__))


def get_include():
    """Directory with llama.h, ggml*.h and alpaca2's .pxd files, for C, C++ and Cython users.

    Cython: ``include_dirs=[alpaca2.get_include()]`` then ``cimport alpaca2._core``.
    """
    return _os.path.join(_PKG_DIR, "include")


def get_pxd_dir():
    """The directory to put on Cython's include path to ``cimport alpaca2._core``."""
    return _os.path.dirname(_PKG_DIR)


def get_lib_dir():
    """Directory with libllama.so, libggml*.so and the backend modules (link with -lllama)."""
    return _PKG_DIR


def _cpu_features():
    feats = {}
    for part in print_system_info().split("|"):
        if "=" in part:
            key, _, value = part.rpartition("=")
            key = key.split(":")[-1].strip()
            if key and value.strip() in ("0", "1"):
                feats[key] = value.strip() == "1"
    return feats


def system_info():
    """What this build can do here: backends compiled in and loaded, devices, CPU features."""
    loaded = backends()
    compiled = ["CPU"] + (["CUDA"] if _build_info.CUDA else []) + (["RPC"] if getattr(_build_info, "RPC", False) else [])
    devs = devices()
    return {
        "version": __version__,
        "llama_cpp_commit": LLAMA_CPP_COMMIT,
        "llama_cpp_source": _build_info.LLAMA_CPP_SOURCE,
        "backends_compiled": compiled,
        "backends_loaded": loaded,
        "cpu_variants_compiled": [v for v in _build_info.CPU_VARIANTS.split(";") if v],
        "devices": devs,
        "gpu_offload": supports_gpu_offload(),
        "cpu_features": _cpu_features(),
        "system_info": print_system_info(),
        "native": _build_info.NATIVE,
        "cuda_architectures": _build_info.CMAKE_CUDA_ARCHITECTURES if _build_info.CUDA else None,
    }


def _note_gpu_fallback():
    # without a driver the CUDA module either fails to load or registers with no device
    if _build_info.CUDA and not any(d["type"] == "gpu" for d in devices()):
        import logging
        logging.getLogger("alpaca2").warning(
            "alpaca2 was built with CUDA, but no CUDA device or driver is usable here: running on the CPU")


_note_gpu_fallback()
from alpaca2 import _gpu_hint  # noqa: E402
_gpu_hint.warn_if_gpu_unused(_build_info.CUDA)   # a CPU build on a machine with a GPU: say how to rebuild

__all__ = [
    "Llama", "ChatSession", "Alpaca2Template", "ModelTemplate", "CompletionTemplate", "choose_template",
    "DEFAULT_SYSTEM_PROMPT", "DEFAULT_SAMPLING", "Template", "TextStream",
    "Batch", "Context", "LoraAdapter", "Model", "Sampler", "SamplerChain", "Speculator", "check_draft_compatible",
    "quantize", "system_info", "get_include", "get_lib_dir", "get_pxd_dir", "backends", "devices",
    "set_log_level", "chat_apply_template", "chat_builtin_templates", "default_threads", "print_system_info",
    "supports_gpu_offload", "supports_rpc", "llama_cpp_version", "LLAMA_CPP_COMMIT", "__version__",
    "ChatFormatter", "ChatStream", "ChatTemplateError", "ChatParseError", "json_schema_to_grammar",
    "Alpaca2Error", "ArgumentTypeError", "ArgumentValueError", "ClosedError", "ContextFullError",
    "DecodeAborted", "DecodeError", "GrammarError", "IncompleteChainError", "InvalidBatchError",
    "ModelLoadError", "OutOfMemoryError", "RPCServerError", "SamplerError", "StateError", "TokenizeError",
    "VocabMismatchError",
]
