"""Tests of the Triton backend of window_cross_attention.

On a machine with a CUDA GPU the kernels run compiled on it. Without one they run in Triton's CPU
interpreter: this module sets TRITON_INTERPRET=1 before the kernels are first imported (the
backend imports them on its first call, so this holds even when the package is already loaded).
The ahead-of-time compile test needs the kernels compiled, not interpreted; in an interpreting
process it runs itself again in a subprocess without the interpreter.
"""

import dataclasses
import os
import subprocess
import sys
import tempfile

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from xmorpher_kernels import _backends, _triton, window_cross_attention  # noqa: E402
from xmorpher_kernels._checks import check_arguments  # noqa: E402
from xmorpher_kernels.testing import Problem, check_against_reference, make_problem  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"
needs_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (too slow in the interpreter)")
pytestmark = pytest.mark.skipif(
    not _triton.HAS_TRITON or not (ON_GPU or _triton.kernels_interpreted()),
    reason=_triton.TRITON_IMPORT_ERROR or "no GPU, and the Triton kernels were already loaded compiled",
)


@pytest.fixture(scope="module", autouse=True)
def triton_backend_on_device():
    """The backend registered before this module turned the interpreter on claims CUDA only;
    let it take CPU tensors for these tests."""
    backend = _backends._REGISTRY["triton"]
    if DEVICE in backend.devices:
        yield
        return
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(_backends._REGISTRY, "triton", dataclasses.replace(backend, devices=backend.devices + (DEVICE,)))
        yield


@pytest.fixture(params=[True, False], ids=["deterministic", "atomic"])
def deterministic(request):
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(request.param)
    yield request.param
    torch.use_deterministic_algorithms(previous)


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# (shape, options): small volumes that still cover every path of the kernels.
CASES = {
    # The spec's worked example: 4^3 volume, window 2, search 6 (two windows packed per tile).
    "paper_geometry": ((1, 4, 4, 4, 2, 16), dict(window_size=2)),
    # Partial windows on every axis, odd head_dim, B > 1, bias and constant padding.
    "partial_bias_constant": ((2, 3, 5, 7, 1, 5), dict(window_size=2, padding="constant", bias=True)),
    # Asymmetric window and search, bias, masked padding.
    "asymmetric_bias": ((1, 4, 5, 3, 2, 8), dict(window_size=(2, 3, 1), search_size=(5, 4, 3), bias=True)),
    # Constant padding with pad_key/pad_value left at their zero default.
    "asymmetric_zero_pads": ((1, 3, 7, 4, 1, 8), dict(window_size=(2, 3, 1), search_size=(5, 4, 3),
                                                      padding="constant", pad_tensors=False)),
    # 80 queries per window: one window per tile, split into two blocks of 64 rows.
    "large_window": ((1, 4, 4, 5, 1, 8), dict(window_size=(4, 4, 5), search_size=(5, 5, 6), bias=True)),
    # Single-voxel windows (up to 16 packed per tile) and search == window.
    "window_1": ((1, 2, 3, 9, 1, 8), dict(window_size=1, search_size=(1, 3, 3))),
    "search_equals_window": ((1, 4, 3, 6, 2, 8), dict(window_size=(2, 1, 3), search_size=(2, 1, 3), bias=True)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case, deterministic):
    shape, options = CASES[case]
    problem = make_problem(shape, device=DEVICE, generator=generator(), **options)
    check_against_reference(problem, "triton")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype, deterministic):
    problem = make_problem((1, 3, 4, 5, 2, 16), padding="constant", bias=True, dtype=dtype, device=DEVICE,
                           generator=generator(1))
    check_against_reference(problem, "triton")


def test_strided_inputs_match_reference():
    """Inputs whose last dimension alone is contiguous (a fused qkv projection, heads-major
    storage) give the same results as contiguous ones."""
    batch, depth, height, width, heads, head_dim = 2, 3, 4, 5, 2, 8
    g = generator(2)
    qkv = torch.randn(batch, depth, height, width, heads, 3 * head_dim, generator=g, dtype=torch.float64)
    heads_major = torch.randn(batch, heads, depth, height, width, head_dim, generator=g, dtype=torch.float64)

    def leaf(t):
        return t.to(device=DEVICE, dtype=torch.float32).detach().requires_grad_(True)

    qkv, heads_major = leaf(qkv), leaf(heads_major)
    query = qkv[..., :head_dim].detach().requires_grad_(True)
    key = heads_major.permute(0, 2, 3, 4, 1, 5).detach().requires_grad_(True)
    value = qkv[..., 2 * head_dim:].detach().requires_grad_(True)
    assert not (query.is_contiguous() or key.is_contiguous() or value.is_contiguous())
    problem = Problem(query, key, value, 2, None, {"padding": "mask"})
    check_against_reference(problem, "triton")


def test_deterministic_backward_is_bitwise_reproducible():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        problem = make_problem((2, 2, 3, 4, 1, 8), padding="constant", bias=True, device=DEVICE, generator=generator(3))
        grad_out = torch.randn(problem.query.shape, generator=generator(4)).to(DEVICE)
        runs = []
        for _ in range(2):
            fresh = problem.to()
            fresh.run("triton").backward(grad_out)
            runs.append([t.grad.clone() for t in fresh.tensors().values()])
    finally:
        torch.use_deterministic_algorithms(previous)
    for first, second in zip(*runs):
        assert torch.equal(first, second)


def _configs():
    from xmorpher_kernels import _triton_kernels

    narrowest = min(_triton_kernels.CONFIGS, key=lambda c: c.kwargs["BLOCK_K"])
    return [
        pytest.param(c, id=f"BLOCK_K{c.kwargs['BLOCK_K']}-w{c.num_warps}-s{c.num_stages}",
                     marks=() if c is narrowest else needs_gpu)
        for c in _triton_kernels.CONFIGS
    ]


@pytest.mark.parametrize("config", _configs())
def test_every_config_matches_reference(config, deterministic):
    """Each autotune configuration on its own (the interpreter runs the default elsewhere; here
    the narrowest, whose key loop takes the most steps)."""
    from xmorpher_kernels import _triton_kernels

    problem = make_problem((1, 4, 5, 6, 2, 8), window_size=2, bias=True, padding="constant", device=DEVICE,
                           generator=generator(5))
    with _triton_kernels.fixed_config(config):
        check_against_reference(problem, "triton")


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_paper_first_stage_geometry_on_gpu(dtype, deterministic):
    problem = make_problem((1, 12, 12, 8, 3, 16), window_size=2, search_size=6, bias=True, dtype=dtype,
                           device=DEVICE, generator=generator(6))
    check_against_reference(problem, "triton")


@needs_gpu
@pytest.mark.parametrize("head_dim", [59, 128])
def test_large_head_dim_on_gpu(head_dim):
    problem = make_problem((1, 4, 6, 6, 2, head_dim), window_size=2, padding="constant", bias=True,
                           dtype=torch.bfloat16, device=DEVICE, generator=generator(7))
    check_against_reference(problem, "triton")


def _tiny_call():
    g = generator(8)
    query, key, value = (torch.randn(1, 2, 3, 4, 1, 8, generator=g).to(DEVICE).requires_grad_(True) for _ in range(3))
    bias = torch.randn(1, 5, 5, 5, generator=g).to(DEVICE).requires_grad_(True)
    return query, key, value, bias


def test_opcheck_forward_and_backward_ops():
    query, key, value, bias = _tiny_call()
    forward = torch.ops.xmorpher_kernels.triton_window_attention_forward
    args = (query, key, value, [2, 2, 2], [4, 4, 4], 0.3, bias, None, None)
    torch.library.opcheck(forward, args)
    out, lse = forward(*args)
    backward_args = (torch.randn_like(out), query.detach(), key.detach(), value.detach(), out.detach(), lse,
                     [2, 2, 2], [4, 4, 4], 0.3, bias.detach(), None, None, True)
    torch.library.opcheck(torch.ops.xmorpher_kernels.triton_window_attention_backward, backward_args)


def test_torch_compile_fullgraph_matches_eager():
    query, key, value, bias = _tiny_call()

    def attention(q, k, v, b):
        return window_cross_attention(q, k, v, 2, 4, rel_pos_bias=b, backend="triton")

    # aot_eager on the CPU: it traces the fake and autograd registrations without a C++ toolchain.
    compiled = torch.compile(attention, fullgraph=True, backend="inductor" if ON_GPU else "aot_eager")
    eager_out = attention(query, key, value, bias)
    eager_grads = torch.autograd.grad(eager_out.sum(), (query, key, value, bias))
    compiled_out = compiled(query, key, value, bias)
    compiled_grads = torch.autograd.grad(compiled_out.sum(), (query, key, value, bias))
    torch.testing.assert_close(compiled_out, eager_out)
    for got, expected in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(got, expected)


def test_refuses_head_dim_above_128():
    query = torch.zeros(1, 2, 2, 2, 1, 129, device=DEVICE)
    args = check_arguments(query, query, query, 2, None, None, None, "mask", None, None)
    with pytest.raises(ValueError, match="head_dim must be <= 128"):
        _backends.select_backend("triton", args)


def test_auto_never_picks_the_interpreter():
    query = torch.zeros(1, 2, 2, 2, 1, 8)
    args = check_arguments(query, query, query, 2, None, None, None, "mask", None, None)
    assert _backends.select_backend("auto", args).name != "triton"


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compilation for sm_90 / sm_80: what the interpreter cannot check.
# ----------------------------------------------------------------------------------------------

_FP32_BUFFERS = {"LSE", "DELTA", "GRAD_KEY_ACC", "GRAD_VALUE_ACC", "BIAS_PARTIAL", "PAD_PARTIAL"}


def compile_for_gpu(kernel, dtype: str, constexprs: dict, arch: int, num_warps: int, num_stages: int) -> str:
    """Compile a kernel of _triton_kernels for an NVIDIA target without a GPU; returns its PTX.

    The one place that knows how triton.compile wants signatures: upper-case parameters other
    than the D, H, W sizes are pointers (fp32 for the statistics and partial sums, int64 for
    MAP, ``dtype`` otherwise), ``scale`` is fp32, the rest int32. Triton >= 3.2 takes constexprs
    by name with "constexpr" in the signature; older 3.x took them by index, without.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    def arg_type(name: str) -> str:
        if name.isupper() and name not in ("D", "H", "W"):
            return "*i64" if name == "MAP" else "*fp32" if name in _FP32_BUFFERS else f"*{dtype}"
        return "fp32" if name == "scale" else "i32"

    names = [p.name for p in kernel.params]
    constexpr_names = {p.name for p in kernel.params if p.is_constexpr}
    assert set(constexprs) == constexpr_names, f"constexprs {sorted(constexpr_names ^ set(constexprs))} mismatch"
    if "constexprs" in ASTSource.__init__.__code__.co_varnames:
        signature = {n: "constexpr" if n in constexprs else arg_type(n) for n in names}
        source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    else:
        signature = {i: arg_type(n) for i, n in enumerate(names) if n not in constexprs}
        source = ASTSource(fn=kernel, signature=signature, constants={names.index(n): v for n, v in constexprs.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    return compiled.asm["ptx"]


def _aot_jobs():
    """(label, kernel, constexprs, configs, dtypes, arches, uses tl.dot).

    Every config and dtype of the three main kernels for sm_90 at the paper's geometry with every
    feature on; the default config for sm_80 too; and a large window with head_dim 128 and every
    feature off (the largest tiles) in the default config.
    """
    from xmorpher_kernels import _triton_kernels as kernels
    from xmorpher_kernels._geometry import WindowGeometry

    every_dtype = ("fp16", "bf16", "fp32")
    jobs = []
    for label, geometry, head_dim, features, configs, dtypes, arches in (
        ("paper", WindowGeometry((32, 36, 36), (2, 2, 2), (6, 6, 6)), 16, True, kernels.CONFIGS, every_dtype, (90,)),
        ("paper", WindowGeometry((32, 36, 36), (2, 2, 2), (6, 6, 6)), 16, True, [kernels.DEFAULT_CONFIG], ("bf16",), (80,)),
        ("wide", WindowGeometry((16, 16, 16), (4, 4, 5), (8, 8, 9)), 128, False, [kernels.DEFAULT_CONFIG], ("bf16", "fp32"), (90,)),
    ):
        tiling = kernels.Tiling.of(geometry, head_dim)
        shared = dict(**tiling.geometry_constexprs(), HEAD_DIM_PAD=tiling.head_dim_pad, HAS_BIAS=features)
        for name, kernel, constexprs in (
            ("forward", kernels._forward_kernel, dict(shared, CONSTANT_PAD=features)),
            ("backward-query", kernels._backward_query_kernel, dict(shared, CONSTANT_PAD=features, ATOMIC_KV=features)),
            ("backward-key", kernels._backward_key_kernel, dict(shared, **tiling.key_constexprs())),
        ):
            jobs.append((f"{label}-{name}", kernel, constexprs, configs, dtypes, arches, True))
    geometry_names = ("WZ", "WY", "WX", "SZ", "SY", "SX", "LZ", "LY", "LX", "PACK", "BLOCK_Q")
    map_constexprs = {k: v for k, v in jobs[0][2].items() if k in geometry_names}
    jobs.append(("bias-index-map", kernels._bias_index_map_kernel, map_constexprs, [kernels.DEFAULT_CONFIG],
                 ("fp32",), (90,), False))
    return jobs


def run_aot_compiles() -> int:
    """Compile every job of _aot_jobs(); assert tensor-core instructions in the 16-bit PTX of the
    tl.dot kernels and none (no TF32) in fp32. Returns the number of compiles."""
    from xmorpher_kernels import _triton_kernels as kernels

    assert not kernels.INTERPRETED, "AOT compiles need the compiled (not interpreted) kernels"
    count = 0
    for name, kernel, constexprs, configs, dtypes, arches, uses_dot in _aot_jobs():
        for config in configs:
            for dtype in dtypes:
                for arch in arches:
                    ptx = compile_for_gpu(kernel, dtype, dict(constexprs, **config.kwargs), arch,
                                          config.num_warps, config.num_stages)
                    count += 1
                    where = f"{name} {dtype} sm_{arch} {config}"
                    if uses_dot and dtype != "fp32":
                        assert "mma" in ptx, f"{where}: no tensor-core (mma) instruction in the PTX"
                    if dtype == "fp32":
                        assert "mma" not in ptx, f"{where}: tensor-core code in fp32 (TF32 misses the fp32 tolerance)"
    return count


def test_aot_compile_every_config():
    from xmorpher_kernels import _triton

    if not _triton.kernels_interpreted():
        assert run_aot_compiles() > 0
        return
    # The same packages as this process (installed, or a source tree on PYTHONPATH), run away from
    # the source tree so it cannot shadow them.
    import xmorpher_kernels

    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(xmorpher_kernels.__file__)))
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=package_parent + os.pathsep + os.environ.get("PYTHONPATH", ""))
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    code = f"import sys; sys.path.insert(0, {tests_dir!r}); import test_triton; print('compiled', test_triton.run_aot_compiles())"
    result = subprocess.run([sys.executable, "-c", code], cwd=tempfile.gettempdir(), env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-8000:]
    assert "compiled" in result.stdout
