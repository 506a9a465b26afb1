"""The built distribution: the sdist carries llama.cpp, the wheel is manylinux and runs with no compiler.

These check artifacts made by scripts/build_wheels.sh, named by ALPACA2_WHEEL (the repaired wheel)
and ALPACA2_SDIST; .ci/run builds them and runs this file. Without them the tests skip.
"""
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

WHEEL = os.environ.get("ALPACA2_WHEEL")
SDIST = os.environ.get("ALPACA2_SDIST")
CPU_VARIANTS = ("x64", "haswell", "skylakex", "icelake", "zen4", "alderlake")
COMPILERS = ("cc", "gcc", "c++", "g++", "clang", "clang++", "nvcc")
needs_wheel = pytest.mark.skipif(not WHEEL, reason="ALPACA2_WHEEL names no wheel (scripts/build_wheels.sh makes one)")


@pytest.mark.skipif(not SDIST, reason="ALPACA2_SDIST names no sdist (scripts/build_wheels.sh makes one)")
def test_the_sdist_carries_the_pinned_llama_cpp_tree():
    with tarfile.open(SDIST) as tar:
        names = tar.getnames()
        root = names[0].split("/")[0]
        stamp = tar.extractfile(f"{root}/vendor/llama.cpp/.alpaca2-source").read().decode()
    for part in ("vendor/llama.cpp/include/llama.h", "vendor/llama.cpp/ggml/src/ggml-cpu/ggml-cpu.c",
                 "vendor/fetch_llama_cpp.py", "cmake/alpaca2_cuda.cmake", "CMakeLists.txt", "src/alpaca2/_core.pyx"):
        assert f"{root}/{part}" in names, part
    assert "commit=0c1e57098" in stamp and "patches=cpu-variants,rpc-dispatcher" in stamp
    assert not any("/.venv" in n or "/build/" in n for n in names)


@needs_wheel
def test_the_wheel_is_manylinux_with_every_cpu_variant_and_its_libraries():
    name = Path(WHEEL).name
    assert "manylinux" in name, name
    files = set(zipfile.ZipFile(WHEEL).namelist())
    for variant in CPU_VARIANTS:
        assert f"alpaca2/libggml-cpu-{variant}.so" in files, variant
    for lib in ("alpaca2/libllama.so", "alpaca2/libggml.so", "alpaca2/libggml-base.so"):
        assert lib in files
    assert any(f.startswith("alpaca2_llama.libs/libgomp") for f in files), "libgomp is bundled by auditwheel"
    auditwheel = shutil.which("auditwheel") or os.path.join(os.path.dirname(sys.executable), "auditwheel")
    if os.path.exists(auditwheel):
        r = subprocess.run([auditwheel, "show", WHEEL], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        assert "is consistent with the following platform tag" in " ".join(r.stdout.split())


@needs_wheel
def test_the_wheel_installs_and_chats_with_no_compiler_on_path(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    bin_dir = venv / "bin"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CC", "CXX", "CUDACXX")}
    env.update(PATH=str(bin_dir), ALPACA2_LLAMA_CPP_ARCHIVE="/nonexistent/never-fetched.tar.gz")
    for tool in COMPILERS:
        assert shutil.which(tool, path=env["PATH"]) is None, tool
    # binary packages only: nothing at all is built here
    r = subprocess.run([str(bin_dir / "python"), "-m", "pip", "install", "--only-binary", ":all:",
                        f"{WHEEL}[demo]"], capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r = subprocess.run([str(bin_dir / "python"), "-c", "import alpaca2; print(alpaca2.system_info()['backends_loaded'])"],
                       capture_output=True, text=True, env=env, timeout=120, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "CPU" in r.stdout
    r = subprocess.run([str(bin_dir / "alpaca2"), "chat", "--demo", "床前明月光，"],
                       capture_output=True, text=True, env=env, timeout=300, cwd=str(tmp_path), stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip(), "the demo answered nothing"
