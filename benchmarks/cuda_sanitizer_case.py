"""A small forward + backward on the CUDA backend, for compute-sanitizer.

    compute-sanitizer --tool memcheck  python benchmarks/cuda_sanitizer_case.py
    compute-sanitizer --tool racecheck python benchmarks/cuda_sanitizer_case.py

Covers every CUDA kernel of the backend on a volume with partial windows: the tensor-core
forward (fp16, bf16; aligned and misaligned rows), the generic forward (fp32, odd head_dim), the
query-side backward with atomics and the deterministic key-side backward, with bias and both
paddings; all of it once with each generation of tensor-core kernels, "classic" and "brick"
(the brick forward, query pass, key pass and reduction). Exits non-zero if the backend is missing
or a result is not finite.
"""

from __future__ import annotations

import sys

import torch

from xmorpher_kernels import available_backends, window_cross_attention
from xmorpher_kernels._extension import _C


def run_case(dtype: torch.dtype, head_dim: int, padding: str, deterministic: bool, misaligned: bool) -> None:
    generator = torch.Generator().manual_seed(0)
    shape = (1, 3, 5, 7, 2, head_dim)

    def rand(*size: int) -> torch.Tensor:
        t = torch.randn(*size, generator=generator).to(dtype=dtype, device="cuda")
        if misaligned:  # unit-stride last dim, rows not 16-byte aligned
            base = torch.zeros(*size[:-1], size[-1] + 1, dtype=dtype, device="cuda")
            base[..., 1:].copy_(t)
            t = base[..., 1:]
        return t.detach().requires_grad_(True)

    q, k, v = rand(*shape), rand(*shape), rand(*shape)
    bias = rand(2, 5, 5, 5)  # window 2, search 4: 4 + 2 - 1 offsets per axis
    options = {"rel_pos_bias": bias, "padding": padding}
    if padding == "constant":
        options["pad_key"] = rand(2, head_dim)
        options["pad_value"] = rand(2, head_dim)
    torch.use_deterministic_algorithms(deterministic)
    out = window_cross_attention(q, k, v, 2, 4, backend="cuda", **options)
    out.backward(torch.ones_like(out))
    torch.cuda.synchronize()
    tensors = [out, q.grad, k.grad, v.grad, bias.grad] + ([options["pad_key"].grad] if padding == "constant" else [])
    if not all(torch.isfinite(t).all() for t in tensors):
        raise SystemExit(f"non-finite result: {dtype} head_dim={head_dim} {padding} deterministic={deterministic}")


def main() -> int:
    status = available_backends()["cuda"]
    if not status.available or not torch.cuda.is_available():
        print(f"cuda backend unavailable: {status.reason or 'no GPU'}", file=sys.stderr)
        return 1
    for generation in ("classic", "brick"):
        _C.set_cuda_kernels(generation)
        for dtype, head_dim in ((torch.float16, 16), (torch.bfloat16, 32), (torch.float32, 16), (torch.float16, 5)):
            for padding in ("mask", "constant"):
                for deterministic in (False, True):
                    run_case(dtype, head_dim, padding, deterministic, misaligned=False)
        run_case(torch.bfloat16, 16, "constant", False, misaligned=True)
    torch.use_deterministic_algorithms(False)
    print("cuda_sanitizer_case: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
