"""Registration framework around the networks: warping, velocity integration, losses and metrics.

Conventions, shared by every function here and by the models in this package:

* Volumes are ``(B, C, D, H, W)``.
* A displacement field ``u`` is ``(B, 3, D, H, W)`` in voxels; channel ``i`` moves along spatial
  axis ``i`` (D, H, W order). Warping samples the moving volume at ``p + u(p)`` for every fixed
  voxel ``p``, voxel centres at integer coordinates (the ``align_corners=True`` convention).
* Losses are torch functions (differentiable, any device); metrics that need distance transforms
  (HD95) run on the CPU with scipy.
"""

from __future__ import annotations

import itertools
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import registration_extra

with registration_extra():
    from scipy import ndimage

__all__ = [
    "identity_grid",
    "warp",
    "warp_labels",
    "SpatialTransformer",
    "integrate_velocity",
    "ncc_loss",
    "ngf_loss",
    "local_fit_loss",
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


# ----------------------------------------------------------------------------------------------
# Spatial transformer
# ----------------------------------------------------------------------------------------------


def identity_grid(
    size: Sequence[int], *, device: Optional[torch.device] = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Voxel coordinates of a ``size`` = (D, H, W) grid: ``(1, 3, D, H, W)``, channel i = index on axis i."""
    axes = [torch.arange(n, device=device, dtype=dtype) for n in size]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))[None]


def _check_flow(volume: torch.Tensor, flow: torch.Tensor) -> None:
    if volume.dim() != 5 or flow.dim() != 5 or flow.shape[1] != 3:
        raise ValueError(
            f"expected volume (B, C, D, H, W) and flow (B, 3, D', H', W'), got {tuple(volume.shape)} "
            f"and {tuple(flow.shape)}"
        )
    if flow.shape[0] != volume.shape[0]:
        raise ValueError(f"volume and flow batch sizes differ: {volume.shape[0]} vs {flow.shape[0]}")


def _sample(volume: torch.Tensor, coords: torch.Tensor, mode: str, padding_mode: str) -> torch.Tensor:
    """Sample ``volume`` (B, C, D, H, W) at voxel coordinates ``coords`` (B, 3, D', H', W').

    Written with gathers instead of ``F.grid_sample`` because grid_sample's normalised
    coordinates do not round-trip exactly to voxel indices in floating point, so a zero flow
    would not return the input bit for bit. Here a zero flow gives integer coordinates, a zero
    fractional part, and weights of exactly 1 and 0.
    """
    batch, channels = volume.shape[:2]
    sizes = volume.shape[2:]
    out_shape = coords.shape[2:]
    flat = volume.reshape(batch, channels, -1)
    if padding_mode == "border":
        coords = torch.stack([coords[:, a].clamp(0, n - 1) for a, n in enumerate(sizes)], dim=1)

    def gather(index: torch.Tensor) -> torch.Tensor:
        index = index.reshape(batch, 1, -1).expand(batch, channels, -1)
        return torch.gather(flat, 2, index).reshape(batch, channels, *out_shape)

    if mode == "nearest":
        nearest = coords.round().long()
        index = torch.zeros_like(nearest[:, 0])
        inside = torch.ones_like(nearest[:, 0], dtype=torch.bool)
        for axis, n in enumerate(sizes):
            inside &= (nearest[:, axis] >= 0) & (nearest[:, axis] < n)
            index = index * n + nearest[:, axis].clamp(0, n - 1)
        return gather(index) * inside[:, None].to(volume.dtype)

    lower = coords.floor()
    fraction = coords - lower  # carries the gradient with respect to the flow
    lower = lower.long()
    # Per axis, the two neighbouring positions: clamped index and weight (zero outside the volume:
    # padding "zeros"; with "border" an outside position only occurs with zero weight, at the
    # last voxel). Computed once per axis and combined per corner below.
    axis_terms = []
    for axis, n in enumerate(sizes):
        terms = []
        for step in (0, 1):
            position = lower[:, axis] + step
            axis_weight = fraction[:, axis] if step else 1 - fraction[:, axis]
            inside = ((position >= 0) & (position < n)).to(axis_weight.dtype)
            terms.append((position.clamp(0, n - 1), axis_weight * inside))
        axis_terms.append(terms)
    out = torch.zeros((), dtype=volume.dtype, device=volume.device)
    height, width = sizes[1], sizes[2]
    for (z, weight_z), (y, weight_y), (x, weight_x) in itertools.product(*axis_terms):
        index = (z * height + y) * width + x
        out = out + (weight_z * weight_y * weight_x)[:, None] * gather(index)
    return out


def warp(
    volume: torch.Tensor, flow: torch.Tensor, *, mode: str = "linear", padding_mode: str = "zeros"
) -> torch.Tensor:
    """Warp ``volume`` (B, C, D, H, W) by the displacement ``flow`` (B, 3, D, H, W) in voxels.

    ``out[p] = volume[p + flow[p]]`` with trilinear (``mode="linear"``) or nearest-neighbour
    (``mode="nearest"``) interpolation, voxel centres at integer coordinates (as
    ``grid_sample(align_corners=True)``). Outside the volume: zeros (``padding_mode="zeros"``) or
    the nearest border voxel (``"border"``). A zero flow returns ``volume`` exactly.
    Differentiable with respect to both inputs in linear mode.
    """
    _check_flow(volume, flow)
    if mode not in ("linear", "nearest"):
        raise ValueError(f"mode must be 'linear' or 'nearest', got {mode!r}")
    if padding_mode not in ("zeros", "border"):
        raise ValueError(f"padding_mode must be 'zeros' or 'border', got {padding_mode!r}")
    coords = identity_grid(flow.shape[2:], device=flow.device, dtype=flow.dtype) + flow
    return _sample(volume, coords, mode, padding_mode)


def warp_labels(labels: torch.Tensor, flow: torch.Tensor, *, mode: str = "nearest", num_labels: Optional[int] = None) -> torch.Tensor:
    """Warp an integer label map (B, 1, D, H, W) by ``flow``; returns labels of the same dtype.

    ``mode="nearest"`` takes the nearest voxel's label; ``mode="linear"`` warps the one-hot maps
    trilinearly and takes the arg-max (smoother boundaries); ``num_labels`` defaults to
    ``labels.max() + 1``. Voxels mapped outside the volume get label 0.
    """
    if labels.dim() != 5 or labels.shape[1] != 1:
        raise ValueError(f"expected labels (B, 1, D, H, W), got {tuple(labels.shape)}")
    if mode == "nearest":
        return warp(labels.to(flow.dtype), flow, mode="nearest").round().to(labels.dtype)
    if mode != "linear":
        raise ValueError(f"mode must be 'nearest' or 'linear', got {mode!r}")
    count = int(labels.max()) + 1 if num_labels is None else num_labels
    one_hot = F.one_hot(labels[:, 0].long(), count).permute(0, 4, 1, 2, 3).to(flow.dtype)
    warped = warp(one_hot, flow, mode="linear")
    # Outside the volume every channel is 0; the background channel must win there.
    warped[:, 0] += (warped.sum(1) == 0).to(warped.dtype)
    return warped.argmax(1, keepdim=True).to(labels.dtype)


class SpatialTransformer(nn.Module):
    """Module form of :func:`warp` (no parameters), for use inside registration pipelines."""

    def __init__(self, mode: str = "linear", padding_mode: str = "zeros") -> None:
        super().__init__()
        self.mode = mode
        self.padding_mode = padding_mode

    def forward(self, volume: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
        return warp(volume, flow, mode=self.mode, padding_mode=self.padding_mode)


def integrate_velocity(velocity: torch.Tensor, steps: int = 7) -> torch.Tensor:
    """Scaling and squaring: the displacement of ``exp(velocity)`` for a stationary velocity field.

    ``u = v / 2**steps``, then ``steps`` times ``u <- u + u o (id + u)``. Compositions sample with
    ``padding_mode="border"`` so that the field is extrapolated, not pulled to zero, at the edges.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    flow = velocity / (2**steps)
    for _ in range(steps):
        flow = flow + warp(flow, flow, padding_mode="border")
    return flow


# ----------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------


def _box_sum(x: torch.Tensor, window: int) -> torch.Tensor:
    """Sum over a centred ``window``^3 box, zero padded, one axis at a time (separable): a sum over
    an unfolded view of the padded volume, about twice as fast on the CPU as depthwise 1D
    convolutions with the same rounding."""
    radius = window // 2
    out = x
    for axis in (2, 3, 4):
        padding = [0] * 6
        padding[2 * (4 - axis)] = padding[2 * (4 - axis) + 1] = radius  # F.pad lists the last axis first
        out = F.pad(out, padding).unfold(axis, window, 1).sum(-1)
    return out


def _local_moments(fixed: torch.Tensor, warped: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Centred second moments of two volumes over every ``window``^3 box (zero padded at the borders),
    as sums over the box: (cross, fixed's, warped's), each (B, C, D, H, W). ``window`` must be odd."""
    if fixed.shape != warped.shape or fixed.dim() != 5:
        raise ValueError(f"expected two (B, C, D, H, W) volumes of one shape, got {tuple(fixed.shape)} and {tuple(warped.shape)}")
    if window < 1 or window % 2 == 0:
        raise ValueError(f"window must be odd and positive, got {window}")
    # The five moments stacked along channels: one box sum serves them all.
    moments = torch.cat([fixed, warped, fixed * fixed, warped * warped, fixed * warped], dim=1)
    s_f, s_w, s_ff, s_ww, s_fw = _box_sum(moments, window).chunk(5, dim=1)
    count = float(window**3)
    return s_fw - s_f * s_w / count, s_ff - s_f * s_f / count, s_ww - s_w * s_w / count


def ncc_loss(fixed: torch.Tensor, warped: torch.Tensor, window: int = 9, eps: float = 1e-5) -> torch.Tensor:
    """Negative local normalised cross-correlation (VoxelMorph's NCC), a scalar in [-1, 0].

    Squared correlation coefficient of the two volumes over every ``window``^3 neighbourhood
    (zero padded at the borders), averaged over voxels, channels and batch, negated so that lower
    is better. ``window`` must be odd.
    """
    cross, var_f, var_w = _local_moments(fixed, warped, window)
    return -(cross * cross / (var_f * var_w + eps)).mean()


def _central_gradient(volume: torch.Tensor) -> torch.Tensor:
    """Central-difference gradient (B, 3C, D, H, W) of (B, C, D, H, W), in intensity per voxel; one-sided
    (zero) at the borders."""
    parts = []
    for axis in (2, 3, 4):
        if volume.shape[axis] < 3:
            parts.append(torch.zeros_like(volume))
            continue
        difference = (volume.narrow(axis, 2, volume.shape[axis] - 2) - volume.narrow(axis, 0, volume.shape[axis] - 2)) / 2
        padding = [0] * 6
        padding[2 * (4 - axis)] = padding[2 * (4 - axis) + 1] = 1  # F.pad lists the last axis first
        parts.append(F.pad(difference, padding))
    return torch.cat(parts, dim=1)


def ngf_loss(fixed: torch.Tensor, warped: torch.Tensor, epsilon: float = 0.05) -> torch.Tensor:
    """Normalised gradient fields (Haber and Modersitzki, 2006): 1 - the squared cosine between the two
    images' gradients, averaged over voxels, a scalar in [0, 1] (lower is better).

    Only edge directions count, so a smooth multiplicative bias field, a per-tissue contrast change or a
    gamma does not move the optimum as they move local NCC's; ``epsilon`` (intensity per voxel, images
    in [0, 1]) is the gradient size below which an edge is treated as noise, so that flat regions, where
    only bias and noise vary, pull on nothing. Single-channel volumes (B, 1, D, H, W).
    """
    if fixed.shape != warped.shape or fixed.dim() != 5 or fixed.shape[1] != 1:
        raise ValueError(f"expected two (B, 1, D, H, W) volumes of one shape, got {tuple(fixed.shape)} and {tuple(warped.shape)}")
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    grad_fixed, grad_warped = _central_gradient(fixed), _central_gradient(warped)
    dot = (grad_fixed * grad_warped).sum(1)
    norms = (grad_fixed.pow(2).sum(1) + epsilon**2) * (grad_warped.pow(2).sum(1) + epsilon**2)
    return (1 - dot * dot / norms).mean()


def local_fit_loss(fixed: torch.Tensor, warped: torch.Tensor, window: int = 3, floor: float = 1e-4) -> torch.Tensor:
    """Residual of a local linear intensity fit, a scalar >= 0 (lower is better).

    In every ``window``^3 neighbourhood (zero padded at the borders) the fixed image is fitted by
    least squares as ``a * warped + b``; the loss is the mean squared residual left, averaged over
    voxels and divided by each fixed image's variance (0: a perfect fit; when the warped image
    explains nothing, the fixed image's mean local variance over its variance). The residual is the local
    variance of the fixed image times (1 - local correlation^2): local NCC weighted by how much the
    fixed image varies there. Within a few voxels a smooth bias field, a tissue contrast change or a
    gamma is close to linear, so the fit absorbs it; flat tissue, where only bias and noise vary,
    pulls with its small variance instead of the full weight NCC gives every window, with which NCC
    moves tissue to match two scans' bias patterns (a few times less pull there than NCC's, in
    ``tests/test_framework.py``). Unlike NGF's edge directions, the residual
    changes when an edge moves along its normal, so it locates sub-voxel motion. ``floor``
    (intensity^2, images in [0, 1]) is added to the warped window's variance so that flat windows
    do not divide by about zero. ``window`` must be odd.
    """
    if not floor > 0:
        raise ValueError(f"floor must be > 0, got {floor}")
    cross, var_f, var_w = (moment / window**3 for moment in _local_moments(fixed, warped, window))  # means over the box
    residual = (var_f - cross * cross / (var_w + floor)).flatten(1).mean(1)
    return (residual / fixed.flatten(1).var(1).clamp_min(floor)).mean()


def mse_loss(fixed: torch.Tensor, warped: torch.Tensor) -> torch.Tensor:
    """Mean squared intensity difference."""
    return F.mse_loss(warped, fixed)


def diffusion_loss(flow: torch.Tensor) -> torch.Tensor:
    """Diffusion regulariser: mean squared forward difference of the field, averaged over the 3 axes."""
    if flow.dim() != 5:
        raise ValueError(f"expected a (B, 3, D, H, W) field, got {tuple(flow.shape)}")
    terms = [torch.diff(flow, dim=axis).pow(2).mean() for axis in (2, 3, 4) if flow.shape[axis] > 1]
    return torch.stack(terms).mean() if terms else flow.sum() * 0


def dice_loss(prediction: torch.Tensor, target: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Soft Dice loss ``1 - mean Dice`` over batch and channels of (B, L, D, H, W) maps.

    Both are per-label probability or one-hot maps (e.g. warped one-hot moving labels and one-hot
    fixed labels); pass only the channels to score (usually without the background).
    """
    if prediction.shape != target.shape or prediction.dim() != 5:
        raise ValueError(f"expected two (B, L, D, H, W) maps of one shape, got {tuple(prediction.shape)} and {tuple(target.shape)}")
    dims = (2, 3, 4)
    overlap = (prediction * target).sum(dims)
    total = prediction.sum(dims) + target.sum(dims)
    return 1 - ((2 * overlap + eps) / (total + eps)).mean()


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------


def _label_volume(labels: torch.Tensor) -> torch.Tensor:
    """Accept (B, 1, D, H, W) or (B, D, H, W) label maps; return (B, D, H, W)."""
    if labels.dim() == 5 and labels.shape[1] == 1:
        return labels[:, 0]
    if labels.dim() == 4:
        return labels
    raise ValueError(f"expected labels (B, 1, D, H, W) or (B, D, H, W), got {tuple(labels.shape)}")


def _labels_to_score(target: torch.Tensor, labels: Optional[Sequence[int]]) -> list:
    if labels is not None:
        return list(labels)
    return [int(v) for v in torch.unique(target) if v != 0]


def dice_per_label(
    prediction: torch.Tensor, target: torch.Tensor, labels: Optional[Sequence[int]] = None
) -> torch.Tensor:
    """Dice of integer label maps, per label: ``(B, len(labels))`` float64.

    ``labels`` defaults to the non-zero labels present in ``target``. A label absent from both
    maps of a pair has an undefined Dice: NaN (use ``nanmean`` to average). Counted with three
    histograms per pair, not a pass per label: a 1 mm brain has 5 M voxels and over a hundred
    structures.
    """
    prediction, target = _label_volume(prediction), _label_volume(target)
    if prediction.shape != target.shape:
        raise ValueError(f"label maps differ in shape: {tuple(prediction.shape)} vs {tuple(target.shape)}")
    chosen = _labels_to_score(target, labels)
    if not chosen:
        return torch.empty((target.shape[0], 0), dtype=torch.float64)
    wanted = torch.tensor(chosen, dtype=torch.long, device=target.device)
    prediction, target = prediction.flatten(1).long(), target.flatten(1).long()
    # bincount counts from 0: shift every value by the smallest one present or asked for
    low = int(min(prediction.min(), target.min(), wanted.min()))
    count = int(max(prediction.max(), target.max(), wanted.max())) - low + 1
    scores = []
    for predicted, truth in zip(prediction - low, target - low):
        total = (torch.bincount(predicted, minlength=count) + torch.bincount(truth, minlength=count))[wanted - low].double()
        overlap = torch.bincount(predicted[predicted == truth], minlength=count)[wanted - low].double()
        scores.append(torch.where(total > 0, 2 * overlap / total, torch.full_like(total, float("nan"))))
    return torch.stack(scores)


def _surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of the mask with a face neighbour outside it (the volume edge counts as outside)."""
    structure = ndimage.generate_binary_structure(3, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def hd95(
    prediction: np.ndarray | torch.Tensor,
    target: np.ndarray | torch.Tensor,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
) -> float:
    """95th-percentile symmetric Hausdorff distance between two binary 3D masks, in ``spacing`` units.

    Surface voxels are those with a 6-neighbour outside the mask. Distances from each surface to
    the other come from scipy's Euclidean distance transform; the result is the larger of the two
    directed 95th percentiles (as MONAI's ``compute_hausdorff_distance(percentile=95)``). NaN
    when either mask is empty.
    """
    a = np.asarray(prediction.cpu() if isinstance(prediction, torch.Tensor) else prediction).astype(bool)
    b = np.asarray(target.cpu() if isinstance(target, torch.Tensor) else target).astype(bool)
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"expected two 3D masks of one shape, got {a.shape} and {b.shape}")
    if not a.any() or not b.any():
        return float("nan")
    surface_a, surface_b = _surface(a), _surface(b)
    to_b = ndimage.distance_transform_edt(~surface_b, sampling=spacing)[surface_a]
    to_a = ndimage.distance_transform_edt(~surface_a, sampling=spacing)[surface_b]
    return float(max(np.percentile(to_b, 95), np.percentile(to_a, 95)))


def hd95_per_label(
    prediction: torch.Tensor,
    target: torch.Tensor,
    labels: Optional[Sequence[int]] = None,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
) -> torch.Tensor:
    """:func:`hd95` of integer label maps, per label: ``(B, len(labels))`` float64 (NaN if a mask is empty)."""
    prediction, target = _label_volume(prediction).cpu(), _label_volume(target).cpu()
    chosen = _labels_to_score(target, labels)
    out = torch.empty((target.shape[0], len(chosen)), dtype=torch.float64)
    for b in range(target.shape[0]):
        for i, label in enumerate(chosen):
            out[b, i] = hd95((prediction[b] == label).numpy(), (target[b] == label).numpy(), spacing)
    return out


def jacobian_determinant(flow: torch.Tensor) -> torch.Tensor:
    """Determinant of the Jacobian of ``x -> x + flow(x)``: ``(B, D, H, W)``.

    Derivatives are central differences inside the volume and one-sided at its faces
    (``torch.gradient``); an axis of size 1 has zero derivative.
    """
    if flow.dim() != 5 or flow.shape[1] != 3:
        raise ValueError(f"expected a (B, 3, D, H, W) field, got {tuple(flow.shape)}")
    derivatives = []
    for axis in (2, 3, 4):
        if flow.shape[axis] > 1:
            derivatives.append(torch.gradient(flow, dim=axis)[0])
        else:
            derivatives.append(torch.zeros_like(flow))
    # jac[:, i, j] = d(x_i + u_i) / d x_j
    jac = torch.stack(derivatives, dim=2) + torch.eye(3, dtype=flow.dtype, device=flow.device)[None, :, :, None, None, None]
    return torch.linalg.det(jac.permute(0, 3, 4, 5, 1, 2))


def percent_nonpositive_jacobian(flow: torch.Tensor) -> torch.Tensor:
    """Percentage of voxels whose Jacobian determinant is <= 0 (folding), per batch item: ``(B,)``."""
    det = jacobian_determinant(flow)
    return 100.0 * (det <= 0).flatten(1).to(flow.dtype).mean(1)


def std_log_jacobian(flow: torch.Tensor) -> torch.Tensor:
    """Standard deviation of ``log(det J)`` per batch item: ``(B,)``; determinants clipped to [1e-9, 1e9]."""
    det = jacobian_determinant(flow)
    return det.clamp(1e-9, 1e9).log().flatten(1).std(1)


def std_log_jacobian_learn2reg_plus3(flow: torch.Tensor) -> torch.Tensor:
    """The Learn2Reg "SDlogJ": std of ``log(det J + 3)`` (their +3 shift), clipped to [1e-9, 1e9]: ``(B,)``.

    The shift keeps folded voxels (det <= 0) finite but makes the value differ from the plain
    :func:`std_log_jacobian`; report which one is used. Learn2Reg's evaluation script also
    drops a 2-voxel border before taking the std; crop the field first to match it exactly.
    """
    det = jacobian_determinant(flow)
    return (det + 3).clamp(1e-9, 1e9).log().flatten(1).std(1)
