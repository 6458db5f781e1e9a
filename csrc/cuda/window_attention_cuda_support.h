// What the CUDA backend supports, declared beside its kernels: the op implementation
// (window_attention_cuda.cu) and the kernels check these rules, and the module in
// window_attention.cpp exposes them to the Python dispatcher, which never restates them.
// Plain C++ (no CUDA headers), so the module's C++ translation unit can include it.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>
#include <vector>

#include "xmorpher_kernels/window_geometry.h"

namespace xmorpher_kernels {
namespace cuda {

// Head dims the kernels take: the generic kernels keep up to 4 elements per lane.
constexpr int kMaxHeadDim = 128;

// Dtypes the CUDA kernels take.
inline const std::vector<c10::ScalarType>& supported_dtypes() {
  static const std::vector<c10::ScalarType> dtypes{c10::ScalarType::Float, c10::ScalarType::Half,
                                                   c10::ScalarType::BFloat16};
  return dtypes;
}

// Whether the tensor-core kernels cover a call's geometry and head_dim (for fp16/bf16 inputs):
// windows of at most 8 queries (the 8-column side of m16n8k16), head_dim a multiple of 16 up to
// 128, box rows indexable in 32 bits. Every other call runs on the generic CUDA-core kernels.
inline bool tensor_cores_cover(const WindowGeometry& g, int64_t head_dim) {
  return g.window[0] * g.window[1] * g.window[2] <= 8 && head_dim % 16 == 0 && head_dim <= kMaxHeadDim &&
         g.search[0] * g.search[1] * g.search[2] < (int64_t{1} << 20);
}

inline bool tensor_cores_cover(const WindowGeometry& g, int64_t head_dim, c10::ScalarType dtype) {
  return (dtype == c10::ScalarType::Half || dtype == c10::ScalarType::BFloat16) && tensor_cores_cover(g, head_dim);
}

}  // namespace cuda
}  // namespace xmorpher_kernels
