"""Where does an unsupervised registration objective's optimum lie on pairs a user would bring?

No network: the objective (a similarity + lambda x diffusion) is minimised directly over a free
displacement on each generalization pair (``xmorpher.data.GeneralizationPairs``: another deformation
model, each image with its own bias field, tissue contrasts, gamma, blur and noise), with the
refinement the main job uses (``xmorpher.registration.refine_flow``), starting from the identity or
from the exact answer. A network trained on an objective can do no better than that objective's
optimum, so this separates what the loss asks for from what a network learns.

    python benchmarks/objective_optimum.py --similarity ncc --diffusion-weight 1 --start truth
    python benchmarks/objective_optimum.py --similarity ngf --diffusion-weight 4 --start identity
    python benchmarks/objective_optimum.py --similarity local-fit --diffusion-weight 2 --start truth

    python benchmarks/objective_optimum.py --similarity ngf --diffusion-weight 4 --start truth --appearance bias_strength

Prints one markdown row per setting: the mean Dice change per deformation-size bin
(Neuromorphometrics labels on the 1 mm grid) and on how many pairs of the bin it is negative.
``--appearance`` keeps only some of the pairs' appearance changes (the others set to zero), to see
which of them moves an objective's optimum.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Optional, Sequence

import torch

from xmorpher.config import SIMILARITIES, load_config
from xmorpher.data.datasets import GENERALIZATION_BINS_MM, GeneralizationPairs
from xmorpher.data.synth import IntensityParams
from xmorpher.registration import refine_flow


def optimum_changes(pairs: GeneralizationPairs, similarity: str, diffusion_weight: float, start: str, steps: int, lr: float) -> list:
    """Per pair (bin, Dice change of the first label set) after ``steps`` of the objective from ``start``."""
    train = load_config(None, [f"train.similarity={similarity}"]).train
    label_set = pairs.label_sets[0]
    changes = []
    for index in range(len(pairs)):
        item = torch.utils.data.default_collate([pairs[index]])
        zero = torch.zeros((1, 3, *item["fixed"].shape[2:]))
        initial = pairs.true_flow(index) if start == "truth" else zero
        flow = refine_flow(item["moving"], item["fixed"], initial, train, steps, lr, diffusion_weight)
        changes.append((pairs.bin_of(index), pairs.score(item, flow)[label_set] - pairs.score(item, zero)[label_set]))
    return changes


# the appearance changes GeneralizationPairs gives each image (IntensityParams' fields it uses)
APPEARANCE_CHANGES = ("tissue_contrast", "bias_strength", "gamma_std", "blur_max", "noise_max")


def appearance(kept: str) -> IntensityParams:
    """"all": every appearance change at its default; "none": none; else the '+'-joined changes kept."""
    if kept == "all":
        return IntensityParams()
    names = [] if kept == "none" else kept.split("+")
    unknown = [name for name in names if name not in APPEARANCE_CHANGES]
    if unknown:
        raise SystemExit(f"--appearance: unknown change(s) {unknown}; expected all, none or '+'-joined names from {APPEARANCE_CHANGES}")
    defaults = IntensityParams()
    return IntensityParams(**{name: getattr(defaults, name) if name in names else 0.0 for name in APPEARANCE_CHANGES})


def table_row(label: str, changes: list, bins: int) -> str:
    cells = []
    for b in range(bins):
        values = [change for bin_index, change in changes if bin_index == b]
        cells.append(f"{sum(values) / len(values):+.4f} (lower on {sum(v < 0 for v in values)}/{len(values)})")
    return f"| {label} | " + " | ".join(cells) + " |"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--similarity", choices=SIMILARITIES, default="ngf")
    parser.add_argument("--diffusion-weight", type=float, nargs="+", default=[1.0], help="one row per weight")
    parser.add_argument("--start", choices=("identity", "truth"), default="identity", help="the zero flow or the exact answer")
    parser.add_argument("--steps", type=int, default=100, help="Adam steps (the main job refines with 100)")
    parser.add_argument("--lr", type=float, default=0.05, help="Adam step size, voxels")
    parser.add_argument("--pairs-per-bin", type=int, default=8)
    parser.add_argument("--seed", type=int, default=1, help="generalization pairs' seed (1: the validation pairs)")
    parser.add_argument("--spacing-mm", type=float, default=4.0, help="the images' voxel size (the main job's 4 mm)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--appearance", default="all",
                        help=f"appearance changes kept: all, none, or '+'-joined names from {', '.join(APPEARANCE_CHANGES)}")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    pairs = GeneralizationPairs(args.pairs_per_bin, spacing_mm=args.spacing_mm, seed=args.seed, intensity=appearance(args.appearance))
    bins = [f"{low:g}-{high:g} mm" for low, high in GENERALIZATION_BINS_MM]
    changes_kept = "" if args.appearance == "all" else f", appearance changes: {args.appearance}"
    print(f"| objective, from the {args.start}, {args.steps} steps (seed {args.seed}{changes_kept}) | " + " | ".join(bins) + " |")
    print("|---|" + "---|" * len(bins))
    for weight in args.diffusion_weight:
        changes = optimum_changes(pairs, args.similarity, weight, args.start, args.steps, args.lr)
        print(table_row(f"{args.similarity} + {weight:g} x diffusion", changes, len(bins)), flush=True)
    print(f"{time.perf_counter() - started:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
