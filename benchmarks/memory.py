"""Peak memory of load + a 4096-token context, against the model file's size.

    python benchmarks/memory.py MODEL.gguf [MODEL2.gguf ...] [--n-ctx 4096] [--out results/x.md]

Each model is measured in a fresh process: peak RSS (ru_maxrss) after loading the model, making a
context of n_ctx tokens and decoding a full n_batch prompt; with a GPU, the device memory used too.
With mmap (the default), RSS counts the pages of the file that were touched.
"""
import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, resource, sys
import alpaca2
path, n_ctx = sys.argv[1], int(sys.argv[2])
gpus = [d for d in alpaca2.devices() if d["type"] == "gpu"]
free0 = sum(d["memory_free"] for d in gpus)
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
m = alpaca2.Model(path)
rss_model = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
c = alpaca2.Context(m, n_ctx=n_ctx, n_batch=512)
c.decode([m.bos] + [5] * 511)
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
gpus = [d for d in alpaca2.devices() if d["type"] == "gpu"]
used_gpu = free0 - sum(d["memory_free"] for d in gpus) if gpus else None
print(json.dumps({"rss_python_mib": rss0 / 1024, "rss_after_load_mib": rss_model / 1024,
                  "rss_peak_mib": rss / 1024, "gpu_used_mib": used_gpu / 2**20 if used_gpu is not None else None,
                  "model_size_mib": m.size / 2**20, "n_ctx": c.n_ctx}))
"""


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+")
    p.add_argument("--n-ctx", type=int, default=4096)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    lines = [f"| model | file MiB | tensors MiB | RSS: Python + alpaca2 | RSS after load | peak RSS, n_ctx {args.n_ctx} | "
             "peak / file | GPU MiB |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for path in args.models:
        out = subprocess.run([sys.executable, "-c", CHILD, path, str(args.n_ctx)], capture_output=True, text=True,
                             check=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        file_mib = os.path.getsize(path) / 2**20
        gpu = f"{r['gpu_used_mib']:.0f}" if r["gpu_used_mib"] is not None else "–"
        lines.append(f"| {os.path.basename(path)} | {file_mib:.0f} | {r['model_size_mib']:.0f} | "
                     f"{r['rss_python_mib']:.0f} | {r['rss_after_load_mib']:.0f} | {r['rss_peak_mib']:.0f} | "
                     f"{r['rss_peak_mib'] / file_mib:.2f} | {gpu} |")
    table = "\n".join(lines) + "\n"
    if args.out:
        with open(args.out, "w") as f:
            f.write(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
