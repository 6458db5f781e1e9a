// The CUDA backend's entry to the brick kernels: brick_glue.h's launch sequence with a runner
// that launches on the current stream and raises any CUDA error naming the kernel.
#include "window_attention_cuda_brick.h"

#include <c10/cuda/CUDAStream.h>

#include <atomic>
#include <type_traits>

#include "window_attention_cuda.h"

namespace xmorpher_kernels {
namespace cuda {
namespace {

void check(cudaError_t error, const char* kernel) {
  TORCH_CHECK(error == cudaSuccess, "xmorpher_kernels: CUDA kernel ", kernel, " failed: ", cudaGetErrorString(error));
}

struct CudaRunner {
  template <typename AtT>
  using Storage = std::conditional_t<std::is_same_v<AtT, at::Half>, __half, __nv_bfloat16>;

  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  // The most shared memory a block of the current device may opt in to, asked once per device.
  int64_t smem_limit() const {
    static std::atomic<int> known[64] = {};
    int device = 0;
    check(cudaGetDevice(&device), "cudaGetDevice");
    TORCH_CHECK(device >= 0 && device < 64, "xmorpher_kernels: CUDA device index ", device, " out of range");
    int bytes = known[device].load(std::memory_order_relaxed);
    if (bytes == 0) {
      check(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
            "cudaDeviceGetAttribute(MaxSharedMemoryPerBlockOptin)");
      known[device].store(bytes, std::memory_order_relaxed);
    }
    return bytes;
  }

  at::Tensor allocate(at::IntArrayRef sizes, const at::TensorOptions& options) const {
    return at::empty(sizes, options);
  }

  template <typename T>
  void forward(const AttentionParams<T, float>& p, const brick::BrickPlan& plan, const brick::ScoreScale& sc) {
    check(launch_brick_forward<T>(p, plan, sc, stream), "brick_forward_kernel");
  }
  template <typename T>
  void query_pass(const AttentionParams<T, float>& p, const brick::BrickPlan& plan, const brick::ScoreScale& sc,
                  const brick::BackwardOutputs<T>& outs) {
    check(launch_brick_query_pass<T>(p, plan, sc, outs, stream), "brick_query_pass_kernel");
  }
  template <typename T>
  void key_pass(const AttentionParams<T, float>& p, const brick::BrickPlan& plan, const brick::ScoreScale& sc,
                const brick::BackwardOutputs<T>& outs) {
    check(launch_brick_key_pass<T>(p, plan, sc, outs, stream), "brick_key_pass_kernel");
  }
  template <typename T>
  void reduce(const brick::BackwardOutputs<T>& outs, int64_t batch, int64_t heads, int64_t bricks, int head_dim) {
    check(launch_brick_reduce<T>(outs, batch, heads, bricks, head_dim, stream), "brick_reduce_kernel");
  }
};

}  // namespace

bool brick_forward(const OpInputs& in, double scale, at::Tensor& out, at::Tensor& lse) {
  CudaRunner runner;
  return brick::forward(runner, in, scale, out, lse);
}

std::optional<brick::Gradients> brick_backward(const OpInputs& in, double scale, const at::Tensor& grad_out,
                                               const at::Tensor& out, const at::Tensor& lse) {
  CudaRunner runner;
  return brick::backward(runner, in, scale, grad_out, out, lse);
}

}  // namespace cuda
}  // namespace xmorpher_kernels
