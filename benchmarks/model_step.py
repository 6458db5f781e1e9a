"""Figures of one XMorpher training step with the op's fused CPU backend vs its reference backend.

A training step is: forward of the full (paper-configuration) model in training mode, local NCC
(window 9) between the fixed and the warped moving volume plus a diffusion regulariser, backward.

* Bytes saved for backward: every tensor autograd saves goes through
  ``torch.autograd.graph.saved_tensors_hooks``; bytes are summed over distinct storages (a view
  and its base count once). At the paper's 144 x 144 x 128 the reference needs ~10 GB, so the
  step runs under ``FakeTensorMode``: shapes and autograd are real, no data is allocated, and
  the count is the same as a real run's (``check_fake_matches_real`` verifies this at a small
  size). The parameters autograd saves (weights of linear layers, ~59 MB, the same at every
  input size) are counted from a small real run and reported apart from the activations.
* Step time: wall-clock seconds of a real step at a size that fits a short benchmark.

Print the figures with ``python benchmarks/model_step.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import time
from typing import Dict, Sequence

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from xmorpher import XMorpher, diffusion_loss, ncc_loss, warp

PAPER_SIZE = (144, 144, 128)
BACKENDS = ("cpu", "reference")
DIFFUSION_WEIGHT = 1.0


def training_step(model: torch.nn.Module, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
    """Forward, NCC + diffusion loss, backward; returns the loss."""
    flow = model(moving, fixed)
    loss = ncc_loss(fixed, warp(moving, flow)) + DIFFUSION_WEIGHT * diffusion_loss(flow)
    loss.backward()
    return loss


def _saved_storage_bytes(backend: str, size: Sequence[int], batch: int, fake: bool) -> Dict[str, int]:
    torch.manual_seed(0)
    model = XMorpher(attention_backend=backend).train()
    parameter_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: Dict[int, int] = {}
    saved_parameters: Dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if not fake and storage.data_ptr() in parameter_storages:
            saved_parameters[storage.data_ptr()] = storage.nbytes()
        else:
            saved[storage._cdata] = storage.nbytes()
        return tensor

    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
    with mode:
        moving = torch.rand(batch, 1, *size)
        fixed = torch.rand(batch, 1, *size)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            training_step(model, moving, fixed)
    return {"total": sum(saved.values()) + sum(saved_parameters.values()), "parameters": sum(saved_parameters.values())}


def saved_bytes_for_backward(backend: str, size: Sequence[int] = PAPER_SIZE, batch: int = 1) -> Dict[str, int]:
    """Bytes autograd saves in one training step: ``total``, ``parameters``, ``activations``.

    ``total`` is counted under FakeTensorMode (no memory needed); ``parameters`` from a real
    step at 16^3 (the saved weights do not depend on the input size).
    """
    total = _saved_storage_bytes(backend, size, batch, fake=True)["total"]
    parameters = _saved_storage_bytes(backend, (16, 16, 16), 1, fake=False)["parameters"]
    return {"total": total, "parameters": parameters, "activations": total - parameters}


def check_fake_matches_real(backend: str, size: Sequence[int] = (40, 36, 44)) -> Dict[str, int]:
    """Total saved bytes of a real and a fake step at a small size (they must be equal)."""
    return {
        "real": _saved_storage_bytes(backend, size, 1, fake=False)["total"],
        "fake": _saved_storage_bytes(backend, size, 1, fake=True)["total"],
    }


def make_step(backend: str, size: Sequence[int], batch: int = 1):
    """A zero-argument closure running one real training step (for timing)."""
    torch.manual_seed(0)
    model = XMorpher(attention_backend=backend).train()
    moving = torch.rand(batch, 1, *size)
    fixed = torch.rand(batch, 1, *size)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        training_step(model, moving, fixed)

    return step


def step_seconds(backend: str, size: Sequence[int], repeats: int = 3) -> float:
    """Median wall-clock seconds of a training step after one warm-up step."""
    step = make_step(backend, size)
    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time-size", type=int, nargs=3, default=(64, 64, 64), help="volume of the timed step")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"machine: {_cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    bytes_by_backend = {b: saved_bytes_for_backward(b) for b in BACKENDS}
    size = "x".join(map(str, PAPER_SIZE))
    print(f"\nbytes saved for backward, XMorpher (paper config), {size}, batch 1, fp32, training step:")
    print("| backend | total | activations | parameters |\n|---|---|---|---|")
    for backend, figures in bytes_by_backend.items():
        row = " | ".join(f"{figures[k] / 2**30:.3f} GiB" for k in ("total", "activations", "parameters"))
        print(f"| {backend} | {row} |")
    ratio = bytes_by_backend["cpu"]["activations"] / bytes_by_backend["reference"]["activations"]
    total_ratio = bytes_by_backend["cpu"]["total"] / bytes_by_backend["reference"]["total"]
    print(f"cpu / reference: {ratio:.3f} (activations), {total_ratio:.3f} (total)")
    timed = "x".join(map(str, args.time_size))
    seconds = {b: step_seconds(b, args.time_size, args.repeats) for b in BACKENDS}
    print(f"\ntraining step time, {timed}, batch 1, fp32 (median of {args.repeats}):")
    for backend, value in seconds.items():
        print(f"| {backend} | {value:.3f} s |")
    print(f"speed-up cpu vs reference: {seconds['reference'] / seconds['cpu']:.2f}x")


if __name__ == "__main__":
    main()
