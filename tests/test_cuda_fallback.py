"""A CUDA-enabled build on a machine with no GPU or driver: imports, says so, runs on the CPU.

Runs in every build; the CUDA assertions apply when the build has CUDA compiled in
(ALPACA2_EXPECT_CUDA=1 makes a missing CUDA build a failure, as .ci/cuda-build sets it).
"""
import os
import shutil

import numpy as np
import pytest

import alpaca2
from conftest import run_python


def _cuda_compiled():
    return "CUDA" in alpaca2.system_info()["backends_compiled"]


def test_build_has_cuda_when_expected():
    if os.environ.get("ALPACA2_EXPECT_CUDA") == "1":
        assert _cuda_compiled()
        assert (alpaca2.get_lib_dir() and
                os.path.exists(os.path.join(alpaca2.get_lib_dir(), "libggml-cuda.so")))
    elif not _cuda_compiled():
        pytest.skip("CPU-only build")


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU driver is present")
def test_cuda_build_without_gpu_falls_back_to_cpu_with_one_log_line(tiny_path):
    if not _cuda_compiled():
        pytest.skip("CPU-only build")
    info = alpaca2.system_info()
    # the CUDA module may load (libcudart is found) but it has no device without a driver
    assert not any(d["type"] == "gpu" for d in info["devices"])
    assert info["gpu_offload"] is False
    r = run_python(f"""
import alpaca2
m = alpaca2.Model({tiny_path!r})                # n_gpu_layers=-1 by default: harmless without a GPU
c = alpaca2.Context(m, n_ctx=128)
c.decode(m.tokenize("床前明月光"))
toks = []
s = alpaca2.Sampler(temp=0)
for _ in range(8):
    t = s.sample(c); toks.append(t); c.decode_token(t)
print(len(toks))
""")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "8"
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "no CUDA device" in lines[0], r.stderr
