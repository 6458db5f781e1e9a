"""The Triton backend of ``window_cross_attention``: custom ops, their fake and autograd
registrations, and the hooks the backend registry calls.

``torch.ops.xmorpher_kernels.triton_window_attention_{forward,backward}`` wrap the kernels of
``_triton_kernels`` (imported on the first call, see there) as ``torch.library`` custom ops, so
``torch.compile(fullgraph=True)`` treats them as opaque nodes with known output shapes. Importing
this module never fails: without Triton, ``HAS_TRITON`` is False and ``TRITON_IMPORT_ERROR`` says
why, and the backend reports itself unavailable.
"""

# No `from __future__ import annotations`: torch.library.custom_op reads the real annotations.
import os
import sys
from typing import List, Optional, Tuple

import torch

from ._checks import AttentionArgs
from ._geometry import WindowGeometry
from ._op_glue import call_forward_op, register_window_attention_autograd

try:
    import triton

    _version = tuple(int(part) for part in triton.__version__.split(".")[:2])
    if _version < (3, 0):
        raise ImportError(f"Triton >= 3.0 is needed, found {triton.__version__}")
    HAS_TRITON = True
    TRITON_IMPORT_ERROR: Optional[str] = None
except ImportError as error:
    HAS_TRITON = False
    TRITON_IMPORT_ERROR = f"Triton could not be imported ({error})"

_KERNELS_MODULE = f"{__package__}._triton_kernels"
# Larger head dims would spill the (rows x head_dim) fp32 accumulators out of registers.
MAX_HEAD_DIM = 128


def interpreter_enabled() -> bool:
    """Whether ``@triton.jit`` decorates for the CPU interpreter now (TRITON_INTERPRET)."""
    knobs = getattr(triton, "knobs", None) if HAS_TRITON else None
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def kernels_interpreted() -> bool:
    """Whether the kernels run in the interpreter: fixed once they are imported."""
    module = sys.modules.get(_KERNELS_MODULE)
    return module.INTERPRETED if module is not None else interpreter_enabled()


def _kernels():
    from . import _triton_kernels

    return _triton_kernels


def _geometry(query: torch.Tensor, window_size: List[int], search_size: List[int]) -> WindowGeometry:
    return WindowGeometry(volume=tuple(query.shape[1:4]), window=tuple(window_size), search=tuple(search_size))


if HAS_TRITON:

    @torch.library.custom_op("xmorpher_kernels::triton_window_attention_forward", mutates_args=())
    def triton_window_attention_forward(
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        window_size: List[int],
        search_size: List[int],
        scale: float,
        rel_pos_bias: Optional[torch.Tensor],
        pad_key: Optional[torch.Tensor],
        pad_value: Optional[torch.Tensor],
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Output and the fp32 log-sum-exp (B, heads, D, H, W) the backward needs.

        pad_key/pad_value given means padding="constant"; None means padding="mask".
        """
        return _kernels().forward(
            query, key, value, _geometry(query, window_size, search_size), scale, rel_pos_bias, pad_key, pad_value
        )

    @triton_window_attention_forward.register_fake
    def _forward_fake(query, key, value, window_size, search_size, scale, rel_pos_bias, pad_key, pad_value):
        batch, depth, height, width, heads, _ = query.shape
        lse = query.new_empty((batch, heads, depth, height, width), dtype=torch.float32)
        return query.new_empty(query.shape), lse

    @torch.library.custom_op("xmorpher_kernels::triton_window_attention_backward", mutates_args=())
    def triton_window_attention_backward(
        grad_out: torch.Tensor,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        window_size: List[int],
        search_size: List[int],
        scale: float,
        rel_pos_bias: Optional[torch.Tensor],
        pad_key: Optional[torch.Tensor],
        pad_value: Optional[torch.Tensor],
        deterministic: bool,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gradients of query, key, value, rel_pos_bias, pad_key, pad_value; an empty tensor
        stands for an optional input that was not given."""
        grads = _kernels().backward(
            grad_out, query, key, value, out, lse, _geometry(query, window_size, search_size), scale,
            rel_pos_bias, pad_key, pad_value, deterministic,
        )
        # Distinct empties: outputs of a custom op may not alias one another.
        return tuple(query.new_empty((0,)) if g is None else g for g in grads)  # type: ignore[return-value]

    @triton_window_attention_backward.register_fake
    def _backward_fake(grad_out, query, key, value, out, lse, window_size, search_size, scale,
                       rel_pos_bias, pad_key, pad_value, deterministic):
        def like(t):
            return query.new_empty((0,)) if t is None else t.new_empty(t.shape)

        return like(query), like(query), like(query), like(rel_pos_bias), like(pad_key), like(pad_value)

    def _backward(*args):
        return triton_window_attention_backward(*args, torch.are_deterministic_algorithms_enabled())

    register_window_attention_autograd("xmorpher_kernels::triton_window_attention_forward", _backward)


# Devices the backend claims: CPU tensors only when the interpreter is on as the package loads.
TRITON_DEVICES: Tuple[str, ...] = ("cuda", "cpu") if HAS_TRITON and interpreter_enabled() else ("cuda",)


def triton_unavailable() -> Optional[str]:
    return TRITON_IMPORT_ERROR


def triton_refuses(args: AttentionArgs) -> Optional[str]:
    """Why the Triton kernels cannot run this call, or None."""
    if args.head_dim > MAX_HEAD_DIM:
        return f"head_dim must be <= {MAX_HEAD_DIM}, got {args.head_dim}"
    if args.query.shape[0] > 65535:
        return f"the batch size must be <= 65535 (a grid axis), got {args.query.shape[0]}"
    if args.heads > 65535:
        return f"heads must be <= 65535 (a grid axis), got {args.heads}"
    if args.query.device.type == "cpu" and not kernels_interpreted():
        return "Triton runs CPU tensors only in its interpreter (TRITON_INTERPRET=1 before the first Triton call)"
    return None


def triton_window_attention(args: AttentionArgs) -> torch.Tensor:
    """Run the Triton custom op on validated arguments."""
    return call_forward_op(torch.ops.xmorpher_kernels.triton_window_attention_forward, args)
