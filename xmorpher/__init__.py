"""xmorpher: the XMorpher registration network (MICCAI 2022), its comparison models, the
registration framework (warping, velocity integration, losses, metrics) around them, and
registration of volumes with a trained checkpoint (``register``; training and evaluation are in
``xmorpher.train`` / ``xmorpher.evaluate`` and the ``xmorpher`` command).

Models take ``(moving, fixed)`` volumes ``(B, C, D, H, W)`` and return the displacement
``(B, 3, D, H, W)`` in voxels; their attention is ``xmorpher_kernels.window_cross_attention``.
"""

from .baselines import VoxelMorph, VoxelMorphConfig, XMorpherNoCross
from .config import Config, load_config
from .factory import build_model, model_names
from . import framework
from .framework import *  # noqa: F401,F403  (warping, velocity integration, losses, metrics: its __all__)
from .model import CrossAttentionBlock, XMorpher, XMorpherConfig
from .registration import Registrar, RegistrationResult, register

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
