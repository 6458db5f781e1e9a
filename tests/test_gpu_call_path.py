"""GPU tests of the op's call path (skipped without a CUDA GPU):

* every GPU backend (triton, cuda), forward and forward+backward, with a bias and both paddings,
  captures into a ``torch.cuda.CUDAGraph`` and replays: the replay reads the inputs' current
  values and its output and gradients equal an eager call's exactly (under
  ``torch.use_deterministic_algorithms(True)``; Triton's backward is deterministic always);
* a Triton forward and backward each make exactly ``_triton_kernels.LAUNCHES_PER_FORWARD`` /
  ``LAUNCHES_PER_BACKWARD`` kernel launches, counted with ``torch.profiler``.
"""

from __future__ import annotations

import contextlib
import importlib

import pytest
import torch

from xmorpher_kernels import available_backends
from xmorpher_kernels.testing import make_problem

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SHAPE = (2, 3, 5, 7, 2, 16)  # partial windows on every axis
WINDOW, SEARCH = 2, 6
DTYPES = (torch.bfloat16, torch.float32)


def _require(backend: str) -> None:
    status = available_backends()[backend]
    if not status.available:
        pytest.skip(f"backend {backend} is not available here: {status.reason}")


@contextlib.contextmanager
def _deterministic(enabled: bool):
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(enabled)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def _problem(dtype: torch.dtype, padding: str, seed: int, bias: bool = True):
    """Leaves (q, k, v, then bias / pad_key / pad_value when present), options and a grad_out."""
    generator = torch.Generator().manual_seed(seed)
    problem = make_problem(SHAPE, WINDOW, SEARCH, padding=padding, bias=bias, dtype=dtype, device="cuda", generator=generator)
    leaves = list(problem.tensors().values())
    grad_out = torch.randn(SHAPE, generator=generator).to(dtype=dtype, device="cuda")
    return problem, leaves, grad_out


def _capture(fn):
    """Warm-up on a side stream (compilation, autotuning and lazy allocations stay outside the
    capture, as torch's CUDA graph documentation prescribes), then capture; returns (graph,
    the tensors the capture returned, which each replay rewrites)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn()
    return graph, outputs


def _refill(tensors, seed: int) -> None:
    """New random values into the captured inputs, in place (the graph reads their memory)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in tensors:
            t.copy_(torch.randn(t.shape, generator=generator).to(t.dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("padding", ["mask", "constant"])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_forward_replays_like_eager(backend, padding, dtype, seed):
    _require(backend)
    problem, leaves, _ = _problem(dtype, padding, seed)

    def forward():
        with torch.no_grad():
            return problem.run(backend)

    graph, captured = _capture(forward)
    _refill(leaves, seed + 1)
    graph.replay()
    eager = forward()
    torch.cuda.synchronize()
    assert torch.isfinite(eager).all()
    assert torch.equal(captured, eager), "the replayed forward differs from an eager call on the same inputs"


@pytest.mark.parametrize("deterministic", [True, False], ids=["deterministic", "default"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("padding", ["mask", "constant"])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_forward_backward_replays_like_eager(backend, padding, dtype, deterministic, seed):
    """The gradients are the graph's outputs (torch.autograd.grad inside the capture)."""
    _require(backend)
    problem, leaves, grad_out = _problem(dtype, padding, seed)
    names = ["out"] + list(problem.tensors())

    def forward_backward():
        out = problem.run(backend)
        return (out, *torch.autograd.grad(out, leaves, grad_out))

    with _deterministic(deterministic):
        graph, captured = _capture(forward_backward)
        before = [t.clone() for t in forward_backward()]
        _refill(leaves + [grad_out], seed + 1)
        graph.replay()
        eager = forward_backward()
        torch.cuda.synchronize()
    assert not torch.equal(before[0], eager[0]), "the new inputs did not change the output: the check would be blind"
    for name, replayed, expected in zip(names, captured, eager):
        assert torch.isfinite(expected).all(), f"{name} is not finite"
        if deterministic or backend == "triton":
            assert torch.equal(replayed, expected), f"replayed {name} differs from an eager call on the same inputs"
        else:  # the CUDA backward's fast schedule adds with fp32 atomics, in no fixed order
            tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-4
            torch.testing.assert_close(replayed, expected, rtol=tolerance, atol=tolerance, msg=f"replayed {name}")


# --------------------------------------------------------------------------- kernel launches


def _device_activities(fn) -> dict:
    """What ``fn`` makes the GPU do, from torch.profiler's device-side events: kernels (Triton's
    and any PyTorch op's, such as a fill or a cast: each is a launch), memsets and memcpys."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    found = {"kernels": [], "memsets": [], "memcpys": []}
    for event in prof.events():
        if event.device_type != DeviceType.CUDA:
            continue
        kind = "memsets" if event.name.startswith("Memset") else "memcpys" if event.name.startswith("Memcpy") else "kernels"
        found[kind].append(event.name)
    return found


@pytest.mark.parametrize("deterministic", [False, True], ids=["default", "deterministic"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("padding,bias", [("mask", False), ("mask", True), ("constant", True)])
def test_triton_launches_per_call(padding, bias, dtype, deterministic, seed):
    """Every kernel counts (a zero-fill or a cast by PyTorch is a launch too); memsets and
    memcpys must not happen at all."""
    _require("triton")
    kernels = importlib.import_module("xmorpher_kernels._triton_kernels")
    problem, leaves, grad_out = _problem(dtype, padding, seed, bias=bias)
    with _deterministic(deterministic):
        torch.autograd.grad(problem.run("triton"), leaves, grad_out)  # compiles and tunes outside the count
        with torch.no_grad():
            inference = _device_activities(lambda: problem.run("triton"))
        outputs = []
        training = _device_activities(lambda: outputs.append(problem.run("triton")))
        backward = _device_activities(lambda: torch.autograd.grad(outputs[0], leaves, grad_out))
    for what, found, expected in (("inference forward", inference, kernels.LAUNCHES_PER_FORWARD),
                                  ("training forward", training, kernels.LAUNCHES_PER_FORWARD),
                                  ("backward", backward, kernels.LAUNCHES_PER_BACKWARD)):
        assert len(found["kernels"]) == expected, f"{what}: {len(found['kernels'])} kernel launches, expected {expected}: {found['kernels']}"
        assert not found["memsets"] and not found["memcpys"], f"{what}: {found['memsets'] + found['memcpys']}"
