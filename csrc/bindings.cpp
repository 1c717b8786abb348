// bindings.cpp: the PyTorch side of bark_kernels._C. Input validation (clear errors naming the argument, what was
// expected and what came), device guard, current stream, output allocation, and registration of the ops in the
// torch.library namespace "bark_kernels_cuda" (fake/meta implementations live in bark_kernels/backends/cuda.py).
// The kernels themselves are in csrc/*.cu behind the plain launchers of bark_kernels.h.
#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <limits>
#include <optional>
#include <string>

#include "bark_kernels.h"

namespace {

using bark_kernels::DType;

// "(d0, d1, ...)": a tensor's sizes or strides for an error message, built here. The messages used to stream the
// IntArrayRef itself (c10's operator<< for ArrayRef); the H200 run (torch 2.11.0+cu130, _C built with /opt/gcc's
// g++) died with a segfault inside the first call whose message streams one (the 3-D k case of
// test_binding_rejects_bad_inputs_with_clear_errors: the checks before it passed, and its rank check reads nothing out
// of range). Plain std::string arithmetic removes that path from the suspects; unconfirmed until a GPU session reruns
// the test (scripts/first_light.py reruns a crashed test under cuda-gdb).
std::string dims_str(c10::IntArrayRef dims) {
  std::string out = "(";
  for (size_t i = 0; i < dims.size(); ++i) {
    if (i > 0) out += ", ";
    out += std::to_string(dims[i]);
  }
  return out + (dims.size() == 1 ? ",)" : ")");
}

DType kernel_dtype(const at::Tensor& t, const char* name) {
  if (t.scalar_type() == at::kHalf) return DType::kFloat16;
  if (t.scalar_type() == at::kBFloat16) return DType::kBFloat16;
  TORCH_CHECK_TYPE(false, "bark_kernels_cuda: ", name, ": expected dtype torch.float16 or torch.bfloat16, got ",
                   t.scalar_type());
  return DType::kFloat16;  // unreachable
}

// A floating-point attention operand: CUDA, `dim`-D, last stride 1, same dtype and device as `ref`.
void check_operand(const at::Tensor& t, const char* name, int64_t dim, const char* layout, const at::Tensor& ref,
                   const char* ref_name) {
  TORCH_CHECK_VALUE(t.is_cuda(), "bark_kernels_cuda: ", name, ": expected a CUDA tensor, got device ", t.device());
  TORCH_CHECK_VALUE(t.dim() == dim, "bark_kernels_cuda: ", name, ": expected a ", dim, "-D tensor ", layout,
                    ", got shape ", dims_str(t.sizes()));
  TORCH_CHECK_VALUE(t.size(-1) == 1 || t.stride(-1) == 1, "bark_kernels_cuda: ", name,
                    ": expected last (head_dim) stride 1, got strides ", dims_str(t.strides()));
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), "bark_kernels_cuda: ", name, ": expected dtype ",
                   ref.scalar_type(), " (the dtype of ", ref_name, "), got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == ref.device(), "bark_kernels_cuda: ", name, ": expected device ", ref.device(),
                    " (the device of ", ref_name, "), got ", t.device());
}

void check_int32_vector(const at::Tensor& t, const char* name, int64_t length, const at::Tensor& q) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt, "bark_kernels_cuda: ", name, ": expected dtype torch.int32, got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == length, "bark_kernels_cuda: ", name, ": expected shape (", length,
                    ",), got ", dims_str(t.sizes()));
  TORCH_CHECK_VALUE(t.device() == q.device(), "bark_kernels_cuda: ", name, ": expected device ", q.device(),
                    " (the device of q), got ", t.device());
  TORCH_CHECK_VALUE(t.is_contiguous(), "bark_kernels_cuda: ", name, ": expected a contiguous tensor");
}

void check_head_dim(int64_t head_dim) {
  TORCH_CHECK_VALUE(bark_kernels::flash_attention_forward_supported(static_cast<int>(head_dim)),
                    "bark_kernels_cuda: q: expected head_dim in {16, 32, 64, 96, 128}, got ", head_dim);
}

void check_fits_int(int64_t value, const char* what) {
  TORCH_CHECK_VALUE(value >= 0 && value <= std::numeric_limits<int>::max(), "bark_kernels_cuda: ", what,
                    ": expected a value in [0, 2^31), got ", value);
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "bark_kernels_cuda::", op, ": kernel launch failed: ", cudaGetErrorString(err));
}

void set_strides(const at::Tensor& t, int64_t& batch, int64_t& row, int64_t& head) {
  // 4-D (B, S, H, D) tensors; 3-D packed (total, H, D) tensors have no batch stride.
  if (t.dim() == 4) {
    batch = t.stride(0), row = t.stride(1), head = t.stride(2);
  } else {
    batch = 0, row = t.stride(0), head = t.stride(1);
  }
}

at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal,
                     double softmax_scale) {
  check_operand(q, "q", 4, "(batch, seqlen_q, nheads, head_dim)", q, "q");
  check_operand(k, "k", 4, "(batch, seqlen_k, nheads, head_dim)", q, "q");
  check_operand(v, "v", 4, "(batch, seqlen_k, nheads, head_dim)", q, "q");
  const DType dtype = kernel_dtype(q, "q");
  const int64_t batch = q.size(0), seqlen_q = q.size(1), nheads = q.size(2), head_dim = q.size(3);
  const int64_t seqlen_k = k.size(1);
  TORCH_CHECK_VALUE(k.size(0) == batch && k.size(2) == nheads && k.size(3) == head_dim, "bark_kernels_cuda: k: ",
                    "expected shape (", batch, ", seqlen_k, ", nheads, ", ", head_dim, "), got ",
                    dims_str(k.sizes()));
  TORCH_CHECK_VALUE(v.sizes() == k.sizes(), "bark_kernels_cuda: v: expected shape ", dims_str(k.sizes()),
                    " (the shape of k), got ", dims_str(v.sizes()));
  check_head_dim(head_dim);
  check_fits_int(seqlen_q, "q.shape[1] (seqlen_q)");
  check_fits_int(seqlen_k, "k.shape[1] (seqlen_k)");
  TORCH_CHECK_VALUE(batch <= 65535 && nheads <= 65535, "bark_kernels_cuda: q: expected batch and nheads <= 65535, ",
                    "got ", batch, " and ", nheads);

  const c10::cuda::OptionalCUDAGuard device_guard(q.device());
  at::Tensor out = at::empty(q.sizes(), q.options());  // (B, Sq, H, D), contiguous
  if (out.numel() == 0) return out;
  if (seqlen_k == 0) return out.zero_();  // no key anywhere: every row is 0

  bark_kernels::FlashFwdParams p;
  p.q = q.data_ptr(), p.k = k.data_ptr(), p.v = v.data_ptr(), p.o = out.data_ptr();
  set_strides(q, p.q_batch_stride, p.q_row_stride, p.q_head_stride);
  set_strides(k, p.k_batch_stride, p.k_row_stride, p.k_head_stride);
  set_strides(v, p.v_batch_stride, p.v_row_stride, p.v_head_stride);
  set_strides(out, p.o_batch_stride, p.o_row_stride, p.o_head_stride);
  p.batch = static_cast<int>(batch), p.nheads = static_cast<int>(nheads), p.head_dim = static_cast<int>(head_dim);
  p.seqlen_q = static_cast<int>(seqlen_q), p.seqlen_k = static_cast<int>(seqlen_k);
  p.softmax_scale = static_cast<float>(softmax_scale);
  p.causal = causal;
  check_launch(bark_kernels::flash_attention_forward(p, dtype, c10::cuda::getCurrentCUDAStream()), "attention");
  return out;
}

at::Tensor attention_varlen(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                            int64_t max_seqlen_k, bool causal, double softmax_scale) {
  check_operand(q, "q", 3, "(total_q, nheads, head_dim)", q, "q");
  check_operand(k, "k", 3, "(total_k, nheads, head_dim)", q, "q");
  check_operand(v, "v", 3, "(total_k, nheads, head_dim)", q, "q");
  const DType dtype = kernel_dtype(q, "q");
  const int64_t nheads = q.size(1), head_dim = q.size(2);
  TORCH_CHECK_VALUE(k.size(1) == nheads && k.size(2) == head_dim, "bark_kernels_cuda: k: expected shape (total_k, ",
                    nheads, ", ", head_dim, "), got ", dims_str(k.sizes()));
  TORCH_CHECK_VALUE(v.sizes() == k.sizes(), "bark_kernels_cuda: v: expected shape ", dims_str(k.sizes()),
                    " (the shape of k), got ", dims_str(v.sizes()));
  TORCH_CHECK_VALUE(cu_seqlens_q.dim() == 1 && cu_seqlens_q.size(0) >= 2, "bark_kernels_cuda: cu_seqlens_q: ",
                    "expected shape (batch + 1,) with batch >= 1, got ", dims_str(cu_seqlens_q.sizes()));
  const int64_t batch = cu_seqlens_q.size(0) - 1;
  check_int32_vector(cu_seqlens_q, "cu_seqlens_q", batch + 1, q);
  check_int32_vector(cu_seqlens_k, "cu_seqlens_k", batch + 1, q);
  check_head_dim(head_dim);
  check_fits_int(max_seqlen_q, "max_seqlen_q");
  check_fits_int(max_seqlen_k, "max_seqlen_k");
  check_fits_int(q.size(0), "q.shape[0] (total_q)");
  check_fits_int(k.size(0), "k.shape[0] (total_k)");
  TORCH_CHECK_VALUE(batch <= 65535 && nheads <= 65535, "bark_kernels_cuda: expected batch and nheads <= 65535, got ",
                    batch, " and ", nheads);

  const c10::cuda::OptionalCUDAGuard device_guard(q.device());
  // Zeros: rows of sequences without keys stay 0 and so would packed rows beyond cu_seqlens_q[-1].
  at::Tensor out = at::zeros(q.sizes(), q.options());  // (total_q, H, D)
  if (out.numel() == 0 || max_seqlen_q == 0 || max_seqlen_k == 0) return out;

  bark_kernels::FlashFwdParams p;
  p.q = q.data_ptr(), p.k = k.data_ptr(), p.v = v.data_ptr(), p.o = out.data_ptr();
  set_strides(q, p.q_batch_stride, p.q_row_stride, p.q_head_stride);
  set_strides(k, p.k_batch_stride, p.k_row_stride, p.k_head_stride);
  set_strides(v, p.v_batch_stride, p.v_row_stride, p.v_head_stride);
  set_strides(out, p.o_batch_stride, p.o_row_stride, p.o_head_stride);
  p.batch = static_cast<int>(batch), p.nheads = static_cast<int>(nheads), p.head_dim = static_cast<int>(head_dim);
  p.seqlen_q = static_cast<int>(max_seqlen_q), p.seqlen_k = static_cast<int>(max_seqlen_k);
  p.cu_seqlens_q = cu_seqlens_q.data_ptr<int>();
  p.cu_seqlens_k = cu_seqlens_k.data_ptr<int>();
  p.softmax_scale = static_cast<float>(softmax_scale);
  p.causal = causal;
  check_launch(bark_kernels::flash_attention_forward(p, dtype, c10::cuda::getCurrentCUDAStream()),
               "attention_varlen");
  return out;
}

at::Tensor attention_with_kvcache(const at::Tensor& q, at::Tensor& k_cache, at::Tensor& v_cache,
                                  const std::optional<at::Tensor>& k, const std::optional<at::Tensor>& v,
                                  const at::Tensor& cache_seqlens, bool causal, double softmax_scale) {
  check_operand(q, "q", 4, "(batch, seqlen_q, nheads, head_dim)", q, "q");
  check_operand(k_cache, "k_cache", 4, "(batch, max_seqlen, nheads, head_dim)", q, "q");
  check_operand(v_cache, "v_cache", 4, "(batch, max_seqlen, nheads, head_dim)", q, "q");
  const DType dtype = kernel_dtype(q, "q");
  const int64_t batch = q.size(0), seqlen_q = q.size(1), nheads = q.size(2), head_dim = q.size(3);
  const int64_t max_seqlen = k_cache.size(1);
  TORCH_CHECK_VALUE(k_cache.size(0) == batch && k_cache.size(2) == nheads && k_cache.size(3) == head_dim,
                    "bark_kernels_cuda: k_cache: expected shape (", batch, ", max_seqlen, ", nheads, ", ", head_dim,
                    "), got ", dims_str(k_cache.sizes()));
  TORCH_CHECK_VALUE(v_cache.sizes() == k_cache.sizes(), "bark_kernels_cuda: v_cache: expected shape ",
                    dims_str(k_cache.sizes()), " (the shape of k_cache), got ", dims_str(v_cache.sizes()));
  TORCH_CHECK_VALUE(k.has_value() == v.has_value(), "bark_kernels_cuda: k, v: expected both or neither, got k=",
                    k.has_value() ? "tensor" : "None", " and v=", v.has_value() ? "tensor" : "None");
  if (k.has_value()) {
    check_operand(*k, "k", 4, "(batch, seqlen_q, nheads, head_dim)", q, "q");
    check_operand(*v, "v", 4, "(batch, seqlen_q, nheads, head_dim)", q, "q");
    TORCH_CHECK_VALUE(k->sizes() == q.sizes(), "bark_kernels_cuda: k: expected shape ", dims_str(q.sizes()),
                      " (the shape of q), got ", dims_str(k->sizes()));
    TORCH_CHECK_VALUE(v->sizes() == q.sizes(), "bark_kernels_cuda: v: expected shape ", dims_str(q.sizes()),
                      " (the shape of q), got ", dims_str(v->sizes()));
    TORCH_CHECK_VALUE(seqlen_q <= max_seqlen, "bark_kernels_cuda: k: appending ", seqlen_q,
                      " rows cannot fit a cache of max_seqlen ", max_seqlen);
  }
  check_int32_vector(cache_seqlens, "cache_seqlens", batch, q);
  check_head_dim(head_dim);
  check_fits_int(seqlen_q, "q.shape[1] (seqlen_q)");
  check_fits_int(max_seqlen, "k_cache.shape[1] (max_seqlen)");
  TORCH_CHECK_VALUE(batch <= 65535 / 4 && nheads <= 65535, "bark_kernels_cuda: q: expected batch <= 16383 and ",
                    "nheads <= 65535, got ", batch, " and ", nheads);

  const c10::cuda::OptionalCUDAGuard device_guard(q.device());
  at::Tensor out = at::empty(q.sizes(), q.options());  // (B, Sq, H, D), every element written
  if (out.numel() == 0) return out;

  int device = 0, num_sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, device));

  bark_kernels::KVCacheParams p;
  p.q = q.data_ptr(), p.k_cache = k_cache.data_ptr(), p.v_cache = v_cache.data_ptr(), p.o = out.data_ptr();
  p.cache_seqlens = cache_seqlens.data_ptr<int>();
  set_strides(q, p.q_batch_stride, p.q_row_stride, p.q_head_stride);
  set_strides(k_cache, p.kc_batch_stride, p.kc_row_stride, p.kc_head_stride);
  set_strides(v_cache, p.vc_batch_stride, p.vc_row_stride, p.vc_head_stride);
  set_strides(out, p.o_batch_stride, p.o_row_stride, p.o_head_stride);
  if (k.has_value()) {
    p.k_new = k->data_ptr(), p.v_new = v->data_ptr();
    set_strides(*k, p.kn_batch_stride, p.kn_row_stride, p.kn_head_stride);
    set_strides(*v, p.vn_batch_stride, p.vn_row_stride, p.vn_head_stride);
  }
  p.batch = static_cast<int>(batch), p.seqlen_q = static_cast<int>(seqlen_q), p.nheads = static_cast<int>(nheads);
  p.head_dim = static_cast<int>(head_dim), p.max_seqlen_cache = static_cast<int>(max_seqlen);
  p.softmax_scale = static_cast<float>(softmax_scale);
  p.causal = causal;
  p.num_splits = bark_kernels::kvcache_num_splits(p.batch, p.seqlen_q, p.nheads, p.max_seqlen_cache, num_sms);
  at::Tensor partial_o, partial_lse;
  if (p.num_splits > 1) {  // host-sized workspace from the caching allocator: fine under CUDA-graph capture
    const auto fopts = q.options().dtype(at::kFloat);
    partial_o = at::empty({p.num_splits, batch * seqlen_q * nheads, head_dim}, fopts);
    partial_lse = at::empty({p.num_splits, batch * seqlen_q * nheads}, fopts);
    p.partial_o = partial_o.data_ptr<float>();
    p.partial_lse = partial_lse.data_ptr<float>();
  }
  check_launch(bark_kernels::attention_with_kvcache(p, dtype, c10::cuda::getCurrentCUDAStream()),
               "attention_with_kvcache");
  return out;
}

void check_rows_args(const at::Tensor& x, const at::Tensor& indices, const char* op) {
  TORCH_CHECK_VALUE(x.is_cuda(), "bark_kernels_cuda::", op, ": x: expected a CUDA tensor, got device ", x.device());
  TORCH_CHECK_VALUE(x.dim() == 2, "bark_kernels_cuda::", op, ": x: expected a 2-D tensor (rows, features), got shape ",
                    dims_str(x.sizes()));
  TORCH_CHECK_VALUE(x.is_contiguous(), "bark_kernels_cuda::", op, ": x: expected a contiguous tensor, got strides ",
                    dims_str(x.strides()));
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kLong, "bark_kernels_cuda::", op,
                   ": indices: expected dtype torch.int64, got ", indices.scalar_type());
  TORCH_CHECK_VALUE(indices.dim() == 1, "bark_kernels_cuda::", op, ": indices: expected a 1-D tensor (nnz,), got ",
                    "shape ", dims_str(indices.sizes()));
  TORCH_CHECK_VALUE(indices.device() == x.device(), "bark_kernels_cuda::", op, ": indices: expected device ",
                    x.device(), " (the device of x), got ", indices.device());
  TORCH_CHECK_VALUE(indices.is_contiguous(), "bark_kernels_cuda::", op, ": indices: expected a contiguous tensor");
}

at::Tensor gather_rows(const at::Tensor& x, const at::Tensor& indices) {
  check_rows_args(x, indices, "gather_rows");
  const c10::cuda::OptionalCUDAGuard device_guard(x.device());
  at::Tensor out = at::empty({indices.size(0), x.size(1)}, x.options());  // (nnz, F)
  if (out.numel() == 0) return out;
  check_launch(bark_kernels::gather_rows(x.data_ptr(), out.data_ptr(), indices.data_ptr<int64_t>(), indices.size(0),
                                         x.size(0), x.size(1) * static_cast<int64_t>(x.element_size()),
                                         c10::cuda::getCurrentCUDAStream()),
               "gather_rows");
  return out;
}

at::Tensor scatter_rows(const at::Tensor& x, const at::Tensor& indices, int64_t n) {
  check_rows_args(x, indices, "scatter_rows");
  TORCH_CHECK_VALUE(indices.size(0) == x.size(0), "bark_kernels_cuda::scatter_rows: indices: expected shape (",
                    x.size(0), ",) (the rows of x), got ", dims_str(indices.sizes()));
  TORCH_CHECK_VALUE(n >= x.size(0), "bark_kernels_cuda::scatter_rows: n: expected at least the ", x.size(0),
                    " rows of x, got ", n);
  const c10::cuda::OptionalCUDAGuard device_guard(x.device());
  at::Tensor out = at::zeros({n, x.size(1)}, x.options());  // (n, F), zeros where nothing is scattered
  if (x.numel() == 0) return out;
  check_launch(bark_kernels::scatter_rows(x.data_ptr(), out.data_ptr(), indices.data_ptr<int64_t>(), indices.size(0),
                                          n, x.size(1) * static_cast<int64_t>(x.element_size()),
                                          c10::cuda::getCurrentCUDAStream()),
               "scatter_rows");
  return out;
}

}  // namespace

// Schemas: keep in step with _FAKES in bark_kernels/backends/cuda.py (tests/test_cuda_build.py checks both).
TORCH_LIBRARY(bark_kernels_cuda, m) {
  m.def("attention(Tensor q, Tensor k, Tensor v, bool causal, float softmax_scale) -> Tensor");
  m.def(
      "attention_varlen(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, "
      "int max_seqlen_k, bool causal, float softmax_scale) -> Tensor");
  m.def(
      "attention_with_kvcache(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor? k, Tensor? v, "
      "Tensor cache_seqlens, bool causal, float softmax_scale) -> Tensor");
  m.def("gather_rows(Tensor x, Tensor indices) -> Tensor");
  m.def("scatter_rows(Tensor x, Tensor indices, int n) -> Tensor");
}

TORCH_LIBRARY_IMPL(bark_kernels_cuda, CUDA, m) {
  m.impl("attention", &attention);
  m.impl("attention_varlen", &attention_varlen);
  m.impl("attention_with_kvcache", &attention_with_kvcache);
  m.impl("gather_rows", &gather_rows);
  m.impl("scatter_rows", &scatter_rows);
}

// `import bark_kernels._C` (setup.py build) needs a module init; the ops are registered by loading the library.
#ifdef TORCH_EXTENSION_NAME
PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "bark_kernels CUDA kernels; the ops live in torch.ops.bark_kernels_cuda";
  module.attr("KVCACHE_MAX_SPLIT_SEQLEN_Q") = bark_kernels::kDecodeMaxSeqlenQ;
}
#endif
