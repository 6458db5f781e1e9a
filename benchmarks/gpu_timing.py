"""Timing helpers and problems shared by the GPU table (gpu_report.py) and its FlexAttention rows
(flex_attention_rows.py): CUDA-event medians, CUDA-graph capture as torch's documentation
prescribes, peak memory above what was allocated before a call, seeded inputs. Imports torch only,
so the FlexAttention process can start before the extension is built.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Callable

import torch

STAGES = {  # name: (B, D, H, W, heads, head_dim); window 2, search 6 as in the paper
    "stage1 36x36x32": (2, 36, 36, 32, 3, 16),
    "stage2 18x18x16": (2, 18, 18, 16, 6, 16),
}
WINDOW, SEARCH = 2, 6
BIAS_EXTENT = SEARCH + WINDOW - 1


def median_ms(fn: Callable[[], object], warmup: int = 3, reps: int = 15) -> float:
    """Median of ``reps`` CUDA-event timings of ``fn()`` after ``warmup`` calls."""
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


def capture_graph(fn: Callable[[], object], warmup: int = 3) -> torch.cuda.CUDAGraph:
    """``fn`` captured in a CUDA graph, after warm-up calls on a side stream (compilation,
    autotuning and lazy allocations happen there, outside the capture)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return graph


def peak_mb(fn: Callable[[], object]) -> float:
    """Peak memory one call allocates beyond what was allocated before it."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def make_inputs(shape, dtype):
    """Seeded query, key, value and rel_pos_bias (leaves requiring grad) and a grad_out."""
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(shape, generator=g, device="cuda", dtype=dtype).requires_grad_(True) for _ in range(3))
    bias = (0.1 * torch.randn(shape[4], BIAS_EXTENT, BIAS_EXTENT, BIAS_EXTENT, generator=g, device="cuda", dtype=dtype))
    grad_out = torch.randn(shape, generator=g, device="cuda", dtype=dtype)
    return q, k, v, bias.requires_grad_(True), grad_out


def error_text(error: BaseException) -> str:
    lines = str(error).strip().splitlines() or [""]
    return f"{type(error).__name__}: {lines[0][:100]}"


def write_json_atomically(path: str, data) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    with tempfile.NamedTemporaryFile("w", dir=directory, delete=False, suffix=".tmp") as handle:
        json.dump(data, handle, indent=1)
    os.replace(handle.name, path)
