"""Pair datasets for training and evaluation: built-in brains, synthetic shapes, and users' NIfTI files.

Every dataset yields dicts with ``moving`` and ``fixed`` (1, D, H, W) float32 images, ``spacing``
(3,) float64 in mm, ``name`` (a string), and, when labels exist, ``moving_labels`` and
``fixed_labels`` (1, D, H, W) int64. Synthetic items are pure functions of (seed, split, index), so
workers, processes and resumed runs all see the same data; splits draw from disjoint seeds.
"""

from __future__ import annotations

import csv
import json
import os
from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import XMorpherError
from .anatomy import BrainTemplate, load_brain_template
from .nifti import load_volume, normalize_intensity
from .synth import (
    DeformationParams,
    IntensityParams,
    augment_intensity,
    label_intensity_factors,
    random_deformation,
    smooth_noise,
    warp_subject,
)

SPLITS = ("train", "val", "test")
_SOURCE_IDS = {"brain": 1, "shapes": 2}


def _rng(seed: int, source: str, split: str, index: int, part: int = 0) -> np.random.Generator:
    """The generator of one synthetic item; distinct (source, split, index, part) never share a stream."""
    if split not in SPLITS:
        raise XMorpherError(f"unknown split '{split}'; choose one of {', '.join(SPLITS)}")
    return np.random.default_rng([seed, _SOURCE_IDS[source], SPLITS.index(split), index, part])


def pair_indices(split: str, num_subjects: int, index: int) -> tuple[int, int]:
    """Subjects (moving, fixed) of pair `index`: all ordered pairs for training, a ring for val/test."""
    if split == "train":
        moving, fixed = divmod(index, num_subjects - 1)
        return moving, fixed + (fixed >= moving)
    return index, (index + 1) % num_subjects


def _labelled_item(moving, fixed, moving_labels, fixed_labels, spacing, name) -> dict:
    item = {
        "moving": moving.float(),
        "fixed": fixed.float(),
        "spacing": torch.tensor(spacing, dtype=torch.float64),
        "name": name,
    }
    if moving_labels is not None:
        item["moving_labels"] = moving_labels[None].long()
        item["fixed_labels"] = fixed_labels[None].long()
    return item


def synthesize_brain_subject(
    template: BrainTemplate,
    rng: np.random.Generator,
    deformation: DeformationParams,
    intensity: IntensityParams,
) -> dict:
    """One random subject: the template with random per-label and per-tissue intensities, warped by a
    random diffeomorphism, then bias, gamma, blur and noise. Returns image (1, D, H, W), labels
    (D, H, W) and the displacement (3, D, H, W) that produced them (voxels)."""
    t1 = torch.from_numpy(template.t1)
    labels = torch.from_numpy(template.labels)
    gm, wm = torch.from_numpy(template.gm), torch.from_numpy(template.wm)
    # CSF: what is inside the head but neither grey nor white matter.
    csf = ((t1 > 0.02).float() - gm - wm).clamp_min(0)
    tissue = 1 + sum(p * (f - 1) for p, f in zip((gm, wm, csf), label_intensity_factors(rng, 3, intensity.tissue_contrast)))
    per_label = label_intensity_factors(rng, len(template.label_names), intensity.label_contrast)[labels]
    image = (t1 * tissue * per_label)[None]
    displacement = random_deformation(rng, t1.shape, template.spacing, deformation)
    image, labels = warp_subject(image, labels, displacement)
    image = augment_intensity(rng, image, template.spacing, intensity)
    return {"image": image, "labels": labels, "displacement": displacement}


class BrainPairs(Dataset):
    """Pairs of synthetic subjects made from the built-in MNI template and aparc+aseg labels.

    Split `train` holds every ordered pair of its `num_subjects` subjects; `val` and `test` pair each
    subject with the next one. Subjects of different splits come from disjoint seeds.
    """

    def __init__(
        self,
        split: str,
        num_subjects: int,
        *,
        spacing_mm: float = 2.0,
        label_set: str = "aseg",
        seed: int = 0,
        deformation: DeformationParams = DeformationParams(),
        intensity: IntensityParams = IntensityParams(),
    ) -> None:
        if num_subjects < 2:
            raise XMorpherError(f"a {split} split needs at least 2 subjects, got {num_subjects}")
        _rng(seed, "brain", split, 0)  # validates the split name
        self.split, self.num_subjects, self.seed = split, num_subjects, seed
        self.template = load_brain_template(spacing_mm, label_set)
        self.deformation, self.intensity = deformation, intensity
        self.label_names = self.template.label_names
        self._recent: dict[int, dict] = {}  # val/test pairs share a subject with the previous pair

    def __len__(self) -> int:
        return self.num_subjects * (self.num_subjects - 1) if self.split == "train" else self.num_subjects

    def subject(self, index: int) -> dict:
        """Subject `index` of this split (image, labels, displacement); the last few are memoized."""
        if index not in self._recent:
            rng = _rng(self.seed, "brain", self.split, index)
            if len(self._recent) >= 4:
                self._recent.pop(next(iter(self._recent)))
            self._recent[index] = synthesize_brain_subject(self.template, rng, self.deformation, self.intensity)
        return self._recent[index]

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(index)
        i, j = pair_indices(self.split, self.num_subjects, index)
        moving, fixed = self.subject(i), self.subject(j)
        spacing = (self.template.spacing,) * 3
        return _labelled_item(
            moving["image"], fixed["image"], moving["labels"], fixed["labels"], spacing, f"{self.split}-{i:03d}-{j:03d}"
        )


def synthesize_shapes(
    rng: np.random.Generator, shape: Sequence[int], num_labels: int, spacing_mm: float, deformation: DeformationParams
) -> torch.Tensor:
    """A random label map (D, H, W) in [0, num_labels]: arg-max of smooth noise channels, themselves
    warped by a random diffeomorphism so that the blobs get organic, non-grid-aligned outlines."""
    control = max(shape) / 4
    noise = smooth_noise(rng, shape, num_labels + 1, control, 1.0)
    noise += smooth_noise(rng, shape, num_labels + 1, control / 2, 0.5)
    displacement = random_deformation(rng, shape, spacing_mm, deformation)
    noise, _ = warp_subject(noise, torch.zeros(shape, dtype=torch.long), displacement, padding="border")
    return noise.argmax(0)


class ShapesPairs(Dataset):
    """Pairs of random shapes, no anatomy: a random label map, seen through two random deformations,
    each painted with random per-label intensities and corrupted by bias, gamma, blur and noise."""

    def __init__(
        self,
        split: str,
        num_pairs: int,
        *,
        shape: Sequence[int] = (64, 64, 64),
        num_labels: int = 8,
        spacing_mm: float = 2.0,
        seed: int = 0,
        deformation: DeformationParams = DeformationParams(),
        intensity: IntensityParams = IntensityParams(),
    ) -> None:
        if num_pairs < 1 or num_labels < 1 or len(shape) != 3 or min(shape) < 2:
            raise XMorpherError(f"shapes data needs num_pairs >= 1, num_labels >= 1 and a 3D shape, got {num_pairs}, {num_labels}, {shape}")
        _rng(seed, "shapes", split, 0)
        self.split, self.num_pairs, self.seed = split, num_pairs, seed
        self.shape, self.spacing = tuple(int(n) for n in shape), float(spacing_mm)
        self.deformation, self.intensity = deformation, intensity
        self.label_names = ("background",) + tuple(f"shape-{i}" for i in range(1, num_labels + 1))

    def __len__(self) -> int:
        return self.num_pairs

    def _view(self, rng: np.random.Generator, base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        means = torch.from_numpy(rng.uniform(0, 1, len(self.label_names)).astype(np.float32))
        displacement = random_deformation(rng, self.shape, self.spacing, self.deformation)
        image, labels = warp_subject(means[base][None], base, displacement, padding="border")
        return augment_intensity(rng, image, self.spacing, self.intensity), labels

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(index)
        base = synthesize_shapes(
            _rng(self.seed, "shapes", self.split, index), self.shape, len(self.label_names) - 1, self.spacing, self.deformation
        )
        moving, moving_labels = self._view(_rng(self.seed, "shapes", self.split, index, 1), base)
        fixed, fixed_labels = self._view(_rng(self.seed, "shapes", self.split, index, 2), base)
        return _labelled_item(moving, fixed, moving_labels, fixed_labels, (self.spacing,) * 3, f"{self.split}-{index:04d}")


def _resolve(root: str, path: Optional[str]) -> Optional[str]:
    if path is None or path == "":
        return None
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(root, path))


def read_pairs_csv(path: str, split: str) -> list[dict]:
    """Rows of a pairs CSV: columns moving, fixed, optional moving_labels, fixed_labels and split
    (train, val or test; rows without one are training pairs). Paths relative to the CSV's folder."""
    root = os.path.dirname(os.path.abspath(path))
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"moving", "fixed"} - set(reader.fieldnames or ())
        if missing:
            raise XMorpherError(f"{path}: the pairs CSV needs columns moving and fixed (missing {', '.join(sorted(missing))})")
        rows = [row for row in reader if (row.get("split") or "train").strip() == split]
    return [
        {key: _resolve(root, (row.get(key) or "").strip()) for key in ("moving", "fixed", "moving_labels", "fixed_labels")}
        for row in rows
    ]


def read_learn2reg_json(path: str, split: str) -> list[dict]:
    """Pairs of a Learn2Reg dataset JSON: `registration_val` for val, `registration_test` (else
    `registration_val`) for test, and every ordered pair of the remaining `training` images for
    train. Labels come from each image's `label` entry in `training`, when present."""
    root = os.path.dirname(os.path.abspath(path))
    with open(path) as handle:
        try:
            spec = json.load(handle)
        except json.JSONDecodeError as error:
            raise XMorpherError(f"{path}: not valid JSON ({error})") from None
    label_of = {_resolve(root, entry["image"]): _resolve(root, entry.get("label")) for entry in spec.get("training", [])}
    val_pairs = spec.get("registration_val", [])
    held_out = {_resolve(root, p[key]) for p in val_pairs + spec.get("registration_test", []) for key in ("fixed", "moving")}
    if split == "train":
        images = [image for image in label_of if image not in held_out]
        chosen = [{"moving": m, "fixed": f} for m in images for f in images if m != f]
    else:
        chosen = spec.get("registration_val" if split == "val" else "registration_test") or val_pairs
        chosen = [{"moving": _resolve(root, p["moving"]), "fixed": _resolve(root, p["fixed"])} for p in chosen]
    for pair in chosen:
        pair["moving_labels"], pair["fixed_labels"] = label_of.get(pair["moving"]), label_of.get(pair["fixed"])
    return chosen


class NiftiPairs(Dataset):
    """Pairs of the user's NIfTI volumes from a pairs CSV or a Learn2Reg dataset JSON.

    Images are normalized (`normalization`); labels are optional but must be given for all pairs
    of a split or none. Moving, fixed and their labels must share one shape.
    """

    def __init__(self, pairs_file: str, split: str, *, normalization: str = "percentile") -> None:
        if not os.path.isfile(pairs_file):
            raise XMorpherError(f"{pairs_file}: no such pairs file")
        reader = read_learn2reg_json if pairs_file.endswith(".json") else read_pairs_csv
        self.pairs = reader(pairs_file, split)
        if not self.pairs:
            raise XMorpherError(f"{pairs_file}: no {split} pairs")
        labelled = [p["moving_labels"] is not None and p["fixed_labels"] is not None for p in self.pairs]
        if any(labelled) and not all(labelled):
            raise XMorpherError(f"{pairs_file}: some {split} pairs have labels and some do not; give labels for all or none")
        self.has_labels = all(labelled)
        self.split, self.normalization = split, normalization
        self.label_names = None  # label ids are whatever the maps hold
        missing = sorted({path for pair in self.pairs for path in pair.values() if path and not os.path.isfile(path)})
        if missing:
            raise XMorpherError(f"{pairs_file}: {len(missing)} listed file(s) do not exist, e.g. {missing[0]}")

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        pair = self.pairs[index]
        moving, fixed = load_volume(pair["moving"]), load_volume(pair["fixed"])
        volumes = {"moving": moving, "fixed": fixed}
        if self.has_labels:
            volumes["moving_labels"] = load_volume(pair["moving_labels"], labels=True)
            volumes["fixed_labels"] = load_volume(pair["fixed_labels"], labels=True)
        for key, volume in volumes.items():
            if volume.shape != fixed.shape:
                raise XMorpherError(
                    f"{pair[key]}: shape {volume.shape} differs from the fixed image {pair['fixed']} {fixed.shape}; "
                    "resample the pair onto one grid first"
                )
        image = {k: torch.from_numpy(normalize_intensity(volumes[k].data, self.normalization))[None] for k in ("moving", "fixed")}
        labels = {k: torch.from_numpy(volumes[k].data) for k in ("moving_labels", "fixed_labels") if k in volumes}
        name = os.path.basename(pair["moving"]).split(".")[0] + "_to_" + os.path.basename(pair["fixed"]).split(".")[0]
        return _labelled_item(
            image["moving"], image["fixed"], labels.get("moving_labels"), labels.get("fixed_labels"), fixed.spacing, name
        )


def make_dataset(data, split: str) -> Dataset:
    """The `split` pairs described by a DataConfig (see xmorpher.config)."""
    if data.source == "brain":
        subjects = {"train": data.train_subjects, "val": data.val_subjects, "test": data.test_subjects}[split]
        return BrainPairs(
            split, subjects, spacing_mm=data.spacing_mm, label_set=data.label_set, seed=data.seed,
            deformation=data.deformation, intensity=data.intensity,
        )
    if data.source == "shapes":
        pairs = {"train": data.shapes_train_pairs, "val": data.shapes_val_pairs, "test": data.shapes_test_pairs}[split]
        return ShapesPairs(
            split, pairs, shape=data.shapes_size, num_labels=data.shapes_labels, spacing_mm=data.spacing_mm,
            seed=data.seed, deformation=data.deformation, intensity=data.intensity,
        )
    return NiftiPairs(data.pairs_file, split, normalization=data.normalization)
