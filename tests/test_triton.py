"""Tests specific to the Triton backend: its tiling paths (packed windows, row blocks), the bias
and pad reductions, launches per call, every autotune configuration, and ahead-of-time compiles.
The op's contract is tested for every backend in test_contract.py.

On a machine with a CUDA GPU the kernels run compiled on it. Without one they run in Triton's CPU
interpreter: this module sets TRITON_INTERPRET=1 before the kernels are first imported (the
backend imports them on its first call, so this holds even when the package is already loaded).
The ahead-of-time compile test needs the kernels compiled, not interpreted; in an interpreting
process it runs itself again in a subprocess without the interpreter.
"""

import dataclasses
import os
import re
import subprocess
import sys
import tempfile

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from xmorpher_kernels import _backends, _triton  # noqa: E402
from xmorpher_kernels._checks import check_arguments  # noqa: E402
from xmorpher_kernels.testing import check_against_reference, make_problem  # noqa: E402

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


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# (shape, options): small volumes that still cover every path of the kernels.
CASES = {
    # The contract's worked example: 4^3 volume, window 2, search 6 (two windows packed per tile).
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
def test_matches_reference(case):
    shape, options = CASES[case]
    problem = make_problem(shape, device=DEVICE, generator=generator(), **options)
    check_against_reference(problem, "triton")


# Cases for the bias and pad gradients, which the query pass sums per program and the key pass
# reduces (xmorpher_kernels/_triton_kernels.py): partial windows, odd head dims, both paddings,
# several heads, more slots than a reducing program takes at once, pad columns across two of its
# column blocks, query-pass tiles that split a window, and long walks along x.
BIAS_PAD_CASES = {
    # 2 x 20 query-pass programs per head (over REDUCE_SLOTS); 3 windows per tile, the last one
    # partial; 2 chunks of union-box columns.
    "many_slots_constant": ((2, 4, 5, 5, 1, 3), dict(window_size=(1, 1, 2), search_size=(3, 3, 4),
                                                     padding="constant", bias=True)),
    # 75 bias entries then 2 x 13 pad columns: the pads straddle the reducers' column blocks.
    "pad_columns_straddle": ((1, 4, 5, 7, 2, 13), dict(window_size=(2, 2, 1), search_size=(4, 4, 3),
                                                      padding="constant", bias=True)),
    # Pads without a bias: the slot holds only the pad gradients.
    "pads_only": ((1, 3, 4, 6, 2, 24), dict(window_size=2, search_size=4, padding="constant")),
    # 27-query windows: two 16-row query-pass tiles per window, the second partial.
    "large_window_mask": ((1, 4, 5, 6, 1, 7), dict(window_size=3, search_size=5, bias=True)),
    # 10 windows along x: a walk of 5 packs per program.
    "long_walk": ((1, 2, 2, 20, 1, 8), dict(window_size=2, bias=True, padding="constant")),
}


@pytest.mark.parametrize("case", list(BIAS_PAD_CASES))
def test_bias_and_pad_gradients_match_reference(case, seed):
    shape, options = BIAS_PAD_CASES[case]
    problem = make_problem(shape, device=DEVICE, generator=generator(seed), **options)
    errors = check_against_reference(problem, "triton")
    assert {"grad of rel_pos_bias", "grad of pad_key", "grad of pad_value"} & set(errors)


def test_backward_is_bitwise_reproducible():
    """No atomics: every sum of the backward has a fixed order."""
    problem = make_problem((2, 2, 3, 4, 2, 8), padding="constant", bias=True, device=DEVICE, generator=generator(3))
    grad_out = torch.randn(problem.query.shape, generator=generator(4)).to(DEVICE)
    runs = []
    for _ in range(2):
        fresh = problem.to()
        fresh.run("triton").backward(grad_out)
        runs.append([t.grad.clone() for t in fresh.tensors().values()])
    assert len(runs[0]) == 6
    for first, second in zip(*runs):
        assert torch.equal(first, second)


def _kernel_call():
    """Arguments of _triton_kernels.forward for a small call with every feature on."""
    from xmorpher_kernels._geometry import WindowGeometry

    problem = make_problem((2, 3, 4, 6, 2, 16), padding="constant", bias=True, device=DEVICE, generator=generator(11))
    geometry = WindowGeometry(tuple(problem.query.shape[1:4]), (2, 2, 2), (6, 6, 6))
    tensors = [t.detach() for t in problem.tensors().values()]
    query, key, value, bias, pad_key, pad_value = tensors
    return (query, key, value, geometry, 0.25, bias, pad_key, pad_value)


def test_calls_only_allocate_and_launch(monkeypatch):
    """forward and backward launch LAUNCHES_PER_FORWARD and LAUNCHES_PER_BACKWARD kernels and run
    no other PyTorch op than allocating their results and scratch: no fills, casts, reductions
    or host synchronisations (what the interpreter does inside a launch is not looked at). On a
    GPU, tests/test_gpu_call_path.py counts what the device runs per call with torch.profiler."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from xmorpher_kernels import _triton_kernels as kernels

    launches, ops, in_launch = [], [], [False]

    class RecordOps(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not in_launch[0]:
                ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    launch = kernels._launch

    def counted_launch(kernel, *args, **kwargs):
        launches.append(kernel)
        in_launch[0] = True
        try:
            return launch(kernel, *args, **kwargs)
        finally:
            in_launch[0] = False

    monkeypatch.setattr(kernels, "_launch", counted_launch)
    query, key, value, geometry, scale, bias, pad_key, pad_value = _kernel_call()
    grad_out = torch.randn_like(query)
    with RecordOps():
        out, lse = kernels.forward(query, key, value, geometry, scale, bias, pad_key, pad_value)
    assert len(launches) == kernels.LAUNCHES_PER_FORWARD == 1
    forward_ops = list(ops)
    with RecordOps():
        grads = kernels.backward(grad_out, query, key, value, out, lse, geometry, scale, bias, pad_key, pad_value)
    assert len(launches) - 1 == kernels.LAUNCHES_PER_BACKWARD == 2
    assert all(g is not None for g in grads)
    allocations = {"empty", "empty_like", "empty_strided"}
    assert set(forward_ops) <= allocations, forward_ops
    assert set(ops) <= allocations, ops


def _configs():
    from xmorpher_kernels import _triton_kernels

    narrowest = min(_triton_kernels.CONFIGS, key=lambda c: c.kwargs["BLOCK_K"])
    return [
        pytest.param(c, id=f"BLOCK_K{c.kwargs['BLOCK_K']}-w{c.num_warps}-s{c.num_stages}",
                     marks=() if c is narrowest else needs_gpu)
        for c in _triton_kernels.CONFIGS
    ]


@pytest.mark.parametrize("config", _configs())
def test_every_config_matches_reference(config):
    """Each autotune configuration on its own (the interpreter runs the default elsewhere; here
    the narrowest, whose key loop takes the most steps)."""
    from xmorpher_kernels import _triton_kernels

    problem = make_problem((1, 4, 5, 6, 2, 8), window_size=2, bias=True, padding="constant", device=DEVICE,
                           generator=generator(5))
    with _triton_kernels.fixed_config(config):
        check_against_reference(problem, "triton")


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_paper_first_stage_geometry_on_gpu(dtype):
    problem = make_problem((1, 12, 12, 8, 3, 16), window_size=2, search_size=6, bias=True, dtype=dtype,
                           device=DEVICE, generator=generator(6))
    check_against_reference(problem, "triton")


@needs_gpu
@pytest.mark.parametrize("head_dim", [59, 128])
def test_large_head_dim_on_gpu(head_dim):
    problem = make_problem((1, 4, 6, 6, 2, head_dim), window_size=2, padding="constant", bias=True,
                           dtype=torch.bfloat16, device=DEVICE, generator=generator(7))
    check_against_reference(problem, "triton")


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

_FP32_BUFFERS = {"LSE", "DELTA", "PARTIALS"}
# A global load of one 16-bit element: "ld.global[.nc][.L1::...].b16" (or .u16/.s16), no .v2/.v4.
_SCALAR_16BIT_LOAD = re.compile(r"\bld\.global(?:\.(?!v[248]\b)[\w:]+)*\.[bus]16\b")
# A vector load, or an asynchronous copy of at least 8 bytes to shared memory (how Triton
# pipelines the loads of a loop).
_WIDE_LOAD = re.compile(r"\bld\.global(?:\.[\w:]+)*?\.v[248]\."
                        r"|\bcp\.async\.\w+\.shared\.global \[[^]]*\], \[[^]]*\], (?:8|16|0x8|0x10)\b")


def compile_for_gpu(kernel, dtype: str, constexprs: dict, arch: int, num_warps: int, num_stages: int):
    """Compile a kernel of _triton_kernels for an NVIDIA target without a GPU (Triton >= 3.3:
    constexprs and attributes by name and path, as in 3.6 and 3.8); returns the compiled kernel.

    The one place that knows how triton.compile wants signatures: upper-case parameters are
    pointers (fp32 for the statistics and partial sums, ``dtype`` otherwise), ``*_strides`` are
    tuples of five int32, ``scale`` is fp32. Pointers and strides are declared divisible by 16,
    as Triton specializes them at run time for the contiguous (B, D, H, W, heads, head_dim)
    tensors of a head_dim-16 call: without that the compiler cannot prove 16-byte alignment.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, attrs = {}, {}
    divisible = [["tt.divisibility", 16]]
    for index, param in enumerate(kernel.params):
        name = param.name
        if param.is_constexpr:
            signature[name] = "constexpr"
        elif name.endswith("_strides"):
            signature[name] = ("i32",) * 5
            attrs.update({(index, axis): divisible for axis in range(5)})
        elif name.isupper():
            signature[name] = "*fp32" if name in _FP32_BUFFERS else f"*{dtype}"
            attrs[(index,)] = divisible
        else:
            assert name == "scale", f"no type for argument {name}"
            signature[name] = "fp32"
    missing = {p.name for p in kernel.params if p.is_constexpr} ^ set(constexprs)
    assert not missing, f"constexprs {sorted(missing)} mismatch"
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def loop_bodies(ptx: str):
    """The PTX of each loop: from a label to the last branch back to it (nested loops included)."""
    labels = {m.group(1): m.end() for m in re.finditer(r"^(\$L__\w+):", ptx, re.M)}
    bodies = {}
    for branch in re.finditer(r"\bbra(?:\.uni)?\s+(\$L__\w+);", ptx):
        start = labels.get(branch.group(1))
        if start is not None and start < branch.start():
            bodies[branch.group(1)] = ptx[start:branch.start()]
    return list(bodies.values())


def local_memory_bytes(compiled) -> int:
    """Registers spilled to local memory, per thread (cuobjdump -res-usage on the cubin)."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([tool, "-res-usage", cubin.name], capture_output=True, text=True, check=True).stdout
    found = re.search(r"STACK:(\d+).*LOCAL:(\d+)", usage)
    assert found, usage
    return int(found.group(1)) + int(found.group(2))


def _aot_jobs():
    """(label, kernel, constexprs, configs, dtypes, arches, checks).

    Checks: "mma" (tensor cores in 16-bit, none in fp32), "loads" (no 16-bit scalar global load
    in any loop, and some wide ones), "spills" (no local memory). At the paper's geometry with
    every feature on: every config and dtype of the three kernels for sm_90, and the default
    config in bf16 for sm_80 and sm_90, without spills. The load widths at head_dim 16 with
    constant padding but no rel_pos_bias (whose per-pair gathers are scalar by nature): bf16 in
    every config of at most 4 warps (with 8, a 16-row x 16 tile leaves one element per thread:
    nothing to vectorize), fp16 in the default config for sm_80 and sm_90. And a large window
    with head_dim 128 and every feature off (the largest tiles) in the default config.
    """
    from xmorpher_kernels import _triton_kernels as kernels
    from xmorpher_kernels._geometry import WindowGeometry

    paper = WindowGeometry((32, 36, 36), (2, 2, 2), (6, 6, 6))
    wide = WindowGeometry((16, 16, 16), (4, 4, 5), (8, 8, 9))
    narrow_configs = [c for c in kernels.CONFIGS if c.num_warps <= 4]
    default = [kernels.DEFAULT_CONFIG]
    jobs = []
    for label, geometry, head_dim, bias, pad, configs, dtypes, arches, checks in (
        ("paper", paper, 16, True, True, kernels.CONFIGS, ("fp16", "bf16", "fp32"), (90,), ("mma",)),
        ("paper", paper, 16, True, True, default, ("bf16",), (80, 90), ("mma", "spills")),
        ("paper-no-bias", paper, 16, False, True, narrow_configs, ("bf16",), (90,), ("loads",)),
        ("paper-no-bias", paper, 16, False, True, default, ("fp16",), (80, 90), ("loads",)),
        ("wide", wide, 128, False, False, default, ("bf16", "fp32"), (90,), ("mma",)),
    ):
        constexprs = kernels.LaunchPlan.of(geometry, head_dim, bias, pad).constexprs
        for name, kernel in (("forward", kernels._forward_kernel), ("backward-query", kernels._backward_query_kernel),
                             ("backward-key", kernels._backward_key_kernel)):
            jobs.append((f"{label}-{name}", kernel, constexprs, configs, dtypes, arches, checks))
    return jobs


def run_aot_compiles() -> int:
    """Compile every job of _aot_jobs() and run its checks. Returns the number of compiles."""
    from xmorpher_kernels import _triton_kernels as kernels

    assert not kernels.INTERPRETED, "AOT compiles need the compiled (not interpreted) kernels"
    count = 0
    for name, kernel, constexprs, configs, dtypes, arches, checks in _aot_jobs():
        for config in configs:
            for dtype in dtypes:
                for arch in arches:
                    compiled = compile_for_gpu(kernel, dtype, dict(constexprs, **config.kwargs), arch,
                                               config.num_warps, config.num_stages)
                    ptx = compiled.asm["ptx"]
                    count += 1
                    where = f"{name} {dtype} sm_{arch} {config}"
                    if "mma" in checks and dtype != "fp32":
                        assert "mma" in ptx, f"{where}: no tensor-core (mma) instruction in the PTX"
                    if "mma" in checks and dtype == "fp32":
                        assert "mma" not in ptx, f"{where}: tensor-core code in fp32 (TF32 misses the fp32 tolerance)"
                    if "loads" in checks:
                        loops = loop_bodies(ptx)
                        assert loops, f"{where}: no loop found in the PTX"
                        scalar = [m.group(0) for body in loops for m in _SCALAR_16BIT_LOAD.finditer(body)]
                        assert not scalar, f"{where}: 16-bit scalar global loads in a loop: {scalar}"
                        assert any(_WIDE_LOAD.search(body) for body in loops), f"{where}: no vector load in a loop"
                    if "spills" in checks:
                        assert local_memory_bytes(compiled) == 0, f"{where}: registers spill to local memory"
    return count


def test_aot_compile_every_config():
    from triton.compiler import ASTSource

    if "constexprs" not in ASTSource.__init__.__code__.co_varnames:
        pytest.skip(f"triton {triton.__version__} predates triton.compile's constexprs argument")
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
