"""Small helpers shared by the kernel test files: the (device, backend, dtype) grid and input builders."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES, backends_for

from bark_kernels import registry

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def grid(dtypes=DTYPES, op: str = "attention", head_dim: int = 64):
    """pytest params (device, backend, dtype) for every backend that can serve ``op`` there; others are not listed."""
    params = []
    for device in DEVICES:
        for name in backends_for(device):
            for dtype in dtypes:
                reason = registry.why_not(name, op, torch.device(device), dtype, head_dim)
                if reason is None:
                    params.append(pytest.param(device, name, dtype, id=f"{device}-{name}-{str(dtype)[6:]}"))
    return params


def make_qkv(batch, seqlen_q, seqlen_k, nheads, head_dim, dtype, device, fused=False, seed=0):
    """Random q (B, Sq, H, D), k/v (B, Sk, H, D). ``fused`` (needs Sq == Sk) returns strided views of one
    (B, T, 3 * H * D) projection, as Bark's att_proj produces them."""
    gen = torch.Generator().manual_seed(seed)
    if fused:
        assert seqlen_q == seqlen_k
        qkv = torch.randn(batch, seqlen_q, 3 * nheads * head_dim, generator=gen).to(dtype=dtype, device=device)
        q, k, v = qkv.view(batch, seqlen_q, 3, nheads, head_dim).unbind(2)  # each (B, T, H, D), strided
        return q, k, v
    q = torch.randn(batch, seqlen_q, nheads, head_dim, generator=gen).to(dtype=dtype, device=device)
    k = torch.randn(batch, seqlen_k, nheads, head_dim, generator=gen).to(dtype=dtype, device=device)
    v = torch.randn(batch, seqlen_k, nheads, head_dim, generator=gen).to(dtype=dtype, device=device)
    return q, k, v


def cu_seqlens(lengths, device):
    """int32 (B + 1,) cumulative lengths starting at 0."""
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int32, device=device)
