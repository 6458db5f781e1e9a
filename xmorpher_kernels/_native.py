"""The cpu and cuda backends: ``torch.ops.xmorpher_kernels.window_attention_forward``, whose CPU
and CUDA kernels live in the C++ extension (csrc/cpu, csrc/cuda).

What each runs (dtypes, the largest head_dim, which calls the CUDA tensor-core kernels cover) is
declared by the C++ code beside the kernels and read from the extension here, never restated.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ._checks import AttentionArgs
from ._extension import EXTENSION_ERROR, _C

HAS_CUDA_KERNELS = _C is not None and _C.compiled_with_cuda()
CPU_DTYPES: Tuple[torch.dtype, ...] = tuple(_C.cpu_dtypes()) if _C is not None else ()
CUDA_DTYPES: Tuple[torch.dtype, ...] = tuple(_C.cuda_dtypes()) if HAS_CUDA_KERNELS else ()
FORWARD_OP = torch.ops.xmorpher_kernels.window_attention_forward.default if _C is not None else None


def cpu_unavailable() -> Optional[str]:
    return EXTENSION_ERROR


def cuda_unavailable() -> Optional[str]:
    if _C is None:
        return EXTENSION_ERROR
    if not HAS_CUDA_KERNELS:
        return "the CUDA kernels were not compiled (torch without CUDA, or nvcc missing at build time)"
    return None


def cuda_refuses(args: AttentionArgs) -> Optional[str]:
    """Why the CUDA kernels cannot run this call, or None."""
    largest = _C.cuda_max_head_dim()
    return f"it supports head_dim <= {largest}, got {args.head_dim}" if args.head_dim > largest else None


def cuda_auto_demotion(args: AttentionArgs) -> Optional[str]:
    """Why backend="auto" should try Triton before the CUDA backend for this call, or None. From
    the H200 measurements (benchmarks/results/): the generic CUDA-core kernels (every call the
    tensor-core kernels do not cover) are about 5x slower than Triton, and the classic tensor-core
    backward's deterministic schedule (27 colour passes) 2.5x slower. The brick kernels (opt-in)
    are deterministic without a separate schedule."""
    g = args.geometry
    sizes = (list(g.volume), list(g.window), list(g.search), args.head_dim, args.query.dtype)
    if not _C.cuda_tensor_cores_cover(*sizes):
        return "the call runs on the generic CUDA-core kernels"
    inputs = (args.query, args.key, args.value, args.rel_pos_bias, args.pad_key, args.pad_value)
    backward_follows = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    brick = _C.cuda_kernels() == "brick" and _C.brick_not_covered(*sizes) is None
    if backward_follows and torch.are_deterministic_algorithms_enabled() and not brick:
        return "the deterministic tensor-core backward is slower than Triton's"
    return None
