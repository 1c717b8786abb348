// bark_kernels.h: plain C++ launchers of the CUDA attention kernels in csrc/*.cu.
//
// This header and the kernel files include only CUDA headers (no torch), so every kernel compile-checks with nvcc on a
// machine without a CUDA build of torch. csrc/bindings.cpp is the one file that talks to PyTorch.
//
// Conventions: layout (batch, seqlen, nheads, headdim); every stride is in ELEMENTS and the last (head_dim) stride is 1;
// launchers never synchronise the host and return the first CUDA error they meet (cudaSuccess otherwise).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace bark_kernels {

enum class DType : int { kFloat16 = 0, kBFloat16 = 1 };

// ------------------------------------------------------------------------------------------------------------------
// Flash-attention forward (tensor cores, fp32 accumulation, online softmax).
//   batched: q (B, Sq, H, D), k/v (B, Sk, H, D), o (B, Sq, H, D)
//   varlen : cu_seqlens_q/k (B+1,) int32 on the device; q (total_q, H, D), k/v (total_k, H, D); batch strides unused;
//            seqlen_q/seqlen_k are the host-side maxima (they size the grid only).
//   kv-cache: seqused_k (B,) int32 on the device, batched layout; row b uses the first
//            min(seqused_k[b] + seqused_k_add, seqlen_k) keys (seqlen_k = cache capacity).
// Causal masks are bottom-right aligned per sequence: query i sees key j iff j <= i + Sk_b - Sq_b. Rows that see no
// key are written as 0.
struct FlashFwdParams {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* o = nullptr;
  int64_t q_batch_stride = 0, q_row_stride = 0, q_head_stride = 0;
  int64_t k_batch_stride = 0, k_row_stride = 0, k_head_stride = 0;
  int64_t v_batch_stride = 0, v_row_stride = 0, v_head_stride = 0;
  int64_t o_batch_stride = 0, o_row_stride = 0, o_head_stride = 0;
  int batch = 0;
  int nheads = 0;
  int head_dim = 0;
  int seqlen_q = 0;  // batched: Sq; varlen: max_seqlen_q
  int seqlen_k = 0;  // batched: Sk; varlen: max_seqlen_k; kv-cache: cache capacity S_max
  const int* cu_seqlens_q = nullptr;
  const int* cu_seqlens_k = nullptr;
  const int* seqused_k = nullptr;
  int seqused_k_add = 0;
  float softmax_scale = 1.0f;
  bool causal = false;
};

// True when flash_attention_forward has a kernel for this head_dim (the tensor-core path needs D % 16 == 0).
bool flash_attention_forward_supported(int head_dim);
cudaError_t flash_attention_forward(const FlashFwdParams& params, DType dtype, cudaStream_t stream);

// ------------------------------------------------------------------------------------------------------------------
// Decode over a static KV cache.
//   q (B, Sq, H, D); k_cache/v_cache (B, S_max, H, D); k_new/v_new (B, Sq, H, D) or nullptr; cache_seqlens (B,) int32
//   on the device (never modified); o (B, Sq, H, D).
//   If k_new is given, rows cache_seqlens[b] .. cache_seqlens[b] + Sq - 1 of batch row b are overwritten IN PLACE (rows
//   at or past S_max are skipped, never written). Then q attends to the first L_b = cache_seqlens[b] + (Sq if k_new
//   else 0) keys (clamped to [0, S_max]), causal bottom-right: query i sees key j iff j <= i + L_b - Sq.
//   Split-K: num_splits > 1 needs workspace partial_o (num_splits * B * Sq * H * D floats) and partial_lse
//   (num_splits * B * Sq * H floats); kvcache_num_splits() picks num_splits from host-side sizes only.
struct KVCacheParams {
  const void* q = nullptr;
  void* k_cache = nullptr;
  void* v_cache = nullptr;
  const void* k_new = nullptr;
  const void* v_new = nullptr;
  void* o = nullptr;
  const int* cache_seqlens = nullptr;
  int64_t q_batch_stride = 0, q_row_stride = 0, q_head_stride = 0;
  int64_t kc_batch_stride = 0, kc_row_stride = 0, kc_head_stride = 0;
  int64_t vc_batch_stride = 0, vc_row_stride = 0, vc_head_stride = 0;
  int64_t kn_batch_stride = 0, kn_row_stride = 0, kn_head_stride = 0;
  int64_t vn_batch_stride = 0, vn_row_stride = 0, vn_head_stride = 0;
  int64_t o_batch_stride = 0, o_row_stride = 0, o_head_stride = 0;
  int batch = 0;
  int seqlen_q = 0;
  int nheads = 0;
  int head_dim = 0;
  int max_seqlen_cache = 0;  // S_max
  float softmax_scale = 1.0f;
  bool causal = true;
  int num_splits = 1;
  float* partial_o = nullptr;
  float* partial_lse = nullptr;
};

// Largest Sq served by the split-K decode kernel; longer query blocks go through append + flash_attention_forward.
constexpr int kDecodeMaxSeqlenQ = 16;

bool kvcache_attention_supported(int head_dim);
int kvcache_num_splits(int batch, int seqlen_q, int nheads, int max_seqlen_cache, int num_sms);
// Writes k_new/v_new into the caches (no-op when k_new is nullptr).
cudaError_t kvcache_append(const KVCacheParams& params, DType dtype, cudaStream_t stream);
// Append (when k_new is given) then attention; one stream, no host synchronisation (CUDA-graph capturable).
cudaError_t attention_with_kvcache(const KVCacheParams& params, DType dtype, cudaStream_t stream);

// ------------------------------------------------------------------------------------------------------------------
// Row gather/scatter (unpad/pad), dtype agnostic: rows are row_bytes bytes, x and out are contiguous.
//   gather_rows : out[r] = src[indices[r]] for r < nnz; an index outside [0, n_src_rows) gives a zero row.
//   scatter_rows: dst[indices[r]] = x[r] for r < nnz; dst must be zeroed by the caller; indices outside
//                 [0, n_dst_rows) are skipped.
cudaError_t gather_rows(const void* src, void* out, const int64_t* indices, int64_t nnz, int64_t n_src_rows,
                        int64_t row_bytes, cudaStream_t stream);
cudaError_t scatter_rows(const void* x, void* dst, const int64_t* indices, int64_t nnz, int64_t n_dst_rows,
                         int64_t row_bytes, cudaStream_t stream);

}  // namespace bark_kernels
