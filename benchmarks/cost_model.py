"""Static cost model of the CUDA backend's tensor-core kernels, from their SASS (no GPU needed).

Each kernel's time is predicted as

    max(instructions / (schedulers x SMs x clock),        issue
        exponentials / (16 x SMs x clock),                the exponential unit (MUFU.EX2)
        wavefronts / (SMs x clock),                       the shared-memory pipe (LDS, LDSM, SHFL...)
        bytes / bandwidth,                                device memory, each tensor once
        staged bytes / L2 bandwidth)                      L2 to shared memory (key/value boxes)
    + launches x launch overhead

with the instructions, exponentials and shared-memory wavefronts counted in the built extension's
SASS: the hot loop's instructions on its main path (``xmorpher_kernels._sass``), its MUFU.EX2 x 32
lanes and its wavefronts (``_sass.shared_wavefronts``), times its iterations; for the brick kernels also, per warp of every block, the path from the entry to the
hot loop, the staging (cp.async) and table loops times their trips, and the code after the hot
loop once. Printed next to every measured GPU figure
(benchmarks/gpu_report.py), it is calibrated by each lent GPU. Not modelled: latency (occupancy,
dependent chains), bank conflicts, the classic backward's global atomics, and tail effects of the
last wave. The L2 bandwidth is an assumption until a GPU measures it. On the H200 run of
2026-11-25 the classic forward kernel took 211 us and its backward 682 us against 53 and 74 us
predicted here: those kernels are latency-bound (one warp walks a window's 14 key tiles as a
dependent chain), which this model does not see.

    predict(backend, shape, dtype, mode) -> milliseconds, or None where there is no model
      backend: "cuda" (the classic tensor-core kernels) or "brick"; shape (B, D, H, W, heads,
      head_dim) with window 2, search 6 and rel_pos_bias (the paper's setting); dtype "bf16",
      "fp16" or "fp32" (no tensor-core kernels: None); mode "forward" or "forward+backward".

    python benchmarks/cost_model.py [--arch sm_90] [--launch-us 4]
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Dict, List, Optional, Sequence, Tuple

WINDOW, SEARCH = 2, 6
STAGES = {  # XMorpher's four stages, B = 2, both directions of the cross attention counted once
    "stage1 36x36x32": (2, 36, 36, 32, 3, 16),
    "stage2 18x18x16": (2, 18, 18, 16, 6, 16),
    "stage3 9x9x8": (2, 9, 9, 8, 12, 16),
    "stage4 5x5x4": (2, 5, 5, 4, 24, 16),
}
TARGETS_US = {"forward": 40.0, "forward+backward": 150.0}  # issue 11, stage 1, bf16, graph replay


@dataclass(frozen=True)
class Device:
    name: str = "NVIDIA H200"
    sms: int = 132
    clock_hz: float = 1.98e9
    bandwidth: float = 4.2e12  # bytes/s, measured copy bandwidth
    l2_bandwidth: float = 8e12  # bytes/s from L2 into shared memory: an assumption
    schedulers: int = 4  # warp instructions issued per clock per SM
    exp_per_clock: int = 16  # MUFU.EX2 lanes per clock per SM
    launch_s: float = 4e-6


H200 = Device()


@dataclass
class KernelCost:
    name: str
    instructions: float  # warp instructions
    exponentials: float  # lane exponentials
    bytes: float
    wavefronts: float = 0.0  # passes through the shared-memory pipe
    launches: int = 1
    staged_bytes: float = 0.0  # copied from L2 into shared memory

    def seconds(self, device: Device) -> Tuple[float, str]:
        terms = {
            "issue": self.instructions / (device.schedulers * device.sms * device.clock_hz),
            "exp": self.exponentials / (device.exp_per_clock * device.sms * device.clock_hz),
            "shared": self.wavefronts / (device.sms * device.clock_hz),
            "memory": self.bytes / device.bandwidth,
            "L2": self.staged_bytes / device.l2_bandwidth,
        }
        bound = max(terms, key=terms.get)
        return terms[bound] + self.launches * device.launch_s, bound


# ------------------------------------------------------------------------------- SASS counts


@dataclass
class LoopCounts:
    instructions: int  # per iteration of the hot loop (one unit: a window, a key block or a tile)
    exponentials: int  # MUFU.EX2 per iteration (warp instructions)
    wavefronts: int = 0  # shared-memory pipe passes per iteration
    staging_wavefronts: int = 0  # per iteration of the staging loop
    prologue: int = 0  # brick kernels, per warp: entry to the hot loop, each loop once
    staging: int = 0  # the cp.async loop's instructions per iteration (one halo token per thread)
    table: int = 0  # the loop building the fragment-order tables (stores of 4 floats), per iteration
    epilogue: int = 0  # every instruction after the hot loop, once (an upper bound)


def _kernel_counts(arch: str) -> Dict[Tuple[str, str, int], LoopCounts]:
    """(kernel, dtype, head_dim) -> counts, from the installed extension's SASS."""
    import re

    from xmorpher_kernels import _sass
    from xmorpher_kernels._extension import _C

    if not (_C is not None and _C.compiled_with_cuda()) or _sass.find_cuobjdump() is None:
        return {}
    pattern = re.compile(r"((?:brick_[a-z_]+|forward_mma|backward_mma)_kernel)I(6__half|13__nv_bfloat16)Li(\d+)E(Lb1E)?")
    counts = {}
    for name, kernel in _sass.parse_sass(_sass.dump_sass(_C.__file__, arch)).items():
        match = pattern.search(name)
        if not match or (match.group(1) == "backward_mma_kernel" and not match.group(4)):
            continue  # the classic backward: its atomic (default) schedule only
        hot = _sass.hot_loop(kernel)
        if hot is None:
            continue
        c = LoopCounts(hot.instructions, sum(1 for i in hot.path if i.opcode.startswith("MUFU.EX2")), hot.wavefronts)
        if match.group(1).startswith("brick"):
            before = [i.address for i in kernel.instructions if i.address < hot.head]
            c.prologue = _sass.path_to(kernel, before[-1]).instructions if before else 0
            c.epilogue = sum(1 for i in kernel.instructions if i.address > hot.latch)
            staging = _sass.hot_loop(kernel, "LDGSTS")
            c.staging = staging.instructions if staging is not None else 0
            c.staging_wavefronts = staging.wavefronts if staging is not None else 0
            table = _sass.hot_loop(kernel, "STS")
            if table is not None and table.latch < hot.head:
                c.table = table.instructions
        dtype = "fp16" if match.group(2) == "6__half" else "bf16"
        counts[(match.group(1), dtype, int(match.group(3)))] = c
    return counts


@lru_cache(maxsize=None)
def sass_counts(arch: str = "sm_90") -> Dict[Tuple[str, str, int], LoopCounts]:
    try:
        return _kernel_counts(arch)
    except (OSError, RuntimeError):
        return {}


# ------------------------------------------------------------------------------------ the model


def _tokens(shape: Sequence[int]) -> int:
    batch, depth, height, width, heads, _ = shape
    return batch * depth * height * width * heads


def _units(shape: Sequence[int]) -> int:
    batch, depth, height, width, heads, _ = shape
    return batch * heads * math.prod(-(-v // WINDOW) for v in (depth, height, width))


def _brick_kernel(name: str, kind: str, shape, counts: LoopCounts, bytes_moved: float) -> KernelCost:
    from xmorpher_kernels._extension import _C

    batch, depth, height, width, heads, head_dim = shape
    plan = _C.brick_plan([depth, height, width], [WINDOW] * 3, [SEARCH] * 3, head_dim, kind,
                                 batch_heads=batch * heads)
    warps = plan["warps"]
    # The prologue path went through the staging and table loops once; they take more trips.
    staging_trips = math.ceil(math.prod(plan["halo"]) / (warps * 32))
    staging_extra = (staging_trips - 1) * counts.staging
    table_extra = (math.ceil(14 * 32 / (warps * 32)) - 1) * counts.table
    per_warp = counts.prologue + staging_extra + table_extra + counts.epilogue
    units = _units(shape)
    return KernelCost(
        name,
        instructions=units * counts.instructions + plan["blocks"] * warps * per_warp,
        exponentials=units * counts.exponentials * 32,
        bytes=bytes_moved,
        wavefronts=units * counts.wavefronts + plan["blocks"] * warps * staging_trips * counts.staging_wavefronts,
        staged_bytes=plan["blocks"] * math.prod(plan["halo"]) * 2 * plan["row_bytes"],
    )


def brick_kernels(shape, dtype: str, mode: str, arch: str = "sm_90") -> Optional[List[KernelCost]]:
    counts = sass_counts(arch)
    head_dim = shape[5]
    element = 2
    tokens = _tokens(shape)
    row = head_dim * element
    lse = 4 * tokens
    key = lambda family: counts.get((family, dtype, head_dim))
    if key("brick_forward_kernel") is None:
        return None
    kernels = [_brick_kernel("brick_forward", "keys_of_window", shape, key("brick_forward_kernel"),
                             4 * tokens * row + lse)]
    if mode == "forward+backward":
        if key("brick_query_pass_kernel") is None or key("brick_key_pass_kernel") is None:
            return None
        kernels.append(_brick_kernel("brick_query_pass", "keys_of_window", shape,
                                     key("brick_query_pass_kernel"), 6 * tokens * row + 2 * lse))
        kernels.append(_brick_kernel("brick_key_pass", "queries_of_key_block", shape,
                                     key("brick_key_pass_kernel"), 6 * tokens * row + 2 * lse))
        kernels.append(KernelCost("brick_reduce", 0, 0, 0))  # a few thousand partial rows
    return kernels


def classic_kernels(shape, dtype: str, mode: str, arch: str = "sm_90") -> Optional[List[KernelCost]]:
    counts = sass_counts(arch)
    head_dim = shape[5]
    tokens, row = _tokens(shape), head_dim * 2
    tiles = _units(shape) * math.ceil(SEARCH**3 / 16)  # the hot loop walks one 16-key tile
    forward = counts.get(("forward_mma_kernel", dtype, head_dim))
    if forward is None:
        return None
    # A block stages the x-union of 8 neighbouring windows' key boxes (window_attention_cuda_mma.cu).
    batch, depth, height, width, heads, _ = shape
    blocks = batch * heads * -(-depth // WINDOW) * -(-height // WINDOW) * -(-(-(-width // WINDOW)) // 8)
    staged = blocks * SEARCH * SEARCH * (WINDOW * 7 + SEARCH) * 2 * row
    kernels = [KernelCost("forward_mma", tiles * forward.instructions, tiles * forward.exponentials * 32,
                          4 * tokens * row + 4 * tokens, tiles * forward.wavefronts, staged_bytes=staged)]
    if mode == "forward+backward":
        backward = counts.get(("backward_mma_kernel", dtype, head_dim))
        if backward is None:
            return None
        # dK/dV accumulated in fp32 (read-modify-write) and cast; about 20 small launches compute the
        # fixed-point unit of the bias sums, zero the accumulators and cast the results.
        kernels.append(KernelCost("backward_mma", tiles * backward.instructions, tiles * backward.exponentials * 32,
                                  6 * tokens * row + 4 * tokens + 2 * 2 * tokens * head_dim * 4, tiles * backward.wavefronts,
                                  staged_bytes=staged))
        kernels.append(KernelCost("small ops (fills, unit, casts)", 0, 0, 2 * tokens * head_dim * (4 + 2), launches=22))
    return kernels


def kernels_of(backend: str, shape, dtype: str, mode: str, arch: str = "sm_90") -> Optional[List[KernelCost]]:
    if mode not in ("forward", "forward+backward"):
        raise ValueError(f"mode must be 'forward' or 'forward+backward', got {mode!r}")
    if dtype not in ("bf16", "fp16", "fp32"):
        raise ValueError(f"dtype must be 'bf16', 'fp16' or 'fp32', got {dtype!r}")
    if dtype == "fp32":
        return None  # neither generation has fp32 tensor-core kernels
    if backend == "brick":
        return brick_kernels(tuple(shape), dtype, mode, arch)
    if backend == "cuda":
        return classic_kernels(tuple(shape), dtype, mode, arch)
    return None


def predict(backend: str, shape: Sequence[int], dtype: str = "bf16", mode: str = "forward",
            device: Device = H200, arch: str = "sm_90") -> Optional[float]:
    """Predicted GPU time in milliseconds of one call (window 2, search 6, bias on), or None."""
    kernels = kernels_of(backend, shape, dtype, mode, arch)
    if kernels is None:
        return None
    return sum(k.seconds(device)[0] for k in kernels) * 1e3


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="sm_90", help="cubin whose SASS is counted (default sm_90)")
    parser.add_argument("--launch-us", type=float, default=H200.launch_s * 1e6, help="overhead per launch")
    args = parser.parse_args(argv)
    device = Device(launch_s=args.launch_us * 1e-6)
    if not sass_counts(args.arch):
        print("no SASS to count: the extension has no CUDA kernels, or cuobjdump is missing", file=sys.stderr)
        return 1
    print(f"Static cost model, {device.name} ({device.sms} SMs, {device.clock_hz / 1e9:.2f} GHz, "
          f"{device.bandwidth / 1e12:.1f} TB/s, {device.launch_s * 1e6:.0f} us per launch), "
          f"{args.arch} SASS of the installed extension; window 2, search 6, bias, bf16.")
    print(f"{'stage':<16} {'backend':<7} {'mode':<17} {'predicted us':>12}  kernels (us, bound)")
    for stage, shape in STAGES.items():
        for backend in ("cuda", "brick"):
            for mode in ("forward", "forward+backward"):
                kernels = kernels_of(backend, shape, "bf16", mode, args.arch)
                if kernels is None:
                    print(f"{stage:<16} {backend:<7} {mode:<17} {'-':>12}")
                    continue
                parts = []
                total = 0.0
                for k in kernels:
                    seconds, bound = k.seconds(device)
                    total += seconds
                    parts.append(f"{k.name} {seconds * 1e6:.1f} ({bound})")
                target = f"  [target {TARGETS_US[mode]:.0f} us]" if backend == "brick" and stage.startswith("stage1") else ""
                print(f"{stage:<16} {backend:<7} {mode:<17} {total * 1e6:>12.1f}  {'; '.join(parts)}{target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
