"""Benchmark session helpers: the import path of the shared problem definitions, and a summary
table of the op benchmarks (ratios against the reference of the same run, with the machine)."""

from __future__ import annotations

import os
import platform
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def op_summary(benchmarks) -> list[str]:
    """Markdown rows: time, GFLOP/s, peak additional memory and ratios against the reference."""
    rows = {}
    for bench in benchmarks:
        info = bench.extra_info
        if info.get("kind") not in ("op", "matmul"):
            continue
        rows[(info["stage"], info["mode"], info["backend"])] = (bench.stats.min, info)
    lines = [
        f"Machine: {_cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "",
        "| stage | mode | backend | time (ms) | GFLOP/s | peak extra memory (MiB) | speed-up vs reference | memory vs reference |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (stage, mode, backend), (seconds, info) in sorted(rows.items()):
        ref = rows.get((stage, mode, "reference"))
        flops = info["forward_gflop"] * (3 if mode == "forward+backward" and info["kind"] == "op" else 1)
        speedup = f"{ref[0] / seconds:.1f}x" if ref else "-"
        memory = f"{info['peak_additional_bytes'] / ref[1]['peak_additional_bytes'] * 100:.1f}%" if ref and ref[1]["peak_additional_bytes"] else "-"
        lines.append(
            f"| {stage} | {mode} | {backend} | {seconds * 1e3:.1f} | {flops / seconds:.1f} | "
            f"{info['peak_additional_bytes'] / 2**20:.1f} | {speedup} | {memory} |"
        )
    return lines


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)
    benchmarks = getattr(session, "benchmarks", None) or []
    lines = op_summary(benchmarks)
    if len(lines) > 4:
        terminalreporter.write_sep("=", "window_cross_attention: fused backends vs the PyTorch reference")
        for line in lines:
            terminalreporter.write_line(line)
