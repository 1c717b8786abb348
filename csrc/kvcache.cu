// kvcache.cu: attention over a static KV cache for decoding (Sq small), with the in-place append of new k/v.
//
// Step 1 (kvcache_append_kernel): k_new/v_new rows go to rows cache_seqlens[b] + i of the caches.
// Step 2 (kvcache_split_kernel): grid (num_splits, H, B * query_chunks). Each CTA takes kQueries query rows of one
//   (batch, head) and one contiguous slice of the row's L_b keys (the slices are computed on the device from
//   cache_seqlens, so no host sync is needed and empty rows cost nothing). Groups of 8 lanes own one key at a time,
//   each lane D/8 head-dim elements: dot products reduce over 3 shuffles; each group runs its own online softmax; the
//   16 groups of the CTA merge through shuffles and shared memory.
// Step 3 (kvcache_combine_kernel, only when num_splits > 1): merges the per-split partial outputs by their
//   log-sum-exp. Sq > kDecodeMaxSeqlenQ (chunked prefill) goes through flash_attention_forward with seqused_k.
#include "common.cuh"

namespace bark_kernels {
namespace {

using detail::ceil_div;

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kLanesPerKey = 8;
constexpr int kGroupsPerWarp = 32 / kLanesPerKey;  // 4
constexpr int kGroups = kWarps * kGroupsPerWarp;   // 16 keys in flight per CTA and unrolled step
// Keys each group loads before computing (memory parallelism): more for small head dims, whose slices are short.
template <int D>
__host__ __device__ constexpr int keys_per_group_step() {
  return D <= 32 ? 4 : 2;
}

// ---------------------------------------------------------------------------------------------------------------------
// Append: grid (Sq, B), each CTA copies one (b, i) row of k_new/v_new (H * D elements each) into the caches.
__global__ void __launch_bounds__(kThreads) kvcache_append_kernel(const KVCacheParams p) {
  const int i = blockIdx.x;
  const int b = blockIdx.y;
  const int pos = p.cache_seqlens[b] + i;
  if (pos < 0 || pos >= p.max_seqlen_cache) return;  // never write outside the cache
  const uint16_t* kn = static_cast<const uint16_t*>(p.k_new) + b * p.kn_batch_stride + i * p.kn_row_stride;
  const uint16_t* vn = static_cast<const uint16_t*>(p.v_new) + b * p.vn_batch_stride + i * p.vn_row_stride;
  uint16_t* kc = static_cast<uint16_t*>(p.k_cache) + b * p.kc_batch_stride + pos * p.kc_row_stride;
  uint16_t* vc = static_cast<uint16_t*>(p.v_cache) + b * p.vc_batch_stride + pos * p.vc_row_stride;
  const int n = p.nheads * p.head_dim;
  for (int idx = threadIdx.x; idx < n; idx += kThreads) {
    const int h = idx / p.head_dim;
    const int d = idx - h * p.head_dim;
    kc[h * p.kc_head_stride + d] = kn[h * p.kn_head_stride + d];
    vc[h * p.vc_head_stride + d] = vn[h * p.vn_head_stride + d];
  }
}

// Loads the E = D / 8 elements of this lane's head-dim slice as floats (zeros when !valid).
template <typename T, int E>
__device__ __forceinline__ void load_slice(float (&dst)[E], const uint16_t* src, bool valid, bool aligned) {
  if (!valid) {
#pragma unroll
    for (int e = 0; e < E; ++e) dst[e] = 0.f;
    return;
  }
  if (E % 8 == 0 && aligned) {
#pragma unroll
    for (int v = 0; v < E / 8; ++v) {
      union {
        uint4 u;
        uint16_t h[8];
      } w;
      w.u = __ldg(reinterpret_cast<const uint4*>(src) + v);
#pragma unroll
      for (int e = 0; e < 8; ++e) dst[v * 8 + e] = detail::Elem<T>::to_float(w.h[e]);
    }
  } else {
#pragma unroll
    for (int e = 0; e < E; ++e) dst[e] = detail::Elem<T>::to_float(src[e]);
  }
}

// Number of keys of batch row b that the block's queries may use, and the number of keys (<= that) the last of
// query rows [q_first, q_last] sees.
__device__ __forceinline__ int cache_len(const KVCacheParams& p, int b) {
  const int len = p.cache_seqlens[b] + (p.k_new != nullptr ? p.seqlen_q : 0);
  return min(max(len, 0), p.max_seqlen_cache);
}

template <typename T, int D, int kQueries>
__global__ void __launch_bounds__(kThreads) kvcache_split_kernel(const KVCacheParams p, const bool k_aligned,
                                                                 const bool v_aligned) {
  static_assert(D % kLanesPerKey == 0, "head_dim must be a multiple of 8");
  constexpr int E = D / kLanesPerKey;
  constexpr int kKeysPerGroupStep = keys_per_group_step<D>();
  constexpr int kKeysPerStep = kGroups * kKeysPerGroupStep;
  __shared__ float s_max[kWarps][kQueries];
  __shared__ float s_sum[kWarps][kQueries];
  __shared__ float s_acc[kWarps][kQueries][D];

  const int split = blockIdx.x;
  const int head = blockIdx.y;
  const int n_qchunks = ceil_div(p.seqlen_q, kQueries);
  const int b = blockIdx.z / n_qchunks;
  const int q_first = (blockIdx.z % n_qchunks) * kQueries;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int group = lane / kLanesPerKey;        // key group within the warp
  const int lig = lane % kLanesPerKey;          // lane in group: owns elements [lig * E, lig * E + E)
  const int gid = warp * kGroupsPerWarp + group;  // key group within the CTA

  const int len = cache_len(p, b);
  const int diag_offset = len - p.seqlen_q;  // query i sees keys j <= i + diag_offset
  const int q_last = min(q_first + kQueries, p.seqlen_q) - 1;
  const int kv_end = p.causal ? max(min(len, q_last + diag_offset + 1), 0) : len;
  // This split's key range: kv_end keys cut into num_splits slices, multiples of kKeysPerStep long.
  const int per_split = ceil_div(ceil_div(kv_end, p.num_splits), kKeysPerStep) * kKeysPerStep;
  const int k_begin = split * per_split;
  const int k_end = min(kv_end, k_begin + per_split);

  // Queries of this chunk, pre-scaled into log2 units; rows past Sq are zero (computed, never stored).
  const float scale_log2 = p.softmax_scale * detail::kLog2e;
  float q[kQueries][E];
#pragma unroll
  for (int qi = 0; qi < kQueries; ++qi) {
    const int row = q_first + qi;
    const uint16_t* src = static_cast<const uint16_t*>(p.q) + b * p.q_batch_stride + row * p.q_row_stride +
                          head * p.q_head_stride + lig * E;
    load_slice<T, E>(q[qi], src, row < p.seqlen_q, false);
#pragma unroll
    for (int e = 0; e < E; ++e) q[qi][e] *= scale_log2;
  }

  float m[kQueries], l[kQueries], acc[kQueries][E];
#pragma unroll
  for (int qi = 0; qi < kQueries; ++qi) {
    m[qi] = -INFINITY;
    l[qi] = 0.f;
#pragma unroll
    for (int e = 0; e < E; ++e) acc[qi][e] = 0.f;
  }

  const uint16_t* kc = static_cast<const uint16_t*>(p.k_cache) + b * p.kc_batch_stride + head * p.kc_head_stride +
                       lig * E;
  const uint16_t* vc = static_cast<const uint16_t*>(p.v_cache) + b * p.vc_batch_stride + head * p.vc_head_stride +
                       lig * E;
  for (int base = k_begin; base < k_end; base += kKeysPerStep) {
    float kf[kKeysPerGroupStep][E], vf[kKeysPerGroupStep][E];
    int key[kKeysPerGroupStep];
#pragma unroll
    for (int u = 0; u < kKeysPerGroupStep; ++u) {
      key[u] = base + u * kGroups + gid;
      const bool valid = key[u] < k_end;
      load_slice<T, E>(kf[u], kc + key[u] * p.kc_row_stride, valid, k_aligned);
      load_slice<T, E>(vf[u], vc + key[u] * p.vc_row_stride, valid, v_aligned);
    }
#pragma unroll
    for (int qi = 0; qi < kQueries; ++qi) {
      float s[kKeysPerGroupStep];
      float mx = m[qi];
#pragma unroll
      for (int u = 0; u < kKeysPerGroupStep; ++u) {
        float dot = 0.f;
#pragma unroll
        for (int e = 0; e < E; ++e) dot = fmaf(q[qi][e], kf[u][e], dot);
        dot += __shfl_xor_sync(0xffffffffu, dot, 1);
        dot += __shfl_xor_sync(0xffffffffu, dot, 2);
        dot += __shfl_xor_sync(0xffffffffu, dot, 4);
        const bool visible = key[u] < k_end && (!p.causal || key[u] <= q_first + qi + diag_offset);
        s[u] = visible ? dot : -INFINITY;
        mx = fmaxf(mx, s[u]);
      }
      const float m_ref = detail::is_neg_inf(mx) ? 0.f : mx;
      const float alpha = exp2f(m[qi] - m_ref);
      m[qi] = mx;
      float psum = 0.f;
#pragma unroll
      for (int e = 0; e < E; ++e) acc[qi][e] *= alpha;
#pragma unroll
      for (int u = 0; u < kKeysPerGroupStep; ++u) {
        const float pu = exp2f(s[u] - m_ref);
        psum += pu;
#pragma unroll
        for (int e = 0; e < E; ++e) acc[qi][e] = fmaf(pu, vf[u][e], acc[qi][e]);
      }
      l[qi] = l[qi] * alpha + psum;
    }
  }

  // Merge the 4 groups of each warp (lanes lig, lig + 8, lig + 16, lig + 24 hold the same head-dim slice).
#pragma unroll
  for (int qi = 0; qi < kQueries; ++qi) {
    float mx = m[qi];
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 8));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 16));
    const float w = exp2f(m[qi] - (detail::is_neg_inf(mx) ? 0.f : mx));
    float sum = l[qi] * w;
    sum += __shfl_xor_sync(0xffffffffu, sum, 8);
    sum += __shfl_xor_sync(0xffffffffu, sum, 16);
#pragma unroll
    for (int e = 0; e < E; ++e) {
      float a = acc[qi][e] * w;
      a += __shfl_xor_sync(0xffffffffu, a, 8);
      a += __shfl_xor_sync(0xffffffffu, a, 16);
      acc[qi][e] = a;
    }
    if (group == 0) {
#pragma unroll
      for (int e = 0; e < E; ++e) s_acc[warp][qi][lig * E + e] = acc[qi][e];
      if (lig == 0) {
        s_max[warp][qi] = mx;
        s_sum[warp][qi] = sum;
      }
    }
  }
  __syncthreads();

  // Merge the warps; each thread finishes some (query, d) outputs.
  const int rows_in_chunk = q_last - q_first + 1;
  for (int idx = threadIdx.x; idx < rows_in_chunk * D; idx += kThreads) {
    const int qi = idx / D;
    const int d = idx - qi * D;
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, s_max[w][qi]);
    const float m_ref = detail::is_neg_inf(mx) ? 0.f : mx;
    float sum = 0.f, a = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float wt = exp2f(s_max[w][qi] - m_ref);
      sum += s_sum[w][qi] * wt;
      a += s_acc[w][qi][d] * wt;
    }
    const float out = sum > 0.f ? a / sum : 0.f;
    const int row = q_first + qi;
    if (p.num_splits == 1) {
      uint16_t* o = static_cast<uint16_t*>(p.o) + b * p.o_batch_stride + row * p.o_row_stride + head * p.o_head_stride;
      o[d] = detail::Elem<T>::from_float(out);
    } else {
      // Partial rows are indexed ((split * B + b) * Sq + row) * H + head.
      const int64_t prow = ((static_cast<int64_t>(split) * p.batch + b) * p.seqlen_q + row) * p.nheads + head;
      p.partial_o[prow * D + d] = out;
      if (d == 0) p.partial_lse[prow] = sum > 0.f ? mx + log2f(sum) : -INFINITY;
    }
  }
}

// grid (B * Sq * H), block kThreads: out = sum_s o_s * 2^(lse_s - lse_max) / sum_s 2^(lse_s - lse_max).
template <typename T>
__global__ void __launch_bounds__(kThreads) kvcache_combine_kernel(const KVCacheParams p) {
  const int64_t rows = static_cast<int64_t>(p.batch) * p.seqlen_q * p.nheads;
  const int64_t r = blockIdx.x;  // ((b * Sq + i) * H + h)
  const int h = static_cast<int>(r % p.nheads);
  const int i = static_cast<int>((r / p.nheads) % p.seqlen_q);
  const int b = static_cast<int>(r / (static_cast<int64_t>(p.nheads) * p.seqlen_q));
  float lse_max = -INFINITY;
  for (int s = 0; s < p.num_splits; ++s) lse_max = fmaxf(lse_max, p.partial_lse[s * rows + r]);
  uint16_t* o = static_cast<uint16_t*>(p.o) + b * p.o_batch_stride + i * p.o_row_stride + h * p.o_head_stride;
  for (int d = threadIdx.x; d < p.head_dim; d += kThreads) {
    float out = 0.f;
    if (!detail::is_neg_inf(lse_max)) {
      float wsum = 0.f, a = 0.f;
      for (int s = 0; s < p.num_splits; ++s) {
        const float w = exp2f(p.partial_lse[s * rows + r] - lse_max);
        wsum += w;
        a += w * p.partial_o[(s * rows + r) * p.head_dim + d];
      }
      out = a / wsum;
    }
    o[d] = detail::Elem<T>::from_float(out);
  }
}

template <typename T, int D>
cudaError_t launch_attention(const KVCacheParams& p, cudaStream_t stream) {
  const bool k_al = detail::aligned_16B(p.k_cache, p.kc_batch_stride, p.kc_row_stride, p.kc_head_stride);
  const bool v_al = detail::aligned_16B(p.v_cache, p.vc_batch_stride, p.vc_row_stride, p.vc_head_stride);
  if (p.seqlen_q == 1) {
    const dim3 grid(p.num_splits, p.nheads, p.batch);
    kvcache_split_kernel<T, D, 1><<<grid, kThreads, 0, stream>>>(p, k_al, v_al);
  } else {
    constexpr int kQ = 4;
    const dim3 grid(p.num_splits, p.nheads, p.batch * ceil_div(p.seqlen_q, kQ));
    kvcache_split_kernel<T, D, kQ><<<grid, kThreads, 0, stream>>>(p, k_al, v_al);
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || p.num_splits == 1) return err;
  const unsigned rows = static_cast<unsigned>(p.batch * p.seqlen_q * p.nheads);
  kvcache_combine_kernel<T><<<rows, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch_head_dim(const KVCacheParams& p, cudaStream_t stream) {
  switch (p.head_dim) {
    case 16: return launch_attention<T, 16>(p, stream);
    case 32: return launch_attention<T, 32>(p, stream);
    case 64: return launch_attention<T, 64>(p, stream);
    case 96: return launch_attention<T, 96>(p, stream);
    case 128: return launch_attention<T, 128>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

bool kvcache_attention_supported(int head_dim) {
  // Sq <= kDecodeMaxSeqlenQ uses the split kernel, longer query blocks flash_attention_forward: both must serve it.
  return flash_attention_forward_supported(head_dim);
}

int kvcache_num_splits(int batch, int seqlen_q, int nheads, int max_seqlen_cache, int num_sms) {
  if (seqlen_q > kDecodeMaxSeqlenQ) return 1;
  const int qchunks = seqlen_q == 1 ? 1 : ceil_div(seqlen_q, 4);
  const int ctas = batch * nheads * qchunks;
  const int target = 2 * (num_sms > 0 ? num_sms : 1);  // about two waves of CTAs
  int splits = ceil_div(target, ctas > 0 ? ctas : 1);
  splits = min(splits, ceil_div(max_seqlen_cache, 128));  // at least ~128 keys per split on a full cache
  splits = min(splits, 64);
  return max(splits, 1);
}

cudaError_t kvcache_append(const KVCacheParams& p, DType dtype, cudaStream_t stream) {
  (void)dtype;  // a 16-bit copy: the same kernel serves fp16 and bf16
  if (p.k_new == nullptr || p.batch <= 0 || p.seqlen_q <= 0) return cudaSuccess;
  if (p.v_new == nullptr || p.batch > 65535) return cudaErrorInvalidValue;
  kvcache_append_kernel<<<dim3(p.seqlen_q, p.batch), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t attention_with_kvcache(const KVCacheParams& p, DType dtype, cudaStream_t stream) {
  if (p.batch <= 0 || p.nheads <= 0 || p.seqlen_q <= 0) return cudaSuccess;
  if (!kvcache_attention_supported(p.head_dim)) return cudaErrorInvalidValue;
  cudaError_t err = kvcache_append(p, dtype, stream);
  if (err != cudaSuccess) return err;

  if (p.seqlen_q > kDecodeMaxSeqlenQ) {
    // Chunked prefill: tensor-core kernel over the (just appended) cache with per-row key counts.
    FlashFwdParams f;
    f.q = p.q;
    f.k = p.k_cache;
    f.v = p.v_cache;
    f.o = p.o;
    f.q_batch_stride = p.q_batch_stride, f.q_row_stride = p.q_row_stride, f.q_head_stride = p.q_head_stride;
    f.k_batch_stride = p.kc_batch_stride, f.k_row_stride = p.kc_row_stride, f.k_head_stride = p.kc_head_stride;
    f.v_batch_stride = p.vc_batch_stride, f.v_row_stride = p.vc_row_stride, f.v_head_stride = p.vc_head_stride;
    f.o_batch_stride = p.o_batch_stride, f.o_row_stride = p.o_row_stride, f.o_head_stride = p.o_head_stride;
    f.batch = p.batch;
    f.nheads = p.nheads;
    f.head_dim = p.head_dim;
    f.seqlen_q = p.seqlen_q;
    f.seqlen_k = p.max_seqlen_cache;
    f.seqused_k = p.cache_seqlens;
    f.seqused_k_add = p.k_new != nullptr ? p.seqlen_q : 0;
    f.softmax_scale = p.softmax_scale;
    f.causal = p.causal;
    return flash_attention_forward(f, dtype, stream);
  }

  if (p.num_splits < 1 || (p.num_splits > 1 && (p.partial_o == nullptr || p.partial_lse == nullptr))) {
    return cudaErrorInvalidValue;
  }
  if (p.batch * ceil_div(p.seqlen_q, 4) > 65535 || p.nheads > 65535) return cudaErrorInvalidConfiguration;
  switch (dtype) {
    case DType::kFloat16: return dispatch_head_dim<__half>(p, stream);
    case DType::kBFloat16: return dispatch_head_dim<__nv_bfloat16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace bark_kernels
