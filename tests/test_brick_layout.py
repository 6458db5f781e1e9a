"""The layout of the brick CUDA kernels, checked on the CPU from the tables the kernels use
(csrc/include/xmorpher_kernels/brick_layout.h, returned by ``xmorpher_kernels._C`` debug
functions) against the op's contract (docs/contract.md), restated here in
plain Python: which tokens a brick stages and at which shared-memory row, which box token each
fragment row holds, the bias index of every pair, the masks, the key pass's inversion of the
window relation, the warps' units, and conflict-free ldmatrix phases. A NumPy model then computes
the forward and the key/value gradients through those tables and must match the reference.
"""

from __future__ import annotations

import itertools
import random
from typing import Dict, List, Sequence, Tuple

import numpy as np
import pytest
import torch

from xmorpher_kernels import reference
from xmorpher_kernels._extension import _C
from xmorpher_kernels.testing import make_problem

pytestmark = pytest.mark.skipif(
    not (_C is not None and hasattr(_C, "brick_plan")),
    reason="the native extension with the brick layout functions is not built",
)

KEYS, QUERIES = "keys_of_window", "queries_of_key_block"
PAIR_BIAS, PAIR_ZERO, PAIR_MASKED = 0, 1, 2
GEOMETRIES = [  # (volume, window, search)
    ((36, 36, 32), (2, 2, 2), (6, 6, 6)),
    ((5, 7, 6), (2, 3, 1), (5, 4, 3)),
    ((5, 7, 6), (1, 2, 2), (3, 4, 6)),
    ((9, 8, 7), (2, 2, 2), (4, 6, 2)),
    ((6, 6, 9), (1, 1, 2), (3, 5, 7)),
    ((7, 5, 8), (2, 2, 2), (2, 2, 2)),
]


def plan(volume, window, search, kind, head_dim=16, **kwargs) -> dict:
    p = _C.brick_plan(list(volume), list(window), list(search), head_dim, kind, **kwargs)
    assert p["not_covered"] is None, p["not_covered"]
    return p


# ------------------------------------------------------------------ the contract, in plain Python


def margin(window: int, search: int) -> int:
    return (search - window) // 2


def sees(key: Sequence[int], query: Sequence[int], window, search) -> bool:
    """Whether the key box of query's base window holds key (contract steps 1-2)."""
    for j, p, w, s in zip(key, query, window, search):
        start = (p // w) * w - margin(w, s)
        if not start <= j < start + s:
            return False
    return True


def bias_index(key, query, window, search) -> int:
    """Flat index of bias(key - query) (contract step 3)."""
    index = 0
    for j, p, w, s in zip(key, query, window, search):
        index = index * (s + w - 1) + (j - p + margin(w, s) + w - 1)
    return index


def unravel(index: int, sizes: Sequence[int]) -> Tuple[int, ...]:
    coords = []
    for size in reversed(sizes):
        coords.append(index % size)
        index //= size
    return tuple(reversed(coords))


# ------------------------------------------------------------------------------------ the tables


@pytest.mark.parametrize("volume, window, search", GEOMETRIES, ids=str)
def test_window_pairs_follow_the_spec(volume, window, search):
    # Forward / query pass: box token m is key (o - l + m's coords) of the window at o, slot n
    # its query (o + n's coords); every pair takes part, with the contract's bias index.
    p = plan(volume, window, search, KEYS)
    assert p["box_extent"] == list(search) and p["slots"] == int(np.prod(window))
    spec_table = _C.brick_pair_bias_index(list(volume), list(window), list(search), KEYS)
    origin = tuple(3 * w for w in window)  # any window: the relation does not depend on it
    for m in range(224):
        for n in range(8):
            kind, index = p["pair_kind"][m][n], p["pair_index"][m][n]
            if m >= p["box"]:
                assert kind == PAIR_MASKED and spec_table[m][n] == -1
                continue
            if n >= p["slots"]:
                assert kind == PAIR_ZERO and spec_table[m][n] == -1
                continue
            key = [o - margin(w, s) + c for o, w, s, c in zip(origin, window, search, unravel(m, search))]
            query = [o + c for o, c in zip(origin, unravel(n, window))]
            assert sees(key, query, window, search)
            expected = bias_index(key, query, window, search)
            assert kind == PAIR_BIAS and index == expected == spec_table[m][n], (m, n)


@pytest.mark.parametrize("volume, window, search", GEOMETRIES, ids=str)
def test_key_pass_inverts_the_window_relation(volume, window, search):
    # Key pass: for the keys of one key block, the query box and its pair table must list exactly
    # the queries that see each key (the contract's relation, enumerated over a large volume), with
    # the same bias index as the forward.
    p = plan(volume, window, search, QUERIES)
    spec_table = _C.brick_pair_bias_index(list(volume), list(window), list(search), QUERIES)
    unit = tuple(6 for _ in window)  # far from any border of the enumeration below
    block_origin = [u * w for u, w in zip(unit, window)]
    box_origin = [o + b for o, b in zip(block_origin, p["box_start"])]
    for n in range(p["slots"]):
        key = [o + c for o, c in zip(block_origin, unravel(n, window))]
        seen_by = set()
        for query in itertools.product(*(range(o - 2 * s, o + 2 * s) for o, s in zip(key, search))):
            if sees(key, query, window, search):
                seen_by.add(tuple(query))
        listed = {}
        for m in range(p["box"]):
            query = tuple(o + c for o, c in zip(box_origin, unravel(m, p["box_extent"])))
            if p["pair_kind"][m][n] == PAIR_BIAS:
                listed[query] = p["pair_index"][m][n]
                assert spec_table[m][n] == p["pair_index"][m][n]
            else:
                assert p["pair_kind"][m][n] == PAIR_MASKED and spec_table[m][n] == -1
        assert set(listed) == seen_by, f"key slot {n}: the query box misses or adds queries"
        for query, index in listed.items():
            assert index == bias_index(key, query, window, search)
    for m in range(224):  # tails and empty key slots take no part
        for n in range(8):
            if m >= p["box"] or n >= p["slots"]:
                assert p["pair_kind"][m][n] == PAIR_MASKED


@pytest.mark.parametrize("volume, window, search", GEOMETRIES, ids=str)
@pytest.mark.parametrize("kind", [KEYS, QUERIES])
@pytest.mark.parametrize("head_dim", [16, 32])
def test_halo_rows_and_warp_units(volume, window, search, kind, head_dim):
    p = plan(volume, window, search, kind, head_dim=head_dim)
    halo, sy, sz = p["halo"], p["stride_y"], p["stride_z"]

    def row(z, y, x):
        return z * sz + y * sy + x

    rows = {row(*c) for c in itertools.product(*(range(h) for h in halo))}
    assert len(rows) == int(np.prod(halo)) and max(rows) < p["rows"], "halo rows overlap or overflow"
    assert p["rows"] * p["row_bytes"] <= p["b_offset"] - p["a_offset"]
    assert p["bytes"] <= 113 * 1024 or p["brick"] == [1, 1, 1]
    # Every warp's units, once each, cover the brick.
    units = [tuple(u) for warp in p["warp_units"] for u in warp]
    assert sorted(units) == sorted(itertools.product(*(range(b) for b in p["brick"])))
    assert len(p["warp_units"]) == p["warps"] <= 8
    # Box token m of unit d sits at the halo row of its coordinates.
    for d in units:
        base = row(*(dd * w for dd, w in zip(d, window)))
        for m in range(224):
            c = unravel(m if m < p["box"] else 0, p["box_extent"])
            if m < p["box"]:
                h = [dd * w + cc for dd, w, cc in zip(d, window, c)]
                assert all(0 <= hh < e for hh, e in zip(h, halo))
                assert base + p["token_row"][m] == row(*h)
            else:  # a tail token: some box token's row with the same residue mod 8
                assert (p["token_row"][m] - m) % 8 == 0 or p["box"] < 8
                assert 0 <= base + p["token_row"][m] < p["rows"]


@pytest.mark.parametrize("kind", [KEYS, QUERIES])
@pytest.mark.parametrize("head_dim", [16, 32])
def test_ldmatrix_phases_are_conflict_free_at_the_paper_geometry(kind, head_dim):
    # Every 8-row phase of every tile's ldmatrix, for every unit a warp takes and every 16-dim
    # k-step, lands on 8 distinct 16-byte bank groups; the kernels' shortcuts hold (a unit whose
    # base is congruent mod 8 reuses the rows shifted; a k-step is an XOR away).
    p = plan((36, 36, 32), (2, 2, 2), (6, 6, 6), kind, head_dim=head_dim)
    chunks = p["chunks"]
    offset = _C.brick_chunk_offset
    for warp_units in p["warp_units"]:
        ref_base = None
        for d in warp_units:
            base = d[0] * 2 * p["stride_z"] + d[1] * 2 * p["stride_y"] + d[2] * 2
            if ref_base is None or (base - ref_base) % 8:
                ref_base = base
            for tile in range(14):
                lanes = [base + p["token_row"][tile * 16 + lane % 16] for lane in range(32)]
                for ks in range(head_dim // 16):
                    addresses = [offset(r, lane // 16 + 2 * ks, chunks) for lane, r in enumerate(lanes)]
                    reused = [
                        (offset(ref_base + p["token_row"][tile * 16 + lane % 16], lane // 16, chunks)
                         + (base - ref_base) * p["row_bytes"]) ^ (32 * ks)
                        for lane in range(32)
                    ]
                    assert addresses == reused
                    for phase in range(4):
                        group = addresses[8 * phase: 8 * phase + 8]
                        assert len({a // 16 % 8 for a in group}) == len(set(group)), (d, tile, ks, phase)


@pytest.mark.parametrize("volume, window, search", GEOMETRIES, ids=str)
def test_outside_bits_and_key_codes_mask_outside_keys(volume, window, search):
    p = plan(volume, window, search, KEYS)
    rng = random.Random(0)
    nunits = [-(-v // w) for v, w in zip(volume, window)]
    for _ in range(40):
        unit = [rng.randrange(n) for n in nunits]
        bits = _C.brick_outside_bits(list(volume), list(window), list(search), unit)
        for m in range(224):
            code = p["token_code"][m]
            if m >= p["box"]:
                assert code == 0
                continue
            key = [u * w - margin(w, s) + c for u, w, s, c in zip(unit, window, search, unravel(m, search))]
            outside = not all(0 <= k < v for k, v in zip(key, volume))
            assert bool(code & bits) == outside, (unit, m)


@pytest.mark.parametrize("volume, window, search", GEOMETRIES, ids=str)
def test_bias_reduction_rounds_are_race_free(volume, window, search):
    # The query pass adds each pair's bias-gradient sum to its bias entry one slot at a time, all
    # keys at once: within a slot, distinct keys must have distinct entries; and a pair's sum sits
    # at fragment_position(m, n), the C element (row m % 16, column n) of tile m / 16.
    p = plan(volume, window, search, KEYS)
    for n in range(p["slots"]):
        entries = [p["pair_index"][m][n] for m in range(p["box"])]
        assert all(p["pair_kind"][m][n] == PAIR_BIAS for m in range(p["box"]))
        assert len(set(entries)) == len(entries), f"slot {n}: two keys share a bias entry"
    for m in range(224):
        for n in range(8):
            position = _C.brick_fragment_position(m, n)
            tile, lane, element = position // 128, position // 4 % 32, position % 4
            assert tile == m // 16
            assert lane // 4 + 8 * (element // 2) == m % 16 and 2 * (lane % 4) + element % 2 == n


# ------------------------------------------------------------------------ a NumPy model of the tables


def _numpy_forward(problem, kind_plan, key_plan):
    """Attention through the forward's tables, and dK/dV through the key pass's tables, in
    float64; returns out, dK, dV for grad_out = ones."""
    q = problem.query.detach().double().numpy()
    k = problem.key.detach().double().numpy()
    v = problem.value.detach().double().numpy()
    opts = problem.options
    window, search = problem.window_size, problem.search_size
    window = (window,) * 3 if isinstance(window, int) else tuple(window)
    search = (search,) * 3 if isinstance(search, int) else tuple(search)
    bias = opts.get("rel_pos_bias")
    bias = bias.detach().double().numpy().reshape(bias.shape[0], -1) if bias is not None else None
    constant = opts.get("padding") == "constant"
    pad_key = opts["pad_key"].detach().double().numpy() if constant else None
    pad_value = opts["pad_value"].detach().double().numpy() if constant else None
    batch, depth, height, width, heads, head_dim = q.shape
    volume = (depth, height, width)
    scale = opts.get("scale", head_dim ** -0.5)
    nunits = [-(-vv // w) for vv, w in zip(volume, window)]
    out = np.zeros_like(q)
    probs: Dict[Tuple, float] = {}  # (b, h, query, key) -> P

    def token(t, b, h, pos, pad):
        if all(0 <= c < vv for c, vv in zip(pos, volume)):
            return t[(b, *pos, h)]
        return pad[h] if pad is not None else None

    p = kind_plan
    for b, h in itertools.product(range(batch), range(heads)):
        for unit in itertools.product(*(range(n) for n in nunits)):
            box0 = [u * w + s0 for u, w, s0 in zip(unit, window, p["box_start"])]
            for n in range(p["slots"]):
                query = [u * w + c for u, w, c in zip(unit, window, unravel(n, window))]
                if not all(c < vv for c, vv in zip(query, volume)):
                    continue
                scores, values, keys = [], [], []
                for m in range(224):
                    kind, index = p["pair_kind"][m][n], p["pair_index"][m][n]
                    if kind != PAIR_BIAS:
                        continue
                    key = [c0 + c for c0, c in zip(box0, unravel(m, p["box_extent"]))]
                    kv = token(k, b, h, key, pad_key)
                    if kv is None:  # mask padding
                        continue
                    scores.append(scale * q[(b, *query, h)] @ kv + (bias[h, index] if bias is not None else 0.0))
                    values.append(token(v, b, h, key, pad_value))
                    keys.append(tuple(key))
                scores = np.array(scores)
                weights = np.exp(scores - scores.max())
                weights /= weights.sum()
                out[(b, *query, h)] = weights @ np.array(values)
                for key, weight in zip(keys, weights):
                    probs[(b, h, tuple(query), key)] = weight
    # dV[j] = sum over the queries that see j of P: through the key pass's query box and pairs.
    grad_value = np.zeros_like(v)
    p = key_plan
    for b, h in itertools.product(range(batch), range(heads)):
        for unit in itertools.product(*(range(n) for n in nunits)):
            box0 = [u * w + s0 for u, w, s0 in zip(unit, window, p["box_start"])]
            for n in range(p["slots"]):
                key = [u * w + c for u, w, c in zip(unit, window, unravel(n, window))]
                if not all(c < vv for c, vv in zip(key, volume)):
                    continue
                total = np.zeros(head_dim)
                for m in range(224):
                    if p["pair_kind"][m][n] != PAIR_BIAS:
                        continue
                    query = tuple(c0 + c for c0, c in zip(box0, unravel(m, p["box_extent"])))
                    if all(0 <= c < vv for c, vv in zip(query, volume)):
                        total += probs.pop((b, h, query, tuple(key)))  # grad_out = ones
                grad_value[(b, *key, h)] = total
    pad_pairs = [key for (_, _, _, key) in probs if not all(0 <= c < vv for c, vv in zip(key, volume))]
    assert len(pad_pairs) == len(probs), "the key pass missed pairs of in-volume keys"
    return out, grad_value


@pytest.mark.parametrize("volume, window, search", GEOMETRIES[1:], ids=str)
@pytest.mark.parametrize("padding", ["mask", "constant"])
def test_numpy_model_of_the_tables_matches_the_reference(volume, window, search, padding):
    shape = (1, *volume, 2, 4)
    problem = make_problem(shape, window, search, padding=padding, bias=True, dtype=torch.float64,
                           generator=torch.Generator().manual_seed(23))
    forward_plan = plan(volume, window, search, KEYS)
    key_plan = plan(volume, window, search, QUERIES)
    out, grad_value = _numpy_forward(problem, forward_plan, key_plan)
    expected = problem.run("reference")
    expected.backward(torch.ones_like(expected))
    np.testing.assert_allclose(out, expected.detach().numpy(), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(grad_value, problem.value.grad.numpy(), rtol=1e-9, atol=1e-9)
