"""The build: installed as a wheel, the vendored llama.cpp pin, introspection, C and Cython users."""
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

import alpaca2
from conftest import LLAMA_CPP_DIR, ROOT, run_python

FETCH = ROOT / "vendor" / "fetch_llama_cpp.py"


def test_imported_from_an_installed_wheel_not_the_source_tree():
    pkg = Path(alpaca2.__file__).resolve().parent
    assert ROOT / "src" not in pkg.parents, f"alpaca2 was imported from the source tree: {pkg}"
    # a real wheel install: the .dist-info RECORD lists the extension and the bundled libllama
    from importlib.metadata import distribution
    files = {str(f) for f in distribution("alpaca2-llama").files}
    assert any(f.startswith("alpaca2/_core.") and f.endswith(".so") for f in files)
    assert "alpaca2/libllama.so" in files
    # and it imports in an isolated interpreter started elsewhere (-I: no cwd, no user site)
    r = subprocess.run([sys.executable, "-I", "-c", "import alpaca2, json; print(json.dumps(alpaca2.backends()))"],
                       capture_output=True, text=True, cwd="/", timeout=60)
    assert r.returncode == 0, r.stderr
    assert "CPU" in json.loads(r.stdout)


def test_llama_cpp_commit_matches_the_vendored_tree():
    assert alpaca2.LLAMA_CPP_COMMIT == "0c1e57098"
    stamp = LLAMA_CPP_DIR / ".alpaca2-source"
    if not stamp.exists():
        pytest.skip("built against a user's llama.cpp (ALPACA2_LLAMA_CPP_DIR)")
    fields = dict(line.split("=", 1) for line in stamp.read_text().split())
    assert fields["commit"] == alpaca2.LLAMA_CPP_COMMIT
    assert fields["sha256"] == "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"


def test_fetch_rejects_a_tampered_archive(tmp_path):
    fake = tmp_path / "llama_cpp_python-0.3.36.tar.gz"
    fake.write_bytes(b"not the pinned archive")
    r = subprocess.run([sys.executable, str(FETCH), "--archive", str(fake), "--dest", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "sha256" in r.stderr and "expected 832db069" in r.stderr
    assert not (tmp_path / "out").exists()


def test_fetch_rejects_a_corrupt_cached_archive_and_does_not_extract(tmp_path):
    # a corrupt file in the cache is detected by hash before anything is extracted
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "llama_cpp_python-0.3.36.tar.gz").write_bytes(b"\x1f\x8b garbage")
    env = dict(os.environ, ALPACA2_CACHE_DIR=str(cache), PIP_NO_INDEX="1", PIP_FIND_LINKS=str(tmp_path))
    r = subprocess.run([sys.executable, str(FETCH), "--dest", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 1
    assert "corrupt" in r.stderr
    assert "ALPACA2_LLAMA_CPP_DIR" in r.stderr      # the message names what to do
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not (ROOT / "CMakeLists.txt").exists(), reason="needs the source tree")
def test_a_wrong_llama_cpp_dir_is_a_clear_configure_error(tmp_path):
    cmake = subprocess.run([sys.executable, "-c", "import cmake, sys; print(cmake.CMAKE_BIN_DIR)"],
                           capture_output=True, text=True)
    exe = os.path.join(cmake.stdout.strip(), "cmake") if cmake.returncode == 0 else "cmake"
    env = dict(os.environ, ALPACA2_LLAMA_CPP_DIR=str(tmp_path / "not-llama"))
    (tmp_path / "not-llama").mkdir()
    r = subprocess.run([exe, "-S", str(ROOT), "-B", str(tmp_path / "build")], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode != 0
    msg = " ".join(r.stderr.split())          # CMake wraps long messages
    assert "is not a llama.cpp tree" in msg and "ALPACA2_LLAMA_CPP_DIR" in msg


def _tree_of_another_commit(tmp_path, git):
    """A llama.cpp-shaped tree: a git checkout of its own commit, or (no git) an edited llama.h."""
    tree = tmp_path / "llama.cpp"
    for rel in ("include/llama.h", "ggml/include/ggml-backend.h"):
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_bytes((LLAMA_CPP_DIR / rel).read_bytes())
    (tree / "CMakeLists.txt").write_text("project(not_llama_cpp)\n")
    if git:
        run = dict(cwd=tree, check=True, capture_output=True)
        subprocess.run(["git", "init", "-q"], **run)
        subprocess.run(["git", "add", "-A"], **run)
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "other"], **run)
    else:
        with open(tree / "include" / "llama.h", "a") as f:
            f.write("// a newer llama.h\n")
    return tree


@pytest.mark.skipif(not (ROOT / "CMakeLists.txt").exists(), reason="needs the source tree")
@pytest.mark.parametrize("git", [True, False], ids=["git-checkout", "plain-tree"])
def test_a_llama_cpp_dir_of_another_commit_names_the_expected_one(tmp_path, git):
    if git and shutil.which("git") is None:
        pytest.skip("no git")
    tree = _tree_of_another_commit(tmp_path, git)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALPACA2_")}
    env["ALPACA2_LLAMA_CPP_DIR"] = str(tree)
    r = subprocess.run([_cmake_exe(), "-S", str(ROOT), "-B", str(tmp_path / "build")], capture_output=True,
                       text=True, env=env, timeout=300)
    msg = " ".join(r.stderr.split())
    assert r.returncode != 0
    assert "is not llama.cpp commit 0c1e57098" in msg or ("is llama.cpp commit" in msg and "against commit 0c1e57098" in msg)
    assert "ALPACA2_LLAMA_CPP_ANY_COMMIT=1" in msg
    if git:
        head = subprocess.run(["git", "-C", str(tree), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        assert head in msg and f"git -C {tree} checkout 0c1e57098" in msg
    # the override: the commit check is passed over (whatever the incomplete tree does next)
    env["ALPACA2_LLAMA_CPP_ANY_COMMIT"] = "1"
    r = subprocess.run([_cmake_exe(), "-S", str(ROOT), "-B", str(tmp_path / "build2")], capture_output=True,
                       text=True, env=env, timeout=300)
    msg = " ".join(r.stderr.split())
    assert "is llama.cpp commit" not in msg and "is not llama.cpp commit" not in msg


def test_system_info_reports_the_cpu_backend():
    info = alpaca2.system_info()
    assert "CPU" in info["backends_compiled"] and "CPU" in info["backends_loaded"]
    assert any(d["type"] == "cpu" for d in info["devices"])
    assert info["llama_cpp_commit"] == alpaca2.LLAMA_CPP_COMMIT
    assert isinstance(info["cpu_features"], dict) and info["cpu_features"]
    if "CUDA" in info["backends_compiled"] and not any(d["type"] == "gpu" for d in info["devices"]):
        assert info["gpu_offload"] is False


def test_portable_build_picks_a_cpu_variant_for_this_machine():
    info = alpaca2.system_info()
    if info["native"]:
        pytest.skip("GGML_NATIVE build")
    libs = sorted(p.name for p in Path(alpaca2.get_lib_dir()).glob("libggml-cpu-*.so"))
    assert len(libs) >= 2, libs           # several variants shipped, one chosen at run time
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    if " avx2 " in flags:
        assert info["cpu_features"].get("AVX2") is True   # not the x64 baseline


def test_headers_and_libs_are_shipped():
    inc = Path(alpaca2.get_include())
    for h in ("llama.h", "ggml.h", "ggml-backend.h", "alpaca2/_core.pxd", "alpaca2/_c/llama.pxd"):
        assert (inc / h).exists(), h
    lib = Path(alpaca2.get_lib_dir())
    for so in ("libllama.so", "libggml.so", "libggml-base.so"):
        assert (lib / so).exists(), so


def test_a_c_program_links_against_the_bundled_libllama(tmp_path):
    src = tmp_path / "info.c"
    src.write_text(textwrap.dedent("""
        #include <stdio.h>
        #include "llama.h"
        #include "ggml-backend.h"
        int main(int argc, char ** argv) {
            ggml_backend_load_all_from_path(argv[1]);   /* backends are modules next to libllama */
            llama_backend_init();
            printf("%s\\n", llama_print_system_info());
            printf("devices=%zu\\n", ggml_backend_dev_count());
            llama_backend_free();
            return 0;
        }
    """))
    exe = tmp_path / "info"
    lib = alpaca2.get_lib_dir()
    subprocess.run(["cc", str(src), "-o", str(exe), f"-I{alpaca2.get_include()}", f"-L{lib}",
                    "-lllama", "-lggml", "-lggml-base", f"-Wl,-rpath,{lib}"], check=True, timeout=120)
    r = subprocess.run([str(exe), lib], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "CPU :" in r.stdout
    assert "devices=" in r.stdout and not r.stdout.strip().endswith("devices=0")


def test_a_cython_extension_cimports_alpaca2_core(tmp_path, tiny_path):
    pytest.importorskip("Cython")
    pytest.importorskip("setuptools")
    (tmp_path / "user_ext.pyx").write_text(textwrap.dedent("""
        # cython: language_level=3
        from alpaca2._core cimport Model, Context
        from alpaca2._c.llama cimport llama_model_n_layer, llama_n_ctx, llama_memory_seq_pos_max

        def inspect(Model model, Context ctx):
            # the raw llama.cpp handles of alpaca2's objects, used directly from C
            return (llama_model_n_layer(model.ptr), llama_n_ctx(ctx.ptr),
                    llama_memory_seq_pos_max(ctx.mem, 0) + 1)
    """))
    (tmp_path / "setup.py").write_text(textwrap.dedent(f"""
        from setuptools import setup, Extension
        from Cython.Build import cythonize
        import alpaca2, numpy
        ext = Extension("user_ext", ["user_ext.pyx"],
                        include_dirs=[alpaca2.get_include(), numpy.get_include()],
                        library_dirs=[alpaca2.get_lib_dir()], libraries=["llama"],
                        runtime_library_dirs=[alpaca2.get_lib_dir()])
        setup(name="user_ext", ext_modules=cythonize([ext], include_path=[alpaca2.get_include()], quiet=True))
    """))
    r = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    code = textwrap.dedent(f"""
        import alpaca2, user_ext
        m = alpaca2.Model({str(tiny_path)!r})
        c = alpaca2.Context(m, n_ctx=128)
        c.decode(m.tokenize("床前明月光"))
        print(json.dumps([user_ext.inspect(m, c), [m.n_layer, c.n_ctx, c.n_past()]]))
    """)
    r = run_python("import json\n" + code, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    from_c, from_python = json.loads(r.stdout)
    assert from_c == from_python and from_c[2] > 0


# --- the CUDA default: decided by cmake/alpaca2_cuda.cmake, run here with fake nvidia-smi / nvcc ---
CUDA_DECISION = ROOT / "cmake" / "alpaca2_cuda.cmake"
SMI_OK = "#!/bin/sh\necho 'GPU 0: NVIDIA H200 (UUID: GPU-1234)'\n"
SMI_NO_DRIVER = ("#!/bin/sh\necho \"NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA "
                 "driver.\"\nexit 9\n")


def _cmake_exe():
    r = subprocess.run([sys.executable, "-c", "import cmake; print(cmake.CMAKE_BIN_DIR)"], capture_output=True, text=True)
    return os.path.join(r.stdout.strip(), "cmake") if r.returncode == 0 else "cmake"


def _decide_cuda(tmp_path, smi=None, nvcc=False, **env):
    """GGML_CUDA and the reason printed, on a PATH holding only the fakes asked for."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, script in (("nvidia-smi", smi), ("nvcc", "#!/bin/sh\necho 'release 13.0'\n" if nvcc else None)):
        if script:
            (bin_dir / name).write_text(script)
            (bin_dir / name).chmod(0o755)
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("ALPACA2_", "CUDA"))}
    full_env.update(PATH=f"{bin_dir}:/usr/bin:/bin", CUDA_HOME=str(tmp_path / "no-toolkit"), CMAKE_ARGS="")
    full_env.update(env)
    r = subprocess.run([_cmake_exe(), "-P", str(CUDA_DECISION)], capture_output=True, text=True, env=full_env,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    fields = dict(line.split("=", 1) for line in r.stderr.splitlines() if "=" in line)
    return fields["GGML_CUDA"], fields["reason"]


@pytest.mark.skipif(not CUDA_DECISION.exists(), reason="needs the source tree")
def test_cuda_is_built_by_default_where_a_gpu_and_nvcc_are_found(tmp_path):
    on, why = _decide_cuda(tmp_path, smi=SMI_OK, nvcc=True)
    assert on == "ON" and "NVIDIA H200" in why and str(tmp_path / "bin" / "nvcc") in why and "ALPACA2_CUDA=0" in why


@pytest.mark.skipif(not CUDA_DECISION.exists(), reason="needs the source tree")
def test_cpu_only_without_a_gpu_or_without_nvcc(tmp_path):
    on, why = _decide_cuda(tmp_path, smi=None, nvcc=True)
    assert on == "OFF" and "no GPU visible" in why and "ALPACA2_CUDA=1" in why
    (tmp_path / "x").mkdir()
    on, why = _decide_cuda(tmp_path / "x", smi=SMI_NO_DRIVER, nvcc=True)
    assert on == "OFF" and "no GPU visible" in why
    (tmp_path / "y").mkdir()
    on, why = _decide_cuda(tmp_path / "y", smi=SMI_OK, nvcc=False)
    assert on == "OFF" and "no CUDA compiler" in why and "CUDA_HOME" in why
    # nvcc in the toolkit's home (CUDA_HOME) though not on PATH counts
    home = tmp_path / "toolkit" / "bin"
    home.mkdir(parents=True)
    (home / "nvcc").write_text("#!/bin/sh\n")
    (home / "nvcc").chmod(0o755)
    on, why = _decide_cuda(tmp_path / "y", smi=SMI_OK, CUDA_HOME=str(tmp_path / "toolkit"))
    assert on == "ON" and str(home / "nvcc") in why


@pytest.mark.skipif(not CUDA_DECISION.exists(), reason="needs the source tree")
def test_alpaca2_cuda_and_cmake_args_force_either_way(tmp_path):
    assert _decide_cuda(tmp_path, smi=SMI_OK, nvcc=True, ALPACA2_CUDA="0") == ("OFF", "ALPACA2_CUDA=0")
    assert _decide_cuda(tmp_path, ALPACA2_CUDA="1") == ("ON", "ALPACA2_CUDA=1")
    assert _decide_cuda(tmp_path, CMAKE_ARGS="-DGGML_CUDA=on")[0] == "ON"
    assert _decide_cuda(tmp_path, smi=SMI_OK, nvcc=True, CMAKE_ARGS="-DGGML_CUDA=OFF")[0] == "OFF"


def test_a_cpu_build_on_a_gpu_machine_warns_once_how_to_rebuild(tmp_path, caplog, monkeypatch):
    from alpaca2 import _gpu_hint
    gpus = tmp_path / "gpus"
    gpus.mkdir()
    where = dict(proc_dir=str(gpus), dev=str(tmp_path / "nvidia0"))
    monkeypatch.delenv("ALPACA2_NO_GPU_HINT", raising=False)
    assert _gpu_hint.warn_if_gpu_unused(False, **where) is False          # no GPU: silent
    (gpus / "0000:00:05.0").mkdir()
    with caplog.at_level("WARNING", logger="alpaca2"):
        assert _gpu_hint.warn_if_gpu_unused(True, **where) is False       # CUDA build: silent
        assert _gpu_hint.warn_if_gpu_unused(False, **where) is True
    [record] = caplog.records
    assert "CPU only" in record.getMessage() and "ALPACA2_CUDA=1 pip install" in record.getMessage()
    monkeypatch.setenv("ALPACA2_NO_GPU_HINT", "1")
    assert _gpu_hint.warn_if_gpu_unused(False, **where) is False
    # this machine, as the import saw it
    assert _gpu_hint.gpu_visible() == (os.path.exists("/dev/nvidia0") or bool(
        os.path.isdir("/proc/driver/nvidia/gpus") and os.listdir("/proc/driver/nvidia/gpus")))
