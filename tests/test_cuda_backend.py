"""The ``cuda`` backend (bark_kernels._C): what it reports where it cannot run, and, on a GPU with the extension built,
parity with the float64 reference (shared tolerance table), the in-place cache append, split-K decode, CUDA-graph
capture, torch.compile, and the binding's input validation.

The shared parity suites (test_attention.py, test_varlen.py, test_kvcache.py, test_padding.py) also run against
``cuda`` whenever it is available; the GPU tests here add the CUDA-specific paths (split-K over long caches, the
Sq > 16 kv-cache path, head dims, strided caches, graph capture, binding errors).
"""

from __future__ import annotations

import pytest
import torch
from helpers import cu_seqlens, make_qkv

import bark_kernels as bk
from bark_kernels import registry
from bark_kernels.backends import cuda as cuda_backend
from bark_kernels.testing import (
    assert_close_to_reference,
    reference_attention,
    reference_attention_varlen,
    reference_attention_with_kvcache,
)

CUDA_REASON = registry.availability("cuda")


def gpu_test(fn):
    """GPU tests: marked ``gpu`` and skipped, with the reason, when the cuda backend is unavailable."""
    skip = pytest.mark.skipif(CUDA_REASON is not None, reason=f"cuda backend unavailable: {CUDA_REASON}")
    return pytest.mark.gpu(skip(fn))

HALF = [torch.float16, torch.bfloat16]


# ----------------------------------------------------------------------------------------------------------------------
# everywhere


def test_op_table_is_complete():
    assert set(cuda_backend.OPS) == set(registry.OP_NAMES)
    assert cuda_backend.NAME == "cuda"


@pytest.mark.skipif(CUDA_REASON is None, reason="the cuda backend is available here")
def test_unavailable_backend_says_why():
    """Whatever the reason (extension not built, no CUDA device...), it is non-empty and `check` prints it."""
    reason = registry.availability("cuda")
    assert isinstance(reason, str) and reason
    assert "cuda" not in bk.available_backends()
    row = next(r for r in registry.describe() if r["name"] == "cuda")  # what `bark-kernels check` prints
    assert not row["available"] and row["reason"] == reason


@pytest.mark.skipif(CUDA_REASON is None, reason="the cuda backend is available here")
def test_explicit_request_raises_with_the_reason():
    q, k, v = make_qkv(1, 3, 3, 1, 16, torch.float32, "cpu")
    with pytest.raises(bk.BackendUnavailableError, match="cuda") as info:
        bk.attention(q, k, v, backend="cuda")
    assert CUDA_REASON.split(":")[0] in str(info.value)


def test_missing_extension_reason_names_the_module(monkeypatch):
    """Runs where the extension is built too (a GPU machine): its import is made to fail as an unbuilt one does."""
    import sys

    import bark_kernels

    class NotBuilt:  # finds no bark_kernels._C, as when no file exists: `from .. import _C` raises ImportError
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name == "bark_kernels._C":
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    monkeypatch.delattr(bark_kernels, "_C", raising=False)
    monkeypatch.delitem(sys.modules, "bark_kernels._C", raising=False)
    monkeypatch.setattr(sys, "meta_path", [NotBuilt, *sys.meta_path])
    monkeypatch.delenv("BARK_KERNELS_CUDA_JIT", raising=False)
    monkeypatch.setattr(cuda_backend, "_state", {"loaded": False, "error": None, "fakes": False})
    reason = cuda_backend.availability()
    assert reason.startswith("bark_kernels._C not built: ImportError")
    assert "BARK_KERNELS_CUDA_JIT=1" in reason


@pytest.mark.skipif(torch.version.cuda is not None, reason="torch has CUDA: a JIT build could really start")
def test_jit_request_on_cpu_torch_reports_the_build_failure(monkeypatch):
    monkeypatch.setenv("BARK_KERNELS_CUDA_JIT", "1")
    monkeypatch.setattr(cuda_backend, "_state", {"loaded": False, "error": None, "fakes": False})
    reason = cuda_backend.availability()
    assert "JIT build (BARK_KERNELS_CUDA_JIT=1) failed" in reason and "has no CUDA support" in reason


@pytest.mark.parametrize("op,device,dtype,head_dim,match", [
    ("attention", "cpu", torch.float16, 64, "CUDA devices only"),
    ("attention", "cuda", torch.float32, 64, "float16 or torch.bfloat16"),
    ("attention_varlen", "cuda", torch.float64, 64, "float16 or torch.bfloat16"),
    ("attention_with_kvcache", "cuda", torch.float16, 80, "head_dim 80 is not supported"),
    ("attention", "cuda", torch.bfloat16, 256, "head_dim 256 is not supported"),
    ("softmax", "cuda", torch.float16, 64, "unknown op"),
])
def test_supports_gives_reasons(op, device, dtype, head_dim, match):
    assert match in cuda_backend.supports(op, torch.device(device), dtype, head_dim)


@pytest.mark.parametrize("op", ["gather_rows", "scatter_rows"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int64, torch.bool])
def test_row_ops_take_any_dtype_on_cuda(op, dtype):
    assert cuda_backend.supports(op, torch.device("cuda"), dtype, 1) is None
    assert cuda_backend.supports(op, torch.device("cpu"), dtype, 1) is not None


# ----------------------------------------------------------------------------------------------------------------------
# GPU: parity


def _eager_and_ref(q, k, v, causal, softmax_scale=None):
    ref = reference_attention(q, k, v, causal=causal, softmax_scale=softmax_scale)
    baseline = bk.attention(q, k, v, causal=causal, softmax_scale=softmax_scale, backend="eager")
    return ref, baseline


@gpu_test
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("seqlen_q,seqlen_k", [(1, 1), (1, 1024), (7, 7), (7, 129), (129, 7), (129, 257),
                                               (257, 129), (257, 1024), (1024, 257), (1024, 1024)])
@pytest.mark.parametrize("dtype", HALF)
def test_attention_odd_shapes(dtype, seqlen_q, seqlen_k, causal):
    q, k, v = make_qkv(2, seqlen_q, seqlen_k, 3, 64, dtype, "cuda", seed=seqlen_q * 7 + seqlen_k)
    out = bk.attention(q, k, v, causal=causal, backend="cuda")
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    ref, baseline = _eager_and_ref(q, k, v, causal)
    assert_close_to_reference(out, ref, baseline, dtype, name=f"cuda Sq={seqlen_q} Sk={seqlen_k}")
    if causal and seqlen_q > seqlen_k:  # rows that see no key are exactly 0
        assert torch.count_nonzero(out[:, : seqlen_q - seqlen_k]) == 0


@gpu_test
@pytest.mark.parametrize("head_dim", [16, 32, 64, 96, 128])
@pytest.mark.parametrize("dtype", HALF)
def test_attention_head_dims_and_scale(dtype, head_dim):
    q, k, v = make_qkv(2, 77, 200, 2, head_dim, dtype, "cuda")
    for causal in (True, False):
        out = bk.attention(q, k, v, causal=causal, softmax_scale=0.3, backend="cuda")
        ref, baseline = _eager_and_ref(q, k, v, causal, softmax_scale=0.3)
        assert_close_to_reference(out, ref, baseline, dtype, name=f"cuda D={head_dim} causal={causal}")


@gpu_test
@pytest.mark.parametrize("dtype", HALF)
def test_attention_non_contiguous_views(dtype):
    """q/k/v as views of one fused projection (row stride 3*H*D), and a view with an odd row offset (no 16-byte
    alignment: the kernels' scalar-load path)."""
    q, k, v = make_qkv(2, 150, 150, 4, 64, dtype, "cuda", fused=True)
    assert not q.is_contiguous()
    out = bk.attention(q, k, v, causal=True, backend="cuda")
    ref, baseline = _eager_and_ref(q, k, v, True)
    assert_close_to_reference(out, ref, baseline, dtype, name="cuda fused qkv")

    base = torch.randn(2, 90, 2, 64 + 1, device="cuda").to(dtype)
    qo, ko, vo = base[..., 1:], base[:, 3:, :, 1:], base[:, 2:89, :, :64]  # last stride 1, odd offsets/strides
    out = bk.attention(qo, ko, vo, causal=False, backend="cuda")
    ref, baseline = _eager_and_ref(qo, ko, vo, False)
    assert_close_to_reference(out, ref, baseline, dtype, name="cuda unaligned views")


@gpu_test
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("dtype", HALF)
def test_varlen(dtype, causal):
    lens_q, lens_k = [1, 7, 129, 0, 300], [5, 7, 64, 3, 257]
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(sum(lens_q), 3, 64, generator=gen).to(dtype=dtype, device="cuda")
    k = torch.randn(sum(lens_k), 3, 64, generator=gen).to(dtype=dtype, device="cuda")
    v = torch.randn(sum(lens_k), 3, 64, generator=gen).to(dtype=dtype, device="cuda")
    cu_q, cu_k = cu_seqlens(lens_q, "cuda"), cu_seqlens(lens_k, "cuda")
    out = bk.attention_varlen(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal, backend="cuda")
    ref = reference_attention_varlen(q, k, v, cu_q, cu_k, causal=causal)
    baseline = bk.attention_varlen(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal, backend="eager")
    assert_close_to_reference(out, ref, baseline, dtype, name="cuda varlen")


# ----------------------------------------------------------------------------------------------------------------------
# GPU: KV cache


def _cache(batch, max_seqlen, nheads, head_dim, dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(batch, max_seqlen, nheads, head_dim, generator=gen).to(dtype=dtype, device="cuda")
    v_cache = torch.randn(batch, max_seqlen, nheads, head_dim, generator=gen).to(dtype=dtype, device="cuda")
    return k_cache, v_cache


@gpu_test
@pytest.mark.parametrize("with_new", [True, False], ids=["append", "read-only"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("seqlen_q", [1, 4, 5, 16, 17, 64])  # 1: one query per CTA; <= 16 split-K; > 16 flash path
@pytest.mark.parametrize("dtype", HALF)
def test_kvcache_matches_reference_and_touches_only_appended_rows(dtype, seqlen_q, causal, with_new):
    batch, max_seqlen, nheads, head_dim = 4, 4096, 2, 64  # B*H small and a long cache: several splits
    k_cache, v_cache = _cache(batch, max_seqlen, nheads, head_dim, dtype)
    lens = torch.tensor([0, 1, 1000, max_seqlen - seqlen_q], dtype=torch.int32, device="cuda")
    if not with_new:
        lens[0] = 3
    lens_before = lens.clone()
    q, k, v = make_qkv(batch, seqlen_q, seqlen_q, nheads, head_dim, dtype, "cuda", seed=5)
    k, v = (k, v) if with_new else (None, None)
    ref, k_expected, v_expected = reference_attention_with_kvcache(q, k_cache, v_cache, k, v, lens, causal)
    baseline = bk.attention_with_kvcache(q, k_cache.clone(), v_cache.clone(), k, v, cache_seqlens=lens,
                                         causal=causal, backend="eager")
    out = bk.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=lens, causal=causal, backend="cuda")
    assert torch.equal(k_cache, k_expected) and torch.equal(v_cache, v_expected)  # bit for bit, every slot
    assert torch.equal(lens, lens_before)
    assert_close_to_reference(out, ref, baseline, dtype, name=f"cuda kvcache Sq={seqlen_q}")


@gpu_test
@pytest.mark.parametrize("head_dim", [16, 32, 96, 128])
def test_kvcache_head_dims_and_strided_caches(head_dim):
    """Caches as views of a bigger (layers, 2, B, S, H, D) buffer; q and new k/v as fused-projection views."""
    dtype, batch, max_seqlen, nheads = torch.bfloat16, 2, 700, 3
    buf = torch.randn(2, 2, batch, max_seqlen, nheads, head_dim, device="cuda").to(dtype)
    k_cache, v_cache = buf[1, 0], buf[1, 1]
    untouched_layer = buf[0].clone()
    qkv = torch.randn(batch, 1, 3 * nheads * head_dim, device="cuda").to(dtype)
    q, k, v = qkv.view(batch, 1, 3, nheads, head_dim).unbind(2)  # (B, 1, H, D) each, strided
    lens = torch.tensor([699, 17], dtype=torch.int32, device="cuda")
    ref, k_expected, v_expected = reference_attention_with_kvcache(q, k_cache, v_cache, k, v, lens, True)
    baseline = bk.attention_with_kvcache(q, k_cache.clone(), v_cache.clone(), k, v, cache_seqlens=lens,
                                         backend="eager")
    out = bk.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=lens, backend="cuda")
    assert torch.equal(k_cache, k_expected) and torch.equal(v_cache, v_expected)
    assert torch.equal(buf[0], untouched_layer)
    assert_close_to_reference(out, ref, baseline, dtype, name=f"cuda kvcache D={head_dim}")


@gpu_test
@pytest.mark.parametrize("dtype", HALF)
def test_decode_step_by_step_equals_full_causal_attention(dtype):
    batch, seqlen, nheads, head_dim, prompt = 2, 300, 4, 64, 37
    q, k, v = make_qkv(batch, seqlen, seqlen, nheads, head_dim, dtype, "cuda", seed=11)
    full = bk.attention(q, k, v, causal=True, backend="cuda")
    ref, baseline = _eager_and_ref(q, k, v, True)
    k_cache = torch.zeros(batch, 512, nheads, head_dim, dtype=dtype, device="cuda")
    v_cache = torch.zeros_like(k_cache)
    lens = torch.zeros(batch, dtype=torch.int32, device="cuda")
    outs = [bk.attention_with_kvcache(q[:, :prompt], k_cache, v_cache, k[:, :prompt], v[:, :prompt],
                                      cache_seqlens=lens, backend="cuda")]  # prefill (Sq > 16: flash path)
    lens += prompt
    for t in range(prompt, seqlen):
        outs.append(bk.attention_with_kvcache(q[:, t:t + 1], k_cache, v_cache, k[:, t:t + 1], v[:, t:t + 1],
                                              cache_seqlens=lens, backend="cuda"))
        lens += 1
    stepped = torch.cat(outs, dim=1)  # (B, S, H, D)
    assert_close_to_reference(stepped, ref, baseline, dtype, name="cuda decode step by step")
    assert_close_to_reference(full, ref, baseline, dtype, name="cuda full causal")
    assert torch.equal(k_cache[:, :seqlen], k) and torch.count_nonzero(k_cache[:, seqlen:]) == 0


@gpu_test
def test_decode_step_captures_in_a_cuda_graph():
    """No host sync in the decode step: capture it once, replay with new inputs and lengths."""
    dtype, batch, nheads, head_dim, max_seqlen = torch.float16, 2, 4, 64, 2048
    k_cache, v_cache = _cache(batch, max_seqlen, nheads, head_dim, dtype)
    q, k, v = (torch.randn(batch, 1, nheads, head_dim, device="cuda").to(dtype) for _ in range(3))
    lens = torch.tensor([5, 1500], dtype=torch.int32, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up outside the capture
        bk.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=lens, backend="cuda")
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = bk.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=lens, backend="cuda")
    for step in range(3):
        for t in (q, k, v):
            t.copy_(torch.randn_like(t, dtype=torch.float32).to(dtype))
        lens.copy_(torch.tensor([7 + step, 1600 + 100 * step], dtype=torch.int32))
        ref, k_expected, v_expected = reference_attention_with_kvcache(q, k_cache, v_cache, k, v, lens, True)
        baseline = bk.attention_with_kvcache(q, k_cache.clone(), v_cache.clone(), k, v, cache_seqlens=lens,
                                             backend="eager")
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(k_cache, k_expected) and torch.equal(v_cache, v_expected)
        assert_close_to_reference(out, ref, baseline, dtype, name=f"cuda graph replay {step}")


@gpu_test
def test_torch_compile_fullgraph_with_the_extension():
    dtype = torch.bfloat16
    k_cache, v_cache = _cache(2, 256, 2, 64, dtype)
    q, k, v = make_qkv(2, 1, 1, 2, 64, dtype, "cuda", seed=4)
    lens = torch.tensor([10, 200], dtype=torch.int32, device="cuda")
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    expected = cuda_backend.attention_with_kvcache(q, expected_k, expected_v, k, v, lens, True, 0.125)
    compiled = torch.compile(cuda_backend.attention_with_kvcache, fullgraph=True)
    got = compiled(q, k_cache, v_cache, k, v, lens, True, 0.125)
    assert torch.equal(got, expected)
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)


# ----------------------------------------------------------------------------------------------------------------------
# GPU: gather / scatter


@gpu_test
@pytest.mark.parametrize("dtype,features", [(torch.float16, 64 * 12), (torch.float32, 3), (torch.int8, 5),
                                            (torch.bfloat16, 8), (torch.float64, 2)])
def test_unpad_pad_round_trip(dtype, features):
    batch, seqlen = 3, 37
    hidden = (torch.randn(batch, seqlen, features, device="cuda") * 10).to(dtype)
    mask = torch.ones(batch, seqlen, dtype=torch.bool, device="cuda")
    mask[0, :5] = False  # left padding
    mask[2, 30:] = False  # right padding
    mask[1] = False  # an empty row
    unpadded, indices, cu, max_seqlen = bk.unpad_input(hidden, mask, backend="cuda")
    assert torch.equal(unpadded, hidden.reshape(batch * seqlen, features)[indices])
    padded = bk.pad_input(unpadded, indices, batch, seqlen, backend="cuda")
    assert torch.equal(padded, torch.where(mask[..., None], hidden, torch.zeros_like(hidden)))
    assert max_seqlen == seqlen - 5 and int(cu[-1]) == int(mask.sum())


# ----------------------------------------------------------------------------------------------------------------------
# GPU: the binding's own validation (direct op calls, bypassing bark_kernels.interface)


def _ops():
    return torch.ops.bark_kernels_cuda


@gpu_test
def test_binding_rejects_bad_inputs_with_clear_errors():
    q = torch.randn(1, 4, 2, 64, device="cuda", dtype=torch.float16)
    with pytest.raises(TypeError, match=r"q: expected dtype torch.float16 or torch.bfloat16, got Float"):
        _ops().attention(q.float(), q.float(), q.float(), False, 0.1)
    with pytest.raises(ValueError, match=r"q: expected a CUDA tensor"):
        _ops().attention(q.cpu(), q, q, False, 0.1)
    with pytest.raises(ValueError, match=r"k: expected a 4-D tensor"):
        _ops().attention(q, q[0], q, False, 0.1)
    with pytest.raises(TypeError, match=r"v: expected dtype Half \(the dtype of q\)"):
        _ops().attention(q, q, q.bfloat16(), False, 0.1)
    with pytest.raises(ValueError, match=r"last \(head_dim\) stride 1"):
        _ops().attention(q, q.transpose(2, 3).contiguous().transpose(2, 3), q, False, 0.1)
    with pytest.raises(ValueError, match=r"head_dim in \{16, 32, 64, 96, 128\}, got 80"):
        x = torch.randn(1, 4, 2, 80, device="cuda", dtype=torch.float16)
        _ops().attention(x, x, x, False, 0.1)
    cache = torch.zeros(1, 8, 2, 64, device="cuda", dtype=torch.float16)
    with pytest.raises(TypeError, match=r"cache_seqlens: expected dtype torch.int32"):
        _ops().attention_with_kvcache(q, cache, cache.clone(), None, None,
                                      torch.zeros(1, dtype=torch.int64, device="cuda"), True, 0.1)
    with pytest.raises(ValueError, match=r"k, v: expected both or neither"):
        _ops().attention_with_kvcache(q, cache, cache.clone(), q, None, torch.zeros(1, dtype=torch.int32,
                                                                                    device="cuda"), True, 0.1)
    with pytest.raises(ValueError, match=r"cu_seqlens_k: expected shape \(3,\)"):
        packed = q[0]
        _ops().attention_varlen(packed, packed, packed, torch.tensor([0, 2, 4], dtype=torch.int32, device="cuda"),
                                torch.tensor([0, 4], dtype=torch.int32, device="cuda"), 2, 4, False, 0.1)
    with pytest.raises(TypeError, match=r"indices: expected dtype torch.int64"):
        _ops().gather_rows(q.view(4, -1), torch.zeros(2, dtype=torch.int32, device="cuda"))
    with pytest.raises(ValueError, match=r"n: expected at least the 4 rows of x"):
        _ops().scatter_rows(q.view(4, -1), torch.arange(4, device="cuda"), 3)
