"""The Triton backend of ``window_cross_attention``: the Triton kernels registered as the
implementation of ``torch.ops.xmorpher_kernels.triton_window_attention_{forward,backward}``, and
what the backend registry asks of it (what it runs, why it cannot).

The ops' schemas, autograd and fake implementations are shared with the native ops (the C++
extension and ``_extension.py``), so a Triton call costs the same host path as a native one. The
kernels themselves (``_triton_kernels``) are imported on the first call: ``@triton.jit`` decides
between compiled and interpreted (``TRITON_INTERPRET=1``) kernels when it decorates, so importing
late lets a process turn the interpreter on first. Importing this module never fails: without
Triton, ``HAS_TRITON`` is False and ``TRITON_IMPORT_ERROR`` says why.
"""

from __future__ import annotations

import os
import sys
from typing import Optional, Tuple

import torch

from ._checks import AttentionArgs
from ._extension import EXTENSION_ERROR, _C
from ._geometry import WindowGeometry

try:
    import triton

    _version = tuple(int(part) for part in triton.__version__.split(".")[:2])
    if _version < (3, 6):  # constexpr functions and tuple arguments of the kernels
        raise ImportError(f"Triton >= 3.6 is needed, found {triton.__version__}")
    HAS_TRITON = True
    TRITON_IMPORT_ERROR: Optional[str] = None
except ImportError as error:
    HAS_TRITON = False
    TRITON_IMPORT_ERROR = f"Triton could not be imported ({error})"

_KERNELS_MODULE = f"{__package__}._triton_kernels"
# Larger head dims would spill the (rows x head_dim) fp32 accumulators out of registers.
MAX_HEAD_DIM = 128
TRITON_DTYPES: Tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32)


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


def _geometry(query: torch.Tensor, window_size, search_size) -> WindowGeometry:
    return WindowGeometry(volume=tuple(query.shape[1:4]), window=tuple(window_size), search=tuple(search_size))


def _forward(query, key, value, window_size, search_size, scale, rel_pos_bias, pad_key, pad_value):
    return _kernels().forward(
        query, key, value, _geometry(query, window_size, search_size), scale, rel_pos_bias, pad_key, pad_value
    )


def _backward(grad_out, query, key, value, out, lse, window_size, search_size, scale, rel_pos_bias, pad_key,
              pad_value, deterministic):
    # The Triton backward has no atomics: it is deterministic whatever `deterministic` asks.
    grads = _kernels().backward(
        grad_out, query, key, value, out, lse, _geometry(query, window_size, search_size), scale, rel_pos_bias,
        pad_key, pad_value,
    )
    # Distinct empties: outputs of an op may not alias one another.
    return tuple(query.new_empty((0,)) if g is None else g for g in grads)


ENABLED = HAS_TRITON and _C is not None
if ENABLED:
    # CPU tensors run only in the interpreter; triton_refuses() keeps them away otherwise.
    torch.library.impl("xmorpher_kernels::triton_window_attention_forward", ("cpu", "cuda"), _forward)
    torch.library.impl("xmorpher_kernels::triton_window_attention_backward", ("cpu", "cuda"), _backward)
FORWARD_OP = torch.ops.xmorpher_kernels.triton_window_attention_forward.default if ENABLED else None

# Devices the backend claims: CPU tensors only when the interpreter is on as the package loads.
TRITON_DEVICES: Tuple[str, ...] = ("cuda", "cpu") if HAS_TRITON and interpreter_enabled() else ("cuda",)


def triton_unavailable() -> Optional[str]:
    if not HAS_TRITON:
        return TRITON_IMPORT_ERROR
    return EXTENSION_ERROR  # the extension defines the ops the kernels are registered for


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
