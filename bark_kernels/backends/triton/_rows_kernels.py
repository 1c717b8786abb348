"""Triton kernels that move whole rows: gather (unpad) and scatter (pad)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _gather_rows_kernel(X, Indices, Out, nnz, n_features,
                        BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr):
    """Grid (cdiv(nnz, BLOCK_R), cdiv(F, BLOCK_F)): Out[r, :] = X[Indices[r], :]; X (N, F), Out (nnz, F) contiguous."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    row_ok = offs_r < nnz
    mask = row_ok[:, None] & (offs_f[None, :] < n_features)
    src = tl.load(Indices + offs_r, mask=row_ok, other=0)  # int64
    vals = tl.load(X + src[:, None] * n_features + offs_f[None, :], mask=mask)
    tl.store(Out + offs_r.to(tl.int64)[:, None] * n_features + offs_f[None, :], vals, mask=mask)


@triton.jit
def _scatter_rows_kernel(X, Indices, Out, nnz, n_features,
                         BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr):
    """Grid (cdiv(nnz, BLOCK_R), cdiv(F, BLOCK_F)): Out[Indices[r], :] = X[r, :]; Out (N, F) zero-filled beforehand."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    row_ok = offs_r < nnz
    mask = row_ok[:, None] & (offs_f[None, :] < n_features)
    dst = tl.load(Indices + offs_r, mask=row_ok, other=0)  # int64
    vals = tl.load(X + offs_r.to(tl.int64)[:, None] * n_features + offs_f[None, :], mask=mask)
    tl.store(Out + dst[:, None] * n_features + offs_f[None, :], vals, mask=mask)
