"""Load on `alpaca2 serve`: requests/sec and latency at 1, 4, 16 concurrent clients.

    python benchmarks/load.py [--model GGUF] [--clients 1,4,16] [--requests 3] [-n 32]
                              [--parallel 4] [-t 2] [--out benchmarks/results/server-load.md]

Starts the server on 127.0.0.1 (a free port; loopback only) with the real Gemma 3 270M by
default, then for each client count runs that many clients at once, each sending --requests
streamed /v1/completions requests one after another (a different short prompt each, greedy,
ignore_eos so every answer is exactly -n tokens), and stops: the run is bounded by
clients x requests.  Latency is per request, from sending it to the last byte; TTFT to the first
text chunk.  Requests/sec is completed requests over the wall time of the level.  The server
is stopped with SIGTERM at the end and must exit 0.  Results are printed (and written with
--out) as markdown with the command, commit, machine and date.
"""
import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import threading
import time

import httpx

from alpaca2.bench import machine_description

HERE = os.path.dirname(os.path.abspath(__file__))

TOPICS = ["the sea", "a small town", "the history of tea", "mountains in winter", "a busy market", "the moon",
          "an old library", "trains", "a garden in spring", "rivers", "the night sky", "bread", "a lighthouse",
          "bicycles", "the desert", "music", "a forest", "rain", "clocks", "islands"]


def percentile(values, q):
    xs = sorted(values)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def start_server(model, parallel, n_ctx, threads):
    cmd = [sys.executable, "-m", "alpaca2", "serve", "-m", model, "--host", "127.0.0.1", "--port", "0",
           "-np", str(parallel), "-c", str(n_ctx), "-t", str(threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines, ready, url = [], threading.Event(), []

    def pump():
        for line in proc.stderr:
            lines.append(line)
            m = re.search(r"serving .* on (http://\S+)/v1 ", line)
            if m:
                url.append(m.group(1))
                ready.set()
        ready.set()
    threading.Thread(target=pump, daemon=True).start()
    if not ready.wait(300) or not url:
        proc.kill()
        raise SystemExit("the server did not start:\n" + "".join(lines))
    return proc, url[0], lines


async def one_request(client, url, prompt, n):
    body = {"prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft = None
    tokens = 0
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {await r.aread()}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            d = json.loads(line[6:])
            if ttft is None and d["choices"] and d["choices"][0]["text"]:
                ttft = time.perf_counter() - t0
            if d.get("usage"):
                tokens = d["usage"]["completion_tokens"]
    return time.perf_counter() - t0, ttft, tokens


async def run_level(url, clients, requests, n, offset):
    latencies, ttfts, tokens = [], [], []
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def worker(w):
            for i in range(requests):
                k = offset + w * requests + i
                prompt = f"Write a short paragraph about {TOPICS[k % len(TOPICS)]} (note {k}):"
                lat, ttft, ntok = await one_request(client, url, prompt, n)
                latencies.append(lat)
                ttfts.append(ttft if ttft is not None else lat)
                tokens.append(ntok)
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(clients)))
        wall = time.perf_counter() - t0
    return {"clients": clients, "requests": len(latencies), "wall_s": wall,
            "req_per_s": len(latencies) / wall, "tok_per_s": sum(tokens) / wall,
            "p50_s": percentile(latencies, 0.5), "p99_s": percentile(latencies, 0.99),
            "ttft_p50_s": percentile(ttfts, 0.5), "ttft_p99_s": percentile(ttfts, 0.99),
            "tokens": sum(tokens)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="GGUF (default: Gemma 3 270M Q4_K_M from the demo package)")
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--requests", type=int, default=3, help="requests per client, one after another")
    ap.add_argument("-n", "--max-tokens", type=int, default=32)
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("-c", "--ctx-size", type=int, default=4096)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    model = args.model
    if model is None:
        from alpaca2.cli import demo_model_path
        model = demo_model_path()
    proc, url, lines = start_server(model, args.parallel, args.ctx_size, args.threads)
    rows = []
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=10).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("no /health answer")
            time.sleep(0.2)
        asyncio.run(run_level(url, 1, 1, args.max_tokens, 10_000))        # warm-up, not recorded
        offset = 0
        for c in [int(x) for x in args.clients.split(",") if x.strip()]:
            row = asyncio.run(run_level(url, c, args.requests, args.max_tokens, offset))
            offset += c * args.requests
            rows.append(row)
            print(f"{c:3d} clients: {row['req_per_s']:.2f} req/s, p50 {row['p50_s']:.2f} s, "
                  f"p99 {row['p99_s']:.2f} s, {row['tok_per_s']:.1f} tok/s", file=sys.stderr)
        metrics = httpx.get(url + "/metrics", timeout=30).text
    finally:
        proc.terminate()
        rc = proc.wait(120)
    if rc != 0:
        raise SystemExit(f"the server exited with {rc}:\n" + "".join(lines))
    steps = re.search(r"^alpaca2_decode_steps_total (\S+)", metrics, re.M)
    secs = re.search(r"^alpaca2_decode_seconds_total (\S+)", metrics, re.M)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=HERE).stdout.strip()
    import alpaca2
    out = [
        "# alpaca2 serve under load: requests/sec and latency (loopback)",
        "",
        f"- command: `python benchmarks/load.py {' '.join(sys.argv[1:])}`".rstrip() + "",
        f"- commit: {commit} (llama.cpp {alpaca2.LLAMA_CPP_COMMIT}); machine: {machine_description()}",
        f"- date: {time.strftime('%Y-%m-%d')}",
        "",
        f"model: {os.path.basename(model)}; server: --parallel {args.parallel}, -c {args.ctx_size}, "
        f"-t {args.threads}; each request: streamed /v1/completions, a ~12-token prompt, "
        f"{args.max_tokens} tokens (greedy, ignore_eos); each client sends {args.requests} requests "
        "one after another.  Latency: send to last byte; TTFT: to the first text.",
        "",
        "| clients | requests | req/s | p50 latency (s) | p99 latency (s) | p50 TTFT (s) | p99 TTFT (s) | tok/s |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        out.append(f"| {r['clients']} | {r['requests']} | {r['req_per_s']:.2f} | {r['p50_s']:.2f} | {r['p99_s']:.2f} "
                   f"| {r['ttft_p50_s']:.2f} | {r['ttft_p99_s']:.2f} | {r['tok_per_s']:.1f} |")
    if steps and secs and float(steps.group(1)):
        out += ["", f"Server side: {int(float(steps.group(1)))} batched decode steps, "
                f"{1000 * float(secs.group(1)) / float(steps.group(1)):.1f} ms per step on average "
                "(decode + sampling)."]
    text = "\n".join(out) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)


if __name__ == "__main__":
    main()
