"""The op's contract on every backend that runs on the CPU: a brute-force transcription of the
spec, the worked example, random comparisons with the reference (forward and all gradients),
fp64 gradcheck, determinism, torch.compile, and every bad input."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import xmorpher_kernels
from xmorpher_kernels import available_backends, window_cross_attention
from xmorpher_kernels._extension import _C
from xmorpher_kernels.testing import GRAD_NAMES, check_against_reference, make_problem

CPU_BACKENDS = [
    name
    for name, status in available_backends().items()
    if status.available and "cpu" in status.devices and name not in ("reference", "triton")
]
FUSED_CPU = pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="the cpu backend was not built")


def spec_attention(q, k, v, window, search, scale, bias=None, padding="mask", pad_key=None, pad_value=None):
    """The spec, transcribed literally: one query at a time, one key at a time (tiny sizes only)."""
    batch, depth, height, width, heads, head_dim = q.shape
    sizes = (depth, height, width)
    left = [(s - w) // 2 for s, w in zip(search, window)]
    out = torch.zeros_like(q)
    for b, h, z, y, x in itertools.product(range(batch), range(heads), range(depth), range(height), range(width)):
        p = (z, y, x)
        origin = [(pi // wi) * wi for pi, wi in zip(p, window)]
        scores, values = [], []
        for j in itertools.product(*(range(o - l, o - l + s) for o, l, s in zip(origin, left, search))):
            inside = all(0 <= ji < n for ji, n in zip(j, sizes))
            if inside:
                key, value = k[b, j[0], j[1], j[2], h], v[b, j[0], j[1], j[2], h]
            elif padding == "constant":
                key = pad_key[h] if pad_key is not None else torch.zeros_like(q[0, 0, 0, 0, 0])
                value = pad_value[h] if pad_value is not None else torch.zeros_like(q[0, 0, 0, 0, 0])
            else:
                continue
            score = scale * torch.dot(q[b, z, y, x, h], key)
            if bias is not None:
                d = [ji - pi for ji, pi in zip(j, p)]
                score = score + bias[h, d[0] + left[0] + window[0] - 1, d[1] + left[1] + window[1] - 1, d[2] + left[2] + window[2] - 1]
            scores.append(score)
            values.append(value)
        weights = torch.softmax(torch.stack(scores), dim=0)
        out[b, z, y, x, h] = (weights[:, None] * torch.stack(values)).sum(0)
    return out


SPEC_CASES = [
    # shape, window, search, padding, bias
    ((1, 4, 4, 4, 1, 3), (2, 2, 2), (6, 6, 6), "mask", False),
    ((2, 3, 5, 2, 2, 2), (2, 3, 1), (5, 4, 3), "mask", True),
    ((1, 5, 3, 4, 2, 3), (2, 2, 3), (3, 4, 4), "constant", True),
    ((1, 3, 3, 3, 1, 2), (1, 1, 1), (1, 2, 3), "constant", False),
]


@pytest.mark.parametrize("shape,window,search,padding,bias", SPEC_CASES)
@pytest.mark.parametrize("backend", ["reference", *CPU_BACKENDS])
def test_matches_spec_transcription(shape, window, search, padding, bias, backend, generator):
    problem = make_problem(shape, window, search, padding=padding, bias=bias, scale=0.7, dtype=torch.float64, generator=generator)
    opts = problem.options
    expected = spec_attention(
        problem.query, problem.key, problem.value, window, search, 0.7, opts.get("rel_pos_bias"), padding,
        opts.get("pad_key"), opts.get("pad_value"),
    )
    got = problem.run(backend)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", ["reference", *CPU_BACKENDS])
def test_worked_example_keys_used(backend, generator):
    """Zero keys give uniform attention, so the output is the mean of exactly the keys used."""
    shape = (1, 4, 4, 4, 1, 5)
    q = torch.randn(shape, generator=generator, dtype=torch.float64)
    k = torch.zeros(shape, dtype=torch.float64)
    v = torch.randn(shape, generator=generator, dtype=torch.float64)
    masked = window_cross_attention(q, k, v, 2, 6, backend=backend)
    torch.testing.assert_close(masked[0, 3, 0, 1, 0], v[0].reshape(64, 5).mean(0))  # the 64 in-volume keys
    pad_value = torch.randn(1, 5, generator=generator, dtype=torch.float64)
    constant = window_cross_attention(q, k, v, 2, 6, padding="constant", pad_key=torch.zeros(1, 5, dtype=torch.float64),
                                      pad_value=pad_value, backend=backend)
    expected = (v[0].reshape(64, 5).sum(0) + 152 * pad_value[0]) / 216  # all 216, 152 of them padded
    torch.testing.assert_close(constant[0, 3, 0, 1, 0], expected)


RANDOM_CASES = [
    # shape (B, D, H, W, heads, head_dim), window, search
    ((2, 5, 7, 6, 3, 16), (2, 3, 1), (5, 4, 3)),
    ((2, 7, 5, 9, 2, 5), 2, None),
    ((1, 9, 8, 7, 4, 16), 2, 6),
    ((3, 4, 6, 5, 1, 7), (3, 2, 2), (3, 4, 6)),
    ((1, 6, 6, 6, 2, 32), 3, (5, 5, 5)),
    ((2, 1, 3, 10, 2, 1), (1, 2, 4), (1, 3, 8)),
]


@FUSED_CPU
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape,window,search", RANDOM_CASES)
@pytest.mark.parametrize("padding", ["mask", "constant"])
@pytest.mark.parametrize("bias", [False, True])
def test_random_against_reference(backend, shape, window, search, padding, bias, generator):
    problem = make_problem(shape, window, search, padding=padding, bias=bias, generator=generator)
    check_against_reference(problem, backend)


@FUSED_CPU
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("padding", ["mask", "constant"])
def test_other_dtypes(dtype, padding, generator):
    problem = make_problem((2, 5, 6, 7, 2, 16), (2, 3, 1), (5, 4, 3), padding=padding, bias=True, dtype=dtype, generator=generator)
    check_against_reference(problem, "cpu")


@FUSED_CPU
@pytest.mark.parametrize("padding", ["mask", "constant"])
def test_custom_scale_and_constant_padding_without_pad_tensors(padding, generator):
    problem = make_problem((2, 5, 4, 6, 2, 8), 2, (4, 6, 5), padding=padding, pad_tensors=False, scale=0.31, generator=generator)
    check_against_reference(problem, "cpu")


@FUSED_CPU
@pytest.mark.skipif(_C is None, reason="no extension")
@pytest.mark.parametrize("isa", _C.supported_cpu_isas() if _C is not None else [])
def test_every_instruction_set(isa, generator):
    previous = _C.cpu_isa()
    _C.set_cpu_isa(isa)
    try:
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            problem = make_problem((2, 5, 7, 6, 3, 16), (2, 3, 1), (5, 4, 3), padding="constant", bias=True, dtype=dtype, generator=generator)
            check_against_reference(problem, "cpu")
    finally:
        _C.set_cpu_isa(previous)


@FUSED_CPU
def test_strided_inputs(generator):
    """Permuted views (unit-stride last dim, used as they are) and a non-unit last dim (copied)."""
    base = make_problem((2, 5, 6, 7, 3, 8), 2, None, bias=True, generator=generator)
    permuted = base.to()
    for name in ("query", "key", "value"):
        t = getattr(base, name).detach()
        view = t.permute(0, 3, 2, 1, 4, 5).contiguous().permute(0, 3, 2, 1, 4, 5).requires_grad_(True)
        assert not view.is_contiguous() and view.stride(-1) == 1
        setattr(permuted, name, view)
    check_against_reference(permuted, "cpu")
    transposed = base.to()
    t = transposed.key.detach()
    transposed.key = t.transpose(4, 5).contiguous().transpose(4, 5).requires_grad_(True)
    assert transposed.key.stride(-1) != 1
    check_against_reference(transposed, "cpu")


@FUSED_CPU
@pytest.mark.parametrize("padding", ["mask", "constant"])
def test_gradcheck_fp64(padding, generator):
    problem = make_problem((2, 3, 4, 3, 2, 3), (2, 3, 1), (5, 4, 3), padding=padding, bias=True, dtype=torch.float64, generator=generator)
    names = list(problem.tensors())
    assert len(names) == (6 if padding == "constant" else 4)

    def call(*tensors):
        named = dict(zip(names, tensors))
        extra = {n: named[n] for n in ("rel_pos_bias", "pad_key", "pad_value") if n in named}
        return window_cross_attention(named["query"], named["key"], named["value"], (2, 3, 1), (5, 4, 3),
                                      padding=padding, backend="cpu", **extra)

    assert torch.autograd.gradcheck(call, tuple(problem.tensors().values()))


def _gradients(problem, backend):
    fresh = problem.to()
    out = fresh.run(backend)
    out.backward(torch.ones_like(out).mul_(0.5) + torch.arange(out.numel(), dtype=out.dtype).reshape(out.shape).sin())
    return [t.grad.clone() for t in fresh.tensors().values()]


@FUSED_CPU
def test_backward_is_bitwise_deterministic(generator):
    problem = make_problem((2, 7, 6, 9, 3, 16), 2, 6, padding="constant", bias=True, generator=generator)
    first = _gradients(problem, "cpu")
    threads = torch.get_num_threads()
    try:
        for count in (1, max(2, threads)):
            torch.set_num_threads(count)
            again = _gradients(problem, "cpu")
            for name, a, b in zip(GRAD_NAMES, first, again):
                assert torch.equal(a, b), f"gradient of {name} differs with {count} threads"
    finally:
        torch.set_num_threads(threads)


@FUSED_CPU
def test_torch_compile_fullgraph(generator):
    problem = make_problem((1, 4, 5, 6, 2, 8), 2, 6, padding="constant", bias=True, generator=generator)

    def block(q, k, v, bias, pad_key, pad_value):
        out = window_cross_attention(q * 2, k, v, 2, 6, rel_pos_bias=bias, padding="constant",
                                     pad_key=pad_key, pad_value=pad_value, backend="cpu")
        return (out.square() + 1).sum()

    tensors = tuple(problem.tensors().values())
    compiled = torch.compile(block, fullgraph=True)
    eager_loss = block(*tensors)
    eager_grads = torch.autograd.grad(eager_loss, tensors)
    compiled_loss = compiled(*tensors)
    compiled_grads = torch.autograd.grad(compiled_loss, tensors)
    torch.testing.assert_close(compiled_loss, eager_loss)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b)


@FUSED_CPU
def test_opcheck_native_ops(generator):
    problem = make_problem((2, 3, 4, 5, 2, 4), (2, 3, 1), (5, 4, 3), padding="constant", bias=True, dtype=torch.float64, generator=generator)
    o = problem.options
    args = (problem.query, problem.key, problem.value, [2, 3, 1], [5, 4, 3], 0.5, o["rel_pos_bias"], o["pad_key"], o["pad_value"])
    torch.library.opcheck(torch.ops.xmorpher_kernels.window_attention_forward.default, args)
    masked = (problem.query, problem.key, problem.value, [2, 3, 1], [5, 4, 3], 0.5, None, None, None)
    torch.library.opcheck(torch.ops.xmorpher_kernels.window_attention_forward.default, masked)


def test_empty_batch_returns_empty_output():
    q = torch.randn(0, 4, 4, 4, 2, 8, requires_grad=True)
    out = window_cross_attention(q, q, q, 2)
    assert out.shape == q.shape
    out.sum().backward()
    assert q.grad.shape == q.shape


def test_reference_runs_on_any_device():
    q = torch.randn(1, 3, 4, 5, 2, 8, device="meta")
    assert window_cross_attention(q, q, q, 2, backend="auto").shape == q.shape


def test_auto_picks_the_fused_cpu_backend():
    from xmorpher_kernels._backends import select_backend
    from xmorpher_kernels._checks import check_arguments

    q = torch.randn(1, 4, 4, 4, 2, 8)
    args = check_arguments(q, q, q, 2, None, None, None, "mask", None, None)
    expected = "cpu" if "cpu" in CPU_BACKENDS else "reference"
    assert select_backend("auto", args).name == expected
    args_half = check_arguments(q.half(), q.half(), q.half(), 2, None, None, None, "mask", None, None)
    assert select_backend("auto", args_half).name == "reference"  # no fused fp16 kernel on the CPU


@pytest.mark.parametrize(
    "dtype, head_dim, window, expected",
    [
        (torch.bfloat16, 16, 2, ["cuda", "triton"]),  # the tensor-core CUDA kernels
        (torch.float16, 32, (2, 2, 2), ["cuda", "triton"]),
        (torch.float32, 16, 2, ["triton", "cuda"]),  # generic CUDA kernels: Triton first
        (torch.bfloat16, 24, 2, ["triton", "cuda"]),  # head_dim not a multiple of 16
        (torch.bfloat16, 16, (3, 2, 2), ["triton", "cuda"]),  # 12 queries per window
    ],
    ids=str,
)
def test_auto_order_puts_cuda_generic_kernels_behind_triton(dtype, head_dim, window, expected):
    from xmorpher_kernels._backends import auto_candidates
    from xmorpher_kernels._checks import check_arguments

    q = torch.zeros(1, 4, 4, 4, 1, head_dim, dtype=dtype, device="meta")
    order = auto_candidates(check_arguments(q, q, q, window, None, None, None, "mask", None, None))
    assert [name for name in order if name in ("cuda", "triton")] == expected
    assert order[-1] == "reference"


@pytest.mark.parametrize("requires_grad", [True, False])
def test_auto_order_under_deterministic_algorithms(requires_grad):
    # The CUDA backend's deterministic backward is slower than Triton's: "auto" tries Triton
    # first when a backward may follow, and keeps the faster CUDA forward for inference.
    from xmorpher_kernels._backends import auto_candidates
    from xmorpher_kernels._checks import check_arguments

    q = torch.zeros(1, 4, 4, 4, 1, 16, dtype=torch.bfloat16, device="meta", requires_grad=requires_grad)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        order = auto_candidates(check_arguments(q, q, q, 2, None, None, None, "mask", None, None))
    finally:
        torch.use_deterministic_algorithms(previous)
    expected = ["triton", "cuda"] if requires_grad else ["cuda", "triton"]
    assert [name for name in order if name in ("cuda", "triton")] == expected


def test_available_backends_explain_themselves():
    statuses = available_backends()
    assert {"reference", "cpu", "cuda"} <= set(statuses)
    assert statuses["reference"].available
    for status in statuses.values():
        assert status.available == (status.reason is None)
        if not status.available:
            assert isinstance(status.reason, str) and status.reason


# Every bad input of the contract: (description, call kwargs override, exception, message fragment).
def _bad_calls():
    q = torch.randn(1, 4, 4, 4, 2, 8)
    ok = dict(query=q, key=q, value=q)
    heads, head_dim = 2, 8
    return [
        ("5-d query", dict(query=q[0], key=q[0], value=q[0]), ValueError, "query must have 6 dimensions"),
        ("not a tensor", dict(query=q.tolist()), TypeError, "query must be a torch.Tensor"),
        ("integer query", dict(query=q.long(), key=q.long(), value=q.long()), TypeError, "floating point"),
        ("key shape", dict(key=q[:, :3]), ValueError, "key must have the shape of query"),
        ("value dtype", dict(value=q.double()), TypeError, "value must have the dtype of query"),
        ("mixed devices", dict(key=q.to("meta")), ValueError, "key must be on the device of query"),
        ("empty axis", dict(query=q[:, :0], key=q[:, :0], value=q[:, :0]), ValueError, "D dimension must be >= 1"),
        ("zero head_dim", dict(query=q[..., :0], key=q[..., :0], value=q[..., :0]), ValueError, "head_dim dimension"),
        ("window 0", dict(window_size=0), ValueError, "window_size must be >= 1"),
        ("window pair", dict(window_size=(2, 2)), ValueError, "window_size must have 3 entries"),
        ("window float", dict(window_size=2.0), TypeError, "window_size must be an int"),
        ("search < window", dict(window_size=3, search_size=(3, 2, 3)), ValueError, "search_size must be >= window_size"),
        ("search 0", dict(search_size=(0, 1, 1)), ValueError, "search_size must be >= 1"),
        ("scale string", dict(scale="0.5"), TypeError, "scale must be a float"),
        ("scale nan", dict(scale=math.nan), ValueError, "scale must be finite"),
        ("bias shape", dict(rel_pos_bias=torch.zeros(heads, 7, 7, 6)), ValueError, "rel_pos_bias must have shape (2, 7, 7, 7)"),
        ("bias dtype", dict(rel_pos_bias=torch.zeros(heads, 7, 7, 7, dtype=torch.float64)), TypeError, "rel_pos_bias must have the dtype"),
        ("pad_key with mask", dict(pad_key=torch.zeros(heads, head_dim)), ValueError, 'pad_key is only used with padding="constant"'),
        ("pad_value shape", dict(padding="constant", pad_value=torch.zeros(heads, head_dim + 1)), ValueError, "pad_value must have shape (2, 8)"),
        ("pad_key device", dict(padding="constant", pad_key=torch.zeros(heads, head_dim, device="meta")), ValueError, "pad_key must be on the device"),
        ("unknown padding", dict(padding="reflect"), ValueError, "padding must be one of ('mask', 'constant')"),
        ("unknown backend", dict(backend="tpu"), ValueError, "backend must be one of"),
        ("cuda backend on cpu tensors", dict(backend="cuda"), ValueError, "backend 'cuda' cannot run this call"),
        ("fp16 on the cpu backend", dict(query=q.half(), key=q.half(), value=q.half(), backend="cpu"), ValueError, "backend 'cpu' cannot run this call"),
    ], ok


@pytest.mark.parametrize("index", range(len(_bad_calls()[0])))
def test_bad_input_is_rejected_clearly(index):
    cases, ok = _bad_calls()
    description, override, error, fragment = cases[index]
    kwargs = dict(ok, window_size=2, search_size=None, backend="reference")
    kwargs.update(override)
    with pytest.raises(error) as caught:
        window_cross_attention(**kwargs)
    assert fragment in str(caught.value), f"{description}: {caught.value}"


def test_named_backend_error_lists_the_capable_ones():
    q = torch.randn(1, 4, 4, 4, 2, 8)
    with pytest.raises(ValueError) as caught:
        window_cross_attention(q, q, q, backend="cuda")
    assert "Backends that can: " in str(caught.value) and "reference" in str(caught.value)


def test_public_names():
    assert set(xmorpher_kernels.__all__) >= {"window_cross_attention", "available_backends"}
