"""Dense attention: every backend against the float64 reference, with the shared tolerance table."""

import pytest
import torch
from helpers import grid, make_qkv

import bark_kernels as bk
from bark_kernels.testing import assert_close_to_reference, reference_attention

# (Sq, Sk): the odd lengths, Sq < Sk and Sq > Sk, single queries and single keys.
SHAPES_FULL = [(1, 1), (1, 7), (7, 7), (7, 1), (129, 7), (7, 129), (129, 257), (257, 129), (257, 257), (1, 1024),
               (1024, 7), (1024, 1024)]
SHAPES_SMALL = [(1, 7), (7, 7), (129, 257), (257, 129)]


def _heads_for(seqlen_q, seqlen_k):
    return (1, 1) if seqlen_q * seqlen_k >= 1024 * 129 else (2, 2)  # keep the interpreter's trip count small


def check(device, backend, dtype, seqlen_q, seqlen_k, causal, head_dim=64, softmax_scale=None, fused=False):
    batch, nheads = _heads_for(seqlen_q, seqlen_k)
    q, k, v = make_qkv(batch, seqlen_q, seqlen_k, nheads, head_dim, dtype, device, fused=fused)
    out = bk.attention(q, k, v, causal=causal, softmax_scale=softmax_scale, backend=backend)
    assert out.shape == q.shape and out.dtype == dtype and out.device == q.device
    ref = reference_attention(q, k, v, causal=causal, softmax_scale=softmax_scale)
    baseline = bk.attention(q, k, v, causal=causal, softmax_scale=softmax_scale, backend="eager")
    assert_close_to_reference(out, ref, baseline, dtype, name=f"{backend} attention Sq={seqlen_q} Sk={seqlen_k}")
    if causal and seqlen_q > seqlen_k:  # rows that see no key are exactly 0
        assert torch.count_nonzero(out[:, : seqlen_q - seqlen_k]) == 0
    return out


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("seqlen_q,seqlen_k", SHAPES_FULL)
@pytest.mark.parametrize("device,backend,dtype", grid([torch.float32]))
def test_attention_fp32_shapes(device, backend, dtype, seqlen_q, seqlen_k, causal):
    check(device, backend, dtype, seqlen_q, seqlen_k, causal)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("seqlen_q,seqlen_k", SHAPES_SMALL)
@pytest.mark.parametrize("device,backend,dtype", grid([torch.float16, torch.bfloat16]))
def test_attention_half_shapes(device, backend, dtype, seqlen_q, seqlen_k, causal):
    check(device, backend, dtype, seqlen_q, seqlen_k, causal)


@pytest.mark.parametrize("head_dim", [16, 32, 128])
@pytest.mark.parametrize("device,backend,dtype", grid([torch.float32, torch.float16]))
def test_attention_head_dims(device, backend, dtype, head_dim):
    from bark_kernels import registry

    if registry.why_not(backend, "attention", torch.device(device), dtype, head_dim) is not None:
        pytest.skip(f"{backend} does not serve head_dim {head_dim} (the dispatcher falls back)")
    check(device, backend, dtype, 65, 65, True, head_dim=head_dim)


@pytest.mark.parametrize("device,backend,dtype", grid([torch.float32, torch.float16]))
def test_attention_fused_qkv_views(device, backend, dtype):
    """q, k, v as strided views of one fused projection (Bark's att_proj): no copies needed, same answer."""
    q, k, v = make_qkv(2, 129, 129, 2, 64, dtype, device, fused=True)
    assert not q.is_contiguous() and q.stride(-1) == 1
    check(device, backend, dtype, 129, 129, True, fused=True)


@pytest.mark.parametrize("device,backend,dtype", grid([torch.float32]))
def test_attention_custom_softmax_scale(device, backend, dtype):
    check(device, backend, dtype, 7, 129, True, softmax_scale=0.37)
    check(device, backend, dtype, 129, 129, False, softmax_scale=1.0)


def test_attention_weights_and_dropout_use_eager_or_sdpa():
    q, k, v = make_qkv(1, 5, 5, 2, 16, torch.float32, "cpu")
    out, weights = bk.attention(q, k, v, causal=True, return_attn_weights=True)
    assert weights.shape == (1, 2, 5, 5)
    torch.testing.assert_close(weights.sum(-1), torch.ones(1, 2, 5))
    assert torch.count_nonzero(torch.triu(weights, diagonal=1)) == 0
    torch.testing.assert_close(out, bk.attention(q, k, v, causal=True, backend="eager"))
    torch.manual_seed(0)
    dropped = bk.attention(q, k, v, dropout_p=0.5)
    assert dropped.shape == q.shape and not torch.allclose(dropped, bk.attention(q, k, v))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("head_dim", [32, 128])
def test_eager_ground_truth_is_the_most_accurate(head_dim, dtype):
    """The ground truth computes half-precision inputs in float32 end to end: its error against float64 is at most the
    Triton kernel's and below transformers' eager computation (scores rounded in the input dtype, then scaled), which
    the transformers integration keeps for attention weights only."""
    from bark_kernels import registry
    from bark_kernels.backends import eager
    from bark_kernels.testing import max_error

    q, k, v = make_qkv(2, 65, 65, 2, head_dim, dtype, "cpu", seed=head_dim)
    ref = reference_attention(q, k, v, causal=True)
    err_eager = max_error(bk.attention(q, k, v, causal=True, backend="eager"), ref)
    err_hf = max_error(eager.transformers_bark_attention(q, k, v, True, head_dim ** -0.5)[0], ref)
    assert err_eager < err_hf, (err_eager, err_hf)
    if registry.why_not("triton", "attention", q.device, dtype, head_dim) is None:
        err_triton = max_error(bk.attention(q, k, v, causal=True, backend="triton"), ref)
        assert err_eager <= err_triton, (err_eager, err_triton)
