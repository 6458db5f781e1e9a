"""Does cross attention help? The paper's comparison (Table 1 and the window-size ablation of
Fig. 4a), reproduced on the built-in brain at matched parameter counts.

    python benchmarks/registration_study.py --out runs/study            # the default: a 2-core CPU
    python benchmarks/registration_study.py --out runs/study-quick --quick   # minutes, tiny data (CI)
    python benchmarks/registration_study.py --out runs/study-gpu --preset gpu  # the paper's networks, 2 mm
    python benchmarks/registration_study.py --out runs/main-job-check --checkpoint runs/brain-cpu/best.pt

Every variant trains with `xmorpher.train.train` on the same split, loss (NCC + diffusion, lambda
1, the paper's VoxelMorph weighting), optimizer, schedule, steps, batch and augmentation: those of
the preset's `xmorpher` config (the README's main job for the default). Variants: XMorpher, its
no-cross ablation and VoxelMorph at XMorpher's parameter count (the width whose count comes
closest), diffeomorphic XMorpher, each over several seeds, and XMorpher with a smaller and a larger
searching window (one seed). Each run is scored on the held-out test pairs (Dice mean and per
structure, HD95, % non-positive Jacobian, SD log Jacobian, seconds per pair) and on generalization
pairs that training never sees (another deformation model, another atlas's labels), binned by
deformation size. `--checkpoint` scores trained checkpoints the same way without training.

DIR gets runs/<variant>/seed<k>/ (each run's config, checkpoints and log), summary.json, table.md
and figures/. A study that stops resumes where it stopped when started again with the same
arguments.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import math
import multiprocessing
import os
import platform
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from xmorpher import Registrar, build_model
from xmorpher.config import Config, from_dict, load_config, to_dict, with_evaluate_overrides
from xmorpher.data.datasets import GENERALIZATION_BINS_MM, GeneralizationPairs, make_dataset
from xmorpher.errors import XMorpherError
from xmorpher.evaluate import score_pair
from xmorpher.framework import warp
from xmorpher.stats import mean_std, paired_wilcoxon

TEST_METRICS = ("dice", "hd95", "nonpositive_jacobian_percent", "sd_log_jacobian")
METRIC_HEADERS = {"dice": "Dice", "hd95": "HD95 (mm)", "nonpositive_jacobian_percent": "% \\|J\\| <= 0", "sd_log_jacobian": "SDlogJ"}
REFERENCE = "xmorpher"  # the variant every other one is tested against
GENERALIZATION_LABEL_SETS = ("neuromorphometrics", "aseg")
BIN_NAMES = ("nearly aligned", "small", "medium", "large")


# ----------------------------------------------------------------------------------------------
# What is trained
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StudyPreset:
    """The settings of one study.

    Attributes:
        config: the xmorpher preset every run starts from (data, loss, optimizer, schedule, ...).
        overrides: ``key=value`` settings on top of it, shared by every run.
        xmorpher: XMorpher's options (every XMorpher variant starts from these); None: the preset's.
        seeds: seeds of the main variants; the window ablation runs the first one.
        search_sizes: searching windows of the ablation (XMorpher's own is its ``search_size``).
        generalization_pairs_per_bin: generalization pairs per deformation-size bin.
        jobs: runs trained at once; 0: one per 1 CPU core (2 on a 2-core machine) on the CPU, 1 on a GPU.
    """

    config: Optional[str]
    overrides: tuple
    xmorpher: Optional[dict]
    seeds: int
    search_sizes: tuple
    generalization_pairs_per_bin: int
    jobs: int = 0


# The paper's protocol, whatever the preset it starts from says: its loss (unsupervised NCC, window
# 9, on the images the network sees, + 1 x diffusion, VoxelMorph's weighting for NCC, no flow
# supervision) and inter-subject pairs whose deformations are all large (every subject deformed at
# full size, no near pairs), so that the ordering can be compared with Table 1 even though the main
# job's preset departs from them (see the README's "Nearly aligned pairs").
PAPER_PROTOCOL = (
    "train.mode=unsupervised", "train.similarity=ncc", "train.ncc_window=9", "train.similarity_images=input",
    "train.similarity_weight=1.0", "train.diffusion_weight=1.0", "train.flow_weight=0.0",
    "data.deformation.scale_range=[1.0, 1.0]", "data.near_pairs=0.0", "data.near_pair_scale_range=[0.01, 1.0]",
    "evaluate.refine_steps=0",  # the networks compared as they predict, without instance optimisation
)
# The main job's optimizer as the study was designed with (Adam 2e-3, cosine decay): pinned so that
# the study's runs stay what they were if the main job's preset changes.
MAIN_JOB_OPTIMIZER = ("train.lr=0.002", "train.scheduler=cosine", "train.weight_decay=0.0", "train.batch_size=1")

PRESETS = {
    # The default: the README's main job (a small XMorpher on the brain at 4 mm, its optimizer and
    # schedule) under the paper's protocol, shortened to 1000 steps per run so that 14 runs fit 2
    # hours on a 2-core AVX2 CPU (about one hour on an AVX-512 one). Twenty test subjects give the
    # paired test 20 pairs (evaluation is cheap; training data is unchanged).
    "cpu": StudyPreset(
        config="brain-cpu",
        overrides=PAPER_PROTOCOL + MAIN_JOB_OPTIMIZER + ("train.epochs=10", "train.steps_per_epoch=100", "train.checkpoint_every=100",
                                                         "train.device=cpu", "data.test_subjects=20"),
        xmorpher=None, seeds=3, search_sizes=(4, 8), generalization_pairs_per_bin=8,
    ),
    # Minutes on tiny data: the brain at 8 mm, a tiny XMorpher, a few steps at a high rate (so that
    # the flows are large enough to move labels); every code path runs.
    "quick": StudyPreset(
        config="brain-cpu",
        overrides=PAPER_PROTOCOL + ("data.spacing_mm=8.0", "data.train_subjects=4", "data.val_subjects=2", "data.test_subjects=4",
                   "train.epochs=2", "train.steps_per_epoch=4", "train.checkpoint_every=4", "train.log_every=1", "train.lr=0.01",
                   "train.device=cpu"),
        xmorpher={"patch_size": 2, "embed_dim": 8, "depths": [1, 1], "num_heads": [1, 2], "head_channels": 8, "drop_path_rate": 0.0},
        seeds=2, search_sizes=(4, 8), generalization_pairs_per_bin=1,
    ),
    # The paper's networks (XMorpher 14.8 M parameters) on the brain at 2 mm (80 x 96 x 80), the
    # paper's learning rate 1e-4, 20000 steps per run, one run at a time on one GPU. Not yet run.
    "gpu": StudyPreset(
        config=None,
        overrides=PAPER_PROTOCOL + ("data.spacing_mm=2.0", "data.train_subjects=100", "data.test_subjects=20",
                                    "train.lr=1e-4", "train.epochs=20", "train.steps_per_epoch=1000",
                                    "train.checkpoint_every=500", "train.device=cuda"),
        xmorpher={}, seeds=3, search_sizes=(4, 8), generalization_pairs_per_bin=8, jobs=1,
    ),
}


@dataclass(frozen=True)
class Variant:
    """One row of the table: a network (a `build_model` name and its options) and its seeds."""

    label: str
    model: str
    options: dict
    seeds: tuple
    description: str

    def config(self, preset: StudyPreset, seed: int, threads: int) -> Config:
        """The run's full config: the preset's, this network, this seed."""
        table = self.model.replace("-", "_")
        overrides = list(preset.overrides) + [
            f"model.name={self.model}", f"model.{table}={json.dumps(self.options)}", f"train.seed={seed}",
            f"train.threads={threads}",
        ]
        return load_config(preset.config, overrides)


def parameter_count(model: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def forward_flops(model: torch.nn.Module, shape: Sequence[int]) -> int:
    """Floating-point operations of one forward pass on one pair of ``shape`` (matrix products and
    convolutions, as torch's FlopCounterMode counts them), on fake tensors: nothing is computed.
    Attention is counted through the reference backend, which does the fused op's arithmetic."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        volume = torch.empty(1, 1, *shape)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(volume, volume)
    return int(counter.get_total_flops())


def _closest(target: int, candidates: dict) -> object:
    """The candidate key whose parameter count is closest to ``target`` (the smaller one on a tie)."""
    return min(candidates, key=lambda key: (abs(candidates[key] - target), candidates[key]))


def matched_nocross_width(xmorpher_options: dict) -> int:
    """The no-cross ablation's embed_dim whose parameter count is closest to XMorpher's. It sees the
    pair concatenated, so one stream of XMorpher's width has slightly fewer parameters (patch
    embedding, flow head); widths must split into every stage's heads."""
    target = parameter_count(build_model("xmorpher", **xmorpher_options))
    base = build_model("xmorpher", **xmorpher_options).config
    counts = {}
    for width in range(max(1, base.embed_dim // 2), 2 * base.embed_dim + 1):
        if all((width * 2**stage) % heads == 0 for stage, heads in enumerate(base.num_heads)):
            counts[width] = parameter_count(build_model("xmorpher-nocross", **{**xmorpher_options, "embed_dim": width}))
    return _closest(target, counts)


VOXELMORPH_ENCODER, VOXELMORPH_DECODER = (16, 32, 32, 32), (32, 32, 32, 32, 32, 16, 16)  # VoxelMorph-1


def voxelmorph_widths(factor: float) -> dict:
    """VoxelMorph-1's channel widths, each times ``factor`` (rounded, at least 1)."""
    scale = lambda channels: [max(1, round(c * factor)) for c in channels]  # noqa: E731
    return {"encoder_channels": scale(VOXELMORPH_ENCODER), "decoder_channels": scale(VOXELMORPH_DECODER)}


def matched_voxelmorph_widths(xmorpher_options: dict) -> dict:
    """VoxelMorph-1's architecture with every width scaled by the factor (a multiple of 0.05) whose
    parameter count comes closest to XMorpher's."""
    target = parameter_count(build_model("xmorpher", **xmorpher_options))
    counts, factor = {}, 0.05
    while True:
        counts[round(factor, 2)] = parameter_count(build_model("voxelmorph", **voxelmorph_widths(factor)))
        if counts[round(factor, 2)] > target:
            break
        factor += 0.05
    return voxelmorph_widths(_closest(target, counts))


def study_variants(preset: StudyPreset) -> list[Variant]:
    """The table's rows, matched in parameter count to XMorpher."""
    xmorpher = dict(preset.xmorpher) if preset.xmorpher is not None else load_config(preset.config).model.options()
    seeds = tuple(range(preset.seeds))
    search = build_model("xmorpher", **xmorpher).config.search_size
    variants = [
        Variant("xmorpher", "xmorpher", xmorpher, seeds, "XMorpher (cross attention between the two streams)"),
        Variant("xmorpher-nocross", "xmorpher-nocross", {**xmorpher, "embed_dim": matched_nocross_width(xmorpher)}, seeds,
                "no-cross ablation: self attention over the concatenated pair, width matched"),
        Variant("voxelmorph", "voxelmorph", matched_voxelmorph_widths(xmorpher), seeds, "VoxelMorph-1 U-net, widths matched"),
        Variant("xmorpher-diffeomorphic", "xmorpher", {**xmorpher, "diffeomorphic": True}, seeds,
                "XMorpher, output integrated as a stationary velocity field"),
    ]
    for size in preset.search_sizes:
        variants.append(Variant(f"xmorpher-search{size}", "xmorpher", {**xmorpher, "search_size": size}, seeds[:1],
                                f"XMorpher, searching window {size} instead of {search} (one seed)"))
    return variants


# ----------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvaluationPairs:
    """The pairs every run is scored on: the held-out test split, and the generalization pairs with
    their dataset (for its label grid) and true flows."""

    test: list
    test_label_names: tuple
    generalization: list
    generalization_set: GeneralizationPairs
    true_flows: dict  # generalization pair name -> the flow that registers it exactly


@functools.lru_cache(maxsize=2)
def evaluation_pairs(data_json: str, pairs_per_bin: int, generalization_seed: Optional[int] = None) -> EvaluationPairs:
    """The evaluation pairs of a data config (as JSON), items batched as one pair; the generalization
    pairs from ``generalization_seed`` (default: the data's seed). Made once per process: every run
    of a worker scores the same pairs."""
    config = from_dict({"data": json.loads(data_json)})
    collate = torch.utils.data.default_collate
    test = make_dataset(config.data, "test")
    generalization = GeneralizationPairs(
        pairs_per_bin, spacing_mm=config.data.spacing_mm, label_sets=GENERALIZATION_LABEL_SETS,
        seed=config.data.seed if generalization_seed is None else generalization_seed,
    )
    items = [collate([generalization[i]]) for i in range(len(generalization))]
    return EvaluationPairs(
        [collate([test[i]]) for i in range(len(test))], tuple(test.label_names), items, generalization,
        {item["name"][0]: generalization.true_flow(i) for i, item in enumerate(items)},
    )


def score_generalization(flow_of, pairs: EvaluationPairs) -> list:
    """Mean Dice over the structures of each label set on every generalization pair, the labels
    warped on their own (1 mm) grid by the flow ``flow_of(item)`` resampled onto it
    (:meth:`GeneralizationPairs.score`)."""
    return [
        {"pair": item["name"][0], "bin": int(item["bin"]), "deformation_mm": float(item["deformation_mm"]),
         **pairs.generalization_set.score(item, flow_of(item))}
        for item in pairs.generalization
    ]


def score_flows(flow_of, pairs: EvaluationPairs) -> dict:
    """Per-pair scores of the flows ``flow_of(item)``: every test metric (and Dice per structure) on
    the test pairs, each label set's Dice on the generalization pairs."""
    labels = list(range(1, len(pairs.test_label_names)))
    test_rows = []
    for item in pairs.test:
        row = score_pair(item, flow_of(item), labels, with_hd95=True)
        test_rows.append({"pair": item["name"][0], **{key: row[key] for key in (*TEST_METRICS, "dice_per_label")}})
    return {"test": test_rows, "generalization": score_generalization(flow_of, pairs)}


# ----------------------------------------------------------------------------------------------
# Training and scoring one run (in a worker process)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """One training run: a variant, a seed, its folder and full config (as a dict, for pickling)."""

    variant: str
    seed: int
    directory: str
    config: dict
    pairs_per_bin: int

    @property
    def steps(self) -> int:
        return self.config["train"]["epochs"] * self.config["train"]["steps_per_epoch"]


def _comparable(tables: dict) -> dict:
    """A config without the settings that may change between attempts of one study (threads)."""
    return {**tables, "train": {k: v for k, v in tables["train"].items() if k != "threads"}}


def _write_json(path: str, payload: dict, *, standard: bool = True) -> None:
    """Atomically: a study killed while writing leaves the old file or the new one. ``standard``:
    NaN becomes null (standard JSON); the study's own records keep NaN, which Python reads back."""
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w") as handle:
        json.dump(_without_nan(payload) if standard else payload, handle, indent=1)
    os.replace(temporary, path)


def _without_nan(value):
    """NaN -> None: standard JSON has no NaN."""
    if isinstance(value, dict):
        return {key: _without_nan(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_without_nan(v) for v in value]
    return None if isinstance(value, float) and math.isnan(value) else value


def train_and_score(run: Run) -> dict:
    """Train the run (resuming a stopped one; skipping a finished one), then score its best
    checkpoint. The record is written to <run>/run.json and returned."""
    from xmorpher.train import train

    record_path = os.path.join(run.directory, "run.json")
    if os.path.isfile(record_path):
        with open(record_path) as handle:
            return {**json.load(handle), "reused": True}
    config = from_dict(run.config)
    resume = os.path.isfile(os.path.join(run.directory, "last.pt"))
    if resume:
        with open(os.path.join(run.directory, "config.toml"), "rb") as handle:
            import tomllib

            if _comparable(tomllib.load(handle)) != _comparable(json.loads(json.dumps(to_dict(config)))):
                raise XMorpherError(f"{run.directory} holds a run with other settings; choose another --out")
    torch.set_num_threads(config.train.threads)
    start = time.perf_counter()
    summary = train(config, run.directory, resume=resume, progress=False)
    seconds = time.perf_counter() - start
    record = {
        "variant": run.variant, "seed": run.seed, "train_seconds": seconds, "resumed": resume, "steps": summary["step"],
        **score_checkpoint(os.path.join(run.directory, "best.pt"), config.train.device, json.dumps(run.config["data"]), run.pairs_per_bin),
    }
    _write_json(record_path, record, standard=False)
    return record


def score_checkpoint(path: str, device: str, data_json: str, pairs_per_bin: int, generalization_seed: Optional[int] = None,
                     refine_steps: Optional[int] = None, overrides: Sequence[str] = ()) -> dict:
    """Per-pair scores of a checkpoint on the test and generalization pairs, with its best step;
    ``refine_steps``: instead of the checkpoint's own evaluate.refine_steps; ``overrides``:
    ``evaluate.key=value`` changes to its other refinement settings."""
    registrar = Registrar(path, device, refine_steps, overrides=overrides)
    pairs = evaluation_pairs(data_json, pairs_per_bin, generalization_seed)
    scores = score_flows(lambda item: registrar.flow(item["moving"], item["fixed"]).cpu(), pairs)
    best = registrar.payload.get("best", {})
    return {"best_step": best.get("step", registrar.payload.get("step")), "best_val_dice": best.get("val_dice", math.nan), **scores}


# ----------------------------------------------------------------------------------------------
# The study: runs in parallel, then the comparison
# ----------------------------------------------------------------------------------------------


def _logged_step(directory: str) -> int:
    """The last step a run's log.csv records (0 before its first row)."""
    try:
        with open(os.path.join(directory, "log.csv")) as handle:
            rows = [line for line in handle.read().splitlines()[1:] if line.strip()]
        return int(rows[-1].split(",", 1)[0]) if rows else 0
    except (OSError, ValueError):
        return 0


def train_all(runs: list, jobs: int) -> dict:
    """Every run, ``jobs`` at a time in fresh processes, longest first; {(variant, seed): record}."""
    from tqdm import tqdm

    records = {}
    total = sum(run.steps for run in runs)
    bar = tqdm(total=total, desc="study", unit="step", mininterval=0.1 if sys.stderr.isatty() else 60.0)
    context = multiprocessing.get_context("spawn")  # no fork of a process whose OpenMP threads have started
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        pending = {pool.submit(train_and_score, run): run for run in runs}
        try:
            while pending:
                done, _ = wait(pending, timeout=10, return_when=FIRST_COMPLETED)
                for future in done:
                    run = pending.pop(future)
                    record = future.result()
                    records[run.variant, run.seed] = record
                    when = "trained earlier" if record.get("reused") else f"in {record['train_seconds'] / 60:.1f} min"
                    bar.write(
                        f"{run.variant} seed {run.seed}: {record['steps']} steps {when}, "
                        f"best val Dice {record['best_val_dice']:.4f} at step {record['best_step']}"
                    )
                bar.n = sum(run.steps if (run.variant, run.seed) in records else _logged_step(run.directory) for run in runs)
                bar.refresh()
        except BaseException:
            for future in pending:
                future.cancel()
            raise
        finally:
            bar.close()
    return records


def seconds_per_pair(checkpoint: str, items: list, device: str, threads: int, refine_steps: Optional[int] = None,
                     overrides: Sequence[str] = ()) -> float:
    """Mean seconds of one registration (the network's forward pass, and its refinement if any) over
    ``items``, after one warm-up call, measured in this process alone with the runs' thread count,
    so that every model gets the same machine."""
    torch.set_num_threads(threads)
    registrar = Registrar(checkpoint, device, refine_steps, overrides=overrides)
    registrar.flow(items[0]["moving"], items[0]["fixed"])
    start = time.perf_counter()
    for item in items:
        flow = registrar.flow(item["moving"], item["fixed"])
    if flow.is_cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / len(items)


def machine() -> dict:
    """What the timings were measured on."""
    name = platform.processor() or platform.machine()
    flags = set()
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    vector = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    described = {"cpu": name, "cores": os.cpu_count(), "vector_isa": vector, "torch": torch.__version__}
    if torch.cuda.is_available():
        described["gpu"] = torch.cuda.get_device_name()
    return described


def _bin_means(rows: list, label_set: str, bins: int) -> list:
    return [float(np.mean([r[label_set] for r in rows if r["bin"] == b])) for b in range(bins)]


def summarize(variants: list, records: dict, identity: dict, truth: list, sizes: dict, timings: dict, label_names: tuple,
              bins_mm: Sequence) -> dict:
    """The comparison: per variant mean +- std over seeds, the paired tests against XMorpher on
    seed-averaged Dice per test pair, Dice per structure, and Dice changes per deformation-size bin
    (with the change the true deformation makes: the ceiling of each bin)."""
    structures = list(label_names[1:])
    out = {"identity": {
        "test": {m: mean_std([row[m] for row in identity["test"]]).as_dict() for m in TEST_METRICS},
        "pair_dice": [row["dice"] for row in identity["test"]],
        "dice_per_structure": dict(zip(structures, np.nanmean([r["dice_per_label"] for r in identity["test"]], 0).tolist())),
        "generalization": {s: _bin_means(identity["generalization"], s, len(bins_mm)) for s in GENERALIZATION_LABEL_SETS},
    }, "true_deformation": {"generalization": {
        s: [t - i for t, i in zip(_bin_means(truth, s, len(bins_mm)), _bin_means(identity["generalization"], s, len(bins_mm)))]
        for s in GENERALIZATION_LABEL_SETS
    }}, "variants": {}}
    for variant in variants:
        seeds = [records[variant.label, seed] for seed in variant.seeds]
        per_seed = [{
            "seed": record["seed"], "train_seconds": record.get("train_seconds", math.nan), "best_step": record["best_step"],
            "best_val_dice": record["best_val_dice"],
            **{m: float(np.nanmean([row[m] for row in record["test"]])) for m in TEST_METRICS},
        } for record in seeds]
        pair_dice = np.mean([[row["dice"] for row in record["test"]] for record in seeds], axis=0)
        per_structure = np.nanmean([[row["dice_per_label"] for row in record["test"]] for record in seeds], axis=(0, 1))
        generalization = {}
        for label_set in GENERALIZATION_LABEL_SETS:
            bins = []
            for b, (low, high) in enumerate(bins_mm):
                rows = [[(r[label_set] - i[label_set]) for r, i in zip(rec["generalization"], identity["generalization"]) if r["bin"] == b]
                        for rec in seeds]
                seed_averaged = np.mean(rows, axis=0)
                bins.append({
                    "bin": b, "range_mm": [low, high], "pairs": len(seed_averaged),
                    "dice_change": mean_std([float(np.mean(r)) for r in rows]).as_dict(),
                    "pairs_lowered": int((seed_averaged < 0).sum()),
                })
            generalization[label_set] = bins
        out["variants"][variant.label] = {
            "description": variant.description, "model": variant.model, "options": variant.options, **sizes[variant.label],
            "seeds": list(variant.seeds),
            "test": {m: mean_std([s[m] for s in per_seed]).as_dict() for m in TEST_METRICS},
            "seconds_per_pair": mean_std(timings[variant.label]).as_dict(),
            "per_seed": per_seed,
            "pair_dice": pair_dice.tolist(),
            "dice_per_structure": dict(zip(structures, per_structure.tolist())),
            "generalization": generalization,
        }
    reference = out["variants"].get(REFERENCE)
    for label, summary in out["variants"].items():
        if reference is not None and label != REFERENCE:
            summary["xmorpher_versus_this"] = paired_wilcoxon(reference["pair_dice"], summary["pair_dice"]).as_dict()
    return out


# ----------------------------------------------------------------------------------------------
# Table and figures
# ----------------------------------------------------------------------------------------------


def _cell(stat: dict, digits: int = 3, signed: bool = False) -> str:
    """``mean +- std`` (just the mean for one seed), n/a when undefined."""
    mean, std = stat["mean"], stat["std"]
    if mean is None or math.isnan(mean):
        return "n/a"
    text = f"{mean:+.{digits}f}" if signed else f"{mean:.{digits}f}"
    return text if std is None or math.isnan(std) else f"{text} +- {std:.{digits}f}"


def _p_value(p: float) -> str:
    return "n/a" if p is None or math.isnan(p) else f"{p:.2g}"


def format_table(summary: dict) -> str:
    """table.md: the test-pair table, then the generalization bins of each label set."""
    lines = [
        f"# Registration study: preset `{summary['preset']}`", "",
        f"Command: `{summary['command']}`  ",
        f"Machine: {summary['machine']['cpu']}, {summary['machine']['cores']} cores ({summary['machine']['vector_isa']}), "
        f"torch {summary['machine']['torch']}{', ' + summary['machine']['gpu'] if 'gpu' in summary['machine'] else ''}; "
        f"{summary['jobs']} run(s) at a time, {summary['threads_per_run']} thread(s) each; wall time {summary['wall_seconds'] / 60:.1f} min.",
        "",
        f"Test pairs: {summary['test_pairs']}. Mean +- std over seeds of each run's mean over the test pairs; the last column is "
        "XMorpher's Dice minus the method's on seed-averaged Dice per test pair, the two-sided Wilcoxon signed-rank p-value "
        "and the matched-pairs rank-biserial correlation r (positive: XMorpher higher).",
        "",
        "| method | parameters | GFLOP / pair | seeds | " + " | ".join(METRIC_HEADERS[m] for m in TEST_METRICS)
        + " | s / pair | XMorpher - method: Dice difference (p, r) |",
        "|---|---|---|---|" + "---|" * len(TEST_METRICS) + "---|---|",
    ]
    identity = summary["identity"]["test"]
    lines.append("| identity | - | - | - | " + " | ".join(_cell(identity[m]) for m in TEST_METRICS) + " | 0 | |")
    for label, row in summary["variants"].items():
        test = dict(row["xmorpher_versus_this"]) if "xmorpher_versus_this" in row else None
        versus = (f"{test['mean_difference']:+.3f} (p {_p_value(test['p_value'])}, r {test['rank_biserial']:+.2f})"
                  if test else "")
        lines.append(
            f"| {label} | {row['parameters'] / 1e6:.3f} M | {row['forward_gflops']:.2f} | {len(row['seeds'])} | "
            + " | ".join(_cell(row["test"][m], 4 if m == "nonpositive_jacobian_percent" else 3) for m in TEST_METRICS)
            + f" | {_cell(row['seconds_per_pair'], 3)} | {versus} |"
        )
    bins = summary["bins_mm"]
    for label_set in GENERALIZATION_LABEL_SETS:
        lines += [
            "", f"## Generalization: Dice change on {summary['generalization_pairs']} pairs of another deformation model, "
            f"{label_set} labels (seed {summary['generalization_seed']})", "",
            "Pairs made by a random affine map plus a cubic B-spline deformation (training uses integrated velocity fields), "
            "binned by the mean displacement over the brain; labels on the atlases' 1 mm grid, warped by nearest neighbour "
            "with the flow resampled onto it. Identity: the unregistered Dice. True deformation: the change the exact inverse deformation makes (what "
            "a perfect registration gains). Methods: registered minus unregistered Dice, mean +- std over seeds, and how many "
            "pairs of the bin the seed-averaged change lowers.", "",
            "| method | " + " | ".join(f"{BIN_NAMES[b] if b < len(BIN_NAMES) else b} ({low:g}-{high:g} mm)" for b, (low, high) in enumerate(bins)) + " |",
            "|---|" + "---|" * len(bins),
            "| identity Dice | " + " | ".join(f"{v:.3f}" for v in summary["identity"]["generalization"][label_set]) + " |",
            "| true deformation (the ceiling) | "
            + " | ".join(f"{v:+.3f}" for v in summary["true_deformation"]["generalization"][label_set]) + " |",
        ]
        for label, row in summary["variants"].items():
            cells = [f"{_cell(b['dice_change'], 3, signed=True)} (lower on {b['pairs_lowered']}/{b['pairs']})" for b in row["generalization"][label_set]]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_validation(path: str, variants: list, directories: dict) -> None:
    """Validation Dice against step, one panel per variant, one line per seed."""
    plt = _pyplot()
    columns = min(3, len(variants))
    rows = math.ceil(len(variants) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 3.2 * rows), squeeze=False, sharex=True, sharey=True)
    for axis, variant in zip(axes.flat, variants):
        for seed in variant.seeds:
            with open(os.path.join(directories[variant.label, seed], "log.csv"), newline="") as handle:
                rows_ = [row for row in csv.DictReader(handle) if row["val_dice"]]
            axis.plot([int(r["step"]) for r in rows_], [float(r["val_dice"]) for r in rows_], marker=".", label=f"seed {seed}")
        axis.set_title(variant.label, fontsize=10)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    for axis in axes.flat[len(variants):]:
        axis.set_visible(False)
    for axis in axes[-1]:
        axis.set_xlabel("step")
    for axis in axes[:, 0]:
        axis.set_ylabel("validation Dice")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_dice_per_structure(path: str, records: dict, identity: dict, variants: list, label_names: tuple) -> None:
    """Box plots over the test pairs of seed-averaged Dice, per structure, for the identity and each
    variant; the structures wrap over rows of at most 10."""
    plt = _pyplot()
    methods = ["identity"] + [v.label for v in variants]
    values = {"identity": np.array([row["dice_per_label"] for row in identity["test"]], dtype=float)}
    for variant in variants:
        values[variant.label] = np.mean(
            [np.array([row["dice_per_label"] for row in records[variant.label, s]["test"]], dtype=float) for s in variant.seeds], axis=0
        )
    structures = list(label_names[1:])
    per_row = 10
    rows = math.ceil(len(structures) / per_row)
    width = 0.8 / len(methods)
    figure, axes = plt.subplots(rows, 1, figsize=(15, 3.6 * rows), squeeze=False)
    colours = plt.get_cmap("tab10")
    for row, axis in enumerate(axes[:, 0]):
        chosen = range(row * per_row, min(len(structures), (row + 1) * per_row))
        for m, method in enumerate(methods):
            positions = np.arange(len(chosen)) + (m - (len(methods) - 1) / 2) * width
            data = [values[method][:, s][~np.isnan(values[method][:, s])] for s in chosen]
            boxes = axis.boxplot(data, positions=positions, widths=width * 0.9, patch_artist=True, showfliers=False, manage_ticks=False)
            for box in boxes["boxes"]:
                box.set_facecolor(colours(m))
                box.set_alpha(0.8)
            if row == 0:
                axis.plot([], [], color=colours(m), linewidth=6, alpha=0.8, label=method)
        axis.set_xticks(np.arange(len(chosen)))
        axis.set_xticklabels([structures[s] for s in chosen], fontsize=8)
        axis.set_xlim(-0.5, per_row - 0.5)
        axis.set_ylim(0, 1)
        axis.set_ylabel("Dice")
        axis.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(ncol=len(methods), fontsize=8, loc="lower left", bbox_to_anchor=(0, 1.02))
    figure.suptitle("Dice per structure on the test pairs (seed-averaged per pair)", y=1.0)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_same_pair(path: str, item: dict, flows: dict, dice: dict) -> None:
    """One test pair registered by every method: the middle axial slice of the warped moving image
    with its deformation grid, and the warped image minus the fixed one."""
    from xmorpher.registration import _grid_lines

    plt = _pyplot()
    fixed, moving = item["fixed"][0, 0].numpy(), item["moving"][0, 0].numpy()
    depth = fixed.shape[2] // 2
    take = lambda volume: volume[:, :, depth].T  # noqa: E731  (rows: the second axis, origin lower)
    columns = len(flows) + 2
    figure, axes = plt.subplots(2, columns, figsize=(2.6 * columns, 5.6), squeeze=False)
    axes[0, 0].imshow(take(fixed), cmap="gray", origin="lower", vmin=0, vmax=1)
    axes[0, 0].set_title("fixed", fontsize=9)
    axes[0, 1].imshow(take(moving), cmap="gray", origin="lower", vmin=0, vmax=1)
    axes[0, 1].set_title(f"moving (Dice {dice['identity']:.3f})", fontsize=9)
    axes[1, 1].imshow(take(moving - fixed), cmap="coolwarm", origin="lower", vmin=-0.5, vmax=0.5)
    axes[1, 1].set_title("moving - fixed", fontsize=9)
    for column, (method, flow) in enumerate(flows.items(), start=2):
        warped = warp(item["moving"], flow)[0, 0].numpy()
        displacement = flow[0].numpy()
        axes[0, column].imshow(take(warped), cmap="gray", origin="lower", vmin=0, vmax=1)
        _grid_lines(axes[0, column], np.stack([take(displacement[1]), take(displacement[0])]), max(2, min(fixed.shape) // 12))
        axes[0, column].set_title(f"{method}\n(Dice {dice[method]:.3f})", fontsize=9)
        axes[1, column].imshow(take(warped - fixed), cmap="coolwarm", origin="lower", vmin=-0.5, vmax=0.5)
        axes[1, column].set_title("warped - fixed", fontsize=9)
    axes[1, 0].set_visible(False)
    for axis in axes.flat:
        axis.set_xticks([])
        axis.set_yticks([])
    figure.suptitle(f"test pair {item['name'][0]}, axial slice {depth}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_generalization(path: str, summary: dict) -> None:
    """Dice change (registered minus unregistered) per deformation-size bin, one panel per label set."""
    plt = _pyplot()
    bins = summary["bins_mm"]
    labels = [f"{low:g}-{high:g} mm" for low, high in bins]
    figure, axes = plt.subplots(1, len(GENERALIZATION_LABEL_SETS), figsize=(6 * len(GENERALIZATION_LABEL_SETS), 4), squeeze=False)
    methods = list(summary["variants"])
    width = 0.8 / max(len(methods), 1)
    for axis, label_set in zip(axes[0], GENERALIZATION_LABEL_SETS):
        for m, method in enumerate(methods):
            stats = [b["dice_change"] for b in summary["variants"][method]["generalization"][label_set]]
            means = [s["mean"] for s in stats]
            errors = [0 if s["std"] is None or math.isnan(s["std"]) else s["std"] for s in stats]
            axis.bar(np.arange(len(bins)) + (m - (len(methods) - 1) / 2) * width, means, width, yerr=errors, label=method, capsize=2)
        axis.plot(np.arange(len(bins)), summary["true_deformation"]["generalization"][label_set], "k_", markersize=40,
                  markeredgewidth=2, label="true deformation (ceiling)")
        axis.axhline(0, color="black", linewidth=0.8)
        axis.set_xticks(np.arange(len(bins)))
        axis.set_xticklabels(labels)
        axis.set_xlabel("deformation size (mean displacement over the brain)")
        axis.set_ylabel("Dice change (registered - unregistered)")
        axis.set_title(f"{label_set} labels", fontsize=10)
        axis.grid(axis="y", alpha=0.3)
    # below the panels, the ceiling's wide marker shrunk: inside, it covered the first bin's ceiling
    handles, names = axes[0, 0].get_legend_handles_labels()
    figure.legend(handles, names, loc="lower center", ncol=len(names), fontsize=8, markerscale=0.3, frameon=False)
    figure.tight_layout(rect=(0, 0.07, 1, 1))
    figure.savefig(path, dpi=110)
    plt.close(figure)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def checkpoint_variants(paths: Sequence[str]) -> tuple[list, dict, dict]:
    """Trained checkpoints scored as they are, one single-seed variant each, named after its run
    folder: (variants, the data config they share, {(label, 0): checkpoint})."""
    from xmorpher.checkpoint import config_of, load_checkpoint

    variants, checkpoints, data = [], {}, None
    for path in paths:
        config = config_of(load_checkpoint(path), path)
        data = data or to_dict(config)["data"]
        if to_dict(config)["data"]["spacing_mm"] != data["spacing_mm"]:
            raise XMorpherError(f"{path}: the checkpoints to compare were trained at different voxel sizes")
        label = os.path.basename(os.path.dirname(os.path.abspath(path))) or config.model.name
        if any(v.label == label for v in variants):
            label = f"{label}-{len(variants)}"
        variants.append(Variant(label, config.model.name, config.model.options(), (0,), f"{path} ({config.model.name})"))
        checkpoints[label, 0] = path
    return variants, data, checkpoints


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="study folder: runs, summary.json, table.md, figures/")
    parser.add_argument("--preset", choices=("cpu", "gpu"), default="cpu", help="cpu (the default, 2-core CPU) or gpu (the paper's networks)")
    parser.add_argument("--quick", action="store_true", help="tiny data and models, a few steps: minutes (the CI test)")
    parser.add_argument("--jobs", type=int, help="runs trained at once (default: the preset's)")
    parser.add_argument("--checkpoint", action="append", default=[], help="score trained checkpoint(s) instead of training (repeatable)")
    parser.add_argument("--generalization-pairs", type=int, help="generalization pairs per bin (default: the preset's)")
    parser.add_argument("--generalization-seed", type=int,
                        help="with --checkpoint: generalization pairs from this seed instead of the data's (a validation set: "
                             "choose settings on it, report the data seed's pairs)")
    parser.add_argument("--refine-steps", type=int,
                        help="with --checkpoint: instance-optimisation steps after each network instead of each checkpoint's "
                             "evaluate.refine_steps (0: the networks alone)")
    parser.add_argument("--set", action="append", default=[], metavar="evaluate.refine_KEY=VALUE",
                        help="with --checkpoint: change one refinement setting of every checkpoint, e.g. "
                             "evaluate.refine_small_motion_diffusion_weight=2 (repeatable; --refine-steps wins over "
                             "evaluate.refine_steps)")
    args = parser.parse_args(argv)
    if args.generalization_seed is not None and not args.checkpoint:
        parser.error("--generalization-seed scores checkpoints (--checkpoint); a study's runs score the data seed's pairs")
    if args.refine_steps is not None and not args.checkpoint:
        parser.error("--refine-steps scores checkpoints (--checkpoint); a study's runs compare the networks alone")
    if args.set and not args.checkpoint:
        parser.error("--set changes refinement settings of checkpoints (--checkpoint); a study's runs compare the networks alone")
    try:  # keys and values checked before any pair is scored
        with_evaluate_overrides(Config(), args.set)
    except XMorpherError as error:
        parser.error(f"--set: {error}")
    started = time.perf_counter()
    command = "python benchmarks/registration_study.py " + " ".join(sys.argv[1:] if argv is None else argv)
    os.makedirs(args.out, exist_ok=True)
    preset = PRESETS["quick" if args.quick else args.preset]
    pairs_per_bin = args.generalization_pairs or preset.generalization_pairs_per_bin
    on_gpu = "train.device=cuda" in preset.overrides
    # Small models on a CPU: runs of one thread each, side by side, use the cores best (two threads
    # on one small run idle at every synchronization); on a GPU, one run at a time.
    jobs = args.jobs or preset.jobs or (1 if on_gpu else min(2, os.cpu_count() or 1))
    threads = max(1, (os.cpu_count() or 1) // jobs)
    try:
        if args.checkpoint:
            variants, data, checkpoints = checkpoint_variants(args.checkpoint)
            directories = {key: os.path.dirname(os.path.abspath(path)) for key, path in checkpoints.items()}
            settings = {"data": data}
        else:
            variants = study_variants(preset)
            runs = [
                Run(v.label, seed, os.path.join(args.out, "runs", v.label, f"seed{seed}"), to_dict(v.config(preset, seed, threads)), pairs_per_bin)
                for v in variants for seed in v.seeds
            ]
            directories = {(run.variant, run.seed): run.directory for run in runs}
            checkpoints = {key: os.path.join(directory, "best.pt") for key, directory in directories.items()}
            data = runs[0].config["data"]
            settings = {key: runs[0].config[key] for key in ("data", "train")}
        data_json = json.dumps(data)
        pairs = evaluation_pairs(data_json, pairs_per_bin, args.generalization_seed)
        sizes = {}
        for variant in variants:
            model = build_model(variant.model, attention_backend="reference", **variant.options)
            sizes[variant.label] = {"parameters": parameter_count(model),
                                    "forward_gflops": forward_flops(model, pairs.test[0]["fixed"].shape[2:]) / 1e9}
            print(f"{variant.label:<24} {sizes[variant.label]['parameters']:>10,} parameters  "
                  f"{sizes[variant.label]['forward_gflops']:7.2f} GFLOP/pair  seeds {list(variant.seeds)}  {variant.options}")
        zero = lambda item: torch.zeros((1, 3, *item["fixed"].shape[2:]))  # noqa: E731
        identity = score_flows(zero, pairs)
        truth = score_generalization(lambda item: pairs.true_flows[item["name"][0]], pairs)
        device = "cuda" if on_gpu else "cpu"
        if args.checkpoint:
            records = {key: {"variant": key[0], "seed": 0, **score_checkpoint(path, device, data_json, pairs_per_bin, args.generalization_seed,
                                                                           args.refine_steps, args.set)}
                       for key, path in checkpoints.items()}
        else:
            print(f"{len(runs)} runs of {runs[0].steps} steps, {jobs} at a time with {threads} thread(s) each, in {args.out}/runs")
            records = train_all(sorted(runs, key=lambda r: -sizes[r.variant]["forward_gflops"]), jobs)
        timings = {v.label: [seconds_per_pair(checkpoints[v.label, s], pairs.test, device, threads, args.refine_steps, args.set) for s in v.seeds]
                   for v in variants}
    except XMorpherError as error:
        print(f"registration_study: error: {error}", file=sys.stderr)
        return 2

    bins_mm = [list(b) for b in GENERALIZATION_BINS_MM]
    summary = {
        "preset": "checkpoints" if args.checkpoint else ("quick" if args.quick else args.preset),
        "command": command, "machine": machine(), "jobs": 1 if args.checkpoint else jobs,
        "threads_per_run": threads, "wall_seconds": math.nan, "test_pairs": len(pairs.test),
        "generalization_pairs": len(pairs.generalization), "generalization_seed": pairs.generalization_set.seed,
        "bins_mm": bins_mm, "settings": settings,
        **summarize(variants, records, identity, truth, sizes, timings, pairs.test_label_names, bins_mm),
    }
    figures = os.path.join(args.out, "figures")
    os.makedirs(figures, exist_ok=True)
    plot_generalization(os.path.join(figures, "generalization.png"), summary)
    plot_dice_per_structure(os.path.join(figures, "dice_per_structure.png"), records, identity, variants, pairs.test_label_names)
    if all(os.path.isfile(os.path.join(directories[v.label, s], "log.csv")) for v in variants for s in v.seeds):
        plot_validation(os.path.join(figures, "validation_dice.png"), variants, directories)
    typical = int(np.argsort([row["dice"] for row in identity["test"]])[len(identity["test"]) // 2])  # the median pair
    item = pairs.test[typical]
    flows, dice = {}, {"identity": identity["test"][typical]["dice"]}
    for variant in variants:
        registrar = Registrar(checkpoints[variant.label, variant.seeds[0]], device, args.refine_steps, overrides=args.set)
        flows[variant.label] = registrar.flow(item["moving"], item["fixed"]).cpu()
        dice[variant.label] = records[variant.label, variant.seeds[0]]["test"][typical]["dice"]
    plot_same_pair(os.path.join(figures, "same_pair.png"), item, flows, dice)
    summary["wall_seconds"] = time.perf_counter() - started
    _write_json(os.path.join(args.out, "summary.json"), summary)
    table = format_table(summary)
    with open(os.path.join(args.out, "table.md"), "w") as handle:
        handle.write(table)
    print(table)
    print(f"summary.json, table.md and figures/ in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
