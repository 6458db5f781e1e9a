// The fused CPU kernels compiled for the build's baseline instruction set; see window_attention_cpu_isa.h.
#define XK_ISA baseline
#include "window_attention_cpu_isa.h"
