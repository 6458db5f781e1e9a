"""SASS check of the brick tensor-core kernels, on the installed extension and without a GPU
(``cuobjdump`` from the CUDA toolkit or triton's package): for every architecture built, every
brick kernel has no local memory (LDL/STL: spills or stack arrays), no shared-memory CAS loop
(ATOMS.CAS, ATOMS.CAST.SPIN) and no global atomics (RED, ATOM, ATOMG); the tensor-core kernels
load their fragments with ldmatrix (LDSM); and the hot loop of each head_dim-16 kernel (the loop
over a warp's units, counted on its unmasked path by ``xmorpher_kernels._sass``) stays within the
instruction budget per 16-token tile that csrc/include/xmorpher_kernels/brick_layout.h states.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from typing import Dict, List, Tuple

import pytest

from xmorpher_kernels import _sass
from xmorpher_kernels._extension import _C

pytestmark = pytest.mark.skipif(
    not (_C is not None and _C.compiled_with_cuda() and hasattr(_C, "brick_budgets")),
    reason="the extension was built without its CUDA kernels",
)

FAMILIES = {"brick_forward_kernel": "forward", "brick_query_pass_kernel": "query_pass", "brick_key_pass_kernel": "key_pass"}
_NAME = re.compile(r"(brick_[a-z_]+_kernel)I(6__half|13__nv_bfloat16)(?:Li(\d+)E)?")
FORBIDDEN = {
    "local memory (LDL/STL)": r"^(LDL|STL)(\.|$)",
    "shared-memory CAS loop (ATOMS.CAS/ATOMS.CAST)": r"^ATOMS\.CAS",
    "global atomics (RED/ATOM/ATOMG)": r"^(RED|ATOM|ATOMG)(\.|$)",
}


def _archs() -> List[str]:
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    return [f"sm_{m.group(1)}{m.group(2)}" for m in re.finditer(r"(\d+)\.(\d+)", arch_list)]


@lru_cache(maxsize=None)
def brick_kernels(arch: str) -> Dict[Tuple[str, str, int], _sass.Kernel]:
    """(kernel, dtype, head_dim) -> parsed SASS of the brick kernels in the `arch` cubin."""
    tool = _sass.find_cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump not found (CUDA toolkit or triton's copy)")
    found = {}
    for name, kernel in _sass.parse_sass(_sass.dump_sass(_C.__file__, arch, tool)).items():
        match = _NAME.search(name)
        if match:
            dtype = "fp16" if match.group(2) == "6__half" else "bf16"
            found[(match.group(1), dtype, int(match.group(3) or 0))] = kernel
    return found


@pytest.mark.parametrize("arch", _archs())
def test_every_brick_kernel_is_built(arch):
    kernels = brick_kernels(arch)
    for family in FAMILIES:
        for dtype in ("fp16", "bf16"):
            for head_dim in (16, 32):
                assert (family, dtype, head_dim) in kernels, f"no {family}<{dtype}, {head_dim}> in the {arch} cubin"
    assert ("brick_reduce_kernel", "bf16", 0) in kernels


@pytest.mark.parametrize("arch", _archs())
def test_no_local_memory_cas_loops_or_global_atomics(arch):
    problems = []
    for key, kernel in sorted(brick_kernels(arch).items()):
        for what, pattern in FORBIDDEN.items():
            hits = kernel.matching(pattern)
            if hits:
                shown = ", ".join(f"0x{i.address:x} {i.opcode}" for i in hits[:4])
                problems.append(f"{key}: {len(hits)} x {what}: {shown}")
    assert not problems, f"{arch}:\n" + "\n".join(problems)


@pytest.mark.parametrize("arch", _archs())
def test_tensor_core_kernels_use_ldmatrix(arch):
    for (family, dtype, head_dim), kernel in brick_kernels(arch).items():
        if family not in FAMILIES:
            continue
        counts = {op: kernel.count(op) for op in ("HMMA", "LDSM", "MOVM")}
        assert all(counts.values()), f"{arch} {family}<{dtype}, {head_dim}>: {counts}"


def expected_hmma(family: str, head_dim: int, tiles: int) -> int:
    """Tensor-core instructions per unit by design: scores (and dP in the backward), head_dim / 16
    k-steps each; products whose m side is the unit's slots, head_dim / 8 n-tiles each; the
    forward's row sums."""
    steps, cols = head_dim // 16, head_dim // 8
    per_tile = {"forward": steps + cols + 1, "query_pass": 2 * steps + cols, "key_pass": 2 * steps + 2 * cols}[family]
    return tiles * per_tile


@pytest.mark.parametrize("arch", _archs())
@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_hot_loop_within_budget(arch, family, dtype):
    budgets = _C.brick_budgets()
    tiles, budget = budgets["tiles"], budgets[FAMILIES[family]]
    kernel = brick_kernels(arch)[(family, dtype, 16)]
    cost = _sass.hot_loop(kernel)
    assert cost is not None, f"{arch} {family}<{dtype}, 16>: no loop with tensor-core instructions found"
    assert cost.hmma == expected_hmma(FAMILIES[family], 16, tiles), (
        f"{arch} {family}<{dtype}, 16>: the hot loop found is not one unit of {tiles} tiles: {cost.describe()}"
    )
    per_tile = cost.instructions / tiles
    assert per_tile <= budget, (
        f"{arch} {family}<{dtype}, 16>: {per_tile:.1f} instructions per tile, budget {budget}: {cost.describe()}"
    )
