#!/usr/bin/env bash
# The GPU check of xmorpher-kernels in one call, under ten minutes on an H200 with 16 cores
# (GPU_BUDGET_S, default 540 s, bounds every step). On a machine with an NVIDIA GPU and no network,
# from a copy of the working tree:
#   from 0 s  torch.compile of FlexAttention (benchmarks/flex_attention_rows.py) in the background,
#             for the table's FlexAttention rows; the extension builds in place for this card
#             (MAX_JOBS=16) while the Triton GPU tests run (they need no extension);
#   then      side by side: the CUDA GPU tests with the call-path tests (CUDA graphs, Triton launch
#             counts), compute-sanitizer (memcheck, racecheck) on the CUDA kernels, the error-path
#             probe (benchmarks/error_path_probe.py) and a seconds-long training run;
#   last      the table (benchmarks/gpu_report.py) with the time left: eager and graph-replay
#             medians, FlexAttention, the model's training step, the commit on every row, and a
#             per-kernel profile.
# One log per step in LOG_DIR (default $OUT, else benchmarks/results/gpu-logs), 8 files at most:
# summary, build, tests-triton, tests-cuda, sanitizer, error-path, train-smoke, report.
# The commit comes from git, or, where the tree travels without .git, from a stamp written just
# before sending it: `python benchmarks/run_stamp.py write`.
#
#   bash benchmarks/run_gpu.sh    (GPU_SKIP_TRITON_TESTS=1, GPU_SKIP_FLEX=1 leave those out)
set -uo pipefail
cd "$(dirname "$0")/.."
logs=${LOG_DIR:-${OUT:-benchmarks/results/gpu-logs}}
mkdir -p "$logs"
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # the in-place build, for the scripts under benchmarks/ too
budget=${GPU_BUDGET_S:-540}
started=$(date +%s)
elapsed() { echo $(( $(date +%s) - started )); }
# Seconds for a step: at most $1, keeping $2 for what must follow it, never under 10.
within() { local most=$1 left=$(( budget - $(elapsed) - $2 )); (( left < most )) && most=$left; (( most < 10 )) && most=10; echo "$most"; }
step() { echo "[$(elapsed) s] $*" | tee -a "$logs/summary.txt"; }
scratch=$(mktemp -d)

commit=$(python benchmarks/run_stamp.py label 2>/dev/null || echo unknown)
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  echo "commit $commit"
} 2>&1 | tee "$logs/summary.txt"
# This card's architecture only (the build is quicker; the cubin test reads the same variable).
export TORCH_CUDA_ARCH_LIST=$(python -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")

# FlexAttention's compile takes minutes: it starts first and has compiled when the table asks.
flex=""
if [ "${GPU_SKIP_FLEX:-0}" != 1 ]; then
  timeout "$budget" python benchmarks/flex_attention_rows.py --dir "$scratch/flex" --compile-budget-s $(( budget / 2 )) \
    >"$scratch/flex.log" 2>&1 &
  flex=$!
fi
(MAX_JOBS=16 timeout "$(within 330 150)" python setup.py build_ext --inplace >"$logs/build.txt" 2>&1
 echo "build rc $?" >>"$logs/build.txt") &
build=$!
# One hung test must not take the whole log with it; the ahead-of-time compile test needs no GPU
# (CI runs it) and is the slowest, so it is left out here.
per_test=$(python -c "import pytest_timeout" 2>/dev/null && echo "--timeout=90")
pytest_gpu=(python -m pytest -q -rfE --durations=6 $per_test)
triton_rc=0
if [ "${GPU_SKIP_TRITON_TESTS:-0}" = 1 ]; then
  echo "skipped (GPU_SKIP_TRITON_TESTS=1)" >"$logs/tests-triton.txt"
else
  timeout "$(within 170 300)" "${pytest_gpu[@]}" -n 6 tests/test_triton.py -k "not aot_compile" >"$logs/tests-triton.txt" 2>&1
  triton_rc=$?
fi
wait $build
step "$(tail -n 1 "$logs/build.txt"); triton tests rc $triton_rc: $(tail -n 1 "$logs/tests-triton.txt")"
if [ "$triton_rc" != 0 ]; then  # tests needing the extension failed before it was built
  echo "== failures rerun with the extension built" >>"$logs/tests-triton.txt"
  timeout "$(within 60 250)" "${pytest_gpu[@]}" --lf tests/test_triton.py -k "not aot_compile" >>"$logs/tests-triton.txt" 2>&1
  step "triton tests, failures rerun: rc $? $(tail -n 1 "$logs/tests-triton.txt")"
fi

# Correctness side by side (nothing is timed yet); the table keeps 200 s.
phase=$(within 240 200)  # the CUDA tests run both kernel generations
timeout "$phase" "${pytest_gpu[@]}" -n 6 tests/test_cuda.py tests/test_gpu_call_path.py >"$logs/tests-cuda.txt" 2>&1 &
cuda_tests=$!
(
  export PYTORCH_NO_CUDA_MEMORY_CACHING=1  # so memcheck sees each tensor's real bounds
  timeout $(( phase / 2 )) compute-sanitizer --tool memcheck --error-exitcode 1 python benchmarks/cuda_sanitizer_case.py
  echo "memcheck rc $?"
  timeout $(( phase / 2 )) compute-sanitizer --tool racecheck --error-exitcode 1 python benchmarks/cuda_sanitizer_case.py
  echo "racecheck rc $?"
) >"$logs/sanitizer.txt" 2>&1 &
sanitizer=$!
timeout "$phase" python benchmarks/error_path_probe.py --build-log "$logs/build.txt" --gdb-timeout-s $(( phase / 2 )) \
  >"$logs/error-path.txt" 2>&1 &
probe=$!
timeout $(( phase < 90 ? phase : 90 )) python -m xmorpher.cli train --config tiny --out "$scratch/gpu-smoke" --no-progress \
  --evaluate >"$logs/train-smoke.txt" 2>&1 &
smoke=$!
wait $cuda_tests
cuda_rc=$?
wait $sanitizer
wait $probe
probe_rc=$?
wait $smoke
smoke_rc=$?
step "cuda + call-path tests rc $cuda_rc: $(tail -n 1 "$logs/tests-cuda.txt"); $(grep -E '^(memcheck|racecheck) rc|ERROR SUMMARY' "$logs/sanitizer.txt" | tr '\n' ' ')"
step "error path probe rc $probe_rc: $(grep -E '^error path:' "$logs/error-path.txt" | tail -n 1)"
step "training smoke run rc $smoke_rc: $(tail -n 1 "$logs/train-smoke.txt")"

table=$(( budget - $(elapsed) - 10 ))
(( table < 60 )) && table=60
timeout "$table" python benchmarks/gpu_report.py --budget-s $(( table - 15 )) --flex-dir "$scratch/flex" \
  --commit "$commit" --profile "$scratch/profile.txt" 2>&1 | tee "$logs/report.txt"
[ -n "$flex" ] && kill "$flex" 2>/dev/null
{
  [ -f "$scratch/flex.log" ] && printf '\n== flex_attention_rows.py\n' && cat "$scratch/flex.log"
  [ -f "$scratch/profile.txt" ] && printf '\n== per-kernel profile\n' && cat "$scratch/profile.txt"
} >>"$logs/report.txt"
step "done, commit $commit"
