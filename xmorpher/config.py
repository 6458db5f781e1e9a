"""Every hyperparameter of data, model, training and evaluation in one typed, file-backed config.

A config is a TOML (Python 3.11+ stdlib) or JSON file with the tables [data], [data.deformation],
[data.intensity], [model], one option table per registered model ([model.xmorpher],
[model.xmorpher_nocross], [model.voxelmorph]: see xmorpher.factory), [train] and [evaluate]; keys
left out keep the defaults below. Presets are named configs shipped in code: `brain-cpu` (the
README's main job) and `tiny` (tests). `xmorpher config` prints a full config to start from.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from .data.synth import DeformationParams, IntensityParams
from .errors import XMorpherError
from .factory import MODELS, model_names

MODEL_NAMES = tuple(model_names())


@dataclass
class DataConfig:
    """Where pairs come from. source: brain (built-in MNI anatomy), shapes (random blobs) or nifti."""

    source: str = "brain"
    spacing_mm: float = 2.0  # built-in brain grid (2 mm: 80 x 96 x 80) and shapes' nominal voxel size
    label_set: str = "aseg"  # brain labels: aseg (29 structures) or aparc+aseg (all 112)
    seed: int = 0  # seeds of the synthetic subjects; splits never share one
    train_subjects: int = 100  # brain: every ordered pair of these is a training pair
    val_subjects: int = 4  # brain: val/test pair each subject with the next one
    test_subjects: int = 10
    shapes_size: list = field(default_factory=lambda: [64, 64, 64])
    shapes_labels: int = 8
    shapes_train_pairs: int = 1000
    shapes_val_pairs: int = 4
    shapes_test_pairs: int = 10
    pairs_file: str = ""  # nifti: a pairs CSV or a Learn2Reg dataset JSON
    normalization: str = "percentile"  # nifti and register: percentile, minmax, zscore or none
    deformation: DeformationParams = field(default_factory=DeformationParams)
    intensity: IntensityParams = field(default_factory=IntensityParams)
    # brain: fraction of training pairs that are one subject seen twice with two appearances, the
    # second time further deformed by a training deformation scaled by a factor drawn
    # log-uniformly from near_pair_scale_range (0: inter-subject pairs only, the paper's data)
    near_pairs: float = 0.0
    near_pair_scale_range: list = field(default_factory=lambda: [0.01, 1.0])


def option_table(name: str) -> str:
    """The [model.*] table of a model's options: its name with '-' written '_' (a Python name)."""
    return name.replace("-", "_")


@dataclass
class _ModelChoice:
    name: str = "xmorpher"
    attention_backend: str = "auto"  # window_cross_attention backend: auto, cpu, reference, triton, cuda

    def options(self) -> dict:
        """The overrides of the chosen model."""
        return dict(getattr(self, option_table(self.name)))


ModelConfig = dataclasses.make_dataclass(
    "ModelConfig",
    [(option_table(name), dict, field(default_factory=dict)) for name in model_names()],
    bases=(_ModelChoice,),
    namespace={
        "__module__": __name__,
        "__doc__": """The network: a name of build_model, and one table per registered model of the
    config fields it overrides (e.g. xmorpher = {embed_dim = 24}), so that `--model` can switch
    networks without touching the options of the others.""",
    },
)


def _tables_like(model: str, options: dict) -> dict:
    """``options`` as the option table of ``model`` and of every registered variant of its class."""
    family = MODELS[model].model
    return {option_table(name): options for name, variant in MODELS.items() if variant.model is family}


# the image similarities train.similarity (and evaluate.refine_similarity) can name
SIMILARITIES = ("ncc", "ngf", "local-fit", "mse")


@dataclass
class TrainConfig:
    """Optimisation, logging and checkpointing."""

    mode: str = "unsupervised"  # unsupervised: similarity + diffusion; semi-supervised: + Dice on labels
    # ncc (local, window ncc_window), ngf (normalised gradient fields: edge directions only, blind to
    # bias fields and contrast changes; edges weaker than ngf_epsilon per voxel count as noise),
    # local-fit (the residual of a local linear intensity fit in local_fit_window^3 boxes: absorbs
    # bias and contrast, locates sub-voxel motion of edges) or mse
    similarity: str = "ncc"
    ncc_window: int = 9
    ngf_epsilon: float = 0.05
    local_fit_window: int = 3
    # what the similarity compares: "input", the images the network sees (the paper), or "anatomy",
    # the pair rendered with the template's own intensities (brain data only): then no appearance
    # change (bias, gamma, contrast, blur, noise) can be explained by motion
    similarity_images: str = "input"
    similarity_weight: float = 1.0
    diffusion_weight: float = 1.0  # lambda of the diffusion regulariser
    # weight of the squared end-point error (voxels^2, mean over voxels) to the pair's true
    # displacement, which synthetic brain pairs know; 0: unsupervised, as the paper
    flow_weight: float = 0.0
    dice_weight: float = 1.0  # semi-supervised only
    lr: float = 1e-4
    weight_decay: float = 0.0
    scheduler: str = "constant"  # constant or cosine (to 0 over all steps)
    epochs: int = 10
    steps_per_epoch: int = 100  # optimiser steps; an epoch is steps_per_epoch * batch_size * world pairs
    batch_size: int = 1  # per process
    grad_clip: float = 0.0  # max gradient norm; 0 disables
    amp: str = "auto"  # auto (bf16 or fp16 on CUDA, off on CPU), bf16, fp16 or off
    checkpoint_every: int = 50  # steps between checkpoints: a killed run loses at most this many
    val_pairs: int = 0  # validation pairs per epoch; 0: the whole val split
    num_workers: int = 0  # data loader processes
    device: str = "auto"  # auto (cuda when available), cpu, cuda, cuda:1, ...
    threads: int = 0  # CPU threads of this process; 0: PyTorch's default (1 avoids stalls on a busy machine)
    seed: int = 0  # model initialisation and the order of training pairs
    log_every: int = 10  # steps between CSV / TensorBoard rows


@dataclass
class EvaluateConfig:
    """What `xmorpher evaluate` measures."""

    split: str = "test"
    max_pairs: int = 0  # 0: all pairs of the split
    hd95: bool = True  # HD95 needs distance transforms: the slowest metric
    # instance optimisation after the network (`xmorpher register` and `evaluate` too): Adam steps of
    # refine_lr voxels on the pair's own loss, refine_similarity ("train": the training similarity,
    # or one of train.similarity's choices) + refine_diffusion_weight x diffusion (see
    # xmorpher.registration.refine_flow)
    refine_steps: int = 0
    refine_lr: float = 0.05
    refine_diffusion_weight: float = 1.0
    refine_similarity: str = "train"
    # a size-adaptive smoothness prior: a pair whose refined displacement is shorter on average than
    # refine_small_motion voxels (0: never) is refined again, from zero displacement, at
    # refine_small_motion_diffusion_weight. Large motion needs a weak prior; where a pair's motion is a
    # fraction of a voxel the similarity's own error is as large, and a strong prior keeps the pair
    # close to where it is (README, "A smoothness weight per pair")
    refine_small_motion: float = 0.0
    refine_small_motion_diffusion_weight: float = 2.0


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)


_SMALL_XMORPHER = {
    "patch_size": 2, "embed_dim": 16, "depths": [1, 1, 1], "num_heads": [1, 2, 4], "head_channels": 16, "drop_path_rate": 0.0,
}
_TINY_XMORPHER = {"patch_size": 2, "embed_dim": 8, "depths": [1, 1], "num_heads": [1, 2], "head_channels": 8, "drop_path_rate": 0.0}

PRESETS: dict[str, dict] = {
    # The README's main job: a small XMorpher on the built-in brains at 4 mm (40 x 48 x 40) that
    # trains in under 30 minutes on a 2-core CPU.
    # Differs from the paper's protocol where users' scans need it (README, "Nearly aligned pairs"):
    # NGF instead of NCC (blind to the bias fields that NCC reads as motion), three in ten training
    # pairs one subject seen twice (nearly aligned to large), and 100 refinement steps per pair on
    # the residual of a local linear intensity fit (which locates sub-voxel motion NGF cannot see),
    # refined again from zero at diffusion weight 32 when a pair moves less than 0.35 voxels on
    # average: weight 32 is the lightest of 2, 8, 16, 32 that lowered no nearly aligned validation pair.
    "brain-cpu": {
        "data": {"source": "brain", "spacing_mm": 4.0, "train_subjects": 60, "val_subjects": 4, "test_subjects": 10,
                 "near_pairs": 0.3},
        "model": {"name": "xmorpher", **_tables_like("xmorpher", _SMALL_XMORPHER)},
        "train": {"lr": 2e-3, "epochs": 30, "steps_per_epoch": 100, "checkpoint_every": 50, "scheduler": "cosine",
                  "similarity": "ngf"},
        "evaluate": {"refine_steps": 100, "refine_similarity": "local-fit", "refine_diffusion_weight": 0.5,
                     "refine_small_motion": 0.35, "refine_small_motion_diffusion_weight": 32.0},
    },
    # Seconds-long runs for tests: tiny shapes, tiny model.
    "tiny": {
        "data": {"source": "shapes", "shapes_size": [16, 16, 16], "shapes_labels": 3, "shapes_train_pairs": 64,
                 "shapes_val_pairs": 2, "shapes_test_pairs": 2, "spacing_mm": 4.0},
        "model": {"name": "xmorpher", **_tables_like("xmorpher", _TINY_XMORPHER),
                  "voxelmorph": {"encoder_channels": [4, 8], "decoder_channels": [8, 8, 4]}},
        "train": {"epochs": 2, "steps_per_epoch": 3, "checkpoint_every": 2, "log_every": 1, "lr": 1e-3, "threads": 1},
    },
}


def _merge(base: Any, updates: dict, where: str) -> Any:
    """A copy of dataclass `base` with `updates` applied recursively; unknown keys are errors."""
    known = {f.name: f for f in dataclasses.fields(base)}
    changes = {}
    for key, value in updates.items():
        if key not in known:
            raise XMorpherError(f"unknown config key '{where}{key}'; known: {', '.join(known)}")
        current = getattr(base, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise XMorpherError(f"config key '{where}{key}' is a table")
            changes[key] = _merge(current, value, f"{where}{key}.")
        elif isinstance(current, dict):
            changes[key] = {**current, **value} if isinstance(value, dict) else value
        else:
            changes[key] = _coerce(current, value, f"{where}{key}")
    return dataclasses.replace(base, **changes)


def _coerce(current: Any, value: Any, key: str) -> Any:
    """Check a value against the default's type (ints are accepted where floats are expected)."""
    if isinstance(current, bool) or isinstance(value, bool):
        ok = isinstance(current, bool) and isinstance(value, bool)
    elif isinstance(current, float):
        ok = isinstance(value, (int, float))
        value = float(value) if ok else value
    elif isinstance(current, (list, tuple)):
        ok = isinstance(value, (list, tuple))
        value = type(current)(value) if ok else value
    else:
        ok = isinstance(value, type(current))
    if not ok:
        raise XMorpherError(f"config key '{key}' expects {type(current).__name__}, got {value!r}")
    return value


def read_config_file(path: str) -> dict:
    """The tables of a TOML or JSON config file."""
    if not os.path.isfile(path):
        raise XMorpherError(f"{path}: no such config file (presets: {', '.join(PRESETS)})")
    try:
        if path.endswith(".json"):
            with open(path) as handle:
                return json.load(handle)
        try:
            import tomllib
        except ModuleNotFoundError:  # Python < 3.11
            raise XMorpherError(f"{path}: TOML configs need Python 3.11+; use a JSON config") from None
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except (ValueError, OSError) as error:  # JSONDecodeError and TOMLDecodeError are ValueErrors
        raise XMorpherError(f"{path}: cannot parse config ({error})") from None


def parse_override(text: str) -> dict:
    """`train.lr=3e-4` -> {"train": {"lr": 3e-4}}; the value is read as JSON, else as a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise XMorpherError(f"--set expects key=value, got '{text}'")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = {"true": True, "false": False}.get(raw, raw)
    nested: dict = value
    for part in reversed(key.strip().split(".")):
        nested = {part: nested}
    return nested


def load_config(source: Optional[str] = None, overrides: Optional[list] = None, base: Optional[dict] = None) -> Config:
    """Defaults, then `base` (e.g. a checkpoint's config), then a preset name or config file, then
    `key=value` overrides."""
    config = Config()
    if base:
        config = _merge(config, base, "")
    if source:
        config = _merge(config, copy.deepcopy(PRESETS[source]) if source in PRESETS else read_config_file(source), "")
    for override in overrides or []:
        config = _merge(config, parse_override(override), "")
    validate(config)
    return config


def with_evaluate_overrides(config: Config, overrides: Sequence[str]) -> EvaluateConfig:
    """``config.evaluate`` (a trained checkpoint's) with ``evaluate.refine_*=value`` overrides,
    validated. Other keys are refused: those of other sections describe how the network was built
    and trained, and the evaluate split and scoring options are not used when registering a pair."""
    if isinstance(overrides, str):
        raise XMorpherError(f"overrides must be a list of 'evaluate.refine_*=value' strings, got the string '{overrides}'")
    overrides = list(overrides)
    others = [override for override in overrides if not override.split("=", 1)[0].strip().startswith("evaluate.refine_")]
    if others:
        raise XMorpherError(f"a trained checkpoint takes only evaluate.refine_* overrides (the refinement's settings), got {', '.join(others)}")
    return load_config(None, overrides, base=to_dict(config)).evaluate


def validate(config: Config) -> None:
    """Reject values that would only fail later, deep inside a run."""
    choices = {
        "data.source": (config.data.source, ("brain", "shapes", "nifti")),
        "model.name": (config.model.name, MODEL_NAMES),
        "train.mode": (config.train.mode, ("unsupervised", "semi-supervised")),
        "train.similarity": (config.train.similarity, SIMILARITIES),
        "evaluate.refine_similarity": (config.evaluate.refine_similarity, ("train",) + SIMILARITIES),
        "train.similarity_images": (config.train.similarity_images, ("input", "anatomy")),
        "train.scheduler": (config.train.scheduler, ("constant", "cosine")),
        "train.amp": (config.train.amp, ("auto", "bf16", "fp16", "off")),
        "evaluate.split": (config.evaluate.split, ("train", "val", "test")),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise XMorpherError(f"config key '{key}' must be one of {', '.join(allowed)}, got '{value}'")
    positive = {
        "train.epochs": config.train.epochs, "train.steps_per_epoch": config.train.steps_per_epoch,
        "train.batch_size": config.train.batch_size, "train.checkpoint_every": config.train.checkpoint_every,
        "train.log_every": config.train.log_every, "train.lr": config.train.lr,
    }
    for key, value in positive.items():
        if not value > 0:
            raise XMorpherError(f"config key '{key}' must be positive, got {value}")
    refine = config.evaluate
    if refine.refine_steps < 0 or not refine.refine_lr > 0 or not refine.refine_diffusion_weight >= 0:
        raise XMorpherError(
            f"config keys 'evaluate.refine_steps' >= 0, 'evaluate.refine_lr' > 0 and 'evaluate.refine_diffusion_weight' >= 0 "
            f"expected, got {refine.refine_steps}, {refine.refine_lr} and {refine.refine_diffusion_weight}"
        )
    if not refine.refine_small_motion >= 0 or not refine.refine_small_motion_diffusion_weight >= 0:
        raise XMorpherError(
            f"config keys 'evaluate.refine_small_motion' (voxels, 0: off) and 'evaluate.refine_small_motion_diffusion_weight' "
            f"must be >= 0, got {refine.refine_small_motion} and {refine.refine_small_motion_diffusion_weight}"
        )
    if config.train.local_fit_window < 1 or config.train.local_fit_window % 2 == 0:
        raise XMorpherError(f"config key 'train.local_fit_window' must be odd and positive, got {config.train.local_fit_window}")
    if not config.train.ngf_epsilon > 0:
        raise XMorpherError(f"config key 'train.ngf_epsilon' must be > 0, got {config.train.ngf_epsilon}")
    for key, value in {"train.similarity_weight": config.train.similarity_weight, "train.diffusion_weight": config.train.diffusion_weight,
                       "train.flow_weight": config.train.flow_weight}.items():
        if not value >= 0:
            raise XMorpherError(f"config key '{key}' must be >= 0, got {value}")
    if not 0 <= config.data.near_pairs < 1:
        raise XMorpherError(f"config key 'data.near_pairs' is a fraction in [0, 1), got {config.data.near_pairs}")
    if len(config.data.near_pair_scale_range) != 2 or not 0 < config.data.near_pair_scale_range[0] <= config.data.near_pair_scale_range[1]:
        raise XMorpherError(f"config key 'data.near_pair_scale_range' must be [low, high] with 0 < low <= high, got {config.data.near_pair_scale_range}")
    synthetic_only = {"data.near_pairs": config.data.near_pairs > 0, "train.flow_weight": config.train.flow_weight > 0,
                      "train.similarity_images = 'anatomy'": config.train.similarity_images == "anatomy"}
    for key, used in synthetic_only.items():
        if used and config.data.source != "brain":
            raise XMorpherError(f"{key} needs the built-in brains (data.source = 'brain'), which know each pair's anatomy; got '{config.data.source}'")
    if config.data.source == "nifti" and not config.data.pairs_file:
        raise XMorpherError("data.source = 'nifti' needs data.pairs_file (a pairs CSV or a Learn2Reg JSON)")


def to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def from_dict(tables: dict) -> Config:
    """A Config from `to_dict` output (e.g. stored in a checkpoint), checked like a file."""
    config = _merge(Config(), tables, "")
    validate(config)
    return config


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def to_toml(tables: dict, prefix: str = "") -> str:
    """Write nested dicts of scalars and lists as TOML (tables after their plain keys)."""
    plain = [f"{key} = {_toml_value(value)}" for key, value in tables.items() if not isinstance(value, dict)]
    text = "\n".join(plain) + ("\n" if plain else "")
    for key, value in tables.items():
        if isinstance(value, dict):
            name = f"{prefix}{key}"
            text += f"\n[{name}]\n" + to_toml(value, name + ".")
    return text
