"""Varlen attention over packed ragged batches: every backend against the float64 reference."""

import pytest
import torch
from helpers import cu_seqlens, grid

import bark_kernels as bk
from bark_kernels.testing import assert_close_to_reference, reference_attention_varlen

CASES = {
    # name: (query lengths, key lengths)
    "self": ([1, 7, 129, 1, 33], [1, 7, 129, 1, 33]),
    "cross": ([1, 7, 65, 3], [9, 7, 1, 130]),  # Sq > Sk and Sq < Sk rows, bottom-right per row
    "empty_rows": ([0, 5, 0, 1], [0, 5, 3, 1]),
}


def _packed(lengths_q, lengths_k, nheads, head_dim, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lengths_q), nheads, head_dim, generator=gen).to(dtype=dtype, device=device)
    k = torch.randn(sum(lengths_k), nheads, head_dim, generator=gen).to(dtype=dtype, device=device)
    v = torch.randn(sum(lengths_k), nheads, head_dim, generator=gen).to(dtype=dtype, device=device)
    return q, k, v, cu_seqlens(lengths_q, device), cu_seqlens(lengths_k, device)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("device,backend,dtype", grid([torch.float32, torch.float16], op="attention_varlen"))
def test_varlen_matches_reference(device, backend, dtype, case, causal):
    lengths_q, lengths_k = CASES[case]
    q, k, v, cu_q, cu_k = _packed(lengths_q, lengths_k, 2, 64, dtype, device)
    args = (q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k))
    out = bk.attention_varlen(*args, causal=causal, backend=backend)
    assert out.shape == q.shape and out.dtype == dtype
    ref = reference_attention_varlen(q, k, v, cu_q, cu_k, causal=causal)
    baseline = bk.attention_varlen(*args, causal=causal, backend="eager")
    assert_close_to_reference(out, ref, baseline, dtype, name=f"{backend} varlen {case}")


@pytest.mark.parametrize("device,backend,dtype", grid([torch.float32], op="attention_varlen"))
def test_varlen_larger_max_seqlen_is_fine(device, backend, dtype):
    """max_seqlen is an upper bound; a larger one gives the same answer."""
    q, k, v, cu_q, cu_k = _packed([3, 9], [3, 9], 2, 16, dtype, device)
    ref = reference_attention_varlen(q, k, v, cu_q, cu_k, causal=True)
    baseline = bk.attention_varlen(q, k, v, cu_q, cu_k, 9, 9, causal=True, backend="eager")
    for bound in (9, 64):
        out = bk.attention_varlen(q, k, v, cu_q, cu_k, bound, bound, causal=True, backend=backend)
        assert_close_to_reference(out, ref, baseline, dtype, name=f"{backend} varlen max_seqlen={bound}")
