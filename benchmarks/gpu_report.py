"""GPU benchmark of window_cross_attention: one table of every backend at the paper's first two
stages, with the card's copy bandwidth and bf16 matmul rate as the roofline.

Run by benchmarks/run_gpu.sh (after the package is installed); prints the table and writes it,
with the card's name, under benchmarks/results/. Each backend's forward and forward+backward
time (median of CUDA-event timings), peak memory above the inputs, ratio to the reference, and
the fraction of the roofline floor max(bytes read and written once / bandwidth, FLOPs / matmul
rate) it reaches. A backend that fails shows its error in the table instead of stopping it.
"""

import argparse
import datetime
import math
import os
import platform
import re
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

from xmorpher_kernels import WindowGeometry, available_backends, window_cross_attention

STAGES = {  # name: (B, D, H, W, heads, head_dim); window 2, search 6 as in the paper
    "stage1 36x36x32": (2, 36, 36, 32, 3, 16),
    "stage2 18x18x16": (2, 18, 18, 16, 6, 16),
}
WINDOW, SEARCH = 2, 6


def median_ms(fn: Callable[[], None], warmup: int = 3, reps: int = 15) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def peak_mb(fn: Callable[[], None]) -> float:
    """Peak memory one call allocates beyond what was allocated before it."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read plus written per second."""
    src = torch.empty(2**28, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), reps=20)
    return 2 * src.numel() * 4 / (ms * 1e-3)


def matmul_rate() -> float:
    """Dense bf16 matmul FLOP/s at 8192^3."""
    n = 8192
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    ms = median_ms(lambda: torch.mm(a, b), reps=10)
    return 2 * n**3 / (ms * 1e-3)


def valid_pairs(geometry: WindowGeometry) -> int:
    """(query, in-volume key) pairs: the key box is a product, so the count factorizes by axis."""
    total = 1
    for n, w, s, l in zip(geometry.volume, geometry.window, geometry.search, geometry.left):
        per_axis = 0
        for p in range(n):
            start = (p // w) * w - l
            per_axis += max(0, min(start + s, n) - max(start, 0))
        total *= per_axis
    return total


def roofline_floor_s(shape, dtype: torch.dtype, backward: bool, bandwidth: float, flop_rate: float) -> float:
    """Forward: read q, k, v, write out; 2 matmuls over the valid pairs. Backward adds reading
    q, k, v, out, dout and writing dq, dk, dv, and 4 matmuls (dP, dS K, dS^T Q, P^T dO)."""
    batch, depth, height, width, heads, head_dim = shape
    geometry = WindowGeometry((depth, height, width), (WINDOW,) * 3, (SEARCH,) * 3)
    tensor_bytes = math.prod(shape) * torch.finfo(dtype).bits // 8
    pair_flops = 2 * batch * heads * valid_pairs(geometry) * head_dim
    bytes_moved = 4 * tensor_bytes + (8 * tensor_bytes if backward else 0)
    flops = pair_flops * (6 if backward else 2)
    return max(bytes_moved / bandwidth, flops / flop_rate)


def flex_attention_runner(shape) -> Callable:
    """torch's FlexAttention over the flattened volume with a block mask of the same key boxes
    (keys outside the volume do not exist there: padding="mask") and the bias as a score_mod."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    batch, depth, height, width, heads, head_dim = shape
    length = depth * height * width
    left = (SEARCH - WINDOW) // 2
    extent = SEARCH + WINDOW - 1

    def coords(i):
        return i // (height * width), (i // width) % height, i % width

    def mask_mod(b, h, q_idx, kv_idx):
        inside = None
        for q_c, k_c in zip(coords(q_idx), coords(kv_idx)):
            t = k_c - (q_c // WINDOW) * WINDOW + left
            axis = (t >= 0) & (t < SEARCH)
            inside = axis if inside is None else inside & axis
        return inside

    block_mask = create_block_mask(mask_mod, None, None, length, length, device="cuda")
    compiled = torch.compile(flex_attention)

    def run(q, k, v, rel_pos_bias):
        def flat(t):
            return t.reshape(batch, length, heads, head_dim).transpose(1, 2)

        def score_mod(score, b, h, q_idx, kv_idx):
            # Clamped: the mask drops the pairs whose offset falls outside the table.
            index = [(k_c - q_c + left + WINDOW - 1).clamp(0, extent - 1)
                     for q_c, k_c in zip(coords(q_idx), coords(kv_idx))]
            return score + rel_pos_bias[h, index[0], index[1], index[2]]

        out = compiled(flat(q), flat(k), flat(v), score_mod=score_mod, block_mask=block_mask, scale=head_dim**-0.5)
        return out.transpose(1, 2).reshape(shape)

    return run


@dataclass
class Row:
    stage: str
    dtype: str
    backend: str
    forward_ms: Optional[float] = None
    train_ms: Optional[float] = None
    forward_mb: Optional[float] = None
    train_mb: Optional[float] = None
    error: str = ""


def make_inputs(shape, dtype):
    """Seeded query, key, value and rel_pos_bias (leaves requiring grad) and a grad_out."""
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(shape, generator=g, device="cuda", dtype=dtype).requires_grad_(True) for _ in range(3))
    extent = SEARCH + WINDOW - 1
    bias = (0.1 * torch.randn(shape[4], extent, extent, extent, generator=g, device="cuda", dtype=dtype)).requires_grad_(True)
    grad_out = torch.randn(shape, generator=g, device="cuda", dtype=dtype)
    return q, k, v, bias, grad_out


def measure(name: str, run: Callable, shape, dtype, deterministic: bool = False) -> Row:
    q, k, v, bias, grad_out = make_inputs(shape, dtype)
    leaves = (q, k, v, bias)
    row = Row(stage="", dtype=str(dtype).replace("torch.", ""), backend=name)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        def forward():
            with torch.no_grad():
                run(q, k, v, bias)

        def train():
            for t in leaves:
                t.grad = None
            run(q, k, v, bias).backward(grad_out)

        row.forward_ms, row.train_ms = median_ms(forward), median_ms(train)
        row.forward_mb, row.train_mb = peak_mb(forward), peak_mb(train)
    except Exception as error:  # one failing backend must not stop the table
        row.error = f"{type(error).__name__}: {str(error).splitlines()[0][:80]}"
    finally:
        torch.use_deterministic_algorithms(previous)
        torch.cuda.empty_cache()
    return row


def op_runner(backend: str) -> Callable:
    def run(q, k, v, bias):
        return window_cross_attention(q, k, v, WINDOW, SEARCH, rel_pos_bias=bias, backend=backend)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--budget-s", type=float, default=420.0, help="skip FlexAttention (its compile is slow) past this")
    parser.add_argument("--profile", metavar="PATH", help="also write a per-kernel CUDA time table of the fused "
                        "backends (first stage, bf16, forward+backward) to PATH")
    args = parser.parse_args()
    started = time.time()
    assert torch.cuda.is_available(), "needs a CUDA GPU"

    card = torch.cuda.get_device_name()
    bandwidth, flop_rate = copy_bandwidth(), matmul_rate()
    built = available_backends()
    backends: Dict[str, tuple] = {"reference": (op_runner("reference"), False)}
    if built["triton"].available:
        backends["triton"] = (op_runner("triton"), False)
        backends["triton (deterministic)"] = (op_runner("triton"), True)
    if built["cuda"].available:
        backends["cuda"] = (op_runner("cuda"), False)
        backends["cuda (deterministic)"] = (op_runner("cuda"), True)

    rows: List[Row] = []
    for stage, shape in STAGES.items():
        for dtype in (torch.bfloat16, torch.float32):
            runners = dict(backends)
            if time.time() - started < args.budget_s:
                try:
                    runners["flex_attention"] = (flex_attention_runner(shape), False)
                except Exception as error:
                    rows.append(Row(stage, str(dtype).replace("torch.", ""), "flex_attention",
                                    error=f"{type(error).__name__}: {str(error).splitlines()[0][:80]}"))
            else:
                rows.append(Row(stage, str(dtype).replace("torch.", ""), "flex_attention", error="skipped: time budget"))
            for name, (run, deterministic) in runners.items():
                row = measure(name, run, shape, dtype, deterministic)
                row.stage = stage
                rows.append(row)

    def fmt(x, spec=".3f"):
        return "-" if x is None else format(x, spec)

    header = (f"{'stage':<16} {'dtype':<9} {'backend':<23} {'fwd ms':>8} {'f+b ms':>8} {'fwd MB':>8} {'f+b MB':>8} "
              f"{'fwd x ref':>9} {'f+b x ref':>9} {'fwd roof':>8} {'f+b roof':>8}")
    lines = [
        f"window_cross_attention GPU benchmark, {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"card: {card}; torch {torch.__version__}; triton {_triton_version()}; python {platform.python_version()}",
        f"copy bandwidth {bandwidth / 1e12:.2f} TB/s; bf16 matmul {flop_rate / 1e12:.0f} TFLOP/s",
        "window 2, search 6, rel_pos_bias on, padding='mask'. 'x ref' = reference time / backend time;",
        "'roof' = roofline floor / measured time (1.0 = at the floor). MB = peak allocation above the inputs.",
        "",
        header,
        "-" * len(header),
    ]
    for row in rows:
        reference = next((r for r in rows if r.backend == "reference" and r.stage == row.stage and r.dtype == row.dtype), None)
        shape = STAGES[row.stage]
        dtype = getattr(torch, row.dtype)
        if row.error:
            lines.append(f"{row.stage:<16} {row.dtype:<9} {row.backend:<23} {row.error}")
            continue
        speedups = [
            ref / mine if ref and mine else None
            for ref, mine in ((reference.forward_ms, row.forward_ms), (reference.train_ms, row.train_ms))
        ] if reference and not reference.error else [None, None]
        roofs = [roofline_floor_s(shape, dtype, backward, bandwidth, flop_rate) * 1e3 / ms
                 for backward, ms in ((False, row.forward_ms), (True, row.train_ms))]
        lines.append(
            f"{row.stage:<16} {row.dtype:<9} {row.backend:<23} {fmt(row.forward_ms):>8} {fmt(row.train_ms):>8} "
            f"{fmt(row.forward_mb, '.1f'):>8} {fmt(row.train_mb, '.1f'):>8} {fmt(speedups[0], '.1f'):>9} "
            f"{fmt(speedups[1], '.1f'):>9} {fmt(roofs[0], '.2f'):>8} {fmt(roofs[1], '.2f'):>8}"
        )
    report = "\n".join(lines)
    print(report)
    os.makedirs(args.out_dir, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", card).strip("-").lower()
    path = os.path.join(args.out_dir, f"{slug}-{datetime.date.today().isoformat()}.txt")
    with open(path, "w") as f:
        f.write(report + "\n")
    print(f"\nwritten to {path}")
    if args.profile:
        write_kernel_profile(args.profile, {name: entry for name, entry in backends.items() if name != "reference"})


def write_kernel_profile(path: str, backends: Dict[str, tuple]) -> None:
    """Where each backend's forward+backward time goes, kernel by kernel (first stage, bf16)."""
    from torch.profiler import ProfilerActivity, profile

    stage, shape = next(iter(STAGES.items()))
    sections = []
    for name, (run, deterministic) in backends.items():
        q, k, v, bias, grad_out = make_inputs(shape, torch.bfloat16)
        previous = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(deterministic)
        try:
            run(q, k, v, bias).backward(grad_out)  # compiles and autotunes outside the profile
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    run(q, k, v, bias).backward(grad_out)
                torch.cuda.synchronize()
            table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=70)
        except Exception as error:
            table = f"{type(error).__name__}: {error}"
        finally:
            torch.use_deterministic_algorithms(previous)
        sections.append(f"== {name}, {stage}, bf16, 5 x forward+backward\n{table}")
    with open(path, "w") as f:
        f.write("\n\n".join(sections) + "\n")
    print(f"kernel profile written to {path}")


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "not installed"


if __name__ == "__main__":
    main()
