"""The registry of registration networks and its one entry point, ``build_model(name, **kwargs)``.

A name is a model class plus the config fields that make it that variant (the no-cross ablation is
XMorpher with ``fusion="concat"``). The config (``model.name`` and its per-model option tables)
and the ``xmorpher`` command take their names from here. All models share
``model(moving, fixed) -> displacement (B, 3, D, H, W)`` in voxels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping

import torch.nn as nn

from .baselines import VoxelMorph, VoxelMorphConfig
from .model import XMorpher, XMorpherConfig

__all__ = ["ModelVariant", "MODELS", "build_model", "model_names"]


@dataclass(frozen=True)
class ModelVariant:
    """A registered network.

    Attributes:
        model: the class, called as ``model(config, **overrides)``.
        config_type: its config dataclass.
        fields: config fields this variant sets (over the given config, under explicit overrides).
        attention: its blocks run ``window_cross_attention`` and take ``attention_backend``.
    """

    model: Callable[..., nn.Module]
    config_type: type
    fields: Mapping[str, object] = field(default_factory=dict)
    attention: bool = False


MODELS: Dict[str, ModelVariant] = {
    "xmorpher": ModelVariant(XMorpher, XMorpherConfig, attention=True),
    "xmorpher-nocross": ModelVariant(XMorpher, XMorpherConfig, {"fusion": "concat"}, attention=True),
    "voxelmorph": ModelVariant(VoxelMorph, VoxelMorphConfig),
}


def model_names() -> List[str]:
    """Names accepted by :func:`build_model`."""
    return list(MODELS)


def build_model(name: str, config: object = None, *, attention_backend: str = "auto", **overrides: object) -> nn.Module:
    """Build a registered network by name.

    Args:
        name: one of :func:`model_names`: ``"xmorpher"``, ``"xmorpher-nocross"``, ``"voxelmorph"``.
        config: the model's config dataclass (``MODELS[name].config_type``); default its defaults
            (the paper's configuration).
        attention_backend: backend of ``window_cross_attention``; models without attention do not
            use it, so one training script can pass it for every model.
        **overrides: config fields to replace, e.g. ``embed_dim=24`` or ``diffeomorphic=True``, and
            the model's other keyword arguments (``norm_layer``, ...).
    """
    variant = MODELS.get(name)
    if variant is None:
        raise ValueError(f"unknown model {name!r}; choose one of {model_names()}")
    backend = {"attention_backend": attention_backend} if variant.attention else {}
    return variant.model(config, **backend, **{**variant.fields, **overrides})
