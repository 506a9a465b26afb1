#!/usr/bin/env python3
"""Fetch the pinned llama.cpp source tree into vendor/llama.cpp.

llama.cpp is not committed here.  Its source comes from the source distribution of
llama-cpp-python (which vendors one exact llama.cpp commit), checked against a pinned sha256;
only its ``vendor/llama.cpp`` tree is extracted.  The archive is taken from, first found wins:

1. ``--archive FILE`` or ``$ALPACA2_LLAMA_CPP_ARCHIVE``;
2. the cache: ``$ALPACA2_CACHE_DIR``, else ``$XDG_CACHE_HOME/alpaca2``, else ``~/.cache/alpaca2``;
3. wherever pip would look, read from the user's pip configuration (pip.conf files and PIP_*
   variables): local find-links directories, the indexes (index-url, default PyPI, unless
   no-index; extra-index-url; PEP 691 JSON or PEP 503 HTML pages, https or file://), then
   find-links pages, through pip's proxy, cert, client-cert and trusted-host settings.
   A download lands in the cache.

Only the standard library is used: this runs inside pip's isolated build environment, where
pip itself is not importable, and it never builds llama-cpp-python (no metadata is prepared).

Usage: python vendor/fetch_llama_cpp.py [--dest DIR] [--archive FILE] [--force]
       python vendor/fetch_llama_cpp.py --download-only DIR
Exit status: 0 on success, 1 with a message naming what to do on any failure.
"""
from __future__ import annotations

import argparse
import ast
import base64
import configparser
import hashlib
import json
import netrc
import os
import shutil
import ssl
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

SDIST_NAME = "llama-cpp-python"
SDIST_VERSION = "0.3.36"
SDIST_FILE = "llama_cpp_python-0.3.36.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
LLAMA_CPP_COMMIT = "0c1e57098"
PYPI_SIMPLE = "https://pypi.org/simple"     # pip's own default index
PYPI_PAGE = f"https://pypi.org/project/{SDIST_NAME}/{SDIST_VERSION}/#files"
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
    """Where the downloaded archive is kept: $ALPACA2_CACHE_DIR, $XDG_CACHE_HOME/alpaca2 or ~/.cache/alpaca2."""
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
            f"llama.cpp checkout of commit {LLAMA_CPP_COMMIT}."
        )


# --- pip's configuration ----------------------------------------------------------------------
# The settings that decide where pip looks for a file and how it connects.  Lists are
# whitespace-separated in pip.conf and PIP_* variables, as pip reads them.
PIP_KEYS = {"index-url": "index-url", "extra-index-url": "extra-index-url", "find-links": "find-links",
            "no-index": "no-index", "proxy": "proxy", "cert": "cert", "client-cert": "client-cert",
            "trusted-host": "trusted-host", "timeout": "timeout", "default-timeout": "timeout"}
# pip's sections, lowest priority first (a command's section overrides [global]; variables override files)
PIP_SECTIONS = ("global", "download", "install", ":env:")
# What pip's isolated build environment sets: without them, this interpreter's own pip imports.
BUILD_ISOLATION_VARS = ("PYTHONPATH", "PYTHONNOUSERSITE", "PYTHONNOUSERBASE")


def _merge(items: list[tuple[str, str, str]]) -> dict[str, str]:
    """(section, key, value) triples -> one value per setting, in pip's order of precedence."""
    merged: dict[str, str] = {}
    for section in PIP_SECTIONS:
        for sec, key, value in items:
            if sec == section and key in PIP_KEYS:
                merged[PIP_KEYS[key]] = value
    return merged


def _pip_config_from_pip() -> dict[str, str] | None:
    """`python -m pip config list`, run outside the build isolation; None when there is no pip."""
    env = {k: v for k, v in os.environ.items() if k not in BUILD_ISOLATION_VARS}
    try:
        proc = subprocess.run([sys.executable, "-m", "pip", "config", "list"], env=env, timeout=60,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    except (OSError, subprocess.SubprocessError):
        return None
    if proc.returncode != 0:
        return None
    items = []
    for line in proc.stdout.splitlines():
        name, sep, value = line.partition("=")
        section, dot, key = name.rpartition(".")
        if not sep or not dot:
            continue
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            pass
        items.append((section, key, str(value)))
    return _merge(items)


def pip_config_files() -> list[Path]:
    """pip's configuration files on this system, lowest priority first (as pip's `config debug` lists them)."""
    env_file = os.environ.get("PIP_CONFIG_FILE")
    if env_file == os.devnull:
        return []
    xdg_dirs = os.environ.get("XDG_CONFIG_DIRS") or "/etc/xdg"
    files = [Path(d) / "pip" / "pip.conf" for d in xdg_dirs.split(os.pathsep) if d]
    files.append(Path("/etc/pip.conf"))
    if not (env_file and os.path.exists(env_file)):      # pip skips the user's files then
        home = Path(os.path.expanduser("~"))
        files.append(home / ".pip" / "pip.conf")
        files.append(Path(os.environ.get("XDG_CONFIG_HOME") or home / ".config") / "pip" / "pip.conf")
    files.append(Path(sys.prefix) / "pip.conf")
    if env_file:
        files.append(Path(env_file))
    return files


def _pip_config_from_files() -> dict[str, str]:
    """The same settings read by hand, for an interpreter without pip (a uv venv, say)."""
    items = []
    for path in pip_config_files():
        parser = configparser.RawConfigParser()
        try:
            parser.read(path, encoding="utf-8")
        except (OSError, configparser.Error):
            continue
        for section in parser.sections():
            items.extend((section, key, value) for key, value in parser.items(section))
    for key in PIP_KEYS:
        value = os.environ.get("PIP_" + key.upper().replace("-", "_"))
        if value is not None:
            items.append((":env:", key, value))
    return _merge(items)


def pip_config() -> dict[str, str]:
    """pip's settings for finding and fetching a file, as `pip download` would see them here."""
    found = _pip_config_from_pip()
    return found if found is not None else _pip_config_from_files()


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "yes", "true", "on", "y")


# --- finding the archive ----------------------------------------------------------------------
class _Links(HTMLParser):
    """The <a href> targets of a PEP 503 page, and its <base href> if any."""

    def __init__(self) -> None:
        super().__init__()
        self.base: str | None = None
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        href = dict(attrs).get("href")
        if href is None:
            return
        if tag == "base" and self.base is None:
            self.base = href
        elif tag == "a":
            self.hrefs.append(href)


def _file_url(location: str) -> str:
    """A find-links or index entry as a URL (bare paths are local, as in pip)."""
    if "://" in location:
        return location
    return Path(os.path.abspath(os.path.expanduser(location))).as_uri()


def _local_path(url: str) -> Path | None:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "file":
        return None
    return Path(urllib.request.url2pathname(parts.path))


class Fetcher:
    """Reads index pages and downloads files the way pip is configured to (proxy, cert, auth)."""

    def __init__(self, config: dict[str, str]) -> None:
        self.config = config
        self.timeout = float(config.get("timeout") or 15)
        self.trusted = set(config.get("trusted-host", "").split())
        proxy = config.get("proxy")
        # pip's proxy when set; else urllib honours http_proxy / https_proxy / no_proxy as pip does
        proxies = urllib.request.ProxyHandler({"http": proxy, "https": proxy} if proxy else None)
        self.opener = urllib.request.build_opener(proxies, urllib.request.HTTPSHandler(context=self._context(True)))
        self.unverified = urllib.request.build_opener(proxies,
                                                      urllib.request.HTTPSHandler(context=self._context(False)))

    def _context(self, verify: bool) -> ssl.SSLContext:
        cert = self.config.get("cert")
        if not verify:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        elif cert and os.path.isdir(cert):
            ctx = ssl.create_default_context(capath=cert)
        else:
            ctx = ssl.create_default_context(cafile=cert or None)
        client_cert = self.config.get("client-cert")
        if client_cert:
            ctx.load_cert_chain(client_cert)
        return ctx

    def open(self, url: str, accept: str | None = None):
        """urlopen with pip's settings; credentials in the URL or ~/.netrc become Basic auth."""
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        headers = {"User-Agent": f"alpaca2-fetch (pip-compatible; {SDIST_NAME} {SDIST_VERSION})"}
        if accept:
            headers["Accept"] = accept
        user, password = parts.username, parts.password
        if parts.scheme in ("http", "https") and user is None:
            try:
                auth = netrc.netrc().authenticators(host)
            except (OSError, netrc.NetrcParseError):
                auth = None
            if auth:
                user, password = auth[0], auth[2]
        if user is not None:
            token = f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(password or '')}"
            headers["Authorization"] = "Basic " + base64.b64encode(token.encode()).decode()
            netloc = host + (f":{parts.port}" if parts.port else "")
            url = urllib.parse.urlunsplit(parts._replace(netloc=netloc))
        opener = self.unverified if (host in self.trusted or parts.netloc in self.trusted) else self.opener
        return opener.open(urllib.request.Request(url, headers=headers), timeout=self.timeout)

    def links_on_page(self, url: str) -> list[tuple[str, str | None]]:
        """(file URL, sha256 or None) for each file named SDIST_FILE on a simple or find-links page."""
        local = _local_path(url)
        if local is not None and local.is_dir():
            url = urllib.parse.urljoin(url.rstrip("/") + "/", "index.html")   # pip's rule for file: indexes
        accept = "application/vnd.pypi.simple.v1+json, application/vnd.pypi.simple.v1+html;q=0.2, text/html;q=0.1"
        with self.open(url, accept) as resp:
            body = resp.read()
            ctype = resp.headers.get_content_type() if resp.headers else ""
            url = resp.geturl() or url
        found = []
        if ctype == "application/vnd.pypi.simple.v1+json":
            for f in json.loads(body).get("files", []):
                if f.get("filename") == SDIST_FILE:
                    found.append((urllib.parse.urljoin(url, f["url"]), (f.get("hashes") or {}).get("sha256")))
            return found
        page = _Links()
        page.feed(body.decode("utf-8", "replace"))
        base = urllib.parse.urljoin(url, page.base) if page.base else url
        for href in page.hrefs:
            target, _, fragment = urllib.parse.urljoin(base, href).partition("#")
            if urllib.parse.unquote(target.rsplit("/", 1)[-1]) == SDIST_FILE:
                digest = fragment[len("sha256="):] if fragment.startswith("sha256=") else None
                found.append((target, digest))
        return found

    def download(self, url: str, dest_dir: Path) -> Path:
        """Download url into dest_dir/SDIST_FILE, hash-checked; nothing is left behind on failure."""
        dest_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=dest_dir, prefix=".download-", suffix=".part")
        tmp = Path(tmp_name)
        try:
            h = hashlib.sha256()
            with os.fdopen(fd, "wb") as out, self.open(url) as resp:
                size = resp.headers.get("Content-Length") if resp.headers else None
                shown = f" ({int(size) / 2**20:.0f} MiB)" if size and size.isdigit() else ""
                print(f"alpaca2: downloading {_redact(url)}{shown} ...", file=sys.stderr, flush=True)
                for block in iter(lambda: resp.read(1 << 20), b""):
                    h.update(block)
                    out.write(block)
            if h.hexdigest() != SDIST_SHA256:
                raise FetchError(f"got sha256 {h.hexdigest()}, expected {SDIST_SHA256} (a changed or truncated file)")
            final = dest_dir / SDIST_FILE
            os.chmod(tmp, 0o644)             # mkstemp makes it private; the cache is the user's
            os.replace(tmp, final)
            return final
        finally:
            if tmp.exists():
                tmp.unlink()


def _redact(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{parts.username}:***@{parts.hostname}"
                                                  + (f":{parts.port}" if parts.port else "")))


def _why(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return str(exc.reason)
    return str(exc) or type(exc).__name__


def find_and_download(dest_dir: Path, config: dict[str, str] | None = None) -> Path:
    """Get SDIST_FILE from where pip would, into dest_dir; FetchError lists every place tried."""
    config = pip_config() if config is None else config
    fetcher = Fetcher(config)
    tried: list[str] = []
    find_links = [_file_url(x) for x in config.get("find-links", "").split()]
    indexes = []
    if not _truthy(config.get("no-index")):
        indexes = [config.get("index-url") or PYPI_SIMPLE] + config.get("extra-index-url", "").split()
    # pages: local find-links first (no network), then indexes, then remote find-links, as pip does
    pages: list[str] = []
    for link in find_links:
        local = _local_path(link)
        if local is None:
            continue
        candidate = local / SDIST_FILE if local.is_dir() else local
        if candidate.is_file() and candidate.name == SDIST_FILE:
            copied = _copy_checked(candidate, dest_dir, tried)
            if copied:
                return copied
        elif local.is_file():
            pages.append(link)               # a local HTML page of links
    pages += [_file_url(i).rstrip("/") + f"/{SDIST_NAME}/" for i in indexes]
    pages += [link for link in find_links if _local_path(link) is None]
    for page in pages:
        local = _local_path(page)
        if local is not None and not local.exists():
            tried.append(f"{page}: no such file or directory")
            continue
        try:
            links = fetcher.links_on_page(page)
        except (OSError, ValueError, ssl.SSLError) as e:
            tried.append(f"{_redact(page)}: {_why(e)}")
            continue
        if not links:
            tried.append(f"{_redact(page)}: does not list {SDIST_FILE}")
        for url, digest in links:
            if digest and digest != SDIST_SHA256:
                tried.append(f"{_redact(url)}: listed with sha256 {digest}, not the pinned {SDIST_SHA256}")
                continue
            try:
                return fetcher.download(url, dest_dir)
            except (OSError, ValueError, ssl.SSLError, FetchError) as e:
                tried.append(f"{_redact(url)}: {_why(e)}")
    return _fail(tried, config)


def _copy_checked(src: Path, dest_dir: Path, tried: list[str]) -> Path | None:
    if sha256_of(src) != SDIST_SHA256:
        tried.append(f"{src}: sha256 is not the pinned {SDIST_SHA256}")
        return None
    dest_dir.mkdir(parents=True, exist_ok=True)
    final = dest_dir / SDIST_FILE
    if final.resolve() != src.resolve():
        fd, tmp = tempfile.mkstemp(dir=dest_dir, prefix=".copy-", suffix=".part")
        os.close(fd)
        try:
            shutil.copyfile(src, tmp)
            os.replace(tmp, final)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return final


def _fail(tried: list[str], config: dict[str, str]):
    where = "\n".join(f"  - {t}" for t in tried) or "  (nowhere: pip's configuration names no index)"
    raise FetchError(
        f"could not get {SDIST_FILE} (sha256 {SDIST_SHA256[:16]}...), the source of llama.cpp "
        f"{LLAMA_CPP_COMMIT}. Tried, with pip's settings (index-url, extra-index-url, find-links, "
        f"proxy, cert from pip.conf and PIP_* variables):\n{where}\n"
        "Then do one of these and build again:\n"
        "  - behind a proxy or with a private index or CA: tell pip (e.g. PIP_PROXY=http://host:port, "
        "PIP_INDEX_URL=https://mirror/simple, PIP_CERT=/path/ca.pem, or `pip config set global.proxy ...`);\n"
        f"  - offline: get {SDIST_FILE} elsewhere ({PYPI_PAGE}, or there run "
        f"`python vendor/fetch_llama_cpp.py --download-only .`), then put it into {cache_dir()} "
        "or set ALPACA2_LLAMA_CPP_ARCHIVE=/path/to/it;\n"
        f"  - or set ALPACA2_LLAMA_CPP_DIR to a llama.cpp checkout of commit {LLAMA_CPP_COMMIT}."
    )


def _writable_cache() -> Path:
    """The cache directory, or a private temporary one when it cannot be written (read-only home)."""
    cache = cache_dir()
    try:
        cache.mkdir(parents=True, exist_ok=True)
        probe = tempfile.TemporaryFile(dir=cache)
        probe.close()
        return cache
    except OSError:
        tmp = Path(tempfile.mkdtemp(prefix="alpaca2-cache-"))
        print(f"alpaca2: {cache} is not writable; downloading into {tmp}", file=sys.stderr)
        return tmp


def locate_archive() -> Path:
    """The pinned archive: $ALPACA2_LLAMA_CPP_ARCHIVE, the cache, or downloaded into the cache."""
    named = os.environ.get("ALPACA2_LLAMA_CPP_ARCHIVE")
    if named:
        path = Path(named).expanduser()
        if not path.is_file():
            raise FetchError(f"ALPACA2_LLAMA_CPP_ARCHIVE={named}: no such file. Point it at {SDIST_FILE} "
                             "or unset it to use the cache and pip's indexes.")
        check_hash(path, SDIST_SHA256)
        return path
    cached = cache_dir() / SDIST_FILE
    if cached.exists():
        if sha256_of(cached) == SDIST_SHA256:
            return cached
        print(f"alpaca2: cached {cached} is corrupt (sha256 differs); fetching it again", file=sys.stderr)
        cached.unlink()
    return find_and_download(_writable_cache())


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
                if not (m.isfile() or m.isdir()) or rel.startswith("/") or ".." in rel.split("/"):
                    continue  # no links, devices or paths out of the tree from an archive
                m.name = rel
                members.append(m)
            if hasattr(tarfile, "data_filter"):      # Python 3.12, 3.11.4, 3.10.12, 3.9.17 and later
                tar.extractall(tmp, members=members, filter="data")
            else:
                tar.extractall(tmp, members=members)
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
    """Make dest the pinned, patched llama.cpp tree (from archive, or located by locate_archive)."""
    if (dest / STAMP).exists() and not force:
        if PATCH_MARK not in (dest / STAMP).read_text():
            apply_patches(dest)          # a tree fetched before a patch was added
        return dest
    if archive is None:
        archive = locate_archive()
    else:
        check_hash(archive, SDIST_SHA256)
    extract(archive, dest)
    return dest


def main(argv: list[str] | None = None) -> int:
    here = Path(__file__).resolve().parent
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dest", type=Path, default=here / "llama.cpp")
    p.add_argument("--archive", type=Path, default=None,
                   help=f"use this {SDIST_FILE} instead of the cache / pip's indexes")
    p.add_argument("--force", action="store_true", help="extract again even if present")
    p.add_argument("--download-only", type=Path, metavar="DIR", default=None,
                   help=f"only download {SDIST_FILE} into DIR (to carry to an offline machine)")
    args = p.parse_args(argv)
    try:
        if args.download_only is not None:
            out = find_and_download(args.download_only)
            print(f"alpaca2: {out} (sha256 {SDIST_SHA256})", file=sys.stderr)
            return 0
        out = fetch(args.dest, args.archive, args.force)
    except (FetchError, OSError, tarfile.TarError) as e:
        print(f"alpaca2: fetching llama.cpp failed: {e}", file=sys.stderr)
        return 1
    print(f"alpaca2: llama.cpp {LLAMA_CPP_COMMIT} is in {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
