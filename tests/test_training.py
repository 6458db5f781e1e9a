"""End to end on the CPU with the tiny preset: train, checkpoint, kill, resume (bit-exact), register,
evaluate, bad inputs through the `xmorpher` command, every model name, semi-supervised training,
distributed data parallel with gloo on 2 processes matching one process with twice the batch, and the
loss options only synthetic brains allow (appearance-free similarity, true-flow term, near pairs)."""

import csv
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import replace

import numpy as np
import pytest
import torch

from xmorpher.checkpoint import build_model_from_config, load_checkpoint
from xmorpher.cli import main
from xmorpher.config import load_config
from xmorpher.data import ShapesPairs, save_volume
from xmorpher.errors import XMorpherError
from xmorpher.framework import warp
from xmorpher.registration import Registrar, mean_displacement, refine_flow, register
import xmorpher
from xmorpher.train import train

# Subprocesses import the very packages these tests imported (installed or a source tree given
# by PYTHONPATH) and run away from the source tree, which would otherwise shadow them.
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(xmorpher.__file__)))
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1",
                  "PYTHONPATH": PACKAGE_PARENT + os.pathsep + os.environ.get("PYTHONPATH", "")}
# 3 epochs x 4 steps, a checkpoint every 2 steps: a kill after the first checkpoint leaves work to
# redo; stochastic depth draws from the torch RNG, so resuming must restore it too
RUN = ["--config", "tiny", "--set", "train.epochs=3", "--set", "train.steps_per_epoch=4",
       "--set", "model.xmorpher.drop_path_rate=0.2", "--no-progress"]


def cli(*args, check=True, **kwargs):
    """`python -m xmorpher.cli ...` in a fresh interpreter, as a user runs it."""
    result = subprocess.run([sys.executable, "-m", "xmorpher.cli", *args], capture_output=True, text=True,
                            env=SUBPROCESS_ENV, cwd=tempfile.gettempdir(), **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"xmorpher {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


def states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def log_rows(run_dir):
    with open(os.path.join(run_dir, "log.csv")) as handle:
        return [{k: v for k, v in row.items() if k != "pairs_per_s"} for row in csv.DictReader(handle)]


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("runs") / "uninterrupted")
    cli("train", *RUN, "--out", run_dir)
    return run_dir


def test_killed_run_resumes_to_the_same_parameters_as_an_uninterrupted_one(uninterrupted_run, tmp_path):
    run_dir = str(tmp_path / "killed")
    process = subprocess.Popen(
        [sys.executable, "-m", "xmorpher.cli", "train", *RUN, "--out", run_dir],
        cwd=tempfile.gettempdir(), env=SUBPROCESS_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    last = os.path.join(run_dir, "last.pt")
    deadline = time.time() + 120
    while not os.path.exists(last) and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = load_checkpoint(last)["step"]
    assert 0 < killed_at < 12

    cli("train", "--out", run_dir, "--resume", "--no-progress")
    resumed, reference = load_checkpoint(last), load_checkpoint(os.path.join(uninterrupted_run, "last.pt"))
    assert resumed["step"] == reference["step"] == 12
    assert states_equal(resumed["model"], reference["model"]), "resume did not reproduce the parameters"
    assert resumed["optimizer"]["state"].keys() == reference["optimizer"]["state"].keys()
    for key, state in reference["optimizer"]["state"].items():
        assert all(torch.equal(state[name], resumed["optimizer"]["state"][key][name]) for name in state)
    assert resumed["best"] == reference["best"]
    assert log_rows(run_dir) == log_rows(uninterrupted_run)  # rows after the checkpoint were replaced, not repeated
    assert not [name for name in os.listdir(run_dir) if ".tmp" in name]


def test_register_writes_nifti_with_the_fixed_affine_and_a_panel(uninterrupted_run, tmp_path):
    item = ShapesPairs("test", 1, shape=(16, 16, 16), num_labels=3)[0]
    affine = np.diag([2.0, 3.0, 4.0, 1.0])
    affine[:3, 3] = [10, -20, 30]
    paths = {}
    for key in ("moving", "fixed", "moving_labels"):
        paths[key] = str(tmp_path / f"{key}.nii.gz")
        data = item[key][0].numpy()
        save_volume(paths[key], data.astype(np.int16) if "labels" in key else data * 1000, affine if key == "fixed" else np.eye(4))
    out = tmp_path / "registered"
    cli("register", "--checkpoint", os.path.join(uninterrupted_run, "best.pt"), "--moving", paths["moving"], "--fixed",
        paths["fixed"], "--moving-labels", paths["moving_labels"], "--out", str(out))
    nib = pytest.importorskip("nibabel")
    warped = nib.load(str(out / "warped.nii.gz"))
    field = nib.load(str(out / "displacement.nii.gz"))
    labels = nib.load(str(out / "warped_labels.nii.gz"))
    assert np.allclose(warped.affine, affine) and np.allclose(field.affine, affine) and np.allclose(labels.affine, affine)
    assert warped.shape == (16, 16, 16) and field.shape == (16, 16, 16, 3)
    assert warped.get_fdata().max() > 100  # the moving image's own intensities, not normalized ones
    assert set(np.unique(labels.get_fdata())) <= set(np.unique(item["moving_labels"].numpy()))
    assert (out / "panel.png").stat().st_size > 10_000

    # the Python API gives the same field as the command
    result = register(paths["moving"], paths["fixed"], os.path.join(uninterrupted_run, "best.pt"), device="cpu")
    assert np.allclose(np.moveaxis(result.displacement, 0, -1), field.get_fdata(), atol=1e-6)


def test_register_set_changes_only_the_checkpoints_refinement_settings(uninterrupted_run, tmp_path):
    checkpoint = os.path.join(uninterrupted_run, "best.pt")
    overrides = ["evaluate.refine_steps=3", "evaluate.refine_diffusion_weight=7"]
    stored, changed = Registrar(checkpoint, "cpu"), Registrar(checkpoint, "cpu", overrides=overrides)
    assert changed.settings == replace(stored.settings, refine_steps=3, refine_diffusion_weight=7.0) != stored.settings
    assert changed.refine_steps == 3 and stored.refine_steps == stored.settings.refine_steps
    item = ShapesPairs("test", 1, shape=(16, 16, 16), num_labels=3)[0]
    paths = {}
    for key in ("moving", "fixed"):
        paths[key] = str(tmp_path / f"{key}.nii.gz")
        save_volume(paths[key], item[key][0].numpy(), np.eye(4))
    out = tmp_path / "registered"
    cli("register", "--checkpoint", checkpoint, "--moving", paths["moving"], "--fixed", paths["fixed"], "--out", str(out),
        *[arg for override in overrides for arg in ("--set", override)])
    nib = pytest.importorskip("nibabel")
    field = np.moveaxis(nib.load(str(out / "displacement.nii.gz")).get_fdata(), -1, 0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the command ran: the refinement's Adam steps then match to rounding
    try:
        as_changed = register(paths["moving"], paths["fixed"], checkpoint, device="cpu", overrides=overrides).displacement
        as_stored = register(paths["moving"], paths["fixed"], checkpoint, device="cpu").displacement
    finally:
        torch.set_num_threads(threads)
    assert np.allclose(field, as_changed, atol=1e-6) and not np.allclose(field, as_stored, atol=1e-3)
    # --refine-steps (refine_steps=) wins over an evaluate.refine_steps override, and the settings say so
    assert Registrar(checkpoint, "cpu", refine_steps=5, overrides=overrides).settings.refine_steps == 5
    refusals = {"evaluate.refine_* overrides (the refinement's settings), got train.lr=1, evaluate.split=val":
                ["evaluate.refine_steps=3", "train.lr=1", "evaluate.split=val"],
                "refine_small_motion": ["evaluate.refine_small_motion=-1"],
                "got the string 'evaluate.refine_steps=3'": "evaluate.refine_steps=3"}
    for message, refused in refusals.items():
        with pytest.raises(XMorpherError, match=re.escape(message)):
            Registrar(checkpoint, "cpu", overrides=refused)


@pytest.mark.parametrize("similarity", ["ngf", "ncc", "local-fit"])
def test_refinement_recovers_a_known_translation_from_the_identity(similarity):
    """A smooth ball moved by a sub-voxel translation t: moving(p + t) = fixed(p), so t is the true
    flow; refining the zero flow on the pair's own loss finds it to a fifth of its length."""
    n = 20
    grid = torch.stack(torch.meshgrid(*(torch.arange(float(n)) for _ in range(3)), indexing="ij"))
    fixed = torch.sigmoid(2 * (5 - ((grid - 9.5) ** 2).sum(0).sqrt()))[None, None]
    truth = torch.tensor([0.0, 0.6, -0.4]).view(1, 3, 1, 1, 1).expand(1, 3, n, n, n).contiguous()
    moving = warp(fixed, -truth)
    train_config = load_config("tiny", [f"train.similarity={similarity}"]).train
    start = torch.zeros(1, 3, n, n, n)
    assert torch.equal(refine_flow(moving, fixed, start, train_config, 0, 0.05, 1.0), start)
    refined = refine_flow(moving, fixed, start, train_config, 150, 0.05, 1.0)
    # a ball's edge fixes only the normal part of the motion at each point; the translation as a whole
    # is fixed by the ball: the mean flow over it, its edge included
    inside = ((grid - 9.5) ** 2).sum(0).sqrt() < 7
    error = (refined[0][:, inside].mean(1) - truth[0, :, 0, 0, 0]).norm()
    assert error < 0.2 * truth[0, :, 0, 0, 0].norm(), float(error)
    with pytest.raises(XMorpherError, match="refinement"):
        refine_flow(moving, fixed, start, train_config, -1, 0.05, 1.0)


def test_similarity_loss_computes_every_named_similarity_and_refuses_others():
    """Every name the config accepts has its own loss (none falls through to another), and a name it
    does not accept fails in the loss too, for configs built without validation."""
    from xmorpher.config import SIMILARITIES
    from xmorpher.train import similarity_loss

    generator = torch.Generator().manual_seed(5)
    fixed, warped = torch.rand(2, 1, 1, 10, 10, 10, generator=generator)
    train = load_config("tiny", []).train
    values = {name: float(similarity_loss(replace(train, similarity=name), fixed, warped)) for name in SIMILARITIES}
    assert all(np.isfinite(value) for value in values.values())
    assert len(set(values.values())) == len(SIMILARITIES), values
    with pytest.raises(XMorpherError, match="train.similarity must be one of"):
        similarity_loss(replace(train, similarity="ssd"), fixed, warped)


def test_refinement_similarity_other_than_the_training_one():
    """``similarity`` names the refinement's own image similarity ("train": the network's), with the
    training config's settings for it."""
    generator = torch.Generator().manual_seed(3)
    moving, fixed = torch.rand(2, 1, 1, 12, 12, 12, generator=generator)
    start = torch.zeros(1, 3, 12, 12, 12)
    ngf_config = load_config("tiny", ["train.similarity=ngf"]).train
    local_fit_config = load_config("tiny", ["train.similarity=local-fit"]).train
    by_name = refine_flow(moving, fixed, start, ngf_config, 3, 0.05, 1.0, similarity="local-fit")
    torch.testing.assert_close(by_name, refine_flow(moving, fixed, start, local_fit_config, 3, 0.05, 1.0))
    torch.testing.assert_close(refine_flow(moving, fixed, start, ngf_config, 3, 0.05, 1.0, similarity="train"),
                               refine_flow(moving, fixed, start, ngf_config, 3, 0.05, 1.0, similarity="ngf"))
    assert not torch.allclose(by_name, refine_flow(moving, fixed, start, ngf_config, 3, 0.05, 1.0))
    with pytest.raises(XMorpherError, match="refinement similarity"):
        refine_flow(moving, fixed, start, ngf_config, 3, 0.05, 1.0, similarity="ssd")
    with pytest.raises(XMorpherError, match="evaluate.refine_similarity"):
        load_config("tiny", ["evaluate.refine_similarity=ssd"])
    with pytest.raises(XMorpherError, match="train.local_fit_window"):
        load_config("tiny", ["train.local_fit_window=4"])


def test_registrar_refines_as_the_checkpoint_says_unless_told_otherwise(uninterrupted_run, tmp_path):
    checkpoint = os.path.join(uninterrupted_run, "best.pt")
    item = ShapesPairs("test", 1, shape=(16, 16, 16), num_labels=3)[0]
    moving, fixed = item["moving"][None], item["fixed"][None]
    plain = Registrar(checkpoint, "cpu")
    assert plain.refine_steps == 0  # the default: the network's prediction as it is
    refined = Registrar(checkpoint, "cpu", refine_steps=5)
    predicted = plain.flow(moving, fixed)
    expected = refine_flow(moving, fixed, predicted, refined.config.train, 5, 0.05, 1.0)  # the defaults
    assert torch.allclose(refined.flow(moving, fixed), expected, atol=1e-6)
    assert not torch.allclose(expected, predicted)
    settings = replace(refined.config.evaluate, refine_similarity="local-fit", refine_diffusion_weight=2.0)
    other = Registrar(checkpoint, "cpu", refine_steps=5, evaluate=settings)
    expected = refine_flow(moving, fixed, predicted, other.config.train, 5, 0.05, 2.0, "local-fit")
    assert torch.allclose(other.flow(moving, fixed), expected, atol=1e-6)
    result = register(item["moving"][0].numpy(), item["fixed"][0].numpy(), checkpoint, device="cpu", refine_steps=5)
    assert result.displacement.shape == (3, 16, 16, 16)
    with pytest.raises(XMorpherError, match="refine_steps"):
        Registrar(checkpoint, "cpu", refine_steps=-2)
    with pytest.raises(XMorpherError, match="refine_steps"):
        load_config("tiny", ["evaluate.refine_steps=-1"])


def test_mean_displacement_is_each_pairs_mean_length():
    flow = torch.zeros(2, 3, 4, 5, 6)
    flow[0, 0], flow[0, 1] = 3.0, 4.0  # length 5 everywhere
    flow[1, 2, :2] = -1.0  # length 1 on the first 2 of 4 slices
    torch.testing.assert_close(mean_displacement(flow), torch.tensor([5.0, 0.5]))


def test_registrar_refines_small_motion_again_from_zero_at_its_own_diffusion_weight(uninterrupted_run):
    checkpoint = os.path.join(uninterrupted_run, "best.pt")
    item = ShapesPairs("test", 1, shape=(16, 16, 16), num_labels=3)[0]
    # a pair that needs motion, and the same fixed image seen twice: the one pair of the batch that needs none
    moving = torch.stack([item["moving"], item["fixed"]])
    fixed = torch.stack([item["fixed"], item["fixed"]])
    plain = Registrar(checkpoint, "cpu")
    predicted = plain.predict(moving, fixed)
    train = plain.config.train
    light = refine_flow(moving, fixed, predicted, train, 5, 0.05, 0.5)
    heavy_alone = refine_flow(moving[1:], fixed[1:], torch.zeros_like(predicted[1:]), train, 5, 0.05, 8.0)
    sizes = mean_displacement(light)
    assert sizes[1] < sizes[0], "the pair seen twice should move less"

    def refined(threshold: float) -> torch.Tensor:
        settings = replace(plain.config.evaluate, refine_diffusion_weight=0.5, refine_small_motion=threshold,
                           refine_small_motion_diffusion_weight=8.0)
        return Registrar(checkpoint, "cpu", refine_steps=5, evaluate=settings).refine(moving, fixed, predicted)

    torch.testing.assert_close(refined(0.0), light)  # off: one weight for every pair
    between = refined(float(sizes.mean()))
    torch.testing.assert_close(between[0], light[0])
    torch.testing.assert_close(between[1], heavy_alone[0])
    assert not torch.allclose(heavy_alone[0], light[1])
    above_both = refined(float(sizes.max()) + 1.0)
    torch.testing.assert_close(above_both, refine_flow(moving, fixed, torch.zeros_like(predicted), train, 5, 0.05, 8.0))
    for key in ("evaluate.refine_small_motion=-0.1", "evaluate.refine_small_motion_diffusion_weight=-1"):
        with pytest.raises(XMorpherError, match="refine_small_motion"):
            load_config("tiny", [key])


def test_evaluate_prints_a_table_and_writes_csv_and_json(uninterrupted_run, tmp_path):
    out = tmp_path / "evaluation"
    result = cli("evaluate", "--checkpoint", os.path.join(uninterrupted_run, "best.pt"), "--out", str(out), "--no-progress")
    assert "identity" in result.stdout and "xmorpher" in result.stdout and "HD95" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["methods"]) == {"identity", "xmorpher"}
    identity = summary["methods"]["identity"]
    assert identity["nonpositive_jacobian_percent"]["mean"] == 0 and identity["sd_log_jacobian"]["mean"] == 0
    assert 0 < identity["dice"]["mean"] < 1 and identity["hd95"]["mean"] > 0
    with open(out / "per_pair.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 2 * summary["pairs"]
    assert (out / "example.png").exists()


def test_bad_inputs_end_in_one_error_line_and_a_nonzero_exit(uninterrupted_run, tmp_path):
    good = str(tmp_path / "good.nii.gz")
    save_volume(good, np.random.rand(16, 16, 16).astype(np.float32), np.eye(4))
    nan = np.random.rand(16, 16, 16).astype(np.float32)
    nan[1, 2, 3] = np.nan
    save_volume(str(tmp_path / "nan.nii.gz"), nan, np.eye(4))
    save_volume(str(tmp_path / "4d.nii.gz"), np.random.rand(16, 16, 16, 2).astype(np.float32), np.eye(4))
    save_volume(str(tmp_path / "small.nii.gz"), np.random.rand(16, 16, 8).astype(np.float32), np.eye(4))
    (tmp_path / "broken.nii.gz").write_bytes(b"not a nifti at all")
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    checkpoint = os.path.join(uninterrupted_run, "best.pt")
    # a checkpoint whose weights do not fit its own config: a wider embedding than was trained
    payload = torch.load(checkpoint, weights_only=True)
    payload["config"]["model"]["xmorpher"]["embed_dim"] = 16
    torch.save(payload, str(tmp_path / "incompatible.pt"))

    def register_args(moving, fixed=good, ckpt=checkpoint):
        return ["register", "--checkpoint", ckpt, "--moving", moving, "--fixed", fixed, "--out", str(tmp_path / "out")]

    cases = {
        "no such file": register_args(str(tmp_path / "missing.nii.gz")),
        "cannot read as NIfTI": register_args(str(tmp_path / "broken.nii.gz")),
        "expected a 3D volume": register_args(str(tmp_path / "4d.nii.gz")),
        "differs from the fixed image": register_args(str(tmp_path / "small.nii.gz")),
        "NaN": register_args(str(tmp_path / "nan.nii.gz")),
        "not a readable checkpoint": register_args(good, ckpt=str(tmp_path / "broken.pt")),
        "weights do not fit": register_args(good, ckpt=str(tmp_path / "incompatible.pt")),
        "takes only evaluate.refine_* overrides": register_args(good) + ["--set", "train.lr=1"],
        "unknown config key": ["train", "--config", "tiny", "--set", "train.learning_rate=1", "--out", str(tmp_path / "x")],
        "already holds a run": ["train", "--config", "tiny", "--out", uninterrupted_run],
        "nothing to resume": ["train", "--resume", "--out", str(tmp_path / "empty")],
    }
    for message, args in cases.items():
        result = cli(*args, check=False) if message == "no such file" else None
        if result is not None:  # one real subprocess: exit status and stderr as a user sees them
            code, stderr = result.returncode, result.stderr
        else:
            with _captured() as captured:
                code = main(args)
            stderr = captured.err
        assert code == 2, f"{message}: exit {code}"
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("xmorpher: error:") and message in lines[0], f"{message}: {stderr!r}"
        assert "Traceback" not in stderr


class _captured:
    """Capture stderr written by an in-process `main` call."""

    def __enter__(self):
        import io

        self._stderr, sys.stderr = sys.stderr, io.StringIO()
        return self

    def __exit__(self, *exc):
        self.err = sys.stderr.getvalue()
        sys.stderr = self._stderr
        return False


@pytest.mark.parametrize("name", ["xmorpher-nocross", "voxelmorph"])
def test_every_model_trains_through_the_same_loop(name, tmp_path):
    config = load_config("tiny", ["train.epochs=1", "train.steps_per_epoch=2", f"model.name={name}"])
    summary = train(config, str(tmp_path / name), progress=False)
    assert summary["step"] == 2 and os.path.exists(tmp_path / name / "best.pt")
    assert load_checkpoint(str(tmp_path / name / "best.pt"))["config"]["model"]["name"] == name


def test_semi_supervised_training_logs_a_dice_term(tmp_path):
    config = load_config("tiny", ["train.epochs=1", "train.steps_per_epoch=2", "train.mode=semi-supervised"])
    train(config, str(tmp_path / "semi"), progress=False)
    rows = [row for row in log_rows(str(tmp_path / "semi")) if row["dice_loss"]]
    assert len(rows) == 2 and all(0 < float(row["dice_loss"]) <= 1 for row in rows)


def test_ddp_with_gloo_on_two_processes_matches_one_process_with_twice_the_batch(tmp_path):
    common = ["--config", "tiny", "--set", "train.epochs=1", "--set", "train.steps_per_epoch=3", "--no-progress"]
    distributed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "xmorpher.cli", "train", *common, "--out", str(tmp_path / "ddp")],
        capture_output=True, text=True, env=SUBPROCESS_ENV, cwd=tempfile.gettempdir(), timeout=300,
    )
    assert distributed.returncode == 0, distributed.stderr[-3000:]
    cli("train", *common, "--set", "train.batch_size=2", "--out", str(tmp_path / "single"))
    ddp, single = load_checkpoint(str(tmp_path / "ddp" / "last.pt")), load_checkpoint(str(tmp_path / "single" / "last.pt"))
    assert len(ddp["rng"]) == 2 and ddp["step"] == single["step"] == 3
    for key, value in single["model"].items():
        # same pairs, same averaged gradients; only the summation order differs
        assert torch.allclose(ddp["model"][key], value, rtol=1e-4, atol=1e-6), key
    torch.manual_seed(0)
    initial = build_model_from_config(load_config("tiny")).state_dict()
    assert any(not torch.allclose(initial[k], v) for k, v in single["model"].items()), "training changed nothing"


def test_config_file_round_trips_every_hyperparameter(tmp_path, capsys):
    assert main(["config", "--config", "brain-cpu", "--set", "train.lr=3e-4", "--set", "data.intensity.gamma_std=0.5"]) == 0
    path = tmp_path / "my.toml"
    path.write_text(capsys.readouterr().out)
    loaded = load_config(str(path))
    assert loaded == load_config("brain-cpu", ["train.lr=3e-4", "data.intensity.gamma_std=0.5"])
    assert loaded.train.lr == 3e-4 and loaded.data.intensity.gamma_std == 0.5 and loaded.data.spacing_mm == 4.0
    (tmp_path / "my.json").write_text(json.dumps({"train": {"epochs": 3}, "model": {"name": "voxelmorph"}}))
    assert load_config(str(tmp_path / "my.json")).model.options() == {}


def test_the_loss_can_compare_appearance_free_renderings_and_the_true_flow():
    from xmorpher.framework import diffusion_loss, ncc_loss
    from xmorpher.train import registration_losses

    generator = torch.Generator().manual_seed(0)
    anatomy = torch.rand(1, 1, 12, 10, 8, generator=generator)
    true_flow = torch.randn(1, 3, 12, 10, 8, generator=generator)
    flow = torch.randn(1, 3, 12, 10, 8, generator=generator)
    # the network's images are unrelated noise; the anatomy is one and the same
    batch = {"moving": torch.rand(1, 1, 12, 10, 8, generator=generator), "fixed": torch.rand(1, 1, 12, 10, 8, generator=generator),
             "moving_anatomy": anatomy, "fixed_anatomy": anatomy, "true_flow": true_flow}
    paper = registration_losses(load_config("brain-cpu", ["train.similarity=ncc", "train.similarity_images=input"]).train, batch, flow, None)
    assert paper["similarity"] == ncc_loss(batch["fixed"], warp(batch["moving"], flow)) and "flow_error" not in paper
    assert paper["loss"] == paper["similarity"] + diffusion_loss(flow)
    train_config = load_config("brain-cpu", ["train.similarity=ncc", "train.similarity_images=anatomy", "train.flow_weight=0.5", "train.similarity_weight=2",
                                             "train.diffusion_weight=0.25"]).train
    terms = registration_losses(train_config, batch, flow, None)
    assert terms["similarity"] == ncc_loss(anatomy, warp(anatomy, flow))
    assert torch.allclose(terms["flow_error"], ((flow - true_flow) ** 2).sum(1).mean())
    assert torch.allclose(terms["loss"], 2 * terms["similarity"] + 0.25 * terms["diffusion"] + 0.5 * terms["flow_error"])
    at_truth = registration_losses(train_config, batch, true_flow, None)
    assert at_truth["flow_error"] == 0


def test_synthetic_only_options_need_the_brains_and_weights_are_checked():
    for setting in ("train.flow_weight=1", "train.similarity_images=anatomy", "data.near_pairs=0.2"):
        with pytest.raises(XMorpherError, match="built-in brains"):
            load_config("tiny", [setting])
    for setting, message in (("train.flow_weight=-1", "flow_weight"), ("data.near_pairs=1", "near_pairs"),
                             ("data.near_pair_scale_range=[0, 1]", "near_pair_scale_range"), ("train.similarity_images=both", "similarity_images")):
        with pytest.raises(XMorpherError, match=message):
            load_config("brain-cpu", [setting])


def test_training_on_near_pairs_with_the_true_flow_logs_its_error(tmp_path):
    config = load_config("brain-cpu", [
        "data.spacing_mm=8.0", "data.train_subjects=3", "data.val_subjects=2", "data.test_subjects=2", "data.near_pairs=0.5",
        "train.similarity_images=anatomy", "train.flow_weight=1.0", "train.epochs=1", "train.steps_per_epoch=3",
        "train.log_every=1", "train.threads=1",
        'model.xmorpher={"embed_dim": 8, "depths": [1, 1], "num_heads": [1, 2], "head_channels": 8}',
    ])
    train(config, str(tmp_path / "near"), progress=False)
    rows = [row for row in log_rows(str(tmp_path / "near")) if row["flow_error"]]
    assert len(rows) == 3 and all(float(row["flow_error"]) > 0 for row in rows)
