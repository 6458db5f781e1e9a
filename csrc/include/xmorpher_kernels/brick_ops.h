// The few warp-level and memory operations the brick kernels use (brick_kernels.h), in one
// place: inline PTX under nvcc, and declarations of their CPU emulation otherwise
// (csrc/brick_emulator.cpp runs the kernels' own code with each CUDA thread as a fiber, so the
// CPU tests check the kernels' tiling, fragment juggling and shared-memory addressing against the
// reference). Shared-memory operands are byte offsets into the block's dynamic shared memory
// (`smem_window` adds the shared-window address of its start for ldmatrix and cp.async).
//
// Fragment semantics follow the PTX ISA: mma.sync.m16n8k16 (A row-major 16 x 16, B column 16 x 8,
// fp32 C), ldmatrix.m8n8 (.x4: lanes 8i..8i+7 give the row addresses of matrix i; register i of
// lane l gets row l / 4, columns 2 (l % 4) .. +1, or with .trans rows 2 (l % 4) .. +1 of column
// l / 4), movmatrix.m8n8.trans.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define XK_DEVICE __device__ __forceinline__
#define XK_UNROLL _Pragma("unroll")
#else
#define XK_DEVICE inline
#define XK_UNROLL _Pragma("GCC unroll 16")
#endif

namespace xmorpher_kernels {
namespace brick {

struct F2 {
  float x, y;
};
struct F4 {
  float x, y, z, w;
};
struct U2 {
  uint32_t x, y;
};

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

#if !defined(__CUDACC__)
// Host stand-ins of the 16-bit storage types (bit patterns of fp16 and bf16).
struct HostHalf {
  uint16_t bits;
};
struct HostBf16 {
  uint16_t bits;
};
#endif

// Whether a 16-bit storage type is bf16 (else fp16).
template <typename T> struct Format;
#if defined(__CUDACC__)
template <> struct Format<__half> { static constexpr bool kBf16 = false; };
template <> struct Format<__nv_bfloat16> { static constexpr bool kBf16 = true; };
#else
template <> struct Format<HostHalf> { static constexpr bool kBf16 = false; };
template <> struct Format<HostBf16> { static constexpr bool kBf16 = true; };
#endif

namespace ops {

#if defined(__CUDACC__)

XK_DEVICE int thread_index() { return static_cast<int>(threadIdx.x); }
XK_DEVICE int block_threads() { return static_cast<int>(blockDim.x); }
XK_DEVICE int64_t block_index() { return static_cast<int64_t>(blockIdx.x); }
XK_DEVICE void sync_block() { __syncthreads(); }

XK_DEVICE uint32_t smem_window(const unsigned char* smem) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(smem));
}

XK_DEVICE F4 ld_shared_f4(const unsigned char* smem, uint32_t offset) {
  const float4 v = *reinterpret_cast<const float4*>(smem + offset);
  return F4{v.x, v.y, v.z, v.w};
}
XK_DEVICE F2 ld_shared_f2(const unsigned char* smem, uint32_t offset) {
  const float2 v = *reinterpret_cast<const float2*>(smem + offset);
  return F2{v.x, v.y};
}
XK_DEVICE U2 ld_shared_u2(const unsigned char* smem, uint32_t offset) {
  const uint2 v = *reinterpret_cast<const uint2*>(smem + offset);
  return U2{v.x, v.y};
}
XK_DEVICE float ld_shared_f32(const unsigned char* smem, uint32_t offset) {
  return *reinterpret_cast<const float*>(smem + offset);
}
XK_DEVICE void st_shared_f4(unsigned char* smem, uint32_t offset, F4 v) {
  *reinterpret_cast<float4*>(smem + offset) = make_float4(v.x, v.y, v.z, v.w);
}
XK_DEVICE void st_shared_f2(unsigned char* smem, uint32_t offset, F2 v) {
  *reinterpret_cast<float2*>(smem + offset) = make_float2(v.x, v.y);
}
XK_DEVICE void st_shared_u2(unsigned char* smem, uint32_t offset, U2 v) {
  *reinterpret_cast<uint2*>(smem + offset) = make_uint2(v.x, v.y);
}
XK_DEVICE void st_shared_f32(unsigned char* smem, uint32_t offset, float v) {
  *reinterpret_cast<float*>(smem + offset) = v;
}

// 16 bytes global -> shared, asynchronous; `valid` false fills zeros (src is not read).
XK_DEVICE void cp_async_16(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0));
}
// Waits for this thread's cp.async copies (the block barrier that follows publishes them).
XK_DEVICE void cp_async_wait_all() { asm volatile("cp.async.commit_group;\ncp.async.wait_group 0;\n" ::: "memory"); }

XK_DEVICE void ldsm_x4(uint32_t (&r)[4], uint32_t address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
}
XK_DEVICE void ldsm_x4_trans(uint32_t (&r)[4], uint32_t address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
}
XK_DEVICE uint32_t movm_trans(uint32_t x) {
  uint32_t y;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
  return y;
}

// D = A B + C with D and C distinct (C is not consumed).
template <typename T>
XK_DEVICE void mma_from(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, const float (&c)[4]) {
  if constexpr (Format<T>::kBf16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
  }
}

// C = A B + C.
template <typename T>
XK_DEVICE void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (Format<T>::kBf16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

XK_DEVICE float shfl_xor(float v, int mask) { return __shfl_xor_sync(0xffffffffu, v, mask); }
XK_DEVICE float shfl_idx(float v, int lane) { return __shfl_sync(0xffffffffu, v, lane); }

XK_DEVICE float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}
XK_DEVICE float lg2(float x) {
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}
XK_DEVICE float rcp(float x) {
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

template <typename T>
XK_DEVICE uint32_t pack2(float lo, float hi) {
  if constexpr (Format<T>::kBf16) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  } else {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
}
template <typename T>
XK_DEVICE F2 unpack2(uint32_t x) {
  if constexpr (Format<T>::kBf16) {
    const float2 v = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&x));
    return F2{v.x, v.y};
  } else {
    const float2 v = __half22float2(*reinterpret_cast<const __half2*>(&x));
    return F2{v.x, v.y};
  }
}
template <typename T>
XK_DEVICE float to_float(T x) {
  if constexpr (Format<T>::kBf16) {
    return __bfloat162float(x);
  } else {
    return __half2float(x);
  }
}
template <typename T>
XK_DEVICE T from_float(float x) {
  if constexpr (Format<T>::kBf16) {
    return __float2bfloat16_rn(x);
  } else {
    return __float2half_rn(x);
  }
}

#else  // CPU emulation (csrc/brick_emulator.cpp)

int thread_index();
int block_threads();
int64_t block_index();
void sync_block();
uint32_t smem_window(const unsigned char* smem);
F4 ld_shared_f4(const unsigned char* smem, uint32_t offset);
F2 ld_shared_f2(const unsigned char* smem, uint32_t offset);
U2 ld_shared_u2(const unsigned char* smem, uint32_t offset);
float ld_shared_f32(const unsigned char* smem, uint32_t offset);
void st_shared_f4(unsigned char* smem, uint32_t offset, F4 v);
void st_shared_f2(unsigned char* smem, uint32_t offset, F2 v);
void st_shared_u2(unsigned char* smem, uint32_t offset, U2 v);
void st_shared_f32(unsigned char* smem, uint32_t offset, float v);
void cp_async_16(uint32_t dst, const void* src, bool valid);
void cp_async_wait_all();
void ldsm_x4(uint32_t (&r)[4], uint32_t address);
void ldsm_x4_trans(uint32_t (&r)[4], uint32_t address);
uint32_t movm_trans(uint32_t x);
void mma_f16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16);
float shfl_xor(float v, int mask);
float shfl_idx(float v, int lane);
float ex2(float x);
float lg2(float x);
float rcp(float x);
uint32_t pack2_bits(float lo, float hi, bool bf16);
F2 unpack2_bits(uint32_t x, bool bf16);

template <typename T>
inline void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  mma_f16(c, a, b0, b1, Format<T>::kBf16);
}
template <typename T>
inline void mma_from(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, const float (&c)[4]) {
  for (int e = 0; e < 4; ++e) d[e] = c[e];
  mma_f16(d, a, b0, b1, Format<T>::kBf16);
}
template <typename T>
inline uint32_t pack2(float lo, float hi) {
  return pack2_bits(lo, hi, Format<T>::kBf16);
}
template <typename T>
inline F2 unpack2(uint32_t x) {
  return unpack2_bits(x, Format<T>::kBf16);
}
template <typename T>
inline float to_float(T x) {
  return unpack2_bits(x.bits, Format<T>::kBf16).x;
}
template <typename T>
inline T from_float(float x) {
  return T{static_cast<uint16_t>(pack2_bits(x, 0.f, Format<T>::kBf16) & 0xffffu)};
}

#endif

// Global memory, 32 or 16 bits at a time (aligned), through memcpy on the host (no aliasing of
// the storage types).
XK_DEVICE uint32_t load_u32(const void* p) {
#if defined(__CUDACC__)
  return *reinterpret_cast<const uint32_t*>(p);
#else
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
#endif
}
XK_DEVICE uint32_t load_u16(const void* p) {
#if defined(__CUDACC__)
  return *reinterpret_cast<const uint16_t*>(p);
#else
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
#endif
}
XK_DEVICE void store_u32(void* p, uint32_t v) {
#if defined(__CUDACC__)
  *reinterpret_cast<uint32_t*>(p) = v;
#else
  std::memcpy(p, &v, 4);
#endif
}

// The packed pair (1, 1): the A operand of all ones whose product with P^T is P's row sums.
template <typename T>
XK_DEVICE uint32_t packed_ones() {
  return Format<T>::kBf16 ? 0x3f803f80u : 0x3c003c00u;
}

// Both 16-bit halves negated (exact).
XK_DEVICE uint32_t negate2(uint32_t x) { return x ^ 0x80008000u; }

}  // namespace ops
}  // namespace brick
}  // namespace xmorpher_kernels
