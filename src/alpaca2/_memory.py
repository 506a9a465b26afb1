"""Memory policy, in Python (issue 14): will a Context's KV cache fit, before llama.cpp allocates it?

An allocation the kernel overcommits ends in the OOM killer, not an exception, so Context asks
``check_kv_cache`` first and gets OutOfMemoryError with the numbers and what to change.  Only where
the size is exact: llama-layout attention (one K and one V row per layer and cell) held in host
memory.  Other architectures and offloaded caches are left to llama.cpp.
"""
from __future__ import annotations

from alpaca2._gguf_check import GGML_TYPES
from alpaca2.errors import OutOfMemoryError

# architectures whose cache is n_layer x n_ctx x (K + V) rows of n_embd/n_head*n_head_kv elements
EXACT_KV_ARCHS = ("llama", "qwen2")
KV_PAD = 256                    # llama.cpp pads n_ctx to a multiple of 256


def available_memory():
    """Bytes of memory a new allocation can still get (MemAvailable + free swap), or None where
    the system does not say (not Linux)."""
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.count(" ")}
    except (OSError, ValueError, IndexError):
        return None
    if "MemAvailable" not in info:
        return None
    return info["MemAvailable"] + info.get("SwapFree", 0)


def kv_cache_bytes(n_ctx: int, n_layer: int, n_embd: int, n_head: int, n_head_kv: int,
                   type_k: str = "f16", type_v: str = "f16") -> int:
    """Bytes of a llama-layout KV cache of n_ctx cells (before padding) with these cache types."""
    n_ctx_kv = -(-n_ctx // KV_PAD) * KV_PAD
    head_dim_kv = n_embd // max(n_head, 1) * n_head_kv
    per_elem = {name: size / block for name, block, size in GGML_TYPES.values()}
    return int(n_ctx_kv * n_layer * head_dim_kv * (per_elem[type_k] + per_elem[type_v]))


def check_kv_cache(model, n_ctx: int, type_k: str, type_v: str, on_gpu: bool) -> None:
    """Raise OutOfMemoryError if the KV cache of a Context on ``model`` cannot fit in host memory.

    n_ctx 0 means the model's training context, as in llama.cpp."""
    if on_gpu or model.metadata.get("general.architecture") not in EXACT_KV_ARCHS:
        return
    n_ctx = n_ctx or model.n_ctx_train
    need = kv_cache_bytes(n_ctx, model.n_layer, model.n_embd, model.n_head, model.n_head_kv, type_k, type_v)
    avail = available_memory()
    if avail is not None and need > avail:
        n_ctx_kv = -(-n_ctx // KV_PAD) * KV_PAD
        head_dim_kv = model.n_embd // max(model.n_head, 1) * model.n_head_kv
        raise OutOfMemoryError(
            f"a KV cache for n_ctx={n_ctx_kv} needs {need / 2**30:.1f} GiB "
            f"({model.n_layer} layers x {head_dim_kv} x 2, {type_k}/{type_v}), but only "
            f"{avail / 2**30:.1f} GiB of memory is available: use a smaller n_ctx or "
            "type_k/type_v='q8_0'")
