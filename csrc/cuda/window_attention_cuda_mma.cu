// Tensor-core forward of window cross attention for fp16/bf16 (mma.sync m16n8k16, fp32
// accumulation), for windows of at most 8 queries (XMorpher's 2 x 2 x 2) and head_dim a
// multiple of 16 up to 128.
//
// Layout of the work:
//  * A block takes R consecutive windows along x (same b, head, wz, wy) and stages the union of
//    their key boxes in shared memory once (mma_common.cuh): neighbouring boxes overlap, so each
//    key is read from global memory about s_w / w_w times less often than with one box per
//    window.
//  * One warp per window. With 8 queries, the scores are computed transposed, S^T = K Q^T, so
//    the 16-row side of m16n8k16 is keys and the 8-column side is the window's queries: no
//    padding of queries to 16. The key box is walked 16 keys at a time with an online softmax
//    (base-2 exponentials, scale and bias folded in fp32).
//  * O^T = V^T P^T accumulates with the same instruction: the probability tile (C layout, keys x
//    queries) becomes the B operand (keys x queries, transposed lane layout) with one movmatrix
//    per 8 x 8 half, and the V^T operand is read from the staged value rows.
//  * The output tile is transposed back with movmatrix so each lane stores 2 adjacent elements.
// All window, key box and bias index arithmetic comes from window_geometry.h.
#include <cmath>

#include "mma_common.cuh"
#include "window_attention_cuda.h"

namespace xmorpher_kernels {
namespace cuda {
namespace {

template <typename T, int HD>
__global__ void __launch_bounds__(kMaxWindowsPerBlock * 32, 1)
    forward_mma_kernel(const AttentionParams<T, float> p, MmaLayout layout, int windows_per_block,
                       bool vector_loads) {
  constexpr int kRow = HD + kRowPad;  // staged row length, in elements
  constexpr int kSteps = HD / 16;     // k-steps of S^T, m-tiles of O^T
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const StagedBox<T> box(smem_raw, layout, kRow);

  const WindowGeometry& g = p.geometry;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t nwx = num_windows(g, 2), nwy = num_windows(g, 1), nwz = num_windows(g, 0);
  const int64_t x_blocks = (nwx + windows_per_block - 1) / windows_per_block;
  const TaskCoords block = split_task(blockIdx.x, p.heads, nwz, nwy, x_blocks);
  const int64_t b = block.b, h = block.h, wz = block.z, wy = block.y, xb = block.x;
  const int64_t wx0 = xb * windows_per_block;
  const int box_keys = static_cast<int>(g.search[0] * g.search[1] * g.search[2]);
  stage_key_box<T, HD>(p, layout, box, b, h, wz, wy, wx0, vector_loads);

  const int64_t wx = wx0 + warp;
  if (wx >= nwx) return;  // no barrier follows
  const int group = lane >> 2, quad = lane & 3;
  const int row_offset = warp * static_cast<int>(g.window[2]);  // this window's first staged x
  const int64_t voxels = g.volume[0] * g.volume[1] * g.volume[2];
  const WindowQueries window(g, wz, wy, wx);
  auto query_voxel = [&](int q, int& bias_part) { return window.voxel(q, bias_part); };

  // B operand Q^T (k = head dim, n = query): lane holds query `group`, dims 2*quad.. and +8.
  uint32_t q_frag[kSteps][2];
  {
    int unused;
    const int64_t voxel = query_voxel(group, unused);
    const uint16_t* q_row = nullptr;
    if (voxel >= 0) q_row = reinterpret_cast<const uint16_t*>(token_row(p.query, p.query_strides, g, b, voxel, h));
#pragma unroll
    for (int ks = 0; ks < kSteps; ++ks) {
      const int d = ks * 16 + 2 * quad;
      q_frag[ks][0] = q_row ? pack_bits(q_row[d], q_row[d + 1]) : 0u;
      q_frag[ks][1] = q_row ? pack_bits(q_row[d + 8], q_row[d + 9]) : 0u;
    }
  }
  // This lane's score columns are queries 2*quad and 2*quad + 1.
  int query_bias[2];
  int64_t query_pos[2];
  query_pos[0] = query_voxel(2 * quad, query_bias[0]);
  query_pos[1] = query_voxel(2 * quad + 1, query_bias[1]);

  const float scale_log2 = p.scale * kLog2e;
  const bool with_bias = p.rel_pos_bias != nullptr;
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};
  float o[kSteps][4];
#pragma unroll
  for (int mt = 0; mt < kSteps; ++mt) o[mt][0] = o[mt][1] = o[mt][2] = o[mt][3] = 0.f;

  const int tiles = static_cast<int>(layout.keys / 16);
  for (int tile = 0; tile < tiles; ++tile) {
    // S^T tile: rows = keys tile*16 + group (+8), columns = queries 2*quad (+1).
    const int key0 = tile * 16 + group, key1 = key0 + 8;
    const int row0 = box.key_row[key0] + row_offset, row1 = box.key_row[key1] + row_offset;
    float s[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int ks = 0; ks < kSteps; ++ks) {
      uint32_t a[4];
      rows_as_a<T, HD>(box.key, row0, row1, ks * 16 + 2 * quad, a);
      Mma<T>::run(s, a, q_frag[ks][0], q_frag[ks][1]);
    }
    // Scores in base 2: scale * log2(e) * <q, k> + log2(e) * bias, -inf for masked/tail keys.
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int key = e < 2 ? key0 : key1;
      const int row = e < 2 ? row0 : row1;
      float v = -INFINITY;
      if (key < box_keys) {
        v = s[e] * scale_log2 + box.mask[row];
        if (with_bias) v += box.bias[box.key_bias[key] - query_bias[e & 1]];
      }
      s[e] = v;
    }
    float scale_old[2], prob[4];
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      float tile_max = fmaxf(s[j], s[j + 2]);
      tile_max = fmaxf(tile_max, __shfl_xor_sync(kFullMask, tile_max, 4));
      tile_max = fmaxf(tile_max, __shfl_xor_sync(kFullMask, tile_max, 8));
      tile_max = fmaxf(tile_max, __shfl_xor_sync(kFullMask, tile_max, 16));
      const float new_max = fmaxf(row_max[j], tile_max);
      const float base = new_max == -INFINITY ? 0.f : new_max;  // all keys so far masked
      scale_old[j] = exp2f(row_max[j] - base);
      prob[j] = exp2f(s[j] - base);
      prob[j + 2] = exp2f(s[j + 2] - base);
      row_sum[j] = row_sum[j] * scale_old[j] + prob[j] + prob[j + 2];  // this lane's keys only
      row_max[j] = new_max;
    }
#pragma unroll
    for (int mt = 0; mt < kSteps; ++mt) {
      o[mt][0] *= scale_old[0];
      o[mt][1] *= scale_old[1];
      o[mt][2] *= scale_old[0];
      o[mt][3] *= scale_old[1];
    }
    // P^T as the B operand (k = keys, n = queries): transpose the two 8 x 8 halves.
    const uint32_t p_lo = transpose_8x8(pack2<T>(prob[0], prob[1]));  // keys 2*quad.., query group
    const uint32_t p_hi = transpose_8x8(pack2<T>(prob[2], prob[3]));  // keys 8 + 2*quad..
    accumulate_rows_transposed<T, HD>(o, box.value, box, tile, row_offset, p_lo, p_hi);  // O^T += V^T P^T
  }

  // Each query's sum over the 8 lanes that share its column.
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    row_sum[j] += __shfl_xor_sync(kFullMask, row_sum[j], 4);
    row_sum[j] += __shfl_xor_sync(kFullMask, row_sum[j], 8);
    row_sum[j] += __shfl_xor_sync(kFullMask, row_sum[j], 16);
  }
  const float inv0 = 1.f / row_sum[0], inv1 = 1.f / row_sum[1];
  // O^T tile (d = group (+8), queries 2*quad..) -> transposed: query `group`, d = 2*quad...
  int unused;
  const int64_t out_voxel = query_voxel(group, unused);
  T* out_row = out_voxel >= 0 ? p.out + ((b * voxels + out_voxel) * p.heads + h) * HD : nullptr;
#pragma unroll
  for (int mt = 0; mt < kSteps; ++mt) {
    const uint32_t lo = transpose_8x8(pack2<T>(o[mt][0] * inv0, o[mt][1] * inv1));
    const uint32_t hi = transpose_8x8(pack2<T>(o[mt][2] * inv0, o[mt][3] * inv1));
    if (out_row != nullptr) {
      *reinterpret_cast<uint32_t*>(out_row + mt * 16 + 2 * quad) = lo;
      *reinterpret_cast<uint32_t*>(out_row + mt * 16 + 8 + 2 * quad) = hi;
    }
  }
  if (group == 0) {
#pragma unroll
    for (int j = 0; j < 2; ++j)
      if (query_pos[j] >= 0)
        p.lse[(b * p.heads + h) * voxels + query_pos[j]] = (row_max[j] + log2f(row_sum[j])) * kLn2;
  }
}

template <typename T, int HD>
void launch(const AttentionParams<T, float>& p, const MmaLayout& layout, int windows_per_block, bool vector_loads,
            int64_t blocks, int device, cudaStream_t stream) {
  const int64_t smem = layout.total();
  allow_dynamic_shared_memory<&forward_mma_kernel<T, HD>>(
      device, smem, "forward_mma_kernel: requesting shared memory for the staged key box");
  forward_mma_kernel<T, HD><<<static_cast<unsigned>(blocks), windows_per_block * 32, static_cast<size_t>(smem), stream>>>(
      p, layout, windows_per_block, vector_loads);
  XK_CHECK_LAUNCH("forward_mma_kernel");
}

}  // namespace

template <typename T>
bool launch_forward_mma(const AttentionParams<T, float>& p, bool vector_loads, cudaStream_t stream) {
  const WindowGeometry& g = p.geometry;
  if (!tensor_cores_cover(g, p.head_dim)) return false;
  const bool with_bias = p.rel_pos_bias != nullptr;
  const int64_t nwx = num_windows(g, 2);
  const int windows_per_block = windows_per_block_within_budget(g, p.head_dim, nwx, 1, with_bias, 0, false);
  const MmaLayout layout = mma_layout(g, p.head_dim, windows_per_block, 1, with_bias, 0, false);
  const int device = current_device();
  if (layout.total() > optin_shared_memory(device)) return false;
  const int64_t blocks = p.batch * p.heads * num_windows(g, 0) * num_windows(g, 1) *
                         ((nwx + windows_per_block - 1) / windows_per_block);
  if (blocks > INT32_MAX) return false;
  dispatch_head_dim(p.head_dim, [&](auto head_dim) {
    launch<T, decltype(head_dim)::value>(p, layout, windows_per_block, vector_loads, blocks, device, stream);
  });
  return true;
}

template bool launch_forward_mma<__half>(const AttentionParams<__half, float>&, bool, cudaStream_t);
template bool launch_forward_mma<__nv_bfloat16>(const AttentionParams<__nv_bfloat16, float>&, bool, cudaStream_t);

}  // namespace cuda
}  // namespace xmorpher_kernels
