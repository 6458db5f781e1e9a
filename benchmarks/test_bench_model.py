"""pytest-benchmark of one XMorpher training step, op backend "cpu" (fused) vs "reference".

Run: ``python -m pytest benchmarks/test_bench_model.py`` from the repository root. The byte
counts are attached to each benchmark's ``extra_info``; ``python benchmarks/model_step.py``
prints the same figures as a table for the README. Under ``XK_BENCH_QUICK=1`` the bytes are
counted at 32^3 (the fused op still saves under a third there) and a 16^3 step is timed once.
"""

from __future__ import annotations

import pytest

from model_step import PAPER_SIZE, check_fake_matches_real, make_step, saved_bytes_for_backward
from op_problems import QUICK

COUNTED_SIZE = (32, 32, 32) if QUICK else PAPER_SIZE
TIMED_SIZE = (16, 16, 16) if QUICK else (64, 64, 64)


def test_fake_count_matches_a_real_run():
    counts = check_fake_matches_real("cpu")
    assert counts["fake"] == counts["real"] > 0


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_training_step(benchmark, backend):
    if not QUICK:  # the fused-vs-reference ratio is checked below; here the figures for the README
        saved = saved_bytes_for_backward(backend, PAPER_SIZE)
        benchmark.extra_info.update({f"saved_{k}_bytes_{'x'.join(map(str, PAPER_SIZE))}": v for k, v in saved.items()})
    benchmark.extra_info["timed_size"] = "x".join(map(str, TIMED_SIZE))
    benchmark.pedantic(make_step(backend, TIMED_SIZE), rounds=1 if QUICK else 2, iterations=1, warmup_rounds=1)


def test_fused_backend_saves_at_most_a_third():
    cpu = saved_bytes_for_backward("cpu", COUNTED_SIZE)["activations"]
    reference = saved_bytes_for_backward("reference", COUNTED_SIZE)["activations"]
    assert cpu <= reference / 3
