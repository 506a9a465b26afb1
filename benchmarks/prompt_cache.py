"""The host-memory prompt cache (--cache-ram) of `alpaca2 serve`: a prompt whose slot was given up,
decoded cold against the same prompt loaded back from host memory.

    python benchmarks/prompt_cache.py [--shape small] [--words 600] [--rounds 5] [-t 1]

One server with one slot (-np 1, --cache-ram 256).  Each round sends a fresh long prompt A (cold:
every token decoded), then a short prompt B (takes the slot: A's KV state goes to host memory),
then A again (its state is loaded back; one token decoded).  Reported per case: prompt tokens
decoded (timings.prompt_n), reused (timings.cache_n), the server's prompt_ms and the client's
wall time of the whole request (n_predict 4), medians over the rounds, and the time the restore
itself took (the server's --verbose line "prompt cache update took"); the greedy answers of the
cold and the restored request must be equal.  A local model made with alpaca2.testing (random
weights), so nothing is downloaded.
"""
from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

WORDS = ("knight dragon forest river mountain castle sword golden wizard fairy kingdom quest brave "
         "whisper ancient village storm night light journey").split()


def start_server(model, threads, cache_ram):
    cmd = [sys.executable, "-m", "alpaca2", "serve", "-m", str(model), "--port", "0", "-t", str(threads),
           "-np", "1", "-c", "4096", "--cache-ram", str(cache_ram), "-v"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    found = threading.Event()
    url, update_ms = [], []

    def pump():
        for line in proc.stderr:
            m = re.search(r"serving .* on (http://\S+)/v1 ", line)
            if m:
                url.append(m.group(1))
                found.set()
            m = re.search(r"prompt cache update took ([0-9.]+) ms", line)
            if m:
                update_ms.append(float(m.group(1)))
        found.set()
    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    if not found.wait(120) or not url:
        proc.kill()
        raise SystemExit("the server did not start")
    return proc, reader, url[0], update_ms


def complete(url, prompt):
    t0 = time.perf_counter()
    r = httpx.post(url + "/completion", json={"prompt": prompt, "n_predict": 4, "temperature": 0,
                                              "cache_prompt": True}, timeout=300)
    wall = (time.perf_counter() - t0) * 1e3
    r.raise_for_status()
    d = r.json()
    return {"prompt_n": d["timings"]["prompt_n"], "cache_n": d["timings"]["cache_n"],
            "prompt_ms": d["timings"]["prompt_ms"], "wall_ms": wall, "content": d["content"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="small", help="alpaca2.testing shape (tiny, small; default small)")
    p.add_argument("--words", type=int, default=600, help="words in the long prompt (default 600)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("-t", "--threads", type=int, default=1)
    args = p.parse_args(argv)
    from alpaca2 import testing
    tmp = Path(tempfile.mkdtemp(prefix="alpaca2-prompt-cache-"))
    tok = testing.train_tokenizer(tmp / "spm.model", vocab_size=800)
    model = testing.make_model(tmp / f"{args.shape}.gguf", shape=args.shape, tokenizer=tok)
    proc, reader, url, update_ms = start_server(model, args.threads, 256)
    rows = {"cold": [], "restored": []}
    try:
        complete(url, "warm up")
        for r in range(args.rounds):
            long_prompt = f"Round {r}. " + " ".join(WORDS[(r * 7 + i * 3) % len(WORDS)] for i in range(args.words))
            cold = complete(url, long_prompt)
            complete(url, f"Something else, round {r}.")
            warm = complete(url, long_prompt)
            assert warm["content"] == cold["content"], "the restored prompt answered differently"
            rows["cold"].append(cold)
            rows["restored"].append(warm)
    finally:
        proc.terminate()
        proc.wait(30)
        reader.join(10)                 # the log read to its end
    n_restores = len(rows["restored"])
    print(f"shape {args.shape}, {args.words}-word prompt, {args.rounds} rounds, -t {args.threads}, -np 1, "
          "--cache-ram 256, medians\n")
    print("| case | prompt tokens decoded | reused | prompt_ms | request wall ms |")
    print("|---|---|---|---|---|")
    for name, rs in rows.items():
        med = {k: statistics.median(x[k] for x in rs) for k in ("prompt_n", "cache_n", "prompt_ms", "wall_ms")}
        print(f"| {name} | {med['prompt_n']:.0f} | {med['cache_n']:.0f} | {med['prompt_ms']:.1f} | "
              f"{med['wall_ms']:.1f} |")
    # the restored requests' updates are every third one (cold, other, restored per round)
    restores = update_ms[-3 * n_restores + 2::3] if update_ms else []
    if restores:
        print(f"\nthe cache update of a restored request (save the slot, load the prompt): median "
              f"{statistics.median(restores):.1f} ms (server log)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
