// Schemas of the window attention ops and the Python module `xmorpher_kernels._C`.
//
// Two op families share one signature: window_attention_{forward,backward} (kernels in cpu/ and
// cuda/, registered there) and triton_window_attention_{forward,backward} (kernels registered
// from Python, xmorpher_kernels/_triton.py). Autograd of both forward ops is C++
// (autograd.cpp); their fake (meta) implementations are registered from Python
// (xmorpher_kernels/_extension.py).
//
// Constant padding is selected by passing pad_key and pad_value; without them padded keys are
// masked. lse is the log-sum-exp of each query's scores, (B, heads, D, H, W) in the accumulation
// type (fp32, or fp64 for fp64 inputs). The backward takes `deterministic` explicitly (autograd
// passes torch.are_deterministic_algorithms_enabled()) and returns empty tensors for the
// gradients of absent optional inputs.
#include <torch/extension.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "cpu/window_attention_cpu_support.h"
#if defined(XK_WITH_CUDA)
#include "cuda/window_attention_cuda_support.h"
#endif

namespace xmorpher_kernels {

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
  for (const char* family : {"", "triton_"}) {
    m.def((std::string(family) +
          "window_attention_forward(Tensor query, Tensor key, Tensor value, int[3] window_size, "
          "int[3] search_size, float scale, Tensor? rel_pos_bias, Tensor? pad_key, Tensor? pad_value) "
          "-> (Tensor out, Tensor lse)")
              .c_str());
    m.def((std::string(family) +
          "window_attention_backward(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor out, "
          "Tensor lse, int[3] window_size, int[3] search_size, float scale, Tensor? rel_pos_bias, "
          "Tensor? pad_key, Tensor? pad_value, bool deterministic) -> (Tensor grad_query, Tensor grad_key, "
          "Tensor grad_value, Tensor grad_rel_pos_bias, Tensor grad_pad_key, Tensor grad_pad_value)")
              .c_str());
  }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace xk = xmorpher_kernels;
  m.doc() = "Native kernels of xmorpher_kernels; the ops live in torch.ops.xmorpher_kernels.";
  m.def("cpu_isa", &xk::cpu::isa, "Instruction set the CPU kernels run with.");
  m.def("set_cpu_isa", &xk::cpu::set_isa,
        "Force the CPU kernels' instruction set: 'avx512', 'avx2' or 'baseline' (for tests).");
  m.def("supported_cpu_isas", &xk::cpu::supported_isas, "Instruction sets this CPU and build can run.");
  m.def("cpu_dtypes", &xk::cpu::supported_dtypes, "Dtypes the CPU kernels take.");
  m.def("compiled_with_cuda", &xk::compiled_with_cuda, "Whether the CUDA kernels were built.");
#if defined(XK_WITH_CUDA)
  m.def("cuda_dtypes", &xk::cuda::supported_dtypes, "Dtypes the CUDA kernels take.");
  m.def("cuda_max_head_dim", [] { return xk::cuda::kMaxHeadDim; }, "Largest head_dim the CUDA kernels take.");
  m.def(
      "cuda_tensor_cores_cover",
      [](std::vector<int64_t> volume, std::vector<int64_t> window, std::vector<int64_t> search, int64_t head_dim,
         at::ScalarType dtype) {
        TORCH_CHECK(volume.size() == 3 && window.size() == 3 && search.size() == 3,
                    "cuda_tensor_cores_cover: volume, window and search need 3 entries each");
        xk::WindowGeometry g{};
        for (int axis = 0; axis < 3; ++axis) {
          g.volume[axis] = volume[axis];
          g.window[axis] = window[axis];
          g.search[axis] = search[axis];
        }
        return xk::cuda::tensor_cores_cover(g, head_dim, dtype);
      },
      "Whether a call runs on the CUDA backend's tensor-core kernels (else its generic CUDA-core ones).");
#endif
  xk::register_brick_bindings(m);
}
