"""Bad input gets a clear error naming the argument, what was expected and what came; nothing is written."""

import pytest
import torch

import bark_kernels as bk


def qkv(b=2, sq=4, sk=4, h=2, d=16, dtype=torch.float32):
    return torch.randn(b, sq, h, d, dtype=dtype), torch.randn(b, sk, h, d, dtype=dtype), torch.randn(b, sk, h, d,
                                                                                                      dtype=dtype)


@pytest.mark.parametrize("mutate,exc,pattern", [
    (lambda q, k, v: (q[0], k, v), ValueError, r"q: expected a 4-D tensor"),
    (lambda q, k, v: (q, k.double(), v), TypeError, r"k: expected dtype torch.float32"),
    (lambda q, k, v: (q, k, v.half()), TypeError, r"v: expected dtype torch.float32"),
    (lambda q, k, v: (q.int(), k.int(), v.int()), TypeError, r"q: expected one of"),
    (lambda q, k, v: (q, k[:, :, :1], v[:, :, :1]), ValueError, r"k, v: expected nheads 2"),
    (lambda q, k, v: (q, k[..., :8], v), ValueError, r"k, v: expected headdim 16"),
    (lambda q, k, v: (q, k, v[:, :3]), ValueError, r"v: expected seqlen 4"),
    (lambda q, k, v: (q, k[:1], v[:1]), ValueError, r"k, v: expected batch 2"),
    (lambda q, k, v: ("q", k, v), TypeError, r"q: expected a torch.Tensor"),
])
def test_attention_bad_tensors(mutate, exc, pattern):
    with pytest.raises(exc, match=pattern):
        bk.attention(*mutate(*qkv()))


def test_attention_bad_head_dim_and_scalars():
    q, k, v = qkv(d=300)
    with pytest.raises(ValueError, match=r"head_dim between 1 and 256, got 300"):
        bk.attention(q, k, v)
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"softmax_scale: expected a float or None, got str"):
        bk.attention(q, k, v, softmax_scale="1")
    with pytest.raises(ValueError, match=r"softmax_scale: expected a finite number"):
        bk.attention(q, k, v, softmax_scale=float("nan"))
    with pytest.raises(TypeError, match=r"causal: expected a bool, got int"):
        bk.attention(q, k, v, causal=1)
    with pytest.raises(ValueError, match=r"dropout_p: expected a float in \[0, 1\)"):
        bk.attention(q, k, v, dropout_p=1.5)


def test_attention_mixed_devices():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device for a second device; none is present")
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"k: expected device"):
        bk.attention(q, k.cuda(), v)


def _cache_args(b=2, smax=8, h=2, d=16, sq=1):
    q, k, v = qkv(b=b, sq=sq, sk=sq, h=h, d=d)
    k_cache, v_cache = torch.zeros(b, smax, h, d), torch.zeros(b, smax, h, d)
    lens = torch.tensor([3, 7][:b], dtype=torch.int32)
    return q, k_cache, v_cache, k, v, lens


def test_kvcache_overflow_raises_and_writes_nothing():
    q, k_cache, v_cache, k, v, lens = _cache_args(sq=2)  # row 1 holds 7 of 8: 7 + 2 > 8
    with pytest.raises(ValueError, match=r"cache_seqlens: cache overflow: .* <= max_seqlen 8, got a maximum of 7 \+ 2"):
        bk.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=lens)
    assert torch.count_nonzero(k_cache) == 0 and torch.count_nonzero(v_cache) == 0


@pytest.mark.parametrize("change,exc,pattern", [
    (dict(cache_seqlens=torch.tensor([3], dtype=torch.int32)), ValueError, r"cache_seqlens: expected shape \(2,\)"),
    (dict(cache_seqlens=torch.tensor([3, 4])), TypeError, r"cache_seqlens: expected dtype torch.int32"),
    (dict(cache_seqlens=[3, 4]), TypeError, r"cache_seqlens: expected an int32 torch.Tensor"),
    (dict(cache_seqlens=torch.tensor([-1, 4], dtype=torch.int32)), ValueError, r"cache_seqlens: expected values >= 0"),
    (dict(k=None), ValueError, r"k, v: expected both or neither"),
    (dict(k=torch.zeros(2, 2, 2, 16)), ValueError, r"k: expected shape \(2, 1, 2, 16\)"),
    (dict(v_cache=torch.zeros(2, 9, 2, 16)), ValueError, r"v_cache: expected shape \(2, 8, 2, 16\)"),
    (dict(k_cache=torch.zeros(2, 8, 3, 16), v_cache=torch.zeros(2, 8, 3, 16)), ValueError,
     r"k_cache: expected \(batch, max_seqlen, nheads, headdim\)"),
    (dict(k_cache=torch.zeros(2, 8, 16, 2).transpose(2, 3), v_cache=torch.zeros(2, 8, 2, 16)), ValueError,
     r"k_cache: expected last stride 1"),
    (dict(k_cache=torch.zeros(2, 8, 2, 16, dtype=torch.float16), v_cache=torch.zeros(2, 8, 2, 16, dtype=torch.float16)),
     TypeError, r"k_cache: expected dtype torch.float32"),
])
def test_kvcache_bad_input(change, exc, pattern):
    q, k_cache, v_cache, k, v, lens = _cache_args()
    args = dict(q=q, k_cache=k_cache, v_cache=v_cache, k=k, v=v, cache_seqlens=lens)
    args.update(change)
    with pytest.raises(exc, match=pattern):
        bk.attention_with_kvcache(**args)
    assert torch.count_nonzero(k_cache) == 0


def _varlen_args():
    q = torch.randn(10, 2, 16)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    return [q, q.clone(), q.clone(), cu, cu.clone(), 6, 6]


@pytest.mark.parametrize("index,value,exc,pattern", [
    (3, torch.tensor([0, 4, 10]), TypeError, r"cu_seqlens_q: expected dtype torch.int32"),
    (4, torch.tensor([0, 10], dtype=torch.int32), ValueError, r"cu_seqlens_k: expected shape \(3,\)"),
    (3, torch.tensor([0, 7, 4, 10], dtype=torch.int32)[[0, 2, 3]].flip(0), ValueError, r"cu_seqlens_q: expected first"),
    (3, torch.tensor([0, 6, 4], dtype=torch.int32), ValueError, r"cu_seqlens_q: expected a non-decreasing"),
    (3, torch.tensor([0, 4, 9], dtype=torch.int32), ValueError, r"cu_seqlens_q: expected last entry 10"),
    (5, 5, ValueError, r"max_seqlen_q: expected at least the longest sequence 6, got 5"),
    (6, 2.5, TypeError, r"max_seqlen_k: expected an int"),
    (0, torch.randn(10, 3, 16), ValueError, r"k, v: expected nheads 3"),
    (2, torch.randn(9, 2, 16), ValueError, r"v: expected total 10"),
])
def test_varlen_bad_input(index, value, exc, pattern):
    args = _varlen_args()
    args[index] = value
    with pytest.raises(exc, match=pattern):
        bk.attention_varlen(*args)


def test_pad_unpad_bad_input():
    hidden = torch.randn(2, 5, 4)
    with pytest.raises(ValueError, match=r"attention_mask: expected shape \(2, 5\)"):
        bk.unpad_input(hidden, torch.ones(2, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"attention_mask: expected a bool or integer tensor"):
        bk.unpad_input(hidden, torch.ones(2, 5))
    with pytest.raises(ValueError, match=r"attention_mask: expected values 0 or 1"):
        bk.unpad_input(hidden, torch.full((2, 5), 2))
    unpadded, indices, _, _ = bk.unpad_input(hidden, torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"indices: expected values in \[0, 6\)"):
        bk.pad_input(unpadded[:3], indices[7:], 2, 3)
    with pytest.raises(ValueError, match=r"hidden_unpad: 10 rows cannot fit batch \* seqlen = 6"):
        bk.pad_input(unpadded, indices, 2, 3)
    with pytest.raises(TypeError, match=r"indices: expected dtype torch.int64"):
        bk.pad_input(unpadded, indices.int(), 2, 5)


def test_unknown_backend_name():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"backend=: expected one of \['triton', 'cuda', 'flash_attn', 'sdpa', 'eager'\], got 'fast'"):
        bk.attention(q, k, v, backend="fast")
