"""``alpaca2 bench``: llama-bench's tests through alpaca2's Python API, plus an end-to-end one.

- ``pp N``: prompt processing, N tokens decoded in n_batch chunks (as llama-bench's -p).
- ``tg N``: token generation, N single-token decodes without sampling (as llama-bench's -n).
- ``gen N``: what users feel: tokenize a prompt, decode it, then N tokens sampled with chat.sh's
  settings (temp 0.5, top_k 40, top_p 0.9, repeat_penalty 1.1), turned into text; EOS suppressed
  so every run makes N tokens.  Reported as generated tokens per second.

Each test runs once as a warm-up (as llama-bench does), then ``repetitions`` times; the table
gives mean ± stddev of tokens/sec.  Output: markdown (default), json, jsonl or csv.

json/jsonl/csv rows carry llama-bench's keys with llama-bench's meanings (``model_filename``,
``model_type``, ``n_prompt``, ``n_gen``, ``avg_ns``, ``stddev_ns``, ``avg_ts``, ``stddev_ts``,
``samples_ns``, ``samples_ts`` ...), so a script that reads ``llama-bench -o json`` reads ours;
alpaca2's own keys (``test``, ``mean``, ``stddev``, ``samples``, ``backend`` ...) are extras.
A ``gen`` row has ``n_prompt`` 0 and ``n_gen`` N, as llama-bench's tg rows.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import platform
import statistics
import time
from datetime import datetime, timezone

import numpy as np

from alpaca2._core import Context, Model, Sampler, default_threads, devices, supports_gpu_offload
from alpaca2.sampling import DEFAULT_SAMPLING

GEN_PROMPT = "床前明月光，疑是地上霜。举头望明月，低头思故乡。请把这首诗翻译成英文，并解释它的意思。"
CHAT_SH_SAMPLING = DEFAULT_SAMPLING


def _tokens(model: Model, n: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    return rng.integers(low=min(3, model.n_vocab - 1), high=model.n_vocab, size=n).tolist()


def time_pp(ctx: Context, model: Model, n_prompt: int, seed: int = 0) -> float:
    """Seconds to decode n_prompt tokens into an empty cache (logits of the last one only)."""
    tokens = _tokens(model, n_prompt, seed)
    if model.add_bos:
        tokens[0] = model.bos
    ctx.clear()
    t0 = time.perf_counter()
    ctx.decode(tokens)
    ctx.synchronize()
    return time.perf_counter() - t0


def time_tg(ctx: Context, model: Model, n_gen: int, seed: int = 0) -> float:
    """Seconds for n_gen single-token decodes (no sampling), as llama-bench's tg."""
    tokens = _tokens(model, n_gen, seed)
    if model.add_bos:
        tokens[0] = model.bos
    ctx.clear()
    decode_token = ctx.decode_token
    t0 = time.perf_counter()
    for t in tokens:
        decode_token(t)
    ctx.synchronize()
    return time.perf_counter() - t0


def time_gen(ctx: Context, model: Model, n_gen: int, seed: int = 0, prompt: str = GEN_PROMPT) -> float:
    """Seconds to generate n_gen tokens of text after a prompt, chat.sh's sampler, EOS suppressed."""
    bias = {t: -math.inf for t in {model.eos, model.eot} if t >= 0}
    sampler = Sampler(model=model, seed=seed, logit_bias=bias, **CHAT_SH_SAMPLING)
    ctx.clear()
    ids = model.tokenize(prompt)
    ctx.decode(ids)
    pieces = []
    t0 = time.perf_counter()
    for i in range(n_gen):
        tok = sampler.sample(ctx)
        pieces.append(model.token_to_piece(tok))
        if i + 1 < n_gen:
            ctx.decode_token(tok)
    b"".join(pieces).decode("utf-8", "replace")
    return time.perf_counter() - t0


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    gpus = [d["description"] for d in devices() if d["type"] in ("gpu", "igpu")]
    return f"{cpu}, {os.cpu_count()} CPUs" + (f", GPU: {', '.join(gpus)}" if gpus else "")


def run(model_path: str, *, n_prompt=(512,), n_gen=(128,), gen=(128,), repetitions=5, n_threads=None,
        n_batch=2048, n_ubatch=512, n_gpu_layers=-1, flash_attn="auto", type_k="f16", type_v="f16",
        n_ctx=None, progress=None, rpc_servers=None, tensor_split=None) -> list[dict]:
    """Run the tests; one dict per test (tokens/sec samples, mean, stddev and the settings)."""
    n_threads = n_threads or default_threads()
    model = Model(model_path, n_gpu_layers=n_gpu_layers, rpc_servers=rpc_servers, tensor_split=tensor_split)
    need = max(list(n_prompt) + list(n_gen) + [g + 64 for g in gen] + [1]) + 8
    ctx = Context(model, n_ctx=n_ctx or max(need, 256), n_batch=n_batch, n_ubatch=n_ubatch, n_threads=n_threads,
                  flash_attn=flash_attn, type_k=type_k, type_v=type_v)
    backend = "CUDA" if supports_gpu_offload() and n_gpu_layers != 0 else "CPU"
    if model.rpc_servers:
        backend += "+RPC"
    base = {"model": os.path.basename(model_path), "model_path": os.fspath(model_path), "model_desc": model.desc, "size": model.size,
            "n_params": model.n_params, "backend": backend, "n_threads": n_threads, "n_batch": n_batch,
            "n_ubatch": n_ubatch, "n_gpu_layers": n_gpu_layers, "flash_attn": str(flash_attn),
            "type_k": type_k, "type_v": type_v}
    plan = [("pp", n, time_pp) for n in n_prompt if n > 0] + [("tg", n, time_tg) for n in n_gen if n > 0] + \
           [("gen", n, time_gen) for n in gen if n > 0]
    if repetitions < 1:
        raise ValueError(f"repetitions must be >= 1, got {repetitions}")
    rows = []
    try:
        for kind, n, fn in plan:
            test_time = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
            fn(ctx, model, n, 0)                                   # warm-up
            seconds = []
            for r in range(repetitions):
                seconds.append(fn(ctx, model, n, r + 1))
                if progress:
                    progress(kind, n, r + 1, repetitions)
            rows.append(_row(base, kind, n, seconds, test_time))
    finally:
        ctx.close()
        model.close()
    return rows


def _stdev(values) -> float:
    """llama-bench's stdev: the sample standard deviation, 0 for fewer than two values."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _row(base: dict, kind: str, n: int, seconds: list[float], test_time: str) -> dict:
    """One result: llama-bench's fields, then alpaca2's own."""
    from alpaca2 import _build_info
    samples_ns = [int(round(t * 1e9)) for t in seconds]
    samples_ts = [n / t for t in seconds]
    gpus = [d["description"] for d in devices() if d["type"] in ("gpu", "igpu")]
    fa = base["flash_attn"]
    row = {
        "build_commit": _build_info.LLAMA_CPP_COMMIT[:7], "build_number": 0, "cpu_info": machine_description().split(",")[0],
        "gpu_info": ", ".join(gpus), "backends": base["backend"], "model_filename": base["model_path"],
        "model_type": base["model_desc"], "model_size": base["size"], "model_n_params": base["n_params"],
        "n_batch": base["n_batch"], "n_ubatch": base["n_ubatch"], "n_threads": base["n_threads"],
        "cpu_mask": "0x0", "cpu_strict": False, "poll": 50,
        "type_k": base["type_k"], "type_v": base["type_v"], "n_gpu_layers": base["n_gpu_layers"],
        "n_cpu_moe": 0, "split_mode": "layer", "main_gpu": 0, "no_kv_offload": False,
        "flash_attn": -1 if fa == "auto" else int(fa in (True, "True", "1", "on")),
        "devices": "auto", "tensor_split": "0.00", "tensor_buft_overrides": "none", "load_mode": "auto",
        "lazy_mode": "auto", "embeddings": False, "no_op_offload": 0, "no_host": False, "repack": True,
        "fit_target": 0, "fit_min_ctx": 0,
        "n_prompt": n if kind == "pp" else 0, "n_gen": 0 if kind == "pp" else n, "n_depth": 0,
        "test_time": test_time,
        "avg_ns": int(statistics.fmean(samples_ns)), "stddev_ns": int(_stdev(samples_ns)),
        "avg_ts": statistics.fmean(samples_ts), "stddev_ts": _stdev(samples_ts),
        "samples_ns": samples_ns, "samples_ts": samples_ts,
    }
    extras = {k: v for k, v in base.items() if k not in row and k != "model_path"}
    row.update(extras, test=f"{kind}{n}", n=n, samples=samples_ts, mean=row["avg_ts"], stddev=row["stddev_ts"])
    return row


def format_rows(rows: list[dict], fmt: str = "md") -> str:
    if fmt == "json":
        return json.dumps(rows, indent=2)
    if fmt == "jsonl":
        return "\n".join(json.dumps(r) for r in rows)
    if fmt == "csv":
        out = io.StringIO()
        keys = [k for k in rows[0] if k not in ("samples", "samples_ns", "samples_ts")] if rows else []
        w = csv.DictWriter(out, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)
        return out.getvalue()
    lines = ["| model | size | params | backend | threads | ngl | fa | test | t/s |",
             "| --- | ---: | ---: | --- | ---: | ---: | --- | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['model_desc']} | {r['size'] / 2**20:.2f} MiB | {r['n_params'] / 1e6:.2f} M | "
                     f"{r['backend']} | {r['n_threads']} | {r['n_gpu_layers']} | {r['flash_attn']} | {r['test']} | "
                     f"{r['mean']:.2f} ± {r['stddev']:.2f} |")
    return "\n".join(lines)
