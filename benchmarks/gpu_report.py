"""GPU benchmark of window_cross_attention: one table of every backend at the paper's first two
stages, the peer every user has (FlexAttention) and a training step of the paper's network.

Run by benchmarks/run_gpu.sh (after the extension is built); prints the table and writes it, named
after the card, under benchmarks/results/. Per backend, stage and dtype: forward and
forward+backward medians of CUDA-event timings, eager and (fused backends) CUDA-graph replay
side by side, peak memory above the inputs, ratio to the reference, fraction of the roofline floor
max(bytes read and written once / bandwidth, FLOPs / matmul rate), the prediction of
``benchmarks/cost_model.py`` when that module exists, and the commit measured. FlexAttention's
rows come from ``flex_attention_rows.py``, which run_gpu.sh starts first so that its compile is
done by the time the table reaches it. The model rows time one training step of
``xmorpher.XMorpher()`` (forward, NCC + diffusion loss, backward, Adam) at 144 x 144 x 128, batch
1, bf16 autocast, per attention backend, each in its own process. A part that fails or runs out
of time shows why in its row instead of stopping the table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH_DIR)
from gpu_timing import (STAGES, WINDOW, SEARCH, capture_graph, error_text, make_inputs, median_ms,  # noqa: E402
                        peak_mb, write_json_atomically)

MODEL_SIZE = (144, 144, 128)
MODEL_BACKENDS = ("reference", "triton", "cuda")
FUSED = ("triton", "cuda")


@dataclass
class Row:
    stage: str
    dtype: str
    backend: str
    forward_ms: Optional[float] = None
    forward_graph_ms: Optional[float] = None
    train_ms: Optional[float] = None
    train_graph_ms: Optional[float] = None
    forward_mb: Optional[float] = None
    train_mb: Optional[float] = None
    predicted: Tuple[Optional[str], Optional[str]] = (None, None)
    error: str = ""
    note: str = ""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ------------------------------------------------------------------ ceilings and the roofline


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read plus written per second."""
    src = torch.empty(2**28, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), reps=20)
    return 2 * src.numel() * 4 / (ms * 1e-3)


def matmul_rate() -> float:
    """Dense bf16 matmul FLOP/s at 8192^3 on random data."""
    n = 8192
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    ms = median_ms(lambda: torch.mm(a, b), reps=10)
    return 2 * n**3 / (ms * 1e-3)


def valid_pairs(volume) -> int:
    """(query, in-volume key) pairs: the key box is a product, so the count factorizes by axis."""
    left = (SEARCH - WINDOW) // 2
    total = 1
    for n in volume:
        per_axis = 0
        for p in range(n):
            start = (p // WINDOW) * WINDOW - left
            per_axis += max(0, min(start + SEARCH, n) - max(start, 0))
        total *= per_axis
    return total


def roofline_floor_s(shape, dtype: torch.dtype, backward: bool, bandwidth: float, flop_rate: float) -> float:
    """Forward: read q, k, v, write out; 2 matmuls over the valid pairs. Backward adds reading
    q, k, v, out, dout and writing dq, dk, dv, and 4 matmuls (dP, dS K, dS^T Q, P^T dO)."""
    batch, depth, height, width, heads, head_dim = shape
    tensor_bytes = math.prod(shape) * torch.finfo(dtype).bits // 8
    pair_flops = 2 * batch * heads * valid_pairs((depth, height, width)) * head_dim
    bytes_moved = 4 * tensor_bytes + (8 * tensor_bytes if backward else 0)
    flops = pair_flops * (6 if backward else 2)
    return max(bytes_moved / bandwidth, flops / flop_rate)


# ------------------------------------------------------------------ the cost model, if present


def load_cost_model() -> Tuple[Optional[Callable], str]:
    """``cost_model.predict`` and a line saying what was loaded; (None, why) when absent or
    broken: a missing module leaves its columns out, an error in it never stops the table.

    The call made: ``predict(backend, shape=(B, D, H, W, heads, head_dim), dtype="bf16" | "fp16" |
    "fp32", mode="forward" | "forward+backward")`` -> milliseconds at window 2, search 6, or None
    where it has no model (the cell then shows "-").
    """
    try:
        import cost_model
    except ModuleNotFoundError as error:
        if error.name == "cost_model":
            return None, "cost model: benchmarks/cost_model.py absent (no prediction columns)"
        return None, f"cost model: import failed: {error_text(error)}"
    except Exception as error:
        return None, f"cost model: import failed: {error_text(error)}"
    predict = getattr(cost_model, "predict", None)
    if not callable(predict):
        return None, "cost model: benchmarks/cost_model.py has no predict(backend, shape, dtype, mode)"
    return predict, "cost model: 'model' columns = benchmarks/cost_model.py predict(...) in ms (SASS counts of this build)"


def predictions(predict: Optional[Callable], backend: str, shape, dtype) -> Tuple[Optional[str], Optional[str]]:
    if predict is None:
        return None, None
    short = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
    figures: List[Optional[str]] = []
    for mode in ("forward", "forward+backward"):
        try:
            predicted = predict(backend, tuple(shape), short, mode)
            figures.append(None if predicted is None else f"{float(predicted):.3f}")
        except Exception as error:  # shown in the cell, never fatal
            figures.append(f"err:{type(error).__name__}")
    return figures[0], figures[1]


# ------------------------------------------------------------------ op rows


def op_runner(backend: str, cuda_kernels: Optional[str] = None) -> Callable:
    """A call of the op; with ``cuda_kernels``, the CUDA backend's kernel generation switched to
    it for the call (and back to the default after)."""
    from xmorpher_kernels import window_cross_attention

    def run(q, k, v, bias):
        return window_cross_attention(q, k, v, WINDOW, SEARCH, rel_pos_bias=bias, backend=backend)

    if cuda_kernels is None:
        return run
    from xmorpher_kernels._extension import _C

    def run_generation(q, k, v, bias):
        previous = _C.cuda_kernels()
        _C.set_cuda_kernels(cuda_kernels)
        try:
            return run(q, k, v, bias)
        finally:
            _C.set_cuda_kernels(previous)

    return run_generation


def measure(row: Row, run: Callable, shape, dtype, deterministic: bool, graphs: bool) -> Row:
    """Eager medians and peaks, then (``graphs``) the same calls captured and replayed; the
    forward+backward graph has the gradients of q, k, v and the bias as its outputs."""
    q, k, v, bias, grad_out = make_inputs(shape, dtype)
    leaves = (q, k, v, bias)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        def forward():
            with torch.no_grad():
                return run(q, k, v, bias)

        def train():
            return torch.autograd.grad(run(q, k, v, bias), leaves, grad_out)

        row.forward_ms, row.train_ms = median_ms(forward), median_ms(train)
        row.forward_mb, row.train_mb = peak_mb(forward), peak_mb(train)
        if graphs:
            for attribute, call in (("forward_graph_ms", forward), ("train_graph_ms", train)):
                try:
                    graph = capture_graph(call)
                    setattr(row, attribute, median_ms(graph.replay))
                    del graph
                except Exception as error:
                    row.note += f"{attribute.split('_')[0]} graph: {error_text(error)}; "
                    torch.cuda.synchronize()
    except Exception as error:  # one failing backend must not stop the table
        row.error = error_text(error)
    finally:
        torch.use_deterministic_algorithms(previous)
        torch.cuda.empty_cache()
    return row


def op_backends() -> Dict[str, Tuple[Optional[Callable], bool, str]]:
    """Name: (runner or None, deterministic, why it is unavailable). An unavailable fused
    backend keeps its rows, which show why: a backend never vanishes from the table."""
    from xmorpher_kernels import available_backends

    built = available_backends()
    backends: Dict[str, Tuple[Optional[Callable], bool, str]] = {"reference": (op_runner("reference"), False, "")}
    for name in FUSED:
        status = built[name]
        backends[name] = (op_runner(name), False, "") if status.available else (None, False, status.reason or "unavailable")
    # The CUDA backward has a separate deterministic schedule; Triton's is always deterministic.
    backends["cuda (deterministic)"] = (backends["cuda"][0], True, backends["cuda"][2])
    # The brick kernels (opt-in until a GPU has validated them): always deterministic; calls
    # they do not cover (fp32) run the classic kernels.
    cuda = backends["cuda"]
    backends["cuda (brick)"] = (op_runner("cuda", "brick") if cuda[0] else None, False, cuda[2])
    return backends


# ------------------------------------------------------------------ FlexAttention rows


def flex_rows(flex_dir: Optional[str], wait_s: float) -> List[Row]:
    """Asks the background FlexAttention process to time its compiled variants, waits up to
    ``wait_s`` and makes one bf16 row per stage of what it reports."""
    def row(stage: str) -> Row:
        return Row(stage, "bfloat16", "flex_attention (compiled)")

    if not flex_dir:
        return [Row(stage, "bfloat16", "flex_attention (compiled)", error="not run (no --flex-dir)") for stage in STAGES]
    paths = {name: os.path.join(flex_dir, name) for name in ("status.json", "go", "rows.json", "closed")}
    write_json_atomically(paths["go"], {"at": time.time()})
    waited_until = time.time() + wait_s
    while not os.path.exists(paths["rows.json"]) and time.time() < waited_until:
        time.sleep(0.5)
    write_json_atomically(paths["closed"], {"at": time.time()})

    def read(name: str) -> dict:
        try:
            with open(paths[name]) as handle:
                return json.load(handle)
        except (OSError, ValueError):
            return {}

    status, timings = read("status.json"), read("rows.json")
    rows = []
    for stage in STAGES:
        result = row(stage)
        notes, errors = [], []
        for mode, time_attr, mb_attr in (("forward", "forward_ms", "forward_mb"), ("forward+backward", "train_ms", "train_mb")):
            key = f"{stage}|{mode}"
            state, timing = status.get(key, {}), timings.get(key, {})
            if "ms" in timing:
                setattr(result, time_attr, timing["ms"])
                setattr(result, mb_attr, timing["mb"])
                notes.append(f"{mode} compiled in {state.get('compile_s', '?')} s")
                if "rel_error_vs_reference" in timing:
                    notes.append(f"rel. error vs reference {timing['rel_error_vs_reference']:.1e}")
            elif timing.get("error"):
                errors.append(f"{mode}: {timing['error']}")
            elif state.get("state") == "compiling":
                errors.append(f"{mode}: still compiling (since {state.get('since_s')} s) when the table moved on")
            elif state.get("state") in ("failed", "cut"):
                errors.append(f"{mode}: {state['state']}: {state.get('error', '')}")
            elif state.get("state") == "compiled":
                errors.append(f"{mode}: compiled but not timed within {wait_s:.0f} s")
            else:
                errors.append(f"{mode}: no report from flex_attention_rows.py (see its log)")
        block_mask = next((s.get("block_mask_s") for k, s in status.items() if k.startswith(stage) and "block_mask_s" in s), None)
        if block_mask is not None:
            notes.append(f"block mask built once in {block_mask} s")
        result.note = "; ".join(notes + errors)
        if result.forward_ms is None and result.train_ms is None:
            result.error, result.note = "; ".join(errors) or "no figures", "; ".join(notes)
        rows.append(result)
    return rows


# ------------------------------------------------------------------ the model's training step


def model_step_figures(backend: str, size, steps: int = 5, warmup: int = 2) -> dict:
    """One training step of the paper's XMorpher: forward and loss under bf16 autocast,
    backward, Adam. Median step time (CUDA events) and the peak memory allocated in the timed
    steps (parameters, Adam state and activations)."""
    from model_step import DIFFUSION_WEIGHT
    from xmorpher import XMorpher, diffusion_loss, ncc_loss, warp

    torch.manual_seed(0)
    model = XMorpher(attention_backend=backend).cuda().train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    generator = torch.Generator(device="cuda").manual_seed(0)
    moving, fixed = (torch.rand(1, 1, *size, generator=generator, device="cuda") for _ in range(2))
    losses = []

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            flow = model(moving, fixed)
            loss = ncc_loss(fixed, warp(moving, flow)) + DIFFUSION_WEIGHT * diffusion_loss(flow)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())

    for _ in range(warmup):  # compilation and autotuning of the Triton kernels happen here
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    milliseconds = median_ms(step, warmup=0, reps=steps)
    return {"backend": backend, "step_ms": milliseconds, "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
            "finite": all(bool(torch.isfinite(loss)) for loss in losses),
            "parameters_m": sum(p.numel() for p in model.parameters()) / 1e6}


def print_model_steps(backends: List[str], size) -> None:
    """One JSON line per backend, printed as each finishes (the parent keeps what came out)."""
    for backend in backends:
        try:
            figures = model_step_figures(backend, size)
        except Exception as error:  # e.g. out of memory: that row says so, the next still runs
            figures = {"backend": backend, "error": error_text(error)}
        torch.cuda.empty_cache()
        print(json.dumps(figures), flush=True)


def model_rows(deadline: float, size) -> List[Row]:
    """One row per attention backend, measured in a child process (a crash there costs the
    rows not yet printed) with the time that is left."""
    label = "model " + "x".join(map(str, size))
    rows = {backend: Row(label, "bf16 autocast", backend) for backend in MODEL_BACKENDS}
    left = deadline - time.time()
    if left < 30:
        for row in rows.values():
            row.error = "skipped: time budget"
        return list(rows.values())
    command = [sys.executable, os.path.abspath(__file__), "--model-steps", ",".join(MODEL_BACKENDS),
               "--model-size", *map(str, size)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=left)
        output, ending = result.stdout, f"exit {result.returncode}: {(result.stderr.strip().splitlines() or [''])[-1][:120]}"
    except subprocess.TimeoutExpired as expired:
        output = expired.stdout.decode() if isinstance(expired.stdout, bytes) else (expired.stdout or "")
        ending = f"timed out after {left:.0f} s"
    for line in output.splitlines():
        try:
            figures = json.loads(line)
        except ValueError:
            continue
        row = rows.get(figures.get("backend"))
        if row is None:
            continue
        if "error" in figures:
            row.error = figures["error"]
            continue
        row.train_ms, row.train_mb = figures["step_ms"], figures["peak_gib"] * 1024
        row.note = (f"XMorpher training step: f+b = forward + NCC/diffusion loss + backward + Adam, f+b MB = all "
                    f"memory allocated at the peak; {figures['parameters_m']:.1f} M parameters"
                    + ("" if figures["finite"] else "; LOSS NOT FINITE"))
    for row in rows.values():
        if row.train_ms is None and not row.error:
            row.error = f"no figures ({ending})"
    return list(rows.values())


# ------------------------------------------------------------------ the table


def format_table(rows: List[Row], bandwidth: float, flop_rate: float, with_model: bool, commit: str) -> List[str]:
    def fmt(x, spec=".3f"):
        return "-" if x is None else format(x, spec)

    columns = [("stage", 18, "<"), ("dtype", 13, "<"), ("backend", 30, "<"), ("fwd ms", 8, ">"), ("fwd graph", 9, ">"),
               ("f+b ms", 8, ">"), ("f+b graph", 9, ">"), ("fwd MB", 8, ">"), ("f+b MB", 9, ">"), ("fwd x ref", 9, ">"),
               ("f+b x ref", 9, ">"), ("f+b roof", 8, ">")]
    if with_model:
        columns += [("model fwd", 9, ">"), ("model f+b", 9, ">")]
    columns += [("commit", 14, "<")]
    header = " ".join(f"{name:{align}{width}}" for name, width, align in columns)
    lines = [header, "-" * len(header)]
    for row in rows:
        reference = next((r for r in rows if r.backend == "reference" and r.stage == row.stage and r.dtype == row.dtype), None)
        lead = f"{row.stage:<18} {row.dtype:<13} {row.backend:<30}"
        if row.error:
            lines.append(f"{lead} {row.error}   [commit {commit}]")
            continue
        speedups = [None, None]
        if reference is not None and not reference.error:
            speedups = [ref / mine if ref and mine else None
                        for ref, mine in ((reference.forward_ms, row.forward_ms), (reference.train_ms, row.train_ms))]
        roof = None
        if row.stage in STAGES and row.train_ms:
            roof = roofline_floor_s(STAGES[row.stage], getattr(torch, row.dtype), True, bandwidth, flop_rate) * 1e3 / row.train_ms
        cells = [fmt(row.forward_ms), fmt(row.forward_graph_ms), fmt(row.train_ms), fmt(row.train_graph_ms),
                 fmt(row.forward_mb, ".1f"), fmt(row.train_mb, ".1f"), fmt(speedups[0], ".1f"), fmt(speedups[1], ".1f"),
                 fmt(roof, ".3f")]
        if with_model:
            cells += [row.predicted[0] or "-", row.predicted[1] or "-"]
        widths = [width for _, width, _ in columns[3:-1]]
        lines.append(lead + " " + " ".join(f"{cell:>{width}}" for cell, width in zip(cells, widths)) + f" {commit:<14}")
        if row.note:
            lines.append(f"{'':<18} {'':<13}   note: {row.note}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default=os.path.join(BENCH_DIR, "results"))
    parser.add_argument("--budget-s", type=float, default=300.0, help="time for the whole table; parts past it are skipped")
    parser.add_argument("--flex-dir", help="folder shared with flex_attention_rows.py (started earlier)")
    parser.add_argument("--flex-wait-s", type=float, default=90.0, help="how long to wait for its rows")
    parser.add_argument("--commit", help="label of the commit measured (default: benchmarks/run_stamp.py label)")
    parser.add_argument("--profile", metavar="PATH", help="also write a per-kernel CUDA time table of the fused "
                        "backends (first stage, bf16, forward+backward) to PATH")
    parser.add_argument("--model-size", type=int, nargs=3, default=MODEL_SIZE)
    parser.add_argument("--model-steps", metavar="BACKENDS", help=argparse.SUPPRESS)  # the model rows' child process
    args = parser.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    if args.model_steps:
        print_model_steps(args.model_steps.split(","), tuple(args.model_size))
        return
    started = time.time()
    deadline = started + args.budget_s
    if args.commit is None:
        from run_stamp import commit_label

        args.commit = commit_label()

    card = torch.cuda.get_device_name()
    bandwidth, flop_rate = copy_bandwidth(), matmul_rate()
    predict, cost_model_line = load_cost_model()
    backends = op_backends()
    rows: List[Row] = []

    def progress(new_rows: List[Row]) -> None:
        """Each row as soon as it is measured: a run cut short still shows what finished."""
        for line in format_table(new_rows, bandwidth, flop_rate, predict is not None, args.commit)[2:]:
            print(f"[{time.time() - started:.0f} s] {line}", flush=True)

    def op_rows(stage: str, dtype: torch.dtype, reserve_s: float, skip: Tuple[str, ...] = ()) -> None:
        shape = STAGES[stage]
        for name, (run, deterministic, unavailable) in backends.items():
            if name in skip:
                continue
            row = Row(stage, dtype_name(dtype), name)
            if run is None:
                row.error = f"BACKEND UNAVAILABLE: {unavailable}"
            elif time.time() > deadline - reserve_s:
                row.error = "skipped: time budget"
            else:
                measure(row, run, shape, dtype, deterministic, graphs=name != "reference")
                if name.split(" ")[0] in FUSED:
                    model = "brick" if name == "cuda (brick)" else name.split(" ")[0]
                    row.predicted = predictions(predict, model, shape, dtype)
            rows.append(row)
            progress([row])

    # Most wanted first: bf16 at both stages, FlexAttention, the model; fp32 with what is left
    # (there the CUDA backend runs its generic kernels: no separate deterministic row).
    for stage in STAGES:
        op_rows(stage, torch.bfloat16, reserve_s=10)
    for part in (flex_rows(args.flex_dir, min(args.flex_wait_s, max(0.0, deadline - time.time() - 90))),
                 model_rows(deadline - 30, tuple(args.model_size))):
        rows.extend(part)
        progress(part)
    for stage in STAGES:
        op_rows(stage, torch.float32, reserve_s=20, skip=("cuda (deterministic)", "cuda (brick)"))
    order = {stage: i for i, stage in enumerate(STAGES)}
    rows.sort(key=lambda r: (order.get(r.stage, len(order)), r.dtype != "bfloat16"))  # stable: backends keep their order

    lines = [
        f"window_cross_attention GPU benchmark, {datetime.datetime.now().isoformat(timespec='seconds')}, commit {args.commit}",
        f"card: {card}; torch {torch.__version__}; triton {_triton_version()}; python {platform.python_version()}",
        f"copy bandwidth {bandwidth / 1e12:.2f} TB/s; bf16 matmul {flop_rate / 1e12:.0f} TFLOP/s",
        "window 2, search 6, rel_pos_bias on, padding='mask'. Times: median of 15 CUDA-event timings; 'graph' = the same",
        "call captured in a CUDA graph and replayed (f+b graph: the gradients are the graph's outputs). 'x ref' = reference",
        "eager time / this eager time; 'f+b roof' = roofline floor / f+b eager time. MB = peak allocation above the inputs.",
        cost_model_line,
        "",
        *format_table(rows, bandwidth, flop_rate, predict is not None, args.commit),
    ]
    report = "\n".join(lines)
    print("\n" + report, flush=True)
    os.makedirs(args.out_dir, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", card).strip("-").lower()
    path = os.path.join(args.out_dir, f"{slug}-{datetime.date.today().isoformat()}.txt")
    with open(path, "w") as handle:
        handle.write(report + "\n")
    print(f"\nwritten to {path}")
    if args.profile and time.time() < deadline:
        write_kernel_profile(args.profile, {name: (run, deterministic) for name, (run, deterministic, _) in backends.items()
                                            if name != "reference" and run is not None})


def write_kernel_profile(path: str, backends: Dict[str, Tuple[Callable, bool]]) -> None:
    """Where each backend's forward+backward time goes, kernel by kernel (first stage, bf16)."""
    from torch.profiler import ProfilerActivity, profile

    stage, shape = next(iter(STAGES.items()))
    sections = []
    for name, (run, deterministic) in backends.items():
        q, k, v, bias, grad_out = make_inputs(shape, torch.bfloat16)
        previous = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(deterministic)
        try:
            torch.autograd.grad(run(q, k, v, bias), (q, k, v, bias), grad_out)  # compiled and tuned outside
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    torch.autograd.grad(run(q, k, v, bias), (q, k, v, bias), grad_out)
                torch.cuda.synchronize()
            table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=70)
        except Exception as error:
            table = error_text(error)
        finally:
            torch.use_deterministic_algorithms(previous)
        sections.append(f"== {name}, {stage}, bf16, 5 x forward+backward\n{table}")
    with open(path, "w") as handle:
        handle.write("\n\n".join(sections) + "\n")
    print(f"kernel profile written to {path}")


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "not installed"


if __name__ == "__main__":
    main()
