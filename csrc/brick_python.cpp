// The brick kernels' part of the Python module `xmorpher_kernels._C`: the CUDA kernel generation
// switch, the CPU emulator of the kernels, and debug functions that return the layout tables the
// kernels use (csrc/include/xmorpher_kernels/brick_layout.h), for the tests.
#include <torch/extension.h>

#include <optional>
#include <string>
#include <vector>

#include "brick_emulator.h"
#include "xmorpher_kernels/brick_layout.h"
#include "xmorpher_kernels/kernel_generation.h"

namespace xmorpher_kernels {
namespace {

WindowGeometry geometry_of(const std::vector<int64_t>& volume, const std::vector<int64_t>& window,
                           const std::vector<int64_t>& search) {
  TORCH_CHECK(volume.size() == 3 && window.size() == 3 && search.size() == 3,
              "volume, window and search need 3 entries each");
  WindowGeometry g{};
  for (int axis = 0; axis < 3; ++axis) {
    TORCH_CHECK(volume[axis] >= 1 && window[axis] >= 1 && search[axis] >= window[axis],
                "need volume >= 1 and 1 <= window <= search on every axis");
    g.volume[axis] = volume[axis];
    g.window[axis] = window[axis];
    g.search[axis] = search[axis];
  }
  return g;
}

brick::BoxKind kind_of(const std::string& kind) {
  TORCH_CHECK(kind == "keys_of_window" || kind == "queries_of_key_block",
              "kind must be 'keys_of_window' or 'queries_of_key_block', got '", kind, "'");
  return kind == "keys_of_window" ? brick::BoxKind::kKeysOfWindow : brick::BoxKind::kQueriesOfKeyBlock;
}

template <typename T, size_t N>
std::vector<int64_t> as_list(const T (&values)[N], int count = N) {
  return std::vector<int64_t>(values, values + count);
}

py::dict plan_dict(const std::vector<int64_t>& volume, const std::vector<int64_t>& window,
                   const std::vector<int64_t>& search, int64_t head_dim, const std::string& kind,
                   int64_t batch_heads, int64_t budget, int64_t device_limit) {
  const WindowGeometry g = geometry_of(volume, window, search);
  py::dict d;
  const char* why = brick::not_covered(g, head_dim);
  d["not_covered"] = why == nullptr ? py::none() : py::cast(std::string(why));
  if (why != nullptr) return d;
  const brick::BrickPlan p = brick::choose_plan(g, kind_of(kind), head_dim, batch_heads, budget, device_limit);
  std::vector<int64_t> box_extent, box_start, units, window_size;
  for (const brick::Axis& a : p.box.axis) {
    box_extent.push_back(a.box);
    box_start.push_back(a.box_start);
    units.push_back(a.units);
  }
  d["box_extent"] = box_extent;
  d["box_start"] = box_start;
  d["units"] = units;
  d["box"] = p.box.box;
  d["slots"] = p.box.slots;
  d["chunks"] = p.chunks;
  d["brick"] = as_list(p.brick);
  d["bricks"] = as_list(p.bricks);
  d["halo"] = as_list(p.halo);
  d["stride_y"] = p.stride_y;
  d["stride_z"] = p.stride_z;
  d["rows"] = p.rows;
  d["warps"] = p.warps;
  d["groups_x"] = p.groups_x;
  d["row_bytes"] = p.row_bytes;
  d["a_offset"] = p.a_offset;
  d["b_offset"] = p.b_offset;
  d["table_offset"] = p.table_offset;
  d["code_offset"] = p.code_offset;
  d["rowdata_offset"] = p.rowdata_offset;
  d["bytes"] = p.bytes;
  d["blocks"] = p.blocks;
  d["token_row"] = as_list(p.token_row);
  d["token_part"] = as_list(p.token_part);
  d["token_slots"] = as_list(p.token_slots);
  d["token_code"] = as_list(p.token_code);
  d["slot_part"] = as_list(p.slot_part);
  // The score start class and bias index of every (box token, slot) pair, through pair_entry().
  std::vector<std::vector<int64_t>> entry_kind, entry_index;
  for (int m = 0; m < brick::kBoxTokens; ++m) {
    std::vector<int64_t> kinds, indices;
    for (int n = 0; n < brick::kMaxSlots; ++n) {
      int index = 0;
      kinds.push_back(brick::pair_entry(p, m, n, index));
      indices.push_back(index);
    }
    entry_kind.push_back(kinds);
    entry_index.push_back(indices);
  }
  d["pair_kind"] = entry_kind;
  d["pair_index"] = entry_index;
  // Each warp's units in order, (dz, dy, dx), through UnitSteps.
  std::vector<std::vector<std::vector<int64_t>>> warp_units;
  for (int warp = 0; warp < p.warps; ++warp) {
    std::vector<std::vector<int64_t>> list;
    brick::UnitSteps steps(p, warp);
    for (int j = 0; j < steps.count; ++j, steps.next()) list.push_back({steps.dz, steps.dy, steps.dx()});
    warp_units.push_back(list);
  }
  d["warp_units"] = warp_units;
  return d;
}

}  // namespace

void register_brick_bindings(py::module& m) {
  m.def("cuda_kernels", &cuda_kernels_name,
        "The CUDA tensor-core kernel generation in use: 'classic' (default) or 'brick' "
        "(XMORPHER_KERNELS_CUDA_KERNELS at load).");
  m.def("set_cuda_kernels", &set_cuda_kernels, "Switch the CUDA tensor-core kernel generation: 'classic' or 'brick'.");
  m.def(
      "brick_not_covered",
      [](std::vector<int64_t> volume, std::vector<int64_t> window, std::vector<int64_t> search, int64_t head_dim,
         at::ScalarType dtype) -> std::optional<std::string> {
        if (dtype != at::kHalf && dtype != at::kBFloat16) return std::string("dtype is not fp16 or bf16");
        const char* why = brick::not_covered(geometry_of(volume, window, search), head_dim);
        return why == nullptr ? std::nullopt : std::optional<std::string>(why);
      },
      "Why the brick kernels do not cover a call's geometry, head_dim and dtype, or None (rows must also be "
      "16-byte aligned at run time).");
  m.def("brick_emulate_forward", &brick::emu::emulate_forward,
        "window_attention_forward on CPU fp16/bf16 tensors through the CPU emulation of the brick CUDA kernels.");
  m.def("brick_emulate_backward", &brick::emu::emulate_backward,
        "window_attention_backward on CPU fp16/bf16 tensors through the CPU emulation of the brick CUDA kernels.");
  m.def(
      "brick_emulator_stats",
      [] {
        const brick::emu::EmulatorStats s = brick::emu::take_stats();
        py::dict d;
        d["blocks"] = s.blocks;
        d["ldsm_phases"] = s.ldsm_phases;
        d["ldsm_extra_wavefronts"] = s.ldsm_extra_wavefronts;
        d["cp_async"] = s.cp_async;
        return d;
      },
      "The emulator's counters since the last call (blocks, ldmatrix phases and bank-conflict wavefronts, cp.async).");
  m.def("brick_plan", &plan_dict, py::arg("volume"), py::arg("window"), py::arg("search"), py::arg("head_dim"),
        py::arg("kind"), py::arg("batch_heads") = 1, py::arg("budget") = brick::kSmemBudget,
        py::arg("device_limit") = 227 * 1024,
        "The brick kernels' plan of a call (brick_layout.h's choose_plan) and its tables, as the kernels see them.");
  m.def(
      "brick_pair_bias_index",
      [](std::vector<int64_t> volume, std::vector<int64_t> window, std::vector<int64_t> search, const std::string& kind) {
        const WindowGeometry g = geometry_of(volume, window, search);
        const brick::BoxGeometry b = brick::box_geometry(g, kind_of(kind));
        std::vector<std::vector<int64_t>> table;
        for (int m = 0; m < brick::kBoxTokens; ++m) {
          std::vector<int64_t> row;
          for (int n = 0; n < brick::kMaxSlots; ++n) row.push_back(brick::pair_bias_index(b, g, m, n));
          table.push_back(row);
        }
        return table;
      },
      "pair_bias_index (the contract-derived pair relation of brick_layout.h) of every (box token, slot): a bias index or -1.");
  m.def(
      "brick_outside_bits",
      [](std::vector<int64_t> volume, std::vector<int64_t> window, std::vector<int64_t> search, std::vector<int64_t> unit) {
        const WindowGeometry g = geometry_of(volume, window, search);
        TORCH_CHECK(unit.size() == 3, "unit needs 3 entries");
        const int u[3] = {static_cast<int>(unit[0]), static_cast<int>(unit[1]), static_cast<int>(unit[2])};
        return brick::outside_bits(brick::box_geometry(g, brick::BoxKind::kKeysOfWindow), u);
      },
      "The key-code bits of a window's box positions outside the volume.");
  m.def("brick_chunk_offset", &brick::chunk_offset, py::arg("row"), py::arg("chunk"), py::arg("chunks"),
        "Byte offset of a 16-byte chunk of a staged row after the swizzle.");
  m.def("brick_fragment_position", &brick::fragment_position, py::arg("m"), py::arg("n"),
        "Position of the pair (box token m, slot n) in a fragment-order table.");
  m.def(
      "brick_budgets",
      [] {
        py::dict d;
        d["forward"] = brick::kForwardBudget;
        d["query_pass"] = brick::kQueryPassBudget;
        d["key_pass"] = brick::kKeyPassBudget;
        d["tiles"] = brick::kTiles;
        return d;
      },
      "Instruction budgets per 16-token tile of the brick kernels' hot loops (head_dim 16), and tiles per unit.");
}

}  // namespace xmorpher_kernels
