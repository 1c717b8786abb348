// rows.cu: dtype-agnostic row gather/scatter for unpad_input / pad_input (see bark_kernels.h).
// Rows are moved in the widest unit (16, 4 or 1 bytes) that divides the row size and the pointers' alignment.
#include "common.cuh"

namespace bark_kernels {
namespace {

constexpr int kThreads = 256;

// out[r] = src[indices[r]]; an out-of-range index gives a zero row (never an out-of-bounds read).
template <typename V>
__global__ void __launch_bounds__(kThreads) gather_rows_kernel(const V* __restrict__ src, V* __restrict__ out,
                                                               const int64_t* __restrict__ indices, int64_t nnz,
                                                               int64_t n_src_rows, int64_t vecs_per_row) {
  const int64_t total = nnz * vecs_per_row;
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < total;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = t / vecs_per_row;
    const int64_t col = t - r * vecs_per_row;
    const int64_t idx = indices[r];
    V val{};
    if (idx >= 0 && idx < n_src_rows) val = src[idx * vecs_per_row + col];
    out[t] = val;
  }
}

// dst[indices[r]] = x[r]; out-of-range indices are skipped (never an out-of-bounds write).
template <typename V>
__global__ void __launch_bounds__(kThreads) scatter_rows_kernel(const V* __restrict__ x, V* __restrict__ dst,
                                                                const int64_t* __restrict__ indices, int64_t nnz,
                                                                int64_t n_dst_rows, int64_t vecs_per_row) {
  const int64_t total = nnz * vecs_per_row;
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < total;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = t / vecs_per_row;
    const int64_t col = t - r * vecs_per_row;
    const int64_t idx = indices[r];
    if (idx >= 0 && idx < n_dst_rows) dst[idx * vecs_per_row + col] = x[t];
  }
}

int grid_for(int64_t total) {
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  return static_cast<int>(blocks < 65536 ? (blocks > 0 ? blocks : 1) : 65536);  // grid-stride beyond that
}

int vector_bytes(const void* a, const void* b, int64_t row_bytes) {
  const uintptr_t pa = reinterpret_cast<uintptr_t>(a), pb = reinterpret_cast<uintptr_t>(b);
  if (row_bytes % 16 == 0 && pa % 16 == 0 && pb % 16 == 0) return 16;
  if (row_bytes % 4 == 0 && pa % 4 == 0 && pb % 4 == 0) return 4;
  return 1;
}

}  // namespace

cudaError_t gather_rows(const void* src, void* out, const int64_t* indices, int64_t nnz, int64_t n_src_rows,
                        int64_t row_bytes, cudaStream_t stream) {
  if (nnz <= 0 || row_bytes <= 0) return cudaSuccess;
  const int vb = vector_bytes(src, out, row_bytes);
  const int64_t vecs = row_bytes / vb;
  const int grid = grid_for(nnz * vecs);
  if (vb == 16) {
    gather_rows_kernel<uint4><<<grid, kThreads, 0, stream>>>(static_cast<const uint4*>(src), static_cast<uint4*>(out),
                                                             indices, nnz, n_src_rows, vecs);
  } else if (vb == 4) {
    gather_rows_kernel<uint32_t><<<grid, kThreads, 0, stream>>>(
        static_cast<const uint32_t*>(src), static_cast<uint32_t*>(out), indices, nnz, n_src_rows, vecs);
  } else {
    gather_rows_kernel<uint8_t><<<grid, kThreads, 0, stream>>>(static_cast<const uint8_t*>(src),
                                                               static_cast<uint8_t*>(out), indices, nnz, n_src_rows,
                                                               vecs);
  }
  return cudaGetLastError();
}

cudaError_t scatter_rows(const void* x, void* dst, const int64_t* indices, int64_t nnz, int64_t n_dst_rows,
                         int64_t row_bytes, cudaStream_t stream) {
  if (nnz <= 0 || row_bytes <= 0) return cudaSuccess;
  const int vb = vector_bytes(x, dst, row_bytes);
  const int64_t vecs = row_bytes / vb;
  const int grid = grid_for(nnz * vecs);
  if (vb == 16) {
    scatter_rows_kernel<uint4><<<grid, kThreads, 0, stream>>>(static_cast<const uint4*>(x), static_cast<uint4*>(dst),
                                                              indices, nnz, n_dst_rows, vecs);
  } else if (vb == 4) {
    scatter_rows_kernel<uint32_t><<<grid, kThreads, 0, stream>>>(
        static_cast<const uint32_t*>(x), static_cast<uint32_t*>(dst), indices, nnz, n_dst_rows, vecs);
  } else {
    scatter_rows_kernel<uint8_t><<<grid, kThreads, 0, stream>>>(static_cast<const uint8_t*>(x),
                                                                static_cast<uint8_t*>(dst), indices, nnz, n_dst_rows,
                                                                vecs);
  }
  return cudaGetLastError();
}

}  // namespace bark_kernels
