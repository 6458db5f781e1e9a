"""Triton kernels of window cross attention and the host code that launches them.

Forward: one program per tile of queries (a few base windows side by side along x) computes the
scores against the tile's key boxes straight from the (B, D, H, W, heads, head_dim) tensors, an
online softmax in fp32, the output and the log-sum-exp per query. Backward: one program per row
of tiles computes dQ and the gradients of rel_pos_bias, pad_key and pad_value; dK and dV come
either from a key-centric gather (deterministic: each program owns a tile of keys and visits
every query whose key box holds them) or, when determinism is off, are scattered by the dQ
program with fp32 atomics.

This module is imported lazily by ``xmorpher_kernels._triton`` on the first Triton call:
``@triton.jit`` decides between compiled and interpreted (``TRITON_INTERPRET=1``) kernels when it
decorates, so importing late lets a process turn the interpreter on first.

Why tiles of packed windows. ``tl.dot`` needs at least 16 rows, and a base window of the paper
(2 x 2 x 2) has 8 queries against a key box of 6 x 6 x 6 = 216 keys. Counting the score
entries a program computes (each costs an exp, the bottleneck at head_dim 16) against the 8 x 216
that matter, with key chunks of 64:
  - one window padded to 16 rows:          8 * 216 / (16 * 256)  = 42 %
  - transposed, keys as rows (16 columns):  the same 42 %
  - 2 windows along x (16 rows, union box 6 x 6 x 8 = 288 keys in 5 chunks): 16 * 216 / (16 * 320) = 68 %
  - 4 windows along x (32 rows, 6 x 6 x 12):  48 %;   2 x 2 windows in (y, x): 56 %
so a tile packs ``16 // queries_per_window`` windows along x (the contiguous axis, which also
keeps the key loads coalesced), and windows of more than 16 queries are split into blocks of
rows instead. These are counts, not GPU timings: no GPU has run these kernels yet.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl

from ._geometry import WindowGeometry

# True when these kernels were decorated for the CPU interpreter (TRITON_INTERPRET=1).
INTERPRETED = bool(getattr(getattr(getattr(triton, "knobs", None), "runtime", None), "interpret", False))

_INTERPRETER_BF16_DOT = tl.constexpr(INTERPRETED)
_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)


# ----------------------------------------------------------------------------------------------
# Geometry helpers (the formulas of xmorpher_kernels/_geometry.py, on blocks of voxels)
# ----------------------------------------------------------------------------------------------


@triton.jit
def _tile_origin(
    tile, row_blocks, packs_x, windows_y,
    WZ: tl.constexpr, WY: tl.constexpr, WX: tl.constexpr, PACK: tl.constexpr,
):
    # A program's tile index -> (row block, voxel origin of its first base window); tiles run
    # x-pack fastest after the row blocks, then y, then z.
    row_block = tile % row_blocks
    rest = tile // row_blocks
    pack = rest % packs_x
    rest = rest // packs_x
    wy = rest % windows_y
    wz = rest // windows_y
    return row_block, wz * WZ, wy * WY, pack * (PACK * WX)


@triton.jit
def _tile_rows(
    row_block, z0, y0, x0, D, H, W,
    WZ: tl.constexpr, WY: tl.constexpr, WX: tl.constexpr,
    PACK: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    # Rows of a tile: PACK base windows side by side along x from origin (z0, y0, x0), each
    # flattened z-major; row_block picks BLOCK_Q of them when a window has more queries.
    # Returns each row's voxel, the x origin of its base window, and whether it exists.
    NQ: tl.constexpr = WZ * WY * WX
    flat = row_block * BLOCK_Q + tl.arange(0, BLOCK_Q)
    member = flat // NQ
    inner = flat % NQ
    z = z0 + inner // (WY * WX)
    y = y0 + (inner // WX) % WY
    window_x = x0 + member * WX
    x = window_x + inner % WX
    valid = (flat < PACK * NQ) & (z < D) & (y < H) & (x < W)
    return z, y, x, window_x, valid


@triton.jit
def _box_columns(
    start, z0, y0, x0, D, H, W,
    NY: tl.constexpr, NX: tl.constexpr, COUNT: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Voxels start .. start + BLOCK_K of the box of COUNT voxels at (z0, y0, x0) with NY x NX
    # planes, flattened x fastest. `exists`: inside the box; `inside`: also inside the volume.
    u = start + tl.arange(0, BLOCK_K)
    z = z0 + u // (NY * NX)
    y = y0 + (u // NX) % NY
    x = x0 + u % NX
    exists = u < COUNT
    inside = exists & (z >= 0) & (z < D) & (y >= 0) & (y < H) & (x >= 0) & (x < W)
    return z, y, x, exists, inside


@triton.jit
def _in_key_box(
    kz, ky, kx, oz, oy, ox,
    LZ: tl.constexpr, LY: tl.constexpr, LX: tl.constexpr,
    SZ: tl.constexpr, SY: tl.constexpr, SX: tl.constexpr,
):
    # Key voxel k lies in the key box of the base window at origin o: o - l <= k < o - l + s.
    tz = kz - oz + LZ
    ty = ky - oy + LY
    tx = kx - ox + LX
    return (tz >= 0) & (tz < SZ) & (ty >= 0) & (ty < SY) & (tx >= 0) & (tx < SX)


@triton.jit
def _in_row_box_x(kx, window_x, LX: tl.constexpr, SX: tl.constexpr):
    # _in_key_box for a query tile, whose union box spans exactly each row's box in z and y.
    tx = kx - window_x + LX
    return (tx >= 0) & (tx < SX)


@triton.jit
def _bias_coordinate(
    z, y, x,
    WY: tl.constexpr, WX: tl.constexpr, SY: tl.constexpr, SX: tl.constexpr,
):
    # The flat rel_pos_bias index of offset d = key - query (spec, step 3) is linear in d:
    # ((dz + cz) * EY + dy + cy) * EX + dx + cx = coord(key) - coord(query) + coord(c),
    # c = l + w - 1, so a pair's index costs one subtraction.
    return (z * (SY + WY - 1) + y) * (SX + WX - 1) + x


@triton.jit
def _bias_index(
    key_coordinate, query_coordinate,
    WZ: tl.constexpr, WY: tl.constexpr, WX: tl.constexpr,
    SY: tl.constexpr, SX: tl.constexpr,
    LZ: tl.constexpr, LY: tl.constexpr, LX: tl.constexpr,
):
    CENTER: tl.constexpr = ((LZ + WZ - 1) * (SY + WY - 1) + LY + WY - 1) * (SX + WX - 1) + LX + WX - 1
    return CENTER + key_coordinate - query_coordinate


@triton.jit
def _token_offsets(b, h, z, y, x, stride_b, stride_z, stride_y, stride_x, stride_h):
    # Element offset of token (b, z, y, x, head h) in 64 bits: volumes times channels overflow 2^31.
    return (
        b.to(tl.int64) * stride_b
        + h.to(tl.int64) * stride_h
        + z.to(tl.int64) * stride_z
        + y.to(tl.int64) * stride_y
        + x.to(tl.int64) * stride_x
    )


@triton.jit
def _stat_offsets(b, h, z, y, x, heads, D, H, W):
    # Offset of a per-query statistic (log-sum-exp, delta) in a contiguous (B, heads, D, H, W).
    return (((b.to(tl.int64) * heads + h) * D + z) * H + y) * W + x


@triton.jit
def _load_rows(base, offsets, valid, dims, head_dim):
    return tl.load(
        base + offsets[:, None] + dims[None, :],
        mask=valid[:, None] & (dims < head_dim)[None, :],
        other=0.0,
    )


@triton.jit
def _load_box_rows(base, offsets, inside, pad_row, dims, head_dim, CONSTANT_PAD: tl.constexpr):
    # Key or value rows of box voxels; those outside the volume read pad_row under constant padding.
    rows = _load_rows(base, offsets, inside, dims, head_dim)
    if CONSTANT_PAD:
        rows = tl.where(inside[:, None], rows, pad_row[None, :])
    return rows


@triton.jit
def _dot(a, b):
    # fp32 accumulation; "ieee" keeps fp32 inputs out of TF32 (16-bit inputs take the tensor
    # cores either way). Triton's interpreter multiplies bf16 operands as raw 16-bit integers
    # (triton-lang/triton#11584); bf16 products are exact in fp32, so upcasting there computes
    # what the GPU's bf16 mma does. Compiled kernels never take that branch.
    if _INTERPRETER_BF16_DOT and a.dtype == tl.bfloat16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _scores_log2(
    a, b, pair, BIAS, h, bias_index, scale,
    WZ: tl.constexpr, WY: tl.constexpr, WX: tl.constexpr,
    SZ: tl.constexpr, SY: tl.constexpr, SX: tl.constexpr,
    LZ: tl.constexpr, LY: tl.constexpr, LX: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    # (scale * a b^T + bias) in log2 units, -inf where `pair` is off. `a` and `b` are the query
    # and key rows in either order, bias_index the matching _bias_index per pair.
    s = _dot(a, tl.trans(b)) * (scale * _LOG2E)
    if HAS_BIAS:
        BIAS_SIZE: tl.constexpr = (SZ + WZ - 1) * (SY + WY - 1) * (SX + WX - 1)
        bias = tl.load(BIAS + h * BIAS_SIZE + bias_index, mask=pair, other=0.0)
        s += bias.to(tl.float32) * _LOG2E
    return tl.where(pair, s, float("-inf"))


# ----------------------------------------------------------------------------------------------
# Autotune configurations
# ----------------------------------------------------------------------------------------------

# BLOCK_K is the number of key (or query) columns per step; the rows of a tile are fixed by the
# packing (see the module docstring). The default is what the interpreter tests run.
DEFAULT_CONFIG = triton.Config({"BLOCK_K": 64}, num_warps=4, num_stages=2)
CONFIGS = [
    DEFAULT_CONFIG,
    triton.Config({"BLOCK_K": 32}, num_warps=2, num_stages=2),
    triton.Config({"BLOCK_K": 64}, num_warps=2, num_stages=3),
    triton.Config({"BLOCK_K": 128}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_K": 64}, num_warps=8, num_stages=2),
]
_TUNE_KEY = ["D", "H", "W", "head_dim", "WZ", "WY", "WX", "SZ", "SY", "SX", "HAS_BIAS", "CONSTANT_PAD"]


@triton.jit
def _pad_rows(PAD_KEY, PAD_VALUE, h, dims, head_dim, dtype, HEAD_DIM_PAD: tl.constexpr, CONSTANT_PAD: tl.constexpr):
    # The rows standing for keys outside the volume: pad_key/pad_value under constant padding.
    pad_key = tl.zeros([HEAD_DIM_PAD], dtype=dtype)
    pad_value = tl.zeros([HEAD_DIM_PAD], dtype=dtype)
    if CONSTANT_PAD:
        pad_key = tl.load(PAD_KEY + h * head_dim + dims, mask=dims < head_dim, other=0.0)
        pad_value = tl.load(PAD_VALUE + h * head_dim + dims, mask=dims < head_dim, other=0.0)
    return pad_key, pad_value


@triton.jit
def _key_tile(
    start, K, V, BIAS, q, query_coordinate, row_valid, window_x, pad_key, pad_value, b, h, z0, y0, x0,
    stride_kb, stride_kz, stride_ky, stride_kx, stride_kh,
    stride_vb, stride_vz, stride_vy, stride_vx, stride_vh,
    D, H, W, dims, head_dim, scale,
    WZ: tl.constexpr, WY: tl.constexpr, WX: tl.constexpr,
    SZ: tl.constexpr, SY: tl.constexpr, SX: tl.constexpr,
    LZ: tl.constexpr, LY: tl.constexpr, LX: tl.constexpr,
    UX: tl.constexpr, UNION: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, CONSTANT_PAD: tl.constexpr,
):
    # Columns [start, start + BLOCK_K) of the tile's union key box: their voxels, whether each is
    # inside the volume, the key and value rows, and the base-2 scores of the tile's rows.
    kz, ky, kx, exists, inside = _box_columns(start, z0 - LZ, y0 - LY, x0 - LX, D, H, W, SY, UX, UNION, BLOCK_K)
    pair = row_valid[:, None] & exists[None, :] & _in_row_box_x(kx[None, :], window_x[:, None], LX, SX)
    if not CONSTANT_PAD:
        pair = pair & inside[None, :]
    k = _load_box_rows(K, _token_offsets(b, h, kz, ky, kx, stride_kb, stride_kz, stride_ky, stride_kx, stride_kh),
                       inside, pad_key, dims, head_dim, CONSTANT_PAD)
    v = _load_box_rows(V, _token_offsets(b, h, kz, ky, kx, stride_vb, stride_vz, stride_vy, stride_vx, stride_vh),
                       inside, pad_value, dims, head_dim, CONSTANT_PAD)
    bias_index = _bias_index(_bias_coordinate(kz, ky, kx, WY, WX, SY, SX)[None, :], query_coordinate[:, None],
                             WZ, WY, WX, SY, SX, LZ, LY, LX)
    s = _scores_log2(q, k, pair, BIAS, h, bias_index, scale, WZ, WY, WX, SZ, SY, SX, LZ, LY, LX, HAS_BIAS)
    return kz, ky, kx, inside, k, v, s


def _prune_wide_blocks(columns_of):
    """Drop configs whose BLOCK_K exceeds the columns a tile walks (rounded up to a power of 2)."""

    def prune(configs, named_args, **kwargs):
        widest = max(16, triton.next_power_of_2(columns_of({**named_args, **kwargs})))
        kept = [c for c in configs if c.kwargs["BLOCK_K"] <= widest]
        return kept or configs[:1]

    return prune


def _union_columns(a) -> int:
    return a["SZ"] * a["SY"] * (a["SX"] + (a["PACK"] - 1) * a["WX"])


def _region_columns(a) -> int:
    return a["CZ"] * a["WZ"] * a["CY"] * a["WY"] * a["CX"] * a["WX"]


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------


@triton.jit
def _forward_kernel(
    Q, K, V, OUT, LSE, BIAS, PAD_KEY, PAD_VALUE,
    stride_qb, stride_qz, stride_qy, stride_qx, stride_qh,
    stride_kb, stride_kz, stride_ky, stride_kx, stride_kh,
    stride_vb, stride_vz, stride_vy, stride_vx, stride_vh,
    stride_ob, stride_oz, stride_oy, stride_ox, stride_oh,
    D, H, W, heads, head_dim, windows_y, packs_x, row_blocks, scale,
    WZ: tl.constexpr, WY: tl.constexpr, WX: tl.constexpr,
    SZ: tl.constexpr, SY: tl.constexpr, SX: tl.constexpr,
    LZ: tl.constexpr, LY: tl.constexpr, LX: tl.constexpr,
    PACK: tl.constexpr, BLOCK_Q: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    HAS_BIAS: tl.constexpr, CONSTANT_PAD: tl.constexpr, BLOCK_K: tl.constexpr,
):
    tile = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    row_block, z0, y0, x0 = _tile_origin(tile, row_blocks, packs_x, windows_y, WZ, WY, WX, PACK)

    dims = tl.arange(0, HEAD_DIM_PAD)
    qz, qy, qx, window_x, row_valid = _tile_rows(row_block, z0, y0, x0, D, H, W, WZ, WY, WX, PACK, BLOCK_Q)
    q = _load_rows(Q, _token_offsets(b, h, qz, qy, qx, stride_qb, stride_qz, stride_qy, stride_qx, stride_qh),
                   row_valid, dims, head_dim)
    query_coordinate = _bias_coordinate(qz, qy, qx, WY, WX, SY, SX)
    pad_key, pad_value = _pad_rows(PAD_KEY, PAD_VALUE, h, dims, head_dim, q.dtype, HEAD_DIM_PAD, CONSTANT_PAD)

    row_max = tl.full([BLOCK_Q], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_Q], dtype=tl.float32)
    acc = tl.zeros([BLOCK_Q, HEAD_DIM_PAD], dtype=tl.float32)
    UX: tl.constexpr = SX + (PACK - 1) * WX
    UNION: tl.constexpr = SZ * SY * UX
    for start in range(0, UNION, BLOCK_K):
        _kz, _ky, _kx, _inside, _k, v, s = _key_tile(
            start, K, V, BIAS, q, query_coordinate, row_valid, window_x, pad_key, pad_value, b, h, z0, y0, x0,
            stride_kb, stride_kz, stride_ky, stride_kx, stride_kh, stride_vb, stride_vz, stride_vy, stride_vx, stride_vh,
            D, H, W, dims, head_dim, scale, WZ, WY, WX, SZ, SY, SX, LZ, LY, LX, UX, UNION, BLOCK_K, HAS_BIAS, CONSTANT_PAD,
        )
        new_max = tl.maximum(row_max, tl.max(s, 1))
        # A row with no key yet keeps -inf; subtract 0 then, so exp2 gives 0 instead of NaN.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        p = tl.exp2(s - shift[:, None])
        correction = tl.exp2(row_max - shift)
        row_sum = row_sum * correction + tl.sum(p, 1)
        acc = acc * correction[:, None] + _dot(p.to(v.dtype), v)
        row_max = new_max

    row_sum = tl.where(row_sum > 0, row_sum, 1.0)  # rows that do not exist
    out = acc / row_sum[:, None]
    out_offsets = _token_offsets(b, h, qz, qy, qx, stride_ob, stride_oz, stride_oy, stride_ox, stride_oh)
    tl.store(OUT + out_offsets[:, None] + dims[None, :], out.to(OUT.dtype.element_ty),
             mask=row_valid[:, None] & (dims < head_dim)[None, :])
    lse = (tl.where(row_valid, row_max, 0.0) + tl.log2(row_sum)) * _LN2
    tl.store(LSE + _stat_offsets(b, h, qz, qy, qx, heads, D, H, W), lse, mask=row_valid)


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------


@triton.jit
def _backward_query_kernel(
    Q, K, V, OUT, GRAD_OUT, LSE, DELTA, BIAS, PAD_KEY, PAD_VALUE,
    GRAD_Q, GRAD_KEY_ACC, GRAD_VALUE_ACC, BIAS_PARTIAL, PAD_PARTIAL,
    stride_qb, stride_qz, stride_qy, stride_qx, stride_qh,
    stride_kb, stride_kz, stride_ky, stride_kx, stride_kh,
    stride_vb, stride_vz, stride_vy, stride_vx, stride_vh,
    stride_ob, stride_oz, stride_oy, stride_ox, stride_oh,
    stride_gb, stride_gz, stride_gy, stride_gx, stride_gh,
    stride_dqb, stride_dqz, stride_dqy, stride_dqx, stride_dqh,
    stride_ab, stride_az, stride_ay, stride_ax, stride_ah,
    D, H, W, heads, head_dim, windows_y, packs_x, row_blocks, scale,
    WZ: tl.constexpr, WY: tl.constexpr, WX: tl.constexpr,
    SZ: tl.constexpr, SY: tl.constexpr, SX: tl.constexpr,
    LZ: tl.constexpr, LY: tl.constexpr, LX: tl.constexpr,
    PACK: tl.constexpr, BLOCK_Q: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    HAS_BIAS: tl.constexpr, CONSTANT_PAD: tl.constexpr, ATOMIC_KV: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # One program walks a row of tiles along x, so its bias and pad partial sums cover many
    # windows and are written once per row (slot), then reduced on the host in a fixed order.
    tile = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    row_block = tile % row_blocks
    rest = tile // row_blocks
    wy = rest % windows_y
    wz = rest // windows_y
    z0 = wz * WZ
    y0 = wy * WY
    slot = (b.to(tl.int64) * heads + h) * tl.num_programs(0) + tile
    UX: tl.constexpr = SX + (PACK - 1) * WX
    UNION: tl.constexpr = SZ * SY * UX

    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_ok = dims < head_dim
    rows = tl.arange(0, BLOCK_Q)
    pad_key, pad_value = _pad_rows(PAD_KEY, PAD_VALUE, h, dims, head_dim, Q.dtype.element_ty, HEAD_DIM_PAD,
                                   CONSTANT_PAD)
    grad_pad_key = tl.zeros([HEAD_DIM_PAD], dtype=tl.float32)
    grad_pad_value = tl.zeros([HEAD_DIM_PAD], dtype=tl.float32)

    for pack in range(0, packs_x):
        x0 = pack * (PACK * WX)
        qz, qy, qx, window_x, row_valid = _tile_rows(row_block, z0, y0, x0, D, H, W, WZ, WY, WX, PACK, BLOCK_Q)
        row_mask = row_valid[:, None] & dim_ok[None, :]
        q = _load_rows(Q, _token_offsets(b, h, qz, qy, qx, stride_qb, stride_qz, stride_qy, stride_qx, stride_qh),
                       row_valid, dims, head_dim)
        grad_out = _load_rows(GRAD_OUT, _token_offsets(b, h, qz, qy, qx, stride_gb, stride_gz, stride_gy, stride_gx, stride_gh),
                              row_valid, dims, head_dim)
        out = _load_rows(OUT, _token_offsets(b, h, qz, qy, qx, stride_ob, stride_oz, stride_oy, stride_ox, stride_oh),
                         row_valid, dims, head_dim)
        query_coordinate = _bias_coordinate(qz, qy, qx, WY, WX, SY, SX)
        stats = _stat_offsets(b, h, qz, qy, qx, heads, D, H, W)
        lse_log2 = tl.load(LSE + stats, mask=row_valid, other=0.0) * _LOG2E
        delta = tl.sum(grad_out.to(tl.float32) * out.to(tl.float32), 1)
        tl.store(DELTA + stats, delta, mask=row_valid)

        grad_q = tl.zeros([BLOCK_Q, HEAD_DIM_PAD], dtype=tl.float32)
        pad_ds = tl.zeros([BLOCK_Q], dtype=tl.float32)
        pad_p = tl.zeros([BLOCK_Q], dtype=tl.float32)
        for start in range(0, UNION, BLOCK_K):
            kz, ky, kx, inside, k, v, s = _key_tile(
                start, K, V, BIAS, q, query_coordinate, row_valid, window_x, pad_key, pad_value, b, h, z0, y0, x0,
                stride_kb, stride_kz, stride_ky, stride_kx, stride_kh, stride_vb, stride_vz, stride_vy, stride_vx,
                stride_vh, D, H, W, dims, head_dim, scale, WZ, WY, WX, SZ, SY, SX, LZ, LY, LX, UX, UNION, BLOCK_K,
                HAS_BIAS, CONSTANT_PAD,
            )
            p = tl.exp2(s - lse_log2[:, None])
            dp = _dot(grad_out, tl.trans(v))
            ds = p * (dp - delta[:, None])
            grad_q += _dot(ds.to(k.dtype), k)
            if HAS_BIAS:
                # This program's running sum per (row, box column); the first pack initializes it.
                columns = start + tl.arange(0, BLOCK_K)
                partial = BIAS_PARTIAL + slot * (BLOCK_Q * UNION) + rows[:, None] * UNION + columns[None, :]
                column_ok = (columns < UNION)[None, :]
                previous = tl.load(partial, mask=column_ok & (pack > 0), other=0.0)
                tl.store(partial, previous + ds, mask=column_ok)
            if CONSTANT_PAD:
                pad_ds += tl.sum(tl.where(inside[None, :], 0.0, ds), 1)
                pad_p += tl.sum(tl.where(inside[None, :], 0.0, p), 1)
            if ATOMIC_KV:
                key_mask = inside[:, None] & dim_ok[None, :]
                acc_offsets = _token_offsets(b, h, kz, ky, kx, stride_ab, stride_az, stride_ay, stride_ax, stride_ah)
                grad_k = _dot(tl.trans(ds.to(q.dtype)), q) * scale
                grad_v = _dot(tl.trans(p.to(grad_out.dtype)), grad_out)
                tl.atomic_add(GRAD_KEY_ACC + acc_offsets[:, None] + dims[None, :], grad_k, mask=key_mask, sem="relaxed")
                tl.atomic_add(GRAD_VALUE_ACC + acc_offsets[:, None] + dims[None, :], grad_v, mask=key_mask, sem="relaxed")

        dq_offsets = _token_offsets(b, h, qz, qy, qx, stride_dqb, stride_dqz, stride_dqy, stride_dqx, stride_dqh)
        tl.store(GRAD_Q + dq_offsets[:, None] + dims[None, :], (grad_q * scale).to(GRAD_Q.dtype.element_ty), mask=row_mask)
        if CONSTANT_PAD:
            grad_pad_key += tl.sum(pad_ds[:, None] * q.to(tl.float32), 0) * scale
            grad_pad_value += tl.sum(pad_p[:, None] * grad_out.to(tl.float32), 0)

    if CONSTANT_PAD:
        tl.store(PAD_PARTIAL + slot * (2 * head_dim) + dims, grad_pad_key, mask=dim_ok)
        tl.store(PAD_PARTIAL + slot * (2 * head_dim) + head_dim + dims, grad_pad_value, mask=dim_ok)


@triton.jit
def _backward_key_kernel(
    Q, K, V, GRAD_OUT, LSE, DELTA, BIAS, GRAD_KEY, GRAD_VALUE,
    stride_qb, stride_qz, stride_qy, stride_qx, stride_qh,
    stride_kb, stride_kz, stride_ky, stride_kx, stride_kh,
    stride_vb, stride_vz, stride_vy, stride_vx, stride_vh,
    stride_gb, stride_gz, stride_gy, stride_gx, stride_gh,
    stride_dkb, stride_dkz, stride_dky, stride_dkx, stride_dkh,
    stride_dvb, stride_dvz, stride_dvy, stride_dvx, stride_dvh,
    D, H, W, heads, head_dim, windows_y, packs_x, row_blocks, scale,
    WZ: tl.constexpr, WY: tl.constexpr, WX: tl.constexpr,
    SZ: tl.constexpr, SY: tl.constexpr, SX: tl.constexpr,
    LZ: tl.constexpr, LY: tl.constexpr, LX: tl.constexpr,
    LO_Z: tl.constexpr, LO_Y: tl.constexpr, LO_X: tl.constexpr,
    CZ: tl.constexpr, CY: tl.constexpr, CX: tl.constexpr,
    PACK: tl.constexpr, BLOCK_Q: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    HAS_BIAS: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Key-centric dK/dV: the rows are the keys of one tile (laid out like a query tile), the
    # columns walk the queries of the CZ x CY x CX base windows (from LO_* windows off the tile)
    # whose key boxes can hold them. Each program writes its own rows once: no races, fixed order.
    tile = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    row_block, z0, y0, x0 = _tile_origin(tile, row_blocks, packs_x, windows_y, WZ, WY, WX, PACK)

    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_ok = dims < head_dim
    kz, ky, kx, _key_window_x, key_valid = _tile_rows(row_block, z0, y0, x0, D, H, W, WZ, WY, WX, PACK, BLOCK_Q)
    k = _load_rows(K, _token_offsets(b, h, kz, ky, kx, stride_kb, stride_kz, stride_ky, stride_kx, stride_kh),
                   key_valid, dims, head_dim)
    v = _load_rows(V, _token_offsets(b, h, kz, ky, kx, stride_vb, stride_vz, stride_vy, stride_vx, stride_vh),
                   key_valid, dims, head_dim)
    key_coordinate = _bias_coordinate(kz, ky, kx, WY, WX, SY, SX)
    grad_k = tl.zeros([BLOCK_Q, HEAD_DIM_PAD], dtype=tl.float32)
    grad_v = tl.zeros([BLOCK_Q, HEAD_DIM_PAD], dtype=tl.float32)

    RY: tl.constexpr = CY * WY
    RX: tl.constexpr = CX * WX
    REGION: tl.constexpr = CZ * WZ * RY * RX
    for start in range(0, REGION, BLOCK_K):
        qz, qy, qx, _in_region, q_inside = _box_columns(start, z0 + LO_Z * WZ, y0 + LO_Y * WY, x0 + LO_X * WX,
                                               D, H, W, RY, RX, REGION, BLOCK_K)
        # Origin of each query's base window (only meaningful where q_inside, i.e. q >= 0).
        oz = (qz // WZ) * WZ
        oy = (qy // WY) * WY
        ox = (qx // WX) * WX
        pair = key_valid[:, None] & q_inside[None, :] & _in_key_box(
            kz[:, None], ky[:, None], kx[:, None], oz[None, :], oy[None, :], ox[None, :], LZ, LY, LX, SZ, SY, SX)
        q = _load_rows(Q, _token_offsets(b, h, qz, qy, qx, stride_qb, stride_qz, stride_qy, stride_qx, stride_qh),
                       q_inside, dims, head_dim)
        grad_out = _load_rows(GRAD_OUT, _token_offsets(b, h, qz, qy, qx, stride_gb, stride_gz, stride_gy, stride_gx, stride_gh),
                              q_inside, dims, head_dim)
        stats = _stat_offsets(b, h, qz, qy, qx, heads, D, H, W)
        lse_log2 = tl.load(LSE + stats, mask=q_inside, other=0.0) * _LOG2E
        delta = tl.load(DELTA + stats, mask=q_inside, other=0.0)
        bias_index = _bias_index(key_coordinate[:, None], _bias_coordinate(qz, qy, qx, WY, WX, SY, SX)[None, :],
                                 WZ, WY, WX, SY, SX, LZ, LY, LX)
        s_t = _scores_log2(k, q, pair, BIAS, h, bias_index, scale, WZ, WY, WX, SZ, SY, SX, LZ, LY, LX, HAS_BIAS)
        p_t = tl.exp2(s_t - lse_log2[None, :])
        grad_v += _dot(p_t.to(grad_out.dtype), grad_out)
        dp_t = _dot(v, tl.trans(grad_out))
        ds_t = p_t * (dp_t - delta[None, :])
        grad_k += _dot(ds_t.to(q.dtype), q)

    key_mask = key_valid[:, None] & dim_ok[None, :]
    dk_offsets = _token_offsets(b, h, kz, ky, kx, stride_dkb, stride_dkz, stride_dky, stride_dkx, stride_dkh)
    dv_offsets = _token_offsets(b, h, kz, ky, kx, stride_dvb, stride_dvz, stride_dvy, stride_dvx, stride_dvh)
    tl.store(GRAD_KEY + dk_offsets[:, None] + dims[None, :], (grad_k * scale).to(GRAD_KEY.dtype.element_ty), mask=key_mask)
    tl.store(GRAD_VALUE + dv_offsets[:, None] + dims[None, :], grad_v.to(GRAD_VALUE.dtype.element_ty), mask=key_mask)


@triton.jit
def _bias_index_map_kernel(
    MAP,
    WZ: tl.constexpr, WY: tl.constexpr, WX: tl.constexpr,
    SZ: tl.constexpr, SY: tl.constexpr, SX: tl.constexpr,
    LZ: tl.constexpr, LY: tl.constexpr, LX: tl.constexpr,
    PACK: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # For each (row, union-box column) of a tile's bias partial sums: the rel_pos_bias entry it
    # belongs to, or BIAS_SIZE (a bin that is dropped) where the key is outside the row's box.
    # The pairing is the same for every tile, so one row block's map serves them all.
    row_block = tl.program_id(0)
    UX: tl.constexpr = SX + (PACK - 1) * WX
    UNION: tl.constexpr = SZ * SY * UX
    BIAS_SIZE: tl.constexpr = (SZ + WZ - 1) * (SY + WY - 1) * (SX + WX - 1)
    UNBOUNDED: tl.constexpr = 1 << 30
    qz, qy, qx, window_x, row_valid = _tile_rows(row_block, 0, 0, 0, UNBOUNDED, UNBOUNDED, UNBOUNDED,
                                                 WZ, WY, WX, PACK, BLOCK_Q)
    rows = tl.arange(0, BLOCK_Q)
    for start in range(0, UNION, BLOCK_K):
        kz, ky, kx, exists, _inside = _box_columns(start, -LZ, -LY, -LX, UNBOUNDED, UNBOUNDED, UNBOUNDED, SY, UX, UNION, BLOCK_K)
        pair = row_valid[:, None] & exists[None, :] & _in_row_box_x(kx[None, :], window_x[:, None], LX, SX)
        index = _bias_index(_bias_coordinate(kz, ky, kx, WY, WX, SY, SX)[None, :],
                            _bias_coordinate(qz, qy, qx, WY, WX, SY, SX)[:, None], WZ, WY, WX, SY, SX, LZ, LY, LX)
        columns = start + tl.arange(0, BLOCK_K)
        tl.store(MAP + (row_block * BLOCK_Q + rows[:, None]) * UNION + columns[None, :],
                 tl.where(pair, index, BIAS_SIZE), mask=exists[None, :])


_reset_atomic_buffers = ["GRAD_KEY_ACC", "GRAD_VALUE_ACC"]
_forward_tuned = triton.autotune(
    CONFIGS, key=_TUNE_KEY, prune_configs_by={"early_config_prune": _prune_wide_blocks(_union_columns)}
)(_forward_kernel)
_backward_query_tuned = triton.autotune(
    CONFIGS, key=_TUNE_KEY + ["ATOMIC_KV"], reset_to_zero=_reset_atomic_buffers,
    prune_configs_by={"early_config_prune": _prune_wide_blocks(_union_columns)},
)(_backward_query_kernel)
_backward_key_tuned = triton.autotune(
    CONFIGS, key=_TUNE_KEY[:-1], prune_configs_by={"early_config_prune": _prune_wide_blocks(_region_columns)}
)(_backward_key_kernel)


# ----------------------------------------------------------------------------------------------
# Host side: tiling and launches
# ----------------------------------------------------------------------------------------------

_MIN_DOT = 16  # tl.dot needs 16 rows, columns and inner dimension


@dataclass(frozen=True)
class Tiling:
    """How the kernels cut one call: rows per tile and the grid they imply."""

    geometry: WindowGeometry
    pack: int          # base windows per tile, side by side along x
    block_q: int       # rows of a tile (power of 2, >= 16)
    row_blocks: int    # tiles per pack of windows (> 1 only for windows of more than 64 queries)
    packs_x: int       # packs along x
    head_dim_pad: int  # head_dim rounded up to a power of 2, >= 16

    @staticmethod
    def of(geometry: WindowGeometry, head_dim: int) -> "Tiling":
        queries = geometry.queries_per_window
        windows_x = geometry.num_windows[2]
        if queries <= _MIN_DOT:
            pack = max(1, min(_MIN_DOT // queries, windows_x))
            block_q = _MIN_DOT
        else:
            pack = 1
            # 64 rows x head_dim 128 in fp32 already fills 64 registers a thread at 4 warps.
            block_q = min(triton.next_power_of_2(queries), 64 if head_dim <= 64 else 32)
        return Tiling(
            geometry=geometry,
            pack=pack,
            block_q=block_q,
            row_blocks=math.ceil(pack * queries / block_q),
            packs_x=math.ceil(windows_x / pack),
            head_dim_pad=max(_MIN_DOT, triton.next_power_of_2(head_dim)),
        )

    @property
    def union_columns(self) -> int:
        """Keys in the union of a tile's key boxes."""
        (sz, sy, sx), wx = self.geometry.search, self.geometry.window[2]
        return sz * sy * (sx + (self.pack - 1) * wx)

    @property
    def bias_pairs(self) -> int:
        """(row, union-box column) pairs of the row blocks of one pack: what a bias partial holds."""
        return self.row_blocks * self.block_q * self.union_columns

    def query_windows(self) -> Tuple[Tuple[int, int], ...]:
        """Per axis, (first, count) of the base windows, relative to a key tile's first window,
        whose key boxes can hold one of its keys: window n holds key j when
        n*w - l <= j < n*w - l + s, for j over the tile's span of `span` windows."""
        result = []
        for axis, (w, s, l) in enumerate(zip(self.geometry.window, self.geometry.search, self.geometry.left)):
            span = self.pack if axis == 2 else 1
            first = (l - s) // w + 1
            last = span + (l - 1) // w
            result.append((first, last - first + 1))
        return tuple(result)

    def geometry_constexprs(self) -> dict:
        (wz, wy, wx), (sz, sy, sx), (lz, ly, lx) = self.geometry.window, self.geometry.search, self.geometry.left
        return dict(WZ=wz, WY=wy, WX=wx, SZ=sz, SY=sy, SX=sx, LZ=lz, LY=ly, LX=lx,
                    PACK=self.pack, BLOCK_Q=self.block_q)

    def key_constexprs(self) -> dict:
        (lo_z, cz), (lo_y, cy), (lo_x, cx) = self.query_windows()
        return dict(LO_Z=lo_z, LO_Y=lo_y, LO_X=lo_x, CZ=cz, CY=cy, CX=cx)

    def grid(self, batch: int, heads: int, walk_x: bool = False) -> Tuple[int, int, int]:
        """Tiles x heads x batch; with walk_x one program per row of tiles along x."""
        nz, ny, _ = self.geometry.num_windows
        tiles = nz * ny * self.row_blocks * (1 if walk_x else self.packs_x)
        return (tiles, heads, batch)


def _strides(t: torch.Tensor) -> List[int]:
    """The (b, z, y, x, head) strides; the kernels read head_dim with unit stride."""
    return list(t.stride()[:5])


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.size(-1) == 1 else t.contiguous()


_fixed_config: Optional[triton.Config] = None


@contextlib.contextmanager
def fixed_config(config: triton.Config):
    """Launch every kernel with ``config`` instead of autotuning (tests run each config so)."""
    global _fixed_config
    previous, _fixed_config = _fixed_config, config
    try:
        yield
    finally:
        _fixed_config = previous


def _launch(kernel, tuned, grid, *args, **constexprs) -> None:
    """Run the autotuned kernel on a GPU; the interpreter runs the default configuration."""
    config = _fixed_config or (DEFAULT_CONFIG if INTERPRETED else None)
    if config is None:
        tuned[grid](*args, **constexprs)
    else:
        kernel[grid](*args, **constexprs, **config.all_kwargs())


def _device_guard(t: torch.Tensor):
    """Launch on the tensor's GPU (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def forward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    geometry: WindowGeometry,
    scale: float,
    rel_pos_bias: Optional[torch.Tensor],
    pad_key: Optional[torch.Tensor],
    pad_value: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Output (B, D, H, W, heads, head_dim) and log-sum-exp (B, heads, D, H, W) in fp32."""
    query, key, value = (_last_dim_contiguous(t) for t in (query, key, value))
    batch, depth, height, width, heads, head_dim = query.shape
    tiling = Tiling.of(geometry, head_dim)
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    lse = torch.empty((batch, heads, depth, height, width), dtype=torch.float32, device=query.device)
    constant_pad = pad_key is not None
    with _device_guard(query):
        _launch(
            _forward_kernel, _forward_tuned, tiling.grid(batch, heads),
            query, key, value, out, lse,
            query if rel_pos_bias is None else rel_pos_bias.contiguous(),
            pad_key.contiguous() if constant_pad else query,
            pad_value.contiguous() if constant_pad else query,
            *_strides(query), *_strides(key), *_strides(value), *_strides(out),
            depth, height, width, heads, head_dim,
            geometry.num_windows[1], tiling.packs_x, tiling.row_blocks, scale,
            **tiling.geometry_constexprs(), HEAD_DIM_PAD=tiling.head_dim_pad,
            HAS_BIAS=rel_pos_bias is not None, CONSTANT_PAD=constant_pad,
        )
    return out, lse


# (window/search/pack constants, row blocks, device) -> _bias_gather_table(); built once each.
_BIAS_GATHER_TABLES: Dict[tuple, torch.Tensor] = {}


def _bias_gather_table(tiling: Tiling, device: torch.device) -> torch.Tensor:
    """For each rel_pos_bias entry, the flat (row, column) positions of a tile's bias partials
    that belong to it, padded with one past the last position (a zero column): a
    (bias entries, most positions per entry) index table. The pairing is the same for every
    tile and call of one geometry, so it is computed once (on the device, by
    _bias_index_map_kernel) and cached."""
    constexprs = tiling.geometry_constexprs()
    key = (tuple(sorted(constexprs.items())), tiling.row_blocks, str(device))
    table = _BIAS_GATHER_TABLES.get(key)
    if table is not None:
        return table
    bias_size = math.prod(tiling.geometry.bias_shape)
    length = tiling.bias_pairs
    index_map = torch.empty(length, dtype=torch.int64, device=device)
    with _device_guard(index_map):
        _bias_index_map_kernel[(tiling.row_blocks,)](index_map, **constexprs, BLOCK_K=DEFAULT_CONFIG.kwargs["BLOCK_K"])
    index_map = index_map.cpu()
    order = torch.argsort(index_map, stable=True)
    bins = index_map[order]
    counts = torch.bincount(index_map, minlength=bias_size + 1)
    rank = torch.arange(length) - (torch.cumsum(counts, 0) - counts)[bins]
    keep = bins < bias_size  # bin bias_size collects the pairs outside a row's box
    table = torch.full((bias_size, int(counts[:bias_size].max())), length, dtype=torch.int64)
    table[bins[keep], rank[keep]] = order[keep]
    table = table.to(device)
    _BIAS_GATHER_TABLES[key] = table
    return table


def _reduce_bias_partial(partial: torch.Tensor, tiling: Tiling, batch: int, heads: int, dtype: torch.dtype) -> torch.Tensor:
    """Sum the per-row partial sums of dS into rel_pos_bias's gradient, in a fixed order: a plain
    reduction over batch and tile rows, then a gather of each bias entry's (row, column) pairs
    and a sum over them (no scatter, so no atomics and no sort)."""
    g = tiling.geometry
    nz, ny, _ = g.num_windows
    sums = partial.view(batch, heads, nz * ny, tiling.bias_pairs).sum(dim=(0, 2))
    table = _bias_gather_table(tiling, partial.device)
    grad = torch.nn.functional.pad(sums, (0, 1))[:, table].sum(dim=-1)
    return grad.reshape(heads, *g.bias_shape).to(dtype)


def backward(
    grad_out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    geometry: WindowGeometry,
    scale: float,
    rel_pos_bias: Optional[torch.Tensor],
    pad_key: Optional[torch.Tensor],
    pad_value: Optional[torch.Tensor],
    deterministic: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Gradients of query, key, value, rel_pos_bias, pad_key, pad_value (None when not given).

    deterministic: gather dK/dV per key tile (bitwise reproducible); otherwise the dQ kernel
    scatters them with fp32 atomics in the same pass.
    """
    grad_out, query, key, value, out = (_last_dim_contiguous(t) for t in (grad_out, query, key, value, out))
    batch, depth, height, width, heads, head_dim = query.shape
    tiling = Tiling.of(geometry, head_dim)
    device = query.device
    has_bias, constant_pad = rel_pos_bias is not None, pad_key is not None
    row_grid = tiling.grid(batch, heads, walk_x=True)
    slots = row_grid[0] * heads * batch

    grad_query = torch.empty(query.shape, dtype=query.dtype, device=device)
    delta = torch.empty_like(lse)
    unused = torch.empty(1, dtype=torch.float32, device=device)
    bias_partial = (torch.empty(slots * tiling.block_q * tiling.union_columns, dtype=torch.float32, device=device)
                    if has_bias else unused)
    pad_partial = torch.empty(slots * 2 * head_dim, dtype=torch.float32, device=device) if constant_pad else unused
    if deterministic:
        grad_key_acc = grad_value_acc = unused
    else:
        grad_key_acc = torch.zeros(query.shape, dtype=torch.float32, device=device)
        grad_value_acc = torch.zeros(query.shape, dtype=torch.float32, device=device)
    acc_strides = _strides(grad_key_acc) if not deterministic else [0] * 5
    bias_arg = rel_pos_bias.contiguous() if has_bias else query
    constexprs = dict(**tiling.geometry_constexprs(), HEAD_DIM_PAD=tiling.head_dim_pad, HAS_BIAS=has_bias)
    sizes = (depth, height, width, heads, head_dim, geometry.num_windows[1], tiling.packs_x, tiling.row_blocks, scale)

    with _device_guard(query):
        _launch(
            _backward_query_kernel, _backward_query_tuned, row_grid,
            query, key, value, out, grad_out, lse, delta, bias_arg,
            pad_key.contiguous() if constant_pad else query,
            pad_value.contiguous() if constant_pad else query,
            grad_query, grad_key_acc, grad_value_acc, bias_partial, pad_partial,
            *_strides(query), *_strides(key), *_strides(value), *_strides(out), *_strides(grad_out),
            *_strides(grad_query), *acc_strides,
            *sizes,
            **constexprs, CONSTANT_PAD=constant_pad, ATOMIC_KV=not deterministic,
        )
        if deterministic:
            grad_key = torch.empty(query.shape, dtype=query.dtype, device=device)
            grad_value = torch.empty(query.shape, dtype=query.dtype, device=device)
            _launch(
                _backward_key_kernel, _backward_key_tuned, tiling.grid(batch, heads),
                query, key, value, grad_out, lse, delta, bias_arg, grad_key, grad_value,
                *_strides(query), *_strides(key), *_strides(value), *_strides(grad_out),
                *_strides(grad_key), *_strides(grad_value),
                *sizes,
                **constexprs, **tiling.key_constexprs(),
            )
        else:
            grad_key, grad_value = grad_key_acc.to(query.dtype), grad_value_acc.to(query.dtype)

    grad_bias = _reduce_bias_partial(bias_partial, tiling, batch, heads, query.dtype) if has_bias else None
    grad_pad_key = grad_pad_value = None
    if constant_pad:
        pads = pad_partial.view(batch, heads, row_grid[0], 2, head_dim).sum(dim=(0, 2)).to(query.dtype)
        # Separate storage: outputs of a custom op may not alias one another.
        grad_pad_key, grad_pad_value = pads[:, 0].clone(), pads[:, 1].clone()
    return grad_query, grad_key, grad_value, grad_bias, grad_pad_key, grad_pad_value
