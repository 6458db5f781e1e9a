"""What every fused backend's custom ops share: the autograd formula of a forward op
``(query, key, value, window_size, search_size, scale, rel_pos_bias, pad_key, pad_value) ->
(out, lse)`` in terms of its backward op, and the call of the forward op on validated arguments
(padding="constant" means pad tensors are passed, zeros when the user gave none).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ._checks import AttentionArgs

# backward(grad_out, query, key, value, out, lse, window_size, search_size, scale, rel_pos_bias,
# pad_key, pad_value) -> gradients of query, key, value, rel_pos_bias, pad_key, pad_value (empty
# tensors for absent optional inputs).
BackwardOp = Callable[..., Sequence[torch.Tensor]]


def register_window_attention_autograd(forward_op_name: str, backward_op: BackwardOp) -> None:
    """Register autograd for the forward op ``forward_op_name`` through ``backward_op``."""

    def setup_context(ctx, inputs, output):
        query, key, value, window_size, search_size, scale, rel_pos_bias, pad_key, pad_value = inputs
        out, lse = output
        ctx.save_for_backward(query, key, value, out, lse, rel_pos_bias, pad_key, pad_value)
        ctx.window_size, ctx.search_size, ctx.scale = window_size, search_size, scale
        ctx.mark_non_differentiable(lse)

    def backward(ctx, grad_out, _grad_lse):
        query, key, value, out, lse, rel_pos_bias, pad_key, pad_value = ctx.saved_tensors
        grad_query, grad_key, grad_value, grad_bias, grad_pad_key, grad_pad_value = backward_op(
            grad_out, query, key, value, out, lse, ctx.window_size, ctx.search_size, ctx.scale,
            rel_pos_bias, pad_key, pad_value,
        )
        return (
            grad_query,
            grad_key,
            grad_value,
            None,
            None,
            None,
            grad_bias if rel_pos_bias is not None else None,
            grad_pad_key if pad_key is not None else None,
            grad_pad_value if pad_value is not None else None,
        )

    torch.library.register_autograd(forward_op_name, backward, setup_context=setup_context)


def call_forward_op(forward_op: Callable[..., Sequence[torch.Tensor]], args: AttentionArgs) -> torch.Tensor:
    """The output of a forward op on validated arguments."""
    pad_key, pad_value = args.pad_key, args.pad_value
    if args.padding == "constant":
        zeros = args.query.new_zeros((args.heads, args.head_dim))
        pad_key = zeros if pad_key is None else pad_key
        pad_value = zeros if pad_value is None else pad_value
    out, _ = forward_op(
        args.query,
        args.key,
        args.value,
        list(args.geometry.window),
        list(args.geometry.search),
        args.scale,
        args.rel_pos_bias,
        pad_key,
        pad_value,
    )
    return out
