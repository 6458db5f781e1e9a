"""The brick CUDA kernels (csrc/include/xmorpher_kernels/brick_kernels.h) run on the CPU through
their emulator (csrc/brick_emulator.cpp): the kernels' own code, each CUDA thread a fiber, the
warp-wide operations (ldmatrix, mma.sync, movmatrix, shuffles) emulated with the PTX ISA's
fragment layouts. Checked against the float64 reference with the tolerance rule of
``xmorpher_kernels.testing`` (forward and every gradient, partial windows, bias, both paddings,
several window shapes, head dims and scales), plus conflict-free ldmatrix at the paper's geometry
and the exact scaling of the gradients. What only a GPU shows: timings, the real instructions'
semantics and memory ordering (compute-sanitizer), which tests/test_cuda.py covers when one is lent.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import pytest
import torch

from xmorpher_kernels import reference
from xmorpher_kernels._extension import _C
from xmorpher_kernels._checks import check_arguments
from xmorpher_kernels.testing import Problem, make_problem, max_error

pytestmark = pytest.mark.skipif(
    not (_C is not None and hasattr(_C, "brick_emulate_forward")),
    reason="the native extension with the brick emulator is not built",
)

FLOOR = {torch.bfloat16: 2e-2, torch.float16: 2e-3}


def _call_args(problem: Problem):
    tensors = problem.tensors()
    options = dict(problem.options)
    args = check_arguments(
        problem.query, problem.key, problem.value, problem.window_size, problem.search_size,
        options.get("scale"), options.get("rel_pos_bias"), options.get("padding", "mask"),
        options.get("pad_key"), options.get("pad_value"),
    )
    pad_key, pad_value = args.pad_key, args.pad_value
    if args.padding == "constant" and pad_key is None:
        zeros = args.query.new_zeros((args.heads, args.head_dim))
        pad_key, pad_value = zeros, zeros
    return args, tensors, pad_key, pad_value


def emulated(problem: Problem, grad_out: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Forward and every gradient of `problem` through the emulated brick kernels."""
    args, tensors, pad_key, pad_value = _call_args(problem)
    window, search = list(args.geometry.window), list(args.geometry.search)
    detached = [t.detach() if t is not None else None for t in (args.rel_pos_bias, pad_key, pad_value)]
    q, k, v = (t.detach() for t in (args.query, args.key, args.value))
    out, lse = _C.brick_emulate_forward(q, k, v, window, search, args.scale, *detached)
    grads = _C.brick_emulate_backward(grad_out, q, k, v, out, lse, window, search, args.scale, *detached)
    result = {"out": out}
    names = ("query", "key", "value", "rel_pos_bias", "pad_key", "pad_value")
    for name, grad in zip(names, grads):
        if name in tensors:
            result[f"grad of {name}"] = grad
    return result


def check_emulated(problem: Problem, factor: float = 4.0) -> Dict[str, float]:
    """The emulated brick kernels against the float64 reference: error <= factor x the
    reference's own error in the problem's dtype + floor x max(1, |truth|)."""
    dtype = problem.query.dtype
    truth, same_dtype = problem.to(torch.float64), problem.to()
    grad_out = torch.randn(problem.query.shape, generator=torch.Generator().manual_seed(1234), dtype=torch.float64)
    expected = {}
    for label, p in (("truth", truth), ("ref", same_dtype)):
        out = p.run("reference")
        out.backward(grad_out.to(out.dtype))
        expected[label] = {"out": out.detach()}
        expected[label].update({f"grad of {name}": t.grad for name, t in p.tensors().items()})
    got = emulated(problem.to(), grad_out.to(dtype))
    errors = {}
    for name, truth_t in expected["truth"].items():
        tested = got[name]
        assert tested.shape == truth_t.shape, f"{name}: shape {tuple(tested.shape)}, expected {tuple(truth_t.shape)}"
        assert torch.isfinite(tested).all(), f"brick (emulated): non-finite values in {name}"
        err, ref_err = max_error(tested, truth_t), max_error(expected["ref"][name], truth_t)
        tol = factor * ref_err + FLOOR[dtype] * max(1.0, truth_t.abs().max().item())
        errors[name] = err
        assert err <= tol, f"brick (emulated): {name} off by {err:.3e} (reference in {dtype}: {ref_err:.3e}, tolerance {tol:.3e})"
    return errors


def _problem(shape, window=2, search=None, *, dtype=torch.bfloat16, seed=0, **options) -> Problem:
    return make_problem(shape, window, search, dtype=dtype, generator=torch.Generator().manual_seed(seed), **options)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("padding", ["mask", "constant"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_matches_reference(dtype, padding, bias):
    # 5 x 6 x 7 leaves partial windows on two axes; window 2, search 6 as in the paper.
    check_emulated(_problem((1, 5, 6, 7, 2, 16), 2, 6, dtype=dtype, padding=padding, bias=bias, seed=11))


@pytest.mark.parametrize(
    "window, search",
    [((2, 3, 1), (5, 4, 3)), ((1, 2, 2), (3, 4, 6)), (2, 2), ((2, 2, 2), (4, 6, 2)), (2, 4), ((1, 1, 2), (3, 5, 7))],
    ids=str,
)
@pytest.mark.parametrize("padding", ["mask", "constant"])
def test_window_shapes(window, search, padding):
    check_emulated(_problem((1, 5, 7, 6, 2, 16), window, search, padding=padding, bias=True, seed=3))


def test_head_dim_32():
    check_emulated(_problem((1, 3, 4, 5, 2, 32), 2, 6, dtype=torch.float16, padding="constant", bias=True, seed=5))


@pytest.mark.parametrize("scale", [0.3, -0.7])
def test_scale(scale):
    check_emulated(_problem((1, 4, 5, 6, 2, 16), 2, 6, padding="mask", bias=True, scale=scale, seed=7))


def test_many_bricks():
    # 17 windows along x: bricks of 8, the last one holding a single partial window; 2 batches.
    check_emulated(_problem((2, 4, 3, 34, 1, 16), 2, 6, dtype=torch.float16, bias=True, seed=9))


def _strided(t: torch.Tensor) -> torch.Tensor:
    """The same values in a view whose rows are 16-byte aligned but not packed."""
    base = torch.zeros(*t.shape[:-1], t.shape[-1] + 8, dtype=t.dtype)
    view = base[..., : t.shape[-1]]
    view.copy_(t.detach())
    return view.requires_grad_(True)


def test_strided_inputs():
    problem = _problem((1, 4, 6, 5, 2, 16), 2, 6, padding="constant", bias=True, seed=13)
    key = problem.key.detach().permute(0, 4, 1, 2, 3, 5).contiguous().permute(0, 2, 3, 4, 1, 5).requires_grad_(True)
    strided = Problem(_strided(problem.query), key, _strided(problem.value), problem.window_size, problem.search_size,
                      problem.options)
    assert not strided.query.is_contiguous() and not strided.key.is_contiguous()
    check_emulated(strided)


def test_gradients_scale_exactly_with_grad_out():
    # Every gradient is linear in grad_out and a power-of-two scale is exact, so the gradients of
    # a tiny grad_out must be the large ones scaled: the fixed-order fp32/fp64 sums of the bias
    # and pad gradients lose nothing.
    problem = _problem((1, 5, 6, 7, 2, 16), 2, 6, padding="constant", bias=True, seed=17)
    grad_out = torch.randn(problem.query.shape, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    large = emulated(problem, grad_out)
    small = emulated(problem, grad_out * 2.0**-24)
    for name in large:
        if name == "out":
            continue
        assert large[name].abs().max() > 0, f"{name} is zero: the test would prove nothing"
        torch.testing.assert_close(small[name], large[name] * 2.0**-24, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")


def test_paper_geometry_ldmatrix_is_conflict_free():
    # Window 2, search 6 with full 2 x 2 x 8 bricks: every ldmatrix phase of the three kernels
    # hits 8 distinct bank groups (the halo's row strides and the chunk swizzle).
    problem = _problem((1, 4, 4, 16, 1, 16), 2, 6, padding="mask", bias=True, seed=19)
    _C.brick_emulator_stats()
    emulated(problem, torch.randn(problem.query.shape, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16))
    stats = _C.brick_emulator_stats()
    assert stats["ldsm_phases"] > 0, stats
    assert stats["ldsm_extra_wavefronts"] == 0, f"ldmatrix bank conflicts: {stats}"


def test_uncovered_calls_raise():
    for head_dim in (24, 64):
        q = torch.randn(1, 2, 2, 2, 1, head_dim, dtype=torch.bfloat16)
        with pytest.raises(RuntimeError, match="head_dim"):
            _C.brick_emulate_forward(q, q, q, [2, 2, 2], [2, 2, 2], 1.0, None, None, None)
    q = torch.randn(1, 2, 2, 2, 1, 16)
    with pytest.raises(RuntimeError, match="dtype"):
        _C.brick_emulate_forward(q, q, q, [2, 2, 2], [2, 2, 2], 1.0, None, None, None)
