// Autograd of the forward ops (schemas in window_attention.cpp), in C++ so that a call and its
// backward cost no Python: the forward redispatches below autograd to the backend's kernel and
// saves what the backward op needs; the backward calls the family's backward op with
// `deterministic` taken from torch.use_deterministic_algorithms() at backward time.
//
// One template serves both op families (the native CPU/CUDA kernels and the Triton kernels,
// whose implementations Python registers): they share a signature.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

namespace xmorpher_kernels {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptionalTensor = c10::optional<at::Tensor>;

using ForwardSignature = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                             at::IntArrayRef, at::IntArrayRef, double,
                                                             const OptionalTensor&, const OptionalTensor&,
                                                             const OptionalTensor&);
using BackwardSignature = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    at::IntArrayRef, at::IntArrayRef, double, const OptionalTensor&, const OptionalTensor&, const OptionalTensor&, bool);

struct NativeOps {
  static constexpr const char* forward = "xmorpher_kernels::window_attention_forward";
  static constexpr const char* backward = "xmorpher_kernels::window_attention_backward";
};
struct TritonOps {
  static constexpr const char* forward = "xmorpher_kernels::triton_window_attention_forward";
  static constexpr const char* backward = "xmorpher_kernels::triton_window_attention_backward";
};

// Saved tensors: query, key, value, out, lse, then rel_pos_bias, pad_key, pad_value (undefined
// when absent).
enum Saved { kQuery, kKey, kValue, kOut, kLse, kBias, kPadKey, kPadValue };

OptionalTensor present(const at::Tensor& t) { return t.defined() ? OptionalTensor(t) : c10::nullopt; }

template <typename Ops>
class WindowAttentionFunction : public torch::autograd::Function<WindowAttentionFunction<Ops>> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& query, const at::Tensor& key,
                               const at::Tensor& value, at::IntArrayRef window_size, at::IntArrayRef search_size,
                               double scale, const OptionalTensor& rel_pos_bias, const OptionalTensor& pad_key,
                               const OptionalTensor& pad_value) {
    static const auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow(Ops::forward, "").template typed<ForwardSignature>();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, lse] = op.call(query, key, value, window_size, search_size, scale, rel_pos_bias, pad_key, pad_value);
    ctx->save_for_backward({query, key, value, out, lse, rel_pos_bias.value_or(at::Tensor()),
                            pad_key.value_or(at::Tensor()), pad_value.value_or(at::Tensor())});
    ctx->saved_data["window_size"] = window_size.vec();
    ctx->saved_data["search_size"] = search_size.vec();
    ctx->saved_data["scale"] = scale;
    ctx->mark_non_differentiable({lse});
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    static const auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow(Ops::backward, "").template typed<BackwardSignature>();
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& grad_out = grad_outputs[0];
    if (!grad_out.defined()) return variable_list(9);  // the output took no part in the loss
    const std::vector<int64_t> window_size = ctx->saved_data["window_size"].toIntVector();
    const std::vector<int64_t> search_size = ctx->saved_data["search_size"].toIntVector();
    auto [grad_query, grad_key, grad_value, grad_bias, grad_pad_key, grad_pad_value] =
        op.call(grad_out, saved[kQuery], saved[kKey], saved[kValue], saved[kOut], saved[kLse], window_size,
                search_size, ctx->saved_data["scale"].toDouble(), present(saved[kBias]), present(saved[kPadKey]),
                present(saved[kPadValue]), at::globalContext().deterministicAlgorithms());
    auto when_given = [&](Saved input, const at::Tensor& grad) { return saved[input].defined() ? grad : at::Tensor(); };
    return {grad_query,
            grad_key,
            grad_value,
            at::Tensor(),
            at::Tensor(),
            at::Tensor(),
            when_given(kBias, grad_bias),
            when_given(kPadKey, grad_pad_key),
            when_given(kPadValue, grad_pad_value)};
  }
};

template <typename Ops>
std::tuple<at::Tensor, at::Tensor> forward_with_autograd(const at::Tensor& query, const at::Tensor& key,
                                                         const at::Tensor& value, at::IntArrayRef window_size,
                                                         at::IntArrayRef search_size, double scale,
                                                         const OptionalTensor& rel_pos_bias,
                                                         const OptionalTensor& pad_key,
                                                         const OptionalTensor& pad_value) {
  const variable_list outputs = WindowAttentionFunction<Ops>::apply(query, key, value, window_size, search_size, scale,
                                                                    rel_pos_bias, pad_key, pad_value);
  return {outputs[0], outputs[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(xmorpher_kernels, Autograd, m) {
  m.impl("window_attention_forward", &forward_with_autograd<NativeOps>);
  m.impl("triton_window_attention_forward", &forward_with_autograd<TritonOps>);
}

}  // namespace xmorpher_kernels
