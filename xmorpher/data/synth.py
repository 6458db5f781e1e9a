"""Random subjects with ground-truth labels: smooth diffeomorphic deformations and intensity changes.

Every function takes a numpy Generator, so a subject is a pure function of its seed: the same seed
gives the same volume on any machine and in any process, which is what makes data splits disjoint
and training resumable.

Training deformations are stationary velocity fields of multi-scale noise (coarse random control
grids, upsampled trilinearly), integrated by scaling and squaring, so they are diffeomorphic by
construction. The generalization test uses a different model that training never sees: a random
affine map plus a cubic B-spline free-form deformation, applied as a displacement (not integrated)
and scaled to a chosen mean size. Amplitudes and control spacings are in millimetres, so a subject
looks the same at any voxel size.
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
    # Each subject's velocity is multiplied by a factor drawn log-uniformly from this range, so that
    # the deformation sizes of training pairs span nearly aligned to large; a range of one value
    # draws nothing ((1, 1) keeps the subjects of earlier versions).
    scale_range: Sequence[float] = (1.0, 1.0)


@dataclass(frozen=True)
class FreeFormParams:
    """The generalization test's deformation model: a random affine map about the volume centre plus
    a cubic B-spline free-form deformation on a ``control_spacing_mm`` grid, the two parts each of
    unit mean size, mixed ``affine_share : 1 - affine_share``; the caller scales the sum to a size."""

    control_spacing_mm: float = 32.0
    affine_share: float = 0.4


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
    """Multi-scale noise velocity field in voxels, times the subject's scale factor: (3, D, H, W)."""
    velocity = torch.zeros((3, *shape))
    for control_mm, std_mm in zip(params.control_spacing_mm, params.velocity_std_mm):
        velocity += smooth_noise(rng, shape, 3, control_mm / spacing_mm, std_mm / spacing_mm)
    low, high = params.scale_range
    if not 0 < low <= high:
        raise ValueError(f"scale_range must satisfy 0 < low <= high, got {tuple(params.scale_range)}")
    # a range of one value draws nothing (so (1, 1) keeps the subjects of earlier versions)
    velocity *= float(np.exp(rng.uniform(np.log(low), np.log(high)))) if low < high else float(low)
    return velocity


def random_deformation(
    rng: np.random.Generator, shape: Sequence[int], spacing_mm: float, params: DeformationParams
) -> torch.Tensor:
    """Displacement (voxels) of a random diffeomorphism, ``exp(v)``: (3, D, H, W)."""
    velocity = random_velocity(rng, shape, spacing_mm, params)
    return integrate_velocity(velocity[None], params.integration_steps)[0]


def cubic_bspline_matrix(size: int, spacing: float) -> np.ndarray:
    """Weights (size, controls) that evaluate a uniform cubic B-spline with knots every ``spacing``
    voxels at voxel centres 0 .. size - 1; one extra control point lies before the first voxel and
    two past the last, so every voxel has its four."""
    controls = int(np.floor((size - 1) / spacing)) + 4
    position = np.arange(size) / spacing
    first = np.floor(position).astype(int)
    t = position - first
    basis = np.stack([(1 - t) ** 3, 3 * t**3 - 6 * t**2 + 4, -3 * t**3 + 3 * t**2 + 3 * t + 1, t**3]) / 6
    weights = np.zeros((size, controls))
    for k in range(4):
        weights[np.arange(size), first + k] = basis[k]
    return weights


def _unit_mean_size(field: np.ndarray, mask: np.ndarray, spacing_mm: float) -> np.ndarray:
    """``field`` (3, D, H, W) in voxels scaled so that its mean length over ``mask`` is 1 mm."""
    size = float(np.linalg.norm(field, axis=0)[mask].mean()) * spacing_mm
    return field / max(size, 1e-12)


def random_free_form_deformation(
    rng: np.random.Generator,
    shape: Sequence[int],
    spacing_mm: float,
    params: FreeFormParams,
    size_mm: float,
    mask: np.ndarray,
) -> torch.Tensor:
    """Displacement (voxels) of a random affine map plus a cubic B-spline free-form deformation whose
    mean length over ``mask`` is ``size_mm``: (3, D, H, W). Not integrated: the map is x + u(x), as
    B-spline registration tools model it (invertible while its Jacobian stays positive, which the
    tests check for the sizes the generalization set uses)."""
    shape = tuple(int(n) for n in shape)
    if not mask.any():
        raise ValueError("the mask that measures the deformation size is empty")
    spacing_vox = params.control_spacing_mm / spacing_mm
    matrices = [cubic_bspline_matrix(n, spacing_vox) for n in shape]
    coefficients = rng.standard_normal((3, *(m.shape[1] for m in matrices)))
    free_form = np.einsum("ai,bj,ck,nijk->nabc", *matrices, coefficients, optimize=True)
    # affine part: a random matrix (rotation, scaling and shear together) about the volume centre
    # and a random translation, in voxels
    grid = np.stack(np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in shape], indexing="ij"))
    linear = rng.standard_normal((3, 3))
    translation = rng.standard_normal(3) * np.mean(shape) / 4
    affine = np.einsum("ij,jabc->iabc", linear, grid) + translation[:, None, None, None]
    field = (1 - params.affine_share) * _unit_mean_size(free_form, mask, spacing_mm)
    field += params.affine_share * _unit_mean_size(affine, mask, spacing_mm)
    return torch.from_numpy((_unit_mean_size(field, mask, spacing_mm) * size_mm).astype(np.float32))


def compose_displacements(outer: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """Displacement of ``x -> y + outer(y)`` with ``y = x + inner(x)``, both (3, D, H, W) in voxels:
    warping by the result equals warping by ``outer`` then by ``inner``, with one interpolation."""
    return inner + warp(outer[None], inner[None], padding_mode="border")[0]


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
