// What the tensor-core forward and backward (window_attention_cuda_mma.cu,
// window_attention_cuda_mma_backward.cu) share: the shared-memory layout of a block, the staging
// of its windows' key boxes, and where a window's query slots live.
//
// A block takes R windows of one row (same b, head, wz, wy) along x, `window_step` windows apart
// (1: neighbours, whose boxes overlap, so each key is staged once for all of them; the colour
// period: windows whose boxes are disjoint). It stages the x-union of their key boxes,
// s_d x s_h x (w_w window_step (R - 1) + s_w) rows of key and value, once. Padded rows hold
// pad_key/pad_value (constant padding) or zeros with a -inf mask (mask padding).
#pragma once

#include <atomic>
#include <type_traits>

#include "cuda_common.cuh"
#include "window_attention_cuda_support.h"
#include "xmorpher_kernels/attention_params.h"

namespace xmorpher_kernels {
namespace cuda {

constexpr int kMaxWindowsPerBlock = 8;
constexpr int kMaxDevices = 64;  // per-device records of device properties and kernel attributes
constexpr int kRowPad = 8;  // halves of padding per staged row: conflict-free fragment loads
constexpr int64_t kSmemBudget = 80 * 1024;

// Shared memory of one block, in the order it is carved: key and value rows (16-bit), then
// `accum_bytes` of 8-byte accumulators (backward), the row mask, the bias, the box-key tables and
// the staged row -> voxel table (backward).
struct MmaLayout {
  int64_t union_x;  // staged x extent
  int64_t rows;     // staged rows: s_d s_h union_x
  int64_t keys;     // keys per box, rounded up to the 16-key tile
  int64_t bias;     // bias entries of one head (0 without bias)
  int64_t kv_bytes, accum_bytes, mask_bytes, bias_bytes, table_bytes, voxel_bytes;
  int64_t total() const { return kv_bytes + accum_bytes + mask_bytes + bias_bytes + table_bytes + voxel_bytes; }
};

inline MmaLayout mma_layout(const WindowGeometry& g, int64_t head_dim, int64_t windows_per_block,
                            int64_t window_step, bool with_bias, int64_t accumulators, bool voxel_table) {
  MmaLayout m;
  m.union_x = g.window[2] * window_step * (windows_per_block - 1) + g.search[2];
  m.rows = g.search[0] * g.search[1] * m.union_x;
  m.keys = (g.search[0] * g.search[1] * g.search[2] + 15) / 16 * 16;
  m.bias = with_bias ? bias_extent(g, 0) * bias_extent(g, 1) * bias_extent(g, 2) : 0;
  m.kv_bytes = 2 * m.rows * (head_dim + kRowPad) * 2;  // keys then values, 16-bit; a multiple of 16
  m.accum_bytes = accumulators * 8;
  m.mask_bytes = m.rows * 4;
  m.bias_bytes = m.bias * 4;
  m.table_bytes = 2 * m.keys * 4;
  m.voxel_bytes = voxel_table ? m.rows * 4 : 0;
  return m;
}

// The current CUDA device (thread-local state of the runtime, no device query).
inline int current_device() {
  int device = 0;
  XK_CHECK_CUDA(cudaGetDevice(&device), "cudaGetDevice");
  return device;
}

// The most shared memory one block of `device` may opt in to, asked once per device.
inline int64_t optin_shared_memory(int device) {
  static std::atomic<int> known[kMaxDevices] = {};  // 0: not asked yet
  TORCH_CHECK(device >= 0 && device < kMaxDevices, "xmorpher_kernels: CUDA device index ", device, " out of range");
  int bytes = known[device].load(std::memory_order_relaxed);
  if (bytes == 0) {
    XK_CHECK_CUDA(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
                  "cudaDeviceGetAttribute(MaxSharedMemoryPerBlockOptin)");
    known[device].store(bytes, std::memory_order_relaxed);
  }
  return bytes;
}

// Raises a kernel's dynamic shared memory limit to `bytes` on `device` when needed, once per
// (kernel instantiation, device) and size: a template so that each kernel keeps its own record.
template <auto Kernel>
void allow_dynamic_shared_memory(int device, int64_t bytes, const char* what) {
  static std::atomic<int64_t> allowed[kMaxDevices] = {};
  if (bytes <= 48 * 1024 || bytes <= allowed[device].load(std::memory_order_relaxed)) return;
  XK_CHECK_CUDA(cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)), what);
  allowed[device].store(bytes, std::memory_order_relaxed);
}

// The most windows per block (a power of two, not more than `windows_x`) whose staged box fits
// kSmemBudget; one window per block may use all the shared memory there is. The other
// arguments are mma_layout()'s.
inline int windows_per_block_within_budget(const WindowGeometry& g, int64_t head_dim, int64_t windows_x,
                                           int64_t window_step, bool with_bias, int64_t accumulators,
                                           bool voxel_table) {
  int windows = 1;
  while (windows < kMaxWindowsPerBlock && 2 * windows <= windows_x &&
         mma_layout(g, head_dim, 2 * windows, window_step, with_bias, accumulators, voxel_table).total() <= kSmemBudget)
    windows *= 2;
  return windows;
}

// Calls f(std::integral_constant<int, HD>{}) for head_dim HD = 16, 32, ..., 128 (as
// tensor_cores_cover() admits), so each kernel is instantiated per head_dim once.
template <typename F>
void dispatch_head_dim(int64_t head_dim, F&& f) {
  switch (head_dim) {
    case 16: return f(std::integral_constant<int, 16>{});
    case 32: return f(std::integral_constant<int, 32>{});
    case 48: return f(std::integral_constant<int, 48>{});
    case 64: return f(std::integral_constant<int, 64>{});
    case 80: return f(std::integral_constant<int, 80>{});
    case 96: return f(std::integral_constant<int, 96>{});
    case 112: return f(std::integral_constant<int, 112>{});
    default: return f(std::integral_constant<int, 128>{});
  }
}

// The block's shared memory carved as mma_layout() says.
template <typename T>
struct StagedBox {
  T* key;                           // rows x (HD + kRowPad)
  T* value;
  unsigned long long* accum;        // layout accumulators (backward)
  float* mask;                      // 0 or -inf per staged row
  float* bias;                      // this head's bias * log2(e)
  int* key_row;                     // box key -> staged row of the block's first window
  int* key_bias;                    // box key -> bias_key_part
  int* row_voxel;                   // staged row -> voxel (z H + y) W + x, or -1 outside (backward)

  __device__ StagedBox(unsigned char* smem, const MmaLayout& m, int row_length) {
    key = reinterpret_cast<T*>(smem);
    value = key + m.rows * row_length;
    accum = reinterpret_cast<unsigned long long*>(smem + m.kv_bytes);
    mask = reinterpret_cast<float*>(smem + m.kv_bytes + m.accum_bytes);
    bias = mask + m.rows;
    key_row = reinterpret_cast<int*>(bias + m.bias);
    key_bias = key_row + m.keys;
    row_voxel = m.voxel_bytes > 0 ? key_bias + m.keys : nullptr;
  }
};

// Stages the key/value union box of the block's windows (first window wx0), its mask, this
// head's bias and the key tables, 8 elements (16 bytes) per step. Ends with __syncthreads().
template <typename T, int HD>
__device__ void stage_key_box(const AttentionParams<T, float>& p, const MmaLayout& layout, const StagedBox<T>& box,
                              int64_t b, int64_t h, int64_t wz, int64_t wy, int64_t wx0, bool vector_loads) {
  constexpr int kRow = HD + kRowPad;
  constexpr int kChunks = HD / 8;
  const WindowGeometry& g = p.geometry;
  const bool constant_padding = p.pad_key != nullptr;
  const int sy = static_cast<int>(g.search[1]), sx = static_cast<int>(g.search[2]);
  const int union_x = static_cast<int>(layout.union_x);
  const int box_keys = static_cast<int>(g.search[0]) * sy * sx;
  const int64_t bz = key_box_start(g, 0, wz), by = key_box_start(g, 1, wy), bx = key_box_start(g, 2, wx0);
  const int64_t steps = layout.rows * kChunks;
  for (int64_t i = threadIdx.x; i < steps; i += blockDim.x) {
    const int row = static_cast<int>(i / kChunks), chunk = static_cast<int>(i % kChunks);
    const int ux = row % union_x, uy = (row / union_x) % sy, uz = row / (union_x * sy);
    const int64_t z = bz + uz, y = by + uy, x = bx + ux;
    const bool in = inside_volume(g, 0, z) && inside_volume(g, 1, y) && inside_volume(g, 2, x);
    const T* k_src = nullptr;
    const T* v_src = nullptr;
    if (in) {
      k_src = p.key + p.key_strides.offset(b, z, y, x, h) + chunk * 8;
      v_src = p.value + p.value_strides.offset(b, z, y, x, h) + chunk * 8;
    } else if (constant_padding) {
      k_src = p.pad_key + h * HD + chunk * 8;
      v_src = p.pad_value + h * HD + chunk * 8;
    }
    T* k_dst = box.key + row * kRow + chunk * 8;
    T* v_dst = box.value + row * kRow + chunk * 8;
    if (k_src == nullptr) {
      *reinterpret_cast<uint4*>(k_dst) = make_uint4(0, 0, 0, 0);
      *reinterpret_cast<uint4*>(v_dst) = make_uint4(0, 0, 0, 0);
    } else if (vector_loads) {
      *reinterpret_cast<uint4*>(k_dst) = __ldg(reinterpret_cast<const uint4*>(k_src));
      *reinterpret_cast<uint4*>(v_dst) = __ldg(reinterpret_cast<const uint4*>(v_src));
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        k_dst[e] = k_src[e];
        v_dst[e] = v_src[e];
      }
    }
    if (chunk == 0) {
      box.mask[row] = (in || constant_padding) ? 0.f : -INFINITY;
      if (box.row_voxel != nullptr)
        box.row_voxel[row] = in ? static_cast<int>((z * g.volume[1] + y) * g.volume[2] + x) : -1;
    }
  }
  if (p.rel_pos_bias != nullptr) {
    const T* bias_h = p.rel_pos_bias + h * layout.bias;
    for (int64_t e = threadIdx.x; e < layout.bias; e += blockDim.x) box.bias[e] = to_float(bias_h[e]) * kLog2e;
  }
  // Tail keys of the last 16-key tile point at row 0 (finite data, so products stay finite);
  // their scores are -inf and their bias is never read.
  for (int t = threadIdx.x; t < layout.keys; t += blockDim.x) {
    int row = 0, key_part = 0;
    if (t < box_keys) {
      const int tx = t % sx, ty = (t / sx) % sy, tz = t / (sx * sy);
      row = (tz * sy + ty) * union_x + tx;
      key_part = static_cast<int>(bias_key_part(g, tz, ty, tx));
    }
    box.key_row[t] = row;
    box.key_bias[t] = key_part;
  }
  __syncthreads();
}

// The A operand (m = 16 keys, k = 16 head-dim entries from d0) of keys `row0` (group g) and `row1`
// (g + 8) of staged rows: a lane reads its 2 adjacent elements at d0 + 2t and d0 + 2t + 8.
template <typename T, int HD>
__device__ __forceinline__ void rows_as_a(const T* rows, int row0, int row1, int d, uint32_t (&a)[4]) {
  constexpr int kRow = HD + kRowPad;
  a[0] = *reinterpret_cast<const uint32_t*>(rows + row0 * kRow + d);
  a[1] = *reinterpret_cast<const uint32_t*>(rows + row1 * kRow + d);
  a[2] = *reinterpret_cast<const uint32_t*>(rows + row0 * kRow + d + 8);
  a[3] = *reinterpret_cast<const uint32_t*>(rows + row1 * kRow + d + 8);
}

// acc^T += R^T B over the 16 box keys of `tile` (keys tile*16 + 2t + {0, 1, 8, 9} per lane): R^T
// (m = head dim, k = keys) gathered from staged rows `rows` as A operands, B (k = keys, n = the
// window's queries) given as its two registers. acc is the C fragment of each 16-row head-dim
// tile (O^T = V^T P^T in the forward, dQ^T = K^T dS^T in the backward).
template <typename T, int HD>
__device__ __forceinline__ void accumulate_rows_transposed(float (&acc)[HD / 16][4], const T* rows,
                                                           const StagedBox<T>& box, int tile, int row_offset,
                                                           uint32_t b_lo, uint32_t b_hi) {
  constexpr int kRow = HD + kRowPad;
  const int lane = threadIdx.x & 31, group = lane >> 2, quad = lane & 3;
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(rows);
  const int key = tile * 16 + 2 * quad;
  const int row0 = (box.key_row[key] + row_offset) * kRow, row1 = (box.key_row[key + 1] + row_offset) * kRow;
  const int row2 = (box.key_row[key + 8] + row_offset) * kRow, row3 = (box.key_row[key + 9] + row_offset) * kRow;
#pragma unroll
  for (int mt = 0; mt < HD / 16; ++mt) {
    const int d = mt * 16 + group;
    const uint32_t a[4] = {
        pack_bits(bits[row0 + d], bits[row1 + d]),
        pack_bits(bits[row0 + d + 8], bits[row1 + d + 8]),
        pack_bits(bits[row2 + d], bits[row3 + d]),
        pack_bits(bits[row2 + d + 8], bits[row3 + d + 8]),
    };
    Mma<T>::run(acc[mt], a, b_lo, b_hi);
  }
}

// Query slots (0..7, row-major over the window) of window (wz, wy, wx).
struct WindowQueries {
  const WindowGeometry& g;
  int wd, wh, ww;
  int64_t oz, oy, ox;

  __device__ WindowQueries(const WindowGeometry& geometry, int64_t wz, int64_t wy, int64_t wx)
      : g(geometry),
        wd(static_cast<int>(geometry.window[0])),
        wh(static_cast<int>(geometry.window[1])),
        ww(static_cast<int>(geometry.window[2])),
        oz(window_origin(geometry, 0, wz)),
        oy(window_origin(geometry, 1, wy)),
        ox(window_origin(geometry, 2, wx)) {}

  // Slot q's voxel, or -1 for a slot outside the volume or the window; its bias_query_part.
  __device__ int64_t voxel(int q, int& bias_part) const {
    bias_part = 0;
    if (q >= wd * wh * ww) return -1;
    const int ax = q % ww, ay = (q / ww) % wh, az = q / (ww * wh);
    bias_part = static_cast<int>(bias_query_part(g, az, ay, ax));
    const int64_t z = oz + az, y = oy + ay, x = ox + ax;
    if (!(inside_volume(g, 0, z) && inside_volume(g, 1, y) && inside_volume(g, 2, x))) return -1;
    return (z * g.volume[1] + y) * g.volume[2] + x;
  }
};

// Pointer to the row of (b, voxel, h) of a strided (B, D, H, W, heads, head_dim) tensor.
template <typename T>
__device__ __forceinline__ const T* token_row(const T* base, const TokenStrides& strides, const WindowGeometry& g,
                                              int64_t b, int64_t voxel, int64_t h) {
  const VoxelCoords c = voxel_coords(g, voxel);
  return base + strides.offset(b, c.z, c.y, c.x, h);
}

}  // namespace cuda
}  // namespace xmorpher_kernels
