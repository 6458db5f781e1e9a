"""pytest-benchmark timings of the GPU backends (triton, cuda) at the paper's first stage (bf16),
forward and forward+backward, next to the reference, with each call's peak memory above its
inputs in extra_info. Skipped without a CUDA GPU or pytest-benchmark. benchmarks/gpu_report.py
gives the fuller table (both stages, fp32, FlexAttention, roofline)."""

import pytest
import torch

pytest.importorskip("pytest_benchmark")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from xmorpher_kernels import available_backends, window_cross_attention  # noqa: E402

SHAPE = (2, 36, 36, 32, 3, 16)  # the paper's first stage: B, D, H, W, heads, head_dim
BACKENDS = [name for name in ("reference", "triton", "cuda") if available_backends()[name].available]


def _inputs():
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(SHAPE, generator=g, device="cuda", dtype=torch.bfloat16).requires_grad_(True) for _ in range(3))
    bias = (0.1 * torch.randn(3, 7, 7, 7, generator=g, device="cuda", dtype=torch.bfloat16)).requires_grad_(True)
    return q, k, v, bias


def _peak_mib(fn) -> float:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _synchronized(fn):
    def run():
        fn()
        torch.cuda.synchronize()

    return run


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward(benchmark, backend):
    q, k, v, bias = _inputs()

    @_synchronized
    def forward():
        with torch.no_grad():
            window_cross_attention(q, k, v, 2, 6, rel_pos_bias=bias, backend=backend)

    forward()  # compile and autotune outside the timing
    benchmark.extra_info.update(backend=backend, peak_additional_mib=_peak_mib(forward))
    benchmark(forward)


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_backward(benchmark, backend):
    q, k, v, bias = _inputs()
    grad_out = torch.randn_like(q)

    @_synchronized
    def train():
        for t in (q, k, v, bias):
            t.grad = None
        window_cross_attention(q, k, v, 2, 6, rel_pos_bias=bias, backend=backend).backward(grad_out)

    train()
    benchmark.extra_info.update(backend=backend, peak_additional_mib=_peak_mib(train))
    benchmark(train)
    assert torch.isfinite(q.grad).all() and torch.isfinite(bias.grad).all()
