"""Head dims that are not a power of two (and the widest, 256): the Triton kernels pad the head block and mask it.

Every entry point (dense, varlen, KV cache with fused append, split-K decode) against the float64 reference with the
table's 2x rule, and the cache writes exact (the padded lanes must never spill into the neighbouring head's memory).
Shapes are tiny: under the interpreter each case costs one or two kernel trips.
"""

import pytest
import torch
from helpers import cu_seqlens, make_qkv

import bark_kernels as bk
from bark_kernels import registry
from bark_kernels.testing import (
    assert_close_to_reference,
    reference_attention,
    reference_attention_varlen,
    reference_attention_with_kvcache,
)

ODD_HEAD_DIMS = [8, 24, 40, 80, 96, 112, 160, 256]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _triton_or_skip(dtype):
    reason = registry.why_not("triton", "attention", torch.device(DEVICE), dtype, 64)
    if reason is not None:
        pytest.skip(f"triton cannot run here: {reason}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("head_dim", ODD_HEAD_DIMS)
def test_dense_and_fused_views(head_dim, dtype):
    _triton_or_skip(dtype)
    q, k, v = make_qkv(1, 19, 19, 2, head_dim, dtype, DEVICE, fused=True, seed=head_dim)  # strided views, stride 3*H*D
    out = bk.attention(q, k, v, causal=True, backend="triton")
    baseline = bk.attention(q, k, v, causal=True, backend="eager")
    assert_close_to_reference(out, reference_attention(q, k, v, True), baseline, dtype, name=f"dense D={head_dim}")
    q, k, v = make_qkv(2, 5, 23, 1, head_dim, dtype, DEVICE, seed=head_dim + 1)  # Sq < Sk, not causal
    out = bk.attention(q, k, v, causal=False, backend="triton")
    baseline = bk.attention(q, k, v, causal=False, backend="eager")
    assert_close_to_reference(out, reference_attention(q, k, v, False), baseline, dtype, name=f"full D={head_dim}")


@pytest.mark.parametrize("head_dim", ODD_HEAD_DIMS)
def test_varlen(head_dim):
    dtype = torch.float16
    _triton_or_skip(dtype)
    lengths = [3, 0, 11]
    gen = torch.Generator().manual_seed(head_dim)
    q, k, v = (torch.randn(sum(lengths), 2, head_dim, generator=gen).to(dtype=dtype, device=DEVICE) for _ in range(3))
    cu = cu_seqlens(lengths, DEVICE)
    out = bk.attention_varlen(q, k, v, cu, cu, 11, 11, causal=True, backend="triton")
    baseline = bk.attention_varlen(q, k, v, cu, cu, 11, 11, causal=True, backend="eager")
    ref = reference_attention_varlen(q, k, v, cu, cu, causal=True)
    assert_close_to_reference(out, ref, baseline, dtype, name=f"varlen D={head_dim}")


@pytest.mark.parametrize("num_splits", [1, 3], ids=["one-split", "split-K"])
@pytest.mark.parametrize("head_dim", ODD_HEAD_DIMS)
def test_kvcache_append_and_split_k(head_dim, num_splits):
    """Decode with the fused append, with and without the split over the keys (workspace rows padded, combine kernel
    writes only head_dim lanes); the caches hold exactly the appended rows, every other byte untouched."""
    from bark_kernels.backends.triton import _launchers

    dtype = torch.float16
    _triton_or_skip(dtype)
    gen = torch.Generator().manual_seed(head_dim)
    k_cache, v_cache = (torch.randn(2, 300, 3, head_dim, generator=gen).to(dtype=dtype, device=DEVICE)
                        for _ in range(2))
    cache_seqlens = torch.tensor([7, 290], dtype=torch.int32, device=DEVICE)
    q, k, v = make_qkv(2, 1, 1, 3, head_dim, dtype, DEVICE, seed=head_dim + 2)
    ref, k_expected, v_expected = reference_attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens)
    baseline = bk.attention_with_kvcache(q, k_cache.clone(), v_cache.clone(), k, v, cache_seqlens=cache_seqlens,
                                         backend="eager")
    out = _launchers.attention_kvcache_fwd(q, k_cache, v_cache, k, v, cache_seqlens, True, head_dim ** -0.5,
                                           num_splits=num_splits)
    assert torch.equal(k_cache, k_expected) and torch.equal(v_cache, v_expected)
    assert_close_to_reference(out, ref, baseline, dtype, name=f"kvcache D={head_dim} splits={num_splits}")


@pytest.mark.parametrize("head_dim", [1, 3, 8])
def test_tiny_head_dims_through_the_public_api(head_dim):
    """head_dim below tl.dot's 16: padded to 16. Several queries appended at once through the public API."""
    dtype = torch.float32
    _triton_or_skip(dtype)
    gen = torch.Generator().manual_seed(head_dim)
    k_cache, v_cache = (torch.randn(2, 40, 2, head_dim, generator=gen).to(device=DEVICE) for _ in range(2))
    cache_seqlens = torch.tensor([0, 33], dtype=torch.int32, device=DEVICE)
    q, k, v = make_qkv(2, 4, 4, 2, head_dim, dtype, DEVICE, seed=head_dim + 3)
    ref, k_expected, _ = reference_attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens)
    baseline = bk.attention_with_kvcache(q, k_cache.clone(), v_cache.clone(), k, v, cache_seqlens=cache_seqlens,
                                         backend="eager")
    out = bk.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens, backend="triton")
    assert torch.equal(k_cache, k_expected)
    assert_close_to_reference(out, ref, baseline, dtype, name=f"kvcache D={head_dim}")
