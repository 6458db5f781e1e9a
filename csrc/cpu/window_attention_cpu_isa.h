// Compiles the fused CPU kernels (window_attention_cpu_kernel.h) into namespace XK_ISA for the
// instruction set XK_ISA_TARGET (a GCC/clang target string; unset for the baseline), and
// instantiates them for fp32, fp64 and bf16. Included once by each window_attention_cpu_<isa>.cpp.
#include <cstdint>

#include "window_attention_cpu.h"

#define XK_PRAGMA(text) _Pragma(#text)
#if defined(XK_ISA_TARGET) && defined(__x86_64__) && defined(__clang__)
#define XK_ISA_BUILT 1
#define XK_TARGET_PUSH(isa_target) XK_PRAGMA(clang attribute push(__attribute__((target(isa_target))), apply_to = function))
#define XK_TARGET_POP XK_PRAGMA(clang attribute pop)
#elif defined(XK_ISA_TARGET) && defined(__x86_64__) && defined(__GNUC__)
#define XK_ISA_BUILT 1
#define XK_TARGET_PUSH(isa_target) XK_PRAGMA(GCC push_options) XK_PRAGMA(GCC target(isa_target))
#define XK_TARGET_POP XK_PRAGMA(GCC pop_options)
#elif !defined(XK_ISA_TARGET)
#define XK_ISA_BUILT 1
#define XK_TARGET_PUSH(isa_target)
#define XK_TARGET_POP
#define XK_ISA_TARGET
#endif

#define XK_ALWAYS_INLINE inline __attribute__((always_inline))

namespace xmorpher_kernels {
namespace cpu {
namespace XK_ISA {

#if defined(XK_ISA_BUILT)
XK_TARGET_PUSH(XK_ISA_TARGET)

#include "window_attention_cpu_kernel.h"

#define XK_INSTANTIATE(scalar_t, acc_t)                                                          \
  template void forward_windows<scalar_t, acc_t>(const AttentionParams<scalar_t, acc_t>&, int64_t, \
                                                 int64_t, acc_t*, int64_t*, const acc_t**);      \
  template void backward_windows<scalar_t, acc_t>(const AttentionParams<scalar_t, acc_t>&,        \
                                                  int64_t, int64_t, int64_t, acc_t*,              \
                                                  int64_t*, const acc_t**);
XK_INSTANTIATE(float, float)
XK_INSTANTIATE(double, double)
XK_INSTANTIATE(uint16_t, float)

XK_TARGET_POP
#endif

// Whether this build holds real kernels (an ISA build is empty off x86-64 or off GCC/clang).
bool built() {
#if defined(XK_ISA_BUILT)
  return true;
#else
  return false;
#endif
}

}  // namespace XK_ISA
}  // namespace cpu
}  // namespace xmorpher_kernels
