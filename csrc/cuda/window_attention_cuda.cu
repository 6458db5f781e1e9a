// CUDA implementation of the window attention ops (schema in csrc/window_attention.cpp):
// argument plumbing, the choice of kernels, the deterministic/fast backward switch and the
// fixed-order reduction of the bias and pad partials. Kernels live in
// window_attention_cuda_generic.cu (every configuration), window_attention_cuda_mma.cu and
// window_attention_cuda_mma_backward.cu (tensor cores, fp16/bf16).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "cuda_common.cuh"
#include "window_attention_cuda.h"
#include "window_attention_cuda_brick.h"
#include "xmorpher_kernels/kernel_generation.h"
#include "xmorpher_kernels/op_checks.h"

namespace xmorpher_kernels {
namespace cuda {
namespace {

// Kernel storage type of an ATen scalar type.
template <typename T> struct Storage { using type = T; };
template <> struct Storage<at::Half> { using type = __half; };
template <> struct Storage<at::BFloat16> { using type = __nv_bfloat16; };

// Calls f(scalar_t{}) for the dtypes the kernels are built for (check_cuda_inputs rejects others).
template <typename F>
void dispatch_dtype(at::ScalarType dtype, const char* op, F&& f) {
  switch (dtype) {
    case at::kFloat: return f(float{});
    case at::kHalf: return f(at::Half{});
    case at::kBFloat16: return f(at::BFloat16{});
    default: TORCH_CHECK(false, op, " (cuda): unsupported dtype ", dtype);
  }
}

OpInputs check_cuda_inputs(const char* op, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                           at::IntArrayRef window_size, at::IntArrayRef search_size,
                           const c10::optional<at::Tensor>& rel_pos_bias, const c10::optional<at::Tensor>& pad_key,
                           const c10::optional<at::Tensor>& pad_value) {
  OpInputs in = check_op_inputs(op, query, key, value, window_size, search_size, rel_pos_bias, pad_key, pad_value,
                                supported_dtypes());
  TORCH_CHECK(query.size(5) <= kMaxHeadDim, op, " (cuda): head_dim must be at most ", kMaxHeadDim, ", got ",
              query.size(5));
  return in;
}

// Whether key, value and pad rows can be read 16 bytes at a time by the tensor-core kernel.
bool rows_are_16_byte_aligned(const OpInputs& in) {
  auto aligned = [](const at::Tensor& t) {
    if (!t.defined()) return true;
    if (reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 != 0) return false;
    const int64_t elements = 16 / t.element_size();
    for (int64_t d = 0; d + 1 < t.dim(); ++d)
      if (t.size(d) > 1 && t.stride(d) % elements != 0) return false;
    return true;
  };
  return aligned(in.key) && aligned(in.value) && aligned(in.pad_key) && aligned(in.pad_value);
}

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& query_in, const at::Tensor& key_in,
                                           const at::Tensor& value_in, at::IntArrayRef window_size,
                                           at::IntArrayRef search_size, double scale,
                                           const c10::optional<at::Tensor>& rel_pos_bias,
                                           const c10::optional<at::Tensor>& pad_key,
                                           const c10::optional<at::Tensor>& pad_value) {
  const OpInputs in = check_cuda_inputs("window_attention_forward", query_in, key_in, value_in, window_size,
                                        search_size, rel_pos_bias, pad_key, pad_value);
  const at::Tensor& query = in.query;
  const c10::cuda::CUDAGuard device_guard(query.device());
  auto out = at::empty(query.sizes(), query.options().memory_format(at::MemoryFormat::Contiguous));
  auto lse = at::empty({query.size(0), query.size(4), query.size(1), query.size(2), query.size(3)},
                       query.options().dtype(at::kFloat));
  if (query.numel() == 0) return {out, lse};
  // The brick kernels, when switched on (XMORPHER_KERNELS_CUDA_KERNELS=brick), for the calls they cover.
  if (cuda_kernels() == CudaKernels::kBrick && brick_forward(in, scale, out, lse)) return {out, lse};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  dispatch_dtype(query.scalar_type(), "window_attention_forward", [&](auto tag) {
    using scalar_t = decltype(tag);
    using T = typename Storage<scalar_t>::type;
    auto p = input_params<T, float, scalar_t>(in, scale);
    p.out = reinterpret_cast<T*>(out.mutable_data_ptr<scalar_t>());
    p.lse = lse.mutable_data_ptr<float>();
    bool done = false;
    if constexpr (!std::is_same_v<T, float>) done = launch_forward_mma(p, rows_are_16_byte_aligned(in), stream);
    if (!done) launch_forward_generic(p, stream);
  });
  return {out, lse};
}

// The tensor-core backward sums the bias and pad gradients in fixed point, in units of
// 2^exponent (a device scalar: no host sync). Every term is bounded: |dS| <= |dP| + |<dO, O>|
// <= 2 head_dim max|dO| max|V| (O is a mix of value rows), a pad_key term by that times
// max|Q| scale, a pad_value term by max|dO|; there are at most B heads voxels box_keys of each.
// The exponent puts that many bounds at 2^62 units, so no sum overflows int64 and a typical term
// keeps about fp32's relative precision. NaN or inf inputs give a non-finite unit, so the
// gradients come out non-finite too.
at::Tensor fixed_point_exponent(const OpInputs& in, const at::Tensor& grad_out, double scale) {
  auto amax = [](const at::Tensor& t) {
    return at::linalg_vector_norm(t, INFINITY, at::OptionalIntArrayRef{}, false, at::kFloat).to(at::kDouble);
  };
  at::Tensor value_max = amax(in.value);
  if (in.pad_value.defined()) value_max = at::maximum(value_max, amax(in.pad_value));
  const at::Tensor grad_max = amax(grad_out);
  const at::Tensor ds_bound = grad_max * value_max * (2.0 * in.query.size(5));
  const double terms = static_cast<double>(in.query.numel() / in.query.size(5)) *
                       static_cast<double>(in.geometry.search[0] * in.geometry.search[1] * in.geometry.search[2]);
  const at::Tensor total =
      at::maximum(at::maximum(ds_bound, ds_bound * amax(in.query) * scale), grad_max) * terms;
  return at::clamp(at::ceil(at::log2(total)) - 62.0, -1000.0, 960.0).masked_fill(at::isfinite(total).logical_not(), NAN);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_out_in, const at::Tensor& query_in, const at::Tensor& key_in, const at::Tensor& value_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, at::IntArrayRef window_size, at::IntArrayRef search_size,
    double scale, const c10::optional<at::Tensor>& rel_pos_bias, const c10::optional<at::Tensor>& pad_key,
    const c10::optional<at::Tensor>& pad_value, bool deterministic) {
  const OpInputs in = check_cuda_inputs("window_attention_backward", query_in, key_in, value_in, window_size,
                                        search_size, rel_pos_bias, pad_key, pad_value);
  const at::Tensor& query = in.query;
  const WindowGeometry& g = in.geometry;
  const c10::cuda::CUDAGuard device_guard(query.device());
  const at::Tensor grad_out = last_dim_contiguous(grad_out_in);
  const at::Tensor out = out_in.contiguous();
  const at::Tensor lse = lse_in.contiguous();
  check_backward_tensors(query, grad_out, out, lse, at::kFloat);
  // The brick kernels, when switched on (XMORPHER_KERNELS_CUDA_KERNELS=brick), for the calls they
  // cover: deterministic without atomics, whatever `deterministic` says.
  if (cuda_kernels() == CudaKernels::kBrick) {
    if (std::optional<brick::Gradients> g = brick_backward(in, scale, grad_out, out, lse))
      return {g->query, g->key, g->value, g->rel_pos_bias, g->pad_key, g->pad_value};
  }

  // deterministic: the atomic-free schedules (colour passes of the tensor-core kernel, or the
  // key-side generic kernel). Otherwise fp32 atomics.
  const auto contiguous = query.options().memory_format(at::MemoryFormat::Contiguous);
  const int64_t batch = query.size(0), heads = query.size(4), head_dim = query.size(5);
  at::Tensor grad_query = at::empty(query.sizes(), contiguous);
  // Accumulated into by every path but the generic deterministic one, which writes each once.
  at::Tensor grad_key = at::zeros(query.sizes(), contiguous.dtype(at::kFloat));
  at::Tensor grad_value = at::zeros(query.sizes(), contiguous.dtype(at::kFloat));

  const bool with_bias = in.rel_pos_bias.defined(), with_pad = in.pad_key.defined();
  const int64_t bias_per_head = bias_extent(g, 0) * bias_extent(g, 1) * bias_extent(g, 2);
  const int64_t partial_stride = (with_bias ? bias_per_head : 0) + (with_pad ? 2 * head_dim : 0);
  at::Tensor per_head;  // (heads, partial_stride) fp64 sums of the bias and pad gradients

  if (query.numel() > 0) {
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    dispatch_dtype(query.scalar_type(), "window_attention_backward", [&](auto tag) {
      using scalar_t = decltype(tag);
      using T = typename Storage<scalar_t>::type;
      auto p = backward_params<T, float, scalar_t>(in, scale, grad_out, out, lse, grad_query, grad_key, grad_value);
      if constexpr (!std::is_same_v<T, float>) {
        at::Tensor fixed, exponent, inv_unit;  // fixed-point sums: the same in any order
        if (partial_stride > 0) {
          fixed = at::zeros({heads, partial_stride}, contiguous.dtype(at::kLong));
          exponent = fixed_point_exponent(in, grad_out, scale);
          inv_unit = at::exp2(-exponent);
        }
        auto* fixed_ptr = fixed.defined() ? reinterpret_cast<unsigned long long*>(fixed.mutable_data_ptr<int64_t>())
                                          : nullptr;
        const double* inv_unit_ptr = inv_unit.defined() ? inv_unit.const_data_ptr<double>() : nullptr;
        if (launch_backward_mma(p, rows_are_16_byte_aligned(in), deterministic, fixed_ptr, inv_unit_ptr, stream)) {
          if (fixed.defined()) per_head = fixed.to(at::kDouble).mul_(at::exp2(exponent));
          return;
        }
      }
      // Generic kernels. Partials: (B, heads, slot (wz, wy) x warp, partial_stride); each warp
      // writes its own entries, summed below in a fixed order.
      const int warps = backward_query_warps(g, head_dim, with_bias);
      at::Tensor partials;
      if (partial_stride > 0) {
        partials = at::empty({batch, heads, num_windows(g, 0) * num_windows(g, 1) * warps, partial_stride},
                             contiguous.dtype(at::kDouble));
      }
      at::Tensor delta;
      if (deterministic) delta = at::empty({batch, heads, g.volume[0], g.volume[1], g.volume[2]}, contiguous.dtype(at::kFloat));
      p.partials = partials.defined() ? partials.mutable_data_ptr<double>() : nullptr;
      p.partial_stride = partial_stride;
      float* delta_ptr = deterministic ? delta.mutable_data_ptr<float>() : nullptr;
      launch_backward_queries(p, warps, !deterministic, delta_ptr, stream);
      if (deterministic) launch_backward_keys(p, delta_ptr, stream);
      // A fixed-order reduction in fp64: the same on every run.
      if (partials.defined()) per_head = partials.sum(at::IntArrayRef{0, 2});
    });
  } else if (partial_stride > 0) {
    per_head = at::zeros({heads, partial_stride}, contiguous.dtype(at::kDouble));
  }

  const OptionalInputGrads optional = split_optional_grads(per_head, in, query.options());
  if (query.scalar_type() != at::kFloat) {
    grad_key = grad_key.to(query.scalar_type());
    grad_value = grad_value.to(query.scalar_type());
  }
  return {grad_query, grad_key, grad_value, optional.rel_pos_bias, optional.pad_key, optional.pad_value};
}

}  // namespace

TORCH_LIBRARY_IMPL(xmorpher_kernels, CUDA, m) {
  m.impl("window_attention_forward", &forward);
  m.impl("window_attention_backward", &backward);
}

}  // namespace cuda
}  // namespace xmorpher_kernels
