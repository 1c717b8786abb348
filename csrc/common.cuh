// common.cuh: device helpers shared by the kernel files (CUDA headers only).
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "bark_kernels.h"

namespace bark_kernels {
namespace detail {

constexpr float kLog2e = 1.4426950408889634f;

// 16-bit element types: conversion to/from fp32 and packing of two floats into one 32-bit mma operand register
// (the element with the lower index goes into the low 16 bits).
template <typename T>
struct Elem;

template <>
struct Elem<__half> {
  static __device__ __forceinline__ float to_float(uint16_t bits) { return __half2float(__ushort_as_half(bits)); }
  static __device__ __forceinline__ uint16_t from_float(float x) { return __half_as_ushort(__float2half_rn(x)); }
  static __device__ __forceinline__ uint32_t pack2(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};

template <>
struct Elem<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(uint16_t bits) {
    return __bfloat162float(__ushort_as_bfloat16(bits));
  }
  static __device__ __forceinline__ uint16_t from_float(float x) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(x));
  }
  static __device__ __forceinline__ uint32_t pack2(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};

// D (16x8, fp32) += A (16x16, row-major) * B (16x8, column-major), fp16 or bf16 inputs, on tensor cores (sm_80+).
// Fragment layout per lane (g = lane / 4, c = 2 * (lane % 4)):
//   a[0] = A[g][c..c+1], a[1] = A[g+8][c..c+1], a[2] = A[g][c+8..c+9], a[3] = A[g+8][c+8..c+9]
//   b[0] = B[c..c+1][g], b[1] = B[c+8..c+9][g]
//   d[0..1] = D[g][c..c+1], d[2..3] = D[g+8][c..c+1]
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

#ifdef BARK_KERNELS_HOST_EMULATION
// tests/test_cuda_emulation.py runs these kernels on the CPU (csrc/emulation/emu.h emulates the warp collectives).
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  emu::mma_16816<false>(d, a, b0, b1);
}
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                         uint32_t b1) {
  emu::mma_16816<true>(d, a, b0, b1);
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const uint16_t* smem_row) {
  emu::ldmatrix_x4_trans(r, smem_row);
}
#else
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// ldmatrix .x4 .trans: lanes 8*i .. 8*i+7 give the row addresses (16 bytes each) of 8x8 matrix i; lane l receives
// r[i] = {M_i[c][g], M_i[c+1][g]} (g = l / 4, c = 2 * (l % 4)), i.e. the column-major B fragment of M_i.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const uint16_t* smem_row) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem_row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
#endif  // BARK_KERNELS_HOST_EMULATION

__device__ __forceinline__ uint32_t ld_shared_u32(const uint16_t* p) { return *reinterpret_cast<const uint32_t*>(p); }

// Loads 8 consecutive 16-bit elements: one 16-byte load when `aligned` (pointer 16-byte aligned), else 8 scalar loads.
__device__ __forceinline__ uint4 load_8x16(const uint16_t* src, bool aligned) {
  if (aligned) return __ldg(reinterpret_cast<const uint4*>(src));
  union {
    uint4 v;
    uint16_t h[8];
  } u;
#pragma unroll
  for (int e = 0; e < 8; ++e) u.h[e] = src[e];
  return u.v;
}

__device__ __forceinline__ bool is_neg_inf(float x) { return x == -INFINITY; }

__host__ __device__ __forceinline__ int ceil_div(int a, int b) { return (a + b - 1) / b; }

// True when pointer p (of 16-bit elements) and every given row/head/batch stride keep 16-byte alignment of 8-element
// chunks, so a row slice starting at a multiple of 8 elements can be read with 16-byte loads.
inline bool aligned_16B(const void* p, int64_t s0, int64_t s1, int64_t s2) {
  return (reinterpret_cast<uintptr_t>(p) % 16 == 0) && (s0 % 8 == 0) && (s1 % 8 == 0) && (s2 % 8 == 0);
}

}  // namespace detail
}  // namespace bark_kernels
