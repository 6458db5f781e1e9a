// Plain description of one window cross attention call: pointers, strides and sizes, no ATen
// types, so kernels of every backend (and CPU code compiled for several instruction sets) take
// the same struct.
#pragma once

#include <cstdint>

#include "xmorpher_kernels/window_geometry.h"

namespace xmorpher_kernels {

// Strides, in elements, of a (B, D, H, W, heads, head_dim) tensor whose last dimension is
// contiguous.
struct TokenStrides {
  int64_t batch, depth, height, width, head;

  XK_HOST_DEVICE int64_t offset(int64_t b, int64_t z, int64_t y, int64_t x, int64_t h) const {
    return b * batch + z * depth + y * height + x * width + h * head;
  }
};

// `scalar_t` is the storage type of the tensors, `acc_t` the accumulation type (float for
// fp32/bf16/fp16, double for fp64). Optional pointers are null when the option is off.
template <typename scalar_t, typename acc_t>
struct AttentionParams {
  WindowGeometry geometry;
  int64_t batch, heads, head_dim;
  acc_t scale;

  const scalar_t* query;
  const scalar_t* key;
  const scalar_t* value;
  TokenStrides query_strides, key_strides, value_strides;

  const scalar_t* rel_pos_bias;  // contiguous (heads, Ed, Eh, Ew), or null
  const scalar_t* pad_key;       // contiguous (heads, head_dim) with padding="constant", else null
  const scalar_t* pad_value;

  scalar_t* out;                 // contiguous (B, D, H, W, heads, head_dim)
  acc_t* lse;                    // contiguous (B, heads, D, H, W): log-sum-exp per query

  // Backward only.
  const scalar_t* grad_out;
  TokenStrides grad_out_strides;
  scalar_t* grad_query;          // contiguous, like out
  acc_t* grad_key;               // contiguous accumulators, like out
  acc_t* grad_value;
  double* partials;              // per-slot partial sums of the bias and pad gradients (in fp64:
                                 // each sums many terms)
  int64_t partial_stride;        // elements per slot
};

}  // namespace xmorpher_kernels
