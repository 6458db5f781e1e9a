// What the CPU backend supports and which instruction set it runs, declared beside its kernels
// (window_attention_cpu.cpp) and exposed to Python by the module in window_attention.cpp, so the
// Python dispatcher never restates these rules.
#pragma once

#include <c10/core/ScalarType.h>

#include <string>
#include <vector>

namespace xmorpher_kernels {
namespace cpu {

// Dtypes the CPU kernels take.
const std::vector<c10::ScalarType>& supported_dtypes();

std::string isa();
void set_isa(const std::string& name);
std::vector<std::string> supported_isas();

}  // namespace cpu
}  // namespace xmorpher_kernels
