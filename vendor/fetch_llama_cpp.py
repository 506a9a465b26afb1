#!/usr/bin/env python3
"""Fetch the pinned llama.cpp source tree into vendor/llama.cpp.

llama.cpp is not committed here.  Its source comes from the source distribution of
llama-cpp-python on PyPI (which vendors one exact llama.cpp commit), downloaded with
pip, checked against a pinned sha256, and only its ``vendor/llama.cpp`` tree is extracted.
The archive is cached (``$ALPACA2_CACHE_DIR`` or ``~/.cache/alpaca2``) so rebuilds do not
download it again.

Usage: python vendor/fetch_llama_cpp.py [--dest DIR] [--archive FILE] [--force]
Exit status: 0 on success, 1 with a message naming what to do on any failure.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SDIST_NAME = "llama-cpp-python"
SDIST_VERSION = "0.3.36"
SDIST_FILE = "llama_cpp_python-0.3.36.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
LLAMA_CPP_COMMIT = "0c1e57098"
# Inside the archive: <root>/vendor/llama.cpp/...
TREE_PREFIX = "llama_cpp_python-0.3.36/vendor/llama.cpp/"
# Parts of the tree the build and the tests never use: left out to keep the sdist small.
SKIP_TOP = {".git", ".github", ".devops", "docs", "media", "examples", "pocs", "app", ".gemini", ".pi", "skills"}
STAMP = ".alpaca2-source"
# The build restricts GGML_CPU_ALL_VARIANTS to a chosen list through ALPACA2_CPU_VARIANTS;
# llama.cpp has no such switch, so one guard line is added to its variant function.
VARIANT_HOOK_ANCHOR = "function(ggml_add_cpu_backend_variant tag_name)\n"
VARIANT_HOOK = (
    "    # alpaca2: build only the variants listed in ALPACA2_CPU_VARIANTS (when set)\n"
    "    if (DEFINED ALPACA2_CPU_VARIANTS AND NOT \"${tag_name}\" IN_LIST ALPACA2_CPU_VARIANTS)\n"
    "        return()\n"
    "    endif()\n"
)


# llama.cpp's RPC client aborts the process when a server's connection breaks (GGML_ABORT in the
# thread that talks to the server, while the caller waits on it).  With this change that thread
# completes every message instead (outputs zeroed, later sends skipped); alpaca2 checks the
# model's connections after each decode and raises RPCServerError in place of the result.
RPC_FILE = "ggml/src/ggml-rpc/ggml-rpc.cpp"
RPC_PATCHES = (
    ("void rpc_dispatcher::work() {\n    while (running) {\n",
     "void rpc_dispatcher::work() {\n"
     "    // alpaca2: a broken connection completes every message (outputs zeroed) instead of aborting\n"
     "    bool alpaca2_failed = false;\n"
     "    while (running) {\n"),
    ("                bool status = send_rpc_cmd(sock, msg_ptr->cmd, msg_ptr->input.get(), msg_ptr->input_size, "
     "msg_ptr->output, msg_ptr->output_size);\n"
     "                RPC_STATUS_ASSERT(status);\n",
     "                bool status = !alpaca2_failed && send_rpc_cmd(sock, msg_ptr->cmd, msg_ptr->input.get(), "
     "msg_ptr->input_size, msg_ptr->output, msg_ptr->output_size);\n"
     "                if (!status) {\n"
     "                    memset(msg_ptr->output, 0, msg_ptr->output_size);\n"
     "                    alpaca2_failed = true;\n"
     "                }\n"),
    ("                bool status = send_rpc_cmd(sock, msg_ptr->cmd, msg_ptr->input.get(), msg_ptr->input_size);\n"
     "                RPC_STATUS_ASSERT(status);\n",
     "                bool status = !alpaca2_failed && send_rpc_cmd(sock, msg_ptr->cmd, msg_ptr->input.get(), "
     "msg_ptr->input_size);\n"
     "                alpaca2_failed = alpaca2_failed || !status;\n"),
)
PATCH_MARK = "patches=cpu-variants,rpc-dispatcher"


def apply_patches(tree: Path) -> None:
    """alpaca2's changes to the llama.cpp tree; idempotent (a patched file is left alone)."""
    cmake = tree / "ggml" / "src" / "CMakeLists.txt"
    text = cmake.read_text()
    if VARIANT_HOOK_ANCHOR in text and VARIANT_HOOK not in text:
        cmake.write_text(text.replace(VARIANT_HOOK_ANCHOR, VARIANT_HOOK_ANCHOR + VARIANT_HOOK, 1))
    rpc = tree / RPC_FILE
    if rpc.exists():
        text = rpc.read_text()
        if "alpaca2_failed" not in text:
            for old, new in RPC_PATCHES:
                if text.count(old) != 1:
                    raise FetchError(f"{rpc}: the RPC client is not the one alpaca2 knows how to patch")
                text = text.replace(old, new)
            rpc.write_text(text)
    stamp = tree / STAMP
    stamp.write_text(f"commit={LLAMA_CPP_COMMIT}\nsdist={SDIST_FILE}\nsha256={SDIST_SHA256}\n{PATCH_MARK}\n")


class FetchError(Exception):
    pass


def cache_dir() -> Path:
    env = os.environ.get("ALPACA2_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "alpaca2"


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_hash(path: Path, expected: str) -> None:
    got = sha256_of(path)
    if got != expected:
        raise FetchError(
            f"{path} has sha256 {got}, expected {expected}: the archive is corrupt or not the "
            f"pinned {SDIST_FILE}. Delete it and build again, or set ALPACA2_LLAMA_CPP_DIR to a "
            "llama.cpp checkout of your own."
        )


def download(dest_dir: Path) -> Path:
    """Download the sdist with pip into dest_dir (no build isolation: only metadata is read)."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest_dir, prefix=".download-") as tmp:
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
            "--no-build-isolation", "--disable-pip-version-check", "-d", tmp,
            f"{SDIST_NAME}=={SDIST_VERSION}",
        ]
        print(f"alpaca2: downloading {SDIST_FILE} from PyPI ...", file=sys.stderr)
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        got = Path(tmp) / SDIST_FILE
        if proc.returncode != 0 or not got.exists():
            raise FetchError(
                f"could not download {SDIST_NAME}=={SDIST_VERSION} with pip (exit {proc.returncode}).\n"
                f"{proc.stdout[-2000:]}\n"
                f"Without network access, put {SDIST_FILE} into {dest_dir} by hand, or set "
                "ALPACA2_LLAMA_CPP_DIR to a llama.cpp checkout."
            )
        check_hash(got, SDIST_SHA256)
        final = dest_dir / SDIST_FILE
        os.replace(got, final)
        return final


def extract(archive: Path, dest: Path) -> None:
    """Extract the llama.cpp tree from the archive into dest, atomically (temp dir + rename)."""
    dest = dest.resolve()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".llama.cpp-"))
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = []
            for m in tar.getmembers():
                if not m.name.startswith(TREE_PREFIX):
                    continue
                rel = m.name[len(TREE_PREFIX):]
                if not rel or rel.split("/", 1)[0] in SKIP_TOP:
                    continue
                if not (m.isfile() or m.isdir()):
                    continue  # no links or devices from an archive
                m.name = rel
                members.append(m)
            tar.extractall(tmp, members=members, filter="data")
        if not (tmp / "include" / "llama.h").exists():
            raise FetchError(f"{archive} holds no llama.cpp tree under {TREE_PREFIX}")
        apply_patches(tmp)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def fetch(dest: Path, archive: Path | None = None, force: bool = False) -> Path:
    if (dest / STAMP).exists() and not force:
        if PATCH_MARK not in (dest / STAMP).read_text():
            apply_patches(dest)          # a tree fetched before a patch was added
        return dest
    if archive is None:
        archive = cache_dir() / SDIST_FILE
        if archive.exists():
            try:
                check_hash(archive, SDIST_SHA256)
            except FetchError:
                print(f"alpaca2: cached {archive} is corrupt; downloading again", file=sys.stderr)
                archive.unlink()
        if not archive.exists():
            archive = download(archive.parent)
    else:
        check_hash(archive, SDIST_SHA256)
    extract(archive, dest)
    return dest


def main(argv: list[str] | None = None) -> int:
    here = Path(__file__).resolve().parent
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dest", type=Path, default=here / "llama.cpp")
    p.add_argument("--archive", type=Path, default=None,
                   help=f"use this {SDIST_FILE} instead of the cache / PyPI")
    p.add_argument("--force", action="store_true", help="extract again even if present")
    args = p.parse_args(argv)
    try:
        out = fetch(args.dest, args.archive, args.force)
    except (FetchError, OSError, tarfile.TarError) as e:
        print(f"alpaca2: fetching llama.cpp failed: {e}", file=sys.stderr)
        return 1
    print(f"alpaca2: llama.cpp {LLAMA_CPP_COMMIT} is in {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
