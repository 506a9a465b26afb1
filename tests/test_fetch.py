"""vendor/fetch_llama_cpp.py: where the pinned llama.cpp archive comes from, as pip is configured.

Each case runs the script in a fresh interpreter with a clean pip configuration (PIP_CONFIG_FILE
set, no PIP_* from this machine) and a small stand-in archive whose sha256 replaces the pinned
one; the real archive is fetched in .ci/run and by test_fetch_the_real_archive_from_a_file_index.
"""
import hashlib
import http.server
import io
import json
import os
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]      # no alpaca2 import: this runs before a build

FETCH = ROOT / "vendor" / "fetch_llama_cpp.py"
SDIST = "llama_cpp_python-0.3.36.tar.gz"
PREFIX = "llama_cpp_python-0.3.36/vendor/llama.cpp/"


def make_archive(path, llama_h=b"/* llama.h */\n"):
    """A stand-in for the llama-cpp-python sdist: the files fetch reads and patches, plus some it skips."""
    files = {
        PREFIX + "include/llama.h": llama_h,
        PREFIX + "CMakeLists.txt": b"project(llama.cpp)\n",
        PREFIX + "ggml/src/CMakeLists.txt": b"function(ggml_add_cpu_backend_variant tag_name)\nendfunction()\n",
        PREFIX + "examples/skipped.c": b"",
        "llama_cpp_python-0.3.36/llama_cpp/llama.py": b"",
    }
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo(PREFIX + "escape")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def archive(tmp_path):
    files = tmp_path / "files"
    files.mkdir()
    sha = make_archive(files / SDIST)
    return files / SDIST, sha


def clean_env(tmp_path, **extra):
    """This machine's environment without its pip settings, caches under tmp_path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "ALPACA2_"))}
    env.update(PIP_CONFIG_FILE=os.devnull, ALPACA2_CACHE_DIR=str(tmp_path / "cache"), HOME=str(tmp_path / "home"))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_fetch(args, env, sha, python=sys.executable):
    """The script's main() with its pinned sha256 replaced by the stand-in archive's."""
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('fetch', {str(FETCH)!r})\n"
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
            f"m.SDIST_SHA256 = {sha!r}\n"
            f"sys.exit(m.main({[str(a) for a in args]!r}))\n")
    return subprocess.run([python, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def html_index(root, href):
    page = root / "simple" / "llama-cpp-python"
    page.mkdir(parents=True)
    (page / "index.html").write_text(f'<!DOCTYPE html><html><body><a href="{href}">{SDIST}</a></body></html>')
    return (root / "simple").as_uri()


def assert_extracted(dest):
    assert (dest / "include" / "llama.h").read_bytes() == b"/* llama.h */\n"
    assert "commit=0c1e57098" in (dest / ".alpaca2-source").read_text()
    assert "ALPACA2_CPU_VARIANTS" in (dest / "ggml" / "src" / "CMakeLists.txt").read_text()   # patched
    assert not (dest / "examples").exists() and not (dest / "escape").exists()


def test_pep503_file_index_as_pip_extra_index_url(tmp_path, archive):
    path, sha = archive
    index = html_index(tmp_path, f"../../files/{SDIST}#sha256={sha}")
    env = clean_env(tmp_path, PIP_INDEX_URL=(tmp_path / "nothing").as_uri(), PIP_EXTRA_INDEX_URL=index)
    r = run_fetch(["--dest", tmp_path / "out"], env, sha)
    assert r.returncode == 0, r.stderr
    assert_extracted(tmp_path / "out")
    assert (tmp_path / "cache" / SDIST).read_bytes() == path.read_bytes()    # kept for the next build
    assert not list((tmp_path / "cache").glob(".*"))                         # no temporary files left


class _Index(http.server.BaseHTTPRequestHandler):
    """A PEP 691 JSON index with Basic auth; as a proxy it serves any host's URL the same way."""
    archive = b""
    seen = []

    def do_GET(self):
        type(self).seen.append((self.path, self.headers.get("Authorization")))
        path = self.path.split("://", 1)[-1].partition("/")[2] if "://" in self.path else self.path.lstrip("/")
        if self.headers.get("Authorization") not in (None, "Basic dXNlcjpzM2NyZXQ="):     # user:s3cret
            return self.send_error(401)
        if path == "simple/llama-cpp-python/":
            body = json.dumps({"meta": {"api-version": "1.0"}, "name": "llama-cpp-python", "files": [
                {"filename": SDIST, "url": f"../../files/{SDIST}",
                 "hashes": {"sha256": hashlib.sha256(self.archive).hexdigest()}}]}).encode()
            ctype = "application/vnd.pypi.simple.v1+json"
        elif path == f"files/{SDIST}":
            body, ctype = self.archive, "application/octet-stream"
        else:
            return self.send_error(404)
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(archive):
    _Index.archive, _Index.seen = archive[0].read_bytes(), []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Index)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd
    httpd.shutdown()


def test_pep691_json_index_over_http_with_credentials_in_the_url(tmp_path, archive, server):
    _, sha = archive
    env = clean_env(tmp_path, PIP_INDEX_URL=f"http://user:s3cret@127.0.0.1:{server.server_port}/simple")
    r = run_fetch(["--dest", tmp_path / "out"], env, sha)
    assert r.returncode == 0, r.stderr
    assert_extracted(tmp_path / "out")
    assert ("/simple/llama-cpp-python/", "Basic dXNlcjpzM2NyZXQ=") in _Index.seen
    assert "s3cret" not in r.stderr                                           # the password is not printed


def test_pip_proxy_setting_from_a_pip_conf_file(tmp_path, archive, server):
    _, sha = archive
    conf = tmp_path / "pip.conf"
    conf.write_text(f"[global]\nindex-url = http://pypi.example.invalid/simple\n"
                    f"proxy = http://127.0.0.1:{server.server_port}\ntimeout = 20\n")
    r = run_fetch(["--dest", tmp_path / "out"], clean_env(tmp_path, PIP_CONFIG_FILE=conf), sha)
    assert r.returncode == 0, r.stderr
    assert_extracted(tmp_path / "out")
    # the unresolvable host was reached through the proxy, with absolute URLs as proxies receive them
    assert any(p == "http://pypi.example.invalid/simple/llama-cpp-python/" for p, _ in _Index.seen)


def test_pip_settings_are_read_as_pip_reads_them(tmp_path, monkeypatch):
    # pip's own `pip config list` and the by-hand reading (for an interpreter without pip) agree
    sys.path.insert(0, str(FETCH.parent))
    try:
        import fetch_llama_cpp as fetch
    finally:
        sys.path.remove(str(FETCH.parent))
    for key in [k for k in os.environ if k.startswith("PIP_")]:
        monkeypatch.delenv(key)
    xdg = tmp_path / "xdg" / "pip"
    xdg.mkdir(parents=True)
    (xdg / "pip.conf").write_text("[global]\nindex-url = https://mirror.example/simple\ntimeout = 30\n"
                                  "find-links =\n    /srv/wheels\n    /srv/more\n")
    user = tmp_path / "home" / ".config" / "pip"
    user.mkdir(parents=True)
    (user / "pip.conf").write_text("[install]\nextra-index-url = file:///srv/simple\n[global]\nproxy = http://p:3128\n")
    monkeypatch.setenv("XDG_CONFIG_DIRS", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.setenv("PIP_DEFAULT_TIMEOUT", "99")
    monkeypatch.setenv("PIP_TRUSTED_HOST", "mirror.example")
    expected = {"index-url": "https://mirror.example/simple", "timeout": "99", "find-links": "/srv/wheels /srv/more",
                "extra-index-url": "file:///srv/simple", "proxy": "http://p:3128", "trusted-host": "mirror.example"}
    by_pip = fetch._pip_config_from_pip()
    if by_pip is None:
        pytest.skip("no pip in this interpreter")
    # (this machine's /etc/pip.conf may add settings of its own: both readers must see them too)
    assert _words(by_pip).items() >= expected.items()
    assert _words(fetch._pip_config_from_files()) == _words(by_pip)
    # PIP_CONFIG_FILE: read last, and the user's own files are skipped (pip's rule)
    conf = tmp_path / "env.conf"
    conf.write_text("[global]\ncert = /srv/ca.pem\n")
    monkeypatch.setenv("PIP_CONFIG_FILE", str(conf))
    del expected["extra-index-url"], expected["proxy"]
    expected["cert"] = "/srv/ca.pem"
    by_pip = fetch._pip_config_from_pip()
    assert _words(by_pip).items() >= expected.items() and "proxy" not in by_pip
    assert _words(fetch._pip_config_from_files()) == _words(by_pip)


def _words(config):
    return {k: " ".join(v.split()) for k, v in config.items()}


def test_pip_is_found_from_inside_a_build_isolation(tmp_path, archive):
    # pip's isolated build puts its own PYTHONPATH first, where pip does not import: the script
    # reads pip's configuration from this interpreter's pip regardless
    _, sha = archive
    shadow = tmp_path / "isolated"
    (shadow / "pip").mkdir(parents=True)
    (shadow / "pip" / "__init__.py").write_text("raise ImportError('not in the build environment')\n")
    (shadow / "pip" / "__main__.py").write_text("raise ImportError('not in the build environment')\n")
    conf = tmp_path / "pip.conf"
    conf.write_text(f"[global]\nindex-url = {(tmp_path / 'nothing').as_uri()}\n"
                    f"find-links = {archive[0].parent}\n")
    env = clean_env(tmp_path, PIP_CONFIG_FILE=conf, PYTHONPATH=shadow, PYTHONNOUSERSITE=1)
    r = run_fetch(["--dest", tmp_path / "out"], env, sha)
    assert r.returncode == 0, r.stderr
    assert_extracted(tmp_path / "out")


def test_offline_from_the_cache_or_a_named_archive(tmp_path, archive):
    path, sha = archive
    offline = dict(PIP_NO_INDEX=1, PIP_INDEX_URL="http://127.0.0.1:9/simple")
    named = run_fetch(["--dest", tmp_path / "a"], clean_env(tmp_path, ALPACA2_LLAMA_CPP_ARCHIVE=path, **offline), sha)
    assert named.returncode == 0, named.stderr
    assert_extracted(tmp_path / "a")
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / SDIST).write_bytes(path.read_bytes())
    cached = run_fetch(["--dest", tmp_path / "b"], clean_env(tmp_path, **offline), sha)
    assert cached.returncode == 0, cached.stderr
    assert_extracted(tmp_path / "b")


def test_a_named_archive_that_is_missing_or_wrong_is_refused(tmp_path, archive):
    _, sha = archive
    r = run_fetch(["--dest", tmp_path / "out"], clean_env(tmp_path, ALPACA2_LLAMA_CPP_ARCHIVE=tmp_path / "no.tgz"), sha)
    assert r.returncode == 1 and "ALPACA2_LLAMA_CPP_ARCHIVE" in r.stderr and "no such file" in r.stderr
    other = tmp_path / SDIST
    make_archive(other, llama_h=b"/* another */\n")
    r = run_fetch(["--dest", tmp_path / "out"], clean_env(tmp_path, ALPACA2_LLAMA_CPP_ARCHIVE=other), sha)
    assert r.returncode == 1 and f"expected {sha}" in r.stderr
    assert not (tmp_path / "out").exists()


def test_a_tampered_cached_archive_is_replaced_from_the_index(tmp_path, archive):
    path, sha = archive
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / SDIST).write_bytes(b"\x1f\x8b tampered")
    env = clean_env(tmp_path, PIP_INDEX_URL=html_index(tmp_path, f"../../files/{SDIST}"))
    r = run_fetch(["--dest", tmp_path / "out"], env, sha)
    assert r.returncode == 0, r.stderr
    assert "corrupt" in r.stderr
    assert (tmp_path / "cache" / SDIST).read_bytes() == path.read_bytes()
    assert_extracted(tmp_path / "out")


def test_a_failed_download_leaves_nothing_and_its_advice_works(tmp_path, archive):
    path, sha = archive
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / SDIST).write_bytes(path.read_bytes()[:200])                       # truncated on the way
    env = clean_env(tmp_path, PIP_INDEX_URL=html_index(tmp_path, f"../../bad/{SDIST}"))
    r = run_fetch(["--dest", tmp_path / "out"], env, sha)
    assert r.returncode == 1
    assert f"bad/{SDIST}: got sha256" in r.stderr                             # what was tried, and why not
    assert not (tmp_path / "out").exists()
    assert not any(p.name.startswith(".llama.cpp-") for p in tmp_path.iterdir())
    assert list((tmp_path / "cache").iterdir()) == []                        # no partial download kept
    # the message names the cache directory: putting the archive there, as it says, works offline
    assert str(tmp_path / "cache") in r.stderr and "ALPACA2_LLAMA_CPP_ARCHIVE" in r.stderr
    (tmp_path / "cache" / SDIST).write_bytes(path.read_bytes())
    r = run_fetch(["--dest", tmp_path / "out"], env, sha)
    assert r.returncode == 0, r.stderr
    assert_extracted(tmp_path / "out")


def test_a_listed_hash_that_is_not_the_pin_is_not_downloaded(tmp_path, archive):
    _, sha = archive
    env = clean_env(tmp_path, PIP_INDEX_URL=html_index(tmp_path, f"../../files/{SDIST}#sha256={'0' * 64}"))
    r = run_fetch(["--dest", tmp_path / "out"], env, sha)
    assert r.returncode == 1
    assert "listed with sha256 0000" in r.stderr
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())


def test_an_unreachable_index_names_the_url_and_pips_settings(tmp_path, archive):
    _, sha = archive
    r = run_fetch(["--dest", tmp_path / "out"], clean_env(tmp_path, PIP_INDEX_URL="http://127.0.0.1:9/simple"), sha)
    assert r.returncode == 1
    assert "http://127.0.0.1:9/simple/llama-cpp-python/" in r.stderr
    assert "PIP_PROXY" in r.stderr and "PIP_INDEX_URL" in r.stderr
    assert not (tmp_path / "out").exists()


def test_download_only_into_a_directory(tmp_path, archive):
    path, sha = archive
    r = run_fetch(["--download-only", tmp_path / "carry"], clean_env(tmp_path, PIP_FIND_LINKS=path.parent), sha)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "carry" / SDIST).read_bytes() == path.read_bytes()


def _real_archive():
    for d in (os.environ.get("ALPACA2_CACHE_DIR"), os.environ.get("XDG_CACHE_HOME") and
              os.path.join(os.environ["XDG_CACHE_HOME"], "alpaca2"), os.path.expanduser("~/.cache/alpaca2")):
        if d and os.path.exists(os.path.join(d, SDIST)):
            return Path(d) / SDIST
    return None


@pytest.mark.skipif(_real_archive() is None, reason="the real archive is not in the cache (no build here fetched it)")
def test_fetch_the_real_archive_from_a_file_index(tmp_path):
    # the pinned sha256 itself, through a find-links directory, with no network
    real = _real_archive()
    (tmp_path / "links").mkdir()
    os.symlink(real, tmp_path / "links" / SDIST)
    env = clean_env(tmp_path, PIP_NO_INDEX=1, PIP_FIND_LINKS=tmp_path / "links")
    r = subprocess.run([sys.executable, str(FETCH), "--dest", str(tmp_path / "out")], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "include" / "llama.h").read_bytes() == (
        ROOT / "vendor" / "llama.cpp" / "include" / "llama.h").read_bytes()
