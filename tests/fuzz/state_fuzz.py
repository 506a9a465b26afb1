"""A seeded mutation fuzzer for saved states of recurrent (Mamba, Mamba-2) and hybrid (Granite
hybrid) models (issue 14).

It saves real states from tiny models (one sequence, and two sequences in a context with
n_seq_max=2), walks their fields (alpaca2._state_check's layout), and makes mutated copies: every
metadata field at edge values, truncations at every field boundary, flipped bytes, cells
duplicated or moved to other sequences.  Each is loaded with Context.load_state in a worker
process and, when the load succeeds, the context decodes on every sequence.  Every case must end
in an exception (StateError, or ContextFullError/DecodeError from the decode after a load) or a
clean load: a signal or a hang is a failure.

    python tests/fuzz/state_fuzz.py --cases 2000 --seed 1
    python tests/fuzz/state_fuzz.py --no-precheck        # what llama.cpp alone does
"""
from __future__ import annotations

import argparse
import collections
import os
import random
import struct
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import gguf_fuzz  # noqa: E402

KINDS = ("mamba", "mamba2", "hybrid")
EDGE_U32 = [0, 1, 2, 3, 255, 256, 257, 2 ** 16, 2 ** 31 - 1, 2 ** 31, 2 ** 32 - 1, 2 ** 32 - 2]
EDGE_I32 = [-1, -2, 0, 1, 2, 63, 64, 65, 2 ** 31 - 1, -2 ** 31, 2 ** 30]
EDGE_U64 = [0, 1, 4, 2 ** 32, 2 ** 63, 2 ** 64 - 1, 2 ** 40]


def make_models(workdir):
    from alpaca2 import testing_archs
    workdir = Path(workdir)
    mamba = testing_archs.make_mamba_model(workdir / "mamba.gguf")
    tokenizer = str(workdir / "mamba.tokenizer.model")
    mamba2 = testing_archs.make_mamba2_model(workdir / "mamba2.gguf", tokenizer=tokenizer)
    hybrid = testing_archs.make_granite_hybrid_model(workdir / "hybrid.gguf", tokenizer=tokenizer)
    return {"mamba": mamba, "mamba2": mamba2, "hybrid": hybrid}


SAVE = r"""
import sys, alpaca2
path, n_seq, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
m = alpaca2.Model(path)
c = alpaca2.Context(m, n_ctx=64, n_batch=32, n_threads=1, n_seq_max=n_seq)
for s in range(n_seq):
    c.decode(m.tokenize("hello 你好" * (s + 1), add_bos=True), seq_id=s)
open(out, "wb").write(c.save_state())
"""


def seed_states(models, workdir):
    """{(kind, n_seq_max): state bytes}, saved in subprocesses."""
    import subprocess
    out = {}
    for kind, path in models.items():
        for n_seq in (1, 2):
            f = Path(workdir) / f"{kind}-{n_seq}.state"
            subprocess.run([sys.executable, "-c", SAVE, path, str(n_seq), str(f)], check=True,
                           capture_output=True)
            out[(kind, n_seq)] = f.read_bytes()
    return out


def fields(data):
    """(name, offset, fmt) of every metadata field of a state of these models, and the cell
    records ((start, end) per section), walking the layout without checks."""
    out, cells = [], []
    pos = 0

    def field(name, fmt):
        nonlocal pos
        v = struct.unpack_from(fmt, data, pos)[0]
        out.append((name, pos, fmt))
        pos += struct.calcsize(fmt)
        return v

    n = field("arch length", "<I")
    pos += n
    arch = data[4:4 + n].decode()
    if arch == "granitehybrid":                 # the attention KV cache comes first
        n_stream = field("kv n_stream", "<I")
        for s in range(n_stream):
            cc = field(f"kv cell_count s{s}", "<I")
            start = pos
            for i in range(cc):
                field(f"kv pos {i}", "<i")
                ns = field(f"kv n_seq_id {i}", "<I")
                for j in range(ns):
                    field(f"kv seq_id {i}.{j}", "<i")
            cells.append(("kv", start, pos, cc))
            if cc == 0:
                continue
            field("kv v_trans", "<I")
            nl = field("kv n_layer", "<I")
            vt = struct.unpack_from("<I", data, pos - 8)[0]
            for part in "KV":
                for il in range(nl):
                    field(f"kv {part} type {il}", "<i")
                    if part == "V" and vt:
                        el = field(f"kv V elem {il}", "<I")
                        w = field(f"kv V width {il}", "<I")
                        pos += el * w * cc
                    else:
                        row = field(f"kv {part} row {il}", "<Q")
                        pos += row * cc
    cc = field("rs cell_count", "<I")
    start = pos
    for i in range(cc):
        field(f"rs pos {i}", "<i")
        ns = field(f"rs n_seq_id {i}", "<I")
        for j in range(ns):
            field(f"rs seq_id {i}.{j}", "<i")
    cells.append(("rs", start, pos, cc))
    field("rs s_trans", "<I")
    field("rs n_layer", "<I")
    # R rows, then S rows, of the layers that have them: as many as there are, till the end
    n_r = 1 if arch == "granitehybrid" else 2
    for part in "RS":
        for il in range(n_r):
            field(f"rs {part} type {il}", "<i")
            row = field(f"rs {part} row {il}", "<Q")
            pos += row * cc
    assert pos == len(data), (pos, len(data))
    return out, cells


def put(data, off, fmt, value):
    b = bytearray(data)
    struct.pack_into(fmt, b, off, value)
    return bytes(b)


def m_field(data, rng):
    fs, _ = fields(data)
    while True:
        name, off, fmt = rng.choice(fs)
        values = {"<I": EDGE_U32, "<i": EDGE_I32, "<Q": EDGE_U64}[fmt]
        old = struct.unpack_from(fmt, data, off)[0]
        value = rng.choice(values + [old + 1, max(old - 1, 0) if fmt != "<i" else old - 1, old * 2])
        if fmt == "<i":
            value = max(min(value, 2 ** 31 - 1), -2 ** 31)
        elif fmt == "<I":
            value = value % 2 ** 32
        else:
            value = value % 2 ** 64
        yield f"{name} = {value}", put(data, off, fmt, value)


def m_two_fields(data, rng):
    fs, _ = fields(data)
    while True:
        out, labels = data, []
        for _ in range(2):
            name, off, fmt = rng.choice([f for f in fs if "seq" in f[0] or "pos" in f[0] or "count" in f[0]]
                                        or fs)
            value = rng.choice({"<I": EDGE_U32, "<i": EDGE_I32, "<Q": EDGE_U64}[fmt][:8])
            if fmt == "<i":
                value = max(min(value, 2 ** 31 - 1), -2 ** 31)
            out = put(out, off, fmt, value % (2 ** 64) if fmt == "<Q" else value % 2 ** 32 if fmt == "<I" else value)
            labels.append(f"{name} = {value}")
        yield "; ".join(labels), out


def m_truncate(data, rng):
    fs, _ = fields(data)
    cuts = sorted({off + d for _, off, _ in fs for d in (0, 1, 4)} | {len(data) - 1})
    rng.shuffle(cuts)
    for c in cuts:
        if 0 < c < len(data):
            yield f"truncate at {c}", data[:c]


def m_flip(data, rng):
    fs, _ = fields(data)
    meta = [off + k for _, off, fmt in fs for k in range(struct.calcsize(fmt))]
    while True:
        b = bytearray(data)
        offs = [rng.choice(meta) for _ in range(rng.choice((1, 2, 4)))]
        for off in offs:
            b[off] ^= 1 << rng.randrange(8)
        yield f"flip bytes {offs}", bytes(b)


def m_cells(data, rng):
    """Cell records rewritten: positions, sequence sets (shared, duplicate, none)."""
    _, cells = fields(data)
    while True:
        section, start, end, cc = rng.choice(cells)
        if cc == 0:
            yield f"{section}: no cells", data
            continue
        recs = []
        for i in range(cc):
            pos = rng.choice([0, 1, 5, -1, 63, 64, 2 ** 31 - 1, i])
            seqs = rng.choice([[0], [1], [0, 1], [], [1, 0], [0, 0], [i], [2], [255]])
            recs.append(struct.pack("<iI", pos, len(seqs)) + b"".join(struct.pack("<i", s) for s in seqs))
        new = data[:start] + b"".join(recs) + data[end:]
        yield f"{section} cells -> {[r.hex() for r in recs]}", new


CATEGORIES = {"field": m_field, "two_fields": m_two_fields, "truncate": m_truncate, "flip": m_flip,
              "cells": m_cells}


def cases(states, n, seed=0):
    """n mutated states, round-robin over (seed state, category): yields (key, category, label, bytes)."""
    gens = collections.OrderedDict()
    k = 0
    for key, data in states.items():
        for name, make in CATEGORIES.items():
            gens[(key, name)] = iter(make(data, random.Random(seed * 1000 + k)))
            k += 1
    made = 0
    while made < n and gens:
        for gk in list(gens):
            if made >= n:
                break
            try:
                label, mutated = next(gens[gk])
            except StopIteration:
                del gens[gk]
                continue
            made += 1
            yield gk[0], gk[1], label, mutated


WORKER = r"""
import os, sys, alpaca2
import alpaca2._state_check as sc
if os.environ.get("STATE_FUZZ_NO_PRECHECK"):
    sc.check_state = lambda data, expect=None: {}
models = dict(arg.split("=", 1) for arg in sys.argv[1:])
ctxs = {}
def context(kind, n_seq):
    if (kind, n_seq) not in ctxs:
        m = alpaca2.Model(models[kind])
        ctxs[(kind, n_seq)] = (m, alpaca2.Context(m, n_ctx=64, n_batch=32, n_threads=1, n_seq_max=n_seq))
    return ctxs[(kind, n_seq)]
out = sys.stdout
out.write("READY\n"); out.flush()
for line in sys.stdin:
    idx, kind, n_seq, path = line.split()
    out.write(f"START {idx}\n"); out.flush()
    m, c = context(kind, int(n_seq))
    c.clear()
    data = open(path, "rb").read()
    try:
        c.load_state(data)
    except alpaca2.StateError as e:
        out.write(f"DONE {idx} StateError {str(e)[:200]}\n"); out.flush()
        continue
    except Exception as e:
        out.write(f"DONE {idx} other {type(e).__name__}: {str(e)[:200]}\n"); out.flush()
        continue
    done = []
    for s in range(int(n_seq)):
        for tokens in ([5], [6, 7, 8]):
            try:
                c.decode(tokens, seq_id=s)
                c.logits
                done.append("ok")
            except alpaca2.Alpaca2Error as e:
                done.append(type(e).__name__)
    out.write(f"DONE {idx} loaded {done}\n"); out.flush()
"""


def run_cases(case_list, models, workdir, timeout=20.0, precheck=True, log=None):
    """Returns [(key, category, label, outcome, detail)]; outcome: precheck (StateError from
    alpaca2's check), llama (StateError after llama.cpp refused), loaded, other, crash, hang."""
    env = dict(os.environ, GGML_NO_BACKTRACE="1")
    env.pop("STATE_FUZZ_NO_PRECHECK", None)
    if not precheck:
        env["STATE_FUZZ_NO_PRECHECK"] = "1"
    args = [f"{k}={v}" for k, v in models.items()]
    results, proc = [], None
    for i, (key, category, label, data) in enumerate(case_list):
        path = Path(workdir) / f"case-{i}.state"
        path.write_bytes(data)
        if proc is None:
            proc = gguf_fuzz._Worker(env, code=WORKER, args=args)
            if proc.read_line(60) != "READY\n":
                raise RuntimeError("the state fuzz worker did not start")
        proc.send(f"{i} {key[0]} {key[1]} {path}")
        outcome, detail, t0 = None, "", time.monotonic()
        while outcome is None:
            line = proc.read_line(max(0.0, timeout - (time.monotonic() - t0)))
            if line is None:
                proc.kill()
                outcome, detail = "hang", f"no answer in {timeout:.0f} s"
            elif line == "":
                rc = proc.kill()
                outcome, detail = "crash", f"exit status {rc}"
            elif line.startswith(f"DONE {i} "):
                kind, _, detail = line.rstrip("\n")[len(f"DONE {i} "):].partition(" ")
                if kind == "StateError":
                    kind = "llama" if "does not fit this context" in detail else "precheck"
                outcome = kind
        if outcome in ("crash", "hang"):
            proc = None
        results.append((key, category, label, outcome, detail))
        if log and outcome in ("crash", "hang", "other"):
            log(f"case {i} {key} {category}: {label} -> {outcome} {detail}")
        path.unlink()
    if proc is not None:
        proc.close()
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=20.0)
    ap.add_argument("--no-precheck", action="store_true")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        models = make_models(tmp)
        states = seed_states(models, tmp)
        t0 = time.monotonic()
        results = run_cases(cases(states, args.cases, args.seed), models, tmp, args.timeout,
                            precheck=not args.no_precheck, log=print)
    counts = collections.defaultdict(collections.Counter)
    for key, category, _, outcome, _ in results:
        counts[f"{key[0]}/{key[1]} {category}"][outcome] += 1
    total = collections.Counter(r[3] for r in results)
    print(f"{len(results)} cases in {time.monotonic() - t0:.0f} s (seed {args.seed}, pre-check "
          f"{'off' if args.no_precheck else 'on'})")
    for k, v in sorted(counts.items()):
        print(f"  {k:22} " + ", ".join(f"{a} {b}" for a, b in sorted(v.items())))
    print("  total                  " + ", ".join(f"{a} {b}" for a, b in sorted(total.items())))
    return 1 if any(total[k] for k in ("crash", "hang", "other")) else 0


if __name__ == "__main__":
    sys.exit(main())
