"""Things specific to the Triton backend: capability reasons, head dims, strided fused-qkv views, split-K decode with
several splits, writes that never leave the appended rows, the bf16 interpreter patch, the custom ops (opcheck, fake
implementations, torch.compile fullgraph), no host sync in the decode path, and CUDA-graph capture (GPU only).

Runs on CUDA when present, otherwise on CPU under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
The cross-backend parity suite (tests/test_attention.py, test_kvcache.py, ...) covers the common semantics.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers import make_qkv

import bark_kernels as bk
from bark_kernels import registry
from bark_kernels.backends import eager
from bark_kernels.testing import (
    assert_close_to_reference,
    reference_attention,
    reference_attention_with_kvcache,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ROOT = Path(__file__).resolve().parent.parent

triton_backend = pytest.importorskip("bark_kernels.backends.triton")
triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
from bark_kernels.backends.triton._attention_kernels import _key_range  # noqa: E402 (after the skips)

_reason = registry.why_not("triton", "attention", torch.device(DEVICE), torch.float32, 64)
pytestmark = pytest.mark.skipif(_reason is not None, reason=f"triton backend unavailable on {DEVICE}: {_reason}")


def _launchers():
    from bark_kernels.backends.triton import _launchers

    return _launchers


def _ops():
    from bark_kernels.backends.triton import _ops

    return _ops


def _cache(batch, max_seqlen, nheads, head_dim, dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(batch, max_seqlen, nheads, head_dim, generator=gen).to(dtype=dtype, device=DEVICE)
    v_cache = torch.randn(batch, max_seqlen, nheads, head_dim, generator=gen).to(dtype=dtype, device=DEVICE)
    return k_cache, v_cache


# ----------------------------------------------------------------------------------------------------------------------
# capability checks


def test_supports_reasons():
    dev = torch.device(DEVICE)
    assert triton_backend.supports("attention", dev, torch.float16, 64) is None
    for head_dim in (1, 8, 48, 80, 256):  # any head_dim up to 256 (the head block is padded to a power of two)
        assert triton_backend.supports("attention", dev, torch.float16, head_dim) is None, head_dim
        assert triton_backend.supports("attention_with_kvcache", dev, torch.float16, head_dim) is None, head_dim
    assert "head_dim 257 is not supported (supported: 1..256)" in triton_backend.supports(
        "attention_with_kvcache", dev, torch.float16, 257)
    assert "float64" in triton_backend.supports("attention", dev, torch.float64, 64)
    assert "int64" in triton_backend.supports("gather_rows", dev, torch.int64, 1)
    assert triton_backend.supports("gather_rows", dev, torch.float64, 1) is None
    assert "device type" in triton_backend.supports("attention", torch.device("meta"), torch.float16, 64)


def test_unsupported_head_dim_explicit_raises_and_auto_falls_back(monkeypatch):
    """The registry's contract for a head_dim a kernel backend does not serve (the cuda backend's case; triton serves
    every head_dim up to 256, so its table is narrowed here)."""
    monkeypatch.setattr(triton_backend, "HEAD_DIMS", (16, 32, 64, 128))
    q, k, v = make_qkv(1, 5, 5, 2, 48, torch.float32, DEVICE)
    with pytest.raises(registry.BackendUnavailableError, match="head_dim 48"):
        bk.attention(q, k, v, backend="triton")
    name, _ = registry.select("attention", q.device, q.dtype, 48)
    assert name != "triton"
    out = bk.attention(q, k, v, causal=True)  # automatic choice serves it through a fallback
    assert_close_to_reference(out, reference_attention(q, k, v, True), eager.attention(q, k, v, True, 48 ** -0.5),
                              torch.float32)


# ----------------------------------------------------------------------------------------------------------------------
# dense forward specifics


@pytest.mark.parametrize("head_dim", [16, 32, 64, 128])
def test_head_dims(head_dim):
    dtype = torch.float16
    q, k, v = make_qkv(1, 19, 70, 2, head_dim, dtype, DEVICE, seed=head_dim)
    out = bk.attention(q, k, v, causal=True, backend="triton")
    baseline = bk.attention(q, k, v, causal=True, backend="eager")
    assert_close_to_reference(out, reference_attention(q, k, v, True), baseline, dtype, name=f"D={head_dim}")


def test_rows_without_keys_are_exactly_zero():
    """Causal with Sq > Sk: the first Sq - Sk queries see no key and must be exactly 0 (not NaN)."""
    q, k, v = make_qkv(2, 40, 9, 2, 32, torch.float32, DEVICE)
    out = bk.attention(q, k, v, causal=True, backend="triton")
    assert torch.equal(out[:, :31], torch.zeros_like(out[:, :31]))
    assert torch.count_nonzero(out[:, 31:]) > 0
    baseline = bk.attention(q, k, v, causal=True, backend="eager")
    assert_close_to_reference(out, reference_attention(q, k, v, True), baseline, torch.float32)


def test_strided_views_are_not_copied(monkeypatch):
    """q/k/v as views of one fused projection (and a head-major transpose) are read through their strides."""
    dtype = torch.float16
    q, k, v = make_qkv(2, 33, 33, 3, 64, dtype, DEVICE, fused=True, seed=3)
    assert not q.is_contiguous() and q.stride(-1) == 1
    v_t = v.transpose(1, 2).contiguous().transpose(1, 2)  # (B, T, H, D) with head-major memory
    calls = []
    original = torch.Tensor.contiguous
    monkeypatch.setattr(torch.Tensor, "contiguous",
                        lambda self, *a, **kw: calls.append(tuple(self.shape)) or original(self, *a, **kw))
    out = _launchers().attention_fwd(q, k, v_t, True, 64 ** -0.5)
    monkeypatch.undo()
    assert calls == []
    baseline = eager.attention(q, k, v_t, True, 64 ** -0.5)
    assert_close_to_reference(out, reference_attention(q, k, v_t, True), baseline, dtype)


# ----------------------------------------------------------------------------------------------------------------------
# KV-cache decode: split-K, fused append, bounds


@pytest.mark.parametrize("num_splits,seqlen_q", [(1, 1), (3, 1), (8, 1), (4, 5)])
def test_split_k_decode(num_splits, seqlen_q):
    """Long cache split over several blocks, rows of length 0 / short / full; the result and the appended cache match
    the reference, and every other cache slot is untouched bit for bit."""
    dtype = torch.float16
    batch, max_seqlen, nheads, head_dim = 3, 1024, 2, 64
    k_cache, v_cache = _cache(batch, max_seqlen, nheads, head_dim, dtype)
    cache_seqlens = torch.tensor([0, 150, max_seqlen - seqlen_q], dtype=torch.int32, device=DEVICE)
    q, k, v = make_qkv(batch, seqlen_q, seqlen_q, nheads, head_dim, dtype, DEVICE, seed=4)
    ref, k_expected, v_expected = reference_attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens)
    baseline = eager.attention_with_kvcache(q, k_cache.clone(), v_cache.clone(), k, v, cache_seqlens, True,
                                            head_dim ** -0.5)
    out = _launchers().attention_kvcache_fwd(q, k_cache, v_cache, k, v, cache_seqlens, True, head_dim ** -0.5,
                                             num_splits=num_splits)
    assert torch.equal(k_cache, k_expected) and torch.equal(v_cache, v_expected)
    assert_close_to_reference(out, ref, baseline, dtype, name=f"split-K {num_splits}")


def test_default_split_heuristic_uses_host_shapes_only():
    launchers = _launchers()
    dev = torch.device(DEVICE)
    assert launchers.choose_num_splits(10_000, 1024, 128, dev) == 1  # a full grid needs no split
    few = launchers.choose_num_splits(1, 1024, 128, dev)
    assert 1 <= few <= 1024 // launchers.MIN_KEYS_PER_SPLIT
    if DEVICE == "cuda":
        assert few > 1


def test_append_never_writes_outside_the_cache():
    """Unchecked overflow (cache_seqlens + Sq > S_max): only rows inside the cache are written; the memory right
    after each cache row (same storage) stays bit-identical."""
    dtype = torch.float32
    batch, max_seqlen, nheads, head_dim, seqlen_q = 2, 64, 2, 32, 4
    gen = torch.Generator().manual_seed(9)
    storage_k = torch.randn(batch, max_seqlen + 8, nheads, head_dim, generator=gen).to(DEVICE)
    storage_v = torch.randn(batch, max_seqlen + 8, nheads, head_dim, generator=gen).to(DEVICE)
    before_k, before_v = storage_k.clone(), storage_v.clone()
    k_cache, v_cache = storage_k[:, :max_seqlen], storage_v[:, :max_seqlen]  # (B, S_max, H, D) views
    cache_seqlens = torch.tensor([max_seqlen - 2, 10], dtype=torch.int32, device=DEVICE)
    q, k, v = make_qkv(batch, seqlen_q, seqlen_q, nheads, head_dim, dtype, DEVICE, seed=10)
    bk.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens, backend="triton",
                              check_bounds=False)
    assert torch.equal(storage_k[:, max_seqlen:], before_k[:, max_seqlen:])
    assert torch.equal(storage_v[:, max_seqlen:], before_v[:, max_seqlen:])
    # row 0: the two rows that fit were written, row 1: the normal append
    assert torch.equal(k_cache[0, max_seqlen - 2:], k[0, :2]) and torch.equal(v_cache[0, max_seqlen - 2:], v[0, :2])
    assert torch.equal(k_cache[1, 10:14], k[1]) and torch.equal(k_cache[1, :10], before_k[1, :10])
    assert torch.equal(k_cache[1, 14:], before_k[1, 14:max_seqlen])


def test_decode_path_has_no_host_sync(monkeypatch):
    """The KV-cache op never reads a device value on the host (the decode step must be CUDA-graph capturable)."""
    dtype = torch.float32
    k_cache, v_cache = _cache(2, 512, 2, 64, dtype)
    cache_seqlens = torch.tensor([3, 400], dtype=torch.int32, device=DEVICE)
    q, k, v = make_qkv(2, 1, 1, 2, 64, dtype, DEVICE)
    ref, _, _ = reference_attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens)
    baseline = eager.attention_with_kvcache(q, k_cache.clone(), v_cache.clone(), k, v, cache_seqlens, True, 0.125)

    def forbidden(*args, **kwargs):
        raise AssertionError("host sync on the decode path")

    for name in ("item", "tolist", "__bool__", "__int__", "__index__", "__float__", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    out = triton_backend.OPS["attention_with_kvcache"](q, k_cache, v_cache, k, v, cache_seqlens, True, 0.125)
    monkeypatch.undo()
    assert_close_to_reference(out, ref, baseline, dtype)


@triton.jit
def _key_range_probe(Out, len_q, len_k, split_size, CAUSAL: tl.constexpr, SPLIT: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (m_blocks, num_splits): stores the kernel's (lo, full_end, hi) of every program."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    lo, full_end, hi = _key_range(pid_m * BLOCK_M, len_q, len_k, pid_s, split_size, CAUSAL, SPLIT, BLOCK_M, BLOCK_N)
    base = (pid_s * tl.num_programs(0) + pid_m) * 3
    tl.store(Out + base, lo)
    tl.store(Out + base + 1, full_end)
    tl.store(Out + base + 2, hi)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("len_q,len_k,m_blocks,num_splits", [(20, 70, 4, 1), (5, 70, 1, 3), (40, 9, 3, 1),
                                                              (1, 33, 1, 3), (37, 37, 3, 2)])
def test_key_ranges_cover_exactly_the_visible_keys(causal, len_q, len_k, m_blocks, num_splits):
    """The key ranges each program visits, checked against the mask: the unmasked part [lo, full_end) holds only
    keys every row of the M block sees, the splits are disjoint and cover every key some row sees, and an M block with
    no query row (varlen: past its sequence's end, here m_blocks beyond len_q) visits no key (it used to run its whole
    unmasked loop for nothing: right results, wasted work)."""
    block_m, block_n = 16, 16
    split = num_splits > 1
    split_size = triton.cdiv(triton.cdiv(len_k, num_splits), block_n) * block_n if split else 0
    out = torch.full((num_splits, m_blocks, 3), -1, dtype=torch.int32, device=DEVICE)
    _key_range_probe[(m_blocks, num_splits)](out, len_q, len_k, split_size, CAUSAL=causal, SPLIT=split,
                                            BLOCK_M=block_m, BLOCK_N=block_n)
    ranges = out.cpu().tolist()
    for pid_m in range(m_blocks):
        rows = range(pid_m * block_m, min((pid_m + 1) * block_m, len_q))

        def visible(i, j):
            return j < len_k and (not causal or j <= i + len_k - len_q)

        seen_by_some = {j for j in range(len_k) if any(visible(i, j) for i in rows)}
        covered = []
        for pid_s in range(num_splits):
            lo, full_end, hi = ranges[pid_s][pid_m]
            assert lo <= full_end <= hi, (pid_m, pid_s, lo, full_end, hi)
            assert lo % block_n == 0 and (full_end - lo) % block_n == 0
            assert all(visible(i, j) for i in rows for j in range(lo, full_end)), (pid_m, pid_s, lo, full_end)
            if not rows:
                assert hi == lo, f"M block {pid_m} has no query row but visits keys [{lo}, {hi})"
            covered += range(lo, hi)
        assert len(covered) == len(set(covered)), "splits overlap"
        assert seen_by_some <= set(covered)


@triton.jit
def _tensor_bounded_loop_probe(Out, n, BLOCK: tl.constexpr):
    """Counts the trips of a loop whose bound is a tensor, as the attention kernels' key loops are."""
    trips = n * 0
    for _ in range(0, tl.minimum(n, 64), BLOCK):
        trips += 1
    tl.store(Out, trips)


@pytest.mark.parametrize("n,trips", [(40, 3), (64, 4), (100, 4), (0, 0)])
def test_loops_with_tensor_bounds(n, trips):
    """`range(lo, tl.minimum(...))`: Triton <= 3.6's interpreter converts such bounds with int() of a 1-element array,
    which NumPy >= 2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars"); the project's
    tools/triton_interpreter.py makes it work (the GPU machine's stack is triton 3.6 with numpy 2.5). Compiled on CUDA."""
    out = torch.full((1,), -1, dtype=torch.int32, device=DEVICE)
    _tensor_bounded_loop_probe[(1,)](out, n, BLOCK=16)
    assert out.item() == trips


def test_varlen_lengths_zero_and_one():
    dtype = torch.float16
    lengths_q, lengths_k = [0, 1, 17, 1], [0, 1, 30, 5]
    cu_q = torch.tensor([0, 0, 1, 18, 19], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 0, 1, 31, 36], dtype=torch.int32, device=DEVICE)
    q, _, _ = make_qkv(1, sum(lengths_q), 1, 2, 32, dtype, DEVICE, seed=11)
    _, k, v = make_qkv(1, 1, sum(lengths_k), 2, 32, dtype, DEVICE, seed=12)
    q, k, v = q[0], k[0], v[0]  # packed (total, H, D)
    out = bk.attention_varlen(q, k, v, cu_q, cu_k, 17, 30, causal=True, backend="triton")
    baseline = bk.attention_varlen(q, k, v, cu_q, cu_k, 17, 30, causal=True, backend="eager")
    from bark_kernels.testing import reference_attention_varlen

    assert_close_to_reference(out, reference_attention_varlen(q, k, v, cu_q, cu_k, True), baseline, dtype)


# ----------------------------------------------------------------------------------------------------------------------
# gather / scatter


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_gather_scatter_rows_exact(dtype):
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(300, 37, generator=gen).to(dtype=dtype, device=DEVICE)  # F not a power of two
    indices = torch.randperm(300, generator=gen)[:150].to(DEVICE)
    gathered = triton_backend.OPS["gather_rows"](x, indices)
    assert torch.equal(gathered, x[indices])
    scattered = triton_backend.OPS["scatter_rows"](gathered, indices, 300)
    expected = torch.zeros_like(x)
    expected[indices] = x[indices]
    assert torch.equal(scattered, expected)


# ----------------------------------------------------------------------------------------------------------------------
# bfloat16 under the interpreter


@pytest.mark.skipif(DEVICE != "cpu", reason="the bf16 interpreter patch only matters on CPU")
def test_bf16_interpreter_patch_is_active_and_right():
    from tools import triton_interpreter

    assert triton_interpreter.apply() is None
    assert triton_backend.supports("attention", torch.device("cpu"), torch.bfloat16, 64) is None
    assert triton_interpreter._self_test() is None  # re-run the probe kernel: bf16 math, casts, dot match PyTorch


def test_bf16_split_k_decode():
    dtype = torch.bfloat16
    k_cache, v_cache = _cache(2, 512, 2, 64, dtype, seed=14)
    cache_seqlens = torch.tensor([500, 77], dtype=torch.int32, device=DEVICE)
    q, k, v = make_qkv(2, 2, 2, 2, 64, dtype, DEVICE, seed=15)
    ref, k_expected, _ = reference_attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens)
    baseline = eager.attention_with_kvcache(q, k_cache.clone(), v_cache.clone(), k, v, cache_seqlens, True, 0.125)
    out = _launchers().attention_kvcache_fwd(q, k_cache, v_cache, k, v, cache_seqlens, True, 0.125, num_splits=2)
    assert torch.equal(k_cache, k_expected)
    assert_close_to_reference(out, ref, baseline, dtype, name="bf16 split-K")


# ----------------------------------------------------------------------------------------------------------------------
# custom ops: schema, fake implementations, torch.compile


def test_opcheck_attention_ops():
    ops = torch.ops.bark_kernels_triton
    _ops()  # registers the ops
    q, k, v = make_qkv(1, 17, 17, 2, 32, torch.float32, DEVICE, fused=True)
    torch.library.opcheck(ops.attention, (q, k, v, True, 0.2))
    cu = torch.tensor([0, 7, 17], dtype=torch.int32, device=DEVICE)
    qp, kp, vp = q[0], k[0], v[0]  # packed (total, H, D), strided
    torch.library.opcheck(ops.attention_varlen, (qp, kp, vp, cu, cu, 10, 10, True, 0.2))
    k_cache, v_cache = _cache(1, 40, 2, 32, torch.float32)
    cache_seqlens = torch.tensor([5], dtype=torch.int32, device=DEVICE)
    torch.library.opcheck(ops.attention_with_kvcache, (q[:, :2], k_cache, v_cache, k[:, :2], v[:, :2],
                                                       cache_seqlens, True, 0.2))
    torch.library.opcheck(ops.attention_with_kvcache, (q[:, :1], k_cache, v_cache, None, None, cache_seqlens,
                                                       False, 0.2))
    # more queries than the decode block (prefill block sizes over the cache), appended
    torch.library.opcheck(ops.attention_with_kvcache, (q, k_cache, v_cache, k, v, cache_seqlens, True, 0.2))
    # one row, one head, a long cache: the default heuristic splits the keys (workspaces + combine kernel)
    launchers = _launchers()
    cfg = launchers.decode_config(32, torch.float32, 1, 512)
    assert launchers.choose_num_splits(1, 512, cfg.block_n, torch.device(DEVICE)) > 1
    k_long, v_long = _cache(1, 512, 1, 32, torch.float32)
    q1, k1, v1 = make_qkv(1, 1, 1, 1, 32, torch.float32, DEVICE, seed=19)
    torch.library.opcheck(ops.attention_with_kvcache, (q1, k_long, v_long, k1, v1,
                                                       torch.tensor([300], dtype=torch.int32, device=DEVICE), True,
                                                       0.2))


def test_opcheck_row_ops():
    ops = torch.ops.bark_kernels_triton
    _ops()
    x = torch.randn(20, 12, device=DEVICE)
    indices = torch.tensor([3, 0, 19, 7], device=DEVICE)
    torch.library.opcheck(ops.gather_rows, (x, indices))
    torch.library.opcheck(ops.scatter_rows, (x[:4].clone(), indices, 20))


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    _ops()
    with FakeTensorMode():
        q = torch.empty(2, 1, 4, 64, device=DEVICE)
        k_cache = torch.empty(2, 128, 4, 64, device=DEVICE)
        lens = torch.empty(2, dtype=torch.int32, device=DEVICE)
        out = torch.ops.bark_kernels_triton.attention_with_kvcache(q, k_cache, k_cache.clone(), q, q, lens, True,
                                                                   0.1)
        assert out.shape == (2, 1, 4, 64)
        x = torch.empty(9, 5, device=DEVICE)
        idx = torch.empty(4, dtype=torch.int64, device=DEVICE)
        assert torch.ops.bark_kernels_triton.gather_rows(x, idx).shape == (4, 5)
        assert torch.ops.bark_kernels_triton.scatter_rows(x, idx, 30).shape == (30, 5)


def test_torch_compile_fullgraph():
    """A function calling the op compiles with fullgraph=True (aot_eager: traced through the fake implementation,
    no inductor codegen, so it stays fast on CPU) and gives the eager result."""
    torch._dynamo.reset()
    _ops()

    def block(x, w):
        qkv = x @ w  # (B, T, 3 * H * D)
        q, k, v = qkv.view(x.shape[0], x.shape[1], 3, 2, 32).unbind(2)  # (B, T, H, D) strided views
        return bk.attention(q, k, v, causal=True, backend="triton").sum(-1)

    gen = torch.Generator().manual_seed(16)
    x = torch.randn(1, 9, 16, generator=gen).to(DEVICE)
    w = torch.randn(16, 3 * 64, generator=gen).to(DEVICE)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    assert torch.allclose(compiled(x, w), block(x, w), rtol=0, atol=0)


def test_torch_compile_kvcache_mutation():
    """The in-place append survives compilation (mutates_args declared): the cache is written by the compiled call."""
    torch._dynamo.reset()
    _ops()
    k_cache, v_cache = _cache(1, 32, 2, 32, torch.float32)
    expected_k = k_cache.clone()
    lens = torch.tensor([4], dtype=torch.int32, device=DEVICE)
    q, k, v = make_qkv(1, 1, 1, 2, 32, torch.float32, DEVICE, seed=17)
    expected_k[0, 4] = k[0, 0]

    def step(q, k, v, k_cache, v_cache, lens):
        return bk.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=lens, backend="triton",
                                         check_bounds=False)

    out = torch.compile(step, fullgraph=True, backend="aot_eager")(q, k, v, k_cache, v_cache, lens)
    assert torch.equal(k_cache, expected_k)
    assert out.shape == q.shape


# ----------------------------------------------------------------------------------------------------------------------
# GPU only


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a CUDA device")
def test_cuda_graph_capture_decode():
    dtype = torch.float16
    k_cache, v_cache = _cache(4, 1024, 4, 64, dtype)
    lens = torch.tensor([0, 10, 500, 1000], dtype=torch.int32, device="cuda")
    q, k, v = make_qkv(4, 1, 1, 4, 64, dtype, "cuda", seed=18)
    static = [t.clone() for t in (q, k, v)]
    for _ in range(2):  # warm up (compiles the kernels) outside the capture, on copies of the caches
        triton_backend.OPS["attention_with_kvcache"](*static[:1], k_cache.clone(), v_cache.clone(), *static[1:],
                                                     lens, True, 0.125)
    ref, k_expected, _ = reference_attention_with_kvcache(q, k_cache, v_cache, k, v, lens)
    baseline = eager.attention_with_kvcache(q, k_cache.clone(), v_cache.clone(), k, v, lens, True, 0.125)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = triton_backend.OPS["attention_with_kvcache"](static[0], k_cache, v_cache, static[1], static[2], lens,
                                                           True, 0.125)
    graph.replay()  # capture only recorded the kernels: the replay appends and attends
    torch.cuda.synchronize()
    assert torch.equal(k_cache, k_expected)
    assert_close_to_reference(out, ref, baseline, dtype, name="graph replay")


# ----------------------------------------------------------------------------------------------------------------------
# ahead-of-time GPU compile (no GPU needed): what the interpreter cannot check


def _aot_check(quick: bool):
    import os
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia.compiler", reason="triton's NVIDIA backend (ptxas) is not installed")
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    cmd = [sys.executable, "-m", "tools.aot_check", "--arch", "90"] + (["--quick"] if quick else [])
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=2400, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "0 failure(s)" in run.stdout
    # the fused decode step's kernels, with PDL on for sm_90 (and no register spill: aot_check fails on any)
    for kernel in ("ln_linear", "linear_residual", "attention", "embed", "pick"):
        assert f"decode {kernel} " in run.stdout and "pdl=True" in run.stdout, kernel


def test_kernels_compile_for_sm90_quick():
    """Representative variants (fp16, D=64: causal prefill, split-K decode with append, combine, rows) compile for
    H100 with Triton's real compiler and ptxas, within the shared-memory limit."""
    _aot_check(quick=True)


@pytest.mark.slow
def test_kernels_compile_for_sm90_all_variants():
    """Every dtype x head_dim x mode variant the launchers can pick, padded head dims included (about 10 minutes on
    2 idle CPU cores)."""
    _aot_check(quick=False)


def test_bf16_interpreter_self_test_survives_a_meta_device_context():
    """The first import may happen while a model is built under `with torch.device("meta")`: the bf16 self-test
    must still run on CPU tensors and pass."""
    import subprocess
    import sys

    code = ("import torch\n"
            "with torch.device('meta'):\n"
            "    import bark_kernels.backends.triton as t\n"
            "    from tools import triton_interpreter\n"
            "    print('bf16-error:', triton_interpreter.apply())\n")
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                            cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "bf16-error: None" in result.stdout
