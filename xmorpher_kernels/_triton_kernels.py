"""Triton kernels of window cross attention and the host code that launches them.

Launches per call (LAUNCHES_PER_FORWARD and LAUNCHES_PER_BACKWARD below; the tests count them):
  - forward, one kernel: one program per tile of queries (a few base windows side by side along x)
    computes the scores against the tile's key boxes straight from the (B, D, H, W, heads,
    head_dim) tensors, an online softmax in fp32, the output and the log-sum-exp per query;
  - backward, two kernels. The query pass: one program per row of 16-query tiles along x computes
    delta = rowsum(dO * O), dQ, and the partial sums of the rel_pos_bias and pad gradients over
    the tiles it walks, and writes the latter once, per bias entry, to its own slot of scratch.
    The key pass: one program per tile of keys gathers dK and dV from every query whose key box
    holds them (each program writes its own keys once, in the input dtype), and a few more
    programs sum the slots, head by head in a fixed order, into the gradients of rel_pos_bias,
    pad_key and pad_value, in their dtype.
No atomics anywhere, so the backward is bitwise reproducible; no PyTorch ops besides allocating
the results and the scratch (delta, slots), and no host synchronisation, so forward and backward
can be captured in a CUDA graph.

Where the query pass keeps its partial sums: the pad ones ((2, head_dim) per program) in
registers. The bias ones are a sum per (row, union-box column), 16 x 288 floats at the paper's
geometry, over a walk whose inner loop steps through those columns; registers can only hold them
with that loop unrolled, and compiled so (ahead of time, bf16, sm_90, Triton 3.8) the query kernel
used 255 registers and spilled 384 to 1384 bytes a thread in every autotune configuration. So they
accumulate in the program's slot instead (a running sum the same thread reads and writes, in
L1/L2): 232 registers and no spills in the default configuration. They are mapped to
rel_pos_bias entries once per program. Neither variant has been timed on a GPU.

Compile-time constants: the volume, window, search window and head_dim of a call are constexpr;
the kernels derive their tile counts from them through the constexpr functions of "Tiling" below,
which the host also evaluates for its grids. So the row loads have a known width and vectorize,
and index arithmetic by the window sizes folds; a new volume size compiles new kernels (and
autotunes again, as it did before).

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
rows instead. These are counts: an earlier version of these kernels ran on an H200 on 2026-11-25
(README, "GPU"), but no GPU has timed the packing against its alternatives, nor run this version.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import triton
import triton.language as tl

from ._geometry import WindowGeometry

# True when these kernels were decorated for the CPU interpreter (TRITON_INTERPRET=1).
INTERPRETED = bool(getattr(getattr(getattr(triton, "knobs", None), "runtime", None), "interpret", False))

# Kernel launches per call (tests/test_triton.py counts them, on a GPU with torch.profiler):
#   forward: the attention kernel, which writes the output and the log-sum-exp.
LAUNCHES_PER_FORWARD = 1
#   backward: the query pass (delta, dQ, the bias and pad partial sums of each program) and the
#   key pass (dK, dV, and the fixed-order reduction of the partial sums into the bias and pad
#   gradients).
LAUNCHES_PER_BACKWARD = 2

_INTERPRETER_BF16_DOT = tl.constexpr(INTERPRETED)
_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)

_MIN_DOT = 16  # tl.dot needs 16 rows, columns and inner dimension
_QUERY_PASS_ROWS = tl.constexpr(_MIN_DOT)  # rows of a query-pass tile (see _query_rows)
# The key pass reduces the query pass's slots with programs that each sum REDUCE_COLUMNS columns of
# one head's slots, REDUCE_SLOTS slots at a time.
_REDUCE_SLOTS = tl.constexpr(32)
_REDUCE_COLUMNS = tl.constexpr(32)
# The query pass maps its bias partial sums to rel_pos_bias entries this many entries at a time.
_ENTRY_BLOCK = tl.constexpr(128)


# ----------------------------------------------------------------------------------------------
# Tiling: the numbers the host and the kernels share. Each is a function of a call's compile-time
# constants (volume, window and search as (z, y, x) tuples, head_dim), evaluated by the host for
# its grids and by the kernels when they compile, so the two agree; as constexpr functions their
# source is part of the kernels' cache key.
# ----------------------------------------------------------------------------------------------


@triton.constexpr_function
def _left(window, search):
    """WindowGeometry.left: the margin of a key box before its base window, per axis."""
    return tuple((s - w) // 2 for w, s in zip(window, search))


@triton.constexpr_function
def _windows(volume, window):
    """WindowGeometry.num_windows: base windows per axis (the last one may be partial)."""
    return tuple((n + w - 1) // w for n, w in zip(volume, window))


@triton.constexpr_function
def _bias_size(window, search):
    """Entries of one head of rel_pos_bias: prod(s + w - 1)."""
    return (search[0] + window[0] - 1) * (search[1] + window[1] - 1) * (search[2] + window[2] - 1)


@triton.constexpr_function
def _pack(volume, window):
    """Base windows per tile, side by side along x: as many as fill 16 rows (module docstring)."""
    queries = window[0] * window[1] * window[2]
    if queries > _MIN_DOT:
        return 1
    return max(1, min(_MIN_DOT // queries, _windows(volume, window)[2]))


@triton.constexpr_function
def _block_q(window, head_dim):
    """Rows of a forward or key-pass tile: 16, or for windows of more queries up to 64 of them
    (32 past head_dim 64: 64 rows x head_dim 128 in fp32 already fill 64 registers a thread at
    4 warps)."""
    queries = window[0] * window[1] * window[2]
    if queries <= _MIN_DOT:
        return _MIN_DOT
    return min(triton.next_power_of_2(queries), 64 if head_dim <= 64 else 32)


@triton.constexpr_function
def _head_dim_pad(head_dim):
    return max(_MIN_DOT, triton.next_power_of_2(head_dim))


@triton.constexpr_function
def _row_blocks(volume, window, rows):
    """Tiles of `rows` rows per pack of windows: more than one when a pack has more queries."""
    return (_pack(volume, window) * window[0] * window[1] * window[2] + rows - 1) // rows


@triton.constexpr_function
def _packs_x(volume, window):
    pack = _pack(volume, window)
    return (_windows(volume, window)[2] + pack - 1) // pack


@triton.constexpr_function
def _union_x(volume, window, search):
    """Extent along x of the union of a tile's key boxes."""
    return search[2] + (_pack(volume, window) - 1) * window[2]


@triton.constexpr_function
def _union_columns(volume, window, search):
    """Keys in the union of a tile's key boxes: the columns a forward or query-pass program walks."""
    return search[0] * search[1] * _union_x(volume, window, search)


@triton.constexpr_function
def _tiles(volume, window, head_dim):
    """Forward (and key-pass) tiles per batch element and head."""
    windows = _windows(volume, window)
    return windows[0] * windows[1] * _packs_x(volume, window) * _row_blocks(volume, window, _block_q(window, head_dim))


@triton.constexpr_function
def _query_rows(volume, window):
    """Query-pass programs per batch element and head: one per row of 16-row tiles along x (16
    rows keep its bias partial sums, per row and union-box column, in registers)."""
    windows = _windows(volume, window)
    return windows[0] * windows[1] * _row_blocks(volume, window, _MIN_DOT)


@triton.constexpr_function
def _query_windows(volume, window, search):
    """Per axis, (first, count) of the base windows, relative to a key tile's first window, whose
    key boxes can hold one of its keys: window n holds key j when n*w - l <= j < n*w - l + s,
    for j over the tile's span of `span` windows."""
    left = _left(window, search)
    result = []
    for axis in range(3):
        span = _pack(volume, window) if axis == 2 else 1
        first = (left[axis] - search[axis]) // window[axis] + 1
        last = span + (left[axis] - 1) // window[axis]
        result.append((first, last - first + 1))
    return tuple(result)


@triton.constexpr_function
def _query_region_columns(volume, window, search):
    """Queries a key-pass program walks: those of every base window of _query_windows."""
    windows = _query_windows(volume, window, search)
    return windows[0][1] * window[0] * windows[1][1] * window[1] * windows[2][1] * window[2]


@triton.constexpr_function
def _partial_columns(window, search, head_dim, has_bias, constant_pad):
    """Floats in a query-pass slot: the bias entries, then pad_key's and pad_value's gradients."""
    return (_bias_size(window, search) if has_bias else 0) + (2 * head_dim if constant_pad else 0)


@triton.constexpr_function
def _slot_size(volume, window, search, head_dim, has_bias, constant_pad):
    """Floats of scratch per query-pass program: the partial sums it hands over (_partial_columns),
    then, with a bias, its running sums of dS per (row, union-box column) of its 16-row tiles."""
    row_sums = _MIN_DOT * _union_columns(volume, window, search) if has_bias else 0
    return _partial_columns(window, search, head_dim, has_bias, constant_pad) + row_sums


@triton.constexpr_function
def _reducers(window, search, head_dim, has_bias, constant_pad):
    """Programs of the key pass that reduce the slots, per head."""
    columns = _partial_columns(window, search, head_dim, has_bias, constant_pad)
    return (columns + _REDUCE_COLUMNS.value - 1) // _REDUCE_COLUMNS.value


# ----------------------------------------------------------------------------------------------
# Geometry helpers (the formulas of xmorpher_kernels/_geometry.py, on blocks of voxels)
# ----------------------------------------------------------------------------------------------


@triton.jit
def _tile_origin(tile, VOLUME, WINDOW, ROW_BLOCKS: tl.constexpr):
    # A tile index -> (row block, voxel origin of its first base window); tiles run row blocks
    # fastest, then packs along x, then y, then z.
    PACK: tl.constexpr = _pack(VOLUME, WINDOW)
    PACKS_X: tl.constexpr = _packs_x(VOLUME, WINDOW)
    WINDOWS_Y: tl.constexpr = _windows(VOLUME, WINDOW)[1]
    row_block = tile % ROW_BLOCKS
    rest = tile // ROW_BLOCKS
    pack = rest % PACKS_X
    rest = rest // PACKS_X
    return row_block, (rest // WINDOWS_Y) * WINDOW[0], (rest % WINDOWS_Y) * WINDOW[1], pack * (PACK * WINDOW[2])


@triton.jit
def _tile_rows(row_block, z0, y0, x0, VOLUME, WINDOW, BLOCK_Q: tl.constexpr):
    # Rows of a tile: _pack base windows side by side along x from origin (z0, y0, x0), each
    # flattened z-major; row_block picks BLOCK_Q of them when a window has more queries.
    # Returns each row's voxel, the x origin of its base window, and whether it exists.
    PACK: tl.constexpr = _pack(VOLUME, WINDOW)
    WY: tl.constexpr = WINDOW[1]
    WX: tl.constexpr = WINDOW[2]
    NQ: tl.constexpr = WINDOW[0] * WY * WX
    flat = row_block * BLOCK_Q + tl.arange(0, BLOCK_Q)
    member = flat // NQ
    inner = flat % NQ
    z = z0 + inner // (WY * WX)
    y = y0 + (inner // WX) % WY
    window_x = x0 + member * WX
    x = window_x + inner % WX
    valid = (flat < PACK * NQ) & (z < VOLUME[0]) & (y < VOLUME[1]) & (x < VOLUME[2])
    return z, y, x, window_x, valid


@triton.jit
def _box_columns(start, z0, y0, x0, VOLUME, NY: tl.constexpr, NX: tl.constexpr, COUNT: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    # Voxels start .. start + BLOCK_K of the box of COUNT voxels at (z0, y0, x0) with NY x NX
    # planes, flattened x fastest. `exists`: inside the box; `inside`: also inside the volume.
    u = start + tl.arange(0, BLOCK_K)
    z = z0 + u // (NY * NX)
    y = y0 + (u // NX) % NY
    x = x0 + u % NX
    exists = u < COUNT
    inside = exists & (z >= 0) & (z < VOLUME[0]) & (y >= 0) & (y < VOLUME[1]) & (x >= 0) & (x < VOLUME[2])
    return z, y, x, exists, inside


@triton.jit
def _in_key_box(kz, ky, kx, oz, oy, ox, WINDOW, SEARCH):
    # Key voxel k lies in the key box of the base window at origin o: o - l <= k < o - l + s.
    LEFT: tl.constexpr = _left(WINDOW, SEARCH)
    tz = kz - oz + LEFT[0]
    ty = ky - oy + LEFT[1]
    tx = kx - ox + LEFT[2]
    return (tz >= 0) & (tz < SEARCH[0]) & (ty >= 0) & (ty < SEARCH[1]) & (tx >= 0) & (tx < SEARCH[2])


@triton.jit
def _bias_coordinate(z, y, x, WINDOW, SEARCH):
    # The flat rel_pos_bias index of offset d = key - query (docs/contract.md, step 3) is linear in d:
    # ((dz + cz) * EY + dy + cy) * EX + dx + cx = coord(key) - coord(query) + coord(c),
    # c = l + w - 1, so a pair's index costs one subtraction.
    return (z * (SEARCH[1] + WINDOW[1] - 1) + y) * (SEARCH[2] + WINDOW[2] - 1) + x


@triton.jit
def _bias_index(key_coordinate, query_coordinate, WINDOW, SEARCH):
    LEFT: tl.constexpr = _left(WINDOW, SEARCH)
    CENTER: tl.constexpr = (((LEFT[0] + WINDOW[0] - 1) * (SEARCH[1] + WINDOW[1] - 1) + LEFT[1] + WINDOW[1] - 1)
                            * (SEARCH[2] + WINDOW[2] - 1) + LEFT[2] + WINDOW[2] - 1)
    return CENTER + key_coordinate - query_coordinate


@triton.jit
def _head_base(ptr, strides, b, h):
    # Pointer to (batch b, voxel 0, head h) of a (B, D, H, W, heads, head_dim) tensor, in 64 bits.
    return ptr + b.to(tl.int64) * strides[0] + h.to(tl.int64) * strides[4]


@triton.jit
def _head_inputs(Q, K, V, BIAS, PAD_KEY, PAD_VALUE, q_strides, k_strides, v_strides, b, h, WINDOW, SEARCH,
                 HEAD_DIM: tl.constexpr, HAS_BIAS: tl.constexpr, CONSTANT_PAD: tl.constexpr):
    # The inputs of batch b and head h: query, key and value at voxel 0, and the head's
    # rel_pos_bias, pad_key and pad_value (left alone when the call has none).
    if HAS_BIAS:
        BIAS += h * _bias_size(WINDOW, SEARCH)
    if CONSTANT_PAD:
        PAD_KEY += h * HEAD_DIM
        PAD_VALUE += h * HEAD_DIM
    return (_head_base(Q, q_strides, b, h), _head_base(K, k_strides, b, h), _head_base(V, v_strides, b, h),
            BIAS, PAD_KEY, PAD_VALUE)


@triton.jit
def _token_offsets(z, y, x, strides):
    # Element offset of voxel (z, y, x) from _head_base, in 64 bits: volumes times channels
    # overflow 2^31.
    return z.to(tl.int64) * strides[1] + y.to(tl.int64) * strides[2] + x.to(tl.int64) * strides[3]


@triton.jit
def _stat_base(ptr, b, h, VOLUME):
    # Pointer to (b, h) of a contiguous (B, heads, D, H, W) per-query statistic (lse, delta).
    return ptr + (b.to(tl.int64) * tl.num_programs(1) + h) * (VOLUME[0] * VOLUME[1] * VOLUME[2])


@triton.jit
def _stat_offsets(z, y, x, VOLUME):
    return (z * VOLUME[1] + y) * VOLUME[2] + x


@triton.jit
def _row_mask(valid, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr):
    # Rows that exist, and the head_dim columns when head_dim is padded to a power of 2; a mask
    # constant along head_dim keeps the row loads and stores vectorized.
    if HEAD_DIM == HEAD_DIM_PAD:
        mask = valid[:, None]
    else:
        mask = valid[:, None] & (tl.arange(0, HEAD_DIM_PAD) < HEAD_DIM)[None, :]
    return mask


@triton.jit
def _load_rows(base, offsets, valid, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr):
    dims = tl.arange(0, HEAD_DIM_PAD)
    return tl.load(base + offsets[:, None] + dims[None, :], mask=_row_mask(valid, HEAD_DIM, HEAD_DIM_PAD), other=0.0)


@triton.jit
def _store_rows(base, offsets, valid, rows, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr):
    dims = tl.arange(0, HEAD_DIM_PAD)
    tl.store(base + offsets[:, None] + dims[None, :], rows.to(base.dtype.element_ty),
             mask=_row_mask(valid, HEAD_DIM, HEAD_DIM_PAD))


@triton.jit
def _pad_rows(PAD_KEY, PAD_VALUE, dtype: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
              CONSTANT_PAD: tl.constexpr):
    # The rows standing for keys outside the volume (PAD_* point at the program's head):
    # pad_key/pad_value under constant padding, unused otherwise.
    dims = tl.arange(0, HEAD_DIM_PAD)
    if CONSTANT_PAD:
        pad_key = tl.load(PAD_KEY + dims, mask=dims < HEAD_DIM, other=0.0)
        pad_value = tl.load(PAD_VALUE + dims, mask=dims < HEAD_DIM, other=0.0)
    else:
        pad_key = tl.zeros([HEAD_DIM_PAD], dtype=dtype)
        pad_value = tl.zeros([HEAD_DIM_PAD], dtype=dtype)
    return pad_key, pad_value


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
def _scores_log2(a, b, pair, bias, scale, HAS_BIAS: tl.constexpr):
    # (scale * a b^T + bias) in log2 units, -inf where `pair` is off. `a` and `b` are the query
    # and key rows in either order, `bias` the rel_pos_bias of each pair.
    s = _dot(a, tl.trans(b)) * (scale * _LOG2E)
    if HAS_BIAS:
        s += bias.to(tl.float32) * _LOG2E
    return tl.where(pair, s, float("-inf"))


@triton.jit
def _pair_bias(BIAS, key_coordinate, query_coordinate, pair, WINDOW, SEARCH, HAS_BIAS: tl.constexpr):
    # rel_pos_bias of each pair (0 where off), gathered from the program's head BIAS.
    if HAS_BIAS:
        bias = tl.load(BIAS + _bias_index(key_coordinate, query_coordinate, WINDOW, SEARCH), mask=pair, other=0.0)
    else:
        bias = None
    return bias


@triton.jit
def _union_chunk(
    start, K, V, k_strides, v_strides, row_valid, window_x, pad_key, pad_value, z0, y0, x0,
    VOLUME, WINDOW, SEARCH, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, CONSTANT_PAD: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Columns [start, start + BLOCK_K) of the union of the key boxes of the tile at (z0, y0, x0):
    # the (row, key) pairs that take part, whether each key is inside the volume, the key and
    # value rows, and each key's _bias_coordinate.
    LEFT: tl.constexpr = _left(WINDOW, SEARCH)
    UX: tl.constexpr = _union_x(VOLUME, WINDOW, SEARCH)
    UNION: tl.constexpr = _union_columns(VOLUME, WINDOW, SEARCH)
    kz, ky, kx, exists, inside = _box_columns(start, z0 - LEFT[0], y0 - LEFT[1], x0 - LEFT[2], VOLUME,
                                              SEARCH[1], UX, UNION, BLOCK_K)
    # The union spans exactly each row's key box along z and y; along x a row sees SX of its keys.
    tx = kx[None, :] - window_x[:, None] + LEFT[2]
    pair = row_valid[:, None] & exists[None, :] & (tx >= 0) & (tx < SEARCH[2])
    if not CONSTANT_PAD:
        pair = pair & inside[None, :]
    k = _load_rows(K, _token_offsets(kz, ky, kx, k_strides), inside, HEAD_DIM, HEAD_DIM_PAD)
    v = _load_rows(V, _token_offsets(kz, ky, kx, v_strides), inside, HEAD_DIM, HEAD_DIM_PAD)
    if CONSTANT_PAD:
        k = tl.where(inside[:, None], k, pad_key[None, :])
        v = tl.where(inside[:, None], v, pad_value[None, :])
    return pair, inside, k, v, _bias_coordinate(kz, ky, kx, WINDOW, SEARCH)


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------


@triton.jit
def _forward_kernel(
    Q, K, V, OUT, LSE, BIAS, PAD_KEY, PAD_VALUE,
    q_strides, k_strides, v_strides, out_strides,
    scale,
    VOLUME: tl.constexpr, WINDOW: tl.constexpr, SEARCH: tl.constexpr, HEAD_DIM: tl.constexpr,
    HAS_BIAS: tl.constexpr, CONSTANT_PAD: tl.constexpr, BLOCK_K: tl.constexpr,
):
    BLOCK_Q: tl.constexpr = _block_q(WINDOW, HEAD_DIM)
    ROW_BLOCKS: tl.constexpr = _row_blocks(VOLUME, WINDOW, BLOCK_Q)
    HEAD_DIM_PAD: tl.constexpr = _head_dim_pad(HEAD_DIM)
    UNION: tl.constexpr = _union_columns(VOLUME, WINDOW, SEARCH)

    tile = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    Q, K, V, BIAS, PAD_KEY, PAD_VALUE = _head_inputs(Q, K, V, BIAS, PAD_KEY, PAD_VALUE, q_strides, k_strides,
                                                     v_strides, b, h, WINDOW, SEARCH, HEAD_DIM, HAS_BIAS, CONSTANT_PAD)
    OUT = _head_base(OUT, out_strides, b, h)
    LSE = _stat_base(LSE, b, h, VOLUME)

    row_block, z0, y0, x0 = _tile_origin(tile, VOLUME, WINDOW, ROW_BLOCKS)
    qz, qy, qx, window_x, row_valid = _tile_rows(row_block, z0, y0, x0, VOLUME, WINDOW, BLOCK_Q)
    q = _load_rows(Q, _token_offsets(qz, qy, qx, q_strides), row_valid, HEAD_DIM, HEAD_DIM_PAD)
    query_coordinate = _bias_coordinate(qz, qy, qx, WINDOW, SEARCH)
    pad_key, pad_value = _pad_rows(PAD_KEY, PAD_VALUE, q.dtype, HEAD_DIM, HEAD_DIM_PAD, CONSTANT_PAD)

    row_max = tl.full([BLOCK_Q], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_Q], dtype=tl.float32)
    acc = tl.zeros([BLOCK_Q, HEAD_DIM_PAD], dtype=tl.float32)
    for start in range(0, UNION, BLOCK_K):
        pair, _inside, k, v, key_coordinate = _union_chunk(
            start, K, V, k_strides, v_strides, row_valid, window_x, pad_key, pad_value, z0, y0, x0,
            VOLUME, WINDOW, SEARCH, HEAD_DIM, HEAD_DIM_PAD, CONSTANT_PAD, BLOCK_K,
        )
        bias = _pair_bias(BIAS, key_coordinate[None, :], query_coordinate[:, None], pair, WINDOW, SEARCH, HAS_BIAS)
        s = _scores_log2(q, k, pair, bias, scale, HAS_BIAS)
        new_max = tl.maximum(row_max, tl.max(s, 1))
        # A row with no key yet keeps -inf; subtract 0 then, so exp2 gives 0 instead of NaN.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        p = tl.exp2(s - shift[:, None])
        correction = tl.exp2(row_max - shift)
        row_sum = row_sum * correction + tl.sum(p, 1)
        acc = acc * correction[:, None] + _dot(p.to(v.dtype), v)
        row_max = new_max

    row_sum = tl.where(row_sum > 0, row_sum, 1.0)  # rows that do not exist
    _store_rows(OUT, _token_offsets(qz, qy, qx, out_strides), row_valid, acc / row_sum[:, None], HEAD_DIM, HEAD_DIM_PAD)
    lse = (tl.where(row_valid, row_max, 0.0) + tl.log2(row_sum)) * _LN2
    tl.store(LSE + _stat_offsets(qz, qy, qx, VOLUME), lse, mask=row_valid)


# ----------------------------------------------------------------------------------------------
# Backward, first launch: the query pass
# ----------------------------------------------------------------------------------------------


@triton.jit
def _row_sums_per_entry(ROW_SUMS, row_block, entries, VOLUME, WINDOW, SEARCH):
    # ROW_SUMS: a query-pass program's sums of dS over the tiles it walked, per (row, union-box
    # column), 16 rows of the union's columns (the pairing of rows and columns is the same in
    # every tile). Returns them summed per rel_pos_bias entry in `entries`: the entry of a pair is
    # coord(key) - coord(query) + CENTER (see _bias_coordinate), so for a given entry and row the
    # column is known, or there is none.
    WZ: tl.constexpr = WINDOW[0]
    WY: tl.constexpr = WINDOW[1]
    WX: tl.constexpr = WINDOW[2]
    EY: tl.constexpr = SEARCH[1] + WY - 1
    EX: tl.constexpr = SEARCH[2] + WX - 1
    PACK: tl.constexpr = _pack(VOLUME, WINDOW)
    UX: tl.constexpr = _union_x(VOLUME, WINDOW, SEARCH)
    # Each row's place in its base window (not clipped to the volume: rows outside it hold 0).
    rows = tl.arange(0, _QUERY_PASS_ROWS)
    flat = row_block * _QUERY_PASS_ROWS + rows
    member = flat // (WZ * WY * WX)
    inner = flat % (WZ * WY * WX)
    # The key of (row, entry), relative to the row's own key box.
    bz = (entries // (EY * EX))[None, :] + (inner // (WY * WX))[:, None] - (WZ - 1)
    by = ((entries // EX) % EY)[None, :] + ((inner // WX) % WY)[:, None] - (WY - 1)
    bx = (entries % EX)[None, :] + (inner % WX)[:, None] - (WX - 1)
    valid = ((flat < PACK * WZ * WY * WX)[:, None] & (entries < _bias_size(WINDOW, SEARCH))[None, :]
             & (bz >= 0) & (bz < SEARCH[0]) & (by >= 0) & (by < SEARCH[1]) & (bx >= 0) & (bx < SEARCH[2]))
    column = (bz * SEARCH[1] + by) * UX + bx + (member * WX)[:, None]
    UNION: tl.constexpr = _union_columns(VOLUME, WINDOW, SEARCH)
    return tl.sum(tl.load(ROW_SUMS + rows[:, None] * UNION + column, mask=valid, other=0.0), 0)


@triton.jit
def _backward_query_kernel(
    Q, K, V, OUT, GRAD_OUT, LSE, DELTA, BIAS, PAD_KEY, PAD_VALUE, GRAD_QUERY, PARTIALS,
    q_strides, k_strides, v_strides, out_strides, grad_out_strides, grad_query_strides,
    scale,
    VOLUME: tl.constexpr, WINDOW: tl.constexpr, SEARCH: tl.constexpr, HEAD_DIM: tl.constexpr,
    HAS_BIAS: tl.constexpr, CONSTANT_PAD: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # One program walks a row of 16-row tiles along x: per tile it writes delta and dQ. The pad
    # gradients' partial sums stay in registers over the walk; the bias ones, per (row, union-box
    # column), accumulate in the program's own slot (see _slot_size). At the end both go, the bias
    # ones per rel_pos_bias entry, to the head of the slot that the key pass reduces.
    PACK: tl.constexpr = _pack(VOLUME, WINDOW)
    ROW_BLOCKS: tl.constexpr = _row_blocks(VOLUME, WINDOW, _QUERY_PASS_ROWS)
    PACKS_X: tl.constexpr = _packs_x(VOLUME, WINDOW)
    HEAD_DIM_PAD: tl.constexpr = _head_dim_pad(HEAD_DIM)
    UNION: tl.constexpr = _union_columns(VOLUME, WINDOW, SEARCH)
    BIAS_SIZE: tl.constexpr = _bias_size(WINDOW, SEARCH)
    PAD_COLUMN: tl.constexpr = BIAS_SIZE if HAS_BIAS else 0
    COLUMNS: tl.constexpr = _partial_columns(WINDOW, SEARCH, HEAD_DIM, HAS_BIAS, CONSTANT_PAD)
    SLOT: tl.constexpr = _slot_size(VOLUME, WINDOW, SEARCH, HEAD_DIM, HAS_BIAS, CONSTANT_PAD)
    WINDOWS_Y: tl.constexpr = _windows(VOLUME, WINDOW)[1]

    row = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    Q, K, V, BIAS, PAD_KEY, PAD_VALUE = _head_inputs(Q, K, V, BIAS, PAD_KEY, PAD_VALUE, q_strides, k_strides,
                                                     v_strides, b, h, WINDOW, SEARCH, HEAD_DIM, HAS_BIAS, CONSTANT_PAD)
    OUT = _head_base(OUT, out_strides, b, h)
    GRAD_OUT = _head_base(GRAD_OUT, grad_out_strides, b, h)
    GRAD_QUERY = _head_base(GRAD_QUERY, grad_query_strides, b, h)
    LSE = _stat_base(LSE, b, h, VOLUME)
    DELTA = _stat_base(DELTA, b, h, VOLUME)
    if SLOT > 0:
        # Slots run batch-major within a head, the layout the key pass reduces.
        PARTIALS += ((h.to(tl.int64) * tl.num_programs(2) + b) * tl.num_programs(0) + row) * SLOT
    if HAS_BIAS:
        ROW_SUMS = PARTIALS + COLUMNS

    row_block = row % ROW_BLOCKS
    z0 = (row // ROW_BLOCKS // WINDOWS_Y) * WINDOW[0]
    y0 = (row // ROW_BLOCKS % WINDOWS_Y) * WINDOW[1]
    rows = tl.arange(0, _QUERY_PASS_ROWS)
    pad_key, pad_value = _pad_rows(PAD_KEY, PAD_VALUE, Q.dtype.element_ty, HEAD_DIM, HEAD_DIM_PAD, CONSTANT_PAD)
    grad_pad_key = tl.zeros([HEAD_DIM_PAD], dtype=tl.float32)
    grad_pad_value = tl.zeros([HEAD_DIM_PAD], dtype=tl.float32)

    for pack in range(PACKS_X):
        if HAS_BIAS:
            # Orders every thread's adds to the running sums of the last tile before this tile
            # reads them, whichever threads the compiler gives the loads and stores.
            tl.debug_barrier()
        x0 = pack * (PACK * WINDOW[2])
        qz, qy, qx, window_x, row_valid = _tile_rows(row_block, z0, y0, x0, VOLUME, WINDOW, _QUERY_PASS_ROWS)
        q = _load_rows(Q, _token_offsets(qz, qy, qx, q_strides), row_valid, HEAD_DIM, HEAD_DIM_PAD)
        grad_out = _load_rows(GRAD_OUT, _token_offsets(qz, qy, qx, grad_out_strides), row_valid, HEAD_DIM, HEAD_DIM_PAD)
        out = _load_rows(OUT, _token_offsets(qz, qy, qx, out_strides), row_valid, HEAD_DIM, HEAD_DIM_PAD)
        query_coordinate = _bias_coordinate(qz, qy, qx, WINDOW, SEARCH)
        stats = _stat_offsets(qz, qy, qx, VOLUME)
        lse_log2 = tl.load(LSE + stats, mask=row_valid, other=0.0) * _LOG2E
        delta = tl.sum(grad_out.to(tl.float32) * out.to(tl.float32), 1)
        tl.store(DELTA + stats, delta, mask=row_valid)

        grad_q = tl.zeros([_QUERY_PASS_ROWS, HEAD_DIM_PAD], dtype=tl.float32)
        pad_ds = tl.zeros([_QUERY_PASS_ROWS], dtype=tl.float32)
        pad_p = tl.zeros([_QUERY_PASS_ROWS], dtype=tl.float32)
        for start in range(0, UNION, BLOCK_K):
            pair, inside, k, v, key_coordinate = _union_chunk(
                start, K, V, k_strides, v_strides, row_valid, window_x, pad_key, pad_value, z0, y0, x0,
                VOLUME, WINDOW, SEARCH, HEAD_DIM, HEAD_DIM_PAD, CONSTANT_PAD, BLOCK_K,
            )
            bias = _pair_bias(BIAS, key_coordinate[None, :], query_coordinate[:, None], pair, WINDOW, SEARCH, HAS_BIAS)
            p = tl.exp2(_scores_log2(q, k, pair, bias, scale, HAS_BIAS) - lse_log2[:, None])
            ds = p * (_dot(grad_out, tl.trans(v)) - delta[:, None])
            grad_q += _dot(ds.to(k.dtype), k)
            if HAS_BIAS:
                # Running sums per (row, union-box column); the first tile starts them.
                columns = start + tl.arange(0, BLOCK_K)
                sums = ROW_SUMS + rows[:, None] * UNION + columns[None, :]
                column_ok = (columns < UNION)[None, :]
                tl.store(sums, tl.load(sums, mask=column_ok & (pack > 0), other=0.0) + ds, mask=column_ok)
            if CONSTANT_PAD:
                pad_ds += tl.sum(tl.where(inside[None, :], 0.0, ds), 1)
                pad_p += tl.sum(tl.where(inside[None, :], 0.0, p), 1)
        _store_rows(GRAD_QUERY, _token_offsets(qz, qy, qx, grad_query_strides), row_valid, grad_q * scale,
                    HEAD_DIM, HEAD_DIM_PAD)
        if CONSTANT_PAD:
            grad_pad_key += tl.sum(pad_ds[:, None] * q.to(tl.float32), 0) * scale
            grad_pad_value += tl.sum(pad_p[:, None] * grad_out.to(tl.float32), 0)

    if HAS_BIAS:
        tl.debug_barrier()  # the per-entry sums read other threads' running sums
        for first in range(0, BIAS_SIZE, _ENTRY_BLOCK):
            entries = first + tl.arange(0, _ENTRY_BLOCK)
            tl.store(PARTIALS + entries, _row_sums_per_entry(ROW_SUMS, row_block, entries, VOLUME, WINDOW, SEARCH),
                     mask=entries < BIAS_SIZE)
    if CONSTANT_PAD:
        dims = tl.arange(0, HEAD_DIM_PAD)
        tl.store(PARTIALS + PAD_COLUMN + dims, grad_pad_key, mask=dims < HEAD_DIM)
        tl.store(PARTIALS + PAD_COLUMN + HEAD_DIM + dims, grad_pad_value, mask=dims < HEAD_DIM)


# ----------------------------------------------------------------------------------------------
# Backward, second launch: the key pass and the reduction of the query pass's slots
# ----------------------------------------------------------------------------------------------


@triton.jit
def _key_gradients(
    tile, b, h, Q, K, V, GRAD_OUT, LSE, DELTA, BIAS, GRAD_KEY, GRAD_VALUE,
    q_strides, k_strides, v_strides, grad_out_strides, grad_key_strides, grad_value_strides, scale,
    VOLUME, WINDOW, SEARCH, HEAD_DIM: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Key-centric dK/dV: the rows are the keys of one tile (laid out like a query tile), the
    # columns walk the queries of the base windows (_query_windows) whose key boxes can hold
    # them. Each program writes its own rows once: no races, a fixed order.
    BLOCK_Q: tl.constexpr = _block_q(WINDOW, HEAD_DIM)
    ROW_BLOCKS: tl.constexpr = _row_blocks(VOLUME, WINDOW, BLOCK_Q)
    HEAD_DIM_PAD: tl.constexpr = _head_dim_pad(HEAD_DIM)
    REGIONS: tl.constexpr = _query_windows(VOLUME, WINDOW, SEARCH)
    REGION: tl.constexpr = _query_region_columns(VOLUME, WINDOW, SEARCH)
    RY: tl.constexpr = REGIONS[1][1] * WINDOW[1]
    RX: tl.constexpr = REGIONS[2][1] * WINDOW[2]

    Q, K, V, BIAS, _pad_key, _pad_value = _head_inputs(Q, K, V, BIAS, BIAS, BIAS, q_strides, k_strides, v_strides,
                                                       b, h, WINDOW, SEARCH, HEAD_DIM, HAS_BIAS, False)
    GRAD_OUT = _head_base(GRAD_OUT, grad_out_strides, b, h)
    GRAD_KEY = _head_base(GRAD_KEY, grad_key_strides, b, h)
    GRAD_VALUE = _head_base(GRAD_VALUE, grad_value_strides, b, h)
    LSE = _stat_base(LSE, b, h, VOLUME)
    DELTA = _stat_base(DELTA, b, h, VOLUME)

    row_block, z0, y0, x0 = _tile_origin(tile, VOLUME, WINDOW, ROW_BLOCKS)
    kz, ky, kx, _key_window_x, key_valid = _tile_rows(row_block, z0, y0, x0, VOLUME, WINDOW, BLOCK_Q)
    k = _load_rows(K, _token_offsets(kz, ky, kx, k_strides), key_valid, HEAD_DIM, HEAD_DIM_PAD)
    v = _load_rows(V, _token_offsets(kz, ky, kx, v_strides), key_valid, HEAD_DIM, HEAD_DIM_PAD)
    key_coordinate = _bias_coordinate(kz, ky, kx, WINDOW, SEARCH)
    grad_k = tl.zeros([BLOCK_Q, HEAD_DIM_PAD], dtype=tl.float32)
    grad_v = tl.zeros([BLOCK_Q, HEAD_DIM_PAD], dtype=tl.float32)

    for start in range(0, REGION, BLOCK_K):
        qz, qy, qx, _in_region, q_inside = _box_columns(
            start, z0 + REGIONS[0][0] * WINDOW[0], y0 + REGIONS[1][0] * WINDOW[1], x0 + REGIONS[2][0] * WINDOW[2],
            VOLUME, RY, RX, REGION, BLOCK_K)
        # Origin of each query's base window (only meaningful where q_inside, i.e. q >= 0).
        oz = (qz // WINDOW[0]) * WINDOW[0]
        oy = (qy // WINDOW[1]) * WINDOW[1]
        ox = (qx // WINDOW[2]) * WINDOW[2]
        pair = key_valid[:, None] & q_inside[None, :] & _in_key_box(
            kz[:, None], ky[:, None], kx[:, None], oz[None, :], oy[None, :], ox[None, :], WINDOW, SEARCH)
        q = _load_rows(Q, _token_offsets(qz, qy, qx, q_strides), q_inside, HEAD_DIM, HEAD_DIM_PAD)
        grad_out = _load_rows(GRAD_OUT, _token_offsets(qz, qy, qx, grad_out_strides), q_inside, HEAD_DIM, HEAD_DIM_PAD)
        stats = _stat_offsets(qz, qy, qx, VOLUME)
        lse_log2 = tl.load(LSE + stats, mask=q_inside, other=0.0) * _LOG2E
        delta = tl.load(DELTA + stats, mask=q_inside, other=0.0)
        bias = _pair_bias(BIAS, key_coordinate[:, None], _bias_coordinate(qz, qy, qx, WINDOW, SEARCH)[None, :], pair,
                          WINDOW, SEARCH, HAS_BIAS)
        p_t = tl.exp2(_scores_log2(k, q, pair, bias, scale, HAS_BIAS) - lse_log2[None, :])
        grad_v += _dot(p_t.to(grad_out.dtype), grad_out)
        ds_t = p_t * (_dot(v, tl.trans(grad_out)) - delta[None, :])
        grad_k += _dot(ds_t.to(q.dtype), q)

    _store_rows(GRAD_KEY, _token_offsets(kz, ky, kx, grad_key_strides), key_valid, grad_k * scale,
                HEAD_DIM, HEAD_DIM_PAD)
    _store_rows(GRAD_VALUE, _token_offsets(kz, ky, kx, grad_value_strides), key_valid, grad_v, HEAD_DIM, HEAD_DIM_PAD)


@triton.jit
def _reduce_partials(
    block, h, PARTIALS, GRAD_BIAS, GRAD_PAD_KEY, GRAD_PAD_VALUE, slots,
    VOLUME, WINDOW, SEARCH, HEAD_DIM: tl.constexpr, HAS_BIAS: tl.constexpr, CONSTANT_PAD: tl.constexpr,
):
    # Columns [block * REDUCE_COLUMNS, +REDUCE_COLUMNS) of the partial sums at the head of head
    # h's `slots` query-pass slots, summed in a fixed order (slot by slot per lane, then one tree
    # over the lanes) into the gradients of rel_pos_bias and of the pads, in their dtype.
    SLOT: tl.constexpr = _slot_size(VOLUME, WINDOW, SEARCH, HEAD_DIM, HAS_BIAS, CONSTANT_PAD)
    BIAS_SIZE: tl.constexpr = _bias_size(WINDOW, SEARCH)
    PAD_COLUMN: tl.constexpr = BIAS_SIZE if HAS_BIAS else 0
    columns = block * _REDUCE_COLUMNS + tl.arange(0, _REDUCE_COLUMNS)
    column_ok = columns < _partial_columns(WINDOW, SEARCH, HEAD_DIM, HAS_BIAS, CONSTANT_PAD)
    PARTIALS += h.to(tl.int64) * slots * SLOT
    sums = tl.zeros([_REDUCE_SLOTS, _REDUCE_COLUMNS], dtype=tl.float32)
    for first in range(0, slots, _REDUCE_SLOTS):
        slot = first + tl.arange(0, _REDUCE_SLOTS)
        sums += tl.load(PARTIALS + slot.to(tl.int64)[:, None] * SLOT + columns[None, :],
                        mask=(slot < slots)[:, None] & column_ok[None, :], other=0.0)
    total = tl.sum(sums, 0)
    if HAS_BIAS:
        tl.store(GRAD_BIAS + h * BIAS_SIZE + columns, total.to(GRAD_BIAS.dtype.element_ty), mask=columns < BIAS_SIZE)
    if CONSTANT_PAD:
        pad = columns - PAD_COLUMN
        tl.store(GRAD_PAD_KEY + h * HEAD_DIM + pad, total.to(GRAD_PAD_KEY.dtype.element_ty),
                 mask=(pad >= 0) & (pad < HEAD_DIM))
        tl.store(GRAD_PAD_VALUE + h * HEAD_DIM + pad - HEAD_DIM, total.to(GRAD_PAD_VALUE.dtype.element_ty),
                 mask=(pad >= HEAD_DIM) & (pad < 2 * HEAD_DIM))


@triton.jit
def _backward_key_kernel(
    Q, K, V, GRAD_OUT, LSE, DELTA, BIAS, GRAD_KEY, GRAD_VALUE, PARTIALS, GRAD_BIAS, GRAD_PAD_KEY, GRAD_PAD_VALUE,
    q_strides, k_strides, v_strides, grad_out_strides, grad_key_strides, grad_value_strides,
    scale,
    VOLUME: tl.constexpr, WINDOW: tl.constexpr, SEARCH: tl.constexpr, HEAD_DIM: tl.constexpr,
    HAS_BIAS: tl.constexpr, CONSTANT_PAD: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # The first REDUCERS programs of each head reduce the query pass's slots (in batch 0's part of
    # the grid; the others have nothing to do): they come first so that they start early and run
    # beside the key tiles. The rest are the key tiles.
    REDUCERS: tl.constexpr = _reducers(WINDOW, SEARCH, HEAD_DIM, HAS_BIAS, CONSTANT_PAD)
    tile = tl.program_id(0) - REDUCERS
    h = tl.program_id(1)
    b = tl.program_id(2)
    if tile >= 0:
        _key_gradients(
            tile, b, h, Q, K, V, GRAD_OUT, LSE, DELTA, BIAS, GRAD_KEY, GRAD_VALUE,
            q_strides, k_strides, v_strides, grad_out_strides, grad_key_strides, grad_value_strides, scale,
            VOLUME, WINDOW, SEARCH, HEAD_DIM, HAS_BIAS, BLOCK_K,
        )
    if REDUCERS > 0:
        if (tile < 0) & (b == 0):
            _reduce_partials(tile + REDUCERS, h, PARTIALS, GRAD_BIAS, GRAD_PAD_KEY, GRAD_PAD_VALUE,
                             tl.num_programs(2) * _query_rows(VOLUME, WINDOW),
                             VOLUME, WINDOW, SEARCH, HEAD_DIM, HAS_BIAS, CONSTANT_PAD)


# ----------------------------------------------------------------------------------------------
# Autotuning
# ----------------------------------------------------------------------------------------------

# BLOCK_K is the number of key (or query) columns per step; the rows of a tile are fixed by the
# packing (see the module docstring). The default is what the interpreter tests run. Untimed: no
# GPU has measured these against each other for this version of the kernels.
DEFAULT_CONFIG = triton.Config({"BLOCK_K": 64}, num_warps=4, num_stages=2)
CONFIGS = [
    DEFAULT_CONFIG,
    triton.Config({"BLOCK_K": 32}, num_warps=2, num_stages=2),
    triton.Config({"BLOCK_K": 64}, num_warps=2, num_stages=3),
    triton.Config({"BLOCK_K": 128}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_K": 64}, num_warps=8, num_stages=2),
]


# A call's compile-time constants besides the tuned BLOCK_K, which every kernel takes: its shape
# class, and the tuning key.
_CALL_CONSTEXPRS = ("VOLUME", "WINDOW", "SEARCH", "HEAD_DIM", "HAS_BIAS", "CONSTANT_PAD")


def _autotuned(kernel, columns_walked):
    """The kernel autotuned over CONFIGS, without the BLOCK_K wider than the columns a program
    walks (``columns_walked(volume, window, search)``) rounded up to a power of 2."""

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        walked = columns_walked(args["VOLUME"], args["WINDOW"], args["SEARCH"])
        widest = max(_MIN_DOT, triton.next_power_of_2(walked))
        return [c for c in configs if c.kwargs["BLOCK_K"] <= widest] or configs[:1]

    return triton.autotune(CONFIGS, key=list(_CALL_CONSTEXPRS), prune_configs_by={"early_config_prune": prune})(kernel)


_forward_tuned = _autotuned(_forward_kernel, _union_columns)
_backward_query_tuned = _autotuned(_backward_query_kernel, _union_columns)
_backward_key_tuned = _autotuned(_backward_key_kernel, _query_region_columns)


# ----------------------------------------------------------------------------------------------
# Host side: launches
# ----------------------------------------------------------------------------------------------

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


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.size(-1) == 1 else t.contiguous()


def _strides(t: torch.Tensor) -> Tuple[int, ...]:
    """The (b, z, y, x, head) strides; the kernels read head_dim with unit stride."""
    return t.stride()[:5]


def _kernel_arg(t: Optional[torch.Tensor], unused: torch.Tensor) -> torch.Tensor:
    """An optional tensor as the kernels take it: contiguous (copied only when it is not), or,
    when the call has none, ``unused``, which they never touch (their flags say what is there;
    Triton 3.6 cannot pass None through the helpers that offset the pointers)."""
    return unused if t is None else t.contiguous()


@dataclass(frozen=True)
class LaunchPlan:
    """What the host needs to launch one shape class of calls: the compile-time constants, grid
    sizes (programs per batch element and head) and scratch; built once per shape class."""

    constexprs: Dict[str, object]  # the _CALL_CONSTEXPRS
    forward_programs: int          # forward: one per tile
    query_programs: int            # backward query pass: one per row of 16-row tiles
    key_programs: int              # backward key pass: the reducers of the slots, then the tiles
    slot_size: int                 # floats of scratch per query-pass program (0: no bias or pads)

    @staticmethod
    @functools.lru_cache(maxsize=None)
    def of(geometry: WindowGeometry, head_dim: int, has_bias: bool, constant_pad: bool) -> "LaunchPlan":
        volume, window, search = geometry.volume, geometry.window, geometry.search
        values = (volume, window, search, head_dim, has_bias, constant_pad)
        tiles = _tiles(volume, window, head_dim)
        return LaunchPlan(
            constexprs=dict(zip(_CALL_CONSTEXPRS, values)),
            forward_programs=tiles,
            query_programs=_query_rows(volume, window),
            key_programs=_reducers(window, search, head_dim, has_bias, constant_pad) + tiles,
            slot_size=_slot_size(volume, window, search, head_dim, has_bias, constant_pad),
        )


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
    """Output (B, D, H, W, heads, head_dim) and log-sum-exp (B, heads, D, H, W) in fp32.

    pad_key/pad_value given (both, (heads, head_dim)) means padding="constant"; None, "mask".
    """
    query, key, value = (_last_dim_contiguous(t) for t in (query, key, value))
    batch, depth, height, width, heads, head_dim = query.shape
    plan = LaunchPlan.of(geometry, head_dim, rel_pos_bias is not None, pad_key is not None)
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    lse = torch.empty((batch, heads, depth, height, width), dtype=torch.float32, device=query.device)
    with _device_guard(query):
        _launch(
            _forward_kernel, _forward_tuned, (plan.forward_programs, heads, batch),
            query, key, value, out, lse, *(_kernel_arg(t, query) for t in (rel_pos_bias, pad_key, pad_value)),
            _strides(query), _strides(key), _strides(value), _strides(out),
            scale,
            **plan.constexprs,
        )
    return out, lse


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
) -> Tuple[Optional[torch.Tensor], ...]:
    """Gradients of query, key, value, rel_pos_bias, pad_key, pad_value (None when not given),
    in the input dtype; ``out`` and ``lse`` are the forward's."""
    grad_out, query, key, value, out = (_last_dim_contiguous(t) for t in (grad_out, query, key, value, out))
    batch, _, _, _, heads, head_dim = query.shape
    has_bias, constant_pad = rel_pos_bias is not None, pad_key is not None
    plan = LaunchPlan.of(geometry, head_dim, has_bias, constant_pad)
    device, dtype = query.device, query.dtype

    grad_query = torch.empty(query.shape, dtype=dtype, device=device)
    grad_key = torch.empty(query.shape, dtype=dtype, device=device)
    grad_value = torch.empty(query.shape, dtype=dtype, device=device)
    grad_bias = torch.empty((heads, *geometry.bias_shape), dtype=dtype, device=device) if has_bias else None
    grad_pad_key = torch.empty((heads, head_dim), dtype=dtype, device=device) if constant_pad else None
    grad_pad_value = torch.empty((heads, head_dim), dtype=dtype, device=device) if constant_pad else None
    delta = torch.empty_like(lse)
    slots = heads * batch * plan.query_programs
    partials = torch.empty(slots * plan.slot_size, dtype=torch.float32, device=device) if plan.slot_size else None
    optional = (rel_pos_bias, pad_key, pad_value, partials, grad_bias, grad_pad_key, grad_pad_value)
    rel_pos_bias, pad_key, pad_value, partials_arg, grad_bias_arg, grad_pad_key_arg, grad_pad_value_arg = (
        _kernel_arg(t, query) for t in optional)

    with _device_guard(query):
        _launch(
            _backward_query_kernel, _backward_query_tuned, (plan.query_programs, heads, batch),
            query, key, value, out, grad_out, lse, delta, rel_pos_bias, pad_key, pad_value, grad_query, partials_arg,
            _strides(query), _strides(key), _strides(value), _strides(out), _strides(grad_out), _strides(grad_query),
            scale,
            **plan.constexprs,
        )
        _launch(
            _backward_key_kernel, _backward_key_tuned, (plan.key_programs, heads, batch),
            query, key, value, grad_out, lse, delta, rel_pos_bias, grad_key, grad_value, partials_arg,
            grad_bias_arg, grad_pad_key_arg, grad_pad_value_arg,
            _strides(query), _strides(key), _strides(value), _strides(grad_out), _strides(grad_key),
            _strides(grad_value),
            scale,
            **plan.constexprs,
        )
    return grad_query, grad_key, grad_value, grad_bias, grad_pad_key, grad_pad_value
