"""Helpers shared by the tests and benchmarks of every backend: random problems and the
tolerance rule "error of the backend <= k * error of the reference in the same dtype + floor",
with the truth computed by the reference in float64.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple, Union

import torch

from ._checks import check_arguments
from .ops import window_cross_attention

Size = Union[int, Tuple[int, int, int]]
GRAD_NAMES = ("query", "key", "value", "rel_pos_bias", "pad_key", "pad_value")


@dataclass
class Problem:
    """One random call of the op: tensors (leaves requiring grad) plus options."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    window_size: Size
    search_size: Optional[Size]
    options: Dict[str, object] = field(default_factory=dict)

    def tensors(self) -> Dict[str, torch.Tensor]:
        named = {"query": self.query, "key": self.key, "value": self.value}
        for name in ("rel_pos_bias", "pad_key", "pad_value"):
            if self.options.get(name) is not None:
                named[name] = self.options[name]  # type: ignore[assignment]
        return named

    def to(self, dtype: Optional[torch.dtype] = None, device: Optional[Union[str, torch.device]] = None) -> "Problem":
        """A copy with every tensor cast/moved, as fresh leaves requiring grad."""

        def convert(t: torch.Tensor) -> torch.Tensor:
            return t.detach().to(dtype=dtype or t.dtype, device=device or t.device).requires_grad_(True)

        options = {k: convert(v) if isinstance(v, torch.Tensor) else v for k, v in self.options.items()}
        return Problem(convert(self.query), convert(self.key), convert(self.value), self.window_size, self.search_size, options)

    def run(self, backend: str) -> torch.Tensor:
        return window_cross_attention(
            self.query, self.key, self.value, self.window_size, self.search_size, backend=backend, **self.options
        )


def make_problem(
    shape: Sequence[int],
    window_size: Size = 2,
    search_size: Optional[Size] = None,
    *,
    padding: str = "mask",
    bias: bool = False,
    pad_tensors: bool = True,
    scale: Optional[float] = None,
    dtype: torch.dtype = torch.float32,
    device: Union[str, torch.device] = "cpu",
    generator: Optional[torch.Generator] = None,
) -> Problem:
    """A random problem; pad_key/pad_value are random when padding="constant" and pad_tensors."""
    batch, depth, height, width, heads, head_dim = shape

    def rand(*size: int) -> torch.Tensor:
        t = torch.randn(*size, generator=generator, dtype=torch.float64)
        return t.to(dtype=dtype, device=device).requires_grad_(True)

    q, k, v = rand(*shape), rand(*shape), rand(*shape)
    geometry = check_arguments(q, k, v, window_size, search_size, scale, None, padding, None, None).geometry
    options: Dict[str, object] = {"padding": padding}
    if scale is not None:
        options["scale"] = scale
    if bias:
        options["rel_pos_bias"] = rand(heads, *geometry.bias_shape)
    if padding == "constant" and pad_tensors:
        options["pad_key"] = rand(heads, head_dim)
        options["pad_value"] = rand(heads, head_dim)
    return Problem(q, k, v, window_size, search_size, options)


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().double().cpu() - b.detach().double().cpu()).abs().max().item() if a.numel() else 0.0


def check_against_reference(
    problem: Problem,
    backend: str,
    *,
    grads: bool = True,
    factor: float = 4.0,
    floor: Optional[float] = None,
) -> Dict[str, float]:
    """Compare ``backend`` with the float64 reference, forward and every gradient.

    The tolerance for each tensor is ``factor * (error of the reference run in the problem's
    dtype) + floor``. Raises AssertionError naming the tensor that is off (or non-finite).
    Returns the backend's errors.
    """
    dtype = problem.query.dtype
    if floor is None:
        floor = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    truth = problem.to(torch.float64, "cpu")
    same_dtype_ref = problem.to()
    tested = problem.to()

    outputs = {}
    for label, p, name in (("truth", truth, "reference"), ("ref", same_dtype_ref, "reference"), ("tested", tested, backend)):
        out = p.run(name)
        assert out.dtype == dtype or label == "truth", f"{name} returned {out.dtype}, expected {dtype}"
        outputs[label] = out
    errors = {}
    for label in ("ref", "tested"):
        assert torch.isfinite(outputs[label]).all(), f"{backend if label == 'tested' else 'reference'}: non-finite output"

    def compare(name: str, truth_t: torch.Tensor, ref_t: torch.Tensor, got: torch.Tensor) -> None:
        assert got is not None, f"{backend}: no gradient for {name}"
        assert got.shape == truth_t.shape, f"{backend}: {name} has shape {tuple(got.shape)}, expected {tuple(truth_t.shape)}"
        assert torch.isfinite(got).all(), f"{backend}: non-finite values in {name}"
        err, ref_err = max_error(got, truth_t), max_error(ref_t, truth_t)
        scale = truth_t.detach().abs().max().item() if truth_t.numel() else 1.0
        tol = factor * ref_err + floor * max(1.0, scale)
        errors[name] = err
        assert err <= tol, f"{backend}: {name} off by {err:.3e} (reference in {dtype}: {ref_err:.3e}, tolerance {tol:.3e})"

    compare("out", outputs["truth"], outputs["ref"], outputs["tested"])
    if grads:
        gen = torch.Generator().manual_seed(1234)
        grad_out = torch.randn(outputs["truth"].shape, generator=gen, dtype=torch.float64)
        for label, p in (("truth", truth), ("ref", same_dtype_ref), ("tested", tested)):
            outputs[label].backward(grad_out.to(dtype=outputs[label].dtype, device=outputs[label].device))
        for name, t in truth.tensors().items():
            compare(f"grad of {name}", t.grad, same_dtype_ref.tensors()[name].grad, tested.tensors()[name].grad)
    return errors
