"""Checkpoints: atomic writes, safe loading, and building the network a checkpoint describes.

A checkpoint is a dict saved with torch.save that loads with ``weights_only=True``: the full config,
the model, optimizer, scheduler and grad-scaler states, the step counters, the best validation
score, and every process's RNG states, so that a resumed run continues exactly.
"""

from __future__ import annotations

import os
import pickle
import random
import zipfile

import numpy as np
import torch

from .config import Config, from_dict, to_dict
from .errors import XMorpherError
from .factory import build_model

FORMAT = "xmorpher-checkpoint"
VERSION = 1


def build_model_from_config(config: Config) -> torch.nn.Module:
    """The network of `config.model`; bad options become a one-line XMorpherError."""
    options = config.model.options()
    try:
        return build_model(config.model.name, attention_backend=config.model.attention_backend, **options)
    except (TypeError, ValueError) as error:
        raise XMorpherError(f"cannot build model '{config.model.name}' with options {options}: {error}") from None


def atomic_save(payload: dict, path: str) -> None:
    """Write to a temporary file in the same folder, flush it to disk, then rename over `path`:
    a crash leaves either the old file or the new one, never a torn one."""
    temporary = f"{path}.tmp-{os.getpid()}"
    torch.save(payload, temporary)
    with open(temporary, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def rng_state() -> dict:
    """This process's Python, numpy, torch and CUDA generator states, as weights_only-safe types."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    kind, keys, position, has_gauss, cached = state["numpy"]
    random.setstate(state["python"])
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def make_checkpoint(config: Config, model_state: dict, **fields) -> dict:
    return {"format": FORMAT, "version": VERSION, "config": to_dict(config), "model": model_state, **fields}


def load_checkpoint(path: str, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint written by `xmorpher train`; anything else is a one-line XMorpherError."""
    if not os.path.isfile(path):
        raise XMorpherError(f"{path}: no such checkpoint")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise XMorpherError(f"{path}: not a readable checkpoint ({first_line})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise XMorpherError(f"{path}: not an xmorpher checkpoint")
    if payload.get("version") != VERSION:
        raise XMorpherError(f"{path}: checkpoint format version {payload.get('version')}, this xmorpher reads {VERSION}")
    return payload


def config_of(payload: dict, path: str) -> Config:
    try:
        return from_dict(payload["config"])
    except XMorpherError as error:
        raise XMorpherError(f"{path}: the checkpoint's config does not fit this xmorpher: {error}") from None


def load_model_state(model: torch.nn.Module, state: dict, path: str) -> None:
    """load_state_dict with a one-line error naming the first mismatching tensors."""
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        detail = " ".join(str(error).split())
        raise XMorpherError(f"{path}: the checkpoint's weights do not fit the model ({detail[:300]})") from None


def load_model(path: str, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Config, dict]:
    """The trained network of a checkpoint, in eval mode on `device`, with its config and payload."""
    payload = load_checkpoint(path)
    config = config_of(payload, path)
    model = build_model_from_config(config)
    load_model_state(model, payload["model"], path)
    return model.to(device).eval(), config, payload
