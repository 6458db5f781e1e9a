"""xmorpher: the XMorpher registration network (MICCAI 2022), its comparison models, the
registration framework (warping, velocity integration, losses, metrics) around them, and
registration of volumes with a trained checkpoint (``register``; training and evaluation are in
``xmorpher.train`` / ``xmorpher.evaluate`` and the ``xmorpher`` command).

Models take ``(moving, fixed)`` volumes ``(B, C, D, H, W)`` and return the displacement
``(B, 3, D, H, W)`` in voxels; their attention is ``xmorpher_kernels.window_cross_attention``.
Needs the ``registration`` extra (``pip install 'xmorpher-kernels[registration]'``).
"""

import importlib

from .baselines import VoxelMorph, VoxelMorphConfig, XMorpherNoCross
from .factory import build_model, model_names
from . import framework
from .framework import *  # noqa: F401,F403  (warping, velocity integration, losses, metrics: its __all__)
from .model import CrossAttentionBlock, XMorpher, XMorpherConfig

# Loaded on first use: registration and configs bring in the data package (files, data sets), which
# a user of the models alone never needs.
_LAZY = {"register": "registration", "Registrar": "registration", "RegistrationResult": "registration",
         "Config": "config", "load_config": "config"}

__all__ = [
    "register",
    "Registrar",
    "RegistrationResult",
    "Config",
    "load_config",
    "XMorpher",
    "XMorpherConfig",
    "XMorpherNoCross",
    "VoxelMorph",
    "VoxelMorphConfig",
    "CrossAttentionBlock",
    "build_model",
    "model_names",
    *framework.__all__,
]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'xmorpher' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
