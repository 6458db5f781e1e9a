#!/usr/bin/env bash
# Installs xmorpher-kernels with its test dependencies into a fresh virtual environment (.venv)
# and runs the test suite from outside the source tree, so it exercises the installed package.
# On the way: the build fails on deprecation warnings about our packaging (scripts/build_wheel.py),
# and the op is checked in a second environment without the registration extra (.venv-core).
#   bash scripts/test.sh [extra pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
python3 -m venv --clear .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
# torch first: the extension is built against it (scripts/build_wheel.py builds in this
# environment, as pip's --no-build-isolation does).
python -m pip install --quiet "torch==2.14.1" "setuptools>=77" wheel ninja
# The core environment: .venv as it is now (torch with its own dependencies, no registration
# extra). Hard links make the copy take seconds where a second torch install takes minutes.
rm -rf .venv-core && cp -al .venv .venv-core
wheels=$(mktemp -d)
if ! python scripts/build_wheel.py "$wheels" >"$wheels/build.log" 2>&1; then
    tail -n 60 "$wheels/build.log"
    echo "scripts/test.sh: building the wheel failed (full log: $wheels/build.log)" >&2
    exit 1
fi
wheel=$(ls "$wheels"/*.whl)
python -m pip install --quiet "$wheel[registration,test]"
# its own dependencies only: torch (there already) and numpy
.venv-core/bin/python -m pip install --quiet "$wheel"
cd "$(mktemp -d)"  # away from the source tree, which would shadow the installed package
"$root/.venv-core/bin/python" "$root/scripts/check_core_install.py"
python - <<'PY'
import torch, xmorpher_kernels
print("torch", torch.__version__, "cuda build", torch.version.cuda)
for name, status in xmorpher_kernels.available_backends().items():
    print(f"  backend {name}: {'available' if status.available else 'missing: ' + status.reason}")
PY
python -m pytest "$root/tests" -q -p no:cacheprovider --durations=15 "$@"
# Every benchmark still runs against the installed package: small problems, few rounds (figures
# meaningless), a session stopped when a built backend cannot load.
XK_BENCH_QUICK=1 python -m pytest "$root/benchmarks" -q -p no:cacheprovider --benchmark-columns=median,rounds
