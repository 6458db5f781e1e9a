"""The C++ extension ``xmorpher_kernels._C`` and the one place the ops' fake implementations live.

The extension defines the four ops ``torch.ops.xmorpher_kernels.{,triton_}window_attention_
{forward,backward}`` (schemas: csrc/window_attention.cpp), the native CPU/CUDA kernels of the
first family and the C++ autograd of both forward ops (csrc/autograd.cpp); the Triton backend
registers its kernels for the second family (``_triton.py``). This module loads it without ever
failing the package import, and registers the fake (meta) implementations ``torch.compile`` and
``opcheck`` need: the same shapes for both families.
"""

from __future__ import annotations

from typing import Optional

import torch

try:
    from . import _C  # noqa: F401  (defines the ops)

    EXTENSION_ERROR: Optional[str] = None
except ImportError as error:  # built without the extension, or against another torch
    _C = None
    EXTENSION_ERROR = f"the C++ extension xmorpher_kernels._C could not be loaded ({error})"

OP_FAMILIES = ("", "triton_")  # prefixes of the native and the Triton ops


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The log-sum-exp the forward keeps is in the accumulation type."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _forward_fake(query, key, value, window_size, search_size, scale, rel_pos_bias, pad_key, pad_value):
    batch, depth, height, width, heads, _ = query.shape
    lse = query.new_empty((batch, heads, depth, height, width), dtype=lse_dtype(query.dtype))
    return query.new_empty(query.shape), lse


def _backward_fake(grad_out, query, key, value, out, lse, window_size, search_size, scale, rel_pos_bias, pad_key,
                   pad_value, deterministic):
    def like(t):
        return query.new_empty((0,)) if t is None else t.new_empty(t.shape)

    return like(query), like(query), like(query), like(rel_pos_bias), like(pad_key), like(pad_value)


if _C is not None:
    for _family in OP_FAMILIES:
        torch.library.register_fake(f"xmorpher_kernels::{_family}window_attention_forward")(_forward_fake)
        torch.library.register_fake(f"xmorpher_kernels::{_family}window_attention_backward")(_backward_fake)
