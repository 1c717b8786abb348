// harness.cpp: command-line driver of the host-emulated kernels (tests only; see emu.h and
// tests/test_cuda_emulation.py).
//
//   harness DIR     reads DIR/params.txt ("key value..." lines) and DIR/<tensor>.bin (raw bytes of a tensor's whole
//                   storage), calls the real launcher of bark_kernels.h, writes DIR/<output>.bin; exit status 0, or
//                   1 with the reason on stderr (launch error, emulation check failure).
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "bark_kernels.h"

static thread_local cudaError_t g_last_error = cudaSuccess;
cudaError_t cudaGetLastError() {
  cudaError_t e = g_last_error;
  g_last_error = cudaSuccess;
  if (e == cudaSuccess && emu::g_error.load()) e = cudaErrorLaunchFailure;
  return e;
}
const char* cudaGetErrorString(cudaError_t err) { return err == cudaSuccess ? "no error" : "emulated launch error"; }

namespace {

std::string g_dir;
std::map<std::string, std::vector<double>> g_params;

double param(const std::string& key, size_t i = 0) {
  auto it = g_params.find(key);
  if (it == g_params.end() || it->second.size() <= i) {
    std::fprintf(stderr, "harness: missing parameter %s[%zu]\n", key.c_str(), i);
    std::exit(2);
  }
  return it->second[i];
}
int64_t iparam(const std::string& key, size_t i = 0) { return static_cast<int64_t>(param(key, i)); }
bool has(const std::string& key) { return g_params.count(key) > 0; }

// Exactly-sized heap buffers, so AddressSanitizer sees any access past a tensor's storage.
struct Buffer {
  uint8_t* data = nullptr;
  size_t bytes = 0;
};
std::map<std::string, Buffer> g_buffers;

Buffer& load(const std::string& name) {
  std::ifstream f(g_dir + "/" + name + ".bin", std::ios::binary);
  if (!f) {
    std::fprintf(stderr, "harness: missing tensor %s\n", name.c_str());
    std::exit(2);
  }
  std::vector<char> raw((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  Buffer& b = g_buffers[name];
  b.bytes = raw.size();
  b.data = new uint8_t[b.bytes > 0 ? b.bytes : 1];
  std::memcpy(b.data, raw.data(), raw.size());
  return b;
}

Buffer& alloc(const std::string& name, size_t bytes, uint8_t fill) {
  Buffer& b = g_buffers[name];
  b.bytes = bytes;
  b.data = new uint8_t[bytes > 0 ? bytes : 1];
  std::memset(b.data, fill, bytes);
  return b;
}

void save(const std::string& name) {
  const Buffer& b = g_buffers.at(name);
  std::ofstream f(g_dir + "/" + name + ".out.bin", std::ios::binary);
  f.write(reinterpret_cast<const char*>(b.data), static_cast<std::streamsize>(b.bytes));
}

// Pointer to element `offset` (param <name>_off) of a 16-bit tensor's storage, and its (batch, row, head) strides.
void* at16(const std::string& name) { return g_buffers.at(name).data + 2 * iparam(name + "_off"); }
void strides(const std::string& name, int64_t& b, int64_t& r, int64_t& h) {
  b = iparam(name + "_strides", 0), r = iparam(name + "_strides", 1), h = iparam(name + "_strides", 2);
}

int finish(cudaError_t err) {
  if (emu::g_error.load()) {
    std::fprintf(stderr, "harness: emulation check failed: %s\n", emu::g_message);
    return 1;
  }
  if (err != cudaSuccess) {
    std::fprintf(stderr, "harness: launcher returned cudaError %d\n", static_cast<int>(err));
    return 1;
  }
  return 0;
}

int run_flash() {
  bark_kernels::FlashFwdParams p;
  for (const char* t : {"q", "k", "v"}) load(t);
  alloc("o", 2 * iparam("o_numel"), 0xff);  // 0xffff: NaN in fp16 and bf16, so unwritten outputs show
  p.q = at16("q"), p.k = at16("k"), p.v = at16("v"), p.o = g_buffers["o"].data;
  strides("q", p.q_batch_stride, p.q_row_stride, p.q_head_stride);
  strides("k", p.k_batch_stride, p.k_row_stride, p.k_head_stride);
  strides("v", p.v_batch_stride, p.v_row_stride, p.v_head_stride);
  strides("o", p.o_batch_stride, p.o_row_stride, p.o_head_stride);
  p.batch = iparam("batch"), p.nheads = iparam("nheads"), p.head_dim = iparam("head_dim");
  p.seqlen_q = iparam("seqlen_q"), p.seqlen_k = iparam("seqlen_k");
  if (has("varlen")) {
    p.cu_seqlens_q = reinterpret_cast<const int*>(load("cu_seqlens_q").data);
    p.cu_seqlens_k = reinterpret_cast<const int*>(load("cu_seqlens_k").data);
  }
  if (has("seqused_add")) {
    p.seqused_k = reinterpret_cast<const int*>(load("seqused_k").data);
    p.seqused_k_add = iparam("seqused_add");
  }
  p.softmax_scale = static_cast<float>(param("scale"));
  p.causal = iparam("causal") != 0;
  const auto dtype = static_cast<bark_kernels::DType>(iparam("dtype"));
  const cudaError_t err = bark_kernels::flash_attention_forward(p, dtype, nullptr);
  save("o");
  return finish(err);
}

int run_kvcache() {
  bark_kernels::KVCacheParams p;
  for (const char* t : {"q", "k_cache", "v_cache"}) load(t);
  p.cache_seqlens = reinterpret_cast<const int*>(load("cache_seqlens").data);
  alloc("o", 2 * iparam("o_numel"), 0xff);
  p.q = at16("q"), p.k_cache = at16("k_cache"), p.v_cache = at16("v_cache"), p.o = g_buffers["o"].data;
  strides("q", p.q_batch_stride, p.q_row_stride, p.q_head_stride);
  strides("k_cache", p.kc_batch_stride, p.kc_row_stride, p.kc_head_stride);
  strides("v_cache", p.vc_batch_stride, p.vc_row_stride, p.vc_head_stride);
  strides("o", p.o_batch_stride, p.o_row_stride, p.o_head_stride);
  if (has("k_new_off")) {
    load("k_new"), load("v_new");
    p.k_new = at16("k_new"), p.v_new = at16("v_new");
    strides("k_new", p.kn_batch_stride, p.kn_row_stride, p.kn_head_stride);
    strides("v_new", p.vn_batch_stride, p.vn_row_stride, p.vn_head_stride);
  }
  p.batch = iparam("batch"), p.seqlen_q = iparam("seqlen_q"), p.nheads = iparam("nheads");
  p.head_dim = iparam("head_dim"), p.max_seqlen_cache = iparam("max_seqlen");
  p.softmax_scale = static_cast<float>(param("scale"));
  p.causal = iparam("causal") != 0;
  p.num_splits = iparam("num_splits");
  if (p.num_splits == 0) p.num_splits = bark_kernels::kvcache_num_splits(p.batch, p.seqlen_q, p.nheads,
                                                                         p.max_seqlen_cache, iparam("num_sms"));
  const size_t rows = static_cast<size_t>(p.batch) * p.seqlen_q * p.nheads;
  if (p.num_splits > 1) {
    p.partial_o = reinterpret_cast<float*>(alloc("partial_o", 4 * p.num_splits * rows * p.head_dim, 0xff).data);
    p.partial_lse = reinterpret_cast<float*>(alloc("partial_lse", 4 * p.num_splits * rows, 0xff).data);
  }
  const auto dtype = static_cast<bark_kernels::DType>(iparam("dtype"));
  const cudaError_t err = bark_kernels::attention_with_kvcache(p, dtype, nullptr);
  save("o"), save("k_cache"), save("v_cache");
  std::printf("num_splits %d\n", p.num_splits);
  return finish(err);
}

int run_rows(bool gather) {
  const Buffer& x = load("x");
  const Buffer& idx = load("indices");
  const int64_t nnz = iparam("nnz"), n = iparam("n_rows"), row_bytes = iparam("row_bytes");
  const int64_t out_rows = gather ? nnz : n;
  // Output at a chosen misalignment (param out_shift) to exercise the 4- and 1-byte paths.
  const int64_t shift = has("out_shift") ? iparam("out_shift") : 0;
  Buffer& raw = alloc("out_raw", out_rows * row_bytes + shift, gather ? 0xab : 0);
  cudaError_t err;
  if (gather) {
    err = bark_kernels::gather_rows(x.data + iparam("x_shift"), raw.data + shift,
                                    reinterpret_cast<const int64_t*>(idx.data), nnz, n, row_bytes, nullptr);
  } else {
    err = bark_kernels::scatter_rows(x.data + iparam("x_shift"), raw.data + shift,
                                     reinterpret_cast<const int64_t*>(idx.data), nnz, n, row_bytes, nullptr);
  }
  Buffer& out = alloc("out", out_rows * row_bytes, 0);
  std::memcpy(out.data, raw.data + shift, out.bytes);
  save("out");
  return finish(err);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: harness DIR\n");
    return 2;
  }
  g_dir = argv[1];
  std::ifstream f(g_dir + "/params.txt");
  std::string line, op;
  while (std::getline(f, line)) {
    std::istringstream ls(line);
    std::string key;
    if (!(ls >> key)) continue;
    if (key == "op") {
      ls >> op;
      continue;
    }
    double v;
    while (ls >> v) g_params[key].push_back(v);
  }
  if (op == "flash") return run_flash();
  if (op == "kvcache") return run_kvcache();
  if (op == "gather") return run_rows(true);
  if (op == "scatter") return run_rows(false);
  std::fprintf(stderr, "harness: unknown op '%s'\n", op.c_str());
  return 2;
}
