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
from .framework import (
    SpatialTransformer,
    dice_loss,
    dice_per_label,
    diffusion_loss,
    hd95,
    hd95_per_label,
    identity_grid,
    integrate_velocity,
    jacobian_determinant,
    mse_loss,
    ncc_loss,
    percent_nonpositive_jacobian,
    std_log_jacobian,
    std_log_jacobian_learn2reg_plus3,
    warp,
    warp_labels,
)
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
    "SpatialTransformer",
    "identity_grid",
    "warp",
    "warp_labels",
    "integrate_velocity",
    "ncc_loss",
    "mse_loss",
    "diffusion_loss",
    "dice_loss",
    "dice_per_label",
    "hd95",
    "hd95_per_label",
    "jacobian_determinant",
    "percent_nonpositive_jacobian",
    "std_log_jacobian",
    "std_log_jacobian_learn2reg_plus3",
]
