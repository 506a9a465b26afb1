#!/usr/bin/env bash
# The GPU benchmark in one command, for a GPU machine that reaches no network (the `device` tool:
# 16 cores, CUDA toolkit, PyTorch image; 64 MiB carried per call; 10 minutes per command).
#
#   bash benchmarks/gpu.sh prepare   # here, with network: writes .gpu/ (git-ignored, about 10 MiB):
#                                    # the vendored llama.cpp source without its test models, the gguf
#                                    # wheel, and the Chinese-LLaMA-2 tokenizer (never committed)
#   bash benchmarks/gpu.sh run       # there, with .gpu carried: builds alpaca2 + llama-bench with CUDA
#                                    # for the present GPU (-j16), makes the synthetic 1.3B F16/Q4_0
#                                    # models (and 7B Q4_0 with GPU_SH_7B=1) on the machine, runs
#                                    # benchmarks/bench.py with every layer offloaded, flash attention
#                                    # off and on, and benchmarks/memory.py.  Results: in
#                                    # build/gpu-sh/results/; with $OUT set (the device tool), the
#                                    # tables, the log and one tarball of everything are copied there
#                                    # (5 files: the tool brings back at most 8).
#
# Each step of `run` skips what an earlier call on the same (warm) machine already did, so a run
# cut by the 10-minute limit is continued by running it again.  GPU_SH_CUDA=0 does the same on a
# CPU (a dry run of the script).  llama-cpp-python is not built there (another CUDA build of the
# same llama.cpp would not fit in the call): the GPU tables compare alpaca2 with llama-bench.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
GPU_DIR=$ROOT/.gpu

prepare() {
  mkdir -p "$GPU_DIR"
  if [ ! -f vendor/llama.cpp/CMakeLists.txt ]; then
    python3 vendor/fetch_llama_cpp.py
  fi
  # the source a build needs: no test vocabularies (models/, 75 MB), no tests
  tar -C vendor --exclude='llama.cpp/models' --exclude='llama.cpp/tests' -cJf "$GPU_DIR/llama.cpp.tar.xz" llama.cpp
  rm -f "$GPU_DIR"/*.whl
  python3 -m pip download -q --no-deps --only-binary=:all: -d "$GPU_DIR" "gguf>=0.10"
  tok=${ALPACA2_TOKENIZER_MODEL:-$ROOT/../shared/data/chinese-llama-2-tokenizer.model}
  if [ -f "$tok" ]; then
    cp "$tok" "$GPU_DIR/tokenizer.model"
  else
    echo "gpu.sh: no Chinese-LLaMA-2 tokenizer at $tok (set ALPACA2_TOKENIZER_MODEL)" >&2
    exit 1
  fi
  du -sh "$GPU_DIR"
  echo "gpu.sh: carry .gpu (add '/.gpu/' to .git/info/exclude or keep the .gitignore entry) and run: bash benchmarks/gpu.sh run"
}

run() {
  local t0 out site target py work
  t0=$(date +%s)
  # under build/ (git-ignored, kept between calls on a warm machine): a second call goes on
  work=$ROOT/build/gpu-sh
  out=$work/results
  mkdir -p "$out"
  site=$work/site
  target=$work/pkg
  py=python3
  log() { echo "gpu.sh [$(( $(date +%s) - t0 )) s] $*" | tee -a "$out/gpu-sh.log"; }
  [ -d "$GPU_DIR" ] || { echo "gpu.sh: no .gpu/ here: run 'bash benchmarks/gpu.sh prepare' first and carry .gpu" >&2; exit 1; }
  if ! $py -c "import gguf" 2>/dev/null; then
    $py -m pip install -q --no-index --no-deps --no-compile --target "$site" "$GPU_DIR"/*.whl
  fi
  export PYTHONPATH=$target:$site${PYTHONPATH:+:$PYTHONPATH}
  export PYTHONUNBUFFERED=1
  if [ ! -f vendor/llama.cpp/CMakeLists.txt ]; then
    log "unpacking llama.cpp"
    tar -C vendor -xJf "$GPU_DIR/llama.cpp.tar.xz"
  fi
  if [ "${GPU_SH_CUDA:-1}" != "0" ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
    export ALPACA2_CUDA=1
  fi
  if [ ! -f "$target/alpaca2/__init__.py" ]; then
    log "building (CUDA=${ALPACA2_CUDA:-0}, $(nproc) cores)"
    CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) ALPACA2_BUILD_TOOLS=1 \
      $py -m pip install -q --no-build-isolation --no-deps --no-compile --target "$target" \
        -Cbuild-dir=build/gpu-sh/cmake . > "$out/build.log" 2>&1 || { tail -50 "$out/build.log"; exit 1; }
    log "built"
  fi
  $py -c "import alpaca2, json; print(json.dumps(alpaca2.system_info(), indent=1))" > "$out/system_info.json"
  log "$($py -c "import alpaca2; print([d['name'] for d in alpaca2.devices()])")"
  local models=$work/models spec="1.3b-f16,1.3b-q4_0"
  mkdir -p "$models"
  [ "${GPU_SH_7B:-0}" = "1" ] && spec="$spec,7b-q4_0"
  export ALPACA2_TOKENIZER_MODEL=$GPU_DIR/tokenizer.model
  local ngl=99
  [ "${GPU_SH_CUDA:-1}" = "0" ] && ngl=0
  for fa in 0 1; do
    if [ ! -f "$out/bench-fa$fa.md" ]; then
      log "bench.py -fa $fa"
      $py benchmarks/bench.py --synthetic "$spec" --workdir "$models" -ngl "$ngl" -fa "$fa" \
        -p "${GPU_SH_PP:-512}" -n "${GPU_SH_TG:-128}" -g "${GPU_SH_GEN:-128}" -r "${GPU_SH_ROUNDS:-3}" \
        --out "$out/bench-fa$fa" 2>&1 | tee -a "$out/gpu-sh.log"
    fi
  done
  if [ ! -f "$out/memory.md" ]; then
    log "memory.py"
    $py benchmarks/memory.py "$models"/*.gguf --out "$out/memory.md" 2>&1 | tee -a "$out/gpu-sh.log"
  fi
  log "done: $out"
}

# what comes back from the device tool, also after a failure or a timeout
bring_back() {
  if [ -n "${OUT:-}" ] && [ -d "$ROOT/build/gpu-sh/results" ]; then
    local r=$ROOT/build/gpu-sh/results f
    for f in bench-fa0.md bench-fa1.md memory.md gpu-sh.log; do
      [ -f "$r/$f" ] && cp "$r/$f" "$OUT/"
    done
    tar -C "$ROOT/build/gpu-sh" -czf "$OUT/gpu-results.tar.gz" results || true
  fi
}

case "${1:-}" in
  prepare) prepare ;;
  run) trap bring_back EXIT; run ;;
  *) echo "usage: bash benchmarks/gpu.sh prepare|run" >&2; exit 2 ;;
esac
