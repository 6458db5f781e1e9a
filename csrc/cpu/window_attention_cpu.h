// Entry points of the fused CPU kernels, one set per instruction set. The kernels are templates
// over (storage type, accumulation type), instantiated for (float, float), (double, double) and
// (uint16_t = bf16 bits, float) in window_attention_cpu_{avx512,avx2,baseline}.cpp.
// Scratch sizes are the same for every build: tile_acc_elements() and tile_index_elements().
#pragma once

#include <cstdint>

#include "xmorpher_kernels/attention_params.h"

namespace xmorpher_kernels {
namespace cpu {

#define XK_DECLARE_CPU_KERNELS(isa)                                                            \
  namespace isa {                                                                              \
  template <typename scalar_t, typename acc_t>                                                 \
  void forward_windows(const AttentionParams<scalar_t, acc_t>& p, int64_t begin, int64_t end,  \
                       acc_t* scratch, int64_t* index_scratch, const acc_t** row_scratch);     \
  template <typename scalar_t, typename acc_t>                                                 \
  void backward_windows(const AttentionParams<scalar_t, acc_t>& p, int64_t color,              \
                        int64_t begin, int64_t end, acc_t* scratch, int64_t* index_scratch,    \
                        const acc_t** row_scratch);                                            \
  bool built();                                                                                \
  }

XK_DECLARE_CPU_KERNELS(avx512)
XK_DECLARE_CPU_KERNELS(avx2)
XK_DECLARE_CPU_KERNELS(baseline)

#undef XK_DECLARE_CPU_KERNELS

// Queries processed together, one per vector lane (the paper's 2x2x2 window holds 8).
constexpr int64_t kQueryLanes = 8;

// Scratch elements one thread needs: accumulation-type tiles and indices (see WindowTiles).
inline int64_t tile_acc_elements(const WindowGeometry& g, int64_t head_dim) {
  const int64_t nk = g.search[0] * g.search[1] * g.search[2];
  return 5 * kQueryLanes * head_dim + 2 * nk * head_dim + 2 * nk * kQueryLanes + 2 * head_dim;
}
inline int64_t tile_row_pointers(const WindowGeometry& g) { return 2 * g.search[0] * g.search[1] * g.search[2]; }
inline int64_t tile_index_elements(const WindowGeometry& g) {
  const int64_t nq = g.window[0] * g.window[1] * g.window[2];
  const int64_t nk = g.search[0] * g.search[1] * g.search[2];
  return 2 * nq + 2 * nk;
}

}  // namespace cpu
}  // namespace xmorpher_kernels
