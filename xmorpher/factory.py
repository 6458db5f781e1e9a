"""One entry point for every registration network: ``build_model(name, **kwargs)``.

All models share ``model(moving, fixed) -> displacement (B, 3, D, H, W)`` in voxels.
"""

from __future__ import annotations

from typing import Callable, Dict, List

import torch.nn as nn

from .baselines import VoxelMorph, XMorpherNoCross
from .model import XMorpher

__all__ = ["build_model", "model_names"]

# Models whose blocks run window_cross_attention and therefore take ``attention_backend``.
_ATTENTION_MODELS = ("xmorpher", "xmorpher-nocross")

_MODELS: Dict[str, Callable[..., nn.Module]] = {
    "xmorpher": XMorpher,
    "xmorpher-nocross": XMorpherNoCross,
    "voxelmorph": VoxelMorph,
}


def model_names() -> List[str]:
    """Names accepted by :func:`build_model`."""
    return list(_MODELS)


def build_model(name: str, config: object = None, *, attention_backend: str = "auto", **overrides: object) -> nn.Module:
    """Build a registration network by name.

    Args:
        name: ``"xmorpher"``, ``"xmorpher-nocross"`` or ``"voxelmorph"``.
        config: the model's config dataclass (``XMorpherConfig`` for the first two,
            ``VoxelMorphConfig`` for VoxelMorph); default the paper's configuration.
        attention_backend: backend of ``window_cross_attention``; VoxelMorph has no attention
            and does not use it, so one training script can pass it for every model.
        **overrides: config fields to replace, e.g. ``embed_dim=24`` or ``diffeomorphic=True``.
    """
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {model_names()}")
    if name in _ATTENTION_MODELS:
        return _MODELS[name](config, attention_backend=attention_backend, **overrides)
    return _MODELS[name](config, **overrides)
