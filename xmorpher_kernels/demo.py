"""Demo: run window_cross_attention on a random volume of XMorpher's first stage with the fastest
backend for this machine, check it against the plain PyTorch reference, and print both timings.

    python -m xmorpher_kernels.demo [--device cuda] [--dtype bfloat16] [--backward]
"""

from __future__ import annotations

import argparse
import time

import torch

from . import available_backends, window_cross_attention
from ._backends import select_backend
from ._checks import check_arguments

SHAPE = (2, 36, 36, 32, 3, 16)  # B, D, H, W, heads, head_dim: a 144 x 144 x 128 input in 4^3 patches


def _time(fn, repeats: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    parser.add_argument("--backward", action="store_true", help="time forward+backward instead of forward")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)

    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(SHAPE, generator=generator).to(args.device, dtype).requires_grad_(args.backward) for _ in range(3))
    chosen = select_backend("auto", check_arguments(q, k, v, 2, 6, None, None, "mask", None, None)).name
    print("backends:", ", ".join(f"{n} ({'yes' if s.available else 'no: ' + s.reason})" for n, s in available_backends().items()))
    print(f"input {tuple(SHAPE)} {args.dtype} on {args.device}, window 2, search 6; auto picks '{chosen}'")

    def run(backend: str):
        def call():
            with torch.set_grad_enabled(args.backward):
                out = window_cross_attention(q, k, v, 2, 6, backend=backend)
                if args.backward:
                    out.backward(torch.ones_like(out))
            return out
        return call

    with torch.no_grad():
        fused = window_cross_attention(q, k, v, 2, 6, backend=chosen).float()
        reference = window_cross_attention(q, k, v, 2, 6, backend="reference").float()
    error = (fused - reference).abs().max().item()
    print(f"max |{chosen} - reference| = {error:.2e}")
    tolerance = {torch.float64: 1e-10, torch.float32: 1e-4}.get(dtype, 5e-2)
    if not error <= tolerance:
        raise SystemExit(f"mismatch: {error:.2e} exceeds {tolerance:.0e}")

    what = "forward+backward" if args.backward else "forward"
    t_fused, t_ref = _time(run(chosen)), _time(run("reference"))
    print(f"{what}: {chosen} {t_fused * 1e3:.1f} ms, reference {t_ref * 1e3:.1f} ms, speed-up {t_ref / t_fused:.1f}x")


if __name__ == "__main__":
    main()
