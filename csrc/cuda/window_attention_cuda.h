// Launchers of the CUDA kernels of window cross attention, called by the op implementation in
// window_attention_cuda.cu. They take the plain AttentionParams (storage type float, __half or
// __nv_bfloat16; fp32 accumulation) and run on the given stream; every launch is checked.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "xmorpher_kernels/attention_params.h"
#include "xmorpher_kernels/brick_kernels.h"

namespace xmorpher_kernels {
namespace cuda {

// Generic forward: one warp per query, online softmax over its key box read through the cache.
// Any geometry, head_dim 1..128, every dtype.
template <typename T>
void launch_forward_generic(const AttentionParams<T, float>& p, cudaStream_t stream);

// Tensor-core forward for fp16/bf16 (window_attention_cuda_mma.cu). Returns false, launching
// nothing, when the call is outside what it covers: windows of more than 8 queries, head_dim not
// a multiple of 16 or above 128, or a key box too large for shared memory. `vector_loads` says
// key, value and pad rows may be read 16 bytes at a time (aligned base and strides).
template <typename T>
bool launch_forward_mma(const AttentionParams<T, float>& p, bool vector_loads, cudaStream_t stream);

// Tensor-core backward for fp16/bf16 (window_attention_cuda_mma_backward.cu), covering what
// launch_forward_mma() covers. Adds dK/dV into p.grad_key/p.grad_value (zeroed fp32), writes dQ,
// and adds the bias and pad gradients into `fixed` ((heads, bias entries + 2 head_dim with
// constant padding), zeroed; in units of 1 / *inv_unit, a device scalar). `deterministic`
// selects the atomic-free colour schedule. Returns false, launching nothing, outside what it
// covers.
template <typename T>
bool launch_backward_mma(const AttentionParams<T, float>& p, bool vector_loads, bool deterministic,
                         unsigned long long* fixed, const double* inv_unit, cudaStream_t stream);

// Backward, query side: dQ, the bias and pad partials (p.partials holds `partial_warps` slots per
// (b, head, wz, wy), each p.partial_stride floats), and with `atomic_key_grads` dK/dV scattered
// with atomics into p.grad_key/p.grad_value (zeroed fp32). Without it, writes each query's
// <dO, O> to `delta` for launch_backward_keys().
template <typename T>
void launch_backward_queries(const AttentionParams<T, float>& p, int partial_warps, bool atomic_key_grads,
                             float* delta, cudaStream_t stream);

// Warps per slot launch_backward_queries() will use, so the caller can size p.partials.
int backward_query_warps(const WindowGeometry& g, int64_t head_dim, bool with_bias);

// Backward, key side (deterministic, atomic-free): one warp per key voxel sums over the queries
// whose key box holds it, in a fixed order, and writes p.grad_key/p.grad_value (fp32).
template <typename T>
void launch_backward_keys(const AttentionParams<T, float>& p, const float* delta, cudaStream_t stream);

// Brick tensor-core kernels for fp16/bf16 (window_attention_cuda_brick_*.cu; design in
// csrc/include/xmorpher_kernels/brick_kernels.h), launched with a plan from brick::choose_plan()
// for the calls brick::not_covered() admits. Each returns the launch's CUDA error.
//   forward: out and lse;
//   query pass (plan of BoxKind::kKeysOfWindow): dQ into p.grad_query, <dO, O> into outs.delta,
//     one row of bias/pad partial sums per block into outs.partials;
//   key pass (plan of BoxKind::kQueriesOfKeyBlock, after the query pass): dK and dV;
//   reduce (after the query pass, when outs.partial_stride > 0): the bias and pad gradients.
template <typename T>
cudaError_t launch_brick_forward(const AttentionParams<T, float>& p, const brick::BrickPlan& plan,
                                 const brick::ScoreScale& sc, cudaStream_t stream);
template <typename T>
cudaError_t launch_brick_query_pass(const AttentionParams<T, float>& p, const brick::BrickPlan& plan,
                                    const brick::ScoreScale& sc, const brick::BackwardOutputs<T>& outs,
                                    cudaStream_t stream);
template <typename T>
cudaError_t launch_brick_key_pass(const AttentionParams<T, float>& p, const brick::BrickPlan& plan,
                                  const brick::ScoreScale& sc, const brick::BackwardOutputs<T>& outs,
                                  cudaStream_t stream);
template <typename T>
cudaError_t launch_brick_reduce(const brick::BackwardOutputs<T>& outs, int64_t batch, int64_t heads, int64_t bricks,
                                int head_dim, cudaStream_t stream);

}  // namespace cuda
}  // namespace xmorpher_kernels
