// Host-side preparation shared by the CPU and CUDA implementations of the ops: defensive checks
// (the Python API validates first, with friendlier messages; these guard direct torch.ops calls),
// strides made usable by the kernels, the WindowGeometry of the call, and the gradients of the
// optional inputs from the kernels' partial sums.
#pragma once

#include <ATen/ATen.h>

#include <initializer_list>
#include <vector>

#include "xmorpher_kernels/attention_params.h"
#include "xmorpher_kernels/window_geometry.h"

namespace xmorpher_kernels {

// Kernels read token rows with unit stride; other strides are free.
inline at::Tensor last_dim_contiguous(const at::Tensor& t) {
  return t.stride(-1) == 1 || t.size(-1) == 1 ? t : t.contiguous();
}

// Element strides of a (B, D, H, W, heads, head_dim) tensor for the kernels' params.
inline TokenStrides token_strides(const at::Tensor& t) {
  return TokenStrides{t.stride(0), t.stride(1), t.stride(2), t.stride(3), t.stride(4)};
}

struct OpInputs {
  at::Tensor query, key, value;
  at::Tensor rel_pos_bias, pad_key, pad_value;  // contiguous, or undefined
  WindowGeometry geometry;
};

inline OpInputs check_op_inputs(const char* op, const at::Tensor& query, const at::Tensor& key,
                                const at::Tensor& value, at::IntArrayRef window_size,
                                at::IntArrayRef search_size,
                                const c10::optional<at::Tensor>& rel_pos_bias,
                                const c10::optional<at::Tensor>& pad_key,
                                const c10::optional<at::Tensor>& pad_value,
                                const std::vector<at::ScalarType>& dtypes) {
  TORCH_CHECK(query.dim() == 6, op, ": query must be (B, D, H, W, heads, head_dim), got ", query.sizes());
  TORCH_CHECK(key.sizes() == query.sizes() && value.sizes() == query.sizes(), op,
              ": key and value must have the shape of query ", query.sizes());
  TORCH_CHECK(key.scalar_type() == query.scalar_type() && value.scalar_type() == query.scalar_type(), op,
              ": key and value must have the dtype of query");
  TORCH_CHECK(key.device() == query.device() && value.device() == query.device(), op,
              ": key and value must be on the device of query");
  bool dtype_ok = false;
  for (auto t : dtypes) dtype_ok = dtype_ok || t == query.scalar_type();
  TORCH_CHECK(dtype_ok, op, ": unsupported dtype ", query.scalar_type(), " on ", query.device());
  TORCH_CHECK(window_size.size() == 3 && search_size.size() == 3, op,
              ": window_size and search_size must have 3 entries");
  OpInputs in;
  for (int axis = 0; axis < 3; ++axis) {
    TORCH_CHECK(window_size[axis] >= 1 && search_size[axis] >= window_size[axis], op,
                ": need 1 <= window_size <= search_size on every axis");
    in.geometry.volume[axis] = query.size(axis + 1);
    in.geometry.window[axis] = window_size[axis];
    in.geometry.search[axis] = search_size[axis];
  }
  in.query = last_dim_contiguous(query);
  in.key = last_dim_contiguous(key);
  in.value = last_dim_contiguous(value);
  const int64_t heads = query.size(4), head_dim = query.size(5);
  if (rel_pos_bias.has_value() && rel_pos_bias->defined()) {
    TORCH_CHECK(rel_pos_bias->dim() == 4 && rel_pos_bias->size(0) == heads &&
                    rel_pos_bias->size(1) == bias_extent(in.geometry, 0) &&
                    rel_pos_bias->size(2) == bias_extent(in.geometry, 1) &&
                    rel_pos_bias->size(3) == bias_extent(in.geometry, 2),
                op, ": rel_pos_bias must be (heads, sd+wd-1, sh+wh-1, sw+ww-1), got ", rel_pos_bias->sizes());
    TORCH_CHECK(rel_pos_bias->scalar_type() == query.scalar_type(), op, ": rel_pos_bias must have the dtype of query");
    in.rel_pos_bias = rel_pos_bias->contiguous();
  }
  TORCH_CHECK(pad_key.has_value() == pad_value.has_value(), op,
              ": pad_key and pad_value must be given together (constant padding) or not at all");
  if (pad_key.has_value()) {
    for (const at::Tensor* t : {&*pad_key, &*pad_value}) {
      TORCH_CHECK(t->dim() == 2 && t->size(0) == heads && t->size(1) == head_dim, op,
                  ": pad_key and pad_value must be (heads, head_dim), got ", t->sizes());
      TORCH_CHECK(t->scalar_type() == query.scalar_type(), op, ": pad tensors must have the dtype of query");
    }
    in.pad_key = pad_key->contiguous();
    in.pad_value = pad_value->contiguous();
  }
  for (const at::Tensor* t : {&in.rel_pos_bias, &in.pad_key, &in.pad_value}) {
    TORCH_CHECK(!t->defined() || t->device() == query.device(), op,
                ": rel_pos_bias, pad_key and pad_value must be on the device of query");
  }
  return in;
}

// The backward's own inputs, against query: grad_out and out of its shape, dtype and device, the
// log-sum-exp (B, heads, D, H, W) in `lse_dtype` (the kernels' accumulation type).
inline void check_backward_tensors(const at::Tensor& query, const at::Tensor& grad_out, const at::Tensor& out,
                                   const at::Tensor& lse, at::ScalarType lse_dtype) {
  TORCH_CHECK(grad_out.sizes() == query.sizes() && out.sizes() == query.sizes(),
              "window_attention_backward: grad_out and out must have the shape of query");
  TORCH_CHECK(grad_out.scalar_type() == query.scalar_type() && out.scalar_type() == query.scalar_type(),
              "window_attention_backward: grad_out and out must have the dtype of query");
  TORCH_CHECK(grad_out.device() == query.device() && out.device() == query.device() && lse.device() == query.device(),
              "window_attention_backward: grad_out, out and lse must be on the device of query");
  TORCH_CHECK(lse.scalar_type() == lse_dtype &&
                  lse.sizes() == at::IntArrayRef({query.size(0), query.size(4), query.size(1), query.size(2), query.size(3)}),
              "window_attention_backward: lse must be (B, heads, D, H, W) in ", lse_dtype);
}

// Kernel params of a call's inputs. `scalar_t` is the kernels' storage type of the ATen type
// `at_t`, `acc_t` their accumulation type.
template <typename scalar_t, typename acc_t, typename at_t>
AttentionParams<scalar_t, acc_t> input_params(const OpInputs& in, double scale) {
  auto pointer = [](const at::Tensor& t) {
    return t.defined() ? reinterpret_cast<const scalar_t*>(t.const_data_ptr<at_t>()) : nullptr;
  };
  AttentionParams<scalar_t, acc_t> p{};
  p.geometry = in.geometry;
  p.batch = in.query.size(0);
  p.heads = in.query.size(4);
  p.head_dim = in.query.size(5);
  p.scale = static_cast<acc_t>(scale);
  p.query = pointer(in.query);
  p.key = pointer(in.key);
  p.value = pointer(in.value);
  p.query_strides = token_strides(in.query);
  p.key_strides = token_strides(in.key);
  p.value_strides = token_strides(in.value);
  p.rel_pos_bias = pointer(in.rel_pos_bias);
  p.pad_key = pointer(in.pad_key);
  p.pad_value = pointer(in.pad_value);
  return p;
}

// input_params() plus the backward's tensors: grad_out (last dimension contiguous), out and lse
// (contiguous), and its outputs, grad_query and the accumulators grad_key/grad_value (contiguous,
// in acc_t).
template <typename scalar_t, typename acc_t, typename at_t>
AttentionParams<scalar_t, acc_t> backward_params(const OpInputs& in, double scale, const at::Tensor& grad_out,
                                                 const at::Tensor& out, const at::Tensor& lse,
                                                 at::Tensor& grad_query, at::Tensor& grad_key, at::Tensor& grad_value) {
  AttentionParams<scalar_t, acc_t> p = input_params<scalar_t, acc_t, at_t>(in, scale);
  p.out = const_cast<scalar_t*>(reinterpret_cast<const scalar_t*>(out.const_data_ptr<at_t>()));
  p.lse = const_cast<acc_t*>(lse.const_data_ptr<acc_t>());
  p.grad_out = reinterpret_cast<const scalar_t*>(grad_out.const_data_ptr<at_t>());
  p.grad_out_strides = token_strides(grad_out);
  p.grad_query = reinterpret_cast<scalar_t*>(grad_query.mutable_data_ptr<at_t>());
  p.grad_key = grad_key.mutable_data_ptr<acc_t>();
  p.grad_value = grad_value.mutable_data_ptr<acc_t>();
  return p;
}

// Gradients of the optional inputs from the kernels' partial sums reduced per head,
// `per_head` (heads, [bias_per_head if rel_pos_bias] [2 * head_dim if constant padding]).
// Absent inputs get empty tensors, as the backward op's schema says.
struct OptionalInputGrads {
  at::Tensor rel_pos_bias, pad_key, pad_value;
};

// A contiguous copy in the dtype of `options`, never a view: outputs of an op may not alias one
// another (per_head's columns would, with one head).
inline at::Tensor owned_copy(const at::Tensor& t, const at::TensorOptions& options) {
  return t.to(options.dtype().toScalarType(), /*non_blocking=*/false, /*copy=*/true, at::MemoryFormat::Contiguous);
}

inline OptionalInputGrads split_optional_grads(const at::Tensor& per_head, const OpInputs& in,
                                               const at::TensorOptions& options) {
  const at::Tensor empty = at::empty({0}, options);
  OptionalInputGrads grads{empty, empty, empty};
  if (!per_head.defined()) return grads;
  const int64_t head_dim = in.query.size(5);
  int64_t column = 0;
  if (in.rel_pos_bias.defined()) {
    const int64_t bias_per_head = in.rel_pos_bias.numel() / in.rel_pos_bias.size(0);
    grads.rel_pos_bias = owned_copy(per_head.narrow(1, 0, bias_per_head), options).reshape(in.rel_pos_bias.sizes());
    column = bias_per_head;
  }
  if (in.pad_key.defined()) {
    grads.pad_key = owned_copy(per_head.narrow(1, column, head_dim), options);
    grads.pad_value = owned_copy(per_head.narrow(1, column + head_dim, head_dim), options);
  }
  return grads;
}

}  // namespace xmorpher_kernels
