"""The public op: ``window_cross_attention``."""

from __future__ import annotations

from typing import Optional

import torch

from ._backends import select_backend
from ._checks import check_arguments
from ._geometry import SizeArg


def window_cross_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    window_size: SizeArg = 2,
    search_size: Optional[SizeArg] = None,
    *,
    scale: Optional[float] = None,
    rel_pos_bias: Optional[torch.Tensor] = None,
    padding: str = "mask",
    pad_key: Optional[torch.Tensor] = None,
    pad_value: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """3D window cross attention of XMorpher: base-window queries attend to searching-window keys.

    The volume is tiled by base windows of ``window_size``; every query of a base window attends to
    the ``search_size`` box of keys centred on that window (``left = (s - w) // 2`` per axis), with
    an optional relative-position bias. See ``shared/spec/window_cross_attention.md`` for the
    exact contract every backend computes.

    Args:
        query, key, value: ``(B, D, H, W, heads, head_dim)``, same shape, dtype and device; any
            strides (a unit-stride last dimension avoids a copy in the fused backends).
        window_size: base window, an int or ``(wd, wh, ww)``.
        search_size: searching window, an int or ``(sd, sh, sw)`` >= window_size; default
            ``3 * window_size``.
        scale: score scale; default ``head_dim ** -0.5``.
        rel_pos_bias: optional ``(heads, sd+wd-1, sh+wh-1, sw+ww-1)`` bias indexed by ``j - p``.
        padding: ``"mask"`` drops keys outside the volume from the softmax; ``"constant"`` keeps
            them with key ``pad_key[h]`` and value ``pad_value[h]`` (each ``(heads, head_dim)``,
            zeros when None).
        backend: ``"auto"`` (fastest available for the device and dtype), ``"reference"``,
            ``"cpu"``, ``"triton"`` or ``"cuda"``; see ``available_backends()``.

    Returns:
        ``(B, D, H, W, heads, head_dim)`` in the dtype of ``query``. Differentiable with respect to
        query, key, value, rel_pos_bias, pad_key and pad_value.
    """
    args = check_arguments(query, key, value, window_size, search_size, scale, rel_pos_bias, padding, pad_key, pad_value)
    chosen = select_backend(backend, args)
    if query.shape[0] == 0:
        return query * 0  # empty, but still connected to autograd
    return chosen.run(args)
