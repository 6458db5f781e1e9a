"""Tests specific to the fused CPU backend: every instruction-set build it carries, results that
do not depend on the thread count, and scratch reused across calls of different sizes. The op's
contract is tested for every backend in test_contract.py."""

from __future__ import annotations

import pytest
import torch

from xmorpher_kernels import available_backends
from xmorpher_kernels._extension import _C
from xmorpher_kernels.testing import GRAD_NAMES, check_against_reference, make_problem

pytestmark = pytest.mark.skipif(not available_backends()["cpu"].available, reason="the cpu backend was not built")


@pytest.mark.parametrize("isa", _C.supported_cpu_isas() if _C is not None else [])
def test_every_instruction_set(isa, generator):
    previous = _C.cpu_isa()
    _C.set_cpu_isa(isa)
    try:
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            problem = make_problem((2, 5, 7, 6, 3, 16), (2, 3, 1), (5, 4, 3), padding="constant", bias=True,
                                   dtype=dtype, generator=generator)
            check_against_reference(problem, "cpu")
    finally:
        _C.set_cpu_isa(previous)


def _gradients(problem, backend):
    fresh = problem.to()
    out = fresh.run(backend)
    out.backward(torch.ones_like(out).mul_(0.5) + torch.arange(out.numel(), dtype=out.dtype).reshape(out.shape).sin())
    return [t.grad.clone() for t in fresh.tensors().values()]


def test_backward_is_bitwise_identical_for_any_thread_count(generator):
    problem = make_problem((2, 7, 6, 9, 3, 16), 2, 6, padding="constant", bias=True, generator=generator)
    first = _gradients(problem, "cpu")
    threads = torch.get_num_threads()
    try:
        for count in (1, max(2, threads)):
            torch.set_num_threads(count)
            again = _gradients(problem, "cpu")
            for name, a, b in zip(GRAD_NAMES, first, again):
                assert torch.equal(a, b), f"gradient of {name} differs with {count} threads"
    finally:
        torch.set_num_threads(threads)


def test_scratch_reused_across_calls_of_other_sizes(generator):
    """Each thread keeps its scratch across calls and grows it when needed: a small call after a
    large one (stale data in the larger buffer) and the reverse are both exact."""
    large = make_problem((1, 5, 6, 7, 2, 32), 3, (7, 5, 9), padding="constant", bias=True, generator=generator)
    small = make_problem((2, 3, 4, 5, 1, 5), 2, None, bias=True, generator=generator)
    for problem in (large, small, large):
        check_against_reference(problem, "cpu")
