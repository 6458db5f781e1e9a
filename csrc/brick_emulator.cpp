// CPU emulator of the brick CUDA kernels (csrc/include/xmorpher_kernels/brick_kernels.h): runs the
// kernels' own code, compiled for the host, one block at a time with each CUDA thread as a fiber
// (ucontext), and the warp-wide operations of brick_ops.h (ldmatrix, mma.sync, movmatrix,
// shuffles) as collectives over the warp's 32 fibers, with the fragment layouts of the PTX ISA.
// cp.async copies land only at the thread's wait (unwaited reads see the poison that fills shared
// memory at block start), and every shared-memory access is bounds- and alignment-checked;
// ldmatrix bank conflicts are counted. The tests compare the emulated ops with the reference
// (tests/test_brick_emulated.py): the CPU proof of the kernels' tiling and fragment juggling
// until a GPU runs them.
#include "brick_emulator.h"

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <ucontext.h>

#include <array>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "xmorpher_kernels/brick_glue.h"

namespace xmorpher_kernels {
namespace brick {
namespace emu {
namespace {

constexpr size_t kStackBytes = 256 * 1024;
constexpr unsigned char kPoison = 0xff;  // NaN in fp32, fp16 and bf16

enum class Collective : int { kLdsm = 1, kLdsmTrans, kMovm, kMma, kShflXor, kShflIdx };

struct Lane {
  alignas(16) unsigned char in[48];
  alignas(16) unsigned char out[16];
};

struct Warp {
  int arrived = 0;
  uint64_t generation = 0;
  Collective op = Collective::kLdsm;
  Lane lanes[32];
};

struct PendingCopy {
  uint32_t dst;
  unsigned char bytes[16];
};

struct Thread {
  ucontext_t context;
  bool finished = false;
  std::vector<PendingCopy> pending;
};

struct Block {
  int threads = 0;
  int64_t index = 0;
  unsigned char* smem = nullptr;
  uint32_t smem_bytes = 0;
  std::vector<Thread> thread;
  std::vector<Warp> warps;
  int current = 0;
  ucontext_t scheduler;
  int barrier_arrived = 0;
  uint64_t barrier_generation = 0;
  uint64_t events = 0;
  std::string error;
  const std::function<void(unsigned char*)>* body = nullptr;
};

thread_local Block* g_block = nullptr;
thread_local EmulatorStats g_stats;

[[noreturn]] void fail(const std::string& message) {
  throw std::runtime_error("brick emulator, block " + std::to_string(g_block->index) + ", thread " +
                           std::to_string(g_block->current) + ": " + message);
}

void yield() {
  Block& b = *g_block;
  swapcontext(&b.thread[b.current].context, &b.scheduler);
}

void fiber_entry() {
  Block& b = *g_block;
  try {
    (*b.body)(b.smem);
  } catch (const std::exception& e) {
    if (b.error.empty()) b.error = e.what();
  }
  b.thread[b.current].finished = true;
  ++b.events;
}

// Runs every block of a grid of `blocks` x `threads` with `smem_bytes` of shared memory.
void run_grid(int64_t blocks, int threads, uint32_t smem_bytes, const std::function<void(unsigned char*)>& body) {
  std::vector<char> stacks(static_cast<size_t>(threads) * kStackBytes);
  std::unique_ptr<unsigned char[]> smem_storage(new unsigned char[smem_bytes + 1024]);
  unsigned char* smem = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(smem_storage.get()) + 1023) & ~uintptr_t{1023});
  Block* previous = g_block;
  for (int64_t index = 0; index < blocks; ++index) {
    Block b;
    b.threads = threads;
    b.index = index;
    b.smem = smem;
    b.smem_bytes = smem_bytes;
    b.thread.resize(threads);
    b.warps.resize((threads + 31) / 32);
    b.body = &body;
    std::memset(smem, kPoison, smem_bytes);
    for (int t = 0; t < threads; ++t) {
      ucontext_t& c = b.thread[t].context;
      getcontext(&c);
      c.uc_stack.ss_sp = stacks.data() + static_cast<size_t>(t) * kStackBytes;
      c.uc_stack.ss_size = kStackBytes;
      c.uc_link = &b.scheduler;
      makecontext(&c, fiber_entry, 0);
    }
    g_block = &b;
    uint64_t seen = ~uint64_t{0};
    while (true) {
      bool all_finished = true;
      for (int t = 0; t < threads; ++t) {
        if (b.thread[t].finished) continue;
        all_finished = false;
        b.current = t;
        swapcontext(&b.scheduler, &b.thread[t].context);
        if (!b.error.empty()) {
          g_block = previous;
          throw std::runtime_error(b.error);
        }
      }
      if (all_finished) break;
      if (b.events == seen) {
        g_block = previous;
        throw std::runtime_error("brick emulator, block " + std::to_string(index) +
                                 ": deadlock (threads wait at a barrier or warp operation others never reach)");
      }
      seen = b.events;
    }
    ++g_stats.blocks;
  }
  g_block = previous;
}

// One warp-wide operation: each lane deposits `in`; the last to arrive computes every lane's
// output with `compute(warp)`; each lane returns its own.
template <typename Out, typename In, typename F>
Out collective(Collective op, const In& in, F&& compute) {
  static_assert(sizeof(In) <= sizeof(Lane::in) && sizeof(Out) <= sizeof(Lane::out), "collective operand too large");
  Block& b = *g_block;
  Warp& w = b.warps[b.current / 32];
  const int lane = b.current % 32;
  if (w.arrived == 0) {
    w.op = op;
  } else if (w.op != op) {
    fail("the lanes of a warp reached different warp-wide operations (divergence)");
  }
  std::memcpy(w.lanes[lane].in, &in, sizeof(In));
  const uint64_t generation = w.generation;
  ++b.events;
  if (++w.arrived == 32) {
    compute(w);
    w.arrived = 0;
    ++w.generation;
  } else {
    while (w.generation == generation) yield();
  }
  Out out;
  std::memcpy(&out, w.lanes[lane].out, sizeof(Out));
  return out;
}

template <typename T>
T lane_in(const Warp& w, int lane) {
  T v;
  std::memcpy(&v, w.lanes[lane].in, sizeof(T));
  return v;
}

template <typename T>
void lane_out(Warp& w, int lane, const T& v) {
  std::memcpy(w.lanes[lane].out, &v, sizeof(T));
}

// The offset from the block's shared memory of `pointer` + `offset`, checked: inside it and aligned.
uint32_t check_shared(const unsigned char* pointer, uint32_t offset, uint32_t bytes, const char* what) {
  const Block& b = *g_block;
  const int64_t at = static_cast<int64_t>(pointer - b.smem) + offset;
  if (at < 0 || at + bytes > b.smem_bytes)
    fail(std::string(what) + ": byte " + std::to_string(at) + " + " + std::to_string(bytes) +
         " outside the block's " + std::to_string(b.smem_bytes) + " bytes of shared memory");
  if (at % bytes != 0) fail(std::string(what) + ": misaligned shared address " + std::to_string(at));
  return static_cast<uint32_t>(at);
}

uint16_t shared_u16(uint32_t address) {
  uint16_t v;
  std::memcpy(&v, g_block->smem + address, 2);
  return v;
}

float decode(uint16_t bits, bool bf16) {
  if (bf16) {
    c10::BFloat16 v;
    v.x = bits;
    return static_cast<float>(v);
  }
  return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
}

uint16_t encode(float x, bool bf16) {
  return bf16 ? c10::BFloat16(x).x : c10::Half(x).x;
}

void ldsm(uint32_t (&r)[4], uint32_t address, bool trans) {
  const auto out = collective<std::array<uint32_t, 4>>(
      trans ? Collective::kLdsmTrans : Collective::kLdsm, address, [trans](Warp& w) {
        uint32_t rows[32];
        for (int l = 0; l < 32; ++l) {
          rows[l] = lane_in<uint32_t>(w, l);
          if (rows[l] % 16 != 0) fail("ldmatrix: row address " + std::to_string(rows[l]) + " not 16-byte aligned");
          if (static_cast<uint64_t>(rows[l]) + 16 > g_block->smem_bytes)
            fail("ldmatrix: row address " + std::to_string(rows[l]) + " past shared memory");
        }
        // Bank conflicts: per matrix, the 8 rows' 16-byte bank groups (distinct rows only).
        for (int m = 0; m < 4; ++m) {
          int per_group[8] = {};
          for (int r = 0; r < 8; ++r) {
            bool repeated = false;
            for (int q = 0; q < r; ++q) repeated = repeated || rows[8 * m + q] == rows[8 * m + r];
            if (!repeated) ++per_group[(rows[8 * m + r] / 16) % 8];
          }
          int most = 0;
          for (int group : per_group) most = group > most ? group : most;
          ++g_stats.ldsm_phases;
          g_stats.ldsm_extra_wavefronts += most - 1;
        }
        for (int l = 0; l < 32; ++l) {
          std::array<uint32_t, 4> regs;
          for (int m = 0; m < 4; ++m) {
            const int g = l / 4, t = l % 4;
            uint16_t lo, hi;
            if (trans) {  // rows 2t, 2t + 1 of column g
              lo = shared_u16(rows[8 * m + 2 * t] + 2 * g);
              hi = shared_u16(rows[8 * m + 2 * t + 1] + 2 * g);
            } else {  // row g, columns 2t, 2t + 1
              lo = shared_u16(rows[8 * m + g] + 4 * t);
              hi = shared_u16(rows[8 * m + g] + 4 * t + 2);
            }
            regs[m] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
          }
          lane_out(w, l, regs);
        }
      });
  for (int m = 0; m < 4; ++m) r[m] = out[m];
}

struct MmaIn {
  uint32_t a[4];
  uint32_t b[2];
  float c[4];
  int bf16;
};

}  // namespace

EmulatorStats take_stats() {
  const EmulatorStats stats = g_stats;
  g_stats = EmulatorStats{};
  return stats;
}

}  // namespace emu

namespace ops {

using emu::g_block;

int thread_index() { return g_block->current; }
int block_threads() { return g_block->threads; }
int64_t block_index() { return g_block->index; }

void sync_block() {
  emu::Block& b = *g_block;
  ++b.events;
  const uint64_t generation = b.barrier_generation;
  if (++b.barrier_arrived == b.threads) {
    b.barrier_arrived = 0;
    ++b.barrier_generation;
  } else {
    while (b.barrier_generation == generation) emu::yield();
  }
}

uint32_t smem_window(const unsigned char* smem) {
  if (smem != g_block->smem) emu::fail("smem_window: not the block's shared memory");
  return 0;
}

F4 ld_shared_f4(const unsigned char* smem, uint32_t offset) {
  const uint32_t at = emu::check_shared(smem, offset, 16, "ld.shared.v4.f32");
  F4 v;
  std::memcpy(&v, g_block->smem + at, 16);
  return v;
}
F2 ld_shared_f2(const unsigned char* smem, uint32_t offset) {
  const uint32_t at = emu::check_shared(smem, offset, 8, "ld.shared.v2.f32");
  F2 v;
  std::memcpy(&v, g_block->smem + at, 8);
  return v;
}
U2 ld_shared_u2(const unsigned char* smem, uint32_t offset) {
  const uint32_t at = emu::check_shared(smem, offset, 8, "ld.shared.v2.u32");
  U2 v;
  std::memcpy(&v, g_block->smem + at, 8);
  return v;
}
float ld_shared_f32(const unsigned char* smem, uint32_t offset) {
  const uint32_t at = emu::check_shared(smem, offset, 4, "ld.shared.f32");
  float v;
  std::memcpy(&v, g_block->smem + at, 4);
  return v;
}
void st_shared_f4(unsigned char* smem, uint32_t offset, F4 v) {
  const uint32_t at = emu::check_shared(smem, offset, 16, "st.shared.v4.f32");
  std::memcpy(g_block->smem + at, &v, 16);
}
void st_shared_f2(unsigned char* smem, uint32_t offset, F2 v) {
  const uint32_t at = emu::check_shared(smem, offset, 8, "st.shared.v2.f32");
  std::memcpy(g_block->smem + at, &v, 8);
}
void st_shared_u2(unsigned char* smem, uint32_t offset, U2 v) {
  const uint32_t at = emu::check_shared(smem, offset, 8, "st.shared.v2.u32");
  std::memcpy(g_block->smem + at, &v, 8);
}
void st_shared_f32(unsigned char* smem, uint32_t offset, float v) {
  const uint32_t at = emu::check_shared(smem, offset, 4, "st.shared.f32");
  std::memcpy(g_block->smem + at, &v, 4);
}

void cp_async_16(uint32_t dst, const void* src, bool valid) {
  emu::check_shared(g_block->smem, dst, 16, "cp.async");  // shared-window address = offset
  emu::PendingCopy copy{dst, {}};
  if (valid) {
    if (reinterpret_cast<uintptr_t>(src) % 16 != 0) emu::fail("cp.async: source not 16-byte aligned");
    std::memcpy(copy.bytes, src, 16);
  }
  g_block->thread[g_block->current].pending.push_back(copy);
  ++emu::g_stats.cp_async;
}

void cp_async_wait_all() {
  auto& pending = g_block->thread[g_block->current].pending;
  for (const emu::PendingCopy& copy : pending) std::memcpy(g_block->smem + copy.dst, copy.bytes, 16);
  pending.clear();
}

void ldsm_x4(uint32_t (&r)[4], uint32_t address) { emu::ldsm(r, address, false); }
void ldsm_x4_trans(uint32_t (&r)[4], uint32_t address) { emu::ldsm(r, address, true); }

uint32_t movm_trans(uint32_t x) {
  return emu::collective<uint32_t>(emu::Collective::kMovm, x, [](emu::Warp& w) {
    // Lane (r, c) holds row r = l / 4, columns 2c, 2c + 1 of an 8 x 8 matrix M; it receives
    // row r of M^T: M[2c][r], M[2c + 1][r].
    auto element = [&w](int row, int column) {
      const uint32_t pair = emu::lane_in<uint32_t>(w, row * 4 + column / 2);
      return static_cast<uint16_t>(column % 2 ? pair >> 16 : pair & 0xffffu);
    };
    for (int l = 0; l < 32; ++l) {
      const int r = l / 4, c = l % 4;
      const uint32_t v = static_cast<uint32_t>(element(2 * c, r)) | (static_cast<uint32_t>(element(2 * c + 1, r)) << 16);
      emu::lane_out(w, l, v);
    }
  });
}

void mma_f16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16) {
  emu::MmaIn in{{a[0], a[1], a[2], a[3]}, {b0, b1}, {c[0], c[1], c[2], c[3]}, bf16 ? 1 : 0};
  const auto d = emu::collective<std::array<float, 4>>(emu::Collective::kMma, in, [](emu::Warp& w) {
    // Fragments (PTX ISA, m16n8k16, g = l / 4, t = l % 4): A a0 (g, 2t..), a1 (g + 8, 2t..),
    // a2 (g, 2t + 8..), a3 (g + 8, 2t + 8..); B b0 (k 2t.., n g), b1 (k 2t + 8.., n g);
    // C c0, c1 (g, 2t, 2t + 1), c2, c3 (g + 8, 2t, 2t + 1).
    float A[16][16], B[16][8], C[16][8];
    const bool is_bf16 = emu::lane_in<emu::MmaIn>(w, 0).bf16 != 0;
    for (int l = 0; l < 32; ++l) {
      const emu::MmaIn v = emu::lane_in<emu::MmaIn>(w, l);
      if ((v.bf16 != 0) != is_bf16) emu::fail("mma: lanes disagree on the operand type");
      const int g = l / 4, t = l % 4;
      auto put_a = [&](uint32_t pair, int row, int col) {
        A[row][col] = emu::decode(static_cast<uint16_t>(pair & 0xffffu), is_bf16);
        A[row][col + 1] = emu::decode(static_cast<uint16_t>(pair >> 16), is_bf16);
      };
      put_a(v.a[0], g, 2 * t);
      put_a(v.a[1], g + 8, 2 * t);
      put_a(v.a[2], g, 2 * t + 8);
      put_a(v.a[3], g + 8, 2 * t + 8);
      for (int half = 0; half < 2; ++half) {
        B[2 * t + 8 * half][g] = emu::decode(static_cast<uint16_t>(v.b[half] & 0xffffu), is_bf16);
        B[2 * t + 8 * half + 1][g] = emu::decode(static_cast<uint16_t>(v.b[half] >> 16), is_bf16);
      }
      C[g][2 * t] = v.c[0];
      C[g][2 * t + 1] = v.c[1];
      C[g + 8][2 * t] = v.c[2];
      C[g + 8][2 * t + 1] = v.c[3];
    }
    for (int l = 0; l < 32; ++l) {
      const int g = l / 4, t = l % 4;
      std::array<float, 4> out;
      for (int e = 0; e < 4; ++e) {
        const int row = g + 8 * (e / 2), col = 2 * t + e % 2;
        double sum = C[row][col];
        for (int k = 0; k < 16; ++k) sum += static_cast<double>(A[row][k]) * B[k][col];
        out[e] = static_cast<float>(sum);
      }
      emu::lane_out(w, l, out);
    }
  });
  for (int e = 0; e < 4; ++e) c[e] = d[e];
}

float shfl_xor(float v, int mask) {
  struct In {
    float v;
    int mask;
  };
  return emu::collective<float>(emu::Collective::kShflXor, In{v, mask}, [](emu::Warp& w) {
    const int mask0 = emu::lane_in<In>(w, 0).mask;
    for (int l = 0; l < 32; ++l) {
      if (emu::lane_in<In>(w, l).mask != mask0) emu::fail("shfl.bfly: lanes disagree on the lane mask");
      emu::lane_out(w, l, emu::lane_in<In>(w, l ^ (mask0 & 31)).v);
    }
  });
}

float shfl_idx(float v, int lane) {
  struct In {
    float v;
    int lane;
  };
  return emu::collective<float>(emu::Collective::kShflIdx, In{v, lane}, [](emu::Warp& w) {
    for (int l = 0; l < 32; ++l) emu::lane_out(w, l, emu::lane_in<In>(w, emu::lane_in<In>(w, l).lane & 31).v);
  });
}

float ex2(float x) { return std::exp2(x); }
float lg2(float x) { return std::log2(x); }
float rcp(float x) { return 1.0f / x; }

uint32_t pack2_bits(float lo, float hi, bool bf16) {
  return static_cast<uint32_t>(emu::encode(lo, bf16)) | (static_cast<uint32_t>(emu::encode(hi, bf16)) << 16);
}
F2 unpack2_bits(uint32_t x, bool bf16) {
  return F2{emu::decode(static_cast<uint16_t>(x & 0xffffu), bf16), emu::decode(static_cast<uint16_t>(x >> 16), bf16)};
}

}  // namespace ops

namespace emu {
namespace {

template <typename F>
void dispatch_head_dim(int head_dim, F&& f) {
  switch (head_dim) {
    case 16: return f(std::integral_constant<int, 16>{});
    case 32: return f(std::integral_constant<int, 32>{});
    default: throw std::runtime_error("brick emulator: head_dim " + std::to_string(head_dim));
  }
}

// brick_glue.h's Runner for the emulator: outputs poisoned with NaN, so unwritten ones show.
struct EmulatorRunner {
  template <typename AtT>
  using Storage = std::conditional_t<std::is_same_v<AtT, at::Half>, HostHalf, HostBf16>;

  int64_t smem_limit() const { return 227 * 1024; }  // sm_90's per-block opt-in

  at::Tensor allocate(at::IntArrayRef sizes, const at::TensorOptions& options) const {
    return at::full(sizes, std::numeric_limits<float>::quiet_NaN(), options);
  }

  template <typename T>
  void forward(const AttentionParams<T, float>& p, const BrickPlan& plan, const ScoreScale& sc) {
    dispatch_head_dim(plan.chunks * 8, [&](auto hd) {
      run_grid(plan.blocks, plan.warps * 32, plan.bytes,
               [&](unsigned char* smem) { forward_block<T, decltype(hd)::value>(p, plan, sc, smem); });
    });
  }
  template <typename T>
  void query_pass(const AttentionParams<T, float>& p, const BrickPlan& plan, const ScoreScale& sc,
                  const BackwardOutputs<T>& outs) {
    dispatch_head_dim(plan.chunks * 8, [&](auto hd) {
      run_grid(plan.blocks, plan.warps * 32, plan.bytes,
               [&](unsigned char* smem) { query_pass_block<T, decltype(hd)::value>(p, plan, sc, outs, smem); });
    });
  }
  template <typename T>
  void key_pass(const AttentionParams<T, float>& p, const BrickPlan& plan, const ScoreScale& sc,
                const BackwardOutputs<T>& outs) {
    dispatch_head_dim(plan.chunks * 8, [&](auto hd) {
      run_grid(plan.blocks, plan.warps * 32, plan.bytes,
               [&](unsigned char* smem) { key_pass_block<T, decltype(hd)::value>(p, plan, sc, outs, smem); });
    });
  }
  template <typename T>
  void reduce(const BackwardOutputs<T>& outs, int64_t batch, int64_t heads, int64_t bricks, int head_dim) {
    run_grid(reduce_blocks(outs.partial_stride, heads), kReduceThreads, 0,
             [&](unsigned char*) { reduce_block<T>(outs, batch, heads, bricks, head_dim); });
  }
};

OpInputs emulator_inputs(const char* op, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                         at::IntArrayRef window_size, at::IntArrayRef search_size,
                         const c10::optional<at::Tensor>& rel_pos_bias, const c10::optional<at::Tensor>& pad_key,
                         const c10::optional<at::Tensor>& pad_value) {
  OpInputs in = check_op_inputs(op, query, key, value, window_size, search_size, rel_pos_bias, pad_key, pad_value,
                                {at::kHalf, at::kBFloat16});
  TORCH_CHECK(query.device().is_cpu(), op, ": the emulator runs on CPU tensors");
  return in;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> emulate_forward(const at::Tensor& query, const at::Tensor& key,
                                                   const at::Tensor& value, at::IntArrayRef window_size,
                                                   at::IntArrayRef search_size, double scale,
                                                   const c10::optional<at::Tensor>& rel_pos_bias,
                                                   const c10::optional<at::Tensor>& pad_key,
                                                   const c10::optional<at::Tensor>& pad_value) {
  const OpInputs in = emulator_inputs("brick_emulate_forward", query, key, value, window_size, search_size,
                                      rel_pos_bias, pad_key, pad_value);
  EmulatorRunner runner;
  const auto contiguous = in.query.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor out = runner.allocate(in.query.sizes(), contiguous);
  at::Tensor lse = runner.allocate({query.size(0), query.size(4), query.size(1), query.size(2), query.size(3)},
                                   contiguous.dtype(at::kFloat));
  const char* why = call_not_covered(in, scale);
  TORCH_CHECK(why == nullptr, "brick_emulate_forward: the brick kernels do not cover this call: ", why);
  TORCH_CHECK(brick::forward(runner, in, scale, out, lse), "brick_emulate_forward: no brick plan fits");
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> emulate_backward(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& out, const at::Tensor& lse, at::IntArrayRef window_size, at::IntArrayRef search_size,
    double scale, const c10::optional<at::Tensor>& rel_pos_bias, const c10::optional<at::Tensor>& pad_key,
    const c10::optional<at::Tensor>& pad_value) {
  const OpInputs in = emulator_inputs("brick_emulate_backward", query, key, value, window_size, search_size,
                                      rel_pos_bias, pad_key, pad_value);
  const at::Tensor grad_out_rows = last_dim_contiguous(grad_out);
  const at::Tensor out_c = out.contiguous(), lse_c = lse.contiguous();
  check_backward_tensors(in.query, grad_out_rows, out_c, lse_c, at::kFloat);
  const char* why = call_not_covered(in, scale);
  TORCH_CHECK(why == nullptr, "brick_emulate_backward: the brick kernels do not cover this call: ", why);
  EmulatorRunner runner;
  std::optional<Gradients> grads = brick::backward(runner, in, scale, grad_out_rows, out_c, lse_c);
  TORCH_CHECK(grads.has_value(), "brick_emulate_backward: no brick plan fits");
  return {grads->query, grads->key, grads->value, grads->rel_pos_bias, grads->pad_key, grads->pad_value};
}

}  // namespace emu
}  // namespace brick
}  // namespace xmorpher_kernels
