"""``alpaca2 bench``: tokens/sec as llama-bench measures them (pp, tg), plus an end-to-end test."""
from __future__ import annotations

import sys

from alpaca2.cli import args as A


def add_parser(sub) -> None:
    b = sub.add_parser("bench", help="tokens/sec: pp, tg (as llama-bench) and gen (end to end)")
    A.add_model_args(b)
    b.add_argument("-p", "--n-prompt", type=A.int_list, default=[512], help="prompt sizes, comma-separated (default 512)")
    b.add_argument("-n", "--n-gen", type=A.int_list, default=[128], help="generation sizes for tg (default 128)")
    b.add_argument("-g", "--gen", type=A.int_list, default=[128], help="generation sizes for gen (default 128; 0 = off)")
    b.add_argument("-r", "--repetitions", type=A.int_in(1), default=5, help="runs per test (default 5)")
    b.add_argument("-t", "--threads", type=A.threads_type, default=None)
    b.add_argument("-b", "--batch-size", type=A.int_in(1), default=2048)
    b.add_argument("-ub", "--ubatch-size", type=A.int_in(1), default=512)
    b.add_argument("-ngl", "--n-gpu-layers", type=A.int_in(-1), default=-1)
    b.add_argument("-fa", "--flash-attn", type=A.on_off_auto, default="auto", metavar="on|off|auto")
    b.add_argument("-ctk", "--cache-type-k", choices=A.CACHE_TYPES, default="f16")
    b.add_argument("-ctv", "--cache-type-v", choices=A.CACHE_TYPES, default="f16")
    b.add_argument("-o", "--output", choices=["md", "json", "jsonl", "csv"], default="md")
    A.add_rpc_args(b)
    b.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    from alpaca2 import bench
    path = A.model_path(args)

    def progress(kind, n, r, reps):
        if sys.stderr.isatty():
            sys.stderr.write(f"\r{kind}{n}: {r}/{reps}   ")
            sys.stderr.flush()

    rows = bench.run(path, n_prompt=args.n_prompt, n_gen=args.n_gen, gen=args.gen,
                     repetitions=args.repetitions, n_threads=A.threads(args), n_batch=args.batch_size,
                     n_ubatch=args.ubatch_size, n_gpu_layers=args.n_gpu_layers, flash_attn=args.flash_attn,
                     type_k=args.cache_type_k, type_v=args.cache_type_v, progress=progress, **A.rpc_kwargs(args))
    if sys.stderr.isatty():
        sys.stderr.write("\r" + " " * 30 + "\r")
    print(bench.format_rows(rows, args.output))
    return A.EXIT_OK
