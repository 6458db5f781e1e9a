"""Tests of the CUDA C++ backend (csrc/cuda/).

Two kinds:
* build checks, which run everywhere: whenever torch is a CUDA build and nvcc is present (or
  XMORPHER_KERNELS_REQUIRE_CUDA=1), the installed extension must contain the CUDA kernels for the
  requested architectures, with tensor-core instructions, so the CUDA build is never skipped
  silently;
* GPU tests (skipped without a GPU), against the float64 reference through
  ``xmorpher_kernels.testing.check_against_reference``: forward and every gradient, fp32/fp16/bf16,
  both paddings, bias, partial windows, asymmetric windows, head dims from 5 to 128, strided
  inputs, and bitwise repeatability under ``torch.use_deterministic_algorithms(True)``. Each runs
  with both generations of tensor-core kernels, "classic" and "brick"
  (``xmorpher_kernels._C.set_cuda_kernels``; calls the brick kernels do not cover run on the
  classic ones).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
import torch

from xmorpher_kernels import _native
from xmorpher_kernels._extension import EXTENSION_ERROR, _C
from xmorpher_kernels.testing import Problem, check_against_reference, make_problem

HAS_GPU = torch.cuda.is_available() and _native.HAS_CUDA_KERNELS
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
KERNEL_GENERATIONS = ("classic", "brick")


@pytest.fixture(params=KERNEL_GENERATIONS)
def cuda_kernels(request):
    """The CUDA backend's tensor-core kernel generation for the test, restored afterwards."""
    previous = _C.cuda_kernels()
    _C.set_cuda_kernels(request.param)
    yield request.param
    _C.set_cuda_kernels(previous)


def needs_cuda(test):
    """A GPU test, run once per kernel generation; skipped without a GPU."""
    test = pytest.mark.usefixtures("cuda_kernels")(test)
    return pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU and the CUDA kernels")(test)


# --------------------------------------------------------------------------- build checks


def _nvcc_available() -> bool:
    from torch.utils.cpp_extension import CUDA_HOME

    return shutil.which("nvcc") is not None or (
        CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
    )


def _cuda_build_expected() -> bool:
    if os.environ.get("XMORPHER_KERNELS_REQUIRE_CUDA") == "1":
        return True
    if os.environ.get("XMORPHER_KERNELS_NO_CUDA") == "1":
        return False
    return torch.version.cuda is not None and _nvcc_available()


def _cuobjdump() -> str | None:
    from torch.utils.cpp_extension import CUDA_HOME

    candidates = [shutil.which("cuobjdump")]
    if CUDA_HOME is not None:
        candidates.append(os.path.join(CUDA_HOME, "bin", "cuobjdump"))
    try:
        import triton

        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    return next((c for c in candidates if c and os.path.exists(c)), None)


def _expected_archs() -> list[str]:
    """sm_XX of every architecture the build was asked for (setup.py's default: 8.0 and 9.0)."""
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    archs = []
    for entry in re.split(r"[;\s]+", arch_list.strip()):
        match = re.match(r"(\d+)\.(\d+)", entry)
        if match:
            archs.append(f"sm_{match.group(1)}{match.group(2)}")
    return archs


needs_cuda_build = pytest.mark.skipif(
    not _cuda_build_expected(),
    reason="torch is not a CUDA build or nvcc is missing (set XMORPHER_KERNELS_REQUIRE_CUDA=1 to insist)",
)


@needs_cuda_build
def test_extension_contains_cuda_kernels():
    assert _C is not None, EXTENSION_ERROR
    assert _C.compiled_with_cuda(), "xmorpher_kernels._C was built without its CUDA kernels"
    for op in ("window_attention_forward", "window_attention_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"xmorpher_kernels::{op}", "CUDA"), op


@needs_cuda_build
def test_extension_has_cubins_with_tensor_cores():
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump not found (CUDA toolkit or triton's copy)")
    so_path = _C.__file__
    listing = subprocess.run([tool, "--list-elf", so_path], capture_output=True, text=True, check=True).stdout
    for arch in _expected_archs():
        assert f".{arch}." in listing, f"{so_path} has no {arch} cubin:\n{listing}"
        sass = subprocess.run(
            [tool, "--gpu-architecture", arch, "--dump-sass", so_path], capture_output=True, text=True, check=True
        ).stdout
        assert "forward_mma_kernel" in sass, f"no tensor-core forward kernel in the {arch} cubin"
        assert "backward_mma_kernel" in sass, f"no tensor-core backward kernel in the {arch} cubin"
        assert "HMMA" in sass, f"the {arch} cubin has no tensor-core (HMMA) instruction"


# --------------------------------------------------------------------------- GPU tests


def _problem(shape, window=2, search=None, *, dtype=torch.float32, seed=0, **options) -> Problem:
    generator = torch.Generator().manual_seed(seed)
    problem = make_problem(shape, window, search, dtype=dtype, generator=generator, **options)
    return problem.to(device="cuda")


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("padding", ["mask", "constant"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_matches_reference(dtype, padding, bias):
    # 5 x 6 x 7 leaves partial windows on two axes.
    check_against_reference(_problem((2, 5, 6, 7, 3, 16), dtype=dtype, padding=padding, bias=bias), "cuda")


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [5, 8, 16, 24, 32, 64, 128])
def test_head_dims(dtype, head_dim):
    check_against_reference(_problem((1, 4, 5, 6, 2, head_dim), dtype=dtype, padding="constant", bias=True), "cuda")


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("padding", ["mask", "constant"])
@pytest.mark.parametrize(
    "window, search",
    [((2, 3, 1), (5, 4, 3)), ((1, 2, 2), (3, 4, 6)), (2, 2), (3, 5), ((2, 2, 2), (4, 6, 2))],
    ids=str,
)
def test_window_shapes(dtype, padding, window, search):
    check_against_reference(
        _problem((1, 5, 7, 6, 2, 16), window, search, dtype=dtype, padding=padding, bias=True), "cuda"
    )


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_many_windows_per_block(dtype):
    # 9 windows along x: the tensor-core forward stages 8 neighbouring windows per block and
    # leaves a last block with one; also a scale that is not head_dim ** -0.5.
    check_against_reference(_problem((2, 4, 6, 18, 2, 16), dtype=dtype, bias=True, scale=0.3), "cuda")
    check_against_reference(_problem((1, 3, 4, 34, 1, 32), dtype=dtype, padding="constant"), "cuda")


@needs_cuda
def test_paper_setting_bf16():
    # XMorpher's first stage on a smaller grid: window 2, search 6, 3 heads of 16.
    check_against_reference(_problem((1, 12, 12, 10, 3, 16), 2, 6, dtype=torch.bfloat16, bias=True), "cuda")


def _strided(t: torch.Tensor, offset: int) -> torch.Tensor:
    """The same values as a view with unit-stride last dim but padded rows, starting `offset`
    elements into its storage (offset 1 breaks 16-byte alignment)."""
    base = torch.zeros(*t.shape[:-1], t.shape[-1] + 3, dtype=t.dtype, device=t.device)
    view = base[..., offset : offset + t.shape[-1]]
    view.copy_(t.detach())
    return view.detach().requires_grad_(True)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("offset", [0, 1])
def test_strided_inputs(dtype, offset):
    problem = _problem((2, 4, 6, 5, 2, 16), dtype=dtype, padding="constant", bias=True)
    query, key, value = (_strided(t, offset) for t in (problem.query, problem.key, problem.value))
    # A permuted (channels-first in storage) key: still unit stride in the last dim.
    key = key.detach().permute(0, 4, 1, 2, 3, 5).contiguous().permute(0, 2, 3, 4, 1, 5).requires_grad_(True)
    assert not query.is_contiguous() and not key.is_contiguous()
    strided = Problem(query, key, value, problem.window_size, problem.search_size, problem.options)
    check_against_reference(strided, "cuda")


def _grads(problem: Problem, grad_out: torch.Tensor):
    tensors = problem.tensors()
    for t in tensors.values():
        t.grad = None
    out = problem.run("cuda")
    out.backward(grad_out)
    return [out.detach().clone()] + [t.grad.detach().clone() for t in tensors.values()]


@pytest.fixture
def deterministic():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("padding", ["mask", "constant"])
def test_deterministic_backward_is_bitwise_repeatable(deterministic, dtype, padding):
    problem = _problem((2, 6, 5, 8, 3, 16), dtype=dtype, padding=padding, bias=True)
    grad_out = torch.randn(problem.query.shape, generator=torch.Generator().manual_seed(7)).to(
        dtype=dtype, device="cuda"
    )
    first = _grads(problem, grad_out)
    for _ in range(3):
        again = _grads(problem, grad_out)
        for a, b in zip(first, again):
            assert torch.equal(a, b), "deterministic mode is not bitwise repeatable"


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("padding", ["mask", "constant"])
def test_gradients_scale_exactly_with_grad_out(deterministic, dtype, padding):
    # Every gradient is linear in grad_out and a power-of-two scale is exact in floating point,
    # so gradients of a tiny grad_out (bf16 training without loss scaling) must be the large
    # ones scaled: the bias and pad sums (fixed point in the tensor-core backward, with a unit
    # chosen per call) must not lose the small terms.
    problem = _problem((2, 5, 6, 7, 2, 16), dtype=dtype, padding=padding, bias=True)
    grad_out = torch.randn(problem.query.shape, generator=torch.Generator().manual_seed(5)).to(
        dtype=dtype, device="cuda"
    )
    grad_scale = 2.0**-24
    large = _grads(problem, grad_out)[1:]
    small = _grads(problem, grad_out * grad_scale)[1:]
    for name, a, b in zip(problem.tensors(), large, small):
        assert a.abs().max() > 0, f"grad of {name} is zero: the test would prove nothing"
        torch.testing.assert_close(b, a * grad_scale, rtol=1e-6, atol=0, msg=lambda m: f"grad of {name}: {m}")


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("padding", ["mask", "constant"])
@pytest.mark.parametrize("window, search", [(2, 6), ((2, 3, 1), (5, 4, 3))], ids=str)
def test_deterministic_backward_matches_atomic(dtype, padding, window, search):
    # The atomic (default) backward is checked against the reference above; the deterministic
    # one (key-side kernel) must agree with it. (The reference itself is not run under
    # deterministic mode: some of its PyTorch backward ops may refuse to.)
    problem = _problem((1, 6, 7, 6, 2, 32), window, search, dtype=dtype, padding=padding, bias=True)
    grad_out = torch.randn(problem.query.shape, generator=torch.Generator().manual_seed(3)).to(
        dtype=dtype, device="cuda"
    )
    fast = _grads(problem, grad_out)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        exact = _grads(problem, grad_out)
    finally:
        torch.use_deterministic_algorithms(previous)
    tol = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]
    for a, b in zip(fast, exact):
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)


@needs_cuda
def test_errors_are_python_exceptions():
    q = torch.randn(1, 2, 2, 2, 1, 130, device="cuda")
    with pytest.raises(RuntimeError, match="head_dim"):
        torch.ops.xmorpher_kernels.window_attention_forward(q, q, q, [2, 2, 2], [2, 2, 2], 1.0, None, None, None)
    with pytest.raises(RuntimeError, match="device"):
        bias = torch.zeros(1, 3, 3, 3)
        k = torch.randn(1, 2, 2, 2, 1, 16, device="cuda")
        torch.ops.xmorpher_kernels.window_attention_forward(k, k, k, [2, 2, 2], [2, 2, 2], 1.0, bias, None, None)


@needs_cuda
def test_brick_kernels_run_when_switched_on(cuda_kernels):
    # The switch reaches the kernels: with "brick", a covered call runs the brick forward and at
    # most three brick launches in the backward, and no classic tensor-core kernel.
    from torch.profiler import ProfilerActivity, profile

    problem = _problem((1, 6, 6, 8, 2, 16), dtype=torch.bfloat16, padding="constant", bias=True)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        out = problem.run("cuda")
        out.backward(torch.ones_like(out))
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    brick = [n for n in names if "brick_" in n]
    classic = [n for n in names if "_mma_kernel" in n]
    if cuda_kernels == "brick":
        assert any("brick_forward_kernel" in n for n in brick), names
        assert 1 <= len([n for n in brick if "brick_forward_kernel" not in n]) <= 3, names
        assert not classic, names
    else:
        assert not brick and classic, names


@needs_cuda
def test_single_voxel():
    check_against_reference(_problem((1, 1, 1, 1, 1, 16), dtype=torch.float16, padding="constant", bias=True), "cuda")
    check_against_reference(_problem((1, 1, 1, 1, 1, 16), dtype=torch.float32, bias=True), "cuda")
