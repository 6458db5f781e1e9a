#!/usr/bin/env bash
# Installs xmorpher-kernels with its test dependencies into a fresh virtual environment (.venv)
# and runs the test suite from outside the source tree, so it exercises the installed package.
#   bash scripts/test.sh [extra pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
python3 -m venv --clear .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
# torch first: the extension is built against it (--no-build-isolation below).
python -m pip install --quiet "torch==2.14.1" setuptools wheel ninja
python -m pip install --quiet --no-build-isolation ".[test]"
cd "$(mktemp -d)"  # away from the source tree, which would shadow the installed package
python - <<'PY'
import torch, xmorpher_kernels
print("torch", torch.__version__, "cuda build", torch.version.cuda)
for name, status in xmorpher_kernels.available_backends().items():
    print(f"  backend {name}: {'available' if status.available else 'missing: ' + status.reason}")
PY
python -m pytest "$root/tests" -q -p no:cacheprovider --durations=15 "$@"
