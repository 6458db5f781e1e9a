// Schema of the window attention ops and the Python module `xmorpher_kernels._C`.
//
// The ops are defined once here; each backend registers its implementation in its own file
// (cpu/window_attention_cpu.cpp, cuda/...). Autograd and the fake (meta) implementations are
// registered from Python (xmorpher_kernels/_native.py).
//
// Constant padding is selected by passing pad_key and pad_value (zeros when the user gave none);
// without them, padded keys are masked. lse is the log-sum-exp of each query's scores,
// (B, heads, D, H, W) in the accumulation type (fp32, or fp64 for fp64 inputs). The backward
// returns empty tensors for the gradients of absent optional inputs.
#include <torch/extension.h>
#include <torch/library.h>

#include <string>
#include <vector>

namespace xmorpher_kernels {
namespace cpu {
std::string isa();
void set_isa(const std::string& name);
std::vector<std::string> supported_isas();
}  // namespace cpu

// csrc/brick_python.cpp: the CUDA kernel generation switch, the brick kernels' CPU emulator and
// layout tables.
void register_brick_bindings(pybind11::module& m);

bool compiled_with_cuda() {
#if defined(XK_WITH_CUDA)
  return true;
#else
  return false;
#endif
}
}  // namespace xmorpher_kernels

TORCH_LIBRARY(xmorpher_kernels, m) {
  m.def(
      "window_attention_forward(Tensor query, Tensor key, Tensor value, int[3] window_size, "
      "int[3] search_size, float scale, Tensor? rel_pos_bias, Tensor? pad_key, Tensor? pad_value) "
      "-> (Tensor out, Tensor lse)");
  m.def(
      "window_attention_backward(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor out, "
      "Tensor lse, int[3] window_size, int[3] search_size, float scale, Tensor? rel_pos_bias, "
      "Tensor? pad_key, Tensor? pad_value) -> (Tensor grad_query, Tensor grad_key, Tensor grad_value, "
      "Tensor grad_rel_pos_bias, Tensor grad_pad_key, Tensor grad_pad_value)");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Native kernels of xmorpher_kernels; the ops live in torch.ops.xmorpher_kernels.";
  m.def("cpu_isa", &xmorpher_kernels::cpu::isa, "Instruction set the CPU kernels run with.");
  m.def("set_cpu_isa", &xmorpher_kernels::cpu::set_isa,
        "Force the CPU kernels' instruction set: 'avx512', 'avx2' or 'baseline' (for tests).");
  m.def("supported_cpu_isas", &xmorpher_kernels::cpu::supported_isas,
        "Instruction sets this CPU and build can run.");
  m.def("compiled_with_cuda", &xmorpher_kernels::compiled_with_cuda, "Whether the CUDA kernels were built.");
  xmorpher_kernels::register_brick_bindings(m);
}
