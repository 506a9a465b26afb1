"""Leak loops for tests/test_hardening.py (run in a fresh interpreter; prints JSON).

    python tests/leak_loops.py MODEL [SCALE]      # SCALE 1.0 = the issue's counts

Each loop warms up first (a tenth of its count, at least a few rounds), then measures the resident
set size before and after the rest.  glibc's malloc keeps freed memory in its arenas, so a real
leak shows as steady growth over the loop, not as the first rounds' allocations.
"""
import gc
import json
import os
import sys

import alpaca2


def rss_kb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def measure(name, n, body, results):
    warm = max(5, n // 10)
    for i in range(warm):
        body(i)
    gc.collect()
    before = rss_kb()
    for i in range(warm, n):
        body(i)
    gc.collect()
    after = rss_kb()
    results[name] = {"n": n, "rss_before_kb": before, "rss_after_kb": after, "growth_kb": after - before}


def main(path, scale):
    results = {}
    n = lambda full: max(20, int(full * scale))  # noqa: E731

    def load_close(i):
        alpaca2.Model(path).close()
    measure("model_load_close", n(200), load_close, results)

    model = alpaca2.Model(path)

    def ctx_create_free(i):
        alpaca2.Context(model, n_ctx=256, n_batch=64, n_threads=1).close()
    measure("context_create_free", n(500), ctx_create_free, results)

    ctx = alpaca2.Context(model, n_ctx=256, n_batch=64, n_threads=1)
    sampler = alpaca2.Sampler(temp=0.8, seed=1, repeat_penalty=1.1)
    ctx.decode(model.tokenize("床前明月光，"))

    def decode_sample(i):
        if ctx.n_past() >= 250:
            ctx.seq_rm(0, 8, -1)
            ctx.decode([5])
        token = sampler.sample(ctx)
        sampler.accept(token)
        model.token_to_piece(token)
        ctx.decode_token(token)
    measure("decode_sample_steps", n(10000), decode_sample, results)
    ctx.close()
    sampler.close()

    llm = alpaca2.Llama(model, n_ctx=256, n_threads=1, n_batch=64, seed=1)
    session = alpaca2.ChatSession(llm, max_tokens=8, temp=0.7)

    def chat_turn(i):
        if i % 5 == 0:
            session.reset()
        session.send(f"第{i}轮：你好 hello", stream=False)
    measure("chat_turns_with_resets", n(1000), chat_turn, results)
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 1.0)
