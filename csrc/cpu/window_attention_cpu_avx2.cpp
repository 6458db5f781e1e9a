// The fused CPU kernels compiled for AVX2 + FMA; see window_attention_cpu_isa.h.
#define XK_ISA avx2
#define XK_ISA_TARGET "avx2,fma,bmi2"
#include "window_attention_cpu_isa.h"
