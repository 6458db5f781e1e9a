"""Per-call cost of window_cross_attention on the CPU, next to torch's scaled_dot_product_attention
of the same size, both measured in the same run.

The problem is tiny on purpose: a 1 x 2 x 2 x 2 volume, one head, head_dim 16, window 2, search 6,
so one base window whose 8 queries see all 8 tokens (the rest of the search box lies outside the
volume and is masked). That is exactly SDPA over 8 tokens (1 batch, 1 head, head_dim 16), which
each test checks once; the arithmetic is a few thousand FLOPs, so what is timed is the path from
Python to the kernel and back: argument checks, backend choice, dispatch, autograd.

Run: ``pytest benchmarks/test_bench_overhead.py``. Each call is timed over many rounds of a few
calls (pytest-benchmark's timer, ``time.perf_counter``); the summary at the end gives the median
per call, the ratio to SDPA of the same mode, and whether ``backend="auto"`` meets the targets of
issue 10 (forward at most 3x SDPA's, forward+backward at most 1.5x). The Triton backend takes
part only when it can run CPU tensors (``TRITON_INTERPRET=1``), with few rounds: the interpreter
is slow, and its figure is not an overhead; the reference (milliseconds of PyTorch ops per call)
gets a tenth of the rounds.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from op_problems import QUICK
from xmorpher_kernels import available_backends, window_cross_attention

SHAPE = (1, 2, 2, 2, 1, 16)  # B, D, H, W, heads, head_dim
WINDOW, SEARCH = 2, 6
TOKENS = 8
MODES = ("forward", "forward+backward")
# rounds x calls per round: 3000 calls per figure (the machine is noisy; medians of rounds).
ROUNDS, CALLS_PER_ROUND, WARMUP_ROUNDS = (20, 5, 5) if QUICK else (600, 5, 50)


def _op_backends():
    names = ["auto", "reference", "cpu"]
    if "cpu" in available_backends()["triton"].devices:  # the interpreter is on
        names.append("triton")
    return names


def _inputs(requires_grad: bool):
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(SHAPE, generator=generator).requires_grad_(requires_grad) for _ in range(3))
    return q, k, v


def _sdpa_layout(t: torch.Tensor) -> torch.Tensor:
    """(1, D, H, W, 1, head_dim) -> (1, 1, tokens, head_dim), the same memory."""
    return t.reshape(1, 1, TOKENS, SHAPE[-1])


def _calls(backend: str, mode: str):
    """A closure making one call in ``mode``, and the output it returns for the check."""
    q, k, v = _inputs(requires_grad=mode == "forward+backward")
    if backend == "sdpa":
        q, k, v = (_sdpa_layout(t.detach()).requires_grad_(t.requires_grad) for t in (q, k, v))

        def attend():
            return F.scaled_dot_product_attention(q, k, v)
    else:

        def attend():
            return window_cross_attention(q, k, v, WINDOW, SEARCH, backend=backend)

    if mode == "forward":
        return attend

    grad_out = torch.ones_like(q)

    def forward_backward():
        out = attend()
        torch.autograd.grad(out, (q, k, v), grad_out)  # no accumulation into .grad between calls
        return out

    return forward_backward


def _run(benchmark, backend: str, mode: str) -> None:
    call = _calls(backend, mode)
    reference = _calls("sdpa", "forward")().reshape(TOKENS, -1)
    result = call().detach().reshape(TOKENS, -1)
    assert torch.allclose(result, reference, atol=1e-5, rtol=1e-5), f"{backend} differs from SDPA on the tiny volume"
    benchmark.group = f"per-call overhead, {mode}"
    benchmark.extra_info.update(kind="overhead", backend=backend, mode=mode, threads=torch.get_num_threads())
    if backend == "triton":  # interpreted: seconds per call
        benchmark.pedantic(call, rounds=3, iterations=1, warmup_rounds=1)
    else:
        share = 10 if backend == "reference" else 1
        benchmark.pedantic(call, rounds=max(ROUNDS // share, 5), iterations=CALLS_PER_ROUND,
                           warmup_rounds=max(WARMUP_ROUNDS // share, 1))


@pytest.mark.parametrize("mode", MODES)
def test_sdpa(benchmark, mode):
    _run(benchmark, "sdpa", mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", _op_backends())
def test_window_cross_attention(benchmark, backend, mode):
    _run(benchmark, backend, mode)
