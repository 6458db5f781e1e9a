"""Whether a C++ error of the native ops reaches Python as an exception, on the CPU and on the
GPU, each in its own process (a crash there must not take this one down).

On the H200 image (torch 2.11, extension compiled by /opt/gcc and linked by the system g++),
tests/test_cuda.py::test_errors_are_python_exceptions died with a segfault inside the CUDA op;
run by benchmarks/run_gpu.sh, this tells whether the CPU op's errors crash there too (then the
cause is the toolchain, not the CUDA code).
"""

import subprocess
import sys

CASES = {
    "cpu op, head_dim mismatch": "q = torch.randn(1, 2, 2, 2, 1, 8); k = torch.randn(1, 2, 2, 2, 1, 9)",
    "cuda op, head_dim 130": "q = torch.randn(1, 2, 2, 2, 1, 130, device='cuda'); k = q",
}
CALL = (
    "import torch, xmorpher_kernels\n{setup}\n"
    "try:\n"
    "    torch.ops.xmorpher_kernels.window_attention_forward(q, k, k, [2, 2, 2], [2, 2, 2], 1.0, None, None, None)\n"
    "    print('no error raised')\n"
    "except RuntimeError as error:\n"
    "    print('RuntimeError:', str(error).splitlines()[0][:120])\n"
)


def main() -> int:
    failures = 0
    for name, setup in CASES.items():
        result = subprocess.run([sys.executable, "-c", CALL.format(setup=setup)], capture_output=True, text=True)
        status = "ok" if result.returncode == 0 and "RuntimeError" in result.stdout else f"exit {result.returncode}"
        failures += status != "ok"
        print(f"{name}: {status}: {(result.stdout + result.stderr).strip().splitlines()[-1:] }")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
