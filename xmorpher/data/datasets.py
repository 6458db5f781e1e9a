"""Pair datasets for training and evaluation: built-in brains, synthetic shapes, and users' NIfTI files.

Every dataset yields dicts with ``moving`` and ``fixed`` (1, D, H, W) float32 images, ``spacing``
(3,) float64 in mm, ``name`` (a string), and, when labels exist, ``moving_labels`` and
``fixed_labels`` (1, D, H, W) int64. The generalization pairs, made by another deformation model
and scored with other labels than training uses, add their deformation size and its bin. Synthetic items are pure functions of (seed, split, index), so
workers, processes and resumed runs all see the same data; splits draw from disjoint seeds.
"""

from __future__ import annotations

import csv
import json
import os
from collections import OrderedDict
from dataclasses import replace
from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import XMorpherError
from ..framework import dice_per_label, integrate_velocity, warp, warp_labels
from .anatomy import BrainTemplate, load_brain_labels, load_brain_template, working_grid
from .nifti import load_volume, normalize_intensity
from .synth import (
    DeformationParams,
    FreeFormParams,
    IntensityParams,
    augment_intensity,
    compose_displacements,
    label_intensity_factors,
    random_deformation,
    random_free_form_deformation,
    random_velocity,
    smooth_noise,
    warp_subject,
)

SPLITS = ("train", "val", "test")
_SOURCE_IDS = {"brain": 1, "shapes": 2, "brain-free-form": 3}


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


def _brain_image(template: BrainTemplate, rng: np.random.Generator, contrast: float) -> torch.Tensor:
    """The template T1 (1, D, H, W) with random grey-matter, white-matter and CSF intensity factors."""
    t1 = torch.from_numpy(template.t1)
    gm, wm = torch.from_numpy(template.gm), torch.from_numpy(template.wm)
    # CSF: what is inside the head but neither grey nor white matter.
    csf = ((t1 > 0.02).float() - gm - wm).clamp_min(0)
    factors = label_intensity_factors(rng, 3, contrast)
    return (t1 * (1 + sum(p * (f - 1) for p, f in zip((gm, wm, csf), factors))))[None]


def synthesize_brain_subject(
    template: BrainTemplate,
    rng: np.random.Generator,
    deformation: DeformationParams,
    intensity: IntensityParams,
    displacement: Optional[torch.Tensor] = None,
) -> dict:
    """One random subject: the template with random per-label and per-tissue intensities, warped by a
    random diffeomorphism ``exp(v)``, then bias, gamma, blur and noise. Returns image (1, D, H, W),
    labels (D, H, W), the displacement (3, D, H, W) that produced them and its velocity ``v``
    (voxels). Given a ``displacement``, that anatomy gets a random appearance (no velocity drawn)."""
    labels = torch.from_numpy(template.labels)
    image = _brain_image(template, rng, intensity.tissue_contrast)
    image = image * label_intensity_factors(rng, len(template.label_names), intensity.label_contrast)[labels]
    velocity = None
    if displacement is None:
        velocity = random_velocity(rng, labels.shape, template.spacing, deformation)
        displacement = integrate_velocity(velocity[None], deformation.integration_steps)[0]
    image, labels = warp_subject(image, labels, displacement)
    image = augment_intensity(rng, image, template.spacing, intensity)
    return {"image": image, "labels": labels, "displacement": displacement, "velocity": velocity}


class BrainPairs(Dataset):
    """Pairs of synthetic subjects made from the built-in MNI template and aparc+aseg labels.

    Split `train` holds every ordered pair of its `num_subjects` subjects; `val` and `test` pair each
    subject with the next one. Subjects of different splits come from disjoint seeds.

    ``near_pairs`` > 0 adds that fraction of training pairs that are one subject seen twice: the
    subject as the fixed image, and as the moving image the same anatomy further deformed by a
    training deformation whose velocity is scaled by a factor drawn log-uniformly from
    ``near_pair_scale_range`` (from about the identity to full size), painted with its own random
    appearance. They teach what inter-subject pairs never show: nearly aligned anatomy under two
    appearances needs (almost) no motion.

    ``targets`` adds what only synthetic data knows: ``true_flow`` (3, D, H, W), the displacement
    (voxels) that registers the pair exactly, and ``moving_anatomy`` / ``fixed_anatomy``
    (1, D, H, W), the two anatomies rendered with the template's own intensities, without any
    appearance change (see ``train.similarity_images`` and ``train.flow_weight``).
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
        near_pairs: float = 0.0,
        near_pair_scale_range: Sequence[float] = (0.01, 1.0),
        targets: bool = False,
        cache_mb: float = 512.0,
    ) -> None:
        if num_subjects < 2:
            raise XMorpherError(f"a {split} split needs at least 2 subjects, got {num_subjects}")
        if not 0 <= near_pairs < 1:
            raise XMorpherError(f"near_pairs is a fraction of the training pairs in [0, 1), got {near_pairs}")
        low, high = near_pair_scale_range
        if not 0 < low <= high:
            raise XMorpherError(f"near_pair_scale_range must satisfy 0 < low <= high, got {tuple(near_pair_scale_range)}")
        _rng(seed, "brain", split, 0)  # validates the split name
        self.split, self.num_subjects, self.seed = split, num_subjects, seed
        self.template = load_brain_template(spacing_mm, label_set)
        self.deformation, self.intensity = deformation, intensity
        self.near_deformation = replace(deformation, scale_range=tuple(near_pair_scale_range))
        self.targets = targets
        self.label_names = self.template.label_names
        inter_subject = num_subjects * (num_subjects - 1)
        self.num_near_pairs = round(near_pairs / (1 - near_pairs) * inter_subject) if split == "train" else 0
        # Every training pair draws two of a few dozen subjects, and making one costs about a third
        # of a small model's training step: the most recently used ones stay in memory (about 0.9 MB
        # each at 4 mm, 7.4 MB at 2 mm; with targets, 2.7 and 22 MB).
        self.cache_bytes = int(cache_mb * 2**20)
        self._cache: OrderedDict[int, dict] = OrderedDict()

    def __len__(self) -> int:
        if self.split != "train":
            return self.num_subjects
        return self.num_subjects * (self.num_subjects - 1) + self.num_near_pairs

    def _anatomy(self, displacement: torch.Tensor) -> torch.Tensor:
        """The template's own T1 (no appearance change) warped by ``displacement``: (1, D, H, W)."""
        return warp(torch.from_numpy(self.template.t1)[None, None], displacement[None])[0]

    def subject(self, index: int) -> dict:
        """Subject `index` of this split: image (1, D, H, W) and labels (D, H, W), with near pairs or
        targets its displacement, with targets also its inverse's and its anatomy; cached."""
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        made = synthesize_brain_subject(self.template, _rng(self.seed, "brain", self.split, index), self.deformation, self.intensity)
        subject = {"image": made["image"], "labels": made["labels"]}
        if self.targets or self.num_near_pairs:
            subject["displacement"] = made["displacement"]  # near pairs deform this anatomy further
        if self.targets:
            # exp(v)'s inverse is exp(-v): exact, no fixed-point iteration
            inverse = integrate_velocity(-made["velocity"][None], self.deformation.integration_steps)[0]
            subject.update(inverse=inverse, anatomy=self._anatomy(made["displacement"]))
        size = sum(value.numel() * value.element_size() for value in subject.values())
        while self._cache and size * (len(self._cache) + 1) > self.cache_bytes:
            self._cache.popitem(last=False)
        if size <= self.cache_bytes:
            self._cache[index] = subject
        return subject

    def _near_pair(self, index: int) -> dict:
        """Near pair ``index`` (counted from the first one): a subject, and its anatomy further deformed
        and painted anew as the moving image."""
        view, i = divmod(index, self.num_subjects)
        fixed = self.subject(i)
        rng = _rng(self.seed, "brain", self.split, i, part=1 + view)
        velocity = random_velocity(rng, fixed["labels"].shape, self.template.spacing, self.near_deformation)
        further = integrate_velocity(velocity[None], self.deformation.integration_steps)[0]
        anatomy = compose_displacements(fixed["displacement"], further)
        moving = synthesize_brain_subject(self.template, rng, self.deformation, self.intensity, displacement=anatomy)
        spacing = (self.template.spacing,) * 3
        item = _labelled_item(moving["image"], fixed["image"], moving["labels"], fixed["labels"], spacing, f"{self.split}-{i:03d}-near{view}")
        if self.targets:
            # moving = fixed o (id + further): the inverse of the further deformation registers it
            item["true_flow"] = integrate_velocity(-velocity[None], self.deformation.integration_steps)[0]
            item["moving_anatomy"], item["fixed_anatomy"] = self._anatomy(anatomy), fixed["anatomy"]
        return item

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(index)
        inter_subject = self.num_subjects * (self.num_subjects - 1) if self.split == "train" else self.num_subjects
        if index >= inter_subject:
            return self._near_pair(index - inter_subject)
        i, j = pair_indices(self.split, self.num_subjects, index)
        moving, fixed = self.subject(i), self.subject(j)
        spacing = (self.template.spacing,) * 3
        item = _labelled_item(
            moving["image"], fixed["image"], moving["labels"], fixed["labels"], spacing, f"{self.split}-{i:03d}-{j:03d}"
        )
        if self.targets:
            # fixed voxel x shows template point x + d_j(x), which the moving subject shows at
            # exp(-v_i)(x + d_j(x))
            item["true_flow"] = compose_displacements(moving["inverse"], fixed["displacement"])
            item["moving_anatomy"], item["fixed_anatomy"] = moving["anatomy"], fixed["anatomy"]
        return item


# Deformation sizes (mean displacement over the brain, mm) of the generalization bins: from nearly
# aligned (under a quarter of a 4 mm voxel on average) to large (about what training pairs see).
GENERALIZATION_BINS_MM = ((0.25, 1.0), (1.0, 2.0), (2.0, 4.0), (4.0, 8.0))

# The generalization labels' grid: the atlases' native 1 mm (aseg's; Neuromorphometrics' 1.5 mm
# labels are resampled onto it), where a sub-millimetre deformation moves label boundaries.
GENERALIZATION_LABEL_SPACING_MM = 1.0


def linear_interpolation_matrix(size: int, coordinates: np.ndarray) -> torch.Tensor:
    """Weights (len(coordinates), size) that interpolate a signal sampled at 0 .. size - 1 linearly
    at ``coordinates``, clamped to the end samples outside that range (as border padding)."""
    position = np.clip(coordinates, 0, size - 1)
    lower = np.minimum(np.floor(position).astype(int), max(size - 2, 0))
    fraction = position - lower
    weights = np.zeros((len(position), size), np.float32)
    rows = np.arange(len(position))
    np.add.at(weights, (rows, lower), 1 - fraction)
    np.add.at(weights, (rows, np.minimum(lower + 1, size - 1)), fraction)
    return torch.from_numpy(weights)


class GeneralizationPairs(Dataset):
    """Pairs made differently from the training data, binned by deformation size.

    Each pair is one subject seen twice: the template warped by a random free-form deformation
    ``phi`` (:func:`random_free_form_deformation`, a model training never sees) is the fixed image;
    the moving image is that subject warped further by a second free-form deformation ``psi`` whose
    mean length over the brain is drawn log-uniformly inside the pair's bin. Each image gets its own
    tissue contrasts, bias field, gamma, blur and noise (no per-label intensities: a user's scans
    are not painted by an atlas).

    Labels come from ``label_sets`` (the first is ``moving_labels`` / ``fixed_labels``, the others
    ``moving_labels_<set>`` / ``fixed_labels_<set>``, uint8); the default, Neuromorphometrics, is a
    labelling no model is trained or selected on. They lie on a finer grid than the images
    (``label_spacing_mm``, the atlases' native 1 mm by default), as a user's label maps at scan
    resolution would: a label map moves only where a deformation carries a boundary past a voxel
    centre, and every warp of a map rounds positions to its voxels, so on a coarse label grid the
    rounding hides sub-voxel motion (with 2 mm labels even the exact inverse deformation gains
    +0.002 Dice on nearly aligned pairs; with 1 mm labels, about +0.04). :meth:`score` warps the
    moving labels by a flow (resampled onto the label grid, nearest neighbour) and returns each
    set's mean Dice. Items add ``deformation_mm`` (the mean length of ``psi`` over the brain) and
    ``bin`` (its index in ``bins_mm``). Pair ``k`` is in bin ``k // pairs_per_bin``; items are pure
    functions of (seed, index), from seeds no other data uses.
    """

    def __init__(
        self,
        pairs_per_bin: int,
        *,
        spacing_mm: float = 2.0,
        label_spacing_mm: float = GENERALIZATION_LABEL_SPACING_MM,
        label_sets: Sequence[str] = ("neuromorphometrics", "aseg"),
        bins_mm: Sequence[Sequence[float]] = GENERALIZATION_BINS_MM,
        seed: int = 0,
        subject_size_mm: Sequence[float] = (2.0, 4.0),
        free_form: FreeFormParams = FreeFormParams(),
        intensity: IntensityParams = IntensityParams(),
    ) -> None:
        if pairs_per_bin < 1 or not label_sets or not bins_mm:
            raise XMorpherError(f"generalization pairs need pairs_per_bin >= 1, label sets and bins, got {pairs_per_bin}, {label_sets}, {bins_mm}")
        for low, high in list(bins_mm) + [subject_size_mm]:
            if not 0 < low <= high:
                raise XMorpherError(f"deformation size ranges must satisfy 0 < low <= high (mm), got ({low}, {high})")
        self.pairs_per_bin, self.seed = pairs_per_bin, seed
        self.bins_mm = tuple((float(low), float(high)) for low, high in bins_mm)
        self.label_sets = tuple(label_sets)
        self.template = load_brain_template(spacing_mm)  # the images
        label_sets = {name: load_brain_labels(label_spacing_mm, name) for name in self.label_sets}
        if max(len(names) for _, names in label_sets.values()) > 256:
            raise XMorpherError("generalization label sets are stored as uint8: at most 255 structures")
        self.label_names = label_sets[self.label_sets[0]][1]
        self._label_maps = {name: torch.from_numpy(labels.astype(np.uint8))[None, None] for name, (labels, _) in label_sets.items()}
        # Both grids are axis-aligned over one MNI box: a flow reaches the label grid through one
        # linear interpolation matrix per axis (label voxel centres in image voxels), its values
        # scaled from image voxels to label voxels.
        label_shape, label_affine = working_grid(label_spacing_mm)
        to_image = np.linalg.inv(self.template.affine) @ label_affine
        self._interpolation = [
            linear_interpolation_matrix(self.template.t1.shape[a], np.arange(n) * to_image[a, a] + to_image[a, 3])
            for a, n in enumerate(label_shape)
        ]
        self._label_voxels_per_image_voxel = self.template.spacing / label_spacing_mm
        self.subject_size_mm, self.free_form, self.intensity = tuple(subject_size_mm), free_form, intensity
        self.brain = self.template.t1 > 0.1  # where deformation sizes are measured

    def __len__(self) -> int:
        return self.pairs_per_bin * len(self.bins_mm)

    def bin_of(self, index: int) -> int:
        return index // self.pairs_per_bin

    def to_label_grid(self, flow: torch.Tensor) -> torch.Tensor:
        """A displacement (B, 3, D, H, W) on the image grid, in image voxels, resampled trilinearly
        (border values outside) onto the label grid, in label voxels: what warps the label maps."""
        depth, height, width = (m.to(flow.device, flow.dtype) for m in self._interpolation)
        fine = torch.einsum("ck,nzijk->nzijc", width, flow)
        fine = torch.einsum("bj,nzijc->nzibc", height, fine)
        fine = torch.einsum("ai,nzibc->nzabc", depth, fine)
        return fine.contiguous() * self._label_voxels_per_image_voxel

    def score(self, item: dict, flow: torch.Tensor) -> dict:
        """Mean Dice of each label set on pair ``item`` (batched as one pair) registered by ``flow``
        (1, 3, D, H, W) on the image grid: the moving labels warped on their own grid, nearest
        neighbour, by the flow taken there. {label set: Dice}."""
        fine = self.to_label_grid(flow.float())
        scores = {}
        for position, name in enumerate(self.label_sets):
            suffix = "" if position == 0 else f"_{name}"
            moving, fixed = item["moving_labels" + suffix], item["fixed_labels" + suffix]
            # the structures either image holds; one absent from both the warped and fixed maps is left out
            size = int(max(moving.max(), fixed.max())) + 1
            held = torch.bincount(moving.flatten().long(), minlength=size) + torch.bincount(fixed.flatten().long(), minlength=size)
            structures = (held[1:].nonzero().flatten() + 1).tolist()
            scores[name] = float(dice_per_label(warp_labels(moving, fine), fixed, structures).nanmean())
        return scores

    def displacements(self, index: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(the subject's phi, the further deformation psi, the mean length of psi over the brain in
        mm) of pair ``index``, on the image grid: fixed = template warped by phi, moving = fixed
        warped by psi."""
        rng = _rng(self.seed, "brain-free-form", "test", index)
        shape, spacing = self.template.t1.shape, self.template.spacing

        def log_uniform(low: float, high: float) -> float:
            return float(np.exp(rng.uniform(np.log(low), np.log(high))))

        subject = random_free_form_deformation(rng, shape, spacing, self.free_form, log_uniform(*self.subject_size_mm), self.brain)
        size = log_uniform(*self.bins_mm[self.bin_of(index)])
        further = random_free_form_deformation(rng, shape, spacing, self.free_form, size, self.brain)
        return subject, further, size

    def true_flow(self, index: int, iterations: int = 30) -> torch.Tensor:
        """The displacement (1, 3, D, H, W), image voxels, that registers pair ``index`` exactly: the
        inverse of psi, ``u = -psi o (id + u)`` solved by fixed-point iteration (it contracts while
        psi's Jacobian stays near the identity, as it does for these sizes)."""
        _, further, _ = self.displacements(index)
        inverse = torch.zeros_like(further)[None]
        for _ in range(iterations):
            inverse = -warp(further[None], inverse, padding_mode="border")
        return inverse

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(index)
        fixed_flow, further, size = self.displacements(index)
        moving_flow = compose_displacements(fixed_flow, further)  # one interpolation of the template
        images, labels = {}, {}
        for role, flow, part in (("fixed", fixed_flow, 1), ("moving", moving_flow, 2)):
            rng = _rng(self.seed, "brain-free-form", "test", index, part)
            image = warp(_brain_image(self.template, rng, self.intensity.tissue_contrast)[None], flow[None])[0]
            images[role] = augment_intensity(rng, image, self.template.spacing, self.intensity)
            fine_flow = self.to_label_grid(flow[None])
            for name, label_map in self._label_maps.items():
                labels[role, name] = warp_labels(label_map, fine_flow)[0]
        item = {
            "moving": images["moving"], "fixed": images["fixed"], "spacing": torch.tensor((self.template.spacing,) * 3, dtype=torch.float64),
            "name": f"free-form-bin{self.bin_of(index)}-{index:03d}", "deformation_mm": size, "bin": self.bin_of(index),
        }
        for position, name in enumerate(self.label_sets):
            suffix = "" if position == 0 else f"_{name}"
            item["moving_labels" + suffix], item["fixed_labels" + suffix] = labels["moving", name], labels["fixed", name]
        return item


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


def make_dataset(data, split: str, *, targets: bool = False) -> Dataset:
    """The `split` pairs described by a DataConfig (see xmorpher.config); ``targets``: with each
    pair's true flow and appearance-free renderings (built-in brains only)."""
    if targets and data.source != "brain":
        raise XMorpherError(f"true flows and appearance-free renderings exist only for the built-in brains, not data.source = '{data.source}'")
    if data.source == "brain":
        subjects = {"train": data.train_subjects, "val": data.val_subjects, "test": data.test_subjects}[split]
        return BrainPairs(
            split, subjects, spacing_mm=data.spacing_mm, label_set=data.label_set, seed=data.seed,
            deformation=data.deformation, intensity=data.intensity, near_pairs=data.near_pairs,
            near_pair_scale_range=data.near_pair_scale_range, targets=targets,
        )
    if data.source == "shapes":
        pairs = {"train": data.shapes_train_pairs, "val": data.shapes_val_pairs, "test": data.shapes_test_pairs}[split]
        return ShapesPairs(
            split, pairs, shape=data.shapes_size, num_labels=data.shapes_labels, spacing_mm=data.spacing_mm,
            seed=data.seed, deformation=data.deformation, intensity=data.intensity,
        )
    return NiftiPairs(data.pairs_file, split, normalization=data.normalization)
