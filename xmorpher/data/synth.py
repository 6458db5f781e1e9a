"""Random subjects with ground-truth labels: smooth diffeomorphic deformations and intensity changes.

Every function takes a numpy Generator, so a subject is a pure function of its seed: the same seed
gives the same volume on any machine and in any process, which is what makes data splits disjoint
and training resumable.

Deformations are stationary velocity fields of multi-scale noise (coarse random control grids,
upsampled), integrated by scaling and squaring, so they are diffeomorphic by construction.
Amplitudes and control spacings are in millimetres, so a subject looks the same at any voxel size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..framework import integrate_velocity, warp, warp_labels


@dataclass(frozen=True)
class DeformationParams:
    """Random velocity field: per scale, control-point spacing (mm) and velocity std (mm)."""

    control_spacing_mm: Sequence[float] = (64.0, 32.0, 16.0)
    velocity_std_mm: Sequence[float] = (4.0, 2.0, 1.0)
    integration_steps: int = 7


@dataclass(frozen=True)
class IntensityParams:
    """Random appearance. Factors are relative (0.1 = up to +-10 %); blur and noise in voxels / [0, 1] units."""

    label_contrast: float = 0.1  # per-label intensity factor in [1 - c, 1 + c]
    tissue_contrast: float = 0.1  # per-tissue (GM, WM, CSF) factor, brain template only
    bias_strength: float = 0.2  # multiplicative field exp(N(0, s)) on a coarse grid
    bias_control_spacing_mm: float = 64.0
    gamma_std: float = 0.2  # image ** exp(N(0, std))
    blur_max: float = 0.5  # Gaussian sigma drawn from [0, blur_max] voxels
    noise_max: float = 0.02  # Gaussian noise std drawn from [0, noise_max]


def smooth_noise(
    rng: np.random.Generator, shape: Sequence[int], channels: int, control_spacing_vox: float, std: float
) -> torch.Tensor:
    """Gaussian noise on a control grid of ``control_spacing_vox`` voxels, upsampled trilinearly: (C, D, H, W)."""
    control = [max(2, int(np.ceil(n / control_spacing_vox)) + 1) for n in shape]
    coarse = torch.from_numpy(rng.standard_normal((1, channels, *control)).astype(np.float32)) * std
    return F.interpolate(coarse, size=tuple(shape), mode="trilinear", align_corners=True)[0]


def random_velocity(
    rng: np.random.Generator, shape: Sequence[int], spacing_mm: float, params: DeformationParams
) -> torch.Tensor:
    """Multi-scale noise velocity field in voxels: (3, D, H, W)."""
    velocity = torch.zeros((3, *shape))
    for control_mm, std_mm in zip(params.control_spacing_mm, params.velocity_std_mm):
        velocity += smooth_noise(rng, shape, 3, control_mm / spacing_mm, std_mm / spacing_mm)
    return velocity


def random_deformation(
    rng: np.random.Generator, shape: Sequence[int], spacing_mm: float, params: DeformationParams
) -> torch.Tensor:
    """Displacement (voxels) of a random diffeomorphism, ``exp(v)``: (3, D, H, W)."""
    velocity = random_velocity(rng, shape, spacing_mm, params)
    return integrate_velocity(velocity[None], params.integration_steps)[0]


def warp_subject(
    image: torch.Tensor, labels: torch.Tensor, displacement: torch.Tensor, padding: str = "zeros"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Warp an image (C, D, H, W), linearly, and its labels (D, H, W), nearest, by one displacement.

    Outside the volume: "zeros" (image 0, label 0: the air around a head) or "border" (the edge
    voxel, for content that fills the volume), the same for image and labels so they stay consistent.
    """
    flow = displacement[None]
    warped_image = warp(image[None], flow, mode="linear", padding_mode=padding)[0]
    if padding == "zeros":
        warped_labels = warp_labels(labels[None, None], flow, mode="nearest")[0, 0]
    else:
        warped_labels = warp(labels[None, None].to(flow.dtype), flow, mode="nearest", padding_mode=padding)[0, 0].round().long()
    return warped_image, warped_labels


def label_intensity_factors(rng: np.random.Generator, num_labels: int, contrast: float) -> torch.Tensor:
    """One random factor in [1 - contrast, 1 + contrast] per label: (num_labels,)."""
    return torch.from_numpy(rng.uniform(1 - contrast, 1 + contrast, num_labels).astype(np.float32))


def _gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (C, D, H, W) with a sigma in voxels (no-op below 0.1)."""
    if sigma < 0.1:
        return image
    radius = int(np.ceil(3 * sigma))
    taps = torch.arange(-radius, radius + 1, dtype=image.dtype)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = kernel / kernel.sum()
    out = image[None]
    channels = image.shape[0]
    for axis in range(3):
        shape = [1, 1, 1]
        shape[axis] = kernel.numel()
        padding = [0, 0, 0]
        padding[axis] = radius
        out = F.conv3d(out, kernel.view(1, 1, *shape).expand(channels, 1, *shape), padding=padding, groups=channels)
    return out[0]


def augment_intensity(
    rng: np.random.Generator, image: torch.Tensor, spacing_mm: float, params: IntensityParams
) -> torch.Tensor:
    """Bias field, gamma, blur and noise on a (1, D, H, W) image in [0, 1]; returns it in [0, 1]."""
    shape = image.shape[1:]
    bias = smooth_noise(rng, shape, 1, params.bias_control_spacing_mm / spacing_mm, params.bias_strength)
    image = image * torch.exp(bias)
    image = image / image.max().clamp_min(1e-6)
    image = image.clamp_min(0) ** float(np.exp(rng.normal(0, params.gamma_std)))
    image = _gaussian_blur(image, float(rng.uniform(0, params.blur_max)))
    noise_std = float(rng.uniform(0, params.noise_max))
    image = image + noise_std * torch.from_numpy(rng.standard_normal(image.shape).astype(np.float32))
    image = image.clamp_min(0)
    return image / image.max().clamp_min(1e-6)
