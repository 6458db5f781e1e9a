"""Benchmark session set-up: which xmorpher_kernels is measured, a loud stop when a built backend
cannot load, and the summary tables printed at the end (each with the machine it ran on).

Which copy is measured. ``python -m pytest benchmarks/`` from a clone puts the clone's root on
``sys.path``, so ``import xmorpher_kernels`` finds the source tree, which has no compiled
extension unless it was built in place: the fused backends would silently vanish from the
tables. So before any benchmark imports the package: an uncompiled source tree gives way to an
installed copy when there is one (the root leaves ``sys.path``); a source tree built in place is
used when nothing else is importable; with neither, the session stops and says what to run.
The header names the copy that is measured.

Quick mode (``XK_BENCH_QUICK=1``, what CI runs): small problems, few rounds, no memory
measurements in subprocesses; the figures only show that every benchmark still runs.
"""

from __future__ import annotations

import glob
import importlib.machinery
import os
import platform
import random
import sys
from typing import List, Optional

import pytest
import torch

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH_DIR)
sys.path.insert(0, BENCH_DIR)  # the shared problem definitions (op_problems, model_step)

from op_problems import QUICK  # noqa: E402


PACKAGE_NOTE = pytest.StashKey[str]()


def _is_root(entry: str) -> bool:
    return os.path.realpath(entry or os.getcwd()) == os.path.realpath(ROOT)


def _extension_files(package_dir: str) -> List[str]:
    return glob.glob(os.path.join(package_dir, "_C*.so")) + glob.glob(os.path.join(package_dir, "_C*.pyd"))


def choose_package_copy() -> str:
    """Fix ``sys.path`` so that the package imported next is a compiled one; say which it is.

    Raises ``pytest.UsageError`` when no compiled copy can be imported, or when an uncompiled
    source tree was imported before this ran (too late to switch).
    """
    source_dir = os.path.join(ROOT, "xmorpher_kernels")
    if not os.path.isdir(source_dir):  # the benchmarks were copied away from their tree
        return "xmorpher_kernels: whichever copy Python imports"
    source_built = bool(_extension_files(source_dir))
    others = [entry for entry in sys.path if not _is_root(entry)]
    installed = importlib.machinery.PathFinder.find_spec("xmorpher_kernels", others)
    installed_dir = os.path.dirname(installed.origin) if installed and installed.origin else None
    if installed_dir and os.path.realpath(installed_dir) == os.path.realpath(source_dir):
        installed_dir = None  # an editable install points at the source tree itself
    loaded = sys.modules.get("xmorpher_kernels")
    if loaded is not None:
        loaded_dir = os.path.dirname(os.path.abspath(loaded.__file__))
        if not _extension_files(loaded_dir) and installed_dir:
            raise pytest.UsageError(
                f"xmorpher_kernels was imported from {loaded_dir} (no compiled extension) before the "
                f"benchmarks' conftest could prefer the installed copy in {installed_dir}; run "
                f"`pytest {BENCH_DIR}` or run from outside the source tree")
        return f"xmorpher_kernels: {loaded_dir} (imported before the benchmarks' set-up)"
    root_on_path = any(_is_root(entry) for entry in sys.path)
    if root_on_path and not source_built:
        if installed_dir is None:
            raise pytest.UsageError(
                f"the source tree {ROOT} has no compiled extension and no installed xmorpher_kernels "
                "was found: run `pip install --no-build-isolation .` (or `python setup.py build_ext "
                "--inplace` for an in-place build) first")
        sys.path[:] = others
        return f"xmorpher_kernels: installed copy {installed_dir} (the uncompiled source tree {ROOT} was taken off sys.path)"
    if not root_on_path and installed_dir is None:
        if not source_built:
            raise pytest.UsageError(
                "xmorpher_kernels is neither installed nor built in place: run `pip install "
                "--no-build-isolation .` (or `python setup.py build_ext --inplace`) first")
        sys.path.insert(0, ROOT)
        return f"xmorpher_kernels: in-place build in {source_dir}"
    if root_on_path:
        return f"xmorpher_kernels: in-place build in {source_dir}"
    note = " (the source tree's in-place build is not what is measured here)" if source_built else ""
    return f"xmorpher_kernels: installed copy {installed_dir}{note}"


def _needs_cuda_runtime(extension: str) -> bool:
    """Whether the extension links CUDA libraries, i.e. was compiled with the CUDA kernels."""
    with open(extension, "rb") as binary:
        data = binary.read()
    return b"libc10_cuda.so" in data or b"libcudart.so" in data


def built_backend_problems(statuses, package_dir: str, gpu: bool, triton_installed: bool) -> List[str]:
    """Backends that were built (or are installed) but report themselves unavailable."""
    problems = []
    extensions = _extension_files(package_dir)
    if not extensions:
        problems.append(f"the C++ extension is missing from {package_dir} (the package was installed without it)")
    elif "cpu" in statuses and not statuses["cpu"].available:
        problems.append(f"backend cpu was built ({extensions[0]}) but cannot load: {statuses['cpu'].reason}")
    if extensions and "cuda" in statuses and not statuses["cuda"].available and _needs_cuda_runtime(extensions[0]):
        problems.append(f"backend cuda was built ({extensions[0]}) but cannot load: {statuses['cuda'].reason}")
    if gpu and triton_installed and "triton" in statuses and not statuses["triton"].available:
        problems.append(f"Triton is installed but backend triton cannot load: {statuses['triton'].reason}")
    return problems


def pytest_configure(config):
    """Before collection (when the benchmark modules import the package): choose the copy, then
    stop loudly if a backend it was built with cannot load."""
    import importlib.util

    config.stash[PACKAGE_NOTE] = choose_package_copy()
    import xmorpher_kernels

    statuses = xmorpher_kernels.available_backends()
    package_dir = os.path.dirname(os.path.abspath(xmorpher_kernels.__file__))
    problems = built_backend_problems(statuses, package_dir, torch.cuda.is_available(),
                                      importlib.util.find_spec("triton") is not None)
    if problems:
        raise pytest.UsageError("benchmarks stopped, a built backend cannot load:\n  " + "\n  ".join(problems))


def pytest_report_header(config):
    import xmorpher_kernels

    backends = ", ".join(name for name, status in xmorpher_kernels.available_backends().items() if status.available)
    mode = "quick (XK_BENCH_QUICK=1: small problems, few rounds, no memory subprocesses)" if QUICK else "full"
    return [config.stash.get(PACKAGE_NOTE, ""), f"backends available: {backends}; benchmark mode: {mode}"]


@pytest.fixture
def seed() -> int:
    """A fresh seed for the few correctness checks here; XK_TEST_SEED replays one."""
    value = int(os.environ.get("XK_TEST_SEED", random.SystemRandom().randrange(2**31)))
    print(f"seed={value} (replay with XK_TEST_SEED={value})")
    return value


def machine_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line() -> str:
    return (f"Machine: {machine_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads{' (quick mode)' if QUICK else ''}")


def op_summary(benchmarks) -> List[str]:
    """Markdown rows: time, GFLOP/s, peak additional memory and ratios against the reference."""
    rows = {}
    for bench in benchmarks:
        info = bench.extra_info
        if info.get("kind") not in ("op", "matmul"):
            continue
        rows[(info["stage"], info["mode"], info["backend"])] = (bench.stats.min, info)
    if not rows:
        return []
    lines = [
        machine_line(),
        "",
        "| stage | mode | backend | time (ms) | GFLOP/s | peak extra memory (MiB) | speed-up vs reference | memory vs reference |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (stage, mode, backend), (seconds, info) in sorted(rows.items()):
        ref = rows.get((stage, mode, "reference"))
        flops = info["forward_gflop"] * (3 if mode == "forward+backward" and info["kind"] == "op" else 1)
        speedup = f"{ref[0] / seconds:.1f}x" if ref else "-"
        peak, ref_peak = info.get("peak_additional_bytes"), ref[1].get("peak_additional_bytes") if ref else None
        memory = f"{peak / ref_peak * 100:.1f}%" if peak is not None and ref_peak else "-"
        peak_mib = "-" if peak is None else f"{peak / 2**20:.1f}"
        lines.append(
            f"| {stage} | {mode} | {backend} | {seconds * 1e3:.1f} | {flops / seconds:.1f} | "
            f"{peak_mib} | {speedup} | {memory} |"
        )
    return lines


# The targets for the op's per-call cost against SDPA of the same size (this file's
# overhead summary reports whether they are met; timings are never asserted).
OVERHEAD_TARGETS = {"forward": 3.0, "forward+backward": 1.5}


def overhead_summary(benchmarks) -> List[str]:
    """Markdown rows: median microseconds per call and the ratio to SDPA of the same mode."""
    rows = {}
    for bench in benchmarks:
        info = bench.extra_info
        if info.get("kind") == "overhead":
            rows[(info["mode"], info["backend"])] = (bench.stats.median, bench.stats.rounds * bench.iterations)
    if not rows:
        return []
    lines = [
        machine_line(),
        "",
        "| mode | call | median per call (us) | x SDPA | calls timed | target |",
        "|---|---|---|---|---|---|",
    ]
    order = {"sdpa": 0, "auto": 1}
    for (mode, backend), (seconds, calls) in sorted(rows.items(), key=lambda kv: (kv[0][0], order.get(kv[0][1], 2), kv[0][1])):
        sdpa = rows.get((mode, "sdpa"))
        ratio: Optional[float] = seconds / sdpa[0] if sdpa and backend != "sdpa" else None
        target = ""
        if backend == "auto" and ratio is not None:
            limit = OVERHEAD_TARGETS[mode]
            target = f"<= {limit:g}x: {'met' if ratio <= limit else f'missed by {ratio / limit:.2f}x'}"
        name = "scaled_dot_product_attention" if backend == "sdpa" else f'backend="{backend}"'
        lines.append(f"| {mode} | {name} | {seconds * 1e6:.1f} | {'-' if ratio is None else f'{ratio:.2f}x'} | {calls} | {target} |")
    return lines


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)
    benchmarks = getattr(session, "benchmarks", None) or []
    for title, lines in (
        ("window_cross_attention: fused backends vs the PyTorch reference", op_summary(benchmarks)),
        ("window_cross_attention per-call cost on a 1x2x2x2 volume vs SDPA of 8 tokens", overhead_summary(benchmarks)),
    ):
        if lines:
            terminalreporter.write_sep("=", title)
            for line in lines:
                terminalreporter.write_line(line)
