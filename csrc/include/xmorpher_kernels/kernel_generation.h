// Which generation of CUDA tensor-core kernels the CUDA backend runs: "classic" (the default,
// window_attention_cuda_mma*.cu) or "brick" (window_attention_cuda_brick_*.cu, not yet validated
// on a GPU). Read once from XMORPHER_KERNELS_CUDA_KERNELS when the extension loads; tests switch
// it through xmorpher_kernels._C.set_cuda_kernels(). Calls the brick kernels do not cover run
// on the classic ones.
#pragma once

#include <string>

namespace xmorpher_kernels {

enum class CudaKernels : int { kClassic = 0, kBrick = 1 };

CudaKernels cuda_kernels();
std::string cuda_kernels_name();
// "classic" or "brick"; anything else raises.
void set_cuda_kernels(const std::string& name);

}  // namespace xmorpher_kernels
