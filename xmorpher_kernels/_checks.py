"""Argument validation for ``window_cross_attention``.

Every bad input is rejected here with a ``TypeError``/``ValueError`` that names the argument and
says what was expected, before any backend runs. The result, ``AttentionArgs``, is the normalized
call every backend receives.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ._geometry import SizeArg, Triple, WindowGeometry

PADDING_MODES = ("mask", "constant")


@dataclass(frozen=True)
class AttentionArgs:
    """A validated call: tensors plus normalized geometry and options."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    geometry: WindowGeometry
    scale: float
    rel_pos_bias: Optional[torch.Tensor]
    padding: str
    pad_key: Optional[torch.Tensor]
    pad_value: Optional[torch.Tensor]

    @property
    def heads(self) -> int:
        return self.query.shape[4]

    @property
    def head_dim(self) -> int:
        return self.query.shape[5]


def _size_triple(value: SizeArg, name: str) -> Triple:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a sequence of 3 ints, got bool")
    if isinstance(value, numbers.Integral):
        sizes = (int(value),) * 3
    elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        if len(value) != 3:
            raise ValueError(f"{name} must have 3 entries (d, h, w), got {len(value)}: {tuple(value)!r}")
        if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value):
            raise TypeError(f"{name} must hold ints, got {tuple(value)!r}")
        sizes = tuple(int(v) for v in value)
    else:
        raise TypeError(f"{name} must be an int or a sequence of 3 ints, got {type(value).__name__}")
    if min(sizes) < 1:
        raise ValueError(f"{name} must be >= 1 on every axis, got {sizes}")
    return sizes  # type: ignore[return-value]


def _check_small_tensor(
    tensor: Optional[torch.Tensor], name: str, shape: Sequence[int], query: torch.Tensor
) -> None:
    if tensor is None:
        return
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(tensor).__name__}")
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(tensor.shape)}")
    if tensor.dtype != query.dtype:
        raise TypeError(f"{name} must have the dtype of query ({query.dtype}), got {tensor.dtype}")
    if tensor.device != query.device:
        raise ValueError(f"{name} must be on the device of query ({query.device}), got {tensor.device}")


def check_arguments(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    window_size: SizeArg,
    search_size: Optional[SizeArg],
    scale: Optional[float],
    rel_pos_bias: Optional[torch.Tensor],
    padding: str,
    pad_key: Optional[torch.Tensor],
    pad_value: Optional[torch.Tensor],
) -> AttentionArgs:
    """Validate a call against the contract and return it normalized."""
    for name, tensor in (("query", query), ("key", key), ("value", value)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if query.dim() != 6:
        raise ValueError(
            f"query must have 6 dimensions (B, D, H, W, heads, head_dim), got {query.dim()} "
            f"with shape {tuple(query.shape)}"
        )
    if not query.is_floating_point():
        raise TypeError(f"query must be a floating point tensor, got {query.dtype}")
    for name, tensor in (("key", key), ("value", value)):
        if tensor.shape != query.shape:
            raise ValueError(
                f"{name} must have the shape of query {tuple(query.shape)}, got {tuple(tensor.shape)}"
            )
        if tensor.dtype != query.dtype:
            raise TypeError(f"{name} must have the dtype of query ({query.dtype}), got {tensor.dtype}")
        if tensor.device != query.device:
            raise ValueError(
                f"{name} must be on the device of query ({query.device}), got {tensor.device}"
            )
    batch, depth, height, width, heads, head_dim = query.shape
    for name, size in (("D", depth), ("H", height), ("W", width), ("heads", heads), ("head_dim", head_dim)):
        if size < 1:
            raise ValueError(
                f"query's {name} dimension must be >= 1, got shape {tuple(query.shape)}"
            )

    window = _size_triple(window_size, "window_size")
    search = tuple(3 * w for w in window) if search_size is None else _size_triple(search_size, "search_size")
    if any(s < w for s, w in zip(search, window)):
        raise ValueError(
            f"search_size must be >= window_size on every axis, got search_size={search} "
            f"and window_size={window}"
        )
    geometry = WindowGeometry(volume=(depth, height, width), window=window, search=search)  # type: ignore[arg-type]

    if scale is None:
        scale = head_dim ** -0.5
    elif isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    scale = float(scale)
    if scale != scale or scale in (float("inf"), float("-inf")):
        raise ValueError(f"scale must be finite, got {scale}")

    if not isinstance(padding, str) or padding not in PADDING_MODES:
        raise ValueError(f"padding must be one of {PADDING_MODES}, got {padding!r}")
    if padding == "mask":
        for name, tensor in (("pad_key", pad_key), ("pad_value", pad_value)):
            if tensor is not None:
                raise ValueError(f'{name} is only used with padding="constant"; got it with padding="mask"')

    _check_small_tensor(rel_pos_bias, "rel_pos_bias", (heads, *geometry.bias_shape), query)
    _check_small_tensor(pad_key, "pad_key", (heads, head_dim), query)
    _check_small_tensor(pad_value, "pad_value", (heads, head_dim), query)

    return AttentionArgs(
        query=query,
        key=key,
        value=value,
        geometry=geometry,
        scale=scale,
        rel_pos_bias=rel_pos_bias,
        padding=padding,
        pad_key=pad_key,
        pad_value=pad_value,
    )
