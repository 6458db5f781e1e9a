"""The `xmorpher` command: train, register, evaluate, config.

    xmorpher train --config brain-cpu --out runs/brain --evaluate   # the README's main job
    xmorpher train --out runs/brain --resume                        # continue a stopped run
    xmorpher register --checkpoint runs/brain/best.pt --moving m.nii.gz --fixed f.nii.gz --out reg/
    xmorpher evaluate --checkpoint runs/brain/best.pt --out eval/
    xmorpher config --config brain-cpu > my.toml                    # every hyperparameter

Problems a user can fix end in one `xmorpher: error: ...` line and exit status 2; an interrupt
exits with 130. Distributed: `torchrun --nproc_per_node N -m xmorpher.cli train ...`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

from .errors import XMorpherError
from .factory import model_names

EXIT_ERROR, EXIT_INTERRUPTED = 2, 130


def _config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="a preset (brain-cpu, tiny) or a TOML/JSON config file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one key, e.g. train.lr=3e-4 (repeatable)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xmorpher", description="Deformable registration with XMorpher.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a registration network")
    _config_arguments(train)
    train.add_argument("--model", choices=model_names(), help="overrides model.name")
    train.add_argument("--out", required=True, help="run folder: checkpoints, logs, config")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    train.add_argument("--evaluate", action="store_true", help="evaluate best.pt on the test split afterwards")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")

    register = commands.add_parser("register", help="register a moving volume to a fixed one")
    register.add_argument("--checkpoint", required=True)
    register.add_argument("--moving", required=True, help="NIfTI image")
    register.add_argument("--fixed", required=True, help="NIfTI image on the same grid as --moving")
    register.add_argument("--moving-labels", help="NIfTI label map of the moving image, warped with nearest neighbour")
    register.add_argument("--out", required=True, help="folder for warped.nii.gz, displacement.nii.gz, panel.png")
    register.add_argument("--device", default="auto")
    register.add_argument("--refine-steps", type=int, help="instance-optimisation steps after the network (default: the checkpoint's "
                                                             "evaluate.refine_steps; wins over --set evaluate.refine_steps)")
    register.add_argument("--set", action="append", default=[], metavar="evaluate.refine_KEY=VALUE",
                          help="change one of the checkpoint's refinement settings, e.g. evaluate.refine_small_motion_diffusion_weight=2 (repeatable)")

    evaluate = commands.add_parser("evaluate", help="score a checkpoint on a data split")
    evaluate.add_argument("--checkpoint", required=True)
    _config_arguments(evaluate)
    evaluate.add_argument("--split", choices=("train", "val", "test"), help="overrides evaluate.split")
    evaluate.add_argument("--out", help="folder for per_pair.csv, summary.json, example.png")
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument("--no-progress", action="store_true")

    show = commands.add_parser("config", help="print a full config as TOML")
    _config_arguments(show)
    return parser


def _train(args) -> int:
    from .config import load_config
    from .runtime import init_distributed, shutdown_distributed
    from .train import train

    overrides = list(args.set) + ([f"model.name={args.model}"] if args.model else [])
    if args.resume and (args.config or overrides):
        raise XMorpherError("--resume continues the run with its own config; drop --config, --set and --model")
    config = load_config(args.config, overrides)
    try:
        summary = train(config, args.out, resume=args.resume, progress=not args.no_progress)
        is_main = init_distributed().main
    finally:
        shutdown_distributed()
    if is_main:
        best = summary["best"]
        print(f"done: {summary['step']} steps; best val Dice {best.get('val_dice', float('nan')):.4f} at step {best['step']}; "
              f"checkpoints in {args.out}")
        if args.evaluate:
            _print_evaluation(os.path.join(args.out, "best.pt"), None, os.path.join(args.out, "evaluation"), "auto", not args.no_progress)
    return 0


def _print_evaluation(checkpoint: str, config, out_dir: Optional[str], device: str, progress: bool) -> None:
    from .evaluate import evaluate, format_table

    summary = evaluate(checkpoint, config, out_dir=out_dir, device=device, progress=progress)
    print(f"{summary['split']} split, {summary['pairs']} pairs, {checkpoint}:")
    print(format_table(summary))
    if out_dir:
        print(f"per-pair CSV, summary JSON and example.png in {out_dir}")


def _evaluate(args) -> int:
    from .checkpoint import config_of, load_checkpoint
    from .config import load_config, to_dict

    overrides = list(args.set) + ([f"evaluate.split={args.split}"] if args.split else [])
    config = None
    if args.config or overrides:
        base = to_dict(config_of(load_checkpoint(args.checkpoint), args.checkpoint))
        config = load_config(args.config, overrides, base=base)
    _print_evaluation(args.checkpoint, config, args.out, args.device, not args.no_progress)
    return 0


def _register(args) -> int:
    from .registration import register

    result = register(args.moving, args.fixed, args.checkpoint, moving_labels=args.moving_labels, device=args.device,
                      refine_steps=args.refine_steps, overrides=args.set)
    paths = result.save(args.out)
    print(json.dumps(paths, indent=2))
    return 0


def _show_config(args) -> int:
    from .config import load_config, to_dict, to_toml

    print(to_toml(to_dict(load_config(args.config, args.set))), end="")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    command = {"train": _train, "register": _register, "evaluate": _evaluate, "config": _show_config}[args.command]
    try:
        return command(args)
    except XMorpherError as error:
        print(f"xmorpher: error: {error}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("xmorpher: interrupted (a training run resumes from its last checkpoint with --resume)", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
