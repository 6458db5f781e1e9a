"""Window geometry of the op: base windows, key boxes and bias offsets.

This mirrors ``csrc/include/xmorpher_kernels/window_geometry.h`` (used by the C++ and CUDA
kernels) for the Python reference and the Triton kernels, so every backend derives the same
boxes from the same few formulas of the contract (docs/contract.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Tuple, Union

Triple = Tuple[int, int, int]
SizeArg = Union[int, Sequence[int]]


@dataclass(frozen=True)
class WindowGeometry:
    """Geometry of one call: volume size, base window and searching window per axis (D, H, W)."""

    volume: Triple
    window: Triple
    search: Triple

    @property
    def left(self) -> Triple:
        """Left margin of the key box before the base window origin: ``(s - w) // 2``."""
        return tuple((s - w) // 2 for s, w in zip(self.search, self.window))  # type: ignore[return-value]

    @property
    def num_windows(self) -> Triple:
        """Base windows per axis; the last one is partial when the size is not a multiple."""
        return tuple(math.ceil(n / w) for n, w in zip(self.volume, self.window))  # type: ignore[return-value]

    @property
    def bias_shape(self) -> Triple:
        """Extent of the relative offsets ``j - p`` per axis: ``s + w - 1``."""
        return tuple(s + w - 1 for s, w in zip(self.search, self.window))  # type: ignore[return-value]

    @property
    def queries_per_window(self) -> int:
        return math.prod(self.window)

    @property
    def keys_per_box(self) -> int:
        return math.prod(self.search)
