// The brick tensor-core kernels as the CUDA backend calls them (window_attention_cuda_brick.cu):
// opt-in through xmorpher_kernels/kernel_generation.h, for the calls brick::call_not_covered()
// admits; the CUDA backend falls back to its other kernels otherwise.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "xmorpher_kernels/brick_glue.h"
#include "xmorpher_kernels/op_checks.h"

namespace xmorpher_kernels {
namespace cuda {

// Writes out and lse (allocated by the caller); false, launching nothing, when not covered.
bool brick_forward(const OpInputs& in, double scale, at::Tensor& out, at::Tensor& lse);

// The six gradients (empty tensors for absent optional inputs) in three launches at most, without
// atomics (deterministic); nullopt, launching nothing, when not covered. grad_out last-dim
// contiguous, out and lse contiguous.
std::optional<brick::Gradients> brick_backward(const OpInputs& in, double scale, const at::Tensor& grad_out,
                                               const at::Tensor& out, const at::Tensor& lse);

}  // namespace cuda
}  // namespace xmorpher_kernels
