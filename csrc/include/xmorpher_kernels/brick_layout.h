// Layout of the "brick" tensor-core kernels of window cross attention (fp16/bf16): which tokens a
// thread block stages, where each lands in shared memory, which token each lane's fragments hold,
// and the fragment-order tables (bias, masks, pair validity). Host and device code: the CUDA
// kernels (window_attention_cuda_brick_*.cu) and the CPU emulator of those kernels
// (csrc/brick_emulator.cpp, whose debug functions return these tables to the tests) include this
// one header, so the CPU tests exercise the index arithmetic the GPU runs.
//
// The design, shared by the three tensor-core kernels (forward, and the backward's query and key
// passes):
//  * A "unit" is a window-shaped block of tokens on the n = 8 side of m16n8k16: a base window's
//    queries (forward, query pass) or an aligned window-sized block of keys (key pass). A unit
//    attends to a "box" of tokens of the other side, the m = 16 side, walked in 16-token tiles:
//    the key box of a window (search_size), or the query box of a key block (every query whose
//    key box can hold one of its keys: the search box around it, `key_pass_box`).
//  * A block owns a brick of units of one (batch, head) and stages the halo of their boxes in
//    shared memory once. Halo rows are addressed affinely, row(z, y, x) = z Sz + y Sy + x, with
//    Sy = box_x and Sz = box_x box_y (mod 8), so the rows of a box's 8 consecutive tokens are
//    distinct mod 8; with the 16-byte chunks of each row XOR-swizzled by row bits (`swizzle`),
//    every ldmatrix phase (8 rows, one chunk each) hits the 8 distinct 16-byte bank groups.
//  * Box token k of a unit lives at halo row unit_base + box_row(k): box_row is the same for every
//    unit, so each lane keeps its rows for all tiles in registers and adds the unit's base.
//  * Everything that depends only on (box token, unit slot) and not on the unit (the bias, the
//    validity of a pair, the tail of the last tile) is tabulated once per block in fragment
//    order: the bias table is the accumulator's start value of the score mma.
#pragma once

#include <cstdint>

#include "xmorpher_kernels/window_geometry.h"

namespace xmorpher_kernels {
namespace brick {

constexpr int kLanes = 32;
constexpr int kTileRows = 16;   // the m side of m16n8k16
constexpr int kTiles = 14;      // tiles per box: boxes of up to 224 tokens (search 6: 216 keys)
constexpr int kMaxSlots = 8;    // the n side: tokens per unit
constexpr int kMaxSearch = 10;  // per axis: key codes keep 10 bits per axis
constexpr int kMaxWarps = 8;
constexpr int kChunkBytes = 16;           // staged rows are head_dim / 8 chunks of 16 bytes
constexpr int64_t kSmemBudget = 113 * 1024;  // two blocks per SM on sm_90 (228 KiB, 1 KiB reserved each)
constexpr int kCodeBits = 10;             // bits per axis of a key code
// The second staged tensor starts this many bytes after the first, whatever the plan: a tile's
// two ldmatrix addresses are then one register and an immediate offset. 45 KiB holds the paper's
// 2 x 2 x 8-window halo at head_dim 16 (1434 rows of 32 bytes).
constexpr uint32_t kRegionBytes = 45 * 1024;

// Instruction budgets, per 16-token tile of a unit, of the kernels' hot loop (the loop over a
// warp's units, on its unmasked path, per-unit work included), head_dim 16. The SASS check
// (tests/test_brick_sass.py) counts them in the compiled kernels of every architecture. What a
// tile needs at least: forward 4 HMMA, 2 LDSM, 1 LDS, 4 FMNMX, 4 FFMA, 4 MUFU.EX2, 2 F2FP,
// 2 MOVM (23; the exponential unit takes 32 cycles a tile); query pass 4 HMMA, 3 LDSM, 1 LDS,
// 4 FFMA, 4 MUFU, 4 FMUL, 4 FADD, 2 F2FP, 2 MOVM (28); key pass 6 HMMA, 4 LDSM, 4 LDS, 4 FFMA,
// 4 MUFU, 4 FMUL, 4 F2FP, 4 MOVM (34). The rest: the zero halves of the A operands whose m side is
// the 8 unit slots (2 or 4 moves a tile), and per-unit work (addresses, operands, epilogue).
constexpr int kForwardBudget = 36;
constexpr int kQueryPassBudget = 44;
constexpr int kKeyPassBudget = 56;

// Which relation a box has to its unit.
enum class BoxKind : int {
  kKeysOfWindow = 0,     // forward and query pass: m = the window's key box, n = its queries
  kQueriesOfKeyBlock = 1  // key pass: m = the queries that see the key block, n = its keys
};

// ---------------------------------------------------------------------------------------------
// Small integer helpers (32-bit: every index below fits; the plan checks the sizes).

XK_HOST_DEVICE int floor_div_int(int a, int b) { return static_cast<int>(floor_div(a, b)); }

// The 16-byte chunk position of logical chunk `chunk` in staged row `row`, for rows of `chunks`
// chunks (even: head_dim is a multiple of 16). The XOR keeps a chunk inside its row and gives the
// 8 rows of any ldmatrix phase, distinct mod 8, 8 distinct bank groups:
//   chunks % 8 == 0: the row's low 3 bits;  % 4 == 0: bits 1..2;  else: bit 2.
XK_HOST_DEVICE int swizzle(int row, int chunks) {
  if (chunks % 8 == 0) return row & 7;
  if (chunks % 4 == 0) return (row >> 1) & 3;
  return (row >> 2) & 1;
}

// Byte offset of (row, chunk) in a region of staged rows.
XK_HOST_DEVICE uint32_t chunk_offset(int row, int chunk, int chunks) {
  return static_cast<uint32_t>(row * chunks + (chunk ^ swizzle(row, chunks))) * kChunkBytes;
}

// Smallest value >= at_least that is congruent to `residue` mod 8.
XK_HOST_DEVICE int round_up_congruent(int at_least, int residue) {
  const int r = ((residue % 8) + 8) % 8;
  return at_least + ((r - at_least % 8) + 8) % 8;
}

// ---------------------------------------------------------------------------------------------
// Fragment positions of m16n8k16 (PTX ISA, "Matrix fragments for mma.m16n8k16"), g = lane / 4,
// t = lane % 4:
//   C (16 x 8, fp32): element e of a lane is (row g + 8 (e / 2), column 2 t + e % 2).
//   ldmatrix.x4 addresses: lane l gives row l % 16, chunk l / 16 of the 16-row tile, so that
//   registers 0..3 are the A operand (rows x 16 columns) as they come (no .trans) and, with
//   .trans, the A operand of the transpose after swapping registers 1 and 2.

XK_HOST_DEVICE int c_row(int lane, int e) { return lane / 4 + 8 * (e / 2); }
XK_HOST_DEVICE int c_col(int lane, int e) { return 2 * (lane % 4) + (e % 2); }
XK_HOST_DEVICE int ldsm_row(int lane) { return lane % 16; }
XK_HOST_DEVICE int ldsm_chunk(int lane) { return lane / 16; }

// ---------------------------------------------------------------------------------------------
// Geometry of a box relation, per axis, in 32-bit.

struct Axis {
  int volume;   // tokens along the axis
  int window;   // unit size w
  int search;   // s
  int margin;   // l = (s - w) / 2
  int units;    // units (base windows) along the axis
  int box;      // box extent (tokens)
  int box_start;  // box origin relative to the unit origin (tokens): -l, or a multiple of -w
};

struct BoxGeometry {
  Axis axis[3];
  int slots;  // tokens per unit: w_d w_h w_w
  int box;    // tokens per box
  BoxKind kind;
};

// The queries that see an aligned key block (unit u, keys u w + r, r < w) per axis: windows
// u + first .. u + last, i.e. the query box [(u + first) w, (u + last + 1) w). A window W sees key
// j when W w - l <= j < W w - l + s.
XK_HOST_DEVICE void key_pass_windows(int w, int s, int l, int& first, int& last) {
  first = floor_div_int(0 + l - s, w) + 1;      // smallest over r of floor((r + l - s) / w) + 1
  last = floor_div_int(w - 1 + l, w);           // largest over r of floor((r + l) / w)
}

inline BoxGeometry box_geometry(const WindowGeometry& g, BoxKind kind) {
  BoxGeometry b{};
  b.kind = kind;
  b.slots = 1;
  b.box = 1;
  for (int i = 0; i < 3; ++i) {
    Axis& a = b.axis[i];
    a.volume = static_cast<int>(g.volume[i]);
    a.window = static_cast<int>(g.window[i]);
    a.search = static_cast<int>(g.search[i]);
    a.margin = static_cast<int>(left_margin(g, i));
    a.units = static_cast<int>(num_windows(g, i));
    if (kind == BoxKind::kKeysOfWindow) {
      a.box = a.search;
      a.box_start = -a.margin;
    } else {
      int first = 0, last = 0;
      key_pass_windows(a.window, a.search, a.margin, first, last);
      a.box = (last - first + 1) * a.window;
      a.box_start = first * a.window;
    }
    b.slots *= a.window;
    b.box *= a.box;
  }
  return b;
}

// Box token k -> per-axis coordinates inside the box (x fastest).
struct Coords {
  int z, y, x;
};
XK_HOST_DEVICE Coords box_coords(const BoxGeometry& b, int k) {
  Coords c;
  c.x = k % b.axis[2].box;
  c.y = (k / b.axis[2].box) % b.axis[1].box;
  c.z = k / (b.axis[2].box * b.axis[1].box);
  return c;
}
// Unit slot n -> per-axis coordinates inside the unit (x fastest).
XK_HOST_DEVICE Coords slot_coords(const BoxGeometry& b, int n) {
  Coords c;
  c.x = n % b.axis[2].window;
  c.y = (n / b.axis[2].window) % b.axis[1].window;
  c.z = n / (b.axis[2].window * b.axis[1].window);
  return c;
}

// The relation of (box token k, unit slot n), unit-independent: -1 when the pair takes no part
// (a tail token of the last tile, an empty slot, or, in the key pass, a query whose window does
// not see the key), else the flat index of the pair's bias entry in one head's (Ed, Eh, Ew) table.
XK_HOST_DEVICE int pair_bias_index(const BoxGeometry& b, const WindowGeometry& g, int k, int n) {
  if (k >= b.box || n >= b.slots) return -1;
  const Coords m = box_coords(b, k), s = slot_coords(b, n);
  const int mc[3] = {m.z, m.y, m.x}, sc[3] = {s.z, s.y, s.x};
  int key_in_box[3], query_in_window[3];
  for (int i = 0; i < 3; ++i) {
    const Axis& a = b.axis[i];
    if (b.kind == BoxKind::kKeysOfWindow) {
      key_in_box[i] = mc[i];
      query_in_window[i] = sc[i];
    } else {
      // Query q = box_start + mc (relative to the key block's origin), key r = sc.
      const int q = a.box_start + mc[i];
      const int window_offset = floor_div_int(q, a.window);
      query_in_window[i] = q - window_offset * a.window;
      key_in_box[i] = sc[i] - window_offset * a.window + a.margin;
      if (key_in_box[i] < 0 || key_in_box[i] >= a.search) return -1;
    }
  }
  return static_cast<int>(bias_key_part(g, key_in_box[0], key_in_box[1], key_in_box[2]) -
                          bias_query_part(g, query_in_window[0], query_in_window[1], query_in_window[2]));
}

// Forward and query pass, mask padding: a key's code has bit z, bit 10 + y and bit 20 + x set
// for its box coordinates; a window masks the key when the code meets the window's
// `outside_bits` (box coordinates outside the volume). Tail keys have code 0.
XK_HOST_DEVICE uint32_t key_code(const BoxGeometry& b, int k) {
  if (k >= b.box) return 0u;
  const Coords c = box_coords(b, k);
  return (1u << c.z) | (1u << (kCodeBits + c.y)) | (1u << (2 * kCodeBits + c.x));
}

// Box coordinates outside the volume of the unit at `unit` (unit indices per axis), as code bits:
// per axis, the box's first max(0, -start) positions and those from volume - start on.
XK_HOST_DEVICE uint32_t outside_bits(const BoxGeometry& b, const int (&unit)[3]) {
  uint32_t bits = 0;
  for (int i = 0; i < 3; ++i) {
    const Axis& a = b.axis[i];
    const int start = unit[i] * a.window + a.box_start;
    const uint32_t all = (1u << a.box) - 1u;
    const int below = start < 0 ? (-start < a.box ? -start : a.box) : 0;
    const int inside_end = a.volume - start;  // first box position at or past the volume's end
    const uint32_t above = inside_end < a.box ? all & ~((1u << (inside_end > 0 ? inside_end : 0)) - 1u) : 0u;
    bits |= (((1u << below) - 1u) | above) << (kCodeBits * i);
  }
  return bits;
}

// Linear position of the pair (box token m, slot n) in a fragment-order table of tiles x lanes x
// 4 elements: the C element (row m % 16, column n) of tile m / 16.
XK_HOST_DEVICE int fragment_position(int m, int n) {
  const int row = m % kTileRows;
  const int lane = (row % 8) * 4 + n / 2;
  const int element = 2 * (row / 8) + n % 2;
  return ((m / kTileRows) * kLanes + lane) * 4 + element;
}

// ---------------------------------------------------------------------------------------------
// The plan of one launch: brick, halo, shared-memory carve-up and the per-box-token tables.
// Host-built, passed to the kernels by value (about 2 KiB of parameters).

constexpr int kBoxTokens = kTiles * kTileRows;

struct BrickPlan {
  BoxGeometry box;
  int chunks;              // head_dim / 8
  int brick[3];            // units per brick per axis
  int bricks[3];           // bricks per axis
  int halo[3];             // staged tokens per axis: w (brick - 1) + box
  int stride_y, stride_z;  // halo row strides (x: 1)
  int rows;                // halo rows, gaps included
  int warps;               // warps per block
  int groups_x;            // warps along x: a warp takes units dx = its group + groups_x j
  int row_bytes;           // head_dim * 2
  int interior_lo[3], interior_hi[3];  // units whose box lies inside the volume, per axis
  // Byte offsets in shared memory.
  uint32_t a_offset;        // first staged tensor (key; query in the key pass)
  uint32_t b_offset;        // second staged tensor (value; grad_out in the key pass)
  uint32_t table_offset;    // score start values in fragment order: tiles x lanes x 4 floats
  uint32_t code_offset;     // tiles x lanes x 2 words: key codes (forward, query pass) or the
                            // rows of the lane's two C rows (key pass)
  uint32_t rowdata_offset;  // key pass: (lse log2(e), delta) per halo row
  uint32_t bytes;           // total
  int64_t blocks;           // batch x heads x bricks
  // Per box token m (tokens of the last tile's tail included) and per unit slot n:
  int16_t token_row[kBoxTokens];    // halo row relative to the unit's base row
  int16_t token_part[kBoxTokens];   // pair bias index = token_part[m] + slot_part[n]
  uint8_t token_slots[kBoxTokens];  // bit n: the pair (m, n) takes part
  uint32_t token_code[kBoxTokens];  // key code (forward, query pass)
  int16_t slot_part[kMaxSlots];
};

XK_HOST_DEVICE int ceil_div_int(int a, int b) { return (a + b - 1) / b; }

// Halo row of box token k relative to its unit's base row. Tokens of the last tile's tail take
// the row of a box token with the same residue mod 8 (their scores are -inf; rows stay
// conflict-free and finite).
inline int box_row(const BrickPlan& p, int k) {
  const int box = p.box.box;
  if (k >= box) k = box >= 8 ? k - 8 * ceil_div_int(k - box + 1, 8) : 0;
  const Coords c = box_coords(p.box, k);
  return c.z * p.stride_z + c.y * p.stride_y + c.x;
}

// Base halo row of the brick's unit (dz, dy, dx).
XK_HOST_DEVICE int unit_base_row(const BrickPlan& p, int dz, int dy, int dx) {
  return dz * p.box.axis[0].window * p.stride_z + dy * p.box.axis[1].window * p.stride_y + dx * p.box.axis[2].window;
}

// First halo token per axis of brick `brick_index`.
XK_HOST_DEVICE int halo_start(const BrickPlan& p, int axis, int brick_index) {
  const Axis& a = p.box.axis[axis];
  return brick_index * p.brick[axis] * a.window + a.box_start;
}

// How the score of pair (box token m, unit slot n) starts: a bias entry (`bias_index`), zero
// (an empty query slot of a window: finite scores nobody reads), or -inf (no pair: tail tokens,
// and in the key pass queries that do not see the key).
enum : int { kPairBias = 0, kPairZero = 1, kPairMasked = 2 };
XK_HOST_DEVICE int pair_entry(const BrickPlan& p, int m, int n, int& bias_index) {
  bias_index = p.token_part[m] + p.slot_part[n];
  if ((p.token_slots[m] >> n) & 1) return kPairBias;
  if (p.box.kind == BoxKind::kKeysOfWindow && m < p.box.box) return kPairZero;
  return kPairMasked;
}

// The plan of a brick of `brick` units for `head_dim`: sizes, the shared-memory carve-up and the
// per-token tables, whose pair relation is pair_bias_index's.
inline BrickPlan make_plan(const WindowGeometry& g, const BoxGeometry& box, int head_dim, const int (&brick)[3],
                           int64_t heads_batch) {
  BrickPlan p{};
  p.box = box;
  p.chunks = head_dim / 8;
  p.row_bytes = head_dim * 2;
  for (int i = 0; i < 3; ++i) {
    p.brick[i] = brick[i];
    p.bricks[i] = ceil_div_int(box.axis[i].units, brick[i]);
    p.halo[i] = box.axis[i].window * (brick[i] - 1) + box.axis[i].box;
  }
  const int bx = box.axis[2].box, by = box.axis[1].box;
  p.stride_y = round_up_congruent(p.halo[2], bx);
  p.stride_z = round_up_congruent((p.halo[1] - 1) * p.stride_y + p.halo[2], bx * by);
  p.rows = (p.halo[0] - 1) * p.stride_z + (p.halo[1] - 1) * p.stride_y + p.halo[2];
  p.groups_x = brick[2] < 4 ? brick[2] : 4;
  p.warps = brick[1] * p.groups_x;
  for (int i = 0; i < 3; ++i) {
    const Axis& a = box.axis[i];
    p.interior_lo[i] = ceil_div_int(-a.box_start, a.window);  // box_start <= 0
    p.interior_hi[i] = floor_div_int(a.volume - a.box - a.box_start, a.window);
  }
  p.a_offset = 0;
  p.b_offset = kRegionBytes;
  p.table_offset = 2 * kRegionBytes;
  p.code_offset = p.table_offset + kTiles * kLanes * 16;
  p.rowdata_offset = p.code_offset + kTiles * kLanes * 8;
  p.bytes = p.rowdata_offset + (box.kind == BoxKind::kQueriesOfKeyBlock ? static_cast<uint32_t>(p.rows) * 8u : 0u);
  p.blocks = heads_batch * p.bricks[0] * p.bricks[1] * p.bricks[2];

  const int estride[3] = {static_cast<int>(bias_extent(g, 1) * bias_extent(g, 2)), static_cast<int>(bias_extent(g, 2)), 1};
  for (int n = 0; n < kMaxSlots; ++n) {
    const Coords s = slot_coords(box, n);
    p.slot_part[n] = static_cast<int16_t>(
        box.kind == BoxKind::kKeysOfWindow ? -bias_query_part(g, s.z, s.y, s.x)
                                           : s.z * estride[0] + s.y * estride[1] + s.x * estride[2]);
  }
  for (int m = 0; m < kBoxTokens; ++m) {
    p.token_row[m] = static_cast<int16_t>(box_row(p, m));
    p.token_code[m] = key_code(box, m);
    p.token_part[m] = 0;
    p.token_slots[m] = 0;
    if (m >= box.box) continue;
    const Coords c = box_coords(box, m);
    const int mc[3] = {c.z, c.y, c.x};
    if (box.kind == BoxKind::kKeysOfWindow) {
      p.token_part[m] = static_cast<int16_t>(bias_key_part(g, c.z, c.y, c.x));
      p.token_slots[m] = static_cast<uint8_t>((1u << box.slots) - 1u);
      continue;
    }
    // Key pass: query q = box_start + mc (from the key block's origin) and key r pair when r lies
    // in the key box of q's window: 0 <= r - w floor(q / w) + l < s on every axis.
    int part = 0;
    uint32_t slots = 0;
    for (int i = 0; i < 3; ++i) {
      const Axis& a = box.axis[i];
      part += (-(a.box_start + mc[i]) + a.margin + a.window - 1) * estride[i];
    }
    for (int n = 0; n < box.slots; ++n) {
      const Coords s = slot_coords(box, n);
      const int sc[3] = {s.z, s.y, s.x};
      bool pairs = true;
      for (int i = 0; i < 3; ++i) {
        const Axis& a = box.axis[i];
        const int key_in_box = sc[i] - floor_div_int(a.box_start + mc[i], a.window) * a.window + a.margin;
        pairs = pairs && key_in_box >= 0 && key_in_box < a.search;
      }
      if (pairs) slots |= 1u << n;
    }
    p.token_part[m] = static_cast<int16_t>(part);
    p.token_slots[m] = static_cast<uint8_t>(slots);
  }
  return p;
}

// Why the brick kernels do not cover a call, or null when they do: head_dim 16 or 32 (wider rows
// would need more registers than the kernels keep spill-free: the box's scores, or the bias
// gradient in fragment order, stay in registers), windows of at most 8 tokens, boxes (both
// relations) of at most 14 tiles, searches of at most 10 per axis.
inline const char* not_covered(const WindowGeometry& g, int64_t head_dim) {
  if (!(head_dim == 16 || head_dim == 32)) return "head_dim is not 16 or 32";
  if (g.window[0] * g.window[1] * g.window[2] > kMaxSlots) return "windows of more than 8 tokens";
  for (int i = 0; i < 3; ++i) {
    if (g.search[i] > kMaxSearch) return "a search size above 10";
    if (g.volume[i] >= (int64_t{1} << 24)) return "a volume axis of 2^24 tokens or more";
  }
  for (BoxKind kind : {BoxKind::kKeysOfWindow, BoxKind::kQueriesOfKeyBlock})
    if (box_geometry(g, kind).box > kBoxTokens) return "boxes of more than 224 tokens";
  return nullptr;
}

// The plan of the largest brick whose shared memory fits `budget` bytes, else the one-unit brick
// if it fits `device_limit`; blocks == 0 when nothing fits (or a staged tensor's halo needs more
// than kRegionBytes).
// Bricks are at most 2 x 2 x 8 units (8 warps of up to 4 units each), cut to the volume.
inline BrickPlan choose_plan(const WindowGeometry& g, BoxKind kind, int64_t head_dim, int64_t heads_batch,
                             int64_t budget, int64_t device_limit) {
  const BoxGeometry box = box_geometry(g, kind);
  auto cap = [](int units, int most) {
    int size = 1;
    while (size < most && size < units) size *= 2;
    return size;
  };
  int brick[3] = {cap(box.axis[0].units, 2), cap(box.axis[1].units, 2), cap(box.axis[2].units, 8)};
  while (true) {
    BrickPlan p = make_plan(g, box, static_cast<int>(head_dim), brick, heads_batch);
    const bool small_rows = p.rows < (1 << 15) && static_cast<int64_t>(p.rows) * p.row_bytes <= kRegionBytes;
    if (small_rows && p.bytes <= budget) return p;
    if (brick[2] > 4) brick[2] /= 2;
    else if (brick[0] > 1) brick[0] /= 2;
    else if (brick[1] > 1) brick[1] /= 2;
    else if (brick[2] > 1) brick[2] /= 2;
    else {
      if (!small_rows || p.bytes > device_limit) p.blocks = 0;
      return p;
    }
  }
}

// Block index -> (batch, head, brick z, y, x), x fastest, as every kernel enumerates its work.
XK_HOST_DEVICE TaskCoords block_task(const BrickPlan& p, int64_t heads, int64_t block) {
  return split_task(block, heads, p.bricks[0], p.bricks[1], p.bricks[2]);
}

// Whether the box of the unit at `unit` lies inside the volume (outside_bits() is then 0).
XK_HOST_DEVICE bool unit_interior(const BrickPlan& p, const int (&unit)[3]) {
  bool inside = true;
  for (int i = 0; i < 3; ++i) inside = inside && unit[i] >= p.interior_lo[i] && unit[i] <= p.interior_hi[i];
  return inside;
}

// The units warp `warp` takes, in order: units (dz, dy, dx) of the brick with dy = warp / groups_x,
// dx = warp % groups_x + groups_x jx, for dz < brick_z, jx < brick_x / groups_x (jx fastest),
// stepped without divisions. Units one group apart along x share their base row mod 8 when
// w_x is even, so a warp keeps its tile rows from unit to unit.
struct UnitSteps {
  int count, per_column, groups_x, dy, gx;
  int dz = 0, jx = 0;

  XK_HOST_DEVICE UnitSteps(const BrickPlan& p, int warp)
      : count(p.brick[0] * (p.brick[2] / p.groups_x)),
        per_column(p.brick[2] / p.groups_x),
        groups_x(p.groups_x),
        dy(warp / p.groups_x),
        gx(warp % p.groups_x) {}
  XK_HOST_DEVICE int dx() const { return gx + groups_x * jx; }
  XK_HOST_DEVICE void next() {
    if (++jx == per_column) {
      jx = 0;
      ++dz;
    }
  }
};

}  // namespace brick
}  // namespace xmorpher_kernels
