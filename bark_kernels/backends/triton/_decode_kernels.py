"""Triton kernels of the fused decode step: a whole GPT decode step of a fixed batch in five launches per layer
(plus the embeddings and the token head), for Bark's causal models (bark.session's ``fused`` mode).

Per layer (x is the residual stream (B, C) in the model dtype, updated in place):

1. ``_ln_linear_kernel`` with ``EPILOGUE=QKV``: LayerNorm 1 + the fused q/k/v projection + bias; q goes to a (B, C)
   buffer, k and v are appended into the layer's static cache at each row's length (``Seqlens``);
2. ``_decode_attention_kernel``: attention of each row's query over its cached keys 0..len (the new one included),
   split over the keys; with several splits the last program of a (row, head) to finish combines the partial results
   (an atomic counter per (row, head), reset by that program), so the combine costs no launch;
3. ``_linear_residual_kernel``: output projection + bias + residual add (x += ...);
4. ``_ln_linear_kernel`` with ``EPILOGUE=GELU``: LayerNorm 2 + MLP input projection + bias + exact (erf) GELU;
5. ``_linear_residual_kernel``: MLP output projection + bias + residual add.

Around the layers: ``_embed_kernel`` (token + position embeddings), ``_ln_linear_kernel`` with ``EPILOGUE=LOGITS``
(final LayerNorm + the lm-head rows of the head's vocabulary slice, float32 logits) and ``_pick_kernel`` (Bark's
logits processing, argmax or the sampling draw, the token record, the finished mask, the lengths + 1).

Conventions:
- Every program of an LN kernel recomputes its rows' statistics (two passes over the row, float32, as torch's
  LayerNorm); the normalized activations are rounded to the weight dtype before the matrix multiply, and each layer's
  output is rounded to the model dtype where torch rounds it (linear output, then the residual add), so fp16/bf16
  results stay within the tolerance table of an eager torch step.
- Matrix multiplies use ``tl.dot`` on a row block of at least 16 rows (``tl.dot``'s minimum): a small batch is padded
  with masked rows (zeros in, nothing out). Weights may have any strides (a CPU stores some transposed).
- PDL (programmatic dependent launch, sm_90+): with ``USE_PDL`` a kernel issues its first weight tile before
  ``gdc_wait`` (the wait for the previous kernel's output) and lets the next kernel start its own weight loads with
  ``gdc_launch_dependents`` once its main loop is done. Off under the interpreter (the branches are constexpr).
"""

from __future__ import annotations

import triton
import triton.language as tl

try:  # triton >= 3.3 (the GPU machine's 3.6 and this 3.9 have them)
    from triton.language.extra.cuda import gdc_launch_dependents as _gdc_launch_dependents
    from triton.language.extra.cuda import gdc_wait as _gdc_wait

    HAS_GDC = True
except ImportError:  # pragma: no cover - old triton: USE_PDL is always False, so these are never compiled
    HAS_GDC = False

    @triton.jit
    def _gdc_wait():
        pass

    @triton.jit
    def _gdc_launch_dependents():
        pass


EPILOGUE_LOGITS = 0  # float32 logits (rounded to the model dtype first, as torch's linear output)
EPILOGUE_GELU = 1  # exact GELU of the rounded linear output, stored in the model dtype
EPILOGUE_QKV = 2  # columns [0, C) -> q buffer, [C, 2C) -> k cache, [2C, 3C) -> v cache, at the row's length


@triton.jit
def _row_stats(X, offs_b, b_ok, stride_xb, n_in, eps, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """Mean and 1/std (float32, (BLOCK_B,)) of rows offs_b of X (B, n_in): two passes, as torch's LayerNorm."""
    total = tl.zeros((BLOCK_B,), dtype=tl.float32)
    for k0 in range(0, n_in, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(X + offs_b[:, None] * stride_xb + offs_k[None, :], mask=b_ok[:, None] & (offs_k[None, :] < n_in),
                    other=0.0).to(tl.float32)
        total += tl.sum(x, 1)
    mean = total / n_in
    sq = tl.zeros((BLOCK_B,), dtype=tl.float32)
    for k0 in range(0, n_in, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        ok = b_ok[:, None] & (offs_k[None, :] < n_in)
        x = tl.load(X + offs_b[:, None] * stride_xb + offs_k[None, :], mask=ok, other=0.0).to(tl.float32)
        d = tl.where(ok, x - mean[:, None], 0.0)
        sq += tl.sum(d * d, 1)
    rstd = 1.0 / tl.sqrt(sq / n_in + eps)
    return mean, rstd


@triton.jit
def _ln_linear_kernel(X, LnW, LnB, W, Bias, Out, K_cache, V_cache, Seqlens,
                      n_rows, n_in, n_out, eps,
                      stride_xb, stride_wn, stride_wk, stride_ob,
                      stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                      head_dim,
                      HAS_LN_BIAS: tl.constexpr, HAS_BIAS: tl.constexpr, EPILOGUE: tl.constexpr,
                      BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SINGLE_K: tl.constexpr,
                      IEEE: tl.constexpr, USE_PDL: tl.constexpr):
    """Grid (cdiv(n_out, BLOCK_N), cdiv(n_rows, BLOCK_B)): out = LayerNorm(X) @ W.T (+ Bias), then the epilogue.

    X (B, n_in) model dtype; LnW/LnB (n_in,); W (n_out, n_in) any strides; Bias (n_out,); Out: LOGITS (B, n_out)
    float32, GELU (B, n_out) model dtype, QKV (B, n_in) q; K_cache/V_cache (B, S_max, H, D) and Seqlens int32 (B,)
    for QKV (n_out = 3 * n_in, H * D = n_in)."""
    pid_n = tl.program_id(0)
    pid_b = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    n_ok = offs_n < n_out
    b_ok = offs_b < n_rows
    w_rows = offs_n.to(tl.int64) * stride_wn
    # the first weight tile does not depend on the previous kernel: issue it before waiting for that kernel
    offs_k = tl.arange(0, BLOCK_K)
    w = tl.load(W + w_rows[None, :] + offs_k[:, None] * stride_wk, mask=n_ok[None, :] & (offs_k[:, None] < n_in),
                other=0.0)  # (BLOCK_K, BLOCK_N)
    if USE_PDL:
        _gdc_wait()
    mean, rstd = _row_stats(X, offs_b, b_ok, stride_xb, n_in, eps, BLOCK_B, BLOCK_K)
    acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, n_in, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < n_in
        x = tl.load(X + offs_b[:, None] * stride_xb + offs_k[None, :], mask=b_ok[:, None] & k_ok[None, :],
                    other=0.0).to(tl.float32)
        g = tl.load(LnW + offs_k, mask=k_ok, other=0.0).to(tl.float32)
        xn = (x - mean[:, None]) * rstd[:, None] * g[None, :]
        if HAS_LN_BIAS:
            xn += tl.load(LnB + offs_k, mask=k_ok, other=0.0).to(tl.float32)[None, :]
        xn = tl.where(b_ok[:, None] & k_ok[None, :], xn, 0.0).to(w.dtype)  # LayerNorm's output in the model dtype
        if IEEE:
            acc = tl.dot(xn, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(xn, w, acc)
        if not SINGLE_K:  # the next weight tile (all masked after the last)
            next_k = offs_k + BLOCK_K
            w = tl.load(W + w_rows[None, :] + next_k[:, None] * stride_wk,
                        mask=n_ok[None, :] & (next_k[:, None] < n_in), other=0.0)
    if USE_PDL:
        _gdc_launch_dependents()
    if HAS_BIAS:
        acc += tl.load(Bias + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y = acc.to(w.dtype)  # the linear layer's output, rounded as torch's
    ok = b_ok[:, None] & n_ok[None, :]
    if EPILOGUE == 0:
        tl.store(Out + offs_b[:, None] * stride_ob + offs_n[None, :], y.to(tl.float32), mask=ok)
    elif EPILOGUE == 1:
        yf = y.to(tl.float32)
        gelu = 0.5 * yf * (1.0 + tl.math.erf(yf * 0.7071067811865476))
        tl.store(Out + offs_b[:, None] * stride_ob + offs_n[None, :], gelu.to(w.dtype), mask=ok)
    else:
        part = offs_n // n_in  # 0 q, 1 k, 2 v
        col = offs_n - part * n_in
        head = col // head_dim
        d = col - head * head_dim
        pos = tl.load(Seqlens + offs_b, mask=b_ok, other=0).to(tl.int64)  # (BLOCK_B,) where each row appends
        rows_b = offs_b.to(tl.int64)
        tl.store(Out + rows_b[:, None] * stride_ob + col[None, :], y, mask=ok & (part == 0)[None, :])
        k_ptrs = K_cache + rows_b[:, None] * stride_kb + pos[:, None] * stride_ks + (head * stride_kh + d)[None, :]
        tl.store(k_ptrs, y, mask=ok & (part == 1)[None, :])
        v_ptrs = V_cache + rows_b[:, None] * stride_vb + pos[:, None] * stride_vs + (head * stride_vh + d)[None, :]
        tl.store(v_ptrs, y, mask=ok & (part == 2)[None, :])


@triton.jit
def _linear_residual_kernel(A, W, Bias, X, n_rows, n_in, n_out,
                            stride_ab, stride_wn, stride_wk, stride_xb,
                            HAS_BIAS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr, SINGLE_K: tl.constexpr, IEEE: tl.constexpr, USE_PDL: tl.constexpr):
    """Grid (cdiv(n_out, BLOCK_N), cdiv(n_rows, BLOCK_B)): X += round(A @ W.T + Bias), in place (each program reads
    and writes only its own columns of X). A (B, n_in), W (n_out, n_in) any strides, X (B, n_out)."""
    pid_n = tl.program_id(0)
    pid_b = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    n_ok = offs_n < n_out
    b_ok = offs_b < n_rows
    w_rows = offs_n.to(tl.int64) * stride_wn
    offs_k = tl.arange(0, BLOCK_K)
    w = tl.load(W + w_rows[None, :] + offs_k[:, None] * stride_wk, mask=n_ok[None, :] & (offs_k[:, None] < n_in),
                other=0.0)  # (BLOCK_K, BLOCK_N), issued before the wait
    if USE_PDL:
        _gdc_wait()
    acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, n_in, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < n_in
        a = tl.load(A + offs_b[:, None] * stride_ab + offs_k[None, :], mask=b_ok[:, None] & k_ok[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(a.to(w.dtype), w, acc, input_precision="ieee")
        else:
            acc = tl.dot(a.to(w.dtype), w, acc)
        if not SINGLE_K:  # the next weight tile (all masked after the last)
            next_k = offs_k + BLOCK_K
            w = tl.load(W + w_rows[None, :] + next_k[:, None] * stride_wk,
                        mask=n_ok[None, :] & (next_k[:, None] < n_in), other=0.0)
    if USE_PDL:
        _gdc_launch_dependents()
    if HAS_BIAS:
        acc += tl.load(Bias + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y = acc.to(w.dtype).to(tl.float32)  # the linear output, rounded as torch's
    ok = b_ok[:, None] & n_ok[None, :]
    ptrs = X + offs_b[:, None] * stride_xb + offs_n[None, :]
    x = tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)
    tl.store(ptrs, (x + y).to(w.dtype), mask=ok)


@triton.jit
def _decode_attention_kernel(Q, K_cache, V_cache, Seqlens, Out, Acc_ws, M_ws, L_ws, Counter,
                             nheads, split_size, qk_scale,
                             stride_qb, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_ob,
                             HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, NUM_SPLITS: tl.constexpr,
                             SPLITS_POW2: tl.constexpr, BLOCK_N: tl.constexpr, USE_PDL: tl.constexpr):
    """Grid (B * H, NUM_SPLITS): one query per (row, head), Q (B, H * D), attending to cached keys 0..Seqlens[b]
    (inclusive: the new key was appended by the q/k/v kernel) of K_cache/V_cache (B, S_max, H, D); Out (B, H * D).

    Split s covers keys [s * split_size, (s + 1) * split_size). With one split the program writes Out itself; with
    several each writes its partial (m, l, acc) (log2 domain) to the workspaces (NUM_SPLITS, B * H[, D_PAD]), and the
    last to finish (``Counter`` (B * H,) int32, zero between launches) combines them and resets the counter."""
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = pid_bh // nheads
    h = pid_bh - b * nheads
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_ok = offs_d < HEAD_DIM
    if USE_PDL:
        _gdc_wait()
    length = tl.load(Seqlens + b) + 1
    q = tl.load(Q + b.to(tl.int64) * stride_qb + h * HEAD_DIM + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    k_base = K_cache + b.to(tl.int64) * stride_kb + h * stride_kh
    v_base = V_cache + b.to(tl.int64) * stride_vb + h * stride_vh
    m_i = tl.full((), float("-inf"), tl.float32)
    l_i = tl.full((), 0.0, tl.float32)
    acc = tl.zeros((HEAD_DIM_PAD,), dtype=tl.float32)
    start = pid_s * split_size
    end = tl.minimum(start + split_size, length)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < end
        rows = offs_n.to(tl.int64)
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + rows[:, None] * stride_ks + offs_d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        s = tl.sum(k * q[None, :], 1) * qk_scale  # (BLOCK_N,), log2 domain
        s = tl.where(n_ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))
        p = tl.math.exp2(s - m_new)
        alpha = tl.math.exp2(m_i - m_new)
        v = tl.load(v_base + rows[:, None] * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * v, 0)
        l_i = l_i * alpha + tl.sum(p, 0)
        m_i = m_new
    if USE_PDL:
        _gdc_launch_dependents()
    out_ptrs = Out + b.to(tl.int64) * stride_ob + h * HEAD_DIM + offs_d
    if NUM_SPLITS == 1:
        tl.store(out_ptrs, (acc / l_i).to(Out.dtype.element_ty), mask=d_ok)
    else:
        rows_total = tl.num_programs(0)
        slot = pid_s * rows_total + pid_bh
        tl.store(Acc_ws + slot.to(tl.int64) * HEAD_DIM_PAD + offs_d, acc)
        tl.store(M_ws + slot, m_i)
        tl.store(L_ws + slot, l_i)
        # release: the partials above are visible to whoever sees this increment; the last one combines
        arrived = tl.atomic_add(Counter + pid_bh, 1, sem="acq_rel")
        if arrived == NUM_SPLITS - 1:
            offs_s = tl.arange(0, SPLITS_POW2)
            s_ok = offs_s < NUM_SPLITS
            slots = offs_s * rows_total + pid_bh
            m_s = tl.load(M_ws + slots, mask=s_ok, other=float("-inf"), cache_modifier=".cg")
            l_s = tl.load(L_ws + slots, mask=s_ok, other=0.0, cache_modifier=".cg")
            acc_s = tl.load(Acc_ws + slots.to(tl.int64)[:, None] * HEAD_DIM_PAD + offs_d[None, :],
                            mask=s_ok[:, None], other=0.0, cache_modifier=".cg")
            m_all = tl.max(m_s, 0)
            scale = tl.where(l_s > 0, tl.math.exp2(m_s - m_all), 0.0)  # empty splits (m = -inf) weigh 0
            total = tl.sum(l_s * scale, 0)
            out = tl.sum(acc_s * scale[:, None], 0) / total
            tl.store(out_ptrs, out.to(Out.dtype.element_ty), mask=d_ok)
            tl.atomic_xchg(Counter + pid_bh, 0)


@triton.jit
def _embed_kernel(Tokens, Seqlens, Wte, Wpe, X, n_embd, stride_te, stride_pe, stride_xb,
                  BLOCK_C: tl.constexpr, USE_PDL: tl.constexpr):
    """Grid (B,): X[b] = Wte[Tokens[b]] + Wpe[Seqlens[b]] (the model dtype's sum, as torch's)."""
    b = tl.program_id(0)
    offs = tl.arange(0, BLOCK_C)
    ok = offs < n_embd
    if USE_PDL:
        _gdc_wait()
    tok = tl.load(Tokens + b).to(tl.int64)
    pos = tl.load(Seqlens + b).to(tl.int64)
    e = tl.load(Wte + tok * stride_te + offs, mask=ok, other=0.0)
    p = tl.load(Wpe + pos * stride_pe + offs, mask=ok, other=0.0)
    if USE_PDL:
        _gdc_launch_dependents()
    tl.store(X + b.to(tl.int64) * stride_xb + offs, e + p, mask=ok)


@triton.jit
def _float_key(x):
    """float32 -> int32 whose signed order is the float order (-inf lowest; no NaN expected)."""
    bits = x.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _pick_kernel(Logits, ExpQ, Suppressed, Finished, Record, Col, Tokens, Seqlens, Counter,
                 n_rows, n, lo, eos, pad, min_new_tokens, min_eos_p, temperature, top_k, top_p,
                 stride_lb, stride_qb, stride_rb,
                 SEMANTIC: tl.constexpr, HAS_SUPPRESS: tl.constexpr, HAS_MIN_NEW: tl.constexpr,
                 HAS_MIN_EOS_P: tl.constexpr, DO_SAMPLE: tl.constexpr, HAS_TEMPERATURE: tl.constexpr,
                 HAS_TOP_K: tl.constexpr, HAS_TOP_P: tl.constexpr, BLOCK_V: tl.constexpr, USE_PDL: tl.constexpr):
    """Grid (B,): one row's next token from its logits slice, as Bark's heads with transformers' recipe pick it.

    Logits (B, n) float32 are the scores of token ids lo..lo+n-1 (every other id is -inf). In order: suppressed ids
    (Suppressed (n,) uint8) -> -inf; SEMANTIC: EOS (slice index ``eos``) -> -inf while Col < min_new_tokens, and
    only EOS is left when its probability exceeds min_eos_p (transformers' ``>``, on the raw scores). Greedy: the
    argmax (first of equal maxima). Sampling: / temperature, top-k (keep >= the k-th largest, found by bisection over
    the scores' order keys), top-p (drop the smallest probabilities whose sum is <= 1 - top_p, found by bisection over
    the probabilities' bits; the largest always stays), then the exponential race argmax(probs / q) with ExpQ (B, V)
    (q ~ Exp(1), the draw torch.multinomial makes), read at columns lo..lo+n-1.

    Then SEMANTIC: finished rows give ``pad``, Finished[b] |= token == EOS. Record[b, Col] = token, Tokens[b] = token,
    Seqlens[b] += 1; the last row program to finish (``Counter`` (1,) int32, zero between launches) does Col += 1."""
    b = tl.program_id(0)
    offs = tl.arange(0, BLOCK_V)
    ok = offs < n
    if USE_PDL:
        _gdc_wait()
    s = tl.load(Logits + b.to(tl.int64) * stride_lb + offs, mask=ok, other=float("-inf"))
    col = tl.load(Col)
    if HAS_SUPPRESS:
        sup = tl.load(Suppressed + offs, mask=ok, other=0)
        s = tl.where(sup != 0, float("-inf"), s)
    if HAS_MIN_NEW:
        s = tl.where((offs == eos) & (col < min_new_tokens), float("-inf"), s)
    if HAS_MIN_EOS_P:
        m = tl.max(s, 0)
        e = tl.math.exp(s - m)
        p_eos = tl.sum(tl.where(offs == eos, e, 0.0), 0) / tl.sum(e, 0)
        s = tl.where(((p_eos + tl.zeros_like(s)) > min_eos_p) & (offs != eos), float("-inf"), s)
    if DO_SAMPLE:
        if HAS_TEMPERATURE:
            s = s / temperature
        if HAS_TOP_K:
            key = _float_key(s)
            key = tl.where(ok, key, -2147483648)
            lo_k = tl.full((), -2147483648, tl.int64)  # count(key >= lo_k) >= top_k: always
            hi_k = tl.full((), 2147483648, tl.int64)  # never
            for _ in range(33):
                mid = lo_k + (hi_k - lo_k) // 2
                cnt = tl.sum(tl.where(ok & (key.to(tl.int64) >= mid), 1, 0), 0)
                feasible = cnt >= top_k
                lo_k = tl.where(feasible, mid, lo_k)
                hi_k = tl.where(feasible, hi_k, mid)
            s = tl.where(key.to(tl.int64) < lo_k, float("-inf"), s)  # lo_k: the k-th largest score's key
        if HAS_TOP_P:
            m = tl.max(s, 0)
            e = tl.math.exp(s - m)
            p = e / tl.sum(e, 0)
            bits = p.to(tl.int32, bitcast=True)  # p >= 0: the bits order as the values
            lo_p = tl.full((), -1, tl.int32)  # sum(p where bits <= lo_p) <= 1 - top_p: always
            hi_p = tl.full((), 0x3F800001, tl.int32)  # above 1.0
            for _ in range(31):
                mid = lo_p + (hi_p - lo_p) // 2
                below = tl.sum(tl.where(ok & (bits <= mid), p, 0.0), 0)
                feasible = below <= 1.0 - top_p
                lo_p = tl.where(feasible, mid, lo_p)
                hi_p = tl.where(feasible, hi_p, mid)
            best = tl.argmax(s, 0)
            s = tl.where((bits <= lo_p) & (offs != best), float("-inf"), s)
        m = tl.max(s, 0)
        e = tl.math.exp(s - m)
        probs = e / tl.sum(e, 0)
        q = tl.load(ExpQ + b.to(tl.int64) * stride_qb + lo + offs, mask=ok, other=1.0)
        idx = tl.argmax(tl.where(ok, probs / q, -1.0), 0)
    else:
        idx = tl.argmax(s, 0)
    token = (idx + lo).to(tl.int64)
    if SEMANTIC:
        done = tl.load(Finished + b)
        token = tl.where(done != 0, pad, token)
        tl.store(Finished + b, (done != 0) | (token == eos + lo))
    tl.store(Record + b.to(tl.int64) * stride_rb + col, token)
    tl.store(Tokens + b, token)
    tl.store(Seqlens + b, tl.load(Seqlens + b) + 1)
    arrived = tl.atomic_add(Counter, 1, sem="acq_rel")
    if arrived == n_rows - 1:
        tl.store(Col, col + 1)
        tl.atomic_xchg(Counter, 0)
