// flash_fwd.cu: flash-attention forward on tensor cores (mma.sync m16n8k16, fp32 accumulation, online softmax).
//
// One CTA = 4 warps = one block of kBlockM = 64 query rows of one (batch, head); each warp owns 16 query rows.
// Key/value tiles of kBlockN = 64 rows go through shared memory; Q is staged once through the same shared memory and
// then held in registers as mma A fragments. S = Q K^T stays in registers and is reused as the A operand of P V.
// Batched, varlen (cu_seqlens) and kv-cache (seqused_k) share this kernel; see bark_kernels.h for the semantics.
#include "common.cuh"

namespace bark_kernels {
namespace {

using detail::ceil_div;

constexpr int kBlockM = 64;
constexpr int kBlockN = 64;
constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kPad = 8;  // 16-byte row padding: conflict-free fragment loads and ldmatrix

// Copies `rows_valid` rows (of kRows) of D 16-bit elements from global (row stride in elements) into shared memory
// with row stride D + kPad; rows past rows_valid are zero-filled (so masked tails never multiply garbage or NaN).
template <int kRows, int D>
__device__ __forceinline__ void load_tile(uint16_t* smem, const uint16_t* gmem, int64_t row_stride, int rows_valid,
                                          bool aligned) {
  constexpr int kChunksPerRow = D / 8;
  constexpr int kLds = D + kPad;
#pragma unroll
  for (int c = threadIdx.x; c < kRows * kChunksPerRow; c += kThreads) {
    const int r = c / kChunksPerRow;
    const int col = (c % kChunksPerRow) * 8;
    uint4 val = make_uint4(0u, 0u, 0u, 0u);
    if (r < rows_valid) val = detail::load_8x16(gmem + r * row_stride + col, aligned);
    *reinterpret_cast<uint4*>(smem + r * kLds + col) = val;
  }
}

template <typename T, int D, bool kCausal>
__global__ void __launch_bounds__(kThreads) flash_fwd_kernel(const FlashFwdParams p, const bool q_aligned,
                                                             const bool k_aligned, const bool v_aligned,
                                                             const bool o_aligned) {
  static_assert(D % 16 == 0, "head_dim must be a multiple of 16");
  constexpr int kLds = D + kPad;
  constexpr int kKSteps = D / 16;        // k-steps of S = Q K^T
  constexpr int kNBlocksS = kBlockN / 8;  // 8-column blocks of S
  constexpr int kNBlocksO = D / 8;       // 8-column blocks of O
  __shared__ __align__(16) uint16_t smem[2 * kBlockN * kLds];
  uint16_t* s_k = smem;                    // (kBlockN, kLds); also stages Q before the main loop
  uint16_t* s_v = smem + kBlockN * kLds;  // (kBlockN, kLds)

  const int m_block = blockIdx.x;
  const int head = blockIdx.y;
  const int batch = blockIdx.z;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int g = lane / 4;        // fragment row group
  const int c = 2 * (lane % 4);  // fragment column pair

  // Per-sequence lengths and base offsets (elements).
  int seqlen_q, seqlen_k;
  int64_t q_off, k_off, v_off, o_off;
  if (p.cu_seqlens_q != nullptr) {
    const int q_start = p.cu_seqlens_q[batch];
    const int k_start = p.cu_seqlens_k[batch];
    seqlen_q = p.cu_seqlens_q[batch + 1] - q_start;
    seqlen_k = p.cu_seqlens_k[batch + 1] - k_start;
    q_off = q_start * p.q_row_stride;
    k_off = k_start * p.k_row_stride;
    v_off = k_start * p.v_row_stride;
    o_off = q_start * p.o_row_stride;
  } else {
    seqlen_q = p.seqlen_q;
    seqlen_k = p.seqlen_k;
    if (p.seqused_k != nullptr) seqlen_k = min(max(p.seqused_k[batch] + p.seqused_k_add, 0), p.seqlen_k);
    q_off = batch * p.q_batch_stride;
    k_off = batch * p.k_batch_stride;
    v_off = batch * p.v_batch_stride;
    o_off = batch * p.o_batch_stride;
  }
  const int q0 = m_block * kBlockM;
  if (q0 >= seqlen_q) return;  // whole CTA: varlen sequences shorter than max_seqlen_q

  const uint16_t* q_ptr = static_cast<const uint16_t*>(p.q) + q_off + head * p.q_head_stride;
  const uint16_t* k_ptr = static_cast<const uint16_t*>(p.k) + k_off + head * p.k_head_stride;
  const uint16_t* v_ptr = static_cast<const uint16_t*>(p.v) + v_off + head * p.v_head_stride;
  uint16_t* o_ptr = static_cast<uint16_t*>(p.o) + o_off + head * p.o_head_stride;

  // Q tile -> shared (staged in s_k) -> registers as A fragments.
  load_tile<kBlockM, D>(s_k, q_ptr + q0 * p.q_row_stride, p.q_row_stride, min(kBlockM, seqlen_q - q0), q_aligned);
  __syncthreads();
  uint32_t q_frag[kKSteps][4];
  {
    const uint16_t* base = s_k + (warp * 16) * kLds + c;
#pragma unroll
    for (int kk = 0; kk < kKSteps; ++kk) {
      q_frag[kk][0] = detail::ld_shared_u32(base + g * kLds + kk * 16);
      q_frag[kk][1] = detail::ld_shared_u32(base + (g + 8) * kLds + kk * 16);
      q_frag[kk][2] = detail::ld_shared_u32(base + g * kLds + kk * 16 + 8);
      q_frag[kk][3] = detail::ld_shared_u32(base + (g + 8) * kLds + kk * 16 + 8);
    }
  }

  // Rows owned by this lane (absolute query indices within the sequence).
  const int row0 = q0 + warp * 16 + g;
  const int row1 = row0 + 8;
  // Bottom-right causal: query i sees keys j <= i + diag_offset.
  const int diag_offset = seqlen_k - seqlen_q;

  int kv_end = seqlen_k;
  if (kCausal) kv_end = min(seqlen_k, q0 + kBlockM + diag_offset);  // last row of the block sees keys < this
  const int n_tiles = kv_end > 0 ? ceil_div(kv_end, kBlockN) : 0;

  const float scale_log2 = p.softmax_scale * detail::kLog2e;
  float o_acc[kNBlocksO][4];
#pragma unroll
  for (int j = 0; j < kNBlocksO; ++j) o_acc[j][0] = o_acc[j][1] = o_acc[j][2] = o_acc[j][3] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.f, 0.f};  // partial sums over this lane's columns; reduced across the quad at the end

  for (int tile = 0; tile < n_tiles; ++tile) {
    const int k0 = tile * kBlockN;
    __syncthreads();  // previous tile (or the staged Q) fully consumed
    const int rows_valid = min(kBlockN, seqlen_k - k0);
    load_tile<kBlockN, D>(s_k, k_ptr + k0 * p.k_row_stride, p.k_row_stride, rows_valid, k_aligned);
    load_tile<kBlockN, D>(s_v, v_ptr + k0 * p.v_row_stride, p.v_row_stride, rows_valid, v_aligned);
    __syncthreads();

    // S = Q K^T for this warp's 16 rows and the tile's kBlockN keys.
    float s_acc[kNBlocksS][4];
#pragma unroll
    for (int nb = 0; nb < kNBlocksS; ++nb) {
      s_acc[nb][0] = s_acc[nb][1] = s_acc[nb][2] = s_acc[nb][3] = 0.f;
      const uint16_t* kb = s_k + (nb * 8 + g) * kLds + c;
#pragma unroll
      for (int kk = 0; kk < kKSteps; ++kk) {
        const uint32_t b0 = detail::ld_shared_u32(kb + kk * 16);
        const uint32_t b1 = detail::ld_shared_u32(kb + kk * 16 + 8);
        detail::mma_16816<T>(s_acc[nb], q_frag[kk], b0, b1);
      }
    }

    // Scale to log2 units, mask key tails and the causal upper triangle.
    const bool need_mask = (k0 + kBlockN > seqlen_k) || (kCausal && k0 + kBlockN - 1 > q0 + diag_offset);
#pragma unroll
    for (int nb = 0; nb < kNBlocksS; ++nb) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float s = s_acc[nb][e] * scale_log2;
        if (need_mask) {
          const int col = k0 + nb * 8 + c + (e & 1);
          const int row = (e < 2) ? row0 : row1;
          if (col >= seqlen_k || (kCausal && col > row + diag_offset)) s = -INFINITY;
        }
        s_acc[nb][e] = s;
      }
    }

    // Online softmax: new row maxima over the quad (4 lanes share a row), rescale running sums and O.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = row_max[r];
#pragma unroll
      for (int nb = 0; nb < kNBlocksS; ++nb) mx = fmaxf(mx, fmaxf(s_acc[nb][2 * r], s_acc[nb][2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      // A row that has seen no key yet keeps max -inf; use 0 as reference so exp2(-inf - 0) = 0, never NaN.
      const float m_ref = detail::is_neg_inf(mx) ? 0.f : mx;
      const float alpha = exp2f(row_max[r] - m_ref);
      row_max[r] = mx;
      float sum = 0.f;
#pragma unroll
      for (int nb = 0; nb < kNBlocksS; ++nb) {
        const float p0 = exp2f(s_acc[nb][2 * r] - m_ref);
        const float p1 = exp2f(s_acc[nb][2 * r + 1] - m_ref);
        s_acc[nb][2 * r] = p0;
        s_acc[nb][2 * r + 1] = p1;
        sum += p0 + p1;
      }
      row_sum[r] = row_sum[r] * alpha + sum;
#pragma unroll
      for (int j = 0; j < kNBlocksO; ++j) {
        o_acc[j][2 * r] *= alpha;
        o_acc[j][2 * r + 1] *= alpha;
      }
    }

    // O += P V. P (16 x kBlockN) is re-packed from the S accumulators into A fragments (k = key); V comes as
    // column-major B fragments through ldmatrix.trans, 16 head-dim columns (two n-blocks) per instruction.
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      uint32_t a[4];
      a[0] = detail::Elem<T>::pack2(s_acc[2 * kk][0], s_acc[2 * kk][1]);
      a[1] = detail::Elem<T>::pack2(s_acc[2 * kk][2], s_acc[2 * kk][3]);
      a[2] = detail::Elem<T>::pack2(s_acc[2 * kk + 1][0], s_acc[2 * kk + 1][1]);
      a[3] = detail::Elem<T>::pack2(s_acc[2 * kk + 1][2], s_acc[2 * kk + 1][3]);
      // Lane l addresses row (kk*16 + l%8 + 8*((l/8)%2)) and columns db*16 + 8*(l/16): matrices 0/1 are keys 0-7/8-15
      // of head-dim columns 0-7, matrices 2/3 the same keys for columns 8-15.
      const uint16_t* vb = s_v + (kk * 16 + (lane % 8) + 8 * ((lane / 8) % 2)) * kLds + 8 * (lane / 16);
#pragma unroll
      for (int db = 0; db < D / 16; ++db) {
        uint32_t b[4];
        detail::ldmatrix_x4_trans(b, vb + db * 16);
        detail::mma_16816<T>(o_acc[2 * db], a, b[0], b[1]);
        detail::mma_16816<T>(o_acc[2 * db + 1], a, b[2], b[3]);
      }
    }
  }

  // Epilogue: full row sums, normalise (rows that saw no key: sum 0 -> output 0), store.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float s = row_sum[r];
    s += __shfl_xor_sync(0xffffffffu, s, 1);
    s += __shfl_xor_sync(0xffffffffu, s, 2);
    row_sum[r] = s > 0.f ? 1.f / s : 0.f;
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = r == 0 ? row0 : row1;
    if (row >= seqlen_q) continue;
    uint16_t* orow = o_ptr + row * p.o_row_stride;
#pragma unroll
    for (int j = 0; j < kNBlocksO; ++j) {
      const int col = j * 8 + c;
      const float x0 = o_acc[j][2 * r] * row_sum[r];
      const float x1 = o_acc[j][2 * r + 1] * row_sum[r];
      if (o_aligned) {
        *reinterpret_cast<uint32_t*>(orow + col) = detail::Elem<T>::pack2(x0, x1);
      } else {
        orow[col] = detail::Elem<T>::from_float(x0);
        orow[col + 1] = detail::Elem<T>::from_float(x1);
      }
    }
  }
}

template <typename T, int D>
cudaError_t launch(const FlashFwdParams& p, cudaStream_t stream) {
  const dim3 grid(ceil_div(p.seqlen_q, kBlockM), p.nheads, p.batch);
  const bool q_al = detail::aligned_16B(p.q, p.q_batch_stride, p.q_row_stride, p.q_head_stride);
  const bool k_al = detail::aligned_16B(p.k, p.k_batch_stride, p.k_row_stride, p.k_head_stride);
  const bool v_al = detail::aligned_16B(p.v, p.v_batch_stride, p.v_row_stride, p.v_head_stride);
  // Paired 32-bit stores need 4-byte alignment of every (row, even column) address.
  const bool o_al = (reinterpret_cast<uintptr_t>(p.o) % 4 == 0) && (p.o_batch_stride % 2 == 0) &&
                    (p.o_row_stride % 2 == 0) && (p.o_head_stride % 2 == 0);
  if (p.causal) {
    flash_fwd_kernel<T, D, true><<<grid, kThreads, 0, stream>>>(p, q_al, k_al, v_al, o_al);
  } else {
    flash_fwd_kernel<T, D, false><<<grid, kThreads, 0, stream>>>(p, q_al, k_al, v_al, o_al);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch_head_dim(const FlashFwdParams& p, cudaStream_t stream) {
  switch (p.head_dim) {
    case 16: return launch<T, 16>(p, stream);
    case 32: return launch<T, 32>(p, stream);
    case 64: return launch<T, 64>(p, stream);
    case 96: return launch<T, 96>(p, stream);
    case 128: return launch<T, 128>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

bool flash_attention_forward_supported(int head_dim) {
  return head_dim == 16 || head_dim == 32 || head_dim == 64 || head_dim == 96 || head_dim == 128;
}

cudaError_t flash_attention_forward(const FlashFwdParams& p, DType dtype, cudaStream_t stream) {
  if (!flash_attention_forward_supported(p.head_dim)) return cudaErrorInvalidValue;
  if (p.batch <= 0 || p.nheads <= 0 || p.seqlen_q <= 0) return cudaSuccess;  // nothing to compute
  if (p.batch > 65535 || p.nheads > 65535) return cudaErrorInvalidConfiguration;
  if ((p.cu_seqlens_q == nullptr) != (p.cu_seqlens_k == nullptr)) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat16: return dispatch_head_dim<__half>(p, stream);
    case DType::kBFloat16: return dispatch_head_dim<__nv_bfloat16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace bark_kernels
