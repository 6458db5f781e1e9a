"""Score a checkpoint on a split: Dice, HD95, % |J| <= 0 and SDlogJ, next to the identity baseline.

Dice and HD95 are per label (the label set of the data), averaged over labels per pair, then over
pairs; HD95 is in mm (the data's voxel size). SDlogJ is the plain std of log |J| (the Learn2Reg
+3-shifted variant is in the JSON). The identity row scores the unregistered pairs.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from typing import Optional

import numpy as np
import torch

from .config import Config
from .data.datasets import make_dataset
from .errors import registration_extra
from .framework import (
    dice_per_label,
    hd95_per_label,
    percent_nonpositive_jacobian,
    std_log_jacobian,
    std_log_jacobian_learn2reg_plus3,
    warp,
    warp_labels,
)
from .registration import Registrar, save_panel

METRICS = ("dice", "hd95", "nonpositive_jacobian_percent", "sd_log_jacobian")
HEADERS = {"dice": "Dice", "hd95": "HD95 (mm)", "nonpositive_jacobian_percent": "% |J|<=0", "sd_log_jacobian": "SDlogJ"}


def _nanmean(values) -> float:
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def _nanstd(values) -> float:
    values = [v for v in values if not math.isnan(v)]
    return float(np.std(values)) if values else float("nan")


def score_pair(item: dict, flow: torch.Tensor, labels: Optional[list], with_hd95: bool) -> dict:
    """Metrics of one pair (batch of 1) for a given flow."""
    row = {
        "nonpositive_jacobian_percent": float(percent_nonpositive_jacobian(flow)[0]),
        "sd_log_jacobian": float(std_log_jacobian(flow)[0]),
        "sd_log_jacobian_learn2reg_plus3": float(std_log_jacobian_learn2reg_plus3(flow)[0]),
        "dice": float("nan"),
        "hd95": float("nan"),
    }
    if "moving_labels" in item:
        warped = warp_labels(item["moving_labels"], flow, mode="nearest")
        chosen = labels or sorted({int(v) for v in torch.unique(torch.cat([item["fixed_labels"], item["moving_labels"]])) if v != 0})
        row["dice_per_label"] = dice_per_label(warped, item["fixed_labels"], chosen)[0].tolist()
        row["dice"] = _nanmean(row["dice_per_label"])
        if with_hd95:
            spacing = tuple(float(s) for s in item["spacing"][0])
            row["hd95"] = _nanmean(hd95_per_label(warped, item["fixed_labels"], chosen, spacing)[0].tolist())
    return row


def _without_nan(value):
    """NaN -> None, so that the JSON is standard (NaN is not JSON)."""
    if isinstance(value, dict):
        return {key: _without_nan(v) for key, v in value.items()}
    if isinstance(value, list):
        return [_without_nan(v) for v in value]
    return None if isinstance(value, float) and math.isnan(value) else value


def format_table(summary: dict) -> str:
    """Plain-text table: one row per method, mean +- std over pairs."""
    header = f"{'method':<22}" + "".join(f"{HEADERS[m]:>20}" for m in METRICS) + f"{'s/pair':>10}"
    lines = [header, "-" * len(header)]
    for method, stats in summary["methods"].items():
        cells = "".join(f"{stats[m]['mean']:>12.4f} +- {stats[m]['std']:<5.3f}" if not math.isnan(stats[m]["mean"]) else f"{'n/a':>20}" for m in METRICS)
        lines.append(f"{method:<22}{cells}{stats['seconds_per_pair']:>10.3f}")
    return "\n".join(lines)


def _save_example(path: str, dataset, registrar: Registrar, rows: list, method: str) -> None:
    """The panel of the pair with the median Dice gain of ``method`` (a typical registration, not the
    best one)."""
    identity = [row for row in rows if row["method"] == "identity"]
    registered = [row for row in rows if row["method"] == method]
    gains = [after["dice"] - before["dice"] for before, after in zip(identity, registered)]
    ranked = sorted(range(len(gains)), key=lambda i: -np.inf if math.isnan(gains[i]) else gains[i])
    index = ranked[len(ranked) // 2]
    item = torch.utils.data.default_collate([dataset[index]])
    flow = registrar.flow(item["moving"], item["fixed"]).cpu()
    warped = warp(item["moving"], flow)
    save_panel(
        path, item["fixed"][0, 0].numpy(), item["moving"][0, 0].numpy(), warped[0, 0].numpy(), flow[0].numpy(),
        title=f"{method}, {item['name'][0]}: Dice {identity[index]['dice']:.3f} -> {registered[index]['dice']:.3f}",
    )


def evaluate(
    checkpoint: str,
    config: Optional[Config] = None,
    *,
    out_dir: Optional[str] = None,
    device: str = "auto",
    progress: bool = True,
) -> dict:
    """Score `checkpoint` on `config.evaluate.split` of `config.data` (default: the checkpoint's own
    config). Writes per_pair.csv, summary.json and example.png to `out_dir` when given."""
    with registration_extra():
        from tqdm import tqdm

    registrar = Registrar(checkpoint, device, evaluate=config.evaluate if config else None)
    config = config or registrar.config
    dataset = make_dataset(config.data, config.evaluate.split)
    count = len(dataset) if config.evaluate.max_pairs <= 0 else min(config.evaluate.max_pairs, len(dataset))
    names = getattr(dataset, "label_names", None)
    labels = list(range(1, len(names))) if names else None
    network = registrar.config.model.name
    # with refinement, the network's own prediction is scored too: what the refinement adds
    method = f"{network} + refinement" if registrar.refine_steps else network
    rows = []
    for index in tqdm(range(count), desc=f"evaluate {config.evaluate.split}", disable=not progress, unit="pair"):
        item = torch.utils.data.default_collate([dataset[index]])
        start = time.perf_counter()
        predicted = registrar.predict(item["moving"], item["fixed"])
        predicted_seconds = time.perf_counter() - start
        flow = registrar.refine(item["moving"], item["fixed"], predicted).cpu()
        seconds = time.perf_counter() - start
        rows.append({"pair": item["name"][0], "method": "identity", "seconds": 0.0,
                     **score_pair(item, torch.zeros_like(flow), labels, config.evaluate.hd95)})
        if registrar.refine_steps:
            rows.append({"pair": item["name"][0], "method": network, "seconds": predicted_seconds,
                         **score_pair(item, predicted.cpu(), labels, config.evaluate.hd95)})
        rows.append({"pair": item["name"][0], "method": method, "seconds": seconds, **score_pair(item, flow, labels, config.evaluate.hd95)})
    summary = {"checkpoint": checkpoint, "split": config.evaluate.split, "pairs": count, "methods": {}}
    for name in dict.fromkeys(("identity", network, method)):
        chosen = [row for row in rows if row["method"] == name]
        stats = {m: {"mean": _nanmean([r[m] for r in chosen]), "std": _nanstd([r[m] for r in chosen])} for m in METRICS}
        stats["sd_log_jacobian_learn2reg_plus3"] = {"mean": _nanmean([r["sd_log_jacobian_learn2reg_plus3"] for r in chosen])}
        stats["seconds_per_pair"] = float(np.mean([r["seconds"] for r in chosen]))
        if names and chosen and "dice_per_label" in chosen[0]:
            per_label = np.nanmean(np.array([r["dice_per_label"] for r in chosen], dtype=float), axis=0)
            stats["dice_per_label"] = {names[label]: float(v) for label, v in zip(labels, per_label)}
        summary["methods"][name] = stats
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        if count:
            _save_example(os.path.join(out_dir, "example.png"), dataset, registrar, rows, method)
        with open(os.path.join(out_dir, "per_pair.csv"), "w", newline="") as handle:
            fields = ["pair", "method", *METRICS, "sd_log_jacobian_learn2reg_plus3", "seconds"]
            writer = csv.DictWriter(handle, fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        with open(os.path.join(out_dir, "summary.json"), "w") as handle:
            json.dump(_without_nan(summary), handle, indent=2)
    return summary
