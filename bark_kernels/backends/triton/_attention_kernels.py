"""Triton kernels for attention: one flash-attention forward kernel serving the dense, varlen and KV-cache layouts
(with an optional split over the keys, "split-K"), and the kernel that combines the split partial results.

Conventions inside the kernels:
- Scores live in the log2 domain: ``qk_scale = softmax_scale * log2(e)`` is folded into one multiply and the softmax
  uses ``exp2``. The split-K partial maxima are in the same domain, so the combine kernel uses ``exp2`` too.
- Accumulation is float32 (``tl.dot`` accumulates in fp32; fp32 inputs use ``input_precision="ieee"`` so no TF32).
- Causal masks are aligned bottom-right: query i of a row with ``len_q`` queries and ``len_k`` keys sees key
  j <= i + len_k - len_q. A query that sees no key keeps ``l == 0`` and is written as 0.
- Key blocks that every query of the M block sees completely are processed without any mask ("full" loop); only the
  blocks crossing the causal diagonal or the end of the keys are masked; blocks no query sees are never visited.
- Any head_dim from 1 to 256: the head block is ``HEAD_DIM_PAD`` wide (the next power of two, at least 16, as
  ``tl.dot`` needs), and loads and stores mask the lanes ``d >= HEAD_DIM`` (zeros in, nothing out). When HEAD_DIM is
  already a power of two >= 16 (16, 32, 64, 128, 256: ``EVEN_D``) no head mask is built at all: the code the compiler
  sees for 64 and 128 is the same as before padding existed.
"""

from __future__ import annotations

import triton
import triton.language as tl

MODE_DENSE = 0  # q (B, Sq, H, D), k/v (B, Sk, H, D)
MODE_VARLEN = 1  # packed q (total_q, H, D), k/v (total_k, H, D), per-sequence offsets in cu_seqlens
MODE_KVCACHE = 2  # q (B, Sq, H, D), caches (B, S_max, H, D), per-row lengths in cache_seqlens (+ fused append)


@triton.jit
def _load_kv_block(K, K_new, k_base, knew_base, offs_n, offs_d, stride_ks, stride_kns, cache_len,
                   load_mask, d_ok, TRANSPOSED: tl.constexpr, FROM_NEW: tl.constexpr, MASKED: tl.constexpr,
                   EVEN_D: tl.constexpr):
    """Load a (BLOCK_N, D_PAD) block of keys or values (or its (D_PAD, BLOCK_N) transpose); head lanes past the
    head_dim (``d_ok`` False, only when not EVEN_D) read as 0.

    With FROM_NEW (fused append), positions >= cache_len are read from the new rows instead of the cache: the cache
    rows are being written by another program of the same launch, so reading them back would race.
    """
    if FROM_NEW:
        is_new = offs_n >= cache_len
        row_cache = offs_n.to(tl.int64) * stride_ks
        row_new = (offs_n - cache_len).to(tl.int64) * stride_kns
        if TRANSPOSED:
            ptrs = tl.where(is_new[None, :], K_new + knew_base + row_new[None, :] + offs_d[:, None],
                            K + k_base + row_cache[None, :] + offs_d[:, None])
        else:
            ptrs = tl.where(is_new[:, None], K_new + knew_base + row_new[:, None] + offs_d[None, :],
                            K + k_base + row_cache[:, None] + offs_d[None, :])
    else:
        row_cache = offs_n.to(tl.int64) * stride_ks
        if TRANSPOSED:
            ptrs = K + k_base + row_cache[None, :] + offs_d[:, None]
        else:
            ptrs = K + k_base + row_cache[:, None] + offs_d[None, :]
    # one return at the end: the Triton compiler still type-checks the code after a `return` inside a constexpr `if`
    # (the interpreter does not), so an early return here failed to compile on a GPU whenever HEAD_DIM != BLOCK_N
    if MASKED:
        if TRANSPOSED:
            mask = load_mask[None, :]
            if not EVEN_D:
                mask = mask & d_ok[:, None]
        else:
            mask = load_mask[:, None]
            if not EVEN_D:
                mask = mask & d_ok[None, :]
        block = tl.load(ptrs, mask=mask, other=0.0)
    elif EVEN_D:
        block = tl.load(ptrs)
    else:
        if TRANSPOSED:
            block = tl.load(ptrs, mask=d_ok[:, None], other=0.0)
        else:
            block = tl.load(ptrs, mask=d_ok[None, :], other=0.0)
    return block


@triton.jit
def _attn_inner(acc, l_i, m_i, q, K, V, K_new, V_new, k_base, v_base, knew_base, vnew_base,
                stride_ks, stride_vs, stride_kns, stride_vns, cache_len, offs_m, offs_d, d_ok,
                start, end, len_q, len_k, qk_scale,
                MASKED: tl.constexpr, CAUSAL: tl.constexpr, FROM_NEW: tl.constexpr,
                BLOCK_N: tl.constexpr, IEEE: tl.constexpr, EVEN_D: tl.constexpr):
    """Online-softmax update of (acc, l_i, m_i) over key blocks [start, end), start a multiple of BLOCK_N."""
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        valid_n = offs_n < len_k
        kt = _load_kv_block(K, K_new, k_base, knew_base, offs_n, offs_d, stride_ks, stride_kns, cache_len, valid_n,
                            d_ok, True, FROM_NEW, MASKED, EVEN_D)  # (D_PAD, BLOCK_N)
        if IEEE:
            qk = tl.dot(q, kt, input_precision="ieee")
        else:
            qk = tl.dot(q, kt)
        qk = qk * qk_scale  # (BLOCK_M, BLOCK_N), log2 domain
        if MASKED:
            visible = valid_n[None, :]
            if CAUSAL:
                visible = visible & (offs_n[None, :] <= offs_m[:, None] + (len_k - len_q))
            qk = tl.where(visible, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            # a row that has seen no key yet keeps m = -inf: subtract 0 instead so exp2 gives 0, not NaN
            m_base = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_base = m_new
        p = tl.math.exp2(qk - m_base[:, None])
        alpha = tl.math.exp2(m_i - m_base)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = _load_kv_block(V, V_new, v_base, vnew_base, offs_n, offs_d, stride_vs, stride_vns, cache_len, valid_n,
                           d_ok, False, FROM_NEW, MASKED, EVEN_D)  # (BLOCK_N, D_PAD)
        if IEEE:
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision="ieee")
        else:
            acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _key_range(start_m, len_q, len_k, pid_s, split_size,
               CAUSAL: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key positions of the program (M block starting at query start_m, split pid_s): (lo, full_end, hi) with
    lo <= full_end <= hi. Every row of the M block sees every key of [lo, full_end) (a whole number of BLOCK_N
    blocks, visited without masks); [full_end, hi) holds the blocks crossing the causal diagonal or the end of the
    keys (masked). An M block with no query row (varlen: past the end of its sequence) visits no key at all."""
    if CAUSAL:
        hi = tl.minimum(len_k, start_m + BLOCK_M + (len_k - len_q))  # keys the last row of the block sees
        full_hi = tl.minimum(len_k, start_m + 1 + (len_k - len_q))  # keys the first row sees
    else:
        hi = len_k
        full_hi = len_k
    has_rows = start_m < len_q
    hi = tl.where(has_rows, hi, 0)
    full_hi = tl.where(has_rows, full_hi, 0)
    if SPLIT:
        lo = pid_s * split_size
        hi = tl.minimum(hi, lo + split_size)
        full_hi = tl.minimum(full_hi, lo + split_size)
    else:
        lo = pid_s * 0  # one split per launch (pid_s == 0); a tensor, as the other bounds
    hi = tl.maximum(hi, lo)
    full_end = lo + (tl.maximum(full_hi - lo, 0) // BLOCK_N) * BLOCK_N
    return lo, full_end, hi


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, Out, K_new, V_new,
    cu_seqlens_q, cu_seqlens_k, cache_seqlens,
    Acc_ws, M_ws, L_ws,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    stride_knb, stride_kns, stride_knh,
    stride_vnb, stride_vns, stride_vnh,
    nheads, seqlen_q, seqlen_k, split_size, qk_scale,
    MODE: tl.constexpr, CAUSAL: tl.constexpr, HAS_NEW: tl.constexpr, FROM_NEW: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    IEEE: tl.constexpr,
):
    """Grid (cdiv(max_seqlen_q, BLOCK_M), batch * nheads, num_splits).

    HEAD_DIM is the head size of q/k/v/out, HEAD_DIM_PAD the width of the head block (a power of two >= 16, >= HEAD_DIM)
    and of the split workspace rows.

    MODE_DENSE: seqlen_q/seqlen_k are the lengths. MODE_VARLEN: lengths from cu_seqlens_q/k (batch strides unused).
    MODE_KVCACHE: K/V are the caches (B, S_max, H, D), seqlen_k is S_max, row b attends to cache_seqlens[b] (+ seqlen_q
    when HAS_NEW) keys; with HAS_NEW the rows K_new/V_new (B, Sq, H, D) are written into the caches at
    cache_seqlens[b] + i (only inside the cache) by the split-0 program of their M block; FROM_NEW (= HAS_NEW in
    MODE_KVCACHE) makes every program read those key positions from K_new/V_new instead of the cache.
    SPLIT: this program covers keys [pid_s * split_size, (pid_s + 1) * split_size) and writes unnormalised partial
    results (acc, m, l) to the float32 workspaces, row index (pid_s * batch * nheads + pid_bh) * seqlen_q + i.
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = pid_bh // nheads
    h = pid_bh % nheads
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)

    cache_len = 0
    if MODE == 1:
        q_start = tl.load(cu_seqlens_q + b)
        len_q = tl.load(cu_seqlens_q + b + 1) - q_start
        k_start = tl.load(cu_seqlens_k + b)
        len_k = tl.load(cu_seqlens_k + b + 1) - k_start
        q_base = q_start.to(tl.int64) * stride_qs + h64 * stride_qh
        o_base = q_start.to(tl.int64) * stride_os + h64 * stride_oh
        k_base = k_start.to(tl.int64) * stride_ks + h64 * stride_kh
        v_base = k_start.to(tl.int64) * stride_vs + h64 * stride_vh
    else:
        len_q = seqlen_q
        q_base = b64 * stride_qb + h64 * stride_qh
        o_base = b64 * stride_ob + h64 * stride_oh
        k_base = b64 * stride_kb + h64 * stride_kh
        v_base = b64 * stride_vb + h64 * stride_vh
        if MODE == 2:
            # clamp to the cache so that even invalid lengths (unchecked input) never read or write outside it
            cache_len = tl.minimum(tl.maximum(tl.load(cache_seqlens + b), 0), seqlen_k)
            if HAS_NEW:
                len_k = cache_len + seqlen_q
            else:
                len_k = cache_len
        else:
            len_k = seqlen_k
    knew_base = b64 * stride_knb + h64 * stride_knh
    vnew_base = b64 * stride_vnb + h64 * stride_vnh

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    EVEN_D: tl.constexpr = HEAD_DIM == HEAD_DIM_PAD
    d_ok = offs_d < HEAD_DIM  # used only when not EVEN_D
    row_ok = offs_m < len_q
    if EVEN_D:
        row_d_ok = row_ok[:, None]
    else:
        row_d_ok = row_ok[:, None] & d_ok[None, :]

    if MODE == 2:
        if HAS_NEW:
            if pid_s == 0:
                # fused append: new rows of this M block go to cache rows cache_len + i (never past the cache end)
                pos = cache_len + offs_m
                if EVEN_D:
                    write_ok = (row_ok & (pos < seqlen_k))[:, None]
                else:
                    write_ok = (row_ok & (pos < seqlen_k))[:, None] & d_ok[None, :]
                rows_new = offs_m.to(tl.int64)
                kn = tl.load(K_new + knew_base + rows_new[:, None] * stride_kns + offs_d[None, :],
                             mask=row_d_ok, other=0.0)
                vn = tl.load(V_new + vnew_base + rows_new[:, None] * stride_vns + offs_d[None, :],
                             mask=row_d_ok, other=0.0)
                tl.store(K + k_base + pos.to(tl.int64)[:, None] * stride_ks + offs_d[None, :], kn, mask=write_ok)
                tl.store(V + v_base + pos.to(tl.int64)[:, None] * stride_vs + offs_d[None, :], vn, mask=write_ok)

    q = tl.load(Q + q_base + offs_m.to(tl.int64)[:, None] * stride_qs + offs_d[None, :], mask=row_d_ok,
                other=0.0)

    lo, full_end, hi = _key_range(start_m, len_q, len_k, pid_s, split_size, CAUSAL, SPLIT, BLOCK_M, BLOCK_N)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    acc, l_i, m_i = _attn_inner(acc, l_i, m_i, q, K, V, K_new, V_new, k_base, v_base, knew_base, vnew_base,
                                stride_ks, stride_vs, stride_kns, stride_vns, cache_len, offs_m, offs_d, d_ok,
                                lo, full_end, len_q, len_k, qk_scale,
                                False, CAUSAL, FROM_NEW, BLOCK_N, IEEE, EVEN_D)
    acc, l_i, m_i = _attn_inner(acc, l_i, m_i, q, K, V, K_new, V_new, k_base, v_base, knew_base, vnew_base,
                                stride_ks, stride_vs, stride_kns, stride_vns, cache_len, offs_m, offs_d, d_ok,
                                full_end, hi, len_q, len_k, qk_scale,
                                True, CAUSAL, FROM_NEW, BLOCK_N, IEEE, EVEN_D)

    if SPLIT:
        rows = (pid_s * tl.num_programs(1) + pid_bh).to(tl.int64) * seqlen_q + offs_m
        tl.store(M_ws + rows, m_i, mask=row_ok)
        tl.store(L_ws + rows, l_i, mask=row_ok)
        # workspace rows are HEAD_DIM_PAD wide: the padded lanes hold zeros and need no mask
        tl.store(Acc_ws + rows[:, None] * HEAD_DIM_PAD + offs_d[None, :], acc, mask=row_ok[:, None])
    else:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # rows that saw no key: acc == 0 -> 0
        tl.store(Out + o_base + offs_m.to(tl.int64)[:, None] * stride_os + offs_d[None, :],
                 out.to(Out.dtype.element_ty), mask=row_d_ok)


@triton.jit
def _combine_splits_kernel(
    Acc_ws, M_ws, L_ws, Out,
    stride_ob, stride_os, stride_oh,
    nheads, seqlen_q, rows_per_split,
    NUM_SPLITS: tl.constexpr, SPLITS_POW2: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
):
    """Grid (batch * nheads * seqlen_q,): merge the NUM_SPLITS partial (acc, m, l) of one query row into Out.
    Workspace rows are HEAD_DIM_PAD wide; Out gets the first HEAD_DIM lanes."""
    row = tl.program_id(0)
    offs_s = tl.arange(0, SPLITS_POW2)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    split_ok = offs_s < NUM_SPLITS
    ws_rows = offs_s.to(tl.int64) * rows_per_split + row
    m = tl.load(M_ws + ws_rows, mask=split_ok, other=float("-inf"))
    l_s = tl.load(L_ws + ws_rows, mask=split_ok, other=0.0)
    acc = tl.load(Acc_ws + ws_rows[:, None] * HEAD_DIM_PAD + offs_d[None, :], mask=split_ok[:, None], other=0.0)
    m_max = tl.max(m, 0)
    m_base = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.math.exp2(m - m_base)  # splits that saw no key have m = -inf: weight 0
    l_total = tl.sum(w * l_s, 0)
    out = tl.sum(w[:, None] * acc, 0) / tl.where(l_total == 0.0, 1.0, l_total)
    bh = row // seqlen_q
    i = row % seqlen_q
    b = (bh // nheads).to(tl.int64)
    h = (bh % nheads).to(tl.int64)
    out_ptrs = Out + b * stride_ob + i.to(tl.int64) * stride_os + h * stride_oh + offs_d
    if HEAD_DIM == HEAD_DIM_PAD:
        tl.store(out_ptrs, out.to(Out.dtype.element_ty))
    else:
        tl.store(out_ptrs, out.to(Out.dtype.element_ty), mask=offs_d < HEAD_DIM)
