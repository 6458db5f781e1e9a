"""The op's benchmark problems (the paper's first two stages) and measuring helpers shared by the
benchmarks: FLOP counts and peak additional memory of a call.

``XK_BENCH_QUICK=1`` (CI) swaps the stages for small volumes of the same layout, so that every
benchmark runs in seconds; its figures say nothing about speed.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Callable, Tuple

import torch


@dataclass(frozen=True)
class Stage:
    name: str
    shape: Tuple[int, int, int, int, int, int]  # (B, D, H, W, heads, head_dim)
    window: int = 2
    search: int = 6

    @property
    def forward_flops(self) -> int:
        """Multiply-adds of Q K^T and P V over every (query, key) pair, counted as 2 FLOPs each."""
        batch, depth, height, width, heads, head_dim = self.shape
        return 2 * 2 * batch * depth * height * width * heads * self.search**3 * head_dim

    def inputs(self, dtype: torch.dtype = torch.float32, device: str = "cpu", requires_grad: bool = False):
        generator = torch.Generator().manual_seed(0)
        return [
            torch.randn(self.shape, generator=generator).to(dtype=dtype, device=device).requires_grad_(requires_grad)
            for _ in range(3)
        ]


QUICK = os.environ.get("XK_BENCH_QUICK", "0") == "1"

# XMorpher at its 144 x 144 x 128 input: 4x4x4 patches give the first stage, one merge the second.
STAGES = {
    "stage1": Stage("stage1", (2, 36, 36, 32, 3, 16)),
    "stage2": Stage("stage2", (2, 18, 18, 16, 6, 16)),
}
if QUICK:  # same heads and head_dim, volumes with partial windows, a few milliseconds per call
    STAGES = {
        "stage1": Stage("stage1", (1, 6, 7, 5, 3, 16)),
        "stage2": Stage("stage2", (1, 3, 4, 3, 6, 16)),
    }


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_additional_bytes(fn: Callable[[], object]) -> int:
    """Peak resident memory of ``fn()`` above what the process held before it (Linux only).

    Runs ``fn`` once to warm up (thread pools, lazily loaded code), then resets the kernel's
    high-water mark (``/proc/self/clear_refs``) and reads VmHWM after a second call. Run it in a
    process whose allocator returns large blocks to the system (see ``measure_in_subprocess``),
    so memory kept from the warm-up cannot hide the call's own.
    """
    fn()
    gc.collect()
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    result = fn()
    peak = _status_kib("VmHWM")
    del result
    return max(0, peak - before) * 1024


def run_op(stage: Stage, backend: str, mode: str, dtype: torch.dtype = torch.float32) -> Callable[[], object]:
    """A closure running the op once: mode "forward" (no grad) or "forward+backward"."""
    from xmorpher_kernels import window_cross_attention

    q, k, v = stage.inputs(dtype, requires_grad=mode != "forward")
    grad = torch.ones(stage.shape, dtype=dtype) if mode != "forward" else None

    def call():
        if mode == "forward":
            with torch.no_grad():
                return window_cross_attention(q, k, v, stage.window, stage.search, backend=backend)
        out = window_cross_attention(q, k, v, stage.window, stage.search, backend=backend)
        out.backward(grad)
        return out

    return call


def measure_in_subprocess(stage: str, backend: str, mode: str) -> int:
    """Peak additional bytes of one call, measured in a fresh Python process."""
    code = (
        "import json, sys, torch\n"
        "sys.path.insert(0, %r)\n"
        "from op_problems import STAGES, peak_additional_bytes, run_op\n"
        "call = run_op(STAGES[%r], %r, %r)\n"
        "print(json.dumps(peak_additional_bytes(call)))\n"
    ) % (os.path.dirname(os.path.abspath(__file__)), stage, backend, mode)
    import xmorpher_kernels

    # The same xmorpher_kernels as this process, run away from a source tree that could shadow it.
    # A fixed mmap threshold makes glibc return every block >= 64 KiB to the system when freed.
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(xmorpher_kernels.__file__)))
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536",
               PYTHONPATH=package_parent + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tempfile.gettempdir())
    if result.returncode != 0:
        raise RuntimeError(f"memory measurement of {backend} {mode} at {stage} failed:\n{result.stderr[-3000:]}")
    return int(json.loads(result.stdout.strip().splitlines()[-1]))
