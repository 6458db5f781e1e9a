// CPU implementation of the window attention ops: argument plumbing, threading over windows
// (at::parallel_for) and the choice among the ISA builds of the fused kernels.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <string>
#include <vector>

#include "window_attention_cpu.h"
#include "window_attention_cpu_support.h"
#include "xmorpher_kernels/op_checks.h"

namespace xmorpher_kernels {
namespace cpu {
namespace {

enum class Isa { avx512, avx2, baseline };

bool cpu_has(Isa isa) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  switch (isa) {
    case Isa::avx512:
      return avx512::built() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2");
    case Isa::avx2:
      return avx2::built() && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("bmi2");
    case Isa::baseline:
      return true;
  }
#endif
  return isa == Isa::baseline;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    default: return "baseline";
  }
}

Isa best_isa() {
  for (Isa isa : {Isa::avx512, Isa::avx2}) {
    if (cpu_has(isa)) return isa;
  }
  return Isa::baseline;
}

std::atomic<int> selected_isa{-1};

Isa current_isa() {
  int isa = selected_isa.load();
  if (isa < 0) {
    isa = static_cast<int>(best_isa());
    selected_isa.store(isa);
  }
  return static_cast<Isa>(isa);
}

// A thread's scratch for its chunks of windows: kept per thread across calls and grown when a
// call needs more, so a call allocates nothing but its outputs. Allocated in this (baseline-ISA)
// translation unit.
template <typename acc_t>
struct Scratch {
  std::vector<acc_t> acc;
  std::vector<int64_t> index;
  std::vector<const acc_t*> rows;

  static Scratch& of_this_thread(const WindowGeometry& g, int64_t head_dim) {
    thread_local Scratch scratch;
    grow(scratch.acc, tile_acc_elements(g, head_dim));
    grow(scratch.index, tile_index_elements(g));
    grow(scratch.rows, tile_row_pointers(g));
    return scratch;
  }

 private:
  template <typename T>
  static void grow(std::vector<T>& v, int64_t size) {
    if (static_cast<int64_t>(v.size()) < size) v.resize(size);
  }
};

template <typename scalar_t, typename acc_t>
void run_forward(const AttentionParams<scalar_t, acc_t>& p, int64_t begin, int64_t end, Scratch<acc_t>& s) {
  switch (current_isa()) {
    case Isa::avx512: return avx512::forward_windows(p, begin, end, s.acc.data(), s.index.data(), s.rows.data());
    case Isa::avx2: return avx2::forward_windows(p, begin, end, s.acc.data(), s.index.data(), s.rows.data());
    default: return baseline::forward_windows(p, begin, end, s.acc.data(), s.index.data(), s.rows.data());
  }
}

template <typename scalar_t, typename acc_t>
void run_backward(const AttentionParams<scalar_t, acc_t>& p, int64_t color, int64_t begin,
                  int64_t end, Scratch<acc_t>& s) {
  switch (current_isa()) {
    case Isa::avx512:
      return avx512::backward_windows(p, color, begin, end, s.acc.data(), s.index.data(), s.rows.data());
    case Isa::avx2:
      return avx2::backward_windows(p, color, begin, end, s.acc.data(), s.index.data(), s.rows.data());
    default:
      return baseline::backward_windows(p, color, begin, end, s.acc.data(), s.index.data(), s.rows.data());
  }
}

// Kernel storage type for an ATen scalar type; bf16 travels as raw bits.
template <typename T> struct Storage { using type = T; };
template <> struct Storage<at::BFloat16> { using type = uint16_t; };

at::ScalarType accumulation_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& query_in, const at::Tensor& key_in,
                                           const at::Tensor& value_in, at::IntArrayRef window_size,
                                           at::IntArrayRef search_size, double scale,
                                           const c10::optional<at::Tensor>& rel_pos_bias,
                                           const c10::optional<at::Tensor>& pad_key,
                                           const c10::optional<at::Tensor>& pad_value) {
  const OpInputs in = check_op_inputs("window_attention_forward", query_in, key_in, value_in, window_size,
                                      search_size, rel_pos_bias, pad_key, pad_value, supported_dtypes());
  const at::Tensor& query = in.query;
  auto out = at::empty(query.sizes(), query.options().memory_format(at::MemoryFormat::Contiguous));
  auto lse = at::empty({query.size(0), query.size(4), query.size(1), query.size(2), query.size(3)},
                       query.options().dtype(accumulation_type(query.scalar_type())));
  if (query.numel() == 0) return {out, lse};
  const WindowGeometry& g = in.geometry;
  const int64_t tasks = query.size(0) * query.size(4) * num_windows(g, 0) * num_windows(g, 1) * num_windows(g, 2);

  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, query.scalar_type(), "window_attention_forward_cpu", [&] {
    using storage_t = typename Storage<scalar_t>::type;
    using acc_t = at::opmath_type<scalar_t>;
    auto p = input_params<storage_t, acc_t, scalar_t>(in, scale);
    p.out = reinterpret_cast<storage_t*>(out.mutable_data_ptr<scalar_t>());
    p.lse = lse.mutable_data_ptr<acc_t>();
    at::parallel_for(0, tasks, 8, [&](int64_t begin, int64_t end) {
      run_forward(p, begin, end, Scratch<acc_t>::of_this_thread(g, p.head_dim));
    });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_out_in, const at::Tensor& query_in, const at::Tensor& key_in,
    const at::Tensor& value_in, const at::Tensor& out_in, const at::Tensor& lse_in,
    at::IntArrayRef window_size, at::IntArrayRef search_size, double scale,
    const c10::optional<at::Tensor>& rel_pos_bias, const c10::optional<at::Tensor>& pad_key,
    const c10::optional<at::Tensor>& pad_value, bool /*deterministic: the colour schedule always is*/) {
  const OpInputs in = check_op_inputs("window_attention_backward", query_in, key_in, value_in, window_size,
                                      search_size, rel_pos_bias, pad_key, pad_value, supported_dtypes());
  const at::Tensor& query = in.query;
  const WindowGeometry& g = in.geometry;
  const at::Tensor grad_out = last_dim_contiguous(grad_out_in);
  const at::Tensor out = out_in.contiguous();
  const at::Tensor lse = lse_in.contiguous();
  const auto acc_type = accumulation_type(query.scalar_type());
  check_backward_tensors(query, grad_out, out, lse, acc_type);
  const bool same_type = acc_type == query.scalar_type();
  const auto contiguous = query.options().memory_format(at::MemoryFormat::Contiguous);

  at::Tensor grad_query = at::empty(query.sizes(), contiguous);
  at::Tensor grad_key = at::zeros(query.sizes(), contiguous.dtype(acc_type));
  at::Tensor grad_value = at::zeros(query.sizes(), contiguous.dtype(acc_type));
  const int64_t batch = query.size(0), heads = query.size(4), head_dim = query.size(5);
  const int64_t bias_per_head = bias_extent(g, 0) * bias_extent(g, 1) * bias_extent(g, 2);
  const bool with_bias = in.rel_pos_bias.defined(), with_pad = in.pad_key.defined();
  const int64_t slots_z = windows_of_color(g, 0, 0);
  const int64_t partial_stride = (with_bias ? bias_per_head : 0) + (with_pad ? 2 * head_dim : 0);
  at::Tensor partials;
  if (partial_stride > 0) {
    partials = at::zeros({batch, heads, slots_z, partial_stride}, query.options().dtype(at::kDouble));
  }

  if (query.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, query.scalar_type(), "window_attention_backward_cpu", [&] {
      using storage_t = typename Storage<scalar_t>::type;
      using acc_t = at::opmath_type<scalar_t>;
      auto p = backward_params<storage_t, acc_t, scalar_t>(in, scale, grad_out, out, lse, grad_query, grad_key,
                                                           grad_value);
      p.partials = partials.defined() ? partials.mutable_data_ptr<double>() : nullptr;
      p.partial_stride = partial_stride;
      // One pass per colour, in a fixed order (see backward_windows()).
      for (int64_t color = 0; color < color_period(g, 0); ++color) {
        const int64_t tasks = batch * heads * windows_of_color(g, 0, color);
        at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
          run_backward(p, color, begin, end, Scratch<acc_t>::of_this_thread(g, head_dim));
        });
      }
    });
  }

  // Reduce the partial slots in a fixed order: over the batch and the slots of each head.
  at::Tensor per_head;
  if (partials.defined()) {
    per_head = at::zeros({heads, partial_stride}, partials.options());
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t s = 0; s < slots_z; ++s) per_head.add_(partials.select(0, b).select(1, s));
  }
  const OptionalInputGrads optional = split_optional_grads(per_head, in, query.options());
  if (!same_type) {
    grad_key = grad_key.to(query.scalar_type());
    grad_value = grad_value.to(query.scalar_type());
  }
  return {grad_query, grad_key, grad_value, optional.rel_pos_bias, optional.pad_key, optional.pad_value};
}

}  // namespace

const std::vector<c10::ScalarType>& supported_dtypes() {
  static const std::vector<c10::ScalarType> dtypes{at::kFloat, at::kDouble, at::kBFloat16};
  return dtypes;
}

std::string isa() { return isa_name(current_isa()); }

void set_isa(const std::string& name) {
  for (Isa candidate : {Isa::avx512, Isa::avx2, Isa::baseline}) {
    if (name == isa_name(candidate)) {
      TORCH_CHECK(cpu_has(candidate), "set_cpu_isa: this CPU or build does not support '", name, "'");
      selected_isa.store(static_cast<int>(candidate));
      return;
    }
  }
  TORCH_CHECK(false, "set_cpu_isa: unknown instruction set '", name, "'; expected avx512, avx2 or baseline");
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> names;
  for (Isa candidate : {Isa::avx512, Isa::avx2, Isa::baseline}) {
    if (cpu_has(candidate)) names.emplace_back(isa_name(candidate));
  }
  return names;
}

TORCH_LIBRARY_IMPL(xmorpher_kernels, CPU, m) {
  m.impl("window_attention_forward", &forward);
  m.impl("window_attention_backward", &backward);
}

}  // namespace cpu
}  // namespace xmorpher_kernels
