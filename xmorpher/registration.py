"""Register volumes with a trained checkpoint: the Python API behind `xmorpher register`.

    result = register("moving.nii.gz", "fixed.nii.gz", checkpoint="runs/brain/best.pt")
    result.save("out/")  # warped.nii.gz, displacement.nii.gz, [warped_labels.nii.gz], panel.png

Inputs are NIfTI paths or 3D arrays (numpy or torch) on one grid; the network sees them normalized
as in training, the warped image keeps the moving image's own intensities. Outputs carry the fixed
image's affine. The displacement is in voxels, (X, Y, Z, 3) on disk: component i moves along
voxel axis i, and warped(p) = moving(p + u(p)).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Optional, Sequence, Union

import numpy as np
import torch

from .checkpoint import load_model
from .config import SIMILARITIES, EvaluateConfig, TrainConfig, with_evaluate_overrides
from .data.nifti import Volume, load_volume, normalize_intensity, save_volume
from .errors import XMorpherError, registration_extra
from .framework import warp, warp_labels
from .runtime import autocast_dtype, resolve_device

VolumeLike = Union[str, os.PathLike, np.ndarray, torch.Tensor, Volume]


def as_volume(value: VolumeLike, what: str, *, labels: bool = False) -> Volume:
    """A Volume from a path or a 3D array (identity affine for arrays), checked like a file."""
    if isinstance(value, Volume):
        return value
    if isinstance(value, (str, os.PathLike)):
        return load_volume(os.fspath(value), labels=labels)
    array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    if array.ndim != 3:
        raise XMorpherError(f"{what}: expected a 3D volume, got shape {tuple(array.shape)}")
    if labels:
        return Volume(array.astype(np.int64), np.eye(4), (1.0, 1.0, 1.0))
    if not np.all(np.isfinite(array)):
        raise XMorpherError(f"{what}: the image holds NaN or infinite voxels")
    return Volume(array.astype(np.float32), np.eye(4), (1.0, 1.0, 1.0))


@dataclass
class RegistrationResult:
    """Moving resampled into fixed space. Arrays are (D, H, W) in voxel order; displacement (3, D, H, W)."""

    warped: np.ndarray  # moving intensities, trilinear
    displacement: np.ndarray  # voxels
    warped_labels: Optional[np.ndarray]  # nearest neighbour
    affine: np.ndarray  # the fixed image's
    fixed_normalized: np.ndarray
    moving_normalized: np.ndarray
    warped_normalized: np.ndarray

    def save(self, out_dir: str, *, panel: bool = True) -> dict:
        """Write the NIfTI outputs (and the PNG panel); returns {name: path}."""
        os.makedirs(out_dir, exist_ok=True)
        paths = {"warped": os.path.join(out_dir, "warped.nii.gz"), "displacement": os.path.join(out_dir, "displacement.nii.gz")}
        save_volume(paths["warped"], self.warped.astype(np.float32), self.affine)
        save_volume(paths["displacement"], np.moveaxis(self.displacement, 0, -1).astype(np.float32), self.affine, vector=True)
        if self.warped_labels is not None:
            paths["warped_labels"] = os.path.join(out_dir, "warped_labels.nii.gz")
            save_volume(paths["warped_labels"], self.warped_labels.astype(np.int32), self.affine)
        if panel:
            paths["panel"] = os.path.join(out_dir, "panel.png")
            save_panel(paths["panel"], self.fixed_normalized, self.moving_normalized, self.warped_normalized, self.displacement)
        return paths


def refine_flow(
    moving: torch.Tensor, fixed: torch.Tensor, flow: torch.Tensor, train: TrainConfig, steps: int, lr: float, diffusion_weight: float,
    similarity: str = "train",
) -> torch.Tensor:
    """Instance optimisation: ``flow`` (B, 3, D, H, W, voxels) improved by ``steps`` Adam steps of size
    ``lr`` (voxels) on the pair's own unsupervised loss, an image similarity on the input images +
    ``diffusion_weight`` * diffusion, starting from the network's prediction. ``similarity``:
    "train" (the network's training similarity, ``train.similarity``) or one of its choices, with
    that config's settings (window, epsilon). The displacement itself is optimised, also for networks
    that integrate a velocity field."""
    if steps < 0 or not lr > 0 or not diffusion_weight >= 0:
        raise XMorpherError(f"refinement needs steps >= 0, lr > 0 and diffusion_weight >= 0, got {steps}, {lr}, {diffusion_weight}")
    if similarity != "train" and similarity not in SIMILARITIES:
        raise XMorpherError(f"refinement similarity must be 'train' or one of {', '.join(SIMILARITIES)}, got '{similarity}'")
    from .train import registration_losses  # the training loop's loss, imported late: train imports much

    # that loss unsupervised, on the input images, with the refinement's similarity and diffusion weight
    objective = replace(train, mode="unsupervised", similarity_images="input", flow_weight=0.0, diffusion_weight=diffusion_weight,
                        similarity=train.similarity if similarity == "train" else similarity)
    pair = {"moving": moving.float(), "fixed": fixed.float()}
    refined = flow.detach().float().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([refined], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            registration_losses(objective, pair, refined, None)["loss"].backward()
            optimizer.step()
    return refined.detach()


def mean_displacement(flow: torch.Tensor) -> torch.Tensor:
    """Each pair's mean displacement length over the whole volume, (B,) from (B, 3, D, H, W) voxels."""
    return flow.norm(dim=1).flatten(1).mean(1)


class Registrar:
    """A trained network loaded once, for registering many pairs; with ``refine_steps`` > 0 each
    prediction is refined on the pair (see :func:`refine_flow`). The refinement's settings come from
    ``evaluate`` (default: the checkpoint's evaluate config) with ``overrides`` (``evaluate.refine_*=value``
    strings, as ``xmorpher register --set`` takes them) applied, its steps from ``refine_steps`` when
    given (over an ``evaluate.refine_steps`` override too)."""

    def __init__(self, checkpoint: str, device: str = "auto", refine_steps: Optional[int] = None,
                 evaluate: Optional[EvaluateConfig] = None, overrides: Sequence[str] = ()) -> None:
        self.device = resolve_device(device)
        self.model, self.config, self.payload = load_model(checkpoint, self.device)
        self.autocast = autocast_dtype(self.config.train.amp, self.device)
        self.checkpoint = checkpoint
        self.settings = evaluate or self.config.evaluate
        if overrides:
            self.settings = with_evaluate_overrides(replace(self.config, evaluate=self.settings), overrides)
        if refine_steps is not None:
            self.settings = replace(self.settings, refine_steps=refine_steps)
        if self.refine_steps < 0:
            raise XMorpherError(f"refine_steps must be >= 0, got {self.refine_steps}")

    @property
    def refine_steps(self) -> int:
        return self.settings.refine_steps

    @torch.no_grad()
    def predict(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        """The network's displacement (B, 3, D, H, W) in voxels for normalized (B, 1, D, H, W) volumes."""
        moving, fixed = moving.to(self.device, torch.float32), fixed.to(self.device, torch.float32)
        with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            return self.model(moving, fixed).float()

    def refine(self, moving: torch.Tensor, fixed: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
        """``predicted`` after the checkpoint's refinement (``refine_steps`` of :func:`refine_flow`);
        pairs whose refined displacement is shorter on average than ``refine_small_motion`` voxels
        are refined again, from zero displacement, at ``refine_small_motion_diffusion_weight``."""
        if self.refine_steps == 0:
            return predicted
        settings = self.settings
        moving, fixed = moving.to(self.device, torch.float32), fixed.to(self.device, torch.float32)

        def refined_from(start: torch.Tensor, weight: float, chosen: torch.Tensor | slice) -> torch.Tensor:
            return refine_flow(moving[chosen], fixed[chosen], start[chosen], self.config.train, self.refine_steps, settings.refine_lr,
                               weight, settings.refine_similarity)

        refined = refined_from(predicted, settings.refine_diffusion_weight, slice(None))
        if settings.refine_small_motion > 0:
            small = mean_displacement(refined) < settings.refine_small_motion
            if small.any():
                # from no motion: on nearly aligned pairs the network's own motion is mostly error
                refined[small] = refined_from(torch.zeros_like(predicted), settings.refine_small_motion_diffusion_weight, small)
        return refined

    def flow(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        """Displacement (B, 3, D, H, W) in voxels for normalized (B, 1, D, H, W) volumes: the network's,
        refined when ``refine_steps`` > 0."""
        return self.refine(moving, fixed, self.predict(moving, fixed))

    def __call__(self, moving: VolumeLike, fixed: VolumeLike, moving_labels: Optional[VolumeLike] = None) -> RegistrationResult:
        moving_volume, fixed_volume = as_volume(moving, "moving"), as_volume(fixed, "fixed")
        labels_volume = as_volume(moving_labels, "moving labels", labels=True) if moving_labels is not None else None
        for what, volume in (("moving", moving_volume), ("moving labels", labels_volume)):
            if volume is not None and volume.shape != fixed_volume.shape:
                raise XMorpherError(
                    f"{what} shape {volume.shape} differs from the fixed image's {fixed_volume.shape}; "
                    "resample the pair onto one grid first"
                )
        method = self.config.data.normalization
        as_tensor = lambda array: torch.from_numpy(np.ascontiguousarray(array))[None, None].to(self.device)  # noqa: E731
        moving_n = as_tensor(normalize_intensity(moving_volume.data, method))
        fixed_n = as_tensor(normalize_intensity(fixed_volume.data, method))
        flow = self.flow(moving_n, fixed_n)
        warped = warp(as_tensor(moving_volume.data), flow)
        warped_n = warp(moving_n, flow)
        warped_labels = None
        if labels_volume is not None:
            warped_labels = warp_labels(as_tensor(labels_volume.data), flow, mode="nearest")[0, 0].cpu().numpy()
        return RegistrationResult(
            warped=warped[0, 0].cpu().numpy(), displacement=flow[0].cpu().numpy(), warped_labels=warped_labels,
            affine=fixed_volume.affine, fixed_normalized=fixed_n[0, 0].cpu().numpy(),
            moving_normalized=moving_n[0, 0].cpu().numpy(), warped_normalized=warped_n[0, 0].cpu().numpy(),
        )


def register(
    moving: VolumeLike,
    fixed: VolumeLike,
    checkpoint: str,
    *,
    moving_labels: Optional[VolumeLike] = None,
    device: str = "auto",
    refine_steps: Optional[int] = None,
    overrides: Sequence[str] = (),
) -> RegistrationResult:
    """Register `moving` to `fixed` with the network of `checkpoint` (see RegistrationResult), its
    prediction refined on the pair for ``refine_steps`` (default: the checkpoint's setting), with the
    checkpoint's other refinement settings changed by ``overrides`` (``evaluate.refine_*=value``)."""
    return Registrar(checkpoint, device, refine_steps, overrides=overrides)(moving, fixed, moving_labels)


def _grid_lines(ax, displacement_2d: np.ndarray, spacing: int) -> None:
    """Draw the deformed image of a regular grid: points p + u(p) of every `spacing`-th row and column.
    `displacement_2d` is (2, rows, cols) in the slice's own (row, col) axes."""
    rows, cols = displacement_2d.shape[1:]
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    y, x = r + displacement_2d[0], c + displacement_2d[1]
    for i in range(0, rows, spacing):
        ax.plot(x[i], y[i], color="tab:orange", linewidth=0.6)
    for j in range(0, cols, spacing):
        ax.plot(x[:, j], y[:, j], color="tab:orange", linewidth=0.6)
    ax.set_xlim(-0.5, cols - 0.5)
    ax.set_ylim(-0.5, rows - 0.5)
    ax.set_aspect("equal")


def save_panel(path: str, fixed: np.ndarray, moving: np.ndarray, warped: np.ndarray, displacement: np.ndarray, title: str = "") -> None:
    """PNG: one row per voxel axis (middle slice), columns fixed, moving, warped, warped - fixed and
    the deformation grid. Slices are drawn with the first remaining axis horizontal, origin lower."""
    with registration_extra():
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

    columns = ("fixed", "moving", "warped", "warped - fixed", "deformation grid")
    figure, axes = plt.subplots(3, 5, figsize=(15, 9.5), squeeze=False)
    difference = warped - fixed
    limit = max(float(np.abs(difference).max()), 1e-6)
    for row, axis in enumerate(range(3)):
        middle = fixed.shape[axis] // 2
        in_plane = [a for a in range(3) if a != axis]
        take = lambda volume: np.take(volume, middle, axis=axis).T  # noqa: E731  (rows: 2nd in-plane axis)
        images = [take(fixed), take(moving), take(warped)]
        for col, image in enumerate(images):
            axes[row, col].imshow(image, cmap="gray", origin="lower", vmin=0, vmax=1)
        axes[row, 3].imshow(take(difference), cmap="coolwarm", origin="lower", vmin=-limit, vmax=limit)
        axes[row, 4].imshow(take(fixed), cmap="gray", origin="lower", vmin=0, vmax=1, alpha=0.4)
        plane = np.stack([take(displacement[in_plane[1]]), take(displacement[in_plane[0]])])
        _grid_lines(axes[row, 4], plane, max(2, min(fixed.shape) // 16))
        axes[row, 0].set_ylabel(f"axis {axis}, slice {middle}")
        for col in range(5):
            axes[row, col].set_xticks([])
            axes[row, col].set_yticks([])
            if row == 0:
                axes[row, col].set_title(columns[col])
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
