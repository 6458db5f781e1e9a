#!/usr/bin/env bash
# On a machine with an NVIDIA GPU and no network, from a plain checkout: build the extension in
# place for this card, run the GPU tests of the Triton and CUDA backends, the CUDA kernels under
# compute-sanitizer (memcheck, racecheck), a probe of the ops' error path, a seconds-long training
# run, then one table of every backend at the paper's stages (benchmarks/gpu_report.py, written
# under benchmarks/results/ named after the card) and a per-kernel profile. Every step is time-boxed and logs to its own file in LOG_DIR (default
# benchmarks/results/gpu-logs, or $OUT where set), so a short loan of a GPU still brings back
# what finished. About five minutes on an H100/H200 (16 cores).
#
#   bash benchmarks/run_gpu.sh    (GPU_BUDGET_S=300: budget of the whole script;
#                                  GPU_SKIP_TRITON_TESTS=1, GPU_SKIP_FLEX=1 leave those out)
set -uo pipefail
cd "$(dirname "$0")/.."
logs=${LOG_DIR:-${OUT:-benchmarks/results/gpu-logs}}
mkdir -p "$logs"
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # the in-place build, for the scripts under benchmarks/ too
budget=${GPU_BUDGET_S:-300}
started=$(date +%s)
left() { echo $(( budget - ($(date +%s) - started) )); }
step() { echo "[$(( $(date +%s) - started )) s] $*" | tee -a "$logs/summary.txt"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$logs/summary.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$logs/summary.txt"
# This card's architecture only (the build is quicker; the cubin test reads the same variable).
export TORCH_CUDA_ARCH_LIST=$(python -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")

# The Triton backend needs no extension: its tests run while the extension compiles (for this
# card's architecture only). Tests needing the extension are rerun after the build (--lf).
(MAX_JOBS=16 python setup.py build_ext --inplace >"$logs/build.txt" 2>&1; echo "build rc $?" >>"$logs/build.txt") &
build=$!
# One hung test must not take the whole log with it; the ahead-of-time compile test needs no GPU
# (CI runs it) and is the slowest, so it is left out here.
per_test=$(python -c "import pytest_timeout" 2>/dev/null && echo "--timeout=90")
pytest_gpu=(python -m pytest -q -rfE --durations=6 $per_test)
triton_rc=0
if [ "${GPU_SKIP_TRITON_TESTS:-0}" = 1 ]; then
  echo "skipped (GPU_SKIP_TRITON_TESTS=1)" >"$logs/tests-triton.txt"
else
  timeout 170 "${pytest_gpu[@]}" -n 6 tests/test_triton.py -k "not aot_compile" >"$logs/tests-triton.txt" 2>&1
  triton_rc=$?
fi
wait $build
step "$(tail -n 1 "$logs/build.txt"); triton tests rc $triton_rc: $(tail -n 1 "$logs/tests-triton.txt")"
if [ "$triton_rc" != 0 ]; then
  echo "== failures rerun with the extension built" >>"$logs/tests-triton.txt"
  timeout 90 "${pytest_gpu[@]}" --lf tests/test_triton.py -k "not aot_compile" >>"$logs/tests-triton.txt" 2>&1
  step "triton tests, failures rerun: rc $? $(tail -n 1 "$logs/tests-triton.txt")"
fi

# CUDA tests and compute-sanitizer side by side (correctness only; nothing is timed yet).
timeout 150 "${pytest_gpu[@]}" -n 6 tests/test_cuda.py >"$logs/tests-cuda.txt" 2>&1 &
cuda_tests=$!
(
  export PYTORCH_NO_CUDA_MEMORY_CACHING=1  # so memcheck sees each tensor's real bounds
  timeout 100 compute-sanitizer --tool memcheck --error-exitcode 1 python benchmarks/cuda_sanitizer_case.py
  echo "memcheck rc $?"
  timeout 100 compute-sanitizer --tool racecheck --error-exitcode 1 python benchmarks/cuda_sanitizer_case.py
  echo "racecheck rc $?"
) >"$logs/sanitizer.txt" 2>&1
wait $cuda_tests
cuda_rc=$?
step "cuda tests rc $cuda_rc: $(tail -n 1 "$logs/tests-cuda.txt"); $(grep -E '^(memcheck|racecheck) rc|ERROR SUMMARY' "$logs/sanitizer.txt" | tr '\n' ' ')"

# Toolchain, and whether C++ errors of the ops reach Python on this machine (see the probe's doc).
{
  echo "CC=${CC:-} CXX=${CXX:-} LDSHARED=${LDSHARED:-}; g++: $(g++ --version | head -n 1)"
  [ -x /opt/gcc/bin/g++ ] && echo "/opt/gcc/bin/g++: $(/opt/gcc/bin/g++ --version | head -n 1)"
  python -c "import torch; print('torch built with', torch.__config__.show().splitlines()[1].strip())"
  timeout 60 python benchmarks/error_path_probe.py
} >>"$logs/sanitizer.txt" 2>&1
step "error path probe: $(tail -n 2 "$logs/sanitizer.txt" | tr '\n' ' ')"

# The training loop on the GPU (mixed precision, the op's auto backend): the tiny preset, seconds.
timeout 120 python -m xmorpher.cli train --config tiny --out "$(mktemp -d)/gpu-smoke" --no-progress --evaluate \
  >"$logs/train-smoke.txt" 2>&1
step "training smoke run rc $?: $(tail -n 1 "$logs/train-smoke.txt")"

remaining=$(left)
flex_budget=$(( remaining > 120 ? remaining - 120 : 0 ))
[ "${GPU_SKIP_FLEX:-0}" = 1 ] && flex_budget=0
timeout $(( remaining > 60 ? remaining : 60 )) python benchmarks/gpu_report.py --budget-s $flex_budget \
  --profile "$logs/profile.txt" 2>&1 | tee "$logs/report.txt"
# One file less to bring back (at most 8): the profile goes at the end of the report.
[ -f "$logs/profile.txt" ] && cat "$logs/profile.txt" >>"$logs/report.txt" && rm "$logs/profile.txt"
step "done"
