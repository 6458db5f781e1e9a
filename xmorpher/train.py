"""Training loop: unsupervised (similarity + lambda * diffusion) or semi-supervised (+ Dice) registration,
on synthetic brains optionally with the similarity on appearance-free renderings and a term on the
pairs' known true flow.

One process or many (torchrun: NCCL on GPUs, gloo on CPUs). Resumable exactly: the order of
training pairs is a function of (seed, epoch), the pairs themselves of their index, and checkpoints
carry the model, optimizer, scheduler, grad scaler, step counters and every rank's RNG states. A
killed run loses at most `train.checkpoint_every` steps.

Files in the output folder: config.toml, last.pt (every checkpoint_every steps and at each epoch
end), best.pt (best validation score), log.csv, and tensorboard/ when TensorBoard is installed.
"""

from __future__ import annotations

import csv
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Sampler

from .checkpoint import (
    atomic_save,
    build_model_from_config,
    config_of,
    load_checkpoint,
    load_model_state,
    make_checkpoint,
    rng_state,
    set_rng_state,
)
from .config import SIMILARITIES, Config, TrainConfig, to_dict, to_toml
from .data.datasets import make_dataset
from .errors import XMorpherError, registration_extra
from .framework import dice_loss, dice_per_label, diffusion_loss, local_fit_loss, mse_loss, ncc_loss, ngf_loss, warp, warp_labels
from .runtime import Distributed, all_gather_objects, all_reduce_sum_, autocast_dtype, data_parallel, init_distributed, resolve_device

LOG_FIELDS = ("step", "epoch", "loss", "similarity", "diffusion", "flow_error", "dice_loss", "lr", "pairs_per_s", "val_dice", "val_similarity")


class PairSampler(Sampler):
    """The training pairs of one epoch for one rank, from a given step on.

    The epoch's order is a permutation seeded by (seed, epoch), repeated with fresh seeds when an
    epoch needs more pairs than the dataset holds. Step s uses global positions
    [s * G, (s + 1) * G) with G = batch * world; rank r takes its batch-sized slice of them, so one
    process with batch 2 sees exactly the pairs of two processes with batch 1.
    """

    def __init__(self, size: int, steps: int, batch: int, dist_info: Distributed, seed: int, epoch: int, start_step: int = 0):
        self.size, self.steps, self.batch = size, steps, batch
        self.dist, self.seed, self.epoch, self.start_step = dist_info, seed, epoch, start_step

    def _order(self) -> torch.Tensor:
        needed = self.steps * self.batch * self.dist.world
        rounds = []
        for repeat in range(math.ceil(needed / self.size)):
            seed = np.random.SeedSequence([self.seed, self.epoch, repeat]).generate_state(1)[0]
            generator = torch.Generator().manual_seed(int(seed))
            rounds.append(torch.randperm(self.size, generator=generator))
        return torch.cat(rounds)[:needed]

    def __iter__(self) -> Iterator[int]:
        order = self._order()
        global_batch = self.batch * self.dist.world
        for step in range(self.start_step, self.steps):
            first = step * global_batch + self.dist.rank * self.batch
            yield from order[first : first + self.batch].tolist()

    def __len__(self) -> int:
        return (self.steps - self.start_step) * self.batch


def one_hot(labels: torch.Tensor, count: int) -> torch.Tensor:
    """(B, 1, D, H, W) integer labels -> (B, count, D, H, W) float maps."""
    return F.one_hot(labels[:, 0].clamp_max(count - 1), count).permute(0, 4, 1, 2, 3).float()


def similarity_loss(train: TrainConfig, fixed: torch.Tensor, warped: torch.Tensor) -> torch.Tensor:
    """The configured image similarity loss (lower is better)."""
    if train.similarity == "ncc":
        return ncc_loss(fixed, warped, window=train.ncc_window)
    if train.similarity == "ngf":
        return ngf_loss(fixed, warped, epsilon=train.ngf_epsilon)
    if train.similarity == "local-fit":
        return local_fit_loss(fixed, warped, window=train.local_fit_window)
    if train.similarity == "mse":
        return mse_loss(fixed, warped)
    raise XMorpherError(f"train.similarity must be one of {', '.join(SIMILARITIES)}, got '{train.similarity}'")


def needs_targets(train: TrainConfig) -> bool:
    """Whether the loss uses what only synthetic pairs know (true flow, appearance-free renderings)."""
    return train.similarity_images == "anatomy" or train.flow_weight > 0


def registration_losses(train: TrainConfig, batch: dict, flow: torch.Tensor, num_labels: Optional[int]) -> dict:
    """The loss terms of one batch; `loss` is their weighted sum."""
    flow = flow.float()
    # "anatomy": the renderings without appearance changes, so that only anatomy can be matched
    fixed, moving = (batch["fixed"], batch["moving"]) if train.similarity_images == "input" else (batch["fixed_anatomy"], batch["moving_anatomy"])
    similarity = similarity_loss(train, fixed, warp(moving, flow))
    diffusion = diffusion_loss(flow)
    loss = train.similarity_weight * similarity + train.diffusion_weight * diffusion
    terms = {"similarity": similarity, "diffusion": diffusion, "loss": loss}
    if train.flow_weight > 0:
        flow_error = ((flow - batch["true_flow"].float()) ** 2).sum(1).mean()
        terms["flow_error"] = flow_error
        terms["loss"] = terms["loss"] + train.flow_weight * flow_error
    if train.mode == "semi-supervised":
        if "moving_labels" not in batch:
            raise XMorpherError("train.mode = 'semi-supervised' needs label maps for the training pairs")
        count = num_labels or int(max(batch["moving_labels"].max(), batch["fixed_labels"].max())) + 1
        warped_labels = warp(one_hot(batch["moving_labels"], count), flow)
        # the background channel is left out: it would dominate the score
        dice = dice_loss(warped_labels[:, 1:], one_hot(batch["fixed_labels"], count)[:, 1:])
        terms["dice_loss"] = dice
        terms["loss"] = terms["loss"] + train.dice_weight * dice
    return terms


def to_device(batch: dict, device: torch.device) -> dict:
    return {key: value.to(device, non_blocking=True) if torch.is_tensor(value) else value for key, value in batch.items()}


@torch.no_grad()
def validate(model, config: Config, dataset, device, dist_info: Distributed, autocast: Optional[torch.dtype]) -> dict:
    """Mean Dice over labels and pairs (NaN without labels) and mean similarity loss on the val split,
    each rank scoring every world-th pair."""
    model.eval()
    count = len(dataset) if config.train.val_pairs <= 0 else min(config.train.val_pairs, len(dataset))
    totals = torch.zeros(4, dtype=torch.float64)  # dice sum, dice count, similarity sum, pairs
    for index in range(dist_info.rank, count, dist_info.world):
        item = to_device(torch.utils.data.default_collate([dataset[index]]), device)
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            flow = model(item["moving"], item["fixed"]).float()
        totals[2] += float(similarity_loss(config.train, item["fixed"], warp(item["moving"], flow)))
        totals[3] += 1
        if "moving_labels" in item:
            warped = warp_labels(item["moving_labels"], flow, mode="nearest")
            scores = dice_per_label(warped, item["fixed_labels"])
            totals[0] += float(scores.nanmean())
            totals[1] += 1
    all_reduce_sum_(totals, dist_info)
    model.train()
    dice = float(totals[0] / totals[1]) if totals[1] > 0 else float("nan")
    return {"val_dice": dice, "val_similarity": float(totals[2] / max(float(totals[3]), 1.0))}


def make_scheduler(optimizer, config: Config):
    total = config.train.epochs * config.train.steps_per_epoch
    if config.train.scheduler == "cosine":
        factor = lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total))  # noqa: E731
    else:
        factor = lambda step: 1.0  # noqa: E731
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class CsvLog:
    """Append-only CSV of training rows; on resume, rows written after the checkpoint are dropped so
    that the log matches the resumed run exactly."""

    def __init__(self, path: str, keep_up_to_step: Optional[int]) -> None:
        self.path = path
        rows = []
        if keep_up_to_step is not None and os.path.isfile(path):
            with open(path, newline="") as handle:
                rows = [row for row in csv.DictReader(handle) if int(row["step"]) <= keep_up_to_step]
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, LOG_FIELDS)
            writer.writeheader()
            writer.writerows(rows)

    def write(self, row: dict) -> None:
        with open(self.path, "a", newline="") as handle:
            csv.DictWriter(handle, LOG_FIELDS).writerow({key: row.get(key, "") for key in LOG_FIELDS})


def _tensorboard(out_dir: str):
    """A SummaryWriter when TensorBoard is installed; None otherwise (it is optional)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(os.path.join(out_dir, "tensorboard"))


def _progress(total: int, initial: int, enabled: bool, description: str):
    with registration_extra():
        from tqdm import tqdm

    # redrawn in place on a terminal; into a log file, one line every half minute is plenty
    interval = 0.1 if sys.stderr.isatty() else 30.0
    return tqdm(total=total, initial=initial, disable=not enabled, desc=description, unit="step", mininterval=interval, leave=True)


@dataclass
class TrainingState:
    """What the step, validation and checkpoint functions share. ``step`` and ``best`` advance as
    the run goes; the rest is fixed when the run is set up."""

    config: Config
    dist_info: Distributed
    device: torch.device
    model: torch.nn.Module  # the network itself: checkpoints, validation, gradient clipping
    network: torch.nn.Module  # what training batches go through: `model`, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    autocast: Optional[torch.dtype]
    label_names: list  # of the training data; empty without labels
    step: int = 0
    best: dict = field(default_factory=lambda: {"score": -math.inf, "step": 0})


def train_step(state: TrainingState, batch: dict) -> dict:
    """One optimiser step on a batch of the loader; returns the loss terms as floats."""
    train_config = state.config.train
    batch = to_device(batch, state.device)
    with torch.autocast(state.device.type, dtype=state.autocast, enabled=state.autocast is not None):
        flow = state.network(batch["moving"], batch["fixed"])
    terms = registration_losses(train_config, batch, flow, len(state.label_names) or None)
    if not torch.isfinite(terms["loss"]):
        raise XMorpherError(f"the loss became {float(terms['loss'])} at step {state.step + 1}; lower train.lr or check the data")
    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(terms["loss"]).backward()
    if train_config.grad_clip > 0:
        state.scaler.unscale_(state.optimizer)
        torch.nn.utils.clip_grad_norm_(state.model.parameters(), train_config.grad_clip)
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.scheduler.step()
    state.step += 1
    return {key: float(value.detach()) for key, value in terms.items()}


def validate_epoch(state: TrainingState, val_set, best_path: str) -> dict:
    """Score the val split at the end of an epoch (a collective); a score better than every earlier
    one (Dice, or the similarity without labels) becomes ``best`` and is saved to ``best_path``."""
    scores = validate(state.model, state.config, val_set, state.device, state.dist_info, state.autocast)
    score = scores["val_dice"] if not math.isnan(scores["val_dice"]) else -scores["val_similarity"]
    if score > state.best["score"]:
        state.best = {"score": score, "step": state.step, **scores}
        save_checkpoint(state, best_path)
    return scores


def save_checkpoint(state: TrainingState, path: str) -> None:
    """Write the run as it stands to ``path`` (atomically, from rank 0). Every rank's RNG state goes
    into the file: a collective, so all ranks call this together."""
    rng = all_gather_objects(rng_state(), state.dist_info)
    if state.dist_info.main:
        payload = make_checkpoint(
            state.config, state.model.state_dict(), optimizer=state.optimizer.state_dict(),
            scheduler=state.scheduler.state_dict(), scaler=state.scaler.state_dict() if state.scaler.is_enabled() else None,
            step=state.step, best=state.best, rng=rng, label_names=state.label_names,
        )
        atomic_save(payload, path)


def _open_run(config: Config, out_dir: str, resume: bool, dist_info: Distributed) -> Tuple[Config, Optional[dict]]:
    """The run's config and, when resuming, its last checkpoint; rank 0 writes config.toml."""
    last_path = os.path.join(out_dir, "last.pt")
    payload = None
    if resume:
        if not os.path.isfile(last_path):
            raise XMorpherError(f"nothing to resume: {last_path} does not exist")
        payload = load_checkpoint(last_path)
        config = config_of(payload, last_path)
    elif os.path.exists(last_path):
        raise XMorpherError(f"{out_dir} already holds a run; pass --resume to continue it or choose another --out")
    if dist_info.main:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "config.toml"), "w") as handle:
            handle.write(to_toml(to_dict(config)))
    return config, payload


def _set_up(config: Config, dist_info: Distributed, label_names: list, payload: Optional[dict], path: str) -> TrainingState:
    """Model, optimiser, scheduler and grad scaler on this process's device, seeded, or restored
    from ``payload`` (read from ``path``) with this rank's RNG state."""
    device = resolve_device(config.train.device, dist_info.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL collectives use the current device
    if config.train.threads > 0:
        torch.set_num_threads(config.train.threads)
    torch.manual_seed(config.train.seed)
    model = build_model_from_config(config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.train.lr, weight_decay=config.train.weight_decay)
    scheduler = make_scheduler(optimizer, config)
    autocast = autocast_dtype(config.train.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=autocast == torch.float16)
    state = TrainingState(config, dist_info, device, model, model, optimizer, scheduler, scaler, autocast, label_names)
    if payload is not None:
        load_model_state(model, payload["model"], path)
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        if payload["scaler"]:
            scaler.load_state_dict(payload["scaler"])
        state.step, state.best = payload["step"], payload["best"]
        rng_states = payload["rng"]
        if len(rng_states) != dist_info.world and dist_info.main:
            print(f"warning: resuming a {len(rng_states)}-process run with {dist_info.world} processes; not bit-exact", file=sys.stderr)
        set_rng_state(rng_states[dist_info.rank % len(rng_states)])
    state.network = data_parallel(model, device, dist_info)
    state.network.train()
    return state


def _epoch_loader(train_set, state: TrainingState, epoch: int, start_step: int) -> DataLoader:
    """This rank's batches of epoch ``epoch`` from its step ``start_step`` on."""
    train_config = state.config.train
    sampler = PairSampler(len(train_set), train_config.steps_per_epoch, train_config.batch_size, state.dist_info,
                          train_config.seed, epoch, start_step)
    # its own generator: a loader otherwise draws its workers' base seed from the global torch
    # RNG, which would make a resumed epoch (a new loader mid-epoch) diverge from an uninterrupted one
    return DataLoader(
        train_set, batch_size=train_config.batch_size, sampler=sampler, num_workers=train_config.num_workers,
        pin_memory=state.device.type == "cuda", generator=torch.Generator().manual_seed(train_config.seed + epoch),
    )


def _record(log: Optional[CsvLog], board, row: dict, group: str, scalars: dict) -> None:
    """A row of log.csv (rank 0 only: the others have no log), and ``scalars`` in TensorBoard under ``group/``."""
    if log is None:
        return
    log.write(row)
    if board is not None:
        for key, value in scalars.items():
            board.add_scalar(f"{group}/{key}", value, row["step"])


def train(config: Config, out_dir: str, *, resume: bool = False, progress: bool = True) -> dict:
    """Train `config.model` on `config.data` into `out_dir`; returns the final summary (rank 0's view).

    With `resume`, continue the run in `out_dir` from its last.pt exactly where it stopped (the
    checkpoint's config is used). Without it, `out_dir` must not hold a run already.
    """
    dist_info = init_distributed()
    last_path, best_path = os.path.join(out_dir, "last.pt"), os.path.join(out_dir, "best.pt")
    config, payload = _open_run(config, out_dir, resume, dist_info)
    train_set, val_set = make_dataset(config.data, "train", targets=needs_targets(config.train)), make_dataset(config.data, "val")
    state = _set_up(config, dist_info, list(getattr(train_set, "label_names", None) or []), payload, last_path)
    log = CsvLog(os.path.join(out_dir, "log.csv"), state.step if resume else None) if dist_info.main else None
    board = _tensorboard(out_dir) if dist_info.main else None

    steps_per_epoch, epochs = config.train.steps_per_epoch, config.train.epochs
    pairs_per_step = config.train.batch_size * dist_info.world
    bar = _progress(epochs * steps_per_epoch, state.step, progress and dist_info.main, f"train {config.model.name}")
    summary: dict = {"step": state.step}
    throughput = None
    try:
        while state.step < epochs * steps_per_epoch:
            epoch, start = divmod(state.step, steps_per_epoch)
            tick = time.perf_counter()
            for batch in _epoch_loader(train_set, state, epoch, start):
                values = train_step(state, batch)
                now = time.perf_counter()
                rate = pairs_per_step / max(now - tick, 1e-9)
                throughput = rate if throughput is None else 0.9 * throughput + 0.1 * rate
                tick = now
                bar.update(1)
                bar.set_postfix(loss=f"{values['loss']:.4f}", pairs_s=f"{throughput:.2f}", epoch=epoch + 1, refresh=False)
                if state.step % config.train.log_every == 0:
                    row = {"step": state.step, "epoch": epoch + 1, "lr": state.scheduler.get_last_lr()[0], "pairs_per_s": throughput, **values}
                    _record(log, board, row, "train", row)
                end_of_epoch = state.step % steps_per_epoch == 0
                if end_of_epoch:
                    scores = validate_epoch(state, val_set, best_path)
                    summary = {"step": state.step, "epoch": epoch + 1, **scores, "best_step": state.best["step"]}
                    _record(log, board, {"step": state.step, "epoch": epoch + 1, **scores}, "val", scores)
                    bar.write(
                        f"epoch {epoch + 1}/{epochs}: val Dice {scores['val_dice']:.4f}, val similarity "
                        f"{scores['val_similarity']:.4f} (best step {state.best['step']})"
                    )
                if end_of_epoch or state.step % config.train.checkpoint_every == 0:
                    save_checkpoint(state, last_path)
    finally:
        bar.close()
        if board is not None:
            board.close()
    summary.update({"best": state.best, "out_dir": out_dir})
    return summary
