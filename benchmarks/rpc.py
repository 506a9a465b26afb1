"""Tokens/sec of one model run locally against the same model split over rpc-servers on loopback.

    python benchmarks/rpc.py --synthetic 1.3b-q4_0 -p 128 -n 32 -r 3 -t 2 \
        --out benchmarks/results/cpu-rpc-1.3b-q4_0

Two `alpaca2 rpc-server` processes on 127.0.0.1 (each with -t threads).  Every configuration's
model is loaded once (the load time includes sending the weights), then the pp / tg tests of
alpaca2.bench run interleaved, round by round, so a noisy neighbour slows all of them alike.
Loopback measures the protocol's and the split's cost (one round trip per device per step,
activations copied between processes), not a network's.

OMP_WAIT_POLICY=passive (client and servers) unless set: three processes on a few shared cores
with OpenMP threads that spin while idle slow each other down several times over (measured on
2 cores: tg 2.0 t/s spinning, 12.1 passive, for the same split).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import socket
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
os.environ.setdefault("OMP_WAIT_POLICY", "passive")   # read by libgomp when alpaca2 loads it; servers inherit it

import alpaca2                                   # noqa: E402
from alpaca2 import bench, rpc                  # noqa: E402

CONFIGS = [
    # name, number of servers, tensor_split (servers..., local); None = no RPC
    ("local", 0, None),
    ("1 server + local (1:1)", 1, [1, 1]),
    ("2 servers + local (1:1:1)", 2, [1, 1, 1]),
    ("2 servers, nothing local (1:1:0)", 2, [1, 1, 0]),
]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_servers(n, threads):
    procs, endpoints = [], []
    for _ in range(n):
        port = free_port()
        procs.append(subprocess.Popen([sys.executable, "-m", "alpaca2", "rpc-server", "--port", str(port),
                                       "-t", str(threads)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        endpoints.append(f"127.0.0.1:{port}")
    for ep in endpoints:
        deadline = time.monotonic() + 60
        while True:
            try:
                rpc.probe(ep, timeout=2)
                break
            except alpaca2.ModelLoadError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
    return procs, endpoints


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--synthetic", default="1.3b-q4_0")
    p.add_argument("--workdir", default="/root/bench-models")
    p.add_argument("-p", "--n-prompt", type=int, default=128)
    p.add_argument("-n", "--n-gen", type=int, default=32)
    p.add_argument("-r", "--repetitions", type=int, default=3)
    p.add_argument("-t", "--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="write OUT.md and OUT.json")
    args = p.parse_args()
    if args.model:
        path = args.model
    else:
        import bench as bench_script                # benchmarks/bench.py: the synthetic models
        os.makedirs(args.workdir, exist_ok=True)
        path = bench_script.synthetic_models(args.synthetic, args.workdir)[0]

    procs, endpoints = start_servers(2, args.threads)
    loaded = []
    tests = [("pp", args.n_prompt, bench.time_pp), ("tg", args.n_gen, bench.time_tg)]
    try:
        for name, n_servers, split in CONFIGS:
            kw = dict(rpc_servers=endpoints[:n_servers], tensor_split=split) if n_servers else {}
            t0 = time.perf_counter()
            model = alpaca2.Model(path, **kw)
            load_s = time.perf_counter() - t0
            ctx = alpaca2.Context(model, n_ctx=max(args.n_prompt, args.n_gen) + 64, n_batch=2048,
                                  n_threads=args.threads)
            for kind, n, fn in tests:
                fn(ctx, model, n, 0)                                # warm-up
            loaded.append({"config": name, "model": model, "ctx": ctx, "load_s": load_s,
                           "samples": {kind: [] for kind, _, _ in tests}})
            print(f"{name:36s} loaded in {load_s:.2f} s", file=sys.stderr)
        for rnd in range(args.repetitions):
            for item in loaded:
                for kind, n, fn in tests:
                    item["samples"][kind].append(n / fn(item["ctx"], item["model"], n, rnd + 1))
            print(f"round {rnd + 1}: " + ", ".join(
                f"{it['config']}: " + " ".join(f"{k} {v[-1]:.1f}" for k, v in it["samples"].items())
                for it in loaded), file=sys.stderr)
        model0 = loaded[0]["model"]
        rows = [{"config": it["config"], "load_s": it["load_s"], "test": f"{kind}{n}", "samples": it["samples"][kind],
                 "model_desc": model0.desc, "size": model0.size}
                for it in loaded for kind, n, _ in tests]
    finally:
        for it in reversed(loaded):
            it["ctx"].close()
            it["model"].close()
        for pr in procs:
            pr.kill()
            pr.wait()

    if args.out:
        write(args, path, rows)


def write(args, path, rows):
    commit = subprocess.run(["git", "-C", HERE, "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    cmd = "python benchmarks/rpc.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    local = {r["test"]: statistics.median(r["samples"]) for r in rows if r["config"] == "local"}
    lines = [
        "# One model local vs split over rpc-servers on loopback (CPU)", "",
        f"- command: `{cmd}`",
        f"- model: {os.path.basename(path)} ({rows[0]['model_desc']}, {rows[0]['size'] / 2**20:.0f} MiB)",
        f"- commit: {commit} (llama.cpp {alpaca2.LLAMA_CPP_COMMIT})",
        f"- machine: {bench.machine_description()}",
        f"- date: {datetime.date.today().isoformat()}; {args.repetitions} interleaved rounds, {args.threads} "
        "threads in the client and in each rpc-server (one device computes at a time: layers run in order), "
        f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}",
        "",
        "t/s: median (mean ± stddev) of the rounds. Load: Model() until it returns (weights sent over loopback).",
        "",
        "| configuration | test | t/s | vs local | load s |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for r in rows:
        med = statistics.median(r["samples"])
        mean = statistics.mean(r["samples"])
        sd = statistics.stdev(r["samples"]) if len(r["samples"]) > 1 else 0.0
        lines.append(f"| {r['config']} | {r['test']} | {med:.2f} ({mean:.2f} ± {sd:.2f}) | "
                     f"{med / local[r['test']]:.3f} | {r['load_s']:.2f} |")
    out_md = args.out + ".md"
    with open(out_md, "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(args.out + ".json", "w") as f:
        json.dump({"command": cmd, "commit": commit, "rows": rows}, f, indent=1)
    print(out_md, file=sys.stderr)


if __name__ == "__main__":
    main()
