// Bodies of the brick kernels of window cross attention (fp16/bf16 storage, fp32 accumulation),
// written once for the GPU (window_attention_cuda_brick_*.cu wrap them in __global__ functions)
// and for the CPU emulator (csrc/brick_emulator.cpp runs each CUDA thread as a fiber). Layout and
// tables: brick_layout.h; warp operations: brick_ops.h.
//
// Forward, per window (one warp; a block's warps share its staged key/value halo):
//   S^T = K Q^T, 16 keys x 8 queries per m16n8k16, all 14 tiles of the box kept in registers with
//   the bias table as the accumulators' start value; one max per query; P = exp2 of the scaled
//   scores; O^T += V^T P^T (P^T by movmatrix, V^T by ldmatrix.trans) and the row sums as the
//   product of an all-ones A with P^T. Windows whose box leaves the volume (mask padding) mask
//   their scores by key codes; interior windows do no masking.
// Backward, three launches, no atomics:
//   query pass (per window): S^T, dP^T = V dO^T, P from the saved log-sum-exp, dS, dQ^T += K^T dS^T,
//     the bias gradient summed in registers in fragment order, pad sums; per block the warps'
//     sums reduced in a fixed order into one row of partials; writes <dO, O> per query;
//   key pass (per aligned window-sized block of keys): the same scores seen from the keys, with
//     the query box staged (Q, dO, log-sum-exp, <dO, O>), dK^T += Q^T dS and dV^T += dO^T P,
//     written once in the output dtype;
//   reduce: the partial rows of each head summed in a fixed order, written in the output dtype.
#pragma once

#include <cmath>
#include <cstdint>

#include "xmorpher_kernels/attention_params.h"
#include "xmorpher_kernels/brick_layout.h"
#include "xmorpher_kernels/brick_ops.h"

namespace xmorpher_kernels {
namespace brick {

// The scores in the accumulators are acc = sign <q, k> + bias / |scale|, so that the exp2
// argument is log2_scale (acc - max acc): one FFMA per score, the bias the mma's start value.
struct ScoreScale {
  float log2_scale;  // |scale| log2(e)
  float inv_scale;   // 1 / |scale|
  float scale;       // the signed scale, for the gradients
  uint32_t sign;     // 0x80008000 when scale < 0: the B operand enters negated; else 0
};

inline ScoreScale score_scale(double scale) {
  const double magnitude = scale < 0 ? -scale : scale;
  return ScoreScale{static_cast<float>(magnitude * 1.4426950408889634), static_cast<float>(1.0 / magnitude),
                    static_cast<float>(scale), scale < 0 ? 0x80008000u : 0u};
}

// What the backward writes besides p.grad_query.
template <typename T>
struct BackwardOutputs {
  T* grad_key;          // contiguous (B, D, H, W, heads, head_dim), written by the key pass
  T* grad_value;
  float* delta;         // (B, heads, D, H, W): <dO, O>, written by the query pass
  float* partials;      // (query-pass blocks, partial_stride)
  int partial_stride;   // bias_entries + 2 head_dim with constant padding
  int bias_entries;     // per head; 0 without rel_pos_bias
  T* grad_bias;         // (heads, bias_entries), written by the reduction
  T* grad_pad_key;      // (heads, head_dim), constant padding
  T* grad_pad_value;
};

// A token of a unit: its coordinates, and whether it exists (inside the volume, a real slot).
struct Token {
  bool valid;
  int z, y, x;
};

XK_DEVICE Token unit_token(const BrickPlan& plan, const int (&unit)[3], const Coords& slot, int n) {
  const Axis* a = plan.box.axis;
  Token t;
  t.z = unit[0] * a[0].window + slot.z;
  t.y = unit[1] * a[1].window + slot.y;
  t.x = unit[2] * a[2].window + slot.x;
  t.valid = n < plan.box.slots && t.z < a[0].volume && t.y < a[1].volume && t.x < a[2].volume;
  return t;
}

XK_DEVICE int64_t voxel_of(const BrickPlan& plan, const Token& t) {
  const Axis* a = plan.box.axis;
  return (static_cast<int64_t>(t.z) * a[1].volume + t.y) * a[2].volume + t.x;
}

XK_DEVICE int64_t volume_voxels(const BrickPlan& plan) {
  const Axis* a = plan.box.axis;
  return static_cast<int64_t>(a[0].volume) * a[1].volume * a[2].volume;
}

// Stages the halo of a brick, two tensors of (B, D, H, W, heads, HD) at once (key and value, or
// query and grad_out), by cp.async of 16-byte chunks: the block's threads walk the halo's tokens
// in order (line (z, y), then x), one token (all its chunks, both tensors) per thread and step,
// stepping by the block size without integer divisions. Tokens outside the volume take the pad
// rows (constant padding) or zeros.
template <typename T, int HD>
XK_DEVICE void stage_rows(const BrickPlan& plan, uint32_t window, const T* a, const TokenStrides& as, const T* b,
                          const TokenStrides& bs, const T* pad_a, const T* pad_b, int64_t batch, int64_t head,
                          const int (&start)[3], int tid, int threads) {
  constexpr int kChunks = HD / 8;
  const Axis* axis = plan.box.axis;
  const int halo_x = plan.halo[2], halo_y = plan.halo[1], halo_z = plan.halo[0];
  const int step_lines = threads / halo_x, step_x = threads - step_lines * halo_x;
  int dx = tid % halo_x, ly = tid / halo_x, lz = 0;
  while (ly >= halo_y) {
    ly -= halo_y;
    ++lz;
  }
  const T* a_head = a + batch * as.batch + head * as.head;
  const T* b_head = b + batch * bs.batch + head * bs.head;
  const bool pad = pad_a != nullptr;
  const T* pad_a_row = pad ? pad_a + head * HD : a;
  const T* pad_b_row = pad ? pad_b + head * HD : b;
  const unsigned volume[3] = {static_cast<unsigned>(axis[0].volume), static_cast<unsigned>(axis[1].volume),
                              static_cast<unsigned>(axis[2].volume)};
  const uint32_t a_region = window + plan.a_offset, b_region = window + plan.b_offset;
  while (lz < halo_z) {
    const int z = start[0] + lz, y = start[1] + ly, x = start[2] + dx;
    const bool inside = static_cast<unsigned>(z) < volume[0] && static_cast<unsigned>(y) < volume[1] &&
                        static_cast<unsigned>(x) < volume[2];
    const int row = lz * plan.stride_z + ly * plan.stride_y + dx;
    const T* src_a = inside ? a_head + z * as.depth + y * as.height + x * as.width : pad_a_row;
    const T* src_b = inside ? b_head + z * bs.depth + y * bs.height + x * bs.width : pad_b_row;
XK_UNROLL
    for (int chunk = 0; chunk < kChunks; ++chunk) {
      const uint32_t dst = chunk_offset(row, chunk, kChunks);
      ops::cp_async_16(a_region + dst, src_a + chunk * 8, inside || pad);
      ops::cp_async_16(b_region + dst, src_b + chunk * 8, inside || pad);
    }
    dx += step_x;
    int lines = step_lines;
    if (dx >= halo_x) {
      dx -= halo_x;
      ++lines;
    }
    ly += lines;
    while (ly >= halo_y) {
      ly -= halo_y;
      ++lz;
    }
  }
}

// The fragment-order tables: the score start values (bias / |scale|, 0, or -inf) and, per lane
// and tile, the key codes of its two C rows (forward, query pass) or their halo rows in bytes of
// row data (key pass).
template <typename T>
XK_DEVICE void build_tables(const BrickPlan& plan, unsigned char* smem, const T* bias_head, float inv_scale, int tid,
                            int threads) {
  for (int e = tid; e < kTiles * kLanes; e += threads) {
    const int tile = e >> 5, lane = e & 31;
    float v[4];
XK_UNROLL
    for (int i = 0; i < 4; ++i) {
      int index = 0;
      const int kind = pair_entry(plan, tile * kTileRows + c_row(lane, i), c_col(lane, i), index);
      v[i] = kind == kPairMasked ? -INFINITY
             : kind == kPairBias && bias_head != nullptr ? ops::to_float<T>(bias_head[index]) * inv_scale
                                                          : 0.f;
    }
    ops::st_shared_f4(smem, plan.table_offset + e * 16, F4{v[0], v[1], v[2], v[3]});
    const int m = tile * kTileRows + lane / 4;
    const U2 rows = plan.box.kind == BoxKind::kKeysOfWindow
                        ? U2{plan.token_code[m], plan.token_code[m + 8]}
                        : U2{static_cast<uint32_t>(plan.token_row[m]) * 8u, static_cast<uint32_t>(plan.token_row[m + 8]) * 8u};
    ops::st_shared_u2(smem, plan.code_offset + e * 8, rows);
  }
}

// The block's first unit per axis and its halo's first token.
struct BrickOrigin {
  TaskCoords task;
  int first_unit[3];
  int start[3];
};

XK_DEVICE BrickOrigin brick_origin(const BrickPlan& plan, int64_t heads) {
  BrickOrigin o;
  o.task = block_task(plan, heads, ops::block_index());
  const int brick_index[3] = {static_cast<int>(o.task.z), static_cast<int>(o.task.y), static_cast<int>(o.task.x)};
  for (int i = 0; i < 3; ++i) {
    o.first_unit[i] = brick_index[i] * plan.brick[i];
    o.start[i] = halo_start(plan, i, brick_index[i]);
  }
  return o;
}

// Per-lane strides of the fragment-order tables between consecutive tiles.
constexpr uint32_t kTableTile = kLanes * 16;  // score start values: 4 floats per lane
constexpr uint32_t kCodeTile = kLanes * 8;    // key codes / C rows: 2 words per lane

// A warp's ldmatrix addresses: for every tile, the shared-window address its lane gives for the
// current unit's first staged tensor (the second is kRegionBytes further). From unit to unit they
// move by the base rows' difference when it is a multiple of 8 (the swizzle depends on row mod 8),
// else are recomputed.
template <int kChunks>
struct TileRows {
  uint32_t address[kTiles] = {};
  uint32_t window = 0;  // of the block's dynamic shared memory; the staged tensors start at a_offset
  int base = 0;
  bool valid = false;

  XK_DEVICE void move_to(const BrickPlan& plan, uint32_t smem_window, int unit_base, int lane) {
    if (valid && ((unit_base - base) & 7) == 0) {
      const uint32_t shift = static_cast<uint32_t>(unit_base - base) * static_cast<uint32_t>(kChunks * kChunkBytes);
XK_UNROLL
      for (int tile = 0; tile < kTiles; ++tile) address[tile] += shift;
    } else {
      window = smem_window + plan.a_offset;
XK_UNROLL
      for (int tile = 0; tile < kTiles; ++tile)
        address[tile] = window + chunk_offset(unit_base + plan.token_row[tile * kTileRows + ldsm_row(lane)],
                                              ldsm_chunk(lane), kChunks);
    }
    valid = true;
    base = unit_base;
  }

  // The address of tile `tile`'s 16-dim k-step (or pair of 8-dim n-tiles) ks in the first (second)
  // staged tensor: its chunks are those of k-step 0 XOR 2 ks, the byte offset in the region XOR
  // 32 ks (rows are a power-of-two number of chunks long).
  XK_DEVICE uint32_t first(int tile, int ks) const {
    return ks == 0 ? address[tile] : window + ((address[tile] - window) ^ (32u * ks));
  }
  XK_DEVICE uint32_t second(int tile, int ks) const { return first(tile, ks) + kRegionBytes; }
};

XK_DEVICE bool unit_exists(const BrickPlan& plan, const int (&unit)[3]) {
  return unit[0] < plan.box.axis[0].units && unit[1] < plan.box.axis[1].units && unit[2] < plan.box.axis[2].units;
}

XK_DEVICE int64_t bias_entries_per_head(const WindowGeometry& g) {
  return bias_extent(g, 0) * bias_extent(g, 1) * bias_extent(g, 2);
}

// Loads the B operand (k = head dim, n = unit slot) of a token row: the lane's two pairs of
// entries per 16-dim k-step, XORed with `sign` (0 or a negation), zero for an absent token.
template <typename T, int HD>
XK_DEVICE void load_b_operand(const T* row, int quad, uint32_t sign, uint32_t (&frag)[HD / 16][2]) {
XK_UNROLL
  for (int ks = 0; ks < HD / 16; ++ks) {
    frag[ks][0] = row != nullptr ? ops::load_u32(row + ks * 16 + 2 * quad) ^ sign : 0u;
    frag[ks][1] = row != nullptr ? ops::load_u32(row + ks * 16 + 8 + 2 * quad) ^ sign : 0u;
  }
}

// Stores row `group` of an accumulated (unit slot x head dim) C fragment, scaled: lane (g, t)
// holds columns nt 8 + 2t, +1 of row g in acc[nt][0..1] (rows 8..15 are the unused half).
template <typename T, int HD>
XK_DEVICE void store_rows(T* row, const float (&acc)[HD / 8][4], float scale, int quad) {
  if (row == nullptr) return;
XK_UNROLL
  for (int nt = 0; nt < HD / 8; ++nt)
    ops::store_u32(row + nt * 8 + 2 * quad, ops::pack2<T>(acc[nt][0] * scale, acc[nt][1] * scale));
}

// ----------------------------------------------------------------------------------- forward

template <typename T, int HD>
XK_DEVICE void forward_block(const AttentionParams<T, float>& p, const BrickPlan& plan, const ScoreScale& sc,
                             unsigned char* smem) {
  constexpr int kChunks = HD / 8;
  constexpr int kSteps = HD / 16;
  const int tid = ops::thread_index(), threads = ops::block_threads();
  const int lane = tid & 31, warp = tid >> 5, group = lane >> 2, quad = lane & 3;
  const uint32_t window = ops::smem_window(smem);
  const BrickOrigin origin = brick_origin(plan, p.heads);
  const int64_t b = origin.task.b, h = origin.task.h;
  stage_rows<T, HD>(plan, window, p.key, p.key_strides, p.value, p.value_strides, p.pad_key, p.pad_value, b, h,
                    origin.start, tid, threads);
  build_tables<T>(plan, smem, p.rel_pos_bias != nullptr ? p.rel_pos_bias + h * bias_entries_per_head(p.geometry) : nullptr,
                  sc.inv_scale, tid, threads);
  ops::cp_async_wait_all();
  ops::sync_block();

  const bool mask_padding = p.pad_key == nullptr;
  const int64_t voxels = volume_voxels(plan);
  const Coords slot = slot_coords(plan.box, group);  // the lane's query: Q^T's column, O's row
  const unsigned char* table = smem + plan.table_offset + lane * 16;  // tile t at t kTableTile
  const unsigned char* codes = smem + plan.code_offset + lane * 8;
  const uint32_t one = ops::packed_ones<T>();
  const float c = sc.log2_scale;
  TileRows<kChunks> rows;
  UnitSteps steps(plan, warp);
  for (int j = 0; j < steps.count; ++j, steps.next()) {
    const int unit[3] = {origin.first_unit[0] + steps.dz, origin.first_unit[1] + steps.dy,
                         origin.first_unit[2] + steps.dx()};
    if (!unit_exists(plan, unit)) continue;  // warp-uniform
    rows.move_to(plan, window, unit_base_row(plan, steps.dz, steps.dy, steps.dx()), lane);
    const Token token = unit_token(plan, unit, slot, group);
    uint32_t qf[kSteps][2];
    load_b_operand<T, HD>(token.valid ? p.query + p.query_strides.offset(b, token.z, token.y, token.x, h) : nullptr,
                          quad, sc.sign, qf);

    // Scores of the whole box: S^T tiles (rows = keys, columns = the window's queries).
    float acc[kTiles][4];
XK_UNROLL
    for (int tile = 0; tile < kTiles; ++tile) {
      const F4 start = ops::ld_shared_f4(table, tile * kTableTile);
      acc[tile][0] = start.x;
      acc[tile][1] = start.y;
      acc[tile][2] = start.z;
      acc[tile][3] = start.w;
XK_UNROLL
      for (int ks = 0; ks < kSteps; ++ks) {
        uint32_t a[4];
        ops::ldsm_x4(a, rows.first(tile, ks));
        ops::mma<T>(acc[tile], a, qf[ks][0], qf[ks][1]);
      }
    }
    if (mask_padding && !unit_interior(plan, unit)) {
      const uint32_t outside = outside_bits(plan.box, unit);
      if (outside != 0) {  // warp-uniform: only windows whose box leaves the volume
XK_UNROLL
        for (int tile = 0; tile < kTiles; ++tile) {
          const U2 code = ops::ld_shared_u2(codes, tile * kCodeTile);
          if (code.x & outside) acc[tile][0] = acc[tile][1] = -INFINITY;
          if (code.y & outside) acc[tile][2] = acc[tile][3] = -INFINITY;
        }
      }
    }

    // One max per query column: the lane's keys, then the 8 lanes of the column.
    float top[2] = {fmaxf(acc[0][0], acc[0][2]), fmaxf(acc[0][1], acc[0][3])};
XK_UNROLL
    for (int tile = 1; tile < kTiles; ++tile) {
      top[0] = fmaxf(top[0], fmaxf(acc[tile][0], acc[tile][2]));
      top[1] = fmaxf(top[1], fmaxf(acc[tile][1], acc[tile][3]));
    }
    float neg_max[2];
XK_UNROLL
    for (int col = 0; col < 2; ++col) {
      float m = top[col];
      m = fmaxf(m, ops::shfl_xor(m, 4));
      m = fmaxf(m, ops::shfl_xor(m, 8));
      m = fmaxf(m, ops::shfl_xor(m, 16));
      neg_max[col] = -m * c;
    }

    // P = exp2(c acc - c max), as the A operand (rows = queries, 8 of 16 used) by movmatrix;
    // O += P V with V by ldmatrix.trans as B, and P's row sums as P times ones.
    float o[2 * kSteps][4] = {};
    float sum[4] = {0.f, 0.f, 0.f, 0.f};
XK_UNROLL
    for (int tile = 0; tile < kTiles; ++tile) {
      const float p0 = ops::ex2(fmaf(acc[tile][0], c, neg_max[0]));
      const float p1 = ops::ex2(fmaf(acc[tile][1], c, neg_max[1]));
      const float p2 = ops::ex2(fmaf(acc[tile][2], c, neg_max[0]));
      const float p3 = ops::ex2(fmaf(acc[tile][3], c, neg_max[1]));
      const uint32_t pa[4] = {ops::movm_trans(ops::pack2<T>(p0, p1)), 0u, ops::movm_trans(ops::pack2<T>(p2, p3)), 0u};
XK_UNROLL
      for (int ks = 0; ks < kSteps; ++ks) {
        uint32_t v[4];
        ops::ldsm_x4_trans(v, rows.second(tile, ks));
        ops::mma<T>(o[2 * ks], pa, v[0], v[1]);
        ops::mma<T>(o[2 * ks + 1], pa, v[2], v[3]);
      }
      ops::mma<T>(sum, pa, one, one);
    }

    // Row `group` of O (query `group`), normalized; its log-sum-exp from the max of its column.
    const float inv = ops::rcp(sum[0]);
    T* out_row = token.valid ? p.out + ((b * voxels + voxel_of(plan, token)) * p.heads + h) * HD : nullptr;
    store_rows<T, HD>(out_row, o, inv, quad);
    const float max_even = ops::shfl_idx(neg_max[0], group >> 1), max_odd = ops::shfl_idx(neg_max[1], group >> 1);
    if (quad == 0 && token.valid)
      p.lse[(b * p.heads + h) * voxels + voxel_of(plan, token)] = (ops::lg2(sum[0]) - ((group & 1) ? max_odd : max_even)) * kLn2;
  }
}

// ------------------------------------------------------------------------- backward: query pass

// The tiles of one window in the query pass. kBorder: the window's box leaves the volume, so its
// outside keys are masked (mask padding) or summed into the pad gradients (constant padding).
template <typename T, int HD, bool kBorder>
XK_DEVICE void query_pass_tiles(const unsigned char* table, const unsigned char* codes,
                                const TileRows<HD / 8>& rows, const uint32_t (&qf)[HD / 16][2],
                                const uint32_t (&gf)[HD / 16][2], const float (&neg_lse)[2],
                                const float (&neg_delta)[4], float c, uint32_t outside, bool constant_padding,
                                float (&bias_acc)[kTiles][4], float (&dq)[HD / 8][4], float (&pad_ds)[2],
                                float (&pad_prob)[2]) {
  constexpr int kSteps = HD / 16;
XK_UNROLL
  for (int tile = 0; tile < kTiles; ++tile) {
    // S^T and dP^T tiles (rows = keys, columns = queries); dP^T starts at -<dO, O> of its column
    // (neg_delta: -delta of columns 2t, 2t + 1, twice), so that dS = P dP.
    const F4 start = ops::ld_shared_f4(table, tile * kTableTile);
    float s[4] = {start.x, start.y, start.z, start.w};
    float dp[4];
XK_UNROLL
    for (int ks = 0; ks < kSteps; ++ks) {
      uint32_t a[4];
      ops::ldsm_x4(a, rows.first(tile, ks));
      ops::mma<T>(s, a, qf[ks][0], qf[ks][1]);
      ops::ldsm_x4(a, rows.second(tile, ks));
      if (ks == 0) {
        ops::mma_from<T>(dp, a, gf[ks][0], gf[ks][1], neg_delta);
      } else {
        ops::mma<T>(dp, a, gf[ks][0], gf[ks][1]);
      }
    }
    bool outside_key[2] = {false, false};
    if constexpr (kBorder) {
      const U2 code = ops::ld_shared_u2(codes, tile * kCodeTile);
      outside_key[0] = (code.x & outside) != 0;
      outside_key[1] = (code.y & outside) != 0;
      if (!constant_padding) {
        if (outside_key[0]) s[0] = s[1] = -INFINITY;
        if (outside_key[1]) s[2] = s[3] = -INFINITY;
      }
    }
    float prob[4], ds[4];
XK_UNROLL
    for (int e = 0; e < 4; ++e) {
      prob[e] = ops::ex2(fmaf(s[e], c, neg_lse[e & 1]));
      ds[e] = prob[e] * dp[e];
      bias_acc[tile][e] += ds[e];
    }
    if constexpr (kBorder) {
      if (constant_padding) {
XK_UNROLL
        for (int e = 0; e < 4; ++e) {
          if (outside_key[e >> 1]) {
            pad_ds[e & 1] += ds[e];
            pad_prob[e & 1] += prob[e];
          }
        }
      }
    }
    // dS as the A operand (rows = queries, 8 of 16 used); dQ += dS K, K by ldmatrix.trans as B.
    const uint32_t da[4] = {ops::movm_trans(ops::pack2<T>(ds[0], ds[1])), 0u,
                            ops::movm_trans(ops::pack2<T>(ds[2], ds[3])), 0u};
XK_UNROLL
    for (int ks = 0; ks < kSteps; ++ks) {
      uint32_t k[4];
      ops::ldsm_x4_trans(k, rows.first(tile, ks));
      ops::mma<T>(dq[2 * ks], da, k[0], k[1]);
      ops::mma<T>(dq[2 * ks + 1], da, k[2], k[3]);
    }
  }
}

template <typename T, int HD>
XK_DEVICE void query_pass_block(const AttentionParams<T, float>& p, const BrickPlan& plan, const ScoreScale& sc,
                                const BackwardOutputs<T>& outs, unsigned char* smem) {
  constexpr int kChunks = HD / 8;
  constexpr int kSteps = HD / 16;
  const int tid = ops::thread_index(), threads = ops::block_threads();
  const int lane = tid & 31, warp = tid >> 5, group = lane >> 2, quad = lane & 3;
  const uint32_t window = ops::smem_window(smem);
  const BrickOrigin origin = brick_origin(plan, p.heads);
  const int64_t b = origin.task.b, h = origin.task.h;
  stage_rows<T, HD>(plan, window, p.key, p.key_strides, p.value, p.value_strides, p.pad_key, p.pad_value, b, h,
                    origin.start, tid, threads);
  build_tables<T>(plan, smem, p.rel_pos_bias != nullptr ? p.rel_pos_bias + h * bias_entries_per_head(p.geometry) : nullptr,
                  sc.inv_scale, tid, threads);
  ops::cp_async_wait_all();
  ops::sync_block();

  const bool constant_padding = p.pad_key != nullptr;
  const int64_t voxels = volume_voxels(plan);
  const int64_t head_queries = (b * p.heads + h) * voxels;  // lse and delta of (b, h) start here
  const Coords slot = slot_coords(plan.box, group);  // the lane's query: Q^T's column, dQ's row
  const unsigned char* table = smem + plan.table_offset + lane * 16;  // tile t at t kTableTile
  const unsigned char* codes = smem + plan.code_offset + lane * 8;
  const float c = sc.log2_scale;
  float bias_acc[kTiles][4] = {};
  float pad_key_acc[kChunks] = {}, pad_value_acc[kChunks] = {};
  TileRows<kChunks> rows;
  UnitSteps steps(plan, warp);
  for (int j = 0; j < steps.count; ++j, steps.next()) {
    const int unit[3] = {origin.first_unit[0] + steps.dz, origin.first_unit[1] + steps.dy,
                         origin.first_unit[2] + steps.dx()};
    if (!unit_exists(plan, unit)) continue;  // warp-uniform
    rows.move_to(plan, window, unit_base_row(plan, steps.dz, steps.dy, steps.dx()), lane);

    // Query `group`: Q^T and dO^T as B operands, and <dO, O>.
    const Token token = unit_token(plan, unit, slot, group);
    const T* q_row = token.valid ? p.query + p.query_strides.offset(b, token.z, token.y, token.x, h) : nullptr;
    const T* g_row = token.valid ? p.grad_out + p.grad_out_strides.offset(b, token.z, token.y, token.x, h) : nullptr;
    const int64_t voxel = token.valid ? voxel_of(plan, token) : 0;
    uint32_t qf[kSteps][2], gf[kSteps][2];
    load_b_operand<T, HD>(q_row, quad, sc.sign, qf);
    load_b_operand<T, HD>(g_row, quad, 0u, gf);
    float delta_row = 0.f;
    if (token.valid) {
      const T* o_row = p.out + ((b * voxels + voxel) * p.heads + h) * HD;
XK_UNROLL
      for (int ks = 0; ks < kSteps; ++ks) {
XK_UNROLL
        for (int half = 0; half < 2; ++half) {
          const F2 ov = ops::unpack2<T>(ops::load_u32(o_row + ks * 16 + 8 * half + 2 * quad));
          const F2 gv = ops::unpack2<T>(gf[ks][half]);
          delta_row += gv.x * ov.x + gv.y * ov.y;
        }
      }
    }
    delta_row += ops::shfl_xor(delta_row, 1);
    delta_row += ops::shfl_xor(delta_row, 2);
    const float neg_lse_row = token.valid ? -p.lse[head_queries + voxel] * kLog2e : -INFINITY;
    if (quad == 0 && token.valid) outs.delta[head_queries + voxel] = delta_row;
    // The lane's C columns (queries 2t, 2t + 1): their -log2(e) lse (-inf for an absent query,
    // whose probabilities are then 0) and <dO, O>, from the lanes whose row they are.
    float neg_lse[2], neg_delta[4];
XK_UNROLL
    for (int col = 0; col < 2; ++col) {
      neg_lse[col] = ops::shfl_idx(neg_lse_row, (2 * quad + col) * 4);
      neg_delta[col] = neg_delta[col + 2] = -ops::shfl_idx(delta_row, (2 * quad + col) * 4);
    }

    float dq[2 * kSteps][4] = {};
    float pad_ds[2] = {0.f, 0.f}, pad_prob[2] = {0.f, 0.f};
    const uint32_t outside = unit_interior(plan, unit) ? 0u : outside_bits(plan.box, unit);
    if (outside == 0) {
      query_pass_tiles<T, HD, false>(table, codes, rows, qf, gf, neg_lse, neg_delta, c, 0u, constant_padding,
                                     bias_acc, dq, pad_ds, pad_prob);
    } else {
      query_pass_tiles<T, HD, true>(table, codes, rows, qf, gf, neg_lse, neg_delta, c, outside, constant_padding,
                                    bias_acc, dq, pad_ds, pad_prob);
    }
    store_rows<T, HD>(token.valid ? p.grad_query + ((b * voxels + voxel) * p.heads + h) * HD : nullptr, dq, sc.scale,
                      quad);

    if (constant_padding && outside != 0) {  // warp-uniform
      // Per column: the sums over the pad keys (8 lanes hold parts); then, summed over the 8
      // queries, pad_ds Q and pad_prob dO at dim nt 8 + group: the lane's 2 queries, then the
      // 4 lanes of the group.
XK_UNROLL
      for (int col = 0; col < 2; ++col) {
XK_UNROLL
        for (int offset = 4; offset < 32; offset <<= 1) {
          pad_ds[col] += ops::shfl_xor(pad_ds[col], offset);
          pad_prob[col] += ops::shfl_xor(pad_prob[col], offset);
        }
      }
      const T* qc[2] = {nullptr, nullptr};
      const T* gc[2] = {nullptr, nullptr};
XK_UNROLL
      for (int col = 0; col < 2; ++col) {
        const Token tc = unit_token(plan, unit, slot_coords(plan.box, 2 * quad + col), 2 * quad + col);
        if (tc.valid) {
          qc[col] = p.query + p.query_strides.offset(b, tc.z, tc.y, tc.x, h);
          gc[col] = p.grad_out + p.grad_out_strides.offset(b, tc.z, tc.y, tc.x, h);
        }
      }
XK_UNROLL
      for (int nt = 0; nt < kChunks; ++nt) {
        const int dim = nt * 8 + group;
        float key_part = 0.f, value_part = 0.f;
XK_UNROLL
        for (int col = 0; col < 2; ++col) {
          if (qc[col] != nullptr) {
            key_part += pad_ds[col] * ops::unpack2<T>(ops::load_u16(qc[col] + dim)).x;
            value_part += pad_prob[col] * ops::unpack2<T>(ops::load_u16(gc[col] + dim)).x;
          }
        }
        key_part += ops::shfl_xor(key_part, 1);
        key_part += ops::shfl_xor(key_part, 2);
        value_part += ops::shfl_xor(value_part, 1);
        value_part += ops::shfl_xor(value_part, 2);
        pad_key_acc[nt] += key_part;
        pad_value_acc[nt] += value_part;
      }
    }
  }

  if (outs.partial_stride == 0) return;  // block-uniform
  // The warps' sums into one row of partials, in a fixed order, in the shared memory the staged
  // rows no longer need: the warps' fragment-order tables, summed over warps; then, one slot n at a
  // time (for a fixed slot, distinct keys have distinct bias entries: no two threads add to one
  // entry), each pair's sum added to its bias entry; the pad sums likewise over warps.
  ops::sync_block();
  constexpr uint32_t kWarpTable = kTiles * kLanes * 16;
  const uint32_t pad_base = static_cast<uint32_t>(plan.warps) * kWarpTable;
  const uint32_t entry_base = pad_base + static_cast<uint32_t>(plan.warps) * 2 * HD * 4;
XK_UNROLL
  for (int tile = 0; tile < kTiles; ++tile)
    ops::st_shared_f4(smem, warp * kWarpTable + tile * kTableTile + lane * 16,
                      F4{bias_acc[tile][0], bias_acc[tile][1], bias_acc[tile][2], bias_acc[tile][3]});
  if (quad == 0) {
XK_UNROLL
    for (int nt = 0; nt < kChunks; ++nt) {
      ops::st_shared_f32(smem, pad_base + ((warp * 2) * HD + nt * 8 + group) * 4, pad_key_acc[nt] * sc.scale);
      ops::st_shared_f32(smem, pad_base + ((warp * 2 + 1) * HD + nt * 8 + group) * 4, pad_value_acc[nt]);
    }
  }
  for (int e = tid; e < outs.bias_entries; e += threads) ops::st_shared_f32(smem, entry_base + e * 4, 0.f);
  ops::sync_block();
  for (int i = tid; i < kTiles * kLanes * 4; i += threads) {  // the warps' tables summed into warp 0's
    float total = 0.f;
    for (int w = 0; w < plan.warps; ++w) total += ops::ld_shared_f32(smem, w * kWarpTable + i * 4);
    ops::st_shared_f32(smem, i * 4, total);
  }
  if (outs.bias_entries > 0) {
    for (int n = 0; n < plan.box.slots; ++n) {
      ops::sync_block();
      for (int m = tid; m < plan.box.box; m += threads) {
        const uint32_t entry = entry_base + (plan.token_part[m] + plan.slot_part[n]) * 4;
        ops::st_shared_f32(smem, entry,
                           ops::ld_shared_f32(smem, entry) + ops::ld_shared_f32(smem, fragment_position(m, n) * 4));
      }
    }
  }
  ops::sync_block();
  float* partial_row = outs.partials + ops::block_index() * outs.partial_stride;
  for (int e = tid; e < outs.partial_stride; e += threads) {
    float total = 0.f;
    if (e < outs.bias_entries) {
      total = ops::ld_shared_f32(smem, entry_base + e * 4);
    } else {
      const int k = e - outs.bias_entries;  // pad_key dims, then pad_value dims
      for (int w = 0; w < plan.warps; ++w) total += ops::ld_shared_f32(smem, pad_base + (w * 2 * HD + k) * 4);
    }
    partial_row[e] = total;
  }
}

// --------------------------------------------------------------------------- backward: key pass

template <typename T, int HD>
XK_DEVICE void key_pass_block(const AttentionParams<T, float>& p, const BrickPlan& plan, const ScoreScale& sc,
                              const BackwardOutputs<T>& outs, unsigned char* smem) {
  constexpr int kChunks = HD / 8;
  constexpr int kSteps = HD / 16;
  const int tid = ops::thread_index(), threads = ops::block_threads();
  const int lane = tid & 31, warp = tid >> 5, group = lane >> 2, quad = lane & 3;
  const uint32_t window = ops::smem_window(smem);
  const BrickOrigin origin = brick_origin(plan, p.heads);
  const int64_t b = origin.task.b, h = origin.task.h;
  const Axis* axis = plan.box.axis;
  const int64_t voxels = volume_voxels(plan);
  const int64_t head_queries = (b * p.heads + h) * voxels;
  // The query halo: Q and dO rows (zeros outside the volume), and per row the log2(e)-scaled
  // lse (+inf outside: no probability) and -<dO, O>.
  stage_rows<T, HD>(plan, window, p.query, p.query_strides, p.grad_out, p.grad_out_strides, nullptr, nullptr, b, h,
                    origin.start, tid, threads);
  {
    int lz = 0, ly = warp;
    while (ly >= plan.halo[1]) {
      ly -= plan.halo[1];
      ++lz;
    }
    while (lz < plan.halo[0]) {
      const int z = origin.start[0] + lz, y = origin.start[1] + ly;
      const bool line_inside = z >= 0 && z < axis[0].volume && y >= 0 && y < axis[1].volume;
      for (int dx = lane; dx < plan.halo[2]; dx += 32) {
        const int x = origin.start[2] + dx;
        F2 data{INFINITY, 0.f};
        if (line_inside && x >= 0 && x < axis[2].volume) {
          const int64_t voxel = (static_cast<int64_t>(z) * axis[1].volume + y) * axis[2].volume + x;
          data = F2{p.lse[head_queries + voxel] * kLog2e, -outs.delta[head_queries + voxel]};
        }
        ops::st_shared_f2(smem, plan.rowdata_offset + (lz * plan.stride_z + ly * plan.stride_y + dx) * 8, data);
      }
      ly += threads >> 5;
      while (ly >= plan.halo[1]) {
        ly -= plan.halo[1];
        ++lz;
      }
    }
  }
  build_tables<T>(plan, smem, p.rel_pos_bias != nullptr ? p.rel_pos_bias + h * bias_entries_per_head(p.geometry) : nullptr,
                  sc.inv_scale, tid, threads);
  ops::cp_async_wait_all();
  ops::sync_block();

  const Coords slot = slot_coords(plan.box, group);  // the lane's key: K^T's column, dK's row
  const unsigned char* table = smem + plan.table_offset + lane * 16;  // tile t at t kTableTile
  const unsigned char* c_rows_table = smem + plan.code_offset + lane * 8;
  const float c = sc.log2_scale;
  TileRows<kChunks> rows;
  UnitSteps steps(plan, warp);
  for (int j = 0; j < steps.count; ++j, steps.next()) {
    const int unit[3] = {origin.first_unit[0] + steps.dz, origin.first_unit[1] + steps.dy,
                         origin.first_unit[2] + steps.dx()};
    if (!unit_exists(plan, unit)) continue;  // warp-uniform
    const int base = unit_base_row(plan, steps.dz, steps.dy, steps.dx());
    rows.move_to(plan, window, base, lane);
    const unsigned char* rowdata = smem + plan.rowdata_offset + static_cast<uint32_t>(base) * 8u;

    // Key `group` of the block: K^T and V^T as B operands.
    const Token token = unit_token(plan, unit, slot, group);
    uint32_t kf[kSteps][2], vf[kSteps][2];
    load_b_operand<T, HD>(token.valid ? p.key + p.key_strides.offset(b, token.z, token.y, token.x, h) : nullptr, quad,
                          sc.sign, kf);
    load_b_operand<T, HD>(token.valid ? p.value + p.value_strides.offset(b, token.z, token.y, token.x, h) : nullptr,
                          quad, 0u, vf);

    float dk[2 * kSteps][4] = {}, dv[2 * kSteps][4] = {};
XK_UNROLL
    for (int tile = 0; tile < kTiles; ++tile) {
      // S and dP tiles (rows = the box's queries, columns = the block's keys); dP starts at
      // -<dO, O> of its row (staged negated), so that dS = P dP.
      const U2 c_rows = ops::ld_shared_u2(c_rows_table, tile * kCodeTile);
      const F2 q0 = ops::ld_shared_f2(rowdata, c_rows.x), q1 = ops::ld_shared_f2(rowdata, c_rows.y);
      const F4 start = ops::ld_shared_f4(table, tile * kTableTile);
      float s[4] = {start.x, start.y, start.z, start.w};
      float dp[4] = {q0.y, q0.y, q1.y, q1.y};
XK_UNROLL
      for (int ks = 0; ks < kSteps; ++ks) {
        uint32_t a[4];
        ops::ldsm_x4(a, rows.first(tile, ks));
        ops::mma<T>(s, a, kf[ks][0], kf[ks][1]);
        ops::ldsm_x4(a, rows.second(tile, ks));
        ops::mma<T>(dp, a, vf[ks][0], vf[ks][1]);
      }
      float prob[4], ds[4];
      prob[0] = ops::ex2(fmaf(s[0], c, -q0.x));
      prob[1] = ops::ex2(fmaf(s[1], c, -q0.x));
      prob[2] = ops::ex2(fmaf(s[2], c, -q1.x));
      prob[3] = ops::ex2(fmaf(s[3], c, -q1.x));
XK_UNROLL
      for (int e = 0; e < 4; ++e) ds[e] = prob[e] * dp[e];
      // P^T and dS^T as A operands (rows = keys, 8 of 16 used); dV += P^T dO and dK += dS^T Q,
      // dO and Q by ldmatrix.trans as B.
      const uint32_t pa[4] = {ops::movm_trans(ops::pack2<T>(prob[0], prob[1])), 0u,
                              ops::movm_trans(ops::pack2<T>(prob[2], prob[3])), 0u};
      const uint32_t da[4] = {ops::movm_trans(ops::pack2<T>(ds[0], ds[1])), 0u,
                              ops::movm_trans(ops::pack2<T>(ds[2], ds[3])), 0u};
XK_UNROLL
      for (int ks = 0; ks < kSteps; ++ks) {
        uint32_t t[4];
        ops::ldsm_x4_trans(t, rows.second(tile, ks));
        ops::mma<T>(dv[2 * ks], pa, t[0], t[1]);
        ops::mma<T>(dv[2 * ks + 1], pa, t[2], t[3]);
        ops::ldsm_x4_trans(t, rows.first(tile, ks));
        ops::mma<T>(dk[2 * ks], da, t[0], t[1]);
        ops::mma<T>(dk[2 * ks + 1], da, t[2], t[3]);
      }
    }
    const int64_t offset = token.valid ? ((b * voxels + voxel_of(plan, token)) * p.heads + h) * HD : 0;
    store_rows<T, HD>(token.valid ? outs.grad_key + offset : nullptr, dk, sc.scale, quad);
    store_rows<T, HD>(token.valid ? outs.grad_value + offset : nullptr, dv, 1.f, quad);
  }
}

// ----------------------------------------------------------------------------- backward: reduce

// One thread per (head, partial column): the query pass's rows of that head, summed in fp64 in
// a fixed order (batch, then brick), written in the output dtype. Blocks: reduce_blocks().
constexpr int kReduceThreads = 128;

inline int64_t reduce_blocks(int partial_stride, int64_t heads) {
  return heads * ((partial_stride + kReduceThreads - 1) / kReduceThreads);
}

template <typename T>
XK_DEVICE void reduce_block(const BackwardOutputs<T>& outs, int64_t batch, int64_t heads, int64_t bricks,
                            int head_dim) {
  const int64_t column_blocks = (outs.partial_stride + kReduceThreads - 1) / kReduceThreads;
  const int64_t block = ops::block_index();
  const int64_t h = block / column_blocks;
  const int e = static_cast<int>((block % column_blocks) * kReduceThreads) + ops::thread_index();
  if (e >= outs.partial_stride) return;
  double total = 0.0;
  for (int64_t b = 0; b < batch; ++b) {
    const float* column = outs.partials + ((b * heads + h) * bricks) * outs.partial_stride + e;
    for (int64_t k = 0; k < bricks; ++k) total += static_cast<double>(column[k * outs.partial_stride]);
  }
  const T value = ops::from_float<T>(static_cast<float>(total));
  if (e < outs.bias_entries) {
    outs.grad_bias[h * outs.bias_entries + e] = value;
  } else if (e < outs.bias_entries + head_dim) {
    outs.grad_pad_key[h * head_dim + e - outs.bias_entries] = value;
  } else {
    outs.grad_pad_value[h * head_dim + e - outs.bias_entries - head_dim] = value;
  }
}

}  // namespace brick
}  // namespace xmorpher_kernels
