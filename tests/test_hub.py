"""-m with a model name or Hugging Face repo id, against a pre-populated local cache (no network)."""
import os
import shutil
import subprocess
import sys

import pytest

from alpaca2.errors import ModelLoadError
from alpaca2.hub import parse_spec, resolve_model

pytest.importorskip("huggingface_hub")


def test_parse_spec():
    assert parse_spec("chinese-alpaca-2-7b") == ("hfl/chinese-alpaca-2-7b-gguf", "ggml-model-q4_0.gguf")
    assert parse_spec("Chinese-Alpaca-2-13B:Q8_0") == ("hfl/chinese-alpaca-2-13b-gguf", "ggml-model-q8_0.gguf")
    assert parse_spec("hfl/chinese-llama-2-1.3b-gguf:q6_k") == ("hfl/chinese-llama-2-1.3b-gguf", "ggml-model-q6_k.gguf")
    assert parse_spec("someone/repo/model.Q4_K_M.gguf") == ("someone/repo", "model.Q4_K_M.gguf")
    with pytest.raises(ValueError):
        parse_spec("chinese-alpaca-2-7b:q9")
    with pytest.raises(ValueError):
        parse_spec("not a model")


@pytest.fixture
def hf_cache(tmp_path, tiny_path, monkeypatch):
    """A Hugging Face cache laid out as huggingface_hub writes it, holding the tiny model."""
    cache = tmp_path / "hub"
    repo = cache / "models--hfl--chinese-alpaca-2-7b-gguf"
    snap = repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123456789abcdef0123456789abcdef01234567")
    shutil.copy(tiny_path, snap / "ggml-model-q4_0.gguf")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return snap


def test_a_cached_release_resolves_offline(hf_cache):
    assert resolve_model("chinese-alpaca-2-7b") == str(hf_cache / "ggml-model-q4_0.gguf")
    assert resolve_model("hfl/chinese-alpaca-2-7b-gguf") == str(hf_cache / "ggml-model-q4_0.gguf")


def test_a_missing_file_offline_is_one_clear_error(hf_cache):
    with pytest.raises(ModelLoadError, match="not in the local cache and HF_HUB_OFFLINE"):
        resolve_model("chinese-alpaca-2-7b:q8_0")


def test_the_cli_loads_a_cached_release_by_name(hf_cache):
    exe = os.path.join(os.path.dirname(sys.executable), "alpaca2")
    r = subprocess.run([exe, "generate", "-m", "chinese-alpaca-2-7b", "-p", "床前", "-n", "3", "--temp", "0"],
                       capture_output=True, text=True, timeout=120, env=os.environ.copy())
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("床前")
    r = subprocess.run([exe, "generate", "-m", "chinese-alpaca-2-13b", "-p", "x"], capture_output=True, text=True,
                       timeout=120, env=os.environ.copy())
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "HF_HUB_OFFLINE" in r.stderr
