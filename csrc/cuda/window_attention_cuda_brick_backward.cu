// Brick tensor-core backward of window cross attention for fp16/bf16: the query pass, the key
// pass and the reduction of the bias/pad partials (three launches, no atomics; design and bodies
// in csrc/include/xmorpher_kernels/brick_kernels.h). Torch-free: nvcc compiles this file alone.
#include "brick_launch.cuh"
#include "window_attention_cuda.h"

namespace xmorpher_kernels {
namespace cuda {
namespace {

template <typename T, int HD>
__global__ void __launch_bounds__(brick::kMaxWarps * 32, kQueryPassMinBlocks)
    brick_query_pass_kernel(const AttentionParams<T, float> p, const brick::BrickPlan plan,
                            const brick::ScoreScale sc, const brick::BackwardOutputs<T> outs) {
  extern __shared__ __align__(1024) unsigned char smem[];
  brick::query_pass_block<T, HD>(p, plan, sc, outs, smem);
}

template <typename T, int HD>
__global__ void __launch_bounds__(brick::kMaxWarps * 32, brick_min_blocks(HD))
    brick_key_pass_kernel(const AttentionParams<T, float> p, const brick::BrickPlan plan, const brick::ScoreScale sc,
                          const brick::BackwardOutputs<T> outs) {
  extern __shared__ __align__(1024) unsigned char smem[];
  brick::key_pass_block<T, HD>(p, plan, sc, outs, smem);
}

template <typename T>
__global__ void __launch_bounds__(brick::kReduceThreads)
    brick_reduce_kernel(const brick::BackwardOutputs<T> outs, int64_t batch, int64_t heads, int64_t bricks,
                        int head_dim) {
  brick::reduce_block<T>(outs, batch, heads, bricks, head_dim);
}

}  // namespace

template <typename T>
cudaError_t launch_brick_query_pass(const AttentionParams<T, float>& p, const brick::BrickPlan& plan,
                                    const brick::ScoreScale& sc, const brick::BackwardOutputs<T>& outs,
                                    cudaStream_t stream) {
  return dispatch_brick_head_dim(plan.chunks * 8, [&](auto head_dim) {
    constexpr int kHeadDim = decltype(head_dim)::value;
    return launch_brick_kernel<brick_query_pass_kernel<T, kHeadDim>>(plan, stream, p, plan, sc, outs);
  });
}

template <typename T>
cudaError_t launch_brick_key_pass(const AttentionParams<T, float>& p, const brick::BrickPlan& plan,
                                  const brick::ScoreScale& sc, const brick::BackwardOutputs<T>& outs,
                                  cudaStream_t stream) {
  return dispatch_brick_head_dim(plan.chunks * 8, [&](auto head_dim) {
    constexpr int kHeadDim = decltype(head_dim)::value;
    return launch_brick_kernel<brick_key_pass_kernel<T, kHeadDim>>(plan, stream, p, plan, sc, outs);
  });
}

template <typename T>
cudaError_t launch_brick_reduce(const brick::BackwardOutputs<T>& outs, int64_t batch, int64_t heads, int64_t bricks,
                                int head_dim, cudaStream_t stream) {
  const int64_t blocks = brick::reduce_blocks(outs.partial_stride, heads);
  brick_reduce_kernel<T><<<static_cast<unsigned>(blocks), brick::kReduceThreads, 0, stream>>>(outs, batch, heads, bricks,
                                                                                            head_dim);
  return cudaGetLastError();
}

#define XK_INSTANTIATE_BRICK_BACKWARD(T)                                                                           \
  template cudaError_t launch_brick_query_pass<T>(const AttentionParams<T, float>&, const brick::BrickPlan&,       \
                                                  const brick::ScoreScale&, const brick::BackwardOutputs<T>&,      \
                                                  cudaStream_t);                                                   \
  template cudaError_t launch_brick_key_pass<T>(const AttentionParams<T, float>&, const brick::BrickPlan&,         \
                                                const brick::ScoreScale&, const brick::BackwardOutputs<T>&,        \
                                                cudaStream_t);                                                     \
  template cudaError_t launch_brick_reduce<T>(const brick::BackwardOutputs<T>&, int64_t, int64_t, int64_t, int,    \
                                              cudaStream_t);
XK_INSTANTIATE_BRICK_BACKWARD(__half)
XK_INSTANTIATE_BRICK_BACKWARD(__nv_bfloat16)
#undef XK_INSTANTIATE_BRICK_BACKWARD

}  // namespace cuda
}  // namespace xmorpher_kernels
