"""Speed and memory of window_cross_attention on the CPU: the fused cpu backend against the
plain PyTorch reference at the paper's first two stages, forward and forward+backward, plus a
dense matmul of the same FLOP count as the CPU's ceiling.

Run: ``pytest benchmarks/test_bench_op.py`` (prints a summary table with ratios against the
reference measured in the same run, and the machine). Under ``XK_BENCH_QUICK=1`` the problems
are small, one round each, and no memory is measured.
"""

from __future__ import annotations

import pytest
import torch

from op_problems import QUICK, STAGES, measure_in_subprocess, run_op

# Both always run: the conftest stops the session when the cpu backend cannot load.
BACKENDS = ("reference", "cpu")
MODES = ("forward", "forward+backward")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("stage", list(STAGES))
def test_op(benchmark, stage, backend, mode):
    problem = STAGES[stage]
    call = run_op(problem, backend, mode)
    benchmark.group = f"{stage} {mode}"
    benchmark.extra_info.update(
        kind="op",
        stage=stage,
        backend=backend,
        mode=mode,
        threads=torch.get_num_threads(),
        forward_gflop=problem.forward_flops / 1e9,
        peak_additional_bytes=None if QUICK else measure_in_subprocess(stage, backend, mode),
    )
    benchmark.pedantic(call, rounds=1 if QUICK else 3, warmup_rounds=1)


@pytest.mark.parametrize("stage", list(STAGES))
def test_dense_matmul_ceiling(benchmark, stage):
    """A square fp32 matmul with the forward's FLOP count: what the CPU can do at best."""
    flops = STAGES[stage].forward_flops
    n = round((flops / 2) ** (1 / 3))
    a, b = torch.randn(n, n), torch.randn(n, n)
    benchmark.group = f"{stage} forward"
    benchmark.extra_info.update(kind="matmul", stage=stage, backend="dense matmul", mode="forward",
                                forward_gflop=2 * n**3 / 1e9, peak_additional_bytes=n * n * 4)
    benchmark.pedantic(lambda: a @ b, rounds=1 if QUICK else 5, warmup_rounds=1)
