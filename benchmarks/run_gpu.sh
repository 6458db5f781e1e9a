#!/usr/bin/env bash
# On a machine with an NVIDIA GPU and no network: install the package from this checkout, run the
# GPU tests of the Triton and CUDA backends (CUDA also under compute-sanitizer), the Triton
# pytest-benchmark suite, then print (and write under
# benchmarks/results/, named after the card) one table of every backend at the paper's stages.
# Finishes in under ten minutes on an H100; FlexAttention is skipped if time runs short.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -m pip install --no-build-isolation --no-deps . 2>&1 | tail -n 2

# `pytest` (not `python -m pytest`) so the installed package, with its compiled extension, is
# imported rather than the source tree in the working directory.
pytest -q -x tests/test_triton.py tests/test_cuda.py
# The CUDA kernels under compute-sanitizer on a small case (caching off so memcheck sees each
# tensor's real bounds).
if command -v compute-sanitizer >/dev/null && python -c "import xmorpher_kernels as x, sys; sys.exit(not x.available_backends()['cuda'].available)"; then
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 python benchmarks/cuda_sanitizer_case.py
  compute-sanitizer --tool racecheck --error-exitcode 1 python benchmarks/cuda_sanitizer_case.py
fi
if python -c "import pytest_benchmark" 2>/dev/null; then
  pytest -q benchmarks/test_bench_triton.py --benchmark-columns=median,iqr,rounds
else
  echo "pytest-benchmark is not installed: skipping benchmarks/test_bench_triton.py"
fi

elapsed=$(( $(date +%s) - started ))
python benchmarks/gpu_report.py --budget-s $(( 480 - elapsed > 0 ? 480 - elapsed : 0 ))
echo "total $(( $(date +%s) - started )) s"
