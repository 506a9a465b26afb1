"""Run llama.cpp's own server test suite against llama-server and against `alpaca2 serve`.

    python benchmarks/server_suite.py [--only alpaca2|llama-server] [-k EXPR] [--timeout 60]

The suite (vendor/llama.cpp/tools/server/tests, pytest) starts its server through
LLAMA_SERVER_BIN_PATH and takes its models from the Hugging Face Hub.  Here nothing may be
downloaded, so this script:

1. makes local substitute models with alpaca2.testing (random weights, a trained SentencePiece
   vocabulary): a chat model with a ChatML template (for the stories260K/stories15M presets), the
   same with FIM token ids (the infill preset), and one with mean pooling (the embedding presets);
   the reranker preset gets the embedding model (no rank head: both servers score by the first value of
   the last token's hidden state, llama-server's --reranking on such a model); the router preset (no
   model: router mode, which alpaca2 does not have) gets the chat model, for both servers;
2. copies the suite to build/server-suite/root-<server>/tools/server/tests (llama.cpp's files are
   never committed or edited in place; the copy keeps llama.cpp's layout, so test_tools_builtin's
   PROJECT_ROOT, four levels up, is a llama.cpp-shaped root outside any git repository: git's
   search for one stops at build/server-suite, GIT_CEILING_DIRECTORIES) and adds a pytest plugin
   that points every preset at those files and skips the Hub pre-download;
3. runs it once per server (not in parallel, one port range each, -p no:cacheprovider, a
   per-test timeout) and writes benchmarks/results/server-suite.md: passed/failed/skipped per
   test file for each server, and the tests llama-server passes that alpaca2 fails.

Random weights mean the tests that check generated text for words of the stories models
("(Ben|lumber)+") fail for both servers alike; the comparison is what matters.
Left out, as in the issue: vision, router/proxy.  test_lora.py's Shakespeare adapter for
stories15M_MOE (a download_file URL) becomes a random LoRA adapter for the chat model, so its
/lora-adapters and per-request "lora" plumbing runs; its text checks fail for both servers alike.
The built-in tools' container tests (docker/podman) skip themselves where neither is installed.
Needs: pip install requests wget filelock pytest-timeout pytest-xdist openai (the suite's requirements).
"""
from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import textwrap
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "vendor" / "llama.cpp" / "tools" / "server" / "tests"
WORK = ROOT / "build" / "server-suite"
RESULTS = ROOT / "benchmarks" / "results" / "server-suite.md"
LEFT_OUT = ["test_vision_api.py", "test_router.py", "test_proxy.py"]

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
          "{% endif %}")

PLUGIN = '''\
"""Made by benchmarks/server_suite.py: point the suite's presets at local model files."""
import os

import utils

MODELS = {models!r}
SUITE_DIR = {suite!r}


def _local(self):
    key = (self.model_hf_repo, self.model_hf_file)
    for (repo, hf_file), path in MODELS.items():
        if self.model_hf_repo is not None and self.model_hf_repo.split(":")[0] == repo and (
                hf_file is None or hf_file == self.model_hf_file):
            self.model_file = path
            self.model_hf_repo = None
            self.model_hf_file = None
            return
    if self.model_hf_repo is not None:
        self.model_file = MODELS[("*", None)]       # any other Hub model: the chat model
        self.model_hf_repo = None
        self.model_hf_file = None
    elif self.model_file is None:                   # the router preset (test_security's CORS tests):
        self.model_file = MODELS[("*", None)]       # no router mode here, the chat model for both servers


_start = utils.ServerProcess.start


def start(self, *args, **kwargs):
    _local(self)
    self.offline = False
    if self.chat_template_file and not os.path.isabs(self.chat_template_file):
        # '../../../models/templates/X.jinja' is relative to the suite's own place in llama.cpp
        self.chat_template_file = os.path.normpath(os.path.join(SUITE_DIR, self.chat_template_file))
    return _start(self, *args, **kwargs)


utils.ServerProcess.start = start

_init = utils.ServerProcess.__init__


def __init__(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    # the suite's ports are 8080 + 10 * xdist worker: moved to a range of our own
    self.server_port = int(os.environ["SUITE_PORT_BASE"]) + (self.server_port - 8080) % 1000


utils.ServerProcess.__init__ = __init__
utils.ServerPreset.load_all = staticmethod(lambda: None)   # nothing to download

_download_file = utils.download_file


def download_file(url, output_file_path=None):
    """A file the suite downloads by URL: test_lora's adapter gets its local substitute, a Hub
    model (test_speculative's draft) the chat model."""
    local = MODELS.get(("file", url.split("/")[-1]))
    if local is not None:
        return local
    if url.endswith(".gguf"):
        return MODELS[("*", None)]
    return _download_file(url, output_file_path)


utils.download_file = download_file            # before the test modules' `from utils import *`
'''


def _with_metadata(src: str, dst: str, new: dict) -> str:
    """A copy of a GGUF file with more metadata keys (name -> (GGUFValueType, value))."""
    import gguf
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata
    reader = gguf.GGUFReader(src, "r")
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    writer = gguf.GGUFWriter(dst, arch=arch, endianess=reader.endianess)
    copy_with_new_metadata(reader, writer, {k: MetadataDetails(t, v) for k, (t, v) in new.items()}, [])
    return dst


def make_models(out: Path) -> dict:
    """The substitute models; returns {(hf_repo, hf_file or None): path}."""
    import gguf
    import numpy as np

    from alpaca2 import testing
    out.mkdir(parents=True, exist_ok=True)
    spm = out / "spm.model"
    if not spm.exists():
        testing.train_tokenizer(spm, vocab_size=800)
    chat = out / "chat.gguf"
    if not chat.exists():
        testing.make_model(chat, tokenizer=spm, name="tiny-chat", chat_template=CHATML)
    fim = out / "fim.gguf"
    if not fim.exists():
        u32 = gguf.GGUFValueType.UINT32
        _with_metadata(str(chat), str(fim), {"tokenizer.ggml.fim_pre_token_id": (u32, 3),
                                             "tokenizer.ggml.fim_suf_token_id": (u32, 4),
                                             "tokenizer.ggml.fim_mid_token_id": (u32, 5)})
    emb = out / "embedding.gguf"
    if not emb.exists():
        _with_metadata(str(chat), str(emb), {"llama.pooling_type": (gguf.GGUFValueType.UINT32, 1)})
    lora = out / "chat-lora.gguf"             # test_lora's adapter (moe_shakespeare15M.gguf) for the chat model
    if not lora.exists():
        reader = gguf.GGUFReader(str(chat))
        tensors = {t.name: np.asarray(t.data) for t in reader.tensors}       # (out, in), as make_model's
        n_layer = 1 + max(int(name.split(".")[1]) for name in tensors if name.startswith("blk."))
        shapes = testing.Weights(0, n_layer, 0, 0, 0, 0, 0.0, 0.0, tensors)
        testing.make_lora(lora, shapes, rank=4, alpha=8.0)
    return {
        ("file", "moe_shakespeare15M.gguf"): str(lora),
        ("ggml-org/test-model-stories260K", None): str(chat),
        ("ggml-org/test-model-stories260K-infill", None): str(fim),
        ("ggml-org/stories15M_MOE", None): str(chat),
        ("ggml-org/models", "bert-bge-small/ggml-model-f16.gguf"): str(emb),
        ("ggml-org/models", "jina-reranker-v1-tiny-en/ggml-model-f16.gguf"): str(emb),
        ("*", None): str(chat),
    }


def prepare(models: dict, name: str) -> Path:
    """A fresh copy of the suite with the plugin, one per server (runs may overlap); returns it."""
    root = WORK / f"root-{name}"
    if root.exists():
        shutil.rmtree(root)
    dst = root / "tools" / "server" / "tests"
    shutil.copytree(SUITE, dst, ignore=shutil.ignore_patterns("tmp", "__pycache__", ".pytest_cache"))
    (dst / "alpaca2_presets.py").write_text(PLUGIN.format(models=models, suite=str(SUITE)))
    return dst


def alpaca2_bin() -> str:
    """An executable that starts `alpaca2 serve` with this Python (for LLAMA_SERVER_BIN_PATH), from
    a snapshot of the installed package (so the run tests one version from start to end)."""
    import alpaca2
    snap = WORK / "pkg"
    if snap.exists():
        shutil.rmtree(snap)
    shutil.copytree(Path(alpaca2.__file__).parent, snap / "alpaca2", ignore=shutil.ignore_patterns("__pycache__"))
    path = WORK / "alpaca2-server"
    path.write_text(f"#!/bin/sh\nPYTHONPATH={snap} exec {sys.executable} -m alpaca2.server \"$@\"\n")
    path.chmod(0o755)
    return str(path)


def llama_server_bin() -> str:
    from alpaca2 import _build_info
    tools = getattr(_build_info, "TOOLS_DIR", None)
    candidates = [os.environ.get("LLAMA_SERVER"), tools and os.path.join(tools, "llama-server"),
                  "/work/main/build/cp311-cp311-linux_x86_64/bin/llama-server"]
    for c in candidates:
        if c and os.path.exists(c):
            return c
    raise SystemExit("llama-server not found: build with ALPACA2_BUILD_TOOLS=1 or set LLAMA_SERVER")


def run(name: str, binary: str, tests: Path, port: int, timeout: int, extra: list, jobs: int = 1) -> Path:
    xml = WORK / f"{name}.xml"
    env = dict(os.environ, LLAMA_SERVER_BIN_PATH=binary, SUITE_PORT_BASE=str(port), PYTHONPATH=str(tests),
               LLAMA_CACHE=str(WORK / "cache"), GIT_CEILING_DIRECTORIES=str(WORK))
    cmd = ["nice", "-n", "5", sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "alpaca2_presets",
           f"--timeout={timeout}", f"--junitxml={xml}", "-m", "not slow", "unit"]
    cmd += [f"--ignore=unit/{f}" for f in LEFT_OUT] + extra
    if jobs > 1:          # the suite gives each xdist worker its own port (8080 + 10 * worker)
        cmd += ["-n", str(jobs)]
    t0 = time.monotonic()
    with open(WORK / f"{name}.log", "w") as log:
        subprocess.run(cmd, cwd=tests, env=env, stdout=log, stderr=subprocess.STDOUT)
    print(f"{name}: {time.monotonic() - t0:.0f} s, log in {WORK / (name + '.log')}", file=sys.stderr)
    return xml


def outcomes(xml: Path) -> dict:
    """{(file, test name): 'passed' | 'failed' | 'skipped'} from a JUnit XML report."""
    out = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        file = case.get("classname", "").split(".")[-1] + ".py"
        status = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                status = "failed"
                break
            if child.tag == "skipped":
                status = "skipped"
        out[(file, case.get("name"))] = status
    return out


def report(results: dict) -> str:
    names = list(results)
    files = sorted({f for r in results.values() for f, _ in r})
    lines = ["# llama.cpp's server test suite: llama-server vs alpaca2 serve", "",
             "Made by `benchmarks/server_suite.py` (local substitute models from `alpaca2.testing`; "
             "left out: " + ", ".join(LEFT_OUT) + "; `-m 'not slow'`).", "",
             "| file | " + " | ".join(f"{n} passed / failed / skipped" for n in names) + " |",
             "|---|" + "---|" * len(names)]
    totals = {n: collections.Counter() for n in names}
    for f in files:
        cells = []
        for n in names:
            c = collections.Counter(s for (ff, _), s in results[n].items() if ff == f)
            totals[n].update(c)
            cells.append(f"{c['passed']} / {c['failed']} / {c['skipped']}")
        lines.append(f"| {f} | " + " | ".join(cells) + " |")
    lines.append("| **total** | " + " | ".join(
        f"**{t['passed']}** / {t['failed']} / {t['skipped']} (of {sum(t.values())})" for t in totals.values()) + " |")
    if "llama-server" in results and "alpaca2" in results:
        ref, ours = results["llama-server"], results["alpaca2"]
        missing = sorted(k for k, s in ref.items() if s == "passed" and ours.get(k) != "passed")
        lines += ["", f"## Passed by llama-server, not by alpaca2 ({len(missing)})", ""]
        lines += [f"- {f}::{t}" for f, t in missing]
        extra = sorted(k for k, s in ours.items() if s == "passed" and ref.get(k) != "passed")
        lines += ["", f"## Passed by alpaca2, not by llama-server ({len(extra)})", ""]
        lines += [f"- {f}::{t}" for f, t in extra]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=["alpaca2", "llama-server"], default=None)
    p.add_argument("--timeout", type=int, default=60, help="seconds per test (default 60)")
    p.add_argument("-j", "--jobs", type=int, default=2, help="pytest-xdist workers (default 2; 1: none)")
    p.add_argument("--reuse", action="store_true", help="report from the last runs' XML files, run nothing")
    p.add_argument("--port", type=int, default=18180, help="first port of the range the suite uses")
    p.add_argument("--output", default=str(RESULTS))
    p.add_argument("--expect", default=None,
                   help="a file of test ids alpaca2 passes (one per line): fail if more than --allow-missing "
                        "of them do not pass this time (CI's regression check)")
    p.add_argument("--allow-missing", type=int, default=3,
                   help="expected tests that may fail (sampling on random weights makes a few flaky; default 3)")
    p.add_argument("--write-expect", default=None, help="write the ids alpaca2 passed to this file")
    p.add_argument("pytest_args", nargs="*", help="more pytest arguments (e.g. -k chat)")
    args = p.parse_args(argv)
    WORK.mkdir(parents=True, exist_ok=True)
    servers = {"llama-server": None, "alpaca2": None}
    if args.only:
        servers = {args.only: None}
    results = {}
    if not args.reuse:
        models = make_models(WORK / "models")
        for i, name in enumerate(servers):
            binary = llama_server_bin() if name == "llama-server" else alpaca2_bin()
            run(name, binary, prepare(models, name), args.port + 100 * i, args.timeout, args.pytest_args, args.jobs)
    for name in ("llama-server", "alpaca2"):
        xml = WORK / f"{name}.xml"
        if xml.exists():
            results[name] = outcomes(xml)
    text = report(results)
    Path(args.output).write_text(text)
    print(textwrap.shorten(text, 2000), file=sys.stderr)
    passed = sorted(f"{f}::{t}" for (f, t), st in results.get("alpaca2", {}).items() if st == "passed")
    if args.write_expect:
        Path(args.write_expect).write_text("\n".join(passed) + "\n")
    if args.expect:
        want = [ln.strip() for ln in Path(args.expect).read_text().splitlines() if ln.strip()]
        missing = sorted(set(want) - set(passed))
        print(f"server suite: {len(passed)} passed; {len(want) - len(missing)} of the {len(want)} expected "
              f"passed", file=sys.stderr)
        for m in missing:
            print(f"  not passed: {m}", file=sys.stderr)
        if len(missing) > args.allow_missing:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
