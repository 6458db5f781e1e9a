"""The registration study end to end with --quick (tiny brains, tiny networks, a few steps): every
variant trains over its seeds, checkpoints stay, the comparison is written (summary.json, table.md,
figures), parameter counts are matched, and a second start reuses the finished runs."""

import json
import os
import subprocess
import sys
import tempfile

import pytest
import torch

import xmorpher

for package in ("scipy", "matplotlib", "nibabel", "tqdm"):
    pytest.importorskip(package)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "registration_study.py")
# the subprocess imports the very xmorpher these tests imported (installed, or a source tree on PYTHONPATH)
ENV = {**os.environ, "OMP_NUM_THREADS": "1",
       "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(xmorpher.__file__))) + os.pathsep + os.environ.get("PYTHONPATH", "")}
VARIANTS = ("xmorpher", "xmorpher-nocross", "voxelmorph", "xmorpher-diffeomorphic", "xmorpher-search4", "xmorpher-search8")


def study(out: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, SCRIPT, "--quick", "--out", out], capture_output=True, text=True, env=ENV,
                            cwd=tempfile.gettempdir(), timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("study") / "quick")
    return out, study(out)


def test_every_variant_trains_over_its_seeds_and_keeps_its_checkpoints(quick_study):
    out, _ = quick_study
    summary = json.loads(open(os.path.join(out, "summary.json")).read())
    assert tuple(summary["variants"]) == VARIANTS
    for label, row in summary["variants"].items():
        assert row["seeds"] == ([0, 1] if "search" not in label else [0])
        for seed in row["seeds"]:
            folder = os.path.join(out, "runs", label, f"seed{seed}")
            assert {"best.pt", "last.pt", "log.csv", "config.toml", "run.json"} <= set(os.listdir(folder))
        assert len(row["pair_dice"]) == summary["test_pairs"] == 4
        assert 0 < row["test"]["dice"]["mean"] < 1 and row["seconds_per_pair"]["mean"] > 0
        assert row["test"]["sd_log_jacobian"]["mean"] > 0  # trained: the flows are no longer zero
        assert set(row["dice_per_structure"]) == set(summary["identity"]["dice_per_structure"])


def test_networks_are_matched_in_parameters_and_the_ablations_differ_as_asked(quick_study):
    out, _ = quick_study
    variants = json.loads(open(os.path.join(out, "summary.json")).read())["variants"]
    reference = variants["xmorpher"]["parameters"]
    for label in ("xmorpher-nocross", "voxelmorph"):
        assert abs(variants[label]["parameters"] - reference) / reference < 0.1, label
    assert variants["xmorpher-diffeomorphic"]["options"]["diffeomorphic"] is True
    assert [variants[f"xmorpher-search{s}"]["options"]["search_size"] for s in (4, 8)] == [4, 8]
    assert variants["xmorpher-search4"]["forward_gflops"] < variants["xmorpher"]["forward_gflops"] < variants["xmorpher-search8"]["forward_gflops"]


def test_the_comparison_has_its_statistics_and_generalization_bins(quick_study):
    out, _ = quick_study
    summary = json.loads(open(os.path.join(out, "summary.json")).read())
    identity = summary["identity"]["test"]
    assert identity["nonpositive_jacobian_percent"]["mean"] == 0 and identity["sd_log_jacobian"]["mean"] == 0
    assert "xmorpher_versus_this" not in summary["variants"]["xmorpher"]
    for label in VARIANTS[1:]:
        test = summary["variants"][label]["xmorpher_versus_this"]
        assert test["pairs"] == 4 and (test["p_value"] is None or 0 < test["p_value"] <= 1)
    bins = len(summary["bins_mm"])
    for label_set in ("neuromorphometrics", "aseg"):
        ceiling = summary["true_deformation"]["generalization"][label_set]
        assert ceiling[-1] > 0.1 and min(ceiling) > -0.01  # the exact inverse gains where labels can move
        for row in summary["variants"].values():
            assert [b["bin"] for b in row["generalization"][label_set]] == list(range(bins))
    table = open(os.path.join(out, "table.md")).read()
    assert all(f"| {label} |" in table for label in ("identity", *VARIANTS))
    assert "true deformation" in table and "Machine:" in table
    for figure in ("validation_dice", "dice_per_structure", "same_pair", "generalization"):
        assert os.path.getsize(os.path.join(out, "figures", f"{figure}.png")) > 10_000


def test_a_second_start_reuses_the_finished_runs(quick_study):
    out, _ = quick_study
    checkpoint = os.path.join(out, "runs", "xmorpher", "seed0", "best.pt")
    before = os.path.getmtime(checkpoint)
    again = study(out)
    assert os.path.getmtime(checkpoint) == before
    log = again.stdout + again.stderr
    assert log.count("trained earlier") == 10 and " min, best val Dice" not in log


def test_checkpoints_are_scored_as_the_network_predicts_or_refined(quick_study, tmp_path):
    """--checkpoint with --refine-steps 0 reproduces the study's own scores of that network exactly;
    with refinement steps the flows change (their log-Jacobian spread: a few steps at 8 mm need not
    move a label across a voxel)."""
    out, _ = quick_study
    run = os.path.join(out, "runs", "xmorpher", "seed0")
    with open(os.path.join(run, "run.json")) as handle:
        trained = json.load(handle)
    scored = {}
    for steps in (0, 10):
        folder = str(tmp_path / f"refine{steps}")
        result = subprocess.run([sys.executable, SCRIPT, "--checkpoint", os.path.join(run, "best.pt"), "--refine-steps", str(steps),
                                 "--generalization-pairs", "1", "--out", folder], capture_output=True, text=True, env=ENV,
                                cwd=tempfile.gettempdir(), timeout=900)
        assert result.returncode == 0, result.stderr[-4000:]
        with open(os.path.join(folder, "summary.json")) as handle:
            scored[steps] = json.load(handle)["variants"]["seed0"]
    assert scored[0]["pair_dice"] == pytest.approx([pair["dice"] for pair in trained["test"]], abs=1e-9)
    spread = {steps: scored[steps]["per_seed"][0]["sd_log_jacobian"] for steps in scored}
    assert spread[0] == pytest.approx(sum(pair["sd_log_jacobian"] for pair in trained["test"]) / len(trained["test"]), rel=1e-6)
    assert spread[10] != pytest.approx(spread[0], rel=1e-3)
    refusals = {"--refine-steps scores checkpoints": ["--refine-steps", "2"],
                "--set changes refinement settings of checkpoints": ["--set", "evaluate.refine_steps=2"],
                "--set: a trained checkpoint takes only evaluate.refine_* overrides": ["--checkpoint", "x.pt", "--set", "evaluate.split=val"],
                "refine_small_motion": ["--checkpoint", "x.pt", "--set", "evaluate.refine_small_motion=-1"]}
    for message, option in refusals.items():
        refused = subprocess.run([sys.executable, SCRIPT, "--out", str(tmp_path / "x"), *option], capture_output=True,
                                 text=True, env=ENV, cwd=tempfile.gettempdir(), timeout=300)
        assert refused.returncode == 2 and message in refused.stderr.splitlines()[-1], refused.stderr


def test_set_scores_a_checkpoint_as_a_copy_that_stores_the_change(quick_study, tmp_path):
    """--set evaluate.KEY=VALUE scores a checkpoint exactly as a copy whose stored config holds that
    value, and differently from the checkpoint as stored."""
    out, _ = quick_study
    original = os.path.join(out, "runs", "xmorpher", "seed0", "best.pt")
    payload = torch.load(original, map_location="cpu", weights_only=False)
    # every pair at one heavy weight (no second pass for small motion, which tiny pairs would all take)
    payload["config"]["evaluate"] = {**payload["config"]["evaluate"], "refine_small_motion": 0.0, "refine_diffusion_weight": 1000.0}
    os.makedirs(tmp_path / "copy" / "seed0")
    copy = str(tmp_path / "copy" / "seed0" / "best.pt")
    torch.save(payload, copy)
    scored = {}
    overrides = ["--set", "evaluate.refine_small_motion=0", "--set", "evaluate.refine_diffusion_weight=1000"]
    for name, args in {"stored": [original], "set": [original, *overrides], "copy": [copy]}.items():
        folder = str(tmp_path / name)
        result = subprocess.run([sys.executable, SCRIPT, "--checkpoint", *args, "--refine-steps", "10", "--generalization-pairs", "1",
                                 "--out", folder], capture_output=True, text=True, env=ENV, cwd=tempfile.gettempdir(), timeout=900)
        assert result.returncode == 0, result.stderr[-4000:]
        with open(os.path.join(folder, "summary.json")) as handle:
            scored[name] = json.load(handle)["variants"]["seed0"]
    for key in ("pair_dice", "generalization"):
        assert scored["set"][key] == scored["copy"][key]
    spread = {name: scored[name]["per_seed"][0]["sd_log_jacobian"] for name in scored}
    assert spread["set"] == spread["copy"] != pytest.approx(spread["stored"], rel=1e-3)


def test_the_objective_probe_scores_the_identity_as_no_change_and_the_truth_as_a_gain(tmp_path):
    """benchmarks/objective_optimum.py with zero steps: from the identity every bin changes by exactly
    0; from the exact answer the large bin gains (what a perfect registration gains)."""
    probe = os.path.join(ROOT, "benchmarks", "objective_optimum.py")
    rows = {}
    for start in ("identity", "truth"):
        result = subprocess.run([sys.executable, probe, "--start", start, "--steps", "0", "--pairs-per-bin", "1", "--spacing-mm", "8",
                                 "--diffusion-weight", "1", "4", "--threads", "1"], capture_output=True, text=True, env=ENV,
                                cwd=tempfile.gettempdir(), timeout=900)
        assert result.returncode == 0, result.stderr[-4000:]
        rows[start] = [line for line in result.stdout.splitlines() if line.startswith("| ngf")]
    assert len(rows["identity"]) == 2 and all(row.count("+0.0000 (lower on 0/1)") == 4 for row in rows["identity"])
    large = [float(row.split("|")[-2].split()[0]) for row in rows["truth"]]
    assert all(gain > 0.05 for gain in large), rows["truth"]
    # appearance changes alter the images, not the labels: the exact answer gains as much without them
    plain = subprocess.run([sys.executable, probe, "--start", "truth", "--steps", "0", "--pairs-per-bin", "1", "--spacing-mm", "8",
                            "--diffusion-weight", "1", "--threads", "1", "--appearance", "none"], capture_output=True, text=True,
                           env=ENV, cwd=tempfile.gettempdir(), timeout=900)
    assert plain.returncode == 0 and "appearance changes: none" in plain.stdout, plain.stderr[-4000:]
    assert [line for line in plain.stdout.splitlines() if line.startswith("| ngf")] == rows["truth"][:1]
    refused = subprocess.run([sys.executable, probe, "--appearance", "glare"], capture_output=True, text=True, env=ENV,
                             cwd=tempfile.gettempdir(), timeout=300)
    assert refused.returncode != 0 and "--appearance" in refused.stderr and "glare" in refused.stderr
