"""Shared test set-up: Triton's CPU interpreter on machines without a GPU, and fresh random
seeds, reproducible through XK_TEST_SEED."""

from __future__ import annotations

import os
import random

import pytest
import torch

# Triton decorates its own library when it is first imported, compiled or interpreted as
# TRITON_INTERPRET says then; xmorpher_kernels imports it, so decide before any test module does.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def seed(request) -> int:
    """A fresh seed per test, printed on failure; set XK_TEST_SEED to replay one."""
    value = int(os.environ.get("XK_TEST_SEED", random.SystemRandom().randrange(2**31)))
    request.node.user_properties.append(("seed", value))
    print(f"seed={value} (replay with XK_TEST_SEED={value})")
    return value


@pytest.fixture
def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)

