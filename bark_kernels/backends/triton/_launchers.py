"""Launchers: allocate outputs, pick block sizes and the split count from host-known shapes, launch the kernels.

Nothing here reads a device value on the host (no ``.item()``, ``.tolist()`` or ``int(tensor)``), so every launcher is
safe inside CUDA-graph capture. Block sizes come from a fixed table (no autotuning, which would benchmark inside a
capture); under the Triton interpreter the blocks are large because each inner-loop trip costs milliseconds there.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton

from ._attention_kernels import MODE_DENSE, MODE_KVCACHE, MODE_VARLEN, _attn_fwd_kernel, _combine_splits_kernel
from ._env import interpreter_enabled
from ._rows_kernels import _gather_rows_kernel, _scatter_rows_kernel

LOG2E = 1.4426950408889634

# split-K: each split covers at least this many keys, and the number of splits is capped
MIN_KEYS_PER_SPLIT = 256
MAX_SPLITS = 64
# a decode launch wants at least this many programs per SM before splitting the keys is not worth it
PROGRAMS_PER_SM = 2
# Sq up to this uses the small-M decode configuration
DECODE_MAX_SEQLEN_Q = 16


@dataclass(frozen=True)
class AttnConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def _pow2_at_least(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


def head_dim_pad(head_dim: int) -> int:
    """Width of the kernels' head block: the next power of two, at least 16 (``tl.dot``'s smallest K). Equal to
    head_dim for 16, 32, 64, 128, 256: those run without head masks."""
    return max(16, triton.next_power_of_2(head_dim))


def prefill_config(head_dim: int, dtype: torch.dtype, max_seqlen_q: int, max_seqlen_k: int) -> AttnConfig:
    """Block sizes for the dense / varlen forward (and the KV-cache path with many queries).

    CUDA values are chosen for H100 (sm_90) from the usual FlashAttention-2-in-Triton settings; NOT tuned on a GPU yet.
    The choice depends on the padded head width (``head_dim_pad``): 64 and 128 keep their configurations; wider heads
    (up to 256) take smaller tiles so the accumulator and the K/V pipeline fit (checked by ``tools/aot_check.py``).
    """
    if interpreter_enabled():
        return AttnConfig(_pow2_at_least(max_seqlen_q, 16, 128), _pow2_at_least(max_seqlen_k, 16, 128), 4, 1)
    head_dim = head_dim_pad(head_dim)
    if head_dim > 128:
        return AttnConfig(16, 16, 4, 2) if dtype == torch.float32 else AttnConfig(64, 32, 8, 2)
    if dtype == torch.float32:
        # ieee fp32 dot runs on FMA units with 4-byte tiles: register pressure decides. Picked so that ptxas spills
        # (almost) nothing for sm_80 and sm_90 with triton 3.6 and 3.9 (tools/aot_check.py); the former (64, 32, 4 warps)
        # spilled 1.4 KB per thread at D = 64 and 30 KB at D = 128
        if head_dim > 64:
            return AttnConfig(32, 16, 8, 2)
        return AttnConfig(64, 32, 8, 3) if max_seqlen_q > 32 else AttnConfig(32, 32, 4, 2)
    block_m = 128 if max_seqlen_q > 64 else 64
    if head_dim <= 64:
        return AttnConfig(block_m, 64, 4, 3)
    return AttnConfig(block_m, 64, 8, 3)


def decode_config(head_dim: int, dtype: torch.dtype, seqlen_q: int, max_seqlen_k: int) -> AttnConfig:
    """Block sizes for attention over a KV cache with few queries (decode): one small M block, long key blocks."""
    if seqlen_q > DECODE_MAX_SEQLEN_Q:
        return prefill_config(head_dim, dtype, seqlen_q, max_seqlen_k)
    if interpreter_enabled():
        return AttnConfig(16, _pow2_at_least(max_seqlen_k, 16, 128), 4, 1)
    head_dim = head_dim_pad(head_dim)
    if head_dim > 128:
        return AttnConfig(16, 16, 4, 2) if dtype == torch.float32 else AttnConfig(16, 32, 4, 2)
    if dtype == torch.float32:  # FMA dot: at D = 128 a 32-key block spilled 660 B per thread on sm_90
        return AttnConfig(16, 32 if head_dim <= 64 else 16, 4, 2)
    return AttnConfig(16, 128 if head_dim <= 64 else 64, 4, 3)


@functools.cache
def _sm_count(device_type: str, index: int | None) -> int:
    if device_type == "cuda":
        return torch.cuda.get_device_properties(index if index is not None else torch.cuda.current_device()
                                                ).multi_processor_count
    return 1  # interpreter on CPU: a nominal single "SM", so long caches with few rows still take the split path


def choose_num_splits(programs: int, max_seqlen_k: int, block_n: int, device: torch.device) -> int:
    """How many blocks share one query block's keys. Host-known shapes only: the launch grid, S_max, SM count."""
    target = PROGRAMS_PER_SM * _sm_count(device.type, device.index)
    if programs >= target:
        return 1
    by_occupancy = math.ceil(target / max(programs, 1))
    by_length = max(1, max_seqlen_k // max(MIN_KEYS_PER_SPLIT, block_n))
    return max(1, min(by_occupancy, by_length, MAX_SPLITS))


MAX_GRID_Y = 65535  # CUDA limit of gridDim.y (and z); axis 1 of the attention grid is batch * nheads


def _check_grid(batch: int, nheads: int, num_splits: int = 1) -> None:
    if batch * nheads > MAX_GRID_Y or num_splits > MAX_GRID_Y:
        raise ValueError(f"q: batch * nheads = {batch} * {nheads} = {batch * nheads} exceeds the Triton kernels' "
                         f"launch limit of {MAX_GRID_Y}; split the batch or use another backend")


def _dot_ieee(dtype: torch.dtype) -> bool:
    return dtype == torch.float32


def _strides3(t: torch.Tensor | None):
    """(batch, seq, head) strides of a (B, S, H, D) tensor, or zeros."""
    if t is None:
        return 0, 0, 0
    return t.stride(0), t.stride(1), t.stride(2)


def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, softmax_scale: float,
                  config: AttnConfig | None = None) -> torch.Tensor:
    """q (B, Sq, H, D), k/v (B, Sk, H, D), any strides with unit last stride -> out (B, Sq, H, D) contiguous."""
    batch, seqlen_q, nheads, head_dim = q.shape
    seqlen_k = k.shape[1]
    out = torch.empty((batch, seqlen_q, nheads, head_dim), dtype=q.dtype, device=q.device)  # (B, Sq, H, D)
    if out.numel() == 0:
        return out
    _check_grid(batch, nheads)
    cfg = config or prefill_config(head_dim, q.dtype, seqlen_q, seqlen_k)
    grid = (triton.cdiv(seqlen_q, cfg.block_m), batch * nheads, 1)
    _attn_fwd_kernel[grid](
        q, k, v, out, q, q,
        q, q, q,
        q, q, q,
        *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(out), 0, 0, 0, 0, 0, 0,
        nheads, seqlen_q, seqlen_k, 0, softmax_scale * LOG2E,
        MODE=MODE_DENSE, CAUSAL=bool(causal), HAS_NEW=False, FROM_NEW=False, SPLIT=False,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad(head_dim),
        IEEE=_dot_ieee(q.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


def attention_varlen_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                         cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, causal: bool,
                         softmax_scale: float, config: AttnConfig | None = None) -> torch.Tensor:
    """Packed q (total_q, H, D), k/v (total_k, H, D), cu_seqlens int32 (B + 1,) -> out (total_q, H, D) contiguous."""
    total_q, nheads, head_dim = q.shape
    batch = cu_seqlens_q.shape[0] - 1
    out = torch.empty((total_q, nheads, head_dim), dtype=q.dtype, device=q.device)  # (total_q, H, D)
    if out.numel() == 0 or batch <= 0 or max_seqlen_q <= 0:
        return out
    _check_grid(batch, nheads)
    cfg = config or prefill_config(head_dim, q.dtype, max_seqlen_q, max_seqlen_k)
    grid = (triton.cdiv(max_seqlen_q, cfg.block_m), batch * nheads, 1)
    _attn_fwd_kernel[grid](
        q, k, v, out, q, q,
        cu_seqlens_q, cu_seqlens_k, cu_seqlens_q,
        q, q, q,
        0, q.stride(0), q.stride(1), 0, k.stride(0), k.stride(1), 0, v.stride(0), v.stride(1),
        0, out.stride(0), out.stride(1), 0, 0, 0, 0, 0, 0,
        nheads, max_seqlen_q, max_seqlen_k, 0, softmax_scale * LOG2E,
        MODE=MODE_VARLEN, CAUSAL=bool(causal), HAS_NEW=False, FROM_NEW=False, SPLIT=False,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad(head_dim),
        IEEE=_dot_ieee(q.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


def attention_kvcache_fwd(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor | None,
                          v: torch.Tensor | None, cache_seqlens: torch.Tensor, causal: bool, softmax_scale: float,
                          num_splits: int | None = None, config: AttnConfig | None = None) -> torch.Tensor:
    """q (B, Sq, H, D); caches (B, S_max, H, D) written in place at rows cache_seqlens[b] + i when k/v (B, Sq, H, D)
    are given; -> out (B, Sq, H, D) contiguous. ``num_splits`` overrides the split-K heuristic (tests, benchmarks)."""
    batch, seqlen_q, nheads, head_dim = q.shape
    max_seqlen_k = k_cache.shape[1]
    out = torch.empty((batch, seqlen_q, nheads, head_dim), dtype=q.dtype, device=q.device)  # (B, Sq, H, D)
    if out.numel() == 0:
        return out
    has_new = k is not None
    _check_grid(batch, nheads)
    cfg = config or decode_config(head_dim, q.dtype, seqlen_q, max_seqlen_k)
    m_blocks = triton.cdiv(seqlen_q, cfg.block_m)
    if num_splits is None:
        num_splits = choose_num_splits(m_blocks * batch * nheads, max_seqlen_k, cfg.block_n, q.device)
    num_splits = max(1, min(int(num_splits), triton.cdiv(max(max_seqlen_k, 1), cfg.block_n)))
    split_size = triton.cdiv(triton.cdiv(max(max_seqlen_k, 1), num_splits), cfg.block_n) * cfg.block_n
    num_splits = triton.cdiv(max(max_seqlen_k, 1), split_size)
    split = num_splits > 1
    if split:
        rows = batch * nheads * seqlen_q
        acc_ws = torch.empty((num_splits, rows, head_dim_pad(head_dim)), dtype=torch.float32,
                             device=q.device)  # (S, B*H*Sq, D_PAD)
        m_ws = torch.empty((num_splits, rows), dtype=torch.float32, device=q.device)  # (S, B*H*Sq)
        l_ws = torch.empty((num_splits, rows), dtype=torch.float32, device=q.device)
    else:
        acc_ws = m_ws = l_ws = q
    k_new = k if has_new else q
    v_new = v if has_new else q
    grid = (m_blocks, batch * nheads, num_splits)
    _attn_fwd_kernel[grid](
        q, k_cache, v_cache, out, k_new, v_new,
        cache_seqlens, cache_seqlens, cache_seqlens,
        acc_ws, m_ws, l_ws,
        *_strides3(q), *_strides3(k_cache), *_strides3(v_cache), *_strides3(out), *_strides3(k), *_strides3(v),
        nheads, seqlen_q, max_seqlen_k, split_size, softmax_scale * LOG2E,
        MODE=MODE_KVCACHE, CAUSAL=bool(causal), HAS_NEW=has_new, FROM_NEW=has_new, SPLIT=split,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad(head_dim),
        IEEE=_dot_ieee(q.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if split:
        _combine_splits_kernel[(batch * nheads * seqlen_q,)](
            acc_ws, m_ws, l_ws, out,
            *_strides3(out),
            nheads, seqlen_q, batch * nheads * seqlen_q,
            NUM_SPLITS=num_splits, SPLITS_POW2=triton.next_power_of_2(num_splits), HEAD_DIM=head_dim,
            HEAD_DIM_PAD=head_dim_pad(head_dim), num_warps=1 if head_dim <= 64 else 2,
        )
    return out


def _rows_config(n_features: int) -> tuple[int, int]:
    block_f = _pow2_at_least(n_features, 1, 1024)
    if interpreter_enabled():
        return 128, block_f
    return max(1, 4096 // block_f), block_f


def gather_rows(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """x (N, F) contiguous, indices int64 (nnz,) -> (nnz, F)."""
    nnz, n_features = indices.shape[0], x.shape[1]
    out = torch.empty((nnz, n_features), dtype=x.dtype, device=x.device)  # (nnz, F)
    if out.numel() == 0:
        return out
    block_r, block_f = _rows_config(n_features)
    grid = (triton.cdiv(nnz, block_r), triton.cdiv(n_features, block_f))
    _gather_rows_kernel[grid](x, indices, out, nnz, n_features, BLOCK_R=block_r, BLOCK_F=block_f, num_warps=4)
    return out


def scatter_rows(x: torch.Tensor, indices: torch.Tensor, n: int) -> torch.Tensor:
    """x (nnz, F) contiguous, indices int64 (nnz,) -> (n, F) with row indices[r] = x[r] and zeros elsewhere."""
    nnz, n_features = x.shape
    out = torch.zeros((n, n_features), dtype=x.dtype, device=x.device)  # (N, F)
    if nnz == 0 or n_features == 0:
        return out
    block_r, block_f = _rows_config(n_features)
    grid = (triton.cdiv(nnz, block_r), triton.cdiv(n_features, block_f))
    _scatter_rows_kernel[grid](x, indices, out, nnz, n_features, BLOCK_R=block_r, BLOCK_F=block_f, num_warps=4)
    return out
