"""Plain PyTorch reference of ``window_cross_attention``: the baseline every backend is tested
and benchmarked against.

It is written the way a user would write it: pad the volume, unfold the searching windows of key
and value (materializing every key ``prod(search / window)`` times, 27 in the paper's setting),
build the relative-position bias and padding mask, and run a masked softmax. Autograd comes from
PyTorch itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import AttentionArgs
from ._geometry import WindowGeometry


def _bias_index(geometry: WindowGeometry, device: torch.device) -> torch.Tensor:
    """Flat index into one head's bias for every (query in window, key in box): ``(nq, nk)``.

    The offset ``j - p`` on one axis is ``t - l - a`` for query ``a`` in the window and key ``t``
    in the box, so the bias index ``t - l - a + l + w - 1`` reduces to ``t - a + w - 1``.
    """
    (iz, iy, ix) = (
        torch.arange(s, device=device)[None, :] - torch.arange(w, device=device)[:, None] + (w - 1)
        for w, s in zip(geometry.window, geometry.search)
    )
    _, extent_h, extent_w = geometry.bias_shape
    index = (
        iz[:, None, None, :, None, None] * extent_h + iy[None, :, None, None, :, None]
    ) * extent_w + ix[None, None, :, None, None, :]
    return index.reshape(geometry.queries_per_window, geometry.keys_per_box)


def _unfold_boxes(x: torch.Tensor, geometry: WindowGeometry, fill: float) -> torch.Tensor:
    """(B, C, D, H, W) -> (B, C, nD, nH, nW, sd, sh, sw): every key box, padded with ``fill``."""
    pads = []
    for size, w, s, l, n in zip(
        reversed(geometry.volume),
        reversed(geometry.window),
        reversed(geometry.search),
        reversed(geometry.left),
        reversed(geometry.num_windows),
    ):
        pads += [l, (n - 1) * w - l + s - size]
    x = F.pad(x, pads, value=fill)
    for axis, (w, s) in enumerate(zip(geometry.window, geometry.search)):
        x = x.unfold(2 + axis, s, w)
    return x


def reference_window_cross_attention(args: AttentionArgs) -> torch.Tensor:
    """Compute the op with plain PyTorch ops on any device and dtype (docs/contract.md)."""
    q, k, v, g = args.query, args.key, args.value, args.geometry
    batch, depth, height, width, heads, head_dim = q.shape
    nd, nh, nw = g.num_windows
    wd, wh, ww = g.window
    num_windows, nq, nk = nd * nh * nw, g.queries_per_window, g.keys_per_box

    # Queries: pad the volume to whole windows and group them per window.
    q = q.reshape(batch, depth, height, width, heads * head_dim)
    q = F.pad(q, (0, 0, 0, nw * ww - width, 0, nh * wh - height, 0, nd * wd - depth))
    q = q.reshape(batch, nd, wd, nh, wh, nw, ww, heads, head_dim)
    q = q.permute(0, 1, 3, 5, 7, 2, 4, 6, 8).reshape(batch, num_windows, heads, nq, head_dim)

    # Keys and values: unfold every searching window (the 27-fold copy the fused kernels avoid).
    def boxes(x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(batch, depth, height, width, heads * head_dim).permute(0, 4, 1, 2, 3)
        x = _unfold_boxes(x, g, 0.0).reshape(batch, heads, head_dim, num_windows, nk)
        return x.permute(0, 3, 1, 4, 2)  # (B, windows, heads, nk, head_dim)

    k, v = boxes(k), boxes(v)
    inside = torch.ones((1, 1, depth, height, width), dtype=torch.bool, device=q.device)
    inside = _unfold_boxes(inside, g, False).reshape(num_windows, nk)

    if args.padding == "constant":
        outside = ~inside[None, :, None, :, None]
        zeros = q.new_zeros(heads, head_dim)
        pad_key = zeros if args.pad_key is None else args.pad_key
        pad_value = zeros if args.pad_value is None else args.pad_value
        k = torch.where(outside, pad_key[:, None, :], k)
        v = torch.where(outside, pad_value[:, None, :], v)

    scores = torch.matmul(q, k.transpose(-1, -2)) * args.scale  # (B, windows, heads, nq, nk)
    if args.rel_pos_bias is not None:
        bias = args.rel_pos_bias.reshape(heads, -1)[:, _bias_index(g, q.device)]
        scores = scores + bias
    if args.padding == "mask":
        scores = scores.masked_fill(~inside[None, :, None, None, :], float("-inf"))
    softmax_dtype = torch.promote_types(scores.dtype, torch.float32)
    attention = torch.softmax(scores, dim=-1, dtype=softmax_dtype).to(v.dtype)
    out = torch.matmul(attention, v)  # (B, windows, heads, nq, head_dim)

    out = out.reshape(batch, nd, nh, nw, heads, wd, wh, ww, head_dim)
    out = out.permute(0, 1, 5, 2, 6, 3, 7, 4, 8).reshape(batch, nd * wd, nh * wh, nw * ww, heads, head_dim)
    return out[:, :depth, :height, :width].contiguous()
