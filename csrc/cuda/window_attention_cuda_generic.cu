// Generic CUDA kernels of window cross attention: every dtype (fp32, fp16, bf16 with fp32
// accumulation), every window/search size, head_dim 1..128, both padding modes.
//
// They are the correctness baseline of the CUDA backend and the path for what the tensor-core
// forward (window_attention_cuda_mma.cu) does not cover, and they hold the whole backward:
//  * forward: one warp per query; lanes own 32 keys of the box at a time (scores), then the
//    warp walks those keys and the lanes own head_dim elements (P V), with an online softmax.
//  * backward, query side: one block per row of windows (b, head, wz, wy), one warp per query at
//    a time. Recomputes P and dS, writes dQ, sums bias and pad gradients into per-warp partials
//    (fp32 per warp, stored as fp64 for the final sum; no atomics: a warp's lanes hold distinct
//    keys, so distinct bias entries), and in the fast
//    mode scatters dK/dV with fp32 atomics.
//  * backward, key side (deterministic mode): one warp per key voxel walks the windows whose box
//    holds it and their queries in a fixed order and writes dK/dV once: atomic-free, so results
//    are bitwise repeatable.
// All window, key box and bias index arithmetic comes from window_geometry.h. Per-key loops use
// 32-bit sizes (64-bit division is slow on the GPU); token offsets stay 64-bit.
#include <cmath>

#include "cuda_common.cuh"
#include "window_attention_cuda.h"

namespace xmorpher_kernels {
namespace cuda {
namespace {

constexpr int kWarpsPerBlock = 8;
constexpr int kDefaultDynamicSmem = 48 * 1024;
constexpr float kNegInf = -INFINITY;

// Sizes of one call, derived once per thread.
struct Dims {
  int window[3], search[3];
  int queries_per_window;  // of a full window
  int keys_per_box;
  int64_t windows[3];
  int64_t voxels;
  int64_t bias_per_head;
};

__device__ __forceinline__ Dims make_dims(const WindowGeometry& g) {
  Dims d;
  for (int axis = 0; axis < 3; ++axis) {
    d.window[axis] = static_cast<int>(g.window[axis]);
    d.search[axis] = static_cast<int>(g.search[axis]);
    d.windows[axis] = num_windows(g, axis);
  }
  d.queries_per_window = d.window[0] * d.window[1] * d.window[2];
  d.keys_per_box = d.search[0] * d.search[1] * d.search[2];
  d.voxels = g.volume[0] * g.volume[1] * g.volume[2];
  d.bias_per_head = bias_extent(g, 0) * bias_extent(g, 1) * bias_extent(g, 2);
  return d;
}

// Query `slot` of a window (row-major over the window) as offsets (az, ay, ax).
__device__ __forceinline__ void query_in_window(const Dims& d, int slot, int a[3]) {
  a[2] = slot % d.window[2];
  a[1] = (slot / d.window[2]) % d.window[1];
  a[0] = slot / (d.window[2] * d.window[1]);
}

// Key `index` of a box (row-major over the box) as offsets (tz, ty, tx).
__device__ __forceinline__ void key_in_box(const Dims& d, int index, int t[3]) {
  t[2] = index % d.search[2];
  t[1] = (index / d.search[2]) % d.search[1];
  t[0] = index / (d.search[2] * d.search[1]);
}

__device__ __forceinline__ bool inside(const WindowGeometry& g, int64_t z, int64_t y, int64_t x) {
  return inside_volume(g, 0, z) && inside_volume(g, 1, y) && inside_volume(g, 2, x);
}

template <typename T>
__device__ __forceinline__ const T* shfl_pointer(const T* ptr, int src) {
  return reinterpret_cast<const T*>(
      __shfl_sync(kFullMask, reinterpret_cast<unsigned long long>(ptr), src));
}

// acc += w * row over this lane's head-dim elements (d = lane + 32 c): a warp adds one weighted
// token row, read straight from memory.
template <typename T>
__device__ __forceinline__ void add_scaled_row(float (&acc)[kLaneChunks], float w, const T* row, int lane, int hd) {
#pragma unroll
  for (int c = 0; c < kLaneChunks; ++c) {
    const int d = lane + 32 * c;
    if (d < hd) acc[c] += w * to_float(row[d]);
  }
}

template <typename T>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    forward_generic_kernel(const AttentionParams<T, float> p, int64_t num_tasks) {
  __shared__ float q_smem[kWarpsPerBlock][kMaxHeadDim];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t task = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;
  if (task >= num_tasks) return;
  const WindowGeometry& g = p.geometry;
  const Dims dims = make_dims(g);
  const int hd = static_cast<int>(p.head_dim);

  // The query slot within its window is the fastest digit: neighbouring warps take neighbouring
  // queries, whose key boxes overlap in the cache.
  const int slot = static_cast<int>(task % dims.queries_per_window);
  const TaskCoords w = split_task(task / dims.queries_per_window, p.heads, dims.windows[0], dims.windows[1],
                                  dims.windows[2]);
  const int64_t b = w.b, h = w.h, wz = w.z, wy = w.y, wx = w.x;
  int a[3];
  query_in_window(dims, slot, a);
  const int64_t z = window_origin(g, 0, wz) + a[0];
  const int64_t y = window_origin(g, 1, wy) + a[1];
  const int64_t x = window_origin(g, 2, wx) + a[2];
  if (!inside(g, z, y, x)) return;  // a slot of a partial window

  const T* q_row = p.query + p.query_strides.offset(b, z, y, x, h);
  for (int d = lane; d < hd; d += 32) q_smem[warp][d] = to_float(q_row[d]) * p.scale;
  __syncwarp();

  const int64_t bz = key_box_start(g, 0, wz), by = key_box_start(g, 1, wy), bx = key_box_start(g, 2, wx);
  const bool constant_padding = p.pad_key != nullptr;
  const int64_t bias_base = h * dims.bias_per_head - bias_query_part(g, a[0], a[1], a[2]);

  float row_max = kNegInf, row_sum = 0.f;
  float acc[kLaneChunks] = {};
  for (int base = 0; base < dims.keys_per_box; base += 32) {
    const int index = base + lane;
    float score = kNegInf;
    const T* v_row = nullptr;
    if (index < dims.keys_per_box) {
      int t[3];
      key_in_box(dims, index, t);
      const int64_t kz = bz + t[0], ky = by + t[1], kx = bx + t[2];
      const bool in = inside(g, kz, ky, kx);
      if (in || constant_padding) {
        const T* k_row = in ? p.key + p.key_strides.offset(b, kz, ky, kx, h) : p.pad_key + h * hd;
        v_row = in ? p.value + p.value_strides.offset(b, kz, ky, kx, h) : p.pad_value + h * hd;
        float dot = 0.f;
        for (int d = 0; d < hd; ++d) dot += q_smem[warp][d] * to_float(k_row[d]);
        if (p.rel_pos_bias != nullptr) dot += to_float(p.rel_pos_bias[bias_base + bias_key_part(g, t[0], t[1], t[2])]);
        score = dot;
      }
    }
    const float new_max = fmaxf(row_max, warp_max(score));
    if (new_max == kNegInf) continue;  // every key so far is masked (warp-uniform)
    const float correction = __expf(row_max - new_max);
    const float prob = __expf(score - new_max);
    row_sum = row_sum * correction + warp_sum(prob);
#pragma unroll
    for (int c = 0; c < kLaneChunks; ++c) acc[c] *= correction;
    row_max = new_max;
    unsigned live = __ballot_sync(kFullMask, prob > 0.f);
    while (live) {
      const int src = __ffs(live) - 1;
      live &= live - 1;
      const float pj = __shfl_sync(kFullMask, prob, src);
      const T* vj = shfl_pointer(v_row, src);
      add_scaled_row(acc, pj, vj, lane, hd);
    }
  }

  const int64_t pos = (z * g.volume[1] + y) * g.volume[2] + x;
  T* out_row = p.out + ((b * dims.voxels + pos) * p.heads + h) * hd;
  const float inv_sum = 1.f / row_sum;
#pragma unroll
  for (int c = 0; c < kLaneChunks; ++c) {
    const int d = lane + 32 * c;
    if (d < hd) out_row[d] = from_float<T>(acc[c] * inv_sum);
  }
  if (lane == 0) p.lse[(b * p.heads + h) * dims.voxels + pos] = row_max + logf(row_sum);
}

// Shared memory of backward_queries_kernel: per warp, the scaled query and dO rows, then per
// warp the bias partial (when there is a bias).
int64_t backward_query_smem_bytes(const WindowGeometry& g, int64_t head_dim, bool with_bias, int warps) {
  const int64_t bias_per_head = bias_extent(g, 0) * bias_extent(g, 1) * bias_extent(g, 2);
  return static_cast<int64_t>(warps) * (2 * head_dim + (with_bias ? bias_per_head : 0)) *
         static_cast<int64_t>(sizeof(float));
}

template <typename T, bool kAtomicKeyGrads>
__global__ void __launch_bounds__(kWarpsPerBlock * 32, 1)
    backward_queries_kernel(const AttentionParams<T, float> p, float* delta_out) {
  extern __shared__ float smem[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const WindowGeometry& g = p.geometry;
  const Dims dims = make_dims(g);
  const int hd = static_cast<int>(p.head_dim);
  const bool constant_padding = p.pad_key != nullptr;
  float* q_s = smem + warp * 2 * hd;  // query row times scale
  float* do_s = q_s + hd;             // dO row
  float* bias_partial = p.rel_pos_bias != nullptr ? smem + warps * 2 * hd + warp * dims.bias_per_head : nullptr;
  if (bias_partial != nullptr)
    for (int64_t e = lane; e < dims.bias_per_head; e += 32) bias_partial[e] = 0.f;
  __syncwarp();

  // One block per row of windows along x; blockIdx.x is also the block's partial slot.
  const TaskCoords row = split_task(blockIdx.x, p.heads, dims.windows[0], dims.windows[1], 1);
  const int64_t b = row.b, h = row.h, wz = row.z, wy = row.y;
  const int64_t bz = key_box_start(g, 0, wz), by = key_box_start(g, 1, wy);
  float pad_key_grad[kLaneChunks] = {}, pad_value_grad[kLaneChunks] = {};

  const int64_t queries = dims.windows[2] * dims.queries_per_window;
  for (int64_t qi = warp; qi < queries; qi += warps) {
    const int64_t wx = qi / dims.queries_per_window;
    int a[3];
    query_in_window(dims, static_cast<int>(qi % dims.queries_per_window), a);
    const int64_t z = window_origin(g, 0, wz) + a[0];
    const int64_t y = window_origin(g, 1, wy) + a[1];
    const int64_t x = window_origin(g, 2, wx) + a[2];
    if (!inside(g, z, y, x)) continue;  // warp-uniform
    const int64_t pos = (z * g.volume[1] + y) * g.volume[2] + x;
    const int64_t token = ((b * dims.voxels + pos) * p.heads + h) * hd;  // contiguous out / dQ
    const T* q_row = p.query + p.query_strides.offset(b, z, y, x, h);
    const T* do_row = p.grad_out + p.grad_out_strides.offset(b, z, y, x, h);
    float delta_part = 0.f;
    for (int d = lane; d < hd; d += 32) {
      q_s[d] = to_float(q_row[d]) * p.scale;
      const float go = to_float(do_row[d]);
      do_s[d] = go;
      delta_part += go * to_float(p.out[token + d]);
    }
    const float delta = warp_sum(delta_part);  // <dO, O>
    const float lse = p.lse[(b * p.heads + h) * dims.voxels + pos];
    __syncwarp();

    const int64_t bx = key_box_start(g, 2, wx);
    const int64_t query_part = bias_query_part(g, a[0], a[1], a[2]);
    float dq[kLaneChunks] = {};
    float pad_ds = 0.f, pad_prob = 0.f;
    for (int base = 0; base < dims.keys_per_box; base += 32) {
      const int index = base + lane;
      float prob = 0.f, ds = 0.f;
      const T* k_row = nullptr;
      int64_t key_token = -1;
      if (index < dims.keys_per_box) {
        int t[3];
        key_in_box(dims, index, t);
        const int64_t kz = bz + t[0], ky = by + t[1], kx = bx + t[2];
        const bool in = inside(g, kz, ky, kx);
        if (in || constant_padding) {
          k_row = in ? p.key + p.key_strides.offset(b, kz, ky, kx, h) : p.pad_key + h * hd;
          const T* v_row = in ? p.value + p.value_strides.offset(b, kz, ky, kx, h) : p.pad_value + h * hd;
          float dot = 0.f, dp = 0.f;
          for (int d = 0; d < hd; ++d) {
            dot += q_s[d] * to_float(k_row[d]);
            dp += do_s[d] * to_float(v_row[d]);
          }
          const int64_t bias_index = bias_key_part(g, t[0], t[1], t[2]) - query_part;
          if (bias_partial != nullptr) dot += to_float(p.rel_pos_bias[h * dims.bias_per_head + bias_index]);
          prob = __expf(dot - lse);
          ds = prob * (dp - delta);
          if (bias_partial != nullptr) bias_partial[bias_index] += ds;  // distinct per lane
          if (in) {
            key_token = ((b * dims.voxels + (kz * g.volume[1] + ky) * g.volume[2] + kx) * p.heads + h) * hd;
          } else {
            pad_ds += ds;
            pad_prob += prob;
          }
        }
      }
      unsigned live = __ballot_sync(kFullMask, k_row != nullptr);
      while (live) {
        const int src = __ffs(live) - 1;
        live &= live - 1;
        const float ds_j = __shfl_sync(kFullMask, ds, src);
        const T* k_j = shfl_pointer(k_row, src);
        add_scaled_row(dq, ds_j, k_j, lane, hd);
        if (kAtomicKeyGrads) {
          const float p_j = __shfl_sync(kFullMask, prob, src);
          const int64_t token_j = __shfl_sync(kFullMask, static_cast<long long>(key_token), src);
          if (token_j >= 0) {
#pragma unroll
            for (int c = 0; c < kLaneChunks; ++c) {
              const int d = lane + 32 * c;
              if (d < hd) {
                atomicAdd(p.grad_key + token_j + d, ds_j * q_s[d]);
                atomicAdd(p.grad_value + token_j + d, p_j * do_s[d]);
              }
            }
          }
        }
      }
      __syncwarp();  // orders this round's bias_partial updates before the next round's
    }
#pragma unroll
    for (int c = 0; c < kLaneChunks; ++c) {
      const int d = lane + 32 * c;
      if (d < hd) p.grad_query[token + d] = from_float<T>(dq[c] * p.scale);
    }
    if (constant_padding) {
      const float sum_ds = warp_sum(pad_ds), sum_prob = warp_sum(pad_prob);
      add_scaled_row(pad_key_grad, sum_ds, q_s, lane, hd);
      add_scaled_row(pad_value_grad, sum_prob, do_s, lane, hd);
    }
    if (delta_out != nullptr && lane == 0) delta_out[(b * p.heads + h) * dims.voxels + pos] = delta;
    __syncwarp();  // q_s / do_s are rewritten for the next query
  }

  if (p.partials == nullptr) return;
  double* slot = p.partials + (static_cast<int64_t>(blockIdx.x) * warps + warp) * p.partial_stride;
  int64_t column = 0;
  if (bias_partial != nullptr) {
    for (int64_t e = lane; e < dims.bias_per_head; e += 32) slot[e] = bias_partial[e];
    column = dims.bias_per_head;
  }
  if (constant_padding) {
#pragma unroll
    for (int c = 0; c < kLaneChunks; ++c) {
      const int d = lane + 32 * c;
      if (d < hd) {
        slot[column + d] = pad_key_grad[c];
        slot[column + hd + d] = pad_value_grad[c];
      }
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kWarpsPerBlock * 32, 1)
    backward_keys_kernel(const AttentionParams<T, float> p, const float* delta, int64_t num_tasks) {
  __shared__ float k_smem[kWarpsPerBlock][kMaxHeadDim];
  __shared__ float v_smem[kWarpsPerBlock][kMaxHeadDim];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t task = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;
  if (task >= num_tasks) return;
  const WindowGeometry& g = p.geometry;
  const Dims dims = make_dims(g);
  const int hd = static_cast<int>(p.head_dim);

  const TaskCoords voxel_task = split_task(task, p.heads, dims.voxels, 1, 1);
  const int64_t b = voxel_task.b, h = voxel_task.h;
  const VoxelCoords k = voxel_coords(g, voxel_task.z);
  const int64_t kz = k.z, ky = k.y, kx = k.x;
  const T* k_row = p.key + p.key_strides.offset(b, kz, ky, kx, h);
  const T* v_row = p.value + p.value_strides.offset(b, kz, ky, kx, h);
  for (int d = lane; d < hd; d += 32) {
    k_smem[warp][d] = to_float(k_row[d]);
    v_smem[warp][d] = to_float(v_row[d]);
  }
  __syncwarp();

  const int64_t lse_base = (b * p.heads + h) * dims.voxels;
  float acc_k[kLaneChunks] = {}, acc_v[kLaneChunks] = {};
  // Every window whose key box holds this key, then its queries, in a fixed order.
  for (int64_t wz = first_window_containing(g, 0, kz); wz <= last_window_containing(g, 0, kz); ++wz)
    for (int64_t wy = first_window_containing(g, 1, ky); wy <= last_window_containing(g, 1, ky); ++wy)
      for (int64_t wx = first_window_containing(g, 2, kx); wx <= last_window_containing(g, 2, kx); ++wx) {
        const int64_t key_part =
            bias_key_part(g, kz - key_box_start(g, 0, wz), ky - key_box_start(g, 1, wy), kx - key_box_start(g, 2, wx));
        for (int base = 0; base < dims.queries_per_window; base += 32) {
          const int slot = base + lane;
          float prob = 0.f, ds = 0.f;
          const T* q_row = nullptr;
          const T* do_row = nullptr;
          if (slot < dims.queries_per_window) {
            int a[3];
            query_in_window(dims, slot, a);
            const int64_t z = window_origin(g, 0, wz) + a[0];
            const int64_t y = window_origin(g, 1, wy) + a[1];
            const int64_t x = window_origin(g, 2, wx) + a[2];
            if (inside(g, z, y, x)) {
              q_row = p.query + p.query_strides.offset(b, z, y, x, h);
              do_row = p.grad_out + p.grad_out_strides.offset(b, z, y, x, h);
              const int64_t qpos = (z * g.volume[1] + y) * g.volume[2] + x;
              // Same operation order as the query side, so P matches it.
              float dot = 0.f, dp = 0.f;
              for (int d = 0; d < hd; ++d) {
                dot += to_float(q_row[d]) * p.scale * k_smem[warp][d];
                dp += to_float(do_row[d]) * v_smem[warp][d];
              }
              if (p.rel_pos_bias != nullptr)
                dot += to_float(p.rel_pos_bias[h * dims.bias_per_head + key_part - bias_query_part(g, a[0], a[1], a[2])]);
              prob = __expf(dot - p.lse[lse_base + qpos]);
              ds = prob * (dp - delta[lse_base + qpos]);
            }
          }
          unsigned live = __ballot_sync(kFullMask, q_row != nullptr);
          while (live) {
            const int src = __ffs(live) - 1;
            live &= live - 1;
            const float ds_j = __shfl_sync(kFullMask, ds, src);
            const float p_j = __shfl_sync(kFullMask, prob, src);
            const T* q_j = shfl_pointer(q_row, src);
            const T* do_j = shfl_pointer(do_row, src);
            add_scaled_row(acc_k, ds_j, q_j, lane, hd);
            add_scaled_row(acc_v, p_j, do_j, lane, hd);
          }
        }
      }

  const int64_t token = ((b * dims.voxels + voxel_task.z) * p.heads + h) * hd;
#pragma unroll
  for (int c = 0; c < kLaneChunks; ++c) {
    const int d = lane + 32 * c;
    if (d < hd) {
      p.grad_key[token + d] = acc_k[c] * p.scale;
      p.grad_value[token + d] = acc_v[c];
    }
  }
}

int64_t blocks_for(int64_t warps_total, const char* kernel) {
  const int64_t blocks = (warps_total + kWarpsPerBlock - 1) / kWarpsPerBlock;
  TORCH_CHECK(blocks <= INT32_MAX, "xmorpher_kernels: ", kernel, ": problem too large for one launch (",
              warps_total, " warps)");
  return blocks;
}

}  // namespace

template <typename T>
void launch_forward_generic(const AttentionParams<T, float>& p, cudaStream_t stream) {
  const WindowGeometry& g = p.geometry;
  const int64_t tasks = p.batch * p.heads * num_windows(g, 0) * num_windows(g, 1) * num_windows(g, 2) *
                        g.window[0] * g.window[1] * g.window[2];
  const int64_t blocks = blocks_for(tasks, "forward_generic_kernel");
  forward_generic_kernel<T><<<static_cast<unsigned>(blocks), kWarpsPerBlock * 32, 0, stream>>>(p, tasks);
  XK_CHECK_LAUNCH("forward_generic_kernel");
}

int backward_query_warps(const WindowGeometry& g, int64_t head_dim, bool with_bias) {
  int warps = kWarpsPerBlock;
  while (warps > 1 && backward_query_smem_bytes(g, head_dim, with_bias, warps) > kDefaultDynamicSmem) warps /= 2;
  return warps;
}

template <typename T>
void launch_backward_queries(const AttentionParams<T, float>& p, int partial_warps, bool atomic_key_grads,
                             float* delta, cudaStream_t stream) {
  const WindowGeometry& g = p.geometry;
  const int64_t blocks = p.batch * p.heads * num_windows(g, 0) * num_windows(g, 1);
  TORCH_CHECK(blocks <= INT32_MAX, "xmorpher_kernels: backward_queries_kernel: problem too large for one launch");
  const int64_t smem = backward_query_smem_bytes(g, p.head_dim, p.rel_pos_bias != nullptr, partial_warps);
  auto kernel = atomic_key_grads ? backward_queries_kernel<T, true> : backward_queries_kernel<T, false>;
  if (smem > kDefaultDynamicSmem) {
    // Only a very large bias (search + window - 1 above ~20 per axis) gets here.
    XK_CHECK_CUDA(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)),
                  "backward_queries_kernel: requesting shared memory for the bias partials");
  }
  kernel<<<static_cast<unsigned>(blocks), partial_warps * 32, static_cast<size_t>(smem), stream>>>(p, delta);
  XK_CHECK_LAUNCH("backward_queries_kernel");
}

template <typename T>
void launch_backward_keys(const AttentionParams<T, float>& p, const float* delta, cudaStream_t stream) {
  const WindowGeometry& g = p.geometry;
  const int64_t tasks = p.batch * p.heads * g.volume[0] * g.volume[1] * g.volume[2];
  const int64_t blocks = blocks_for(tasks, "backward_keys_kernel");
  backward_keys_kernel<T><<<static_cast<unsigned>(blocks), kWarpsPerBlock * 32, 0, stream>>>(p, delta, tasks);
  XK_CHECK_LAUNCH("backward_keys_kernel");
}

#define XK_INSTANTIATE(T)                                                                                   \
  template void launch_forward_generic<T>(const AttentionParams<T, float>&, cudaStream_t);                  \
  template void launch_backward_queries<T>(const AttentionParams<T, float>&, int, bool, float*, cudaStream_t); \
  template void launch_backward_keys<T>(const AttentionParams<T, float>&, const float*, cudaStream_t);
XK_INSTANTIATE(float)
XK_INSTANTIATE(__half)
XK_INSTANTIATE(__nv_bfloat16)
#undef XK_INSTANTIATE

}  // namespace cuda
}  // namespace xmorpher_kernels
