// The CPU emulator of the brick CUDA kernels (brick_emulator.cpp): the ops on CPU tensors, for
// the tests, and the counters it keeps.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <tuple>

namespace xmorpher_kernels {
namespace brick {
namespace emu {

struct EmulatorStats {
  int64_t blocks = 0;                 // blocks run
  int64_t ldsm_phases = 0;            // ldmatrix 8 x 8 matrices loaded
  int64_t ldsm_extra_wavefronts = 0;  // shared-memory wavefronts beyond one per matrix (bank conflicts)
  int64_t cp_async = 0;               // 16-byte asynchronous copies
};

// The counters since the last call, reset.
EmulatorStats take_stats();

// window_attention_forward / _backward (schemas in csrc/window_attention.cpp) on CPU fp16/bf16
// tensors through the emulated brick kernels; raise when the brick kernels do not cover a call.
// Outputs start as NaN, so an element no kernel writes shows.
std::tuple<at::Tensor, at::Tensor> emulate_forward(const at::Tensor& query, const at::Tensor& key,
                                                   const at::Tensor& value, at::IntArrayRef window_size,
                                                   at::IntArrayRef search_size, double scale,
                                                   const c10::optional<at::Tensor>& rel_pos_bias,
                                                   const c10::optional<at::Tensor>& pad_key,
                                                   const c10::optional<at::Tensor>& pad_value);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> emulate_backward(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& out, const at::Tensor& lse, at::IntArrayRef window_size, at::IntArrayRef search_size,
    double scale, const c10::optional<at::Tensor>& rel_pos_bias, const c10::optional<at::Tensor>& pad_key,
    const c10::optional<at::Tensor>& pad_value);

}  // namespace emu
}  // namespace brick
}  // namespace xmorpher_kernels
