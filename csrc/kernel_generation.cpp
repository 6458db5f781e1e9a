// The switch between the CUDA backend's kernel generations (xmorpher_kernels/kernel_generation.h).
#include "xmorpher_kernels/kernel_generation.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace xmorpher_kernels {
namespace {

constexpr const char* kVariable = "XMORPHER_KERNELS_CUDA_KERNELS";

// The environment's choice, read once at load; an unknown value keeps the default and says so.
int from_environment() {
  const char* value = std::getenv(kVariable);
  if (value == nullptr || *value == '\0' || std::strcmp(value, "classic") == 0) return 0;
  if (std::strcmp(value, "brick") == 0) return 1;
  std::fprintf(stderr, "xmorpher_kernels: ignoring %s=%s (expected 'classic' or 'brick'); using 'classic'\n",
               kVariable, value);
  return 0;
}

std::atomic<int> selected{from_environment()};

}  // namespace

CudaKernels cuda_kernels() { return static_cast<CudaKernels>(selected.load(std::memory_order_relaxed)); }

std::string cuda_kernels_name() { return cuda_kernels() == CudaKernels::kBrick ? "brick" : "classic"; }

void set_cuda_kernels(const std::string& name) {
  TORCH_CHECK(name == "classic" || name == "brick", "set_cuda_kernels: expected 'classic' or 'brick', got '", name,
              "'");
  selected.store(name == "brick" ? 1 : 0, std::memory_order_relaxed);
}

}  // namespace xmorpher_kernels
