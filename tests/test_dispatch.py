"""The dispatcher and the public API: which backend ``backend="auto"`` picks and why, what a named
backend that cannot run says, what ``available_backends()`` reports, and the per-signature cache
of decisions (it must follow every mode the choice depends on and never keep tensors alive)."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

import xmorpher_kernels
from xmorpher_kernels import available_backends, window_cross_attention
from xmorpher_kernels._backends import auto_candidates, select_backend
from xmorpher_kernels._checks import check_arguments

CPU_FUSED = available_backends()["cpu"].available


def _args(q, window=2):
    return check_arguments(q, q, q, window, None, None, None, "mask", None, None)


def test_auto_picks_the_fused_cpu_backend():
    q = torch.randn(1, 4, 4, 4, 2, 8)
    assert select_backend("auto", _args(q)).name == ("cpu" if CPU_FUSED else "reference")
    assert select_backend("auto", _args(q.half())).name == "reference"  # no fused fp16 kernel on the CPU


def test_reference_runs_on_any_device():
    q = torch.randn(1, 3, 4, 5, 2, 8, device="meta")
    assert window_cross_attention(q, q, q, 2, backend="auto").shape == q.shape


@pytest.mark.skipif(not available_backends()["cuda"].available, reason="the CUDA kernels were not built")
@pytest.mark.parametrize(
    "dtype, head_dim, window, expected",
    [
        (torch.bfloat16, 16, 2, ["cuda", "triton"]),  # the tensor-core CUDA kernels
        (torch.float16, 32, (2, 2, 2), ["cuda", "triton"]),
        (torch.float32, 16, 2, ["triton", "cuda"]),  # generic CUDA kernels: Triton first
        (torch.bfloat16, 24, 2, ["triton", "cuda"]),  # head_dim not a multiple of 16
        (torch.bfloat16, 16, (3, 2, 2), ["triton", "cuda"]),  # 12 queries per window
    ],
    ids=str,
)
def test_auto_order_puts_cuda_generic_kernels_behind_triton(dtype, head_dim, window, expected):
    q = torch.zeros(1, 4, 4, 4, 1, head_dim, dtype=dtype, device="meta")
    order = auto_candidates(_args(q, window))
    assert [name for name in order if name in ("cuda", "triton")] == expected
    assert order[-1] == "reference"


@pytest.mark.skipif(not available_backends()["cuda"].available, reason="the CUDA kernels were not built")
@pytest.mark.parametrize("requires_grad", [True, False])
def test_auto_order_under_deterministic_algorithms(requires_grad):
    # The CUDA backend's deterministic backward is slower than Triton's: "auto" tries Triton
    # first when a backward may follow, and keeps the faster CUDA forward for inference.
    q = torch.zeros(1, 4, 4, 4, 1, 16, dtype=torch.bfloat16, device="meta", requires_grad=requires_grad)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        order = auto_candidates(_args(q))
    finally:
        torch.use_deterministic_algorithms(previous)
    expected = ["triton", "cuda"] if requires_grad else ["cuda", "triton"]
    assert [name for name in order if name in ("cuda", "triton")] == expected


def test_available_backends_explain_themselves():
    statuses = available_backends()
    assert {"reference", "cpu", "cuda", "triton"} <= set(statuses)
    assert statuses["reference"].available
    for status in statuses.values():
        assert status.available == (status.reason is None)
        if not status.available:
            assert isinstance(status.reason, str) and status.reason


@pytest.mark.parametrize(
    "backend, dtype, fragment",
    [("cuda", torch.float32, "it runs on cuda tensors, got cpu"), ("cpu", torch.float16, "it supports dtypes")],
)
def test_named_backend_that_cannot_run_says_why_and_who_can(backend, dtype, fragment):
    if not available_backends()[backend].available:
        pytest.skip(f"{backend} is not available here")
    q = torch.randn(1, 4, 4, 4, 2, 8, dtype=dtype)
    with pytest.raises(ValueError) as caught:
        window_cross_attention(q, q, q, backend=backend)
    message = str(caught.value)
    assert f"backend {backend!r} cannot run this call" in message and fragment in message
    assert "Backends that can: " in message and "reference" in message


def test_cached_decisions_follow_the_grad_and_determinism_modes():
    """The same tensors under other modes are other signatures: a result computed with grad
    enabled has a graph, one under no_grad has none, whatever ran first."""
    q = torch.randn(1, 3, 4, 5, 2, 8, requires_grad=True)
    with torch.no_grad():
        assert window_cross_attention(q, q, q, 2).grad_fn is None
    assert window_cross_attention(q, q, q, 2).grad_fn is not None
    with torch.no_grad():
        assert window_cross_attention(q, q, q, 2).grad_fn is None


def test_cached_decisions_keep_no_tensor_alive():
    q = torch.randn(1, 3, 4, 5, 2, 8)
    bias = torch.randn(2, 7, 7, 7)
    pad = torch.randn(2, 8)
    window_cross_attention(q, q, q, 2, rel_pos_bias=bias, padding="constant", pad_key=pad)
    alive = [weakref.ref(t) for t in (q, bias, pad)]
    del q, bias, pad
    gc.collect()
    assert all(ref() is None for ref in alive), "the decision cache holds a caller's tensor"


def test_public_names():
    assert set(xmorpher_kernels.__all__) >= {"window_cross_attention", "available_backends"}
