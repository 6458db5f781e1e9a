// Host side of the brick kernels, shared by the CUDA backend (csrc/cuda/window_attention_cuda_brick.cu)
// and the CPU emulator (csrc/brick_emulator.cpp): which calls they cover, their plans, the
// tensors they write, and the launch sequence (forward: one launch; backward: query pass, key
// pass and, with bias or constant padding, the reduction; no atomics, deterministic). A `Runner`
// launches one kernel:
//   template <typename AtT> using Storage = ...;   // kernel storage type of at::Half/at::BFloat16
//   int64_t smem_limit();                         // most shared memory one block may have
//   at::Tensor allocate(sizes, options);          // an output or work tensor
//   template <typename T> void forward(p, plan, sc), query_pass(p, plan, sc, outs),
//                              key_pass(p, plan, sc, outs), reduce(outs, batch, heads, bricks, hd);
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <cmath>
#include <initializer_list>
#include <map>
#include <mutex>
#include <optional>

#include "xmorpher_kernels/brick_kernels.h"
#include "xmorpher_kernels/op_checks.h"

namespace xmorpher_kernels {
namespace brick {

// Whether the rows of every given (defined) tensor start 16 bytes apart from a 16-byte aligned
// base: the kernels stage rows with 16-byte copies.
inline bool rows_16_byte_aligned(std::initializer_list<const at::Tensor*> tensors) {
  for (const at::Tensor* t : tensors) {
    if (!t->defined()) continue;
    if (reinterpret_cast<uintptr_t>(t->const_data_ptr()) % 16 != 0) return false;
    const int64_t elements = 16 / t->element_size();
    for (int64_t d = 0; d + 1 < t->dim(); ++d)
      if (t->size(d) > 1 && t->stride(d) % elements != 0) return false;
  }
  return true;
}

// Why the brick kernels do not run a call (forward, and the backward's inputs), or null.
inline const char* call_not_covered(const OpInputs& in, double scale) {
  const at::ScalarType dtype = in.query.scalar_type();
  if (dtype != at::kHalf && dtype != at::kBFloat16) return "dtype is not fp16 or bf16";
  if (in.query.numel() == 0) return "empty input";
  if (const char* why = not_covered(in.geometry, in.query.size(5))) return why;
  const double magnitude = std::fabs(scale);
  if (!(magnitude >= 0x1p-60 && magnitude <= 0x1p60)) return "|scale| outside [2^-60, 2^60]";
  if (!rows_16_byte_aligned({&in.query, &in.key, &in.value, &in.pad_key, &in.pad_value}))
    return "rows not 16-byte aligned";
  return nullptr;
}

// choose_plan() memoized: a plan takes thousands of operations to build (its per-token tables) and
// a model calls the op with a handful of geometries.
inline BrickPlan cached_plan(const WindowGeometry& g, BoxKind kind, int64_t head_dim, int64_t heads_batch,
                             int64_t device_limit) {
  using Key = std::array<int64_t, 13>;
  static std::mutex mutex;
  static std::map<Key, BrickPlan> plans;
  const Key key{g.volume[0], g.volume[1], g.volume[2], g.window[0], g.window[1], g.window[2], g.search[0],
                g.search[1], g.search[2], static_cast<int64_t>(kind), head_dim, heads_batch, device_limit};
  std::lock_guard<std::mutex> lock(mutex);
  auto found = plans.find(key);
  if (found != plans.end()) return found->second;
  if (plans.size() >= 256) plans.clear();  // bounded; rebuilding is correct, only slower
  return plans.emplace(key, choose_plan(g, kind, head_dim, heads_batch, kSmemBudget, device_limit)).first->second;
}

template <typename F>
void dispatch_16_bit(at::ScalarType dtype, F&& f) {
  if (dtype == at::kHalf) {
    f(at::Half{});
  } else {
    f(at::BFloat16{});
  }
}

inline bool plan_fits(const BrickPlan& plan) { return plan.blocks > 0 && plan.blocks <= INT32_MAX; }

// Forward into out (contiguous, query's dtype) and lse ((B, heads, D, H, W) fp32); false, writing
// nothing, when the call is not covered.
template <class Runner>
bool forward(Runner& runner, const OpInputs& in, double scale, at::Tensor& out, at::Tensor& lse) {
  if (call_not_covered(in, scale) != nullptr) return false;
  const int64_t batch_heads = in.query.size(0) * in.query.size(4);
  const BrickPlan plan = cached_plan(in.geometry, BoxKind::kKeysOfWindow, in.query.size(5), batch_heads, runner.smem_limit());
  if (!plan_fits(plan)) return false;
  const ScoreScale sc = score_scale(scale);
  dispatch_16_bit(in.query.scalar_type(), [&](auto tag) {
    using at_t = decltype(tag);
    using T = typename Runner::template Storage<at_t>;
    AttentionParams<T, float> p = input_params<T, float, at_t>(in, scale);
    p.out = reinterpret_cast<T*>(out.mutable_data_ptr<at_t>());
    p.lse = lse.mutable_data_ptr<float>();
    runner.template forward<T>(p, plan, sc);
  });
  return true;
}

struct Gradients {
  at::Tensor query, key, value, rel_pos_bias, pad_key, pad_value;  // empty tensors for absent inputs
};

// Shared memory the query pass's final reduction needs (the warps' fragment-order bias sums, their
// pad sums and the bias entries' sums, from offset 0, once the staged rows and tables are done with).
inline int64_t query_pass_reduction_bytes(const BrickPlan& plan, int64_t head_dim, int64_t bias_entries) {
  return static_cast<int64_t>(plan.warps) * (kTiles * kLanes * 16 + 2 * head_dim * 4) + 4 * bias_entries;
}

// Backward from grad_out (last dim contiguous), out and lse (contiguous); nullopt, computing
// nothing, when the call is not covered.
template <class Runner>
std::optional<Gradients> backward(Runner& runner, const OpInputs& in, double scale, const at::Tensor& grad_out,
                                  const at::Tensor& out, const at::Tensor& lse) {
  if (call_not_covered(in, scale) != nullptr || !rows_16_byte_aligned({&grad_out, &out})) return std::nullopt;
  const at::Tensor& query = in.query;
  const int64_t batch = query.size(0), heads = query.size(4), head_dim = query.size(5);
  BrickPlan query_plan = cached_plan(in.geometry, BoxKind::kKeysOfWindow, head_dim, batch * heads, runner.smem_limit());
  const BrickPlan key_plan =
      cached_plan(in.geometry, BoxKind::kQueriesOfKeyBlock, head_dim, batch * heads, runner.smem_limit());
  if (!plan_fits(query_plan) || !plan_fits(key_plan)) return std::nullopt;
  const bool with_bias = in.rel_pos_bias.defined(), with_pad = in.pad_key.defined();
  const int bias_entries = with_bias ? static_cast<int>(in.rel_pos_bias.numel() / heads) : 0;
  const int partial_stride = bias_entries + (with_pad ? 2 * static_cast<int>(head_dim) : 0);
  if (partial_stride > 0) {  // the final reduction reuses the block's shared memory, all of it if need be
    const int64_t bytes = query_pass_reduction_bytes(query_plan, head_dim, bias_entries);
    if (bytes > runner.smem_limit()) return std::nullopt;
    if (bytes > query_plan.bytes) query_plan.bytes = static_cast<uint32_t>(bytes);
  }

  const auto options = query.options().memory_format(at::MemoryFormat::Contiguous);
  const at::Tensor empty = at::empty({0}, options);
  Gradients grads{runner.allocate(query.sizes(), options), runner.allocate(query.sizes(), options),
                  runner.allocate(query.sizes(), options), empty, empty, empty};
  if (with_bias) grads.rel_pos_bias = runner.allocate(in.rel_pos_bias.sizes(), options);
  if (with_pad) {
    grads.pad_key = runner.allocate({heads, head_dim}, options);
    grads.pad_value = runner.allocate({heads, head_dim}, options);
  }
  at::Tensor delta =
      runner.allocate({batch, heads, query.size(1), query.size(2), query.size(3)}, options.dtype(at::kFloat));
  at::Tensor partials;
  if (partial_stride > 0) partials = runner.allocate({query_plan.blocks, partial_stride}, options.dtype(at::kFloat));
  const ScoreScale sc = score_scale(scale);

  dispatch_16_bit(query.scalar_type(), [&](auto tag) {
    using at_t = decltype(tag);
    using T = typename Runner::template Storage<at_t>;
    auto pointer = [](at::Tensor& t) { return t.numel() > 0 ? reinterpret_cast<T*>(t.mutable_data_ptr<at_t>()) : nullptr; };
    AttentionParams<T, float> p = input_params<T, float, at_t>(in, scale);
    p.out = const_cast<T*>(reinterpret_cast<const T*>(out.const_data_ptr<at_t>()));
    p.lse = const_cast<float*>(lse.const_data_ptr<float>());
    p.grad_out = reinterpret_cast<const T*>(grad_out.const_data_ptr<at_t>());
    p.grad_out_strides = token_strides(grad_out);
    p.grad_query = pointer(grads.query);
    BackwardOutputs<T> outs{};
    outs.grad_key = pointer(grads.key);
    outs.grad_value = pointer(grads.value);
    outs.delta = delta.mutable_data_ptr<float>();
    outs.partials = partials.defined() ? partials.mutable_data_ptr<float>() : nullptr;
    outs.partial_stride = partial_stride;
    outs.bias_entries = bias_entries;
    outs.grad_bias = with_bias ? pointer(grads.rel_pos_bias) : nullptr;
    outs.grad_pad_key = with_pad ? pointer(grads.pad_key) : nullptr;
    outs.grad_pad_value = with_pad ? pointer(grads.pad_value) : nullptr;
    runner.template query_pass<T>(p, query_plan, sc, outs);
    runner.template key_pass<T>(p, key_plan, sc, outs);
    if (partial_stride > 0) {
      const int64_t bricks = query_plan.bricks[0] * query_plan.bricks[1] * query_plan.bricks[2];
      runner.template reduce<T>(outs, batch, heads, bricks, static_cast<int>(head_dim));
    }
  });
  return grads;
}

}  // namespace brick
}  // namespace xmorpher_kernels
