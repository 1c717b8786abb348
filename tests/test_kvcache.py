"""attention_with_kvcache: the in-place append, per-row lengths, and step-by-step decode == full causal attention."""

import pytest
import torch
from helpers import grid, make_qkv

import bark_kernels as bk
from bark_kernels.testing import (
    assert_close_to_reference,
    reference_attention,
    reference_attention_with_kvcache,
)

OP = "attention_with_kvcache"


def _cache(batch, max_seqlen, nheads, head_dim, dtype, device, seed=1):
    gen = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(batch, max_seqlen, nheads, head_dim, generator=gen).to(dtype=dtype, device=device)
    v_cache = torch.randn(batch, max_seqlen, nheads, head_dim, generator=gen).to(dtype=dtype, device=device)
    return k_cache, v_cache


@pytest.mark.parametrize("seqlen_q", [1, 3])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("device,backend,dtype", grid([torch.float32, torch.float16], op=OP))
def test_kvcache_append_and_attend(device, backend, dtype, seqlen_q, causal):
    """Rows of different lengths (0, a few, nearly full): the output matches the reference, the cache holds exactly
    the appended rows, every other slot is untouched bit for bit, and cache_seqlens is not modified."""
    batch, max_seqlen, nheads, head_dim = 3, 300, 2, 64
    k_cache, v_cache = _cache(batch, max_seqlen, nheads, head_dim, dtype, device)
    cache_seqlens = torch.tensor([0, 37, max_seqlen - seqlen_q], dtype=torch.int32, device=device)
    lens_before = cache_seqlens.clone()
    q, k, v = make_qkv(batch, seqlen_q, seqlen_q, nheads, head_dim, dtype, device, seed=2)
    ref, k_expected, v_expected = reference_attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, causal)
    baseline = bk.attention_with_kvcache(q, k_cache.clone(), v_cache.clone(), k, v, cache_seqlens=cache_seqlens,
                                         causal=causal, backend="eager")
    out = bk.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens, causal=causal,
                                    backend=backend)
    assert out.shape == q.shape and out.dtype == dtype
    assert torch.equal(k_cache, k_expected) and torch.equal(v_cache, v_expected)
    assert torch.equal(cache_seqlens, lens_before)
    assert_close_to_reference(out, ref, baseline, dtype, name=f"{backend} kvcache Sq={seqlen_q}")


@pytest.mark.parametrize("device,backend,dtype", grid([torch.float32], op=OP))
def test_kvcache_without_new_keys(device, backend, dtype):
    """k=v=None: attend to the first cache_seqlens[b] keys only; nothing is written."""
    k_cache, v_cache = _cache(2, 130, 2, 64, dtype, device)
    before = (k_cache.clone(), v_cache.clone())
    cache_seqlens = torch.tensor([129, 5], dtype=torch.int32, device=device)
    q, _, _ = make_qkv(2, 1, 1, 2, 64, dtype, device)
    ref, _, _ = reference_attention_with_kvcache(q, k_cache, v_cache, None, None, cache_seqlens)
    baseline = bk.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=cache_seqlens, backend="eager")
    out = bk.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=cache_seqlens, backend=backend)
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])
    assert_close_to_reference(out, ref, baseline, dtype, name=f"{backend} kvcache read-only")


@pytest.mark.parametrize("device,backend,dtype", grid([torch.float32, torch.float16], op=OP))
def test_step_by_step_decode_equals_full_causal(device, backend, dtype):
    """Prefill a prompt through the cache, then decode one token at a time: the outputs equal full causal attention
    over the whole sequence, and the cache ends up holding exactly k and v."""
    batch, total, prompt, nheads, head_dim, max_seqlen = 2, 40, 29, 2, 64, 48
    q, k, v = make_qkv(batch, total, total, nheads, head_dim, dtype, device, seed=5)
    k_cache = torch.zeros(batch, max_seqlen, nheads, head_dim, dtype=dtype, device=device)
    v_cache = torch.zeros_like(k_cache)
    lens = torch.zeros(batch, dtype=torch.int32, device=device)
    outs = [bk.attention_with_kvcache(q[:, :prompt], k_cache, v_cache, k[:, :prompt], v[:, :prompt],
                                      cache_seqlens=lens, backend=backend)]
    lens += prompt
    for t in range(prompt, total):
        outs.append(bk.attention_with_kvcache(q[:, t:t + 1], k_cache, v_cache, k[:, t:t + 1], v[:, t:t + 1],
                                              cache_seqlens=lens, backend=backend))
        lens += 1
    out = torch.cat(outs, dim=1)  # (B, total, H, D)
    ref = reference_attention(q, k, v, causal=True)
    baseline = bk.attention(q, k, v, causal=True, backend="eager")
    assert_close_to_reference(out, ref, baseline, dtype, name=f"{backend} decode")
    assert torch.equal(k_cache[:, :total], k) and torch.equal(v_cache[:, :total], v)
    assert torch.count_nonzero(k_cache[:, total:]) == 0 and torch.count_nonzero(v_cache[:, total:]) == 0


@pytest.mark.parametrize("device,backend,dtype", grid([torch.float32], op=OP))
def test_decode_long_cache(device, backend, dtype):
    """One query over a 1024-slot cache (where split-K kicks in), rows of very different lengths."""
    k_cache, v_cache = _cache(2, 1024, 1, 64, dtype, device, seed=7)
    cache_seqlens = torch.tensor([1023, 200], dtype=torch.int32, device=device)
    q, k, v = make_qkv(2, 1, 1, 1, 64, dtype, device, seed=8)
    ref, k_expected, _ = reference_attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens)
    baseline = bk.attention_with_kvcache(q, k_cache.clone(), v_cache.clone(), k, v, cache_seqlens=cache_seqlens,
                                         backend="eager")
    out = bk.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens, backend=backend)
    assert torch.equal(k_cache, k_expected)
    assert_close_to_reference(out, ref, baseline, dtype, name=f"{backend} long decode")
