"""The native ops ``torch.ops.xmorpher_kernels.window_attention_{forward,backward}``.

Their schema and CPU/CUDA kernels live in the C++ extension ``xmorpher_kernels._C`` (csrc/).
This module loads it without ever failing the package import, and registers from Python what
``torch.compile`` and autograd need: fake (meta) implementations of both ops, and the autograd
formula of the forward op in terms of the backward op.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._checks import AttentionArgs
from ._op_glue import call_forward_op, register_window_attention_autograd

try:
    from . import _C  # noqa: F401  (registers the ops)

    HAS_NATIVE = True
    NATIVE_IMPORT_ERROR: Optional[str] = None
except ImportError as error:  # built without the extension, or against another torch
    _C = None
    HAS_NATIVE = False
    NATIVE_IMPORT_ERROR = f"the C++ extension xmorpher_kernels._C could not be loaded ({error})"

HAS_CUDA_KERNELS = HAS_NATIVE and _C.compiled_with_cuda()


def cuda_auto_demotion(args: AttentionArgs) -> Optional[str]:
    """Why backend="auto" should try Triton before the CUDA backend for this call, or None. From
    the H200 measurements (benchmarks/results/): the generic CUDA-core kernels (fp32, head_dim not
    a multiple of 16, windows of more than 8 queries) are about 5x slower than Triton, and the
    tensor-core backward's deterministic schedule (27 colour passes) 2.5x slower."""
    window = args.geometry.window
    if args.query.dtype not in (torch.float16, torch.bfloat16):
        return "fp32 runs on the generic CUDA kernels"
    if args.head_dim % 16 != 0:
        return "head_dim is not a multiple of 16"
    if window[0] * window[1] * window[2] > 8:
        return "windows of more than 8 queries"
    inputs = (args.query, args.key, args.value, args.rel_pos_bias, args.pad_key, args.pad_value)
    backward_follows = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    if backward_follows and torch.are_deterministic_algorithms_enabled():
        return "the deterministic tensor-core backward is slower than Triton's"
    return None


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The log-sum-exp the forward keeps is in the accumulation type."""
    return torch.float64 if dtype == torch.float64 else torch.float32


if HAS_NATIVE:
    _forward_op = torch.ops.xmorpher_kernels.window_attention_forward
    _backward_op = torch.ops.xmorpher_kernels.window_attention_backward

    @torch.library.register_fake("xmorpher_kernels::window_attention_forward")
    def _forward_fake(query, key, value, window_size, search_size, scale, rel_pos_bias, pad_key, pad_value):
        batch, depth, height, width, heads, _ = query.shape
        out = query.new_empty(query.shape)
        lse = query.new_empty((batch, heads, depth, height, width), dtype=lse_dtype(query.dtype))
        return out, lse

    @torch.library.register_fake("xmorpher_kernels::window_attention_backward")
    def _backward_fake(grad_out, query, key, value, out, lse, window_size, search_size, scale,
                       rel_pos_bias, pad_key, pad_value):
        empty = query.new_empty((0,))
        return (
            query.new_empty(query.shape),
            query.new_empty(query.shape),
            query.new_empty(query.shape),
            empty if rel_pos_bias is None else rel_pos_bias.new_empty(rel_pos_bias.shape),
            empty if pad_key is None else pad_key.new_empty(pad_key.shape),
            empty if pad_value is None else pad_value.new_empty(pad_value.shape),
        )

    register_window_attention_autograd("xmorpher_kernels::window_attention_forward", _backward_op)


def native_window_attention(args: AttentionArgs) -> torch.Tensor:
    """Run the native op (CPU or CUDA kernels, by the tensors' device) on validated arguments."""
    return call_forward_op(_forward_op, args)
