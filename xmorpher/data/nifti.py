"""Reading and writing NIfTI volumes with the checks a user's files need, and intensity normalization.

Every problem with a file (missing, unreadable, not 3D, NaN, labels that are not integers) raises
XMorpherError with the file's path in the message.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ..errors import XMorpherError

NORMALIZATIONS = ("percentile", "minmax", "zscore", "none")


@dataclass(frozen=True)
class Volume:
    """A 3D array with its voxel -> world affine and voxel size (mm)."""

    data: np.ndarray
    affine: np.ndarray
    spacing: tuple

    @property
    def shape(self) -> tuple:
        return self.data.shape


def load_volume(path: str, *, labels: bool = False) -> Volume:
    """Load a 3D NIfTI image (float32) or label map (int64); trailing singleton axes are dropped."""
    import nibabel as nib

    if not os.path.isfile(path):
        raise XMorpherError(f"{path}: no such file")
    try:
        image = nib.load(path)
        data = np.asanyarray(image.dataobj)
    except Exception as error:  # nibabel raises many types for broken files; all mean "unreadable"
        raise XMorpherError(f"{path}: cannot read as NIfTI ({type(error).__name__}: {error})") from None
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise XMorpherError(f"{path}: expected a 3D volume, got shape {tuple(data.shape)}")
    spacing = tuple(float(z) for z in image.header.get_zooms()[:3])
    if labels:
        if not np.issubdtype(data.dtype, np.integer):
            if not np.all(np.isfinite(data)) or not np.array_equal(data, np.round(data)):
                raise XMorpherError(f"{path}: a label map must hold integers")
        if data.min() < 0:
            raise XMorpherError(f"{path}: a label map must hold non-negative integers")
        return Volume(np.asarray(data, dtype=np.int64), image.affine, spacing)
    data = np.asarray(data, dtype=np.float32)
    if not np.all(np.isfinite(data)):
        raise XMorpherError(f"{path}: the image holds {int((~np.isfinite(data)).sum())} NaN or infinite voxels")
    return Volume(data, image.affine, spacing)


def normalize_intensity(data: np.ndarray, method: str = "percentile") -> np.ndarray:
    """Scale an image for the network: percentile (0.5-99.5 % -> [0, 1], clipped), minmax, zscore or none."""
    data = np.asarray(data, dtype=np.float32)
    if method == "none":
        return data
    if method == "zscore":
        return (data - data.mean()) / max(float(data.std()), 1e-6)
    if method == "percentile":
        low, high = np.percentile(data, [0.5, 99.5])
    elif method == "minmax":
        low, high = float(data.min()), float(data.max())
    else:
        raise XMorpherError(f"unknown normalization '{method}'; choose one of {', '.join(NORMALIZATIONS)}")
    return np.clip((data - low) / max(float(high - low), 1e-6), 0, 1)


def save_volume(path: str, data: np.ndarray, affine: np.ndarray, *, vector: bool = False) -> None:
    """Write a NIfTI file; `vector` marks a (X, Y, Z, 3) displacement field with the NIfTI vector intent."""
    import nibabel as nib

    image = nib.Nifti1Image(np.asarray(data), np.asarray(affine, dtype=np.float64))
    if vector:
        image.header.set_intent("vector")
    nib.save(image, path)
