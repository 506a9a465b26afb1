"""Speculative decoding and batched generation: what they buy, measured side by side.

    python benchmarks/speculative.py lookup [--model GGUF] [-n 128] [--rounds 3]
    python benchmarks/speculative.py draft --target 7b-q4_0.gguf --draft 1.3b-q4_0.gguf [--reps 5]
    python benchmarks/speculative.py batch [--model GGUF] [-n 64] [--seqs 1,2,4,8,16]

lookup: prompt-lookup drafting against plain decoding, greedy, on input-copying prompts (the
        real Gemma 3 270M by default).  Plain and lookup runs alternate (A B A B).  The table says
        how many tokens the two outputs share: llama.cpp's CPU kernels give slightly different
        logits for a token decoded in a batch of k+1 than alone (plain decoding of the same tokens
        in other chunk sizes differs the same way), so a near-tie may go the other way.
draft:  per-step costs for a target/draft pair (synthetic Chinese-Alpaca-2 shapes: random weights
        do not agree, so acceptance is not measurable here, but the costs are): a plain target
        step, a draft step, a verification batch of k+1 tokens, and a real Speculator.step() with
        k drafts; from them the break-even acceptance rate and the speedup at given rates, using
        E[tokens per step] = (1 - a^(k+1)) / (1 - a) for per-token acceptance a.
batch:  aggregate tokens/sec of generate_batch for 1, 2, 4, 8, 16 sequences (one llama_decode per
        step for all of them) against one sequence at a time.
Results are printed as markdown with the command, commit, machine and date.
"""
import argparse
import os
import statistics
import subprocess
import sys
import time

import numpy as np

import alpaca2
from alpaca2.bench import machine_description

HERE = os.path.dirname(os.path.abspath(__file__))

COPY_PROMPTS = [
    # input-copying tasks: repeat a passage, quote it back, fix one word in a code listing
    "Text: The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a "
    "single step. All that glitters is not gold. Actions speak louder than words.\n"
    "The same text, repeated exactly:\nText: The quick brown fox",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n\n"
    "# The same function, renamed to fib:\ndef fib(n):\n",
    "Quote: \"It was the best of times, it was the worst of times, it was the age of wisdom, it was the "
    "age of foolishness, it was the epoch of belief, it was the epoch of incredulity.\"\n"
    "Summary with the quote: Dickens opens with \"It was the best of times,",
]


def header(title, argv):
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                            text=True).stdout.strip()
    return [f"# {title}", "",
            f"- command: `python benchmarks/speculative.py {' '.join(argv)}`",
            f"- commit: {commit} (llama.cpp {alpaca2.LLAMA_CPP_COMMIT}); machine: {machine_description()}",
            f"- date: {time.strftime('%Y-%m-%d')}", ""]


def demo_path():
    from alpaca2.cli import demo_model_path
    return demo_model_path()


def cmd_lookup(args, argv):
    path = args.model or demo_path()
    common = dict(n_ctx=2048, n_threads=args.threads)
    plain = alpaca2.Llama(path, **common)
    rows = []
    for n_draft in args.n_draft:
        spec = alpaca2.Llama(plain.model, lookup=True, n_draft=n_draft, **common)
        for i, prompt in enumerate(COPY_PROMPTS):
            t_plain, t_spec, acc, shared = [], [], [], []
            for _ in range(args.rounds):
                for which, llm, times in (("plain", plain, t_plain), ("lookup", spec, t_spec)):
                    llm.reset()
                    out = llm.generate(prompt, args.n, temp=0, repeat_penalty=1.0)
                    s = llm.last_stats
                    times.append(s["completion_tokens"] / (s["generation_ms"] / 1000))
                    if which == "plain":
                        want = s["tokens"]
                    else:
                        got = s["tokens"]
                        same = next((j for j, (x, y) in enumerate(zip(got, want)) if x != y), min(len(got), len(want)))
                        shared.append(f"{same}/{len(want)}")
                        acc.append(s["speculative"])
            sp = acc[-1]
            rows.append((n_draft, i, statistics.median(t_plain), statistics.median(t_spec),
                         sp["acceptance_rate"], sp["tokens_per_step"], shared[-1]))
        spec.close()
    plain.close()
    out = header("Prompt-lookup decoding vs plain decoding (greedy)", argv)
    out += [f"model: {os.path.basename(path)}, {args.n} tokens per run, median of {args.rounds} "
            f"interleaved rounds, {args.threads} threads", "",
            "| n_draft | prompt | plain tok/s | lookup tok/s | speedup | acceptance | tokens/step | same tokens as plain |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for n_draft, i, a, b, acc, tps, same in rows:
        out.append(f"| {n_draft} | {i} | {a:.1f} | {b:.1f} | {b / a:.2f}x | {acc:.0%} | {tps:.2f} | {same} |")
    return out


def _time(fn, reps):
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def cmd_draft(args, argv):
    T = alpaca2.Model(args.target)
    D = alpaca2.Model(args.draft)
    alpaca2.check_draft_compatible(T, D)
    kw = dict(n_ctx=512, n_batch=64, n_threads=args.threads)
    tc = alpaca2.Context(T, **kw)
    dc = alpaca2.Context(D, **kw)
    prompt = T.tokenize("床前明月光，疑是地上霜。举头望明月，低头思故乡。" * 2)
    n0 = len(prompt)
    tc.decode(prompt)
    dc.decode(prompt)
    tok = prompt[-1]

    def plain_step(ctx):
        def f():
            ctx.decode_token(tok)
            ctx.seq_rm(0, n0, -1)
        return f

    def verify(k):
        b = alpaca2.Batch(k + 1, 1)
        for j in range(k + 1):
            b.add(tok, n0 + j, (0,), True)

        def f():
            tc.decode_batch(b)
            tc.seq_rm(0, n0, -1)
        return f

    t_plain = _time(plain_step(tc), args.reps)
    t_draft = _time(plain_step(dc), args.reps)
    ks = args.k
    t_ver = {k: _time(verify(k), args.reps) for k in ks}
    # a real step: k drafts (the draft model decodes k-1 of them), one verification batch
    t_step = {}
    for k in ks:
        tc.seq_rm(0, n0 - 1, -1)
        dc.seq_rm(0, n0 - 1, -1)
        spec = alpaca2.Speculator(tc, dc, n_draft=k, n_draft_min=k, p_min=0.0)
        ts = []
        for _ in range(args.reps):
            spec.begin(prompt, alpaca2.Sampler(temp=0))
            t0 = time.perf_counter()
            spec.step(k + 1)
            ts.append(time.perf_counter() - t0)
        t_step[k] = statistics.median(ts)
    rates = (0.5, 0.6, 0.7, 0.8, 0.9)

    def expected(a, k):
        return (1 - a ** (k + 1)) / (1 - a)

    def breakeven(k):
        lo, hi = 0.0, 0.999
        if expected(hi, k) * t_plain < t_step[k]:
            return None
        for _ in range(60):
            mid = (lo + hi) / 2
            if expected(mid, k) * t_plain >= t_step[k]:
                hi = mid
            else:
                lo = mid
        return hi

    out = header("Draft-model speculative decoding: step costs and break-even acceptance", argv)
    out += [f"target: {os.path.basename(args.target)} ({T.desc}), draft: {os.path.basename(args.draft)} "
            f"({D.desc}); {args.threads} threads; median of {args.reps} runs", "",
            f"- plain target step (1 token): {t_plain * 1000:.1f} ms",
            f"- draft step (1 token): {t_draft * 1000:.1f} ms ({t_draft / t_plain:.2f}x a target step)", "",
            "| k drafts | verify k+1 tokens | verify / plain step | Speculator.step (k drafts) | break-even acceptance | "
            + " | ".join(f"speedup at a={a}" for a in rates) + " |",
            "| ---: | ---: | ---: | ---: | ---: | " + " | ".join("---:" for _ in rates) + " |"]
    for k in ks:
        be = breakeven(k)
        sp = " | ".join(f"{expected(a, k) * t_plain / t_step[k]:.2f}x" for a in rates)
        out.append(f"| {k} | {t_ver[k] * 1000:.1f} ms | {t_ver[k] / t_plain:.2f}x | {t_step[k] * 1000:.1f} ms | "
                   f"{'never' if be is None else f'{be:.2f}'} | {sp} |")
    return out


def cmd_batch(args, argv):
    path = args.model or demo_path()
    seqs = args.seqs
    llm = alpaca2.Llama(path, n_ctx=args.n_ctx, n_seq_max=max(seqs), n_threads=args.threads)
    prompts = [f"{i}. " + p for i, p in enumerate(["Once upon a time", "The capital of France is",
                                                    "In the beginning", "def main():", "床前明月光，",
                                                    "Dear Sir or Madam,", "The weather today", "Step 1:"] * 4)]
    rows = []
    for n in seqs:
        rates = []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            llm.generate_batch(prompts[:n], args.n, temp=0, repeat_penalty=1.0, logit_bias={llm.model.eos: -100.0})
            dt = time.perf_counter() - t0
            rates.append(llm.last_stats["completion_tokens"] / dt)
        rows.append((n, statistics.median(rates), llm.last_stats["completion_tokens"]))
    llm.close()
    base = rows[0][1]
    out = header("Batched generation: aggregate tokens/sec (generate_batch, greedy)", argv)
    out += [f"model: {os.path.basename(path)}, {args.n} new tokens per sequence (prompt processing "
            f"included), n_ctx {args.n_ctx}, {args.threads} threads, median of {args.rounds} rounds", "",
            "| sequences | aggregate tok/s | per sequence tok/s | vs 1 sequence |", "| ---: | ---: | ---: | ---: |"]
    for n, r, _ in rows:
        out.append(f"| {n} | {r:.1f} | {r / n:.1f} | {r / base:.2f}x |")
    return out


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    lk = sub.add_parser("lookup")
    lk.add_argument("--model")
    lk.add_argument("-n", type=int, default=128)
    lk.add_argument("--n-draft", type=lambda s: [int(x) for x in s.split(",")], default=[8])
    lk.add_argument("--rounds", type=int, default=3)
    dr = sub.add_parser("draft")
    dr.add_argument("--target", required=True)
    dr.add_argument("--draft", required=True)
    dr.add_argument("--k", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8])
    dr.add_argument("--reps", type=int, default=5)
    bt = sub.add_parser("batch")
    bt.add_argument("--model")
    bt.add_argument("-n", type=int, default=64)
    bt.add_argument("--seqs", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8, 16])
    bt.add_argument("--n-ctx", type=int, default=4096)
    bt.add_argument("--rounds", type=int, default=3)
    for p in (lk, dr, bt):
        p.add_argument("-t", "--threads", type=int, default=alpaca2.default_threads())
        p.add_argument("--out", help="also write the markdown here")
    args = ap.parse_args(argv)
    lines = {"lookup": cmd_lookup, "draft": cmd_draft, "batch": cmd_batch}[args.cmd](args, argv)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)


if __name__ == "__main__":
    main()
