// What the brick kernels' launchers share (window_attention_cuda_brick_forward.cu,
// window_attention_cuda_brick_backward.cu): head_dim dispatch, the blocks-per-SM target of
// __launch_bounds__, and a launch that raises the kernel's dynamic shared-memory limit once per
// device and size. Torch-free; errors come back as cudaError_t for the caller to raise.
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <type_traits>

#include "xmorpher_kernels/brick_kernels.h"

namespace xmorpher_kernels {
namespace cuda {

// Two blocks per SM (128 registers a thread) at head_dim 16, where two blocks' staged rows fit;
// the query pass, which keeps the bias gradient of its whole box in registers, takes one.
constexpr int brick_min_blocks(int head_dim) { return head_dim <= 16 ? 2 : 1; }
constexpr int kQueryPassMinBlocks = 1;

// Calls f(std::integral_constant<int, HD>{}) for the head dims the brick kernels take.
template <typename F>
cudaError_t dispatch_brick_head_dim(int head_dim, F&& f) {
  switch (head_dim) {
    case 16: return f(std::integral_constant<int, 16>{});
    case 32: return f(std::integral_constant<int, 32>{});
    default: return cudaErrorInvalidValue;
  }
}

constexpr int kBrickMaxDevices = 64;

// Launches `Kernel` with the plan's grid, block and dynamic shared memory on `stream`.
template <auto Kernel, typename... Args>
cudaError_t launch_brick_kernel(const brick::BrickPlan& plan, cudaStream_t stream, const Args&... args) {
  static std::atomic<int64_t> allowed[kBrickMaxDevices] = {};
  const int64_t bytes = plan.bytes;
  if (bytes > 48 * 1024) {
    int device = 0;
    cudaError_t error = cudaGetDevice(&device);
    if (error != cudaSuccess) return error;
    if (device < 0 || device >= kBrickMaxDevices) return cudaErrorInvalidDevice;
    if (bytes > allowed[device].load(std::memory_order_relaxed)) {
      error = cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
      if (error != cudaSuccess) return error;
      allowed[device].store(bytes, std::memory_order_relaxed);
    }
  }
  Kernel<<<static_cast<unsigned>(plan.blocks), plan.warps * 32, static_cast<size_t>(bytes), stream>>>(args...);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace xmorpher_kernels
