"""The op's contract (docs/contract.md), tested once for every backend.

Each test is parametrised over the four backends (reference, cpu, triton, cuda) on the device
each runs on here: the CPU for reference and cpu, the CPU interpreter for Triton when there is no
GPU, a GPU for cuda (and Triton when there is one). A backend that cannot run on this machine
skips with the reason, so every backend has the same cases. Backend-specific checks (instruction
sets, ahead-of-time compiles, cubins) live in test_cpu.py, test_triton.py and test_cuda.py.
Tolerances follow the rule of ``xmorpher_kernels.testing``: error of the backend <= k x error of
the reference in the same dtype + a floor, against float64 truth.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Optional

import pytest
import torch

from xmorpher_kernels import available_backends, window_cross_attention
from xmorpher_kernels.testing import GRAD_NAMES, Problem, check_against_reference, make_problem

ON_GPU = torch.cuda.is_available()


@dataclass(frozen=True)
class Target:
    """A backend on the device it runs on here, with the most precise dtype it takes."""

    backend: str
    device: str
    exact_dtype: torch.dtype  # float64 where the backend takes it, else float32

    def skip_reason(self) -> Optional[str]:
        status = available_backends()[self.backend]
        if not status.available:
            return f"{self.backend} is not available: {status.reason}"
        if self.device == "cuda" and not ON_GPU:
            return f"{self.backend} runs on a GPU and this machine has none"
        if self.device not in status.devices and "any" not in status.devices:
            return f"{self.backend} does not run {self.device} tensors here (devices: {status.devices})"
        return None


TARGETS = {
    "reference": Target("reference", "cpu", torch.float64),
    "cpu": Target("cpu", "cpu", torch.float64),
    # Without a GPU, Triton runs in its CPU interpreter (conftest.py turns it on).
    "triton": Target("triton", "cuda" if ON_GPU else "cpu", torch.float32),
    "cuda": Target("cuda", "cuda", torch.float32),
}


@pytest.fixture(params=list(TARGETS))
def target(request) -> Target:
    chosen = TARGETS[request.param]
    reason = chosen.skip_reason()
    if reason is not None:
        pytest.skip(reason)
    return chosen


def _on(problem: Problem, target: Target, dtype: Optional[torch.dtype] = None) -> Problem:
    return problem.to(dtype=dtype, device=target.device)


# ----------------------------------------------------------------------------------------------
# The contract (docs/contract.md), transcribed literally
# ----------------------------------------------------------------------------------------------


def spec_attention(q, k, v, window, search, scale, bias=None, padding="mask", pad_key=None, pad_value=None):
    """The contract, one query and one key at a time (tiny sizes only), in float64 on the CPU."""
    q, k, v = (t.detach().double().cpu() for t in (q, k, v))
    bias, pad_key, pad_value = (None if t is None else t.detach().double().cpu() for t in (bias, pad_key, pad_value))
    batch, depth, height, width, heads, head_dim = q.shape
    sizes = (depth, height, width)
    left = [(s - w) // 2 for s, w in zip(search, window)]
    zero = torch.zeros(head_dim, dtype=torch.float64)
    out = torch.zeros_like(q)
    for b, h, z, y, x in itertools.product(range(batch), range(heads), range(depth), range(height), range(width)):
        p = (z, y, x)
        origin = [(pi // wi) * wi for pi, wi in zip(p, window)]
        scores, values = [], []
        for j in itertools.product(*(range(o - l, o - l + s) for o, l, s in zip(origin, left, search))):
            if all(0 <= ji < n for ji, n in zip(j, sizes)):
                key, value = k[b, j[0], j[1], j[2], h], v[b, j[0], j[1], j[2], h]
            elif padding == "constant":
                key = pad_key[h] if pad_key is not None else zero
                value = pad_value[h] if pad_value is not None else zero
            else:
                continue
            score = scale * torch.dot(q[b, z, y, x, h], key)
            if bias is not None:
                d = [ji - pi for ji, pi in zip(j, p)]
                score = score + bias[h, d[0] + left[0] + window[0] - 1, d[1] + left[1] + window[1] - 1,
                                     d[2] + left[2] + window[2] - 1]
            scores.append(score)
            values.append(value)
        weights = torch.softmax(torch.stack(scores), dim=0)
        out[b, z, y, x, h] = (weights[:, None] * torch.stack(values)).sum(0)
    return out


SPEC_CASES = {
    # shape, window, search, padding, bias
    "paper-window": ((1, 4, 4, 4, 1, 3), (2, 2, 2), (6, 6, 6), "mask", False),
    "asymmetric-bias": ((2, 3, 5, 2, 2, 2), (2, 3, 1), (5, 4, 3), "mask", True),
    "constant-bias": ((1, 5, 3, 4, 2, 3), (2, 2, 3), (3, 4, 4), "constant", True),
    "unit-window": ((1, 3, 3, 3, 1, 2), (1, 1, 1), (1, 2, 3), "constant", False),
}
SPEC_TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5}


@pytest.mark.parametrize("case", list(SPEC_CASES))
def test_matches_spec_transcription(target, case, generator):
    shape, window, search, padding, bias = SPEC_CASES[case]
    problem = make_problem(shape, window, search, padding=padding, bias=bias, scale=0.7, dtype=torch.float64,
                           generator=generator)
    opts = problem.options
    expected = spec_attention(problem.query, problem.key, problem.value, window, search, 0.7, opts.get("rel_pos_bias"),
                              padding, opts.get("pad_key"), opts.get("pad_value"))
    got = _on(problem, target, target.exact_dtype).run(target.backend)
    tolerance = SPEC_TOLERANCE[target.exact_dtype]
    torch.testing.assert_close(got.detach().double().cpu(), expected, rtol=tolerance, atol=tolerance)


def test_worked_example_uses_exactly_the_spec_keys(target, generator):
    """The contract's worked example: zero keys give uniform attention, so the output of query
    (3, 0, 1) is the mean of exactly the values it attends to: the 64 in-volume keys with
    padding="mask", all 216 (152 of them pad_value) with padding="constant"."""
    dtype, device = target.exact_dtype, target.device
    shape = (1, 4, 4, 4, 1, 16)
    q = torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype=dtype, device=device)
    k = torch.zeros(shape, dtype=dtype, device=device)
    v = torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype=dtype, device=device)
    in_volume = v[0].reshape(64, 16).double()
    masked = window_cross_attention(q, k, v, 2, 6, backend=target.backend)
    tolerance = SPEC_TOLERANCE[dtype]
    torch.testing.assert_close(masked[0, 3, 0, 1, 0].double(), in_volume.mean(0), rtol=tolerance, atol=tolerance)
    pad_value = torch.randn(1, 16, generator=generator, dtype=torch.float64).to(dtype=dtype, device=device)
    constant = window_cross_attention(q, k, v, 2, 6, padding="constant", pad_key=torch.zeros_like(pad_value),
                                      pad_value=pad_value, backend=target.backend)
    expected = (in_volume.sum(0) + 152 * pad_value[0].double()) / 216
    torch.testing.assert_close(constant[0, 3, 0, 1, 0].double(), expected, rtol=tolerance, atol=tolerance)


# ----------------------------------------------------------------------------------------------
# Random calls against float64 truth, forward and every gradient
# ----------------------------------------------------------------------------------------------

RANDOM_CASES = {
    # shape (B, D, H, W, heads, head_dim), window, search: partial windows, odd head dims, B > 1
    "asymmetric": ((2, 5, 7, 6, 3, 16), (2, 3, 1), (5, 4, 3)),
    "default-search-odd-dim": ((2, 7, 5, 9, 2, 5), 2, None),
    "paper": ((1, 5, 6, 7, 2, 16), 2, 6),
    "wide-window": ((1, 4, 6, 5, 1, 7), (3, 2, 2), (3, 4, 6)),
    "flat": ((2, 1, 3, 10, 2, 1), (1, 2, 4), (1, 3, 8)),
}


@pytest.mark.parametrize("case", list(RANDOM_CASES))
@pytest.mark.parametrize("padding", ["mask", "constant"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_random_against_float64_truth(target, case, padding, bias, generator):
    shape, window, search = RANDOM_CASES[case]
    problem = make_problem(shape, window, search, padding=padding, bias=bias, generator=generator)
    check_against_reference(_on(problem, target), target.backend)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_every_dtype_it_takes(target, dtype, generator):
    if dtype not in available_backends()[target.backend].dtypes:
        pytest.skip(f"{target.backend} does not take {dtype}")
    problem = make_problem((2, 3, 5, 6, 2, 16), (2, 3, 1), (5, 4, 3), padding="constant", bias=True,
                           generator=generator)
    check_against_reference(_on(problem, target, dtype), target.backend)


def test_constant_padding_defaults_and_custom_scale(target, generator):
    """pad_key/pad_value left out mean zero rows (one of them given: the other is zeros)."""
    problem = make_problem((2, 5, 4, 6, 2, 8), 2, (4, 6, 5), padding="constant", pad_tensors=False, scale=0.31,
                           generator=generator)
    check_against_reference(_on(problem, target), target.backend)
    problem.options["pad_value"] = torch.randn(2, 8, generator=generator).requires_grad_(True)
    check_against_reference(_on(problem, target), target.backend)


def test_strided_inputs(target, generator):
    """Views whose last dimension alone is contiguous (a fused qkv projection, permuted storage)
    and a key whose last dimension is not (copied by the op) give the results of contiguous ones."""
    base = make_problem((2, 4, 5, 6, 2, 8), 2, None, bias=True, generator=generator)
    batch, depth, height, width, heads, head_dim = base.query.shape
    qkv = torch.randn(batch, depth, height, width, heads, 3 * head_dim, generator=generator)
    permuted = base.key.detach().permute(0, 3, 2, 1, 4, 5).contiguous().permute(0, 3, 2, 1, 4, 5)
    transposed = base.value.detach().transpose(4, 5).contiguous().transpose(4, 5)
    device = target.device
    query = qkv.to(device)[..., head_dim:2 * head_dim].detach().requires_grad_(True)
    key = permuted.to(device).requires_grad_(True)
    value = transposed.to(device).requires_grad_(True)
    assert query.stride(-1) == 1 and not query.is_contiguous()
    assert key.stride(-1) == 1 and not key.is_contiguous()
    assert value.stride(-1) != 1
    options = {name: t.detach().to(device).requires_grad_(True) if isinstance(t, torch.Tensor) else t
               for name, t in base.options.items()}
    check_against_reference(Problem(query, key, value, 2, None, options), target.backend)


def _gradients(problem: Problem, backend: str):
    fresh = problem.to()
    out = fresh.run(backend)
    grad_out = torch.ones_like(out).mul_(0.5) + torch.arange(out.numel(), dtype=out.dtype,
                                                             device=out.device).reshape(out.shape).sin()
    out.backward(grad_out)
    return [out.detach().clone()] + [t.grad.clone() for t in fresh.tensors().values()]


def test_backward_is_bitwise_reproducible(target, generator):
    """Under torch.use_deterministic_algorithms(True) repeated calls give identical bits."""
    problem = _on(make_problem((2, 5, 6, 7, 2, 16), 2, 6, padding="constant", bias=True, generator=generator), target)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first = _gradients(problem, target.backend)
        again = _gradients(problem, target.backend)
    finally:
        torch.use_deterministic_algorithms(previous)
    for name, a, b in zip(("out",) + GRAD_NAMES, first, again):
        assert torch.equal(a, b), f"{name} differs between two runs"


def test_fp64_gradcheck(target, generator):
    if torch.float64 not in available_backends()[target.backend].dtypes:
        pytest.skip(f"{target.backend} has no float64 kernels to gradcheck")
    for padding in ("mask", "constant"):
        problem = _on(make_problem((2, 2, 3, 3, 1, 2), (2, 3, 1), (5, 4, 3), padding=padding, bias=True,
                                   dtype=torch.float64, generator=generator), target)
        names = list(problem.tensors())

        def call(*tensors):
            named = dict(zip(names, tensors))
            extra = {n: named[n] for n in ("rel_pos_bias", "pad_key", "pad_value") if n in named}
            return window_cross_attention(named["query"], named["key"], named["value"], (2, 3, 1), (5, 4, 3),
                                          padding=padding, backend=target.backend, **extra)

        # The reference's gradients are PyTorch's own autograd through ~50 small ops: the fast
        # (random projection) mode checks them in seconds where the full one takes minutes.
        assert torch.autograd.gradcheck(call, tuple(problem.tensors().values()),
                                        fast_mode=target.backend == "reference")


# ----------------------------------------------------------------------------------------------
# Compile support
# ----------------------------------------------------------------------------------------------

FORWARD_OPS = {
    "cpu": "xmorpher_kernels::window_attention_forward",
    "cuda": "xmorpher_kernels::window_attention_forward",
    "triton": "xmorpher_kernels::triton_window_attention_forward",
}
BACKWARD_OPS = {name: op.replace("forward", "backward") for name, op in FORWARD_OPS.items()}


def test_opcheck(target, generator):
    """Schema, fake implementation, autograd registration and AOT dispatch of the backend's ops."""
    if target.backend not in FORWARD_OPS:
        pytest.skip("the reference is plain PyTorch: it has no custom op to check")
    forward = torch.ops.xmorpher_kernels.__getattr__(FORWARD_OPS[target.backend].split("::")[1]).default
    backward = torch.ops.xmorpher_kernels.__getattr__(BACKWARD_OPS[target.backend].split("::")[1]).default
    problem = _on(make_problem((1, 2, 3, 4, 1, 8), (2, 3, 1), (5, 4, 3), padding="constant", bias=True,
                               dtype=target.exact_dtype, generator=generator), target)
    o = problem.options
    args = (problem.query, problem.key, problem.value, [2, 3, 1], [5, 4, 3], 0.5, o["rel_pos_bias"], o["pad_key"],
            o["pad_value"])
    torch.library.opcheck(forward, args)
    torch.library.opcheck(forward, args[:6] + (None, None, None))
    out, lse = forward(*args)
    detached = tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in args)
    backward_args = (torch.randn_like(out), *detached[:3], out.detach(), lse, *detached[3:], True)
    torch.library.opcheck(backward, backward_args)


def test_torch_compile_fullgraph(target, generator):
    problem = _on(make_problem((1, 4, 5, 6, 2, 8), 2, 6, padding="constant", bias=True, generator=generator), target)

    def block(q, k, v, bias, pad_key, pad_value):
        out = window_cross_attention(q * 2, k, v, 2, 6, rel_pos_bias=bias, padding="constant", pad_key=pad_key,
                                     pad_value=pad_value, backend=target.backend)
        return (out.square() + 1).sum()

    tensors = tuple(problem.tensors().values())
    # aot_eager traces the fake and autograd registrations without code generation: what matters
    # here, and quick; inductor on the GPU.
    compiled = torch.compile(block, fullgraph=True, backend="inductor" if target.device == "cuda" else "aot_eager")
    eager_loss = block(*tensors)
    eager_grads = torch.autograd.grad(eager_loss, tensors)
    compiled_loss = compiled(*tensors)
    compiled_grads = torch.autograd.grad(compiled_loss, tensors)
    torch.testing.assert_close(compiled_loss, eager_loss)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------------------------
# Bad input and edge cases
# ----------------------------------------------------------------------------------------------


def _bad_calls(device: str):
    """(description, call kwargs override, exception, message fragment): every bad input of the
    contract, rejected before any kernel runs whichever backend is named."""
    q = torch.randn(1, 4, 4, 4, 2, 8, device=device)
    heads, head_dim = 2, 8
    other_device = "meta"

    def small(*shape, **kw):
        return torch.zeros(*shape, device=kw.pop("device", device), **kw)

    return [
        ("5-d query", dict(query=q[0], key=q[0], value=q[0]), ValueError, "query must have 6 dimensions"),
        ("not a tensor", dict(query=q.tolist()), TypeError, "query must be a torch.Tensor"),
        ("integer query", dict(query=q.long(), key=q.long(), value=q.long()), TypeError, "floating point"),
        ("key shape", dict(key=q[:, :3]), ValueError, "key must have the shape of query"),
        ("value dtype", dict(value=q.double()), TypeError, "value must have the dtype of query"),
        ("mixed devices", dict(key=q.to(other_device)), ValueError, "key must be on the device of query"),
        ("empty axis", dict(query=q[:, :0], key=q[:, :0], value=q[:, :0]), ValueError, "D dimension must be >= 1"),
        ("zero head_dim", dict(query=q[..., :0], key=q[..., :0], value=q[..., :0]), ValueError, "head_dim dimension"),
        ("window 0", dict(window_size=0), ValueError, "window_size must be >= 1"),
        ("window pair", dict(window_size=(2, 2)), ValueError, "window_size must have 3 entries"),
        ("window float", dict(window_size=2.0), TypeError, "window_size must be an int"),
        ("window bool", dict(window_size=True), TypeError, "window_size must be an int"),
        ("window bool entry", dict(window_size=(True, 2, 2)), TypeError, "window_size must hold ints"),
        ("search < window", dict(window_size=3, search_size=(3, 2, 3)), ValueError, "search_size must be >= window_size"),
        ("search 0", dict(search_size=(0, 1, 1)), ValueError, "search_size must be >= 1"),
        ("scale string", dict(scale="0.5"), TypeError, "scale must be a float"),
        ("scale bool", dict(scale=True), TypeError, "scale must be a float"),
        ("scale nan", dict(scale=math.nan), ValueError, "scale must be finite"),
        ("bias shape", dict(rel_pos_bias=small(heads, 7, 7, 6)), ValueError, "rel_pos_bias must have shape (2, 7, 7, 7)"),
        ("bias dtype", dict(rel_pos_bias=small(heads, 7, 7, 7, dtype=torch.float64)), TypeError,
         "rel_pos_bias must have the dtype"),
        ("pad_key with mask", dict(pad_key=small(heads, head_dim)), ValueError,
         'pad_key is only used with padding="constant"'),
        ("pad_value shape", dict(padding="constant", pad_value=small(heads, head_dim + 1)), ValueError,
         "pad_value must have shape (2, 8)"),
        ("pad_key device", dict(padding="constant", pad_key=small(heads, head_dim, device=other_device)), ValueError,
         "pad_key must be on the device"),
        ("unknown padding", dict(padding="reflect"), ValueError, "padding must be one of ('mask', 'constant')"),
        ("unknown backend", dict(backend="tpu"), ValueError, "backend must be one of"),
    ]


@pytest.mark.parametrize("index", range(len(_bad_calls("cpu"))), ids=[c[0] for c in _bad_calls("cpu")])
def test_bad_input_is_rejected_clearly(target, index):
    description, override, error, fragment = _bad_calls(target.device)[index]
    q = torch.randn(1, 4, 4, 4, 2, 8, device=target.device)
    kwargs = dict(query=q, key=q, value=q, window_size=2, search_size=None, backend=target.backend)
    if not any(isinstance(v, torch.Tensor) for v in override.values()):
        # The same tensors in a valid call first: its cached decision must not let the bad one through.
        window_cross_attention(**kwargs)
    kwargs.update(override)
    with pytest.raises(error) as caught:
        window_cross_attention(**kwargs)
    assert fragment in str(caught.value), f"{description}: {caught.value}"


def test_empty_batch_gives_zero_gradients(target, generator):
    """B = 0: an empty output, and a zero gradient for every input that requires one (distinct
    query, key and value, bias and pad tensors)."""
    problem = _on(make_problem((1, 4, 4, 4, 2, 8), 2, None, padding="constant", bias=True, generator=generator),
                  target)
    empty = Problem(*(t.detach()[:0].requires_grad_(True) for t in (problem.query, problem.key, problem.value)),
                    problem.window_size, problem.search_size, problem.options)
    out = empty.run(target.backend)
    assert out.shape == empty.query.shape
    out.sum().backward()
    for name, t in empty.tensors().items():
        assert t.grad is not None, f"no gradient for {name}"
        assert t.grad.shape == t.shape and not t.grad.any(), f"gradient of {name} is not zeros"
