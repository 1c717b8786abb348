// emu.h: run the CUDA kernels of csrc/ on the CPU, one OS thread per CUDA thread (tests only).
//
// tests/test_cuda_emulation.py compiles csrc/*.cu with the host compiler, this header force-included
// (-include emu.h -DBARK_KERNELS_HOST_EMULATION) and the stand-in CUDA headers of this folder first on the include
// path; kernel launches (`k<<<grid, block, smem, stream>>>(args)`) are rewritten to emu::launch(k, grid, block, smem,
// stream, args). CTAs run one after another; the threads of a CTA run concurrently and meet at real barriers, so
// __syncthreads, warp shuffles and the warp-collective PTX instructions (mma.sync m16n8k16, ldmatrix.x4.trans,
// emulated from the PTX ISA's fragment layouts) behave as on the device. Checked on the way: every thread of a CTA
// passes the same number of __syncthreads and every lane of a warp the same number of warp collectives (divergent
// barriers), shuffle masks are full, 16-byte vector loads and ldmatrix rows are aligned. Build with
// -fsanitize=address to catch out-of-bounds reads/writes of global memory.
#pragma once

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "cuda_bf16.h"
#include "cuda_fp16.h"
#include "cuda_runtime.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

using std::max;
using std::min;

namespace emu {

struct Cta {
  explicit Cta(int nthreads) : nthreads(nthreads), block_barrier(nthreads), syncs(nthreads, 0), collectives(nthreads, 0) {
    const int nwarps = (nthreads + 31) / 32;
    for (int w = 0; w < nwarps; ++w) warp_barriers.emplace_back(std::make_unique<std::barrier<>>(32));
    words.resize(static_cast<size_t>(nwarps) * 32 * 8);
    ptrs.resize(static_cast<size_t>(nwarps) * 32);
  }
  int nthreads;
  std::barrier<> block_barrier;
  std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
  std::vector<uint32_t> words;      // per lane: 8 exchange words
  std::vector<const void*> ptrs;    // per lane: one exchange pointer
  std::vector<long> syncs;          // __syncthreads passed, per thread
  std::vector<long> collectives;    // warp collectives passed, per thread
};

inline std::atomic<int> g_error{0};
inline char g_message[512];

inline void fail(const char* what) {
  int expected = 0;
  if (g_error.compare_exchange_strong(expected, 1)) std::snprintf(g_message, sizeof(g_message), "%s", what);
}

inline thread_local Cta* tl_cta = nullptr;
inline thread_local int tl_tid = 0;

inline void warp_sync() {
  tl_cta->warp_barriers[tl_tid / 32]->arrive_and_wait();
}
inline uint32_t* lane_words(int lane) { return &tl_cta->words[(static_cast<size_t>(tl_tid / 32) * 32 + lane) * 8]; }
inline const void*& lane_ptr(int lane) { return tl_cta->ptrs[static_cast<size_t>(tl_tid / 32) * 32 + lane]; }

// D (16x8 fp32) += A (16x16) * B (16x8), fragments as in the PTX ISA for mma.m16n8k16 with .f16/.bf16 inputs.
template <bool kBf16>
inline float unpack(uint32_t word, int half) {
  const uint16_t bits = static_cast<uint16_t>(word >> (16 * half));
  return kBf16 ? __bfloat162float(__ushort_as_bfloat16(bits)) : __half2float(__ushort_as_half(bits));
}

template <bool kBf16>
void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  const int lane = tl_tid % 32;
  ++tl_cta->collectives[tl_tid];
  uint32_t* mine = lane_words(lane);
  for (int i = 0; i < 4; ++i) mine[i] = a[i];
  mine[4] = b0;
  mine[5] = b1;
  warp_sync();
  auto A = [](int r, int k) {  // A[r][k]: lane (r % 8) * 4 + (k % 8) / 2, register (r >= 8) + 2 * (k >= 8)
    return unpack<kBf16>(lane_words((r % 8) * 4 + (k % 8) / 2)[(r >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0)], k % 2);
  };
  auto B = [](int k, int n) {  // B[k][n]: lane n * 4 + (k % 8) / 2, register b0 (k < 8) or b1
    return unpack<kBf16>(lane_words(n * 4 + (k % 8) / 2)[k >= 8 ? 5 : 4], k % 2);
  };
  const int g = lane / 4, c = 2 * (lane % 4);
  float out[4];
  for (int e = 0; e < 4; ++e) {
    const int row = g + (e >= 2 ? 8 : 0), col = c + (e & 1);
    float acc = d[e];
    for (int k = 0; k < 16; ++k) acc += A(row, k) * B(k, col);
    out[e] = acc;
  }
  warp_sync();
  for (int e = 0; e < 4; ++e) d[e] = out[e];
}

// ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16: lanes 8i..8i+7 give the rows of matrix i; lane l receives
// r[i] = {M_i[c][g], M_i[c + 1][g]} (g = l / 4, c = 2 * (l % 4)).
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const uint16_t* row) {
  const int lane = tl_tid % 32;
  ++tl_cta->collectives[tl_tid];
  if (reinterpret_cast<uintptr_t>(row) % 16 != 0) fail("ldmatrix: row address not 16-byte aligned");
  lane_ptr(lane) = row;
  warp_sync();
  const int g = lane / 4, c = 2 * (lane % 4);
  uint32_t out[4];
  for (int i = 0; i < 4; ++i) {
    const uint16_t lo = static_cast<const uint16_t*>(lane_ptr(8 * i + c))[g];
    const uint16_t hi = static_cast<const uint16_t*>(lane_ptr(8 * i + c + 1))[g];
    out[i] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
  }
  warp_sync();
  for (int i = 0; i < 4; ++i) r[i] = out[i];
}

template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t /*smem*/, cudaStream_t /*stream*/,
            Args&&... args);

}  // namespace emu

inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim{1, 1, 1};
inline thread_local dim3 gridDim{1, 1, 1};

inline void __syncthreads() {
  ++emu::tl_cta->syncs[emu::tl_tid];
  emu::tl_cta->block_barrier.arrive_and_wait();
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask) {
  static_assert(sizeof(T) == 4, "32-bit shuffles only");
  if (mask != 0xffffffffu) emu::fail("__shfl_xor_sync: partial mask");
  const int lane = emu::tl_tid % 32;
  ++emu::tl_cta->collectives[emu::tl_tid];
  std::memcpy(emu::lane_words(lane), &value, 4);
  emu::warp_sync();
  T out;
  std::memcpy(&out, emu::lane_words(lane ^ lane_mask), 4);
  emu::warp_sync();
  return out;
}

template <typename T>
T __ldg(const T* p) {
  if (reinterpret_cast<uintptr_t>(p) % alignof(T) != 0) emu::fail("__ldg: misaligned vector load");
  return *p;
}

template <typename... KArgs, typename... Args>
void emu::launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t, cudaStream_t, Args&&... args) {
  const int nthreads = static_cast<int>(block.x * block.y * block.z);
  if (block.y != 1 || block.z != 1 || nthreads % 32 != 0) {
    fail("launch: only 1-D blocks of whole warps are emulated");
    return;
  }
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        Cta cta(nthreads);
        std::vector<std::thread> threads;
        threads.reserve(nthreads);
        for (int t = 0; t < nthreads; ++t) {
          threads.emplace_back([&, t] {
            tl_cta = &cta;
            tl_tid = t;
            threadIdx = uint3{static_cast<unsigned>(t), 0, 0};
            blockIdx = uint3{bx, by, bz};
            blockDim = block;
            gridDim = grid;
            kernel(args...);
            // Let the others finish if this thread left early; the counts below report the divergence.
            cta.warp_barriers[t / 32]->arrive_and_drop();
            cta.block_barrier.arrive_and_drop();
          });
        }
        for (auto& th : threads) th.join();
        for (int t = 1; t < nthreads; ++t) {
          if (cta.syncs[t] != cta.syncs[0]) fail("divergent __syncthreads: threads passed different counts");
          if (cta.collectives[t] != cta.collectives[(t / 32) * 32]) fail("divergent warp collective in a warp");
        }
      }
}
