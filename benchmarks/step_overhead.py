"""What one generation step costs in Python on top of C: decode one token + sample, µs per step.

The same loop runs as a C program compiled against the bundled libllama (alpaca2.get_include /
get_lib_dir) and through alpaca2's Python API (Context.decode_token + Sampler.sample), interleaved
A B A B on the same model, threads and sampler chain.  The difference is the binding's cost.

    python benchmarks/step_overhead.py [--model M.gguf] [--steps 256] [--rounds 5] [--threads 2]

Without --model it makes the tiny test model (where compute is small and the overhead shows).
It also times ``ctx.logits`` (a copy of the last row per access, since issue 14: llama.cpp's
buffer does not outlive close() or the next decode), which a loop that reads logits pays per token.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import alpaca2

C_SOURCE = r"""
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include "llama.h"
#include "ggml-backend.h"

static int cpu_clock = 0;
static int64_t now_us(void) {
    if (!cpu_clock) return llama_time_us();
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

static void quiet(enum ggml_log_level level, const char * text, void * data) { (void)level; (void)text; (void)data; }

int main(int argc, char ** argv) {
    const char * lib_dir = argv[1], * path = argv[2];
    int steps = atoi(argv[3]), rounds = atoi(argv[4]), n_threads = atoi(argv[5]);
    cpu_clock = argc > 6 && atoi(argv[6]);
    llama_log_set(quiet, NULL);
    ggml_backend_load_all_from_path(lib_dir);
    llama_backend_init();
    struct llama_model_params mp = llama_model_default_params();
    struct llama_model * model = llama_model_load_from_file(path, mp);
    if (!model) return 1;
    const struct llama_vocab * vocab = llama_model_get_vocab(model);
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = steps + 64; cp.n_batch = 64; cp.n_threads = n_threads; cp.n_threads_batch = n_threads;
    struct llama_context * ctx = llama_init_from_model(model, cp);
    for (int r = 0; r < rounds; r++) {
        struct llama_sampler * s = llama_sampler_chain_init(llama_sampler_chain_default_params());
        llama_sampler_chain_add(s, llama_sampler_init_penalties(0, 64, 1.1f, 0.0f, 0.0f));
        llama_sampler_chain_add(s, llama_sampler_init_top_k(40));
        llama_sampler_chain_add(s, llama_sampler_init_top_p(0.9f, 1));
        llama_sampler_chain_add(s, llama_sampler_init_min_p(0.05f, 1));
        llama_sampler_chain_add(s, llama_sampler_init_temp(0.5f));
        llama_sampler_chain_add(s, llama_sampler_init_dist(1234));
        llama_memory_clear(llama_get_memory(ctx), 1);
        llama_token tok = llama_vocab_bos(vocab);
        llama_decode(ctx, llama_batch_get_one(&tok, 1));
        int64_t t0 = now_us();
        for (int i = 0; i < steps; i++) {
            tok = llama_sampler_sample(s, ctx, -1);
            if (llama_decode(ctx, llama_batch_get_one(&tok, 1)) != 0) return 2;
        }
        int64_t t1 = now_us();
        printf("%f\n", (double)(t1 - t0) / steps);
        fflush(stdout);
        llama_sampler_free(s);
    }
    llama_free(ctx);
    llama_model_free(model);
    return 0;
}
"""


def build_c(tmp):
    src = os.path.join(tmp, "step.c")
    exe = os.path.join(tmp, "step")
    with open(src, "w") as f:
        f.write(C_SOURCE)
    lib = alpaca2.get_lib_dir()
    subprocess.run(["cc", "-O2", src, "-o", exe, f"-I{alpaca2.get_include()}", f"-L{lib}", "-lllama", "-lggml",
                    "-lggml-base", f"-Wl,-rpath,{lib}"], check=True)
    return exe


def python_round(model, steps, n_threads, clock=time.perf_counter):
    ctx = alpaca2.Context(model, n_ctx=steps + 64, n_batch=64, n_threads=n_threads)
    s = alpaca2.Sampler(temp=0.5, top_k=40, top_p=0.9, min_p=0.05, repeat_penalty=1.1, seed=1234)
    ctx.decode_token(model.bos)
    t0 = clock()
    for _ in range(steps):
        tok = s.sample(ctx)
        ctx.decode_token(tok)
    dt = clock() - t0
    ctx.close()
    return dt / steps * 1e6


def logits_copy_us(model, n_threads, reps=200):
    """µs per ctx.logits access (one n_vocab float32 row copied), median of 5 batches of reps."""
    ctx = alpaca2.Context(model, n_ctx=64, n_batch=64, n_threads=n_threads)
    ctx.decode_token(model.bos)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(reps):
            ctx.logits
        times.append((time.perf_counter() - t0) / reps * 1e6)
    ctx.close()
    return statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model")
    p.add_argument("--steps", type=int, default=256)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true")
    p.add_argument("--cpu-time", action="store_true",
                   help="time by the process's CPU clock, not the wall clock (a machine shared with other "
                        "jobs: waiting for a CPU is not counted; with --threads 1 the two agree on a quiet one)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model
        if path is None:
            from alpaca2 import testing
            path = testing.make_model(os.path.join(tmp, "tiny.gguf"))
        exe = build_c(tmp)
        model = alpaca2.Model(path)
        c_us, py_us = [], []
        for _ in range(args.rounds):                       # interleaved: C, Python, C, Python ...
            out = subprocess.run([exe, alpaca2.get_lib_dir(), path, str(args.steps), "1", str(args.threads),
                                  "1" if args.cpu_time else "0"],
                                 capture_output=True, text=True, check=True).stdout
            c_us.append(float(out.split()[0]))
            py_us.append(python_round(model, args.steps, args.threads,
                                      time.process_time if args.cpu_time else time.perf_counter))
        copy_us = logits_copy_us(model, args.threads)
        n_vocab = model.n_vocab
    c_med, py_med = statistics.median(c_us), statistics.median(py_us)
    result = {"model": os.path.basename(path) if args.model else "tiny (alpaca2.testing)",
              "steps": args.steps, "rounds": args.rounds, "threads": args.threads,
              "clock": "process CPU time" if args.cpu_time else "wall",
              "c_us_per_step": round(c_med, 2), "python_us_per_step": round(py_med, 2),
              "overhead_us_per_step": round(py_med - c_med, 2),
              "c_all": [round(x, 2) for x in c_us], "python_all": [round(x, 2) for x in py_us],
              "n_vocab": n_vocab, "logits_copy_us": round(copy_us, 2),
              "logits_copy_share_of_step": round(copy_us / py_med, 4)}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"model {result['model']}, {args.steps} steps x {args.rounds} rounds, {args.threads} threads")
        print(f"C (llama.cpp API)      : {c_med:8.2f} us/step   {c_us}")
        print(f"alpaca2 (Python API)   : {py_med:8.2f} us/step   {py_us}")
        print(f"binding overhead       : {py_med - c_med:8.2f} us/step")
        print(f"ctx.logits (copy)      : {copy_us:8.2f} us/access ({n_vocab} floats; "
              f"{copy_us / py_med:.2%} of a step, paid only by loops that read logits)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
