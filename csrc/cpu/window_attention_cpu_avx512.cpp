// The fused CPU kernels compiled for AVX-512 (avx512f/bw/vl/dq); see window_attention_cpu_isa.h.
#define XK_ISA avx512
#define XK_ISA_TARGET "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,bmi2"
#include "window_attention_cpu_isa.h"
