// Tensor-core backward of window cross attention for fp16/bf16 (mma.sync, fp32 accumulation),
// for what the tensor-core forward covers: windows of at most 8 queries, head_dim a multiple of
// 16 up to 128.
//
// Layout of the work, per window (one warp), 16 keys of its box at a time:
//  * S^T = K Q^T and dP^T = V dO^T (m16n8k16, keys as rows, the window's 8 queries as columns,
//    as in the forward), P from the saved log-sum-exp, dS = P (dP - <dO, O>).
//  * dQ^T += K^T dS^T (m16n8k16; dS^T through movmatrix, as P^T in the forward).
//  * dK = dS Q and dV = P dO for the tile's 16 keys (m16n8k8, k = the 8 queries): a window
//    holds each key of its box once, so these are the window's whole share of those keys, added
//    to fp32 accumulators in global memory.
//  * Bias and pad gradients sum in shared memory in fixed point (integer adds: the same result
//    in any order), then once per block into a (heads, entries) fixed-point total. The unit is
//    chosen per call from bounds on the terms (window_attention_cuda.cu), so that totals cannot
//    overflow and each term keeps about fp32's relative precision.
// Key boxes are staged in shared memory as by the forward (mma_common.cuh). Two schedules:
//  * fast: blocks of R neighbouring windows, one launch, dK/dV added with atomics;
//  * deterministic: one launch per window colour (index mod ceil(s / w) per axis; windows of one
//    colour have disjoint key boxes), blocks of R windows one colour period apart, dK/dV added
//    with plain read-modify-writes in a fixed launch order: bitwise repeatable, no atomics.
#include <cmath>

#include "mma_common.cuh"
#include "window_attention_cuda.h"

namespace xmorpher_kernels {
namespace cuda {
namespace {

// slot += x in fixed point (x / unit, rounded; integer adds: the same total in any order).
__device__ __forceinline__ void add_fixed(unsigned long long* slot, float x, double inv_unit) {
  atomicAdd(slot, static_cast<unsigned long long>(__double2ll_rn(static_cast<double>(x) * inv_unit)));
}

// dst[0..1] += (a, b): an atomic add (fast schedule) or a plain read-modify-write (the colour
// schedule, where no other thread touches dst during the launch).
template <bool kAtomic>
__device__ __forceinline__ void add_pair(float* dst, float a, float b) {
  if constexpr (kAtomic) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    atomicAdd(reinterpret_cast<float2*>(dst), make_float2(a, b));
#else
    atomicAdd(dst, a);
    atomicAdd(dst + 1, b);
#endif
  } else {
    float2 v = *reinterpret_cast<float2*>(dst);
    v.x += a;
    v.y += b;
    *reinterpret_cast<float2*>(dst) = v;
  }
}

// One launch: which windows its blocks take.
struct BackwardLaunch {
  MmaLayout layout;
  int windows_per_block;
  int64_t first[3];  // first window index per axis (the colour; 0 for the fast schedule)
  int64_t step[3];   // window index step per axis (the colour period; 1 for the fast schedule)
  int64_t count[3];  // windows per axis in this launch
  int64_t x_blocks;  // blocks along x: ceil(count[2] / windows_per_block)
  bool vector_loads;
  unsigned long long* fixed;  // (heads, accumulators) fixed-point bias/pad gradient totals, or null
  const double* inv_unit;     // 1 / the fixed-point unit (a device scalar), or null
};

template <typename T, int HD, bool kAtomic>
__global__ void __launch_bounds__(kMaxWindowsPerBlock * 32, 1)
    backward_mma_kernel(const AttentionParams<T, float> p, const BackwardLaunch launch) {
  constexpr int kRow = HD + kRowPad;  // staged row length, in elements
  constexpr int kSteps = HD / 16;     // k-steps of S^T and dP^T, m-tiles of dQ^T
  constexpr int kCols = HD / 8;       // n-tiles of dK and dV
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const MmaLayout& layout = launch.layout;
  const StagedBox<T> box(smem_raw, layout, kRow);
  const WindowGeometry& g = p.geometry;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int group = lane >> 2, quad = lane & 3;

  const TaskCoords block = split_task(blockIdx.x, p.heads, launch.count[0], launch.count[1], launch.x_blocks);
  const int64_t b = block.b, h = block.h, iz = block.z, iy = block.y, xb = block.x;
  const int64_t wz = launch.first[0] + iz * launch.step[0];
  const int64_t wy = launch.first[1] + iy * launch.step[1];
  const int64_t wx0 = launch.first[2] + xb * launch.windows_per_block * launch.step[2];
  const int64_t wx = wx0 + warp * launch.step[2];

  // Fixed-point accumulators: the bias entries, then pad_key and pad_value (constant padding).
  const bool with_bias = p.rel_pos_bias != nullptr;
  const bool constant_padding = p.pad_key != nullptr;
  const int accumulators = static_cast<int>(layout.accum_bytes / 8);
  const double inv_unit = accumulators > 0 ? *launch.inv_unit : 0.0;
  for (int e = threadIdx.x; e < accumulators; e += blockDim.x) box.accum[e] = 0ull;
  stage_key_box<T, HD>(p, layout, box, b, h, wz, wy, wx0, launch.vector_loads);  // ends with a barrier

  if (wx < num_windows(g, 2)) {  // warp-uniform; the block's barrier below is outside
    const int64_t voxels = g.volume[0] * g.volume[1] * g.volume[2];
    const int box_keys = static_cast<int>(g.search[0] * g.search[1] * g.search[2]);
    const int row_offset = warp * static_cast<int>(launch.step[2] * g.window[2]);  // window's first staged x
    const WindowQueries window(g, wz, wy, wx);
    const int64_t head_token = b * voxels * p.heads + h;  // token (b, voxel, h) = head_token + voxel * heads

    // Query `group`: Q^T and dO^T as B operands (k = head dim, n = query), and its <dO, O>.
    int unused;
    const int64_t my_voxel = window.voxel(group, unused);
    uint32_t q_frag[kSteps][2], do_frag[kSteps][2];
    float my_delta = 0.f;
    {
      const uint16_t* q_row = nullptr;
      const uint16_t* do_row = nullptr;
      const T* o_row = nullptr;
      if (my_voxel >= 0) {
        q_row = reinterpret_cast<const uint16_t*>(token_row(p.query, p.query_strides, g, b, my_voxel, h));
        do_row = reinterpret_cast<const uint16_t*>(token_row(p.grad_out, p.grad_out_strides, g, b, my_voxel, h));
        o_row = p.out + (head_token + my_voxel * p.heads) * HD;
      }
#pragma unroll
      for (int ks = 0; ks < kSteps; ++ks) {
        const int d = ks * 16 + 2 * quad;
        q_frag[ks][0] = q_row ? pack_bits(q_row[d], q_row[d + 1]) : 0u;
        q_frag[ks][1] = q_row ? pack_bits(q_row[d + 8], q_row[d + 9]) : 0u;
        do_frag[ks][0] = do_row ? pack_bits(do_row[d], do_row[d + 1]) : 0u;
        do_frag[ks][1] = do_row ? pack_bits(do_row[d + 8], do_row[d + 9]) : 0u;
        if (o_row != nullptr) {
          const float2 o_lo = unpack2<T>(*reinterpret_cast<const uint32_t*>(o_row + d));
          const float2 o_hi = unpack2<T>(*reinterpret_cast<const uint32_t*>(o_row + d + 8));
          const float2 g_lo = unpack2<T>(do_frag[ks][0]), g_hi = unpack2<T>(do_frag[ks][1]);
          my_delta += g_lo.x * o_lo.x + g_lo.y * o_lo.y + g_hi.x * o_hi.x + g_hi.y * o_hi.y;
        }
      }
      my_delta += __shfl_xor_sync(kFullMask, my_delta, 1);
      my_delta += __shfl_xor_sync(kFullMask, my_delta, 2);
    }

    // This lane's score columns are queries 2*quad + j; their Q and dO columns as the B operand of
    // dK = dS Q and dV = P dO (k = query, n = head dim): q_col[nt] = Q[2quad..2quad+1][nt*8 + group].
    int query_bias[2];
    float lse_log2[2], delta[2];
    uint32_t q_col[kCols], do_col[kCols];
    {
      const uint16_t* q_rows[2];
      const uint16_t* do_rows[2];
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int64_t voxel = window.voxel(2 * quad + j, query_bias[j]);
        q_rows[j] = voxel >= 0 ? reinterpret_cast<const uint16_t*>(token_row(p.query, p.query_strides, g, b, voxel, h))
                               : nullptr;
        do_rows[j] = voxel >= 0
                         ? reinterpret_cast<const uint16_t*>(token_row(p.grad_out, p.grad_out_strides, g, b, voxel, h))
                         : nullptr;
        // An empty slot's +inf log-sum-exp makes its probabilities 0.
        lse_log2[j] = voxel >= 0 ? p.lse[(b * p.heads + h) * voxels + voxel] * kLog2e : INFINITY;
        delta[j] = __shfl_sync(kFullMask, my_delta, (2 * quad + j) * 4);
      }
      const uint16_t zero = 0;
#pragma unroll
      for (int nt = 0; nt < kCols; ++nt) {
        const int d = nt * 8 + group;
        q_col[nt] = pack_bits(q_rows[0] ? q_rows[0][d] : zero, q_rows[1] ? q_rows[1][d] : zero);
        do_col[nt] = pack_bits(do_rows[0] ? do_rows[0][d] : zero, do_rows[1] ? do_rows[1][d] : zero);
      }
    }

    const float scale = p.scale, scale_log2 = p.scale * kLog2e;
    float dq[kSteps][4];
#pragma unroll
    for (int mt = 0; mt < kSteps; ++mt) dq[mt][0] = dq[mt][1] = dq[mt][2] = dq[mt][3] = 0.f;
    float pad_ds[2] = {0.f, 0.f}, pad_prob[2] = {0.f, 0.f};

    const int tiles = static_cast<int>(layout.keys / 16);
    for (int tile = 0; tile < tiles; ++tile) {
      // S^T and dP^T tiles: rows = keys tile*16 + group (+8), columns = queries 2*quad (+1).
      const int key0 = tile * 16 + group, key1 = key0 + 8;
      const int row0 = box.key_row[key0] + row_offset, row1 = box.key_row[key1] + row_offset;
      float s[4] = {0.f, 0.f, 0.f, 0.f}, dp[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int ks = 0; ks < kSteps; ++ks) {
        uint32_t a[4];
        rows_as_a<T, HD>(box.key, row0, row1, ks * 16 + 2 * quad, a);
        Mma<T>::run(s, a, q_frag[ks][0], q_frag[ks][1]);
        rows_as_a<T, HD>(box.value, row0, row1, ks * 16 + 2 * quad, a);
        Mma<T>::run(dp, a, do_frag[ks][0], do_frag[ks][1]);
      }
      float prob[4], ds[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = e < 2 ? key0 : key1;
        const int row = e < 2 ? row0 : row1;
        const int j = e & 1;
        float pr = 0.f;
        if (key < box_keys) {
          float logit = s[e] * scale_log2 + box.mask[row];
          if (with_bias) logit += box.bias[box.key_bias[key] - query_bias[j]];
          pr = exp2f(logit - lse_log2[j]);
        }
        prob[e] = pr;
        ds[e] = pr * (dp[e] - delta[j]);
        if (pr != 0.f) {
          if (with_bias) add_fixed(box.accum + box.key_bias[key] - query_bias[j], ds[e], inv_unit);
          if (constant_padding && box.row_voxel[row] < 0) {
            pad_ds[j] += ds[e];
            pad_prob[j] += pr;
          }
        }
      }
      // dS * scale (keys x queries, C layout) is the A operand of dK = dS Q as it stands, and,
      // transposed per 8 x 8 half, the B operand of dQ^T = K^T dS^T.
      const uint32_t ds_a0 = pack2<T>(ds[0] * scale, ds[1] * scale);
      const uint32_t ds_a1 = pack2<T>(ds[2] * scale, ds[3] * scale);
      const uint32_t ds_lo = transpose_8x8(ds_a0), ds_hi = transpose_8x8(ds_a1);
      accumulate_rows_transposed<T, HD>(dq, box.key, box, tile, row_offset, ds_lo, ds_hi);  // dQ^T += K^T dS^T
      // dK and dV of the tile's keys; rows outside the volume (padding) and tail keys have no token.
      const uint32_t p_a0 = pack2<T>(prob[0], prob[1]), p_a1 = pack2<T>(prob[2], prob[3]);
      const int voxel0 = key0 < box_keys ? box.row_voxel[row0] : -1;
      const int voxel1 = key1 < box_keys ? box.row_voxel[row1] : -1;
      float* dk0 = voxel0 >= 0 ? p.grad_key + (head_token + int64_t{voxel0} * p.heads) * HD : nullptr;
      float* dk1 = voxel1 >= 0 ? p.grad_key + (head_token + int64_t{voxel1} * p.heads) * HD : nullptr;
      float* dv0 = voxel0 >= 0 ? p.grad_value + (head_token + int64_t{voxel0} * p.heads) * HD : nullptr;
      float* dv1 = voxel1 >= 0 ? p.grad_value + (head_token + int64_t{voxel1} * p.heads) * HD : nullptr;
#pragma unroll
      for (int nt = 0; nt < kCols; ++nt) {
        float dk[4] = {0.f, 0.f, 0.f, 0.f}, dv[4] = {0.f, 0.f, 0.f, 0.f};
        MmaK8<T>::run(dk, ds_a0, ds_a1, q_col[nt]);
        MmaK8<T>::run(dv, p_a0, p_a1, do_col[nt]);
        const int d = nt * 8 + 2 * quad;
        if (dk0 != nullptr) {
          add_pair<kAtomic>(dk0 + d, dk[0], dk[1]);
          add_pair<kAtomic>(dv0 + d, dv[0], dv[1]);
        }
        if (dk1 != nullptr) {
          add_pair<kAtomic>(dk1 + d, dk[2], dk[3]);
          add_pair<kAtomic>(dv1 + d, dv[2], dv[3]);
        }
      }
    }

    // dQ^T (d = group (+8), queries 2*quad..) -> transposed: query `group`, d = 2*quad...
    T* dq_row = my_voxel >= 0 ? p.grad_query + (head_token + my_voxel * p.heads) * HD : nullptr;
#pragma unroll
    for (int mt = 0; mt < kSteps; ++mt) {
      const uint32_t lo = transpose_8x8(pack2<T>(dq[mt][0], dq[mt][1]));
      const uint32_t hi = transpose_8x8(pack2<T>(dq[mt][2], dq[mt][3]));
      if (dq_row != nullptr) {
        *reinterpret_cast<uint32_t*>(dq_row + mt * 16 + 2 * quad) = lo;
        *reinterpret_cast<uint32_t*>(dq_row + mt * 16 + 8 + 2 * quad) = hi;
      }
    }

    if (constant_padding) {
      // Per query column, the sums over the box's pad keys (the 8 lanes of a column hold parts).
#pragma unroll
      for (int j = 0; j < 2; ++j) {
#pragma unroll
        for (int offset = 4; offset < 32; offset <<= 1) {
          pad_ds[j] += __shfl_xor_sync(kFullMask, pad_ds[j], offset);
          pad_prob[j] += __shfl_xor_sync(kFullMask, pad_prob[j], offset);
        }
      }
      // d(pad_key) = scale sum_q c_q Q[q], d(pad_value) = sum_q e_q dO[q]: this lane's 2 queries
      // at d = nt*8 + group, then the 4 lanes of the group together hold all 8.
#pragma unroll
      for (int nt = 0; nt < kCols; ++nt) {
        const float2 q = unpack2<T>(q_col[nt]), go = unpack2<T>(do_col[nt]);
        float key_part = pad_ds[0] * q.x + pad_ds[1] * q.y;
        float value_part = pad_prob[0] * go.x + pad_prob[1] * go.y;
        key_part += __shfl_xor_sync(kFullMask, key_part, 1);
        key_part += __shfl_xor_sync(kFullMask, key_part, 2);
        value_part += __shfl_xor_sync(kFullMask, value_part, 1);
        value_part += __shfl_xor_sync(kFullMask, value_part, 2);
        if (quad == 0) {
          add_fixed(box.accum + layout.bias + nt * 8 + group, key_part * scale, inv_unit);
          add_fixed(box.accum + layout.bias + HD + nt * 8 + group, value_part, inv_unit);
        }
      }
    }
  }

  __syncthreads();
  for (int e = threadIdx.x; e < accumulators; e += blockDim.x)
    if (box.accum[e] != 0ull) atomicAdd(launch.fixed + h * accumulators + e, box.accum[e]);
}

template <typename T, int HD, bool kAtomic>
void launch_one(const AttentionParams<T, float>& p, const BackwardLaunch& launch, int64_t blocks, int device,
                cudaStream_t stream) {
  const int64_t smem = launch.layout.total();
  auto kernel = backward_mma_kernel<T, HD, kAtomic>;
  allow_dynamic_shared_memory<&backward_mma_kernel<T, HD, kAtomic>>(
      device, smem, "backward_mma_kernel: requesting shared memory for the staged key box");
  kernel<<<static_cast<unsigned>(blocks), launch.windows_per_block * 32, static_cast<size_t>(smem), stream>>>(p,
                                                                                                             launch);
  XK_CHECK_LAUNCH("backward_mma_kernel");
}

}  // namespace

template <typename T>
bool launch_backward_mma(const AttentionParams<T, float>& p, bool vector_loads, bool deterministic,
                         unsigned long long* fixed, const double* inv_unit, cudaStream_t stream) {
  const WindowGeometry& g = p.geometry;
  if (!tensor_cores_cover(g, p.head_dim)) return false;
  if (g.volume[0] * g.volume[1] * g.volume[2] >= INT32_MAX) return false;  // 32-bit voxel table
  const bool with_bias = p.rel_pos_bias != nullptr;
  const int64_t accumulators = (with_bias ? bias_extent(g, 0) * bias_extent(g, 1) * bias_extent(g, 2) : 0) +
                               (p.pad_key != nullptr ? 2 * p.head_dim : 0);
  if (accumulators > 0 && (fixed == nullptr || inv_unit == nullptr)) return false;

  int64_t period[3] = {1, 1, 1};
  if (deterministic)
    for (int axis = 0; axis < 3; ++axis) period[axis] = color_period(g, axis);
  // Not more windows per block than a launch has along x.
  const int64_t most_x = deterministic ? windows_of_color(g, 2, 0) : num_windows(g, 2);
  const int windows_per_block =
      windows_per_block_within_budget(g, p.head_dim, most_x, period[2], with_bias, accumulators, true);
  BackwardLaunch launch{};
  launch.layout = mma_layout(g, p.head_dim, windows_per_block, period[2], with_bias, accumulators, true);
  const int device = current_device();
  if (launch.layout.total() > optin_shared_memory(device)) return false;
  launch.windows_per_block = windows_per_block;
  launch.vector_loads = vector_loads;
  launch.fixed = fixed;
  launch.inv_unit = inv_unit;

  // The colours in a fixed order (one colour, every window, for the fast schedule).
  for (int64_t cz = 0; cz < period[0]; ++cz)
    for (int64_t cy = 0; cy < period[1]; ++cy)
      for (int64_t cx = 0; cx < period[2]; ++cx) {
        const int64_t colour[3] = {cz, cy, cx};
        for (int axis = 0; axis < 3; ++axis) {
          launch.first[axis] = colour[axis];
          launch.step[axis] = period[axis];
          launch.count[axis] = deterministic ? windows_of_color(g, axis, colour[axis]) : num_windows(g, axis);
        }
        if (launch.count[0] == 0 || launch.count[1] == 0 || launch.count[2] == 0) continue;
        launch.x_blocks = (launch.count[2] + windows_per_block - 1) / windows_per_block;
        const int64_t blocks = p.batch * p.heads * launch.count[0] * launch.count[1] * launch.x_blocks;
        TORCH_CHECK(blocks <= INT32_MAX, "xmorpher_kernels: backward_mma_kernel: problem too large for one launch");
        dispatch_head_dim(p.head_dim, [&](auto head_dim) {
          constexpr int kHeadDim = decltype(head_dim)::value;
          if (deterministic) {
            launch_one<T, kHeadDim, false>(p, launch, blocks, device, stream);
          } else {
            launch_one<T, kHeadDim, true>(p, launch, blocks, device, stream);
          }
        });
      }
  return true;
}

template bool launch_backward_mma<__half>(const AttentionParams<__half, float>&, bool, bool, unsigned long long*,
                                          const double*, cudaStream_t);
template bool launch_backward_mma<__nv_bfloat16>(const AttentionParams<__nv_bfloat16, float>&, bool, bool,
                                                 unsigned long long*, const double*, cudaStream_t);

}  // namespace cuda
}  // namespace xmorpher_kernels
