"""Data: built-in anatomy on its grid, diffeomorphic synthetic warps, labels that follow the image,
seeded and disjoint splits, users' NIfTI pairs (CSV and Learn2Reg JSON) and their bad-input errors."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy import ndimage

from xmorpher.data import (
    BrainPairs,
    DeformationParams,
    IntensityParams,
    NiftiPairs,
    ShapesPairs,
    load_brain_template,
    random_deformation,
    save_volume,
    synthesize_brain_subject,
)
from xmorpher.data.datasets import _rng, pair_indices
from xmorpher.data.synth import random_velocity
from xmorpher.errors import XMorpherError
from xmorpher.framework import dice_per_label, identity_grid, jacobian_determinant, warp, warp_labels
from xmorpher.train import Distributed, PairSampler

nib = pytest.importorskip("nibabel")
SPACING = 4.0  # 40 x 48 x 40: fast, and the grid the README's main job trains on
NO_AUGMENTATION = IntensityParams(label_contrast=0, tissue_contrast=0, bias_strength=0, gamma_std=0, blur_max=0, noise_max=0)


@pytest.fixture(autouse=True)
def one_thread():
    # a busy 2-core machine stalls multi-threaded small ops; one thread is fastest and deterministic
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_brain_template_is_on_the_mni_grid_and_labels_overlap_the_t1():
    template = load_brain_template(SPACING)
    assert template.t1.shape == template.labels.shape == (40, 48, 40)
    assert len(template.label_names) == 30 and template.label_names[0] == "background"
    assert set(np.unique(template.labels)) == set(range(30))  # every aseg structure survives 4 mm
    centre = template.affine @ np.array([20, 28.5, 18.5, 1.0])
    assert np.allclose(centre[:3], [2, 0, 0], atol=2.01)  # voxel (20, 28.5, 18.5) sits near MNI (0, 0, 0)
    brain_t1 = template.t1 > 0.1
    brain_labels = template.labels > 0
    dice = 2 * (brain_t1 & brain_labels).sum() / (brain_t1.sum() + brain_labels.sum())
    assert dice > 0.8, "atlas and template disagree: an orientation or affine went wrong"
    # white matter is bright in T1: the labels sit on the right anatomy, not just inside the head
    names = template.label_names
    wm = np.isin(template.labels, [names.index("Left-Cerebral-White-Matter"), names.index("Right-Cerebral-White-Matter")])
    ventricles = np.isin(template.labels, [names.index("Left-Lateral-Ventricle"), names.index("Right-Lateral-Ventricle")])
    assert template.t1[wm].mean() > template.t1[ventricles].mean() + 0.3
    # left structures lie at MNI x < 0 (the atlas file is LIA, the template RAS: a flip would show here)
    x_mm = template.affine[0, 0] * np.arange(40) + template.affine[0, 3]
    left = template.labels == names.index("Left-Hippocampus")
    right = template.labels == names.index("Right-Hippocampus")
    assert x_mm[np.nonzero(left)[0]].mean() < -10 and x_mm[np.nonzero(right)[0]].mean() > 10


def test_aparc_aseg_label_set_keeps_the_cortical_parcels():
    template = load_brain_template(SPACING, "aparc+aseg")
    assert len(template.label_names) > 100
    assert "ctx-lh-precuneus" in template.label_names


@pytest.mark.parametrize("seed", range(4))
def test_random_deformations_are_diffeomorphic(seed):
    rng = np.random.default_rng(seed)
    # twice the default velocity: folds would show up here first
    params = DeformationParams(velocity_std_mm=(8.0, 4.0, 2.0))
    displacement = random_deformation(rng, (40, 48, 40), SPACING, params)
    det = jacobian_determinant(displacement[None])
    assert det.min() > 0, f"folding: min |J| = {det.min():.3f}"
    assert displacement.abs().max() > 1.0, "the deformation is too small to be a test"


def test_brain_subject_labels_follow_the_image():
    template = load_brain_template(SPACING)
    subject = synthesize_brain_subject(template, np.random.default_rng(3), DeformationParams(), NO_AUGMENTATION)
    flow = subject["displacement"][None]
    # without intensity changes the image is exactly the template warped by the subject's deformation,
    # and the labels are the template labels warped by the same deformation
    expected = warp(torch.from_numpy(template.t1)[None, None], flow)[0]
    assert torch.allclose(subject["image"], expected / expected.max(), atol=1e-5)
    expected_labels = warp_labels(torch.from_numpy(template.labels)[None, None], flow)[0, 0]
    assert torch.equal(subject["labels"], expected_labels)
    assert (subject["labels"] != torch.from_numpy(template.labels)).float().mean() > 0.05  # it did move


def test_labels_explain_their_own_augmented_image_better_than_another_subjects_labels():
    dataset = BrainPairs("train", 3, spacing_mm=SPACING)

    def explained_variance(image, labels):
        """R^2 of the image predicted by the mean intensity of each label."""
        x, groups = image[0].flatten().double(), labels.flatten()
        means = torch.bincount(groups, weights=x) / torch.bincount(groups).clamp_min(1)
        return float(1 - ((x - means[groups]) ** 2).sum() / ((x - x.mean()) ** 2).sum())

    for i, j in ((0, 1), (1, 2), (2, 0)):
        image = dataset.subject(i)["image"]
        own = explained_variance(image, dataset.subject(i)["labels"])
        assert own > 0.6
        assert own > explained_variance(image, dataset.subject(j)["labels"]) + 0.03


def test_shapes_images_are_piecewise_constant_over_their_own_labels():
    dataset = ShapesPairs("train", 2, shape=(24, 24, 24), num_labels=4, intensity=NO_AUGMENTATION)
    item = dataset[0]

    def constant_fraction(image, labels):
        """Share of voxels one voxel inside their label whose intensity is the label's (median) one;
        boundary voxels mix neighbours (linear interpolation) and are left out."""
        hits = total = 0
        for label in labels.unique():
            values = image[torch.from_numpy(ndimage.binary_erosion((labels == label).numpy()))]
            hits += int((torch.abs(values - values.median()) < 0.02).sum())
            total += values.numel()
        return hits / total

    for key, other in (("moving", "fixed"), ("fixed", "moving")):
        image = item[key][0]
        own = constant_fraction(image, item[f"{key}_labels"][0])
        assert own > 0.9
        assert own > constant_fraction(image, item[f"{other}_labels"][0]) + 0.2
    scores = dice_per_label(item["moving_labels"], item["fixed_labels"])
    assert 0.2 < scores.nanmean() < 0.98  # one label map seen through two different deformations


def test_items_are_seeded_and_splits_disjoint():
    train = BrainPairs("train", 4, spacing_mm=SPACING)
    again = BrainPairs("train", 4, spacing_mm=SPACING)
    assert torch.equal(train[5]["moving"], again[5]["moving"])
    test = BrainPairs("test", 4, spacing_mm=SPACING)
    train_subjects = [train.subject(i)["image"] for i in range(4)]
    for i in range(4):
        assert all(not torch.equal(test.subject(i)["image"], image) for image in train_subjects)
    other_seed = BrainPairs("train", 4, spacing_mm=SPACING, seed=1)
    assert not torch.equal(other_seed[5]["moving"], train[5]["moving"])
    with pytest.raises(XMorpherError):
        _rng(0, "brain", "validation", 0)


def test_pair_indices_cover_ordered_pairs_and_rings():
    pairs = {pair_indices("train", 4, k) for k in range(12)}
    assert pairs == {(i, j) for i in range(4) for j in range(4) if i != j}
    assert [pair_indices("test", 3, k) for k in range(3)] == [(0, 1), (1, 2), (2, 0)]


def test_pair_sampler_splits_one_global_batch_over_ranks_and_resumes_mid_epoch():
    single = list(PairSampler(10, steps=7, batch=2, dist_info=Distributed(), seed=3, epoch=1))
    ranks = [list(PairSampler(10, 7, 1, Distributed(rank, 2), 3, 1)) for rank in range(2)]
    assert single == [index for step in zip(*ranks) for index in step]
    assert len(single) == 14 and set(single) == set(range(10))  # an epoch longer than the data reuses it
    assert list(PairSampler(10, 7, 2, Distributed(), 3, 1, start_step=4)) == single[8:]
    assert list(PairSampler(10, 7, 2, Distributed(), 3, 2)) != single


def _write(path, array, affine=np.eye(4)):
    save_volume(str(path), array, affine)
    return str(path)


@pytest.fixture
def nifti_folder(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c", "d"):
        _write(tmp_path / f"{name}.nii.gz", (rng.random((12, 10, 8)) * 300).astype(np.float32))
        _write(tmp_path / f"{name}_seg.nii.gz", rng.integers(0, 3, (12, 10, 8)).astype(np.int16))
    return tmp_path


def test_nifti_pairs_from_csv_normalizes_and_loads_labels(nifti_folder):
    (nifti_folder / "pairs.csv").write_text(
        "moving,fixed,moving_labels,fixed_labels,split\n"
        "a.nii.gz,b.nii.gz,a_seg.nii.gz,b_seg.nii.gz,train\n"
        "b.nii.gz,c.nii.gz,b_seg.nii.gz,c_seg.nii.gz,test\n"
    )
    dataset = NiftiPairs(str(nifti_folder / "pairs.csv"), "train")
    item = dataset[0]
    assert len(dataset) == 1 and item["moving"].shape == (1, 12, 10, 8)
    assert 0 <= item["moving"].min() and item["moving"].max() <= 1
    assert item["moving_labels"].dtype == torch.int64 and item["moving_labels"].max() == 2
    assert len(NiftiPairs(str(nifti_folder / "pairs.csv"), "test")) == 1
    with pytest.raises(XMorpherError, match="no val pairs"):
        NiftiPairs(str(nifti_folder / "pairs.csv"), "val")


def test_nifti_pairs_from_learn2reg_json(nifti_folder):
    spec = {
        "training": [{"image": f"./{n}.nii.gz", "label": f"./{n}_seg.nii.gz"} for n in "abcd"],
        "registration_val": [{"fixed": "./a.nii.gz", "moving": "./c.nii.gz"}],
    }
    (nifti_folder / "dataset.json").write_text(json.dumps(spec))
    train = NiftiPairs(str(nifti_folder / "dataset.json"), "train")
    assert len(train) == 2  # a and c are held out for validation: the ordered pairs of b and d remain
    val = NiftiPairs(str(nifti_folder / "dataset.json"), "val")
    assert len(val) == 1 and "moving_labels" in val[0]
    assert val[0]["name"] == "c_to_a"


@pytest.mark.parametrize(
    "problem, message",
    [("nan", "NaN"), ("4d", "expected a 3D volume"), ("shape", "differs from the fixed image"), ("missing", "do not exist")],
)
def test_nifti_pairs_reject_bad_volumes_with_one_clear_error(nifti_folder, problem, message):
    bad = nifti_folder / "bad.nii.gz"
    if problem == "nan":
        array = np.ones((12, 10, 8), np.float32)
        array[3, 3, 3] = np.nan
        _write(bad, array)
    elif problem == "4d":
        _write(bad, np.ones((12, 10, 8, 2), np.float32))
    elif problem == "shape":
        _write(bad, np.ones((12, 10, 9), np.float32))
    (nifti_folder / "pairs.csv").write_text("moving,fixed\nbad.nii.gz,a.nii.gz\n")
    with pytest.raises(XMorpherError, match=message):
        NiftiPairs(str(nifti_folder / "pairs.csv"), "train")[0]


def test_intensity_augmentation_changes_appearance_but_stays_in_unit_range():
    template = load_brain_template(SPACING)
    plain = synthesize_brain_subject(template, np.random.default_rng(5), DeformationParams(), NO_AUGMENTATION)
    augmented = synthesize_brain_subject(template, np.random.default_rng(5), DeformationParams(), replace(IntensityParams(), noise_max=0.05))
    assert torch.equal(plain["labels"], augmented["labels"])  # appearance only, same anatomy
    assert 0 <= augmented["image"].min() and augmented["image"].max() <= 1
    assert (plain["image"] - augmented["image"]).abs().mean() > 0.01


def test_neuromorphometrics_label_set_is_a_second_independent_labelling():
    template = load_brain_template(SPACING, "neuromorphometrics")
    names = template.label_names
    assert len(names) - 1 == 133  # of the atlas's 136 structures, 3 vanish at 4 mm
    assert template.labels.shape == (40, 48, 40) and set(np.unique(template.labels)) == set(range(len(names)))
    # the same orientation as the template (the atlas file is LAS, the template RAS)
    x_mm = template.affine[0, 0] * np.arange(40) + template.affine[0, 3]
    left, right = template.labels == names.index("Left_Hippocampus"), template.labels == names.index("Right_Hippocampus")
    assert x_mm[np.nonzero(left)[0]].mean() < -10 and x_mm[np.nonzero(right)[0]].mean() > 10
    brain = template.t1 > 0.1
    assert 2 * (brain & (template.labels > 0)).sum() / (brain.sum() + (template.labels > 0).sum()) > 0.85


def test_cubic_bspline_weights_sum_to_one_and_reproduce_straight_lines():
    from xmorpher.data.synth import cubic_bspline_matrix

    for size, spacing in ((40, 8.0), (17, 3.3), (5, 10.0)):
        weights = cubic_bspline_matrix(size, spacing)
        assert np.allclose(weights.sum(1), 1) and (weights >= 0).all()
        assert ((weights > 0).sum(1) <= 4).all()
        # control points at (k - 1) * spacing reproduce x exactly: uniform cubic B-splines are linear-exact
        knots = (np.arange(weights.shape[1]) - 1) * spacing
        assert np.allclose(weights @ knots, np.arange(size))


def test_free_form_deformations_have_the_requested_size_and_do_not_fold(seed):
    from xmorpher.data.datasets import GENERALIZATION_BINS_MM
    from xmorpher.data.synth import FreeFormParams, random_free_form_deformation

    brain = load_brain_template(SPACING).t1 > 0.1
    largest = GENERALIZATION_BINS_MM[-1][1]
    rng = np.random.default_rng(seed)
    for size in (0.25, largest):
        displacement = random_free_form_deformation(rng, (40, 48, 40), SPACING, FreeFormParams(), size, brain)
        assert float(displacement.norm(dim=0)[torch.from_numpy(brain)].mean()) * SPACING == pytest.approx(size, rel=1e-4)
        assert jacobian_determinant(displacement[None]).min() > 0, "the generalization deformations must not fold"


def test_generalization_pairs_are_binned_by_size_and_their_labels_follow_the_deformation():
    from xmorpher.data.datasets import GENERALIZATION_BINS_MM, GeneralizationPairs
    from xmorpher.data.synth import compose_displacements

    pairs = GeneralizationPairs(1, spacing_mm=SPACING)
    assert len(pairs) == len(GENERALIZATION_BINS_MM)
    identity_dice, recovered_dice = [], []
    for index in range(len(pairs)):
        item = pairs[index]
        low, high = GENERALIZATION_BINS_MM[item["bin"]]
        assert item["bin"] == index and low <= item["deformation_mm"] <= high
        assert item["moving"].shape == item["fixed"].shape == (1, 40, 48, 40)
        assert 0 <= item["moving"].min() and item["moving"].max() <= 1
        # labels on the atlases' 1 mm grid, from the two label sets
        assert item["fixed_labels"].shape == item["moving_labels_aseg"].shape == (1, 160, 192, 160)
        assert item["fixed_labels"].dtype == torch.uint8
        assert int(item["fixed_labels"].max()) < 137 and int(item["fixed_labels_aseg"].max()) < 30
        moving, fixed = item["moving_labels_aseg"].long(), item["fixed_labels_aseg"].long()
        identity_dice.append(float(dice_per_label(moving, fixed).nanmean()))
        # moving = fixed o (id + psi): the true flow (psi's inverse), taken to the label grid, aligns
        # the labels again up to nearest-neighbour rounding; composed with psi it is the identity
        _, psi, _ = pairs.displacements(index)
        true_flow = pairs.true_flow(index)
        assert compose_displacements(psi, true_flow[0]).abs().max() < 0.01
        recovered = warp_labels(moving[None], pairs.to_label_grid(true_flow))[0]
        recovered_dice.append(float(dice_per_label(recovered, fixed).nanmean()))
        batched = torch.utils.data.default_collate([item])
        assert pairs.score(batched, true_flow)["aseg"] == pytest.approx(recovered_dice[-1], abs=1e-12)
        assert pairs.score(batched, torch.zeros_like(true_flow))["aseg"] == pytest.approx(identity_dice[-1], abs=1e-12)
    assert identity_dice == sorted(identity_dice, reverse=True), "larger deformations must misalign more"
    assert identity_dice[0] > 0.85 and identity_dice[-1] < 0.75
    # on 1 mm labels even the nearly aligned pair's motion is visible: the exact inverse gains there
    assert all(r > i for r, i in zip(recovered_dice, identity_dice)) and min(recovered_dice) > 0.85
    assert torch.equal(item["moving"], pairs[len(pairs) - 1]["moving"])  # a pure function of the index


def test_flows_reach_the_label_grid_as_the_same_displacement_in_millimetres():
    from xmorpher.data.datasets import GeneralizationPairs

    pairs = GeneralizationPairs(1, spacing_mm=SPACING)
    shift = torch.zeros(1, 3, 40, 48, 40)
    shift[:, 1] = 0.75  # 3 mm along the second axis
    fine = pairs.to_label_grid(shift)
    assert fine.shape == (1, 3, 160, 192, 160)
    assert torch.allclose(fine[:, 1], torch.full_like(fine[:, 1], 3.0)) and fine[:, [0, 2]].abs().max() == 0
    ramp = torch.arange(40, dtype=torch.float32)[None, :, None, None].expand(1, 40, 48, 40) * 0.1
    linear = torch.cat([ramp[:, None], torch.zeros(1, 2, 40, 48, 40)], 1)
    # a displacement linear in x (0.1 image voxel per voxel) is sampled exactly between the borders,
    # and held at the border values outside them
    x_fine = (torch.arange(160, dtype=torch.float32) - 1.5) / 4  # label voxel centres in image voxels
    expected = 0.1 * x_fine.clamp(0, 39) * 4  # image voxels -> label voxels
    assert torch.allclose(pairs.to_label_grid(linear)[0, 0, :, 0, 0], expected, atol=1e-5)
    # the same as warping the flow through the two grids' affines, trilinearly with border padding
    random_flow = torch.randn(1, 3, 40, 48, 40)
    centres = [(torch.arange(n, dtype=torch.float32) - 1.5) / 4 for n in (160, 192, 160)]
    offset = torch.stack(torch.meshgrid(*centres, indexing="ij"))[None] - identity_grid((160, 192, 160))
    assert torch.allclose(pairs.to_label_grid(random_flow), 4 * warp(random_flow, offset, padding_mode="border"), atol=1e-5)


def test_dice_per_label_counts_what_a_pass_per_structure_counts():
    """The histogram count against the definition, structure by structure, on maps where some
    structures are absent from one map or from both (NaN), with a batch of two."""
    rng = np.random.default_rng(4)
    for _ in range(5):
        fixed, warped = (torch.from_numpy(rng.integers(0, 9, (2, 1, 7, 6, 5))).to(torch.uint8) for _ in range(2))
        fixed[fixed == 5] = 0  # in warped only
        warped[warped == 6] = 0  # in fixed only
        fixed[fixed == 7] = 0
        warped[warped == 7] = 0  # in neither: undefined
        structures = [1, 2, 5, 6, 7, 11]  # 11: beyond every value present
        dice = dice_per_label(warped, fixed, structures)
        assert dice.shape == (2, len(structures)) and dice.dtype == torch.float64
        for b in range(2):
            for column, label in enumerate(structures):
                w, f = warped[b] == label, fixed[b] == label
                total = int(w.sum() + f.sum())
                if total == 0:
                    assert torch.isnan(dice[b, column])
                else:
                    assert float(dice[b, column]) == pytest.approx(2 * int((w & f).sum()) / total, abs=1e-12)
        assert dice[:, structures.index(5)].eq(0).all() and dice[:, structures.index(6)].eq(0).all()


def test_training_deformation_sizes_span_the_scale_range_and_the_default_draws_nothing():
    shape, brain = (40, 48, 40), torch.from_numpy(load_brain_template(SPACING).t1 > 0.1)
    plain = random_deformation(np.random.default_rng(7), shape, SPACING, DeformationParams())
    same = random_deformation(np.random.default_rng(7), shape, SPACING, DeformationParams(scale_range=(1.0, 1.0)))
    assert torch.equal(plain, same)  # (1, 1) draws no factor: subjects of earlier versions are kept
    spread = DeformationParams(scale_range=(0.05, 2.0))
    sizes = [float(random_deformation(np.random.default_rng(i), shape, SPACING, spread).norm(dim=0)[brain].mean()) for i in range(12)]
    default_size = float(plain.norm(dim=0)[brain].mean())
    assert min(sizes) < 0.2 * default_size and max(sizes) > 1.2 * default_size
    with pytest.raises(ValueError, match="scale_range"):
        random_deformation(np.random.default_rng(0), shape, SPACING, DeformationParams(scale_range=(0.0, 1.0)))


def test_subject_cache_is_bounded_and_returns_the_same_subjects():
    cached = BrainPairs("train", 5, spacing_mm=SPACING)
    tiny = BrainPairs("train", 5, spacing_mm=SPACING, cache_mb=2)  # room for two 4 mm subjects
    for index in (0, 1, 2, 3, 0, 4, 1):
        assert torch.equal(cached.subject(index)["image"], tiny.subject(index)["image"])
        assert len(tiny._cache) <= 2
    assert cached.subject(2) is cached.subject(2)


def test_a_scale_range_of_one_value_scales_without_drawing():
    shape = (12, 10, 8)
    full = random_velocity(np.random.default_rng(3), shape, SPACING, DeformationParams())
    half = random_velocity(np.random.default_rng(3), shape, SPACING, DeformationParams(scale_range=(0.5, 0.5)))
    assert torch.equal(half, full * 0.5)


def test_near_pairs_and_targets_leave_the_inter_subject_pairs_and_register_exactly():
    plain = BrainPairs("train", 4, spacing_mm=SPACING)
    data = BrainPairs("train", 4, spacing_mm=SPACING, near_pairs=0.5, targets=True)
    assert len(plain) == 12 and len(data) == 24 and data.num_near_pairs == 12
    assert len(BrainPairs("val", 4, spacing_mm=SPACING, near_pairs=0.5)) == 4  # only training gets near pairs
    for index in (0, 7):  # the inter-subject pairs are the same pairs as without the options
        item, same = data[index], plain[index]
        assert all(torch.equal(item[key], same[key]) for key in ("moving", "fixed", "moving_labels", "fixed_labels"))
    sizes = []
    for index in (3, 12, 13, 17, 23):
        item = data[index]
        flow = item["true_flow"][None]
        sizes.append(float(flow[0].norm(dim=0).mean()) * SPACING)
        moving, fixed = item["moving_anatomy"][None], item["fixed_anatomy"][None]
        before, after = (fixed - moving).abs().mean(), (fixed - warp(moving, flow)).abs().mean()
        # the true flow aligns the two anatomies (up to interpolation, which dominates below 1 mm)
        assert after < (0.5 if sizes[-1] > 1 else 1) * before < (fixed - warp(moving, -flow)).abs().mean(), item["name"]
        labels_before = dice_per_label(item["moving_labels"][None], item["fixed_labels"][None]).nanmean()
        labels_after = dice_per_label(warp_labels(item["moving_labels"][None], flow), item["fixed_labels"][None]).nanmean()
        assert labels_after > labels_before or sizes[-1] < 0.5 * SPACING, item["name"]
        if index >= 12:
            # one subject seen twice: the fixed image is the subject, the moving one has its own appearance
            subject = (index - 12) % 4
            assert item["name"].startswith(f"train-{subject:03d}-near") and torch.equal(item["fixed"], data.subject(subject)["image"])
            if sizes[-1] < 1:
                assert (item["moving"] - item["fixed"]).abs().mean() > 3 * before
    near_sizes = sizes[1:]
    assert min(near_sizes) < 0.1 * max(near_sizes), "near pairs span nearly aligned to large"
    assert sizes[0] > max(near_sizes[:-1]) or sizes[0] > 3  # inter-subject pairs are large
    assert torch.equal(data[17]["moving"], BrainPairs("train", 4, spacing_mm=SPACING, near_pairs=0.5)[17]["moving"])
