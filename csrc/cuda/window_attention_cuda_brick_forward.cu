// Brick tensor-core forward of window cross attention for fp16/bf16 (design and body:
// csrc/include/xmorpher_kernels/brick_kernels.h; layout: brick_layout.h). Torch-free: nvcc
// compiles this file alone in seconds.
#include "brick_launch.cuh"
#include "window_attention_cuda.h"

namespace xmorpher_kernels {
namespace cuda {
namespace {

template <typename T, int HD>
__global__ void __launch_bounds__(brick::kMaxWarps * 32, brick_min_blocks(HD))
    brick_forward_kernel(const AttentionParams<T, float> p, const brick::BrickPlan plan, const brick::ScoreScale sc) {
  extern __shared__ __align__(1024) unsigned char smem[];
  brick::forward_block<T, HD>(p, plan, sc, smem);
}

}  // namespace

template <typename T>
cudaError_t launch_brick_forward(const AttentionParams<T, float>& p, const brick::BrickPlan& plan,
                                 const brick::ScoreScale& sc, cudaStream_t stream) {
  return dispatch_brick_head_dim(plan.chunks * 8, [&](auto head_dim) {
    constexpr int kHeadDim = decltype(head_dim)::value;
    return launch_brick_kernel<brick_forward_kernel<T, kHeadDim>>(plan, stream, p, plan, sc);
  });
}

template cudaError_t launch_brick_forward<__half>(const AttentionParams<__half, float>&, const brick::BrickPlan&,
                                                  const brick::ScoreScale&, cudaStream_t);
template cudaError_t launch_brick_forward<__nv_bfloat16>(const AttentionParams<__nv_bfloat16, float>&,
                                                         const brick::BrickPlan&, const brick::ScoreScale&,
                                                         cudaStream_t);

}  // namespace cuda
}  // namespace xmorpher_kernels
