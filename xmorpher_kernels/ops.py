"""The public op: ``window_cross_attention``.

A call is validated and its backend chosen once per call signature (shapes, strides, dtypes,
devices, options, grad and determinism modes): the decision, a Runner bound to the call's static
options, is cached, so a repeated call costs a dictionary lookup before the kernel's op.
"""

from __future__ import annotations

from typing import Dict, Hashable, Optional

import torch

from ._backends import Runner, select_backend
from ._checks import check_arguments
from ._geometry import SizeArg

# Call signature -> Runner. Bounded: a program that keeps changing shapes rebuilds it.
_RUNNERS: Dict[Hashable, Runner] = {}
_MAX_RUNNERS = 512


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
    an optional relative-position bias. ``docs/contract.md`` gives the exact contract every
    backend computes.

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
    if not torch.compiler.is_compiling():  # torch.compile traces the plain path below
        try:
            signature = _signature(query, key, value, window_size, search_size, scale, rel_pos_bias, padding,
                                   pad_key, pad_value, backend)
            run = _RUNNERS.get(signature)
        except (AttributeError, TypeError):  # not tensors, or unhashable sizes: checked below
            signature, run = None, None
        if run is None:
            run = _prepare(query, key, value, window_size, search_size, scale, rel_pos_bias, padding, pad_key,
                           pad_value, backend)
            if signature is not None:
                if len(_RUNNERS) >= _MAX_RUNNERS:
                    _RUNNERS.clear()
                _RUNNERS[signature] = run
        return run(query, key, value, rel_pos_bias, pad_key, pad_value)
    run = _prepare(query, key, value, window_size, search_size, scale, rel_pos_bias, padding, pad_key, pad_value,
                   backend)
    return run(query, key, value, rel_pos_bias, pad_key, pad_value)


def _tensor_signature(t: torch.Tensor) -> tuple:
    return (t.shape, t.stride(), t.dtype, t.device, t.requires_grad)


def _size_key(size) -> Hashable:
    """A window or search size as a key: ints as they are, sequences with their elements' types."""
    if type(size) is int:
        return size
    if type(size) in (tuple, list):
        return tuple((type(entry), entry) for entry in size)
    return (type(size), size)


def _signature(query, key, value, window_size, search_size, scale, rel_pos_bias, padding, pad_key, pad_value,
               backend) -> tuple:
    """Everything the checks and the backend choice depend on. Types ride along with the sizes
    and the scale: True == 1 == 1.0 as keys, but only some of them are valid arguments."""
    return (
        _tensor_signature(query),
        _tensor_signature(key),
        _tensor_signature(value),
        None if rel_pos_bias is None else _tensor_signature(rel_pos_bias),
        None if pad_key is None else _tensor_signature(pad_key),
        None if pad_value is None else _tensor_signature(pad_value),
        _size_key(window_size),
        _size_key(search_size),
        type(scale), scale, padding, backend,
        torch.is_grad_enabled(), torch.are_deterministic_algorithms_enabled(),
    )


def _prepare(query, key, value, window_size, search_size, scale, rel_pos_bias, padding, pad_key, pad_value,
             backend) -> Runner:
    """Validate a call, choose its backend and bind its static options."""
    args = check_arguments(query, key, value, window_size, search_size, scale, rel_pos_bias, padding, pad_key,
                           pad_value)
    chosen = select_backend(backend, args)
    if args.query.shape[0] == 0:
        return _empty_batch
    return chosen.runner(args)


def _empty_batch(query, key, value, rel_pos_bias, pad_key, pad_value) -> torch.Tensor:
    """The empty output of a batch of 0, connected to every input so that each one that requires
    grad gets a gradient of zeros (the optional inputs are not empty)."""
    out = query * 0 + key * 0 + value * 0
    for t in (rel_pos_bias, pad_key, pad_value):
        if t is not None:
            out = out + t.sum() * 0
    return out
