"""Float64 references, THE tolerance table, and a verbose closeness check; shared by tests, benchmarks and
``bark-kernels check``.

The rule (from flash-attn's tests): a kernel's maximum error against a float64 reference must be at most
``ratio`` times the maximum error of eager PyTorch in the same dtype, plus a tiny absolute floor. Never loosen an entry
to make a test pass: find the bug.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .backends import _common


@dataclass(frozen=True)
class Tolerance:
    ratio: float  # allowed multiple of the eager baseline's error
    floor: float  # absolute slack on top, for when the baseline is (nearly) exact


# The one tolerance table. Keys are the dtype the kernel computed in.
TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float64: Tolerance(ratio=2.0, floor=1e-12),
    torch.float32: Tolerance(ratio=2.0, floor=2e-6),
    torch.float16: Tolerance(ratio=2.0, floor=2e-4),
    torch.bfloat16: Tolerance(ratio=2.0, floor=2e-3),
}

# Model-level parity (whole Bark sub-models against transformers on the same weights, fp32): relative error of logits.
MODEL_RTOL: dict[torch.dtype, float] = {
    torch.float32: 1e-5,
}

# Greedy tokens across devices or backends (e.g. CUDA against the CPU reference, fp32): where two runs pick different
# tokens, the reference run's margin at that choice (its score for its own token minus its score for the other run's
# token, on the prefix both runs share) below TOKEN_TIE_RTOL x the largest |score| of that choice is a near-tie: two
# correct implementations may pick either token, so the difference is reported as a tie, not as a kernel bug. Measured
# on the tiny test models (CPU, fp32): logits stay within 5e-7 x max|logit| of a float64 forward and eager and sdpa
# differ by as much, while the smallest top-two gaps of a few hundred choices reach 8e-6 x max|logit|: ties that close
# do occur. 1e-5 (= MODEL_RTOL, the agreement asked of whole models) leaves 10x room over two runs' fp32 rounding.
TOKEN_TIE_RTOL: dict[torch.dtype, float] = {
    torch.float32: 1e-5,
}


def reference_attention(q, k, v, causal=False, softmax_scale=None):
    """Float64 attention. q (B, Sq, H, D), k/v (B, Sk, H, D) -> (B, Sq, H, D) float64. Bottom-right causal."""
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    q64, k64, v64 = (t.detach().to(torch.float64).transpose(1, 2) for t in (q, k, v))  # (B, H, S, D)
    scores = torch.matmul(q64, k64.transpose(-1, -2)) * scale  # (B, H, Sq, Sk)
    mask = _common.dense_mask(q.shape[1], k.shape[1], causal, q.device)
    return _masked_softmax_matmul(scores, mask, v64).transpose(1, 2)


def _masked_softmax_matmul(scores, mask, v64):
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if mask is not None:
        probs = probs.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0)
    return torch.matmul(probs, v64)


def reference_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=False, softmax_scale=None):
    """Float64 varlen attention, one sequence at a time. q (total_q, H, D) -> (total_q, H, D) float64."""
    out = torch.zeros(q.shape, dtype=torch.float64, device=q.device)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        qs, ks = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
        if cq[b + 1] > cq[b]:
            out[qs] = reference_attention(q[None, qs], k[None, ks], v[None, ks], causal, softmax_scale)[0]
    return out


def reference_attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, causal=True, softmax_scale=None):
    """Float64 result of attention_with_kvcache, computed row by row WITHOUT touching the caches.

    Returns (out (B, Sq, H, D) float64, expected_k_cache, expected_v_cache) where the expected caches are copies of
    the inputs with k/v appended (in the caches' dtype).
    """
    k_exp, v_exp = k_cache.clone(), v_cache.clone()
    lens = cache_seqlens.tolist()
    seqlen_q = q.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float64, device=q.device)
    for b, n in enumerate(lens):
        if k is not None:
            k_exp[b, n:n + seqlen_q] = k[b]
            v_exp[b, n:n + seqlen_q] = v[b]
            n = n + seqlen_q
        out[b] = reference_attention(q[b:b + 1], k_exp[b:b + 1, :n], v_exp[b:b + 1, :n], causal, softmax_scale)[0]
    return out, k_exp, v_exp


def max_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Maximum absolute difference, in float64 (NaN counts as infinite)."""
    if out.numel() == 0:
        return 0.0
    diff = (out.detach().to(torch.float64) - ref.to(torch.float64)).abs()
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)
    return float(diff.max())


def allowed_error(baseline: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> float:
    tol = TOLERANCES[dtype]
    return tol.ratio * max_error(baseline, ref) + tol.floor


def assert_close_to_reference(out: torch.Tensor, ref: torch.Tensor, baseline: torch.Tensor, dtype: torch.dtype,
                              name: str = "output") -> None:
    """Assert ``out``'s error against the float64 ``ref`` is within the table's allowance, given the eager
    ``baseline`` computed in the same ``dtype``; the message shows both errors and where the worst one is."""
    if out.shape != ref.shape:
        raise AssertionError(f"{name}: shape {tuple(out.shape)} != reference shape {tuple(ref.shape)}")
    err = max_error(out, ref)
    allowed = allowed_error(baseline, ref, dtype)
    if not err <= allowed:
        diff = (out.detach().to(torch.float64) - ref.to(torch.float64)).abs()
        diff = torch.nan_to_num(diff, nan=float("inf"))
        where = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
        raise AssertionError(
            f"{name} ({dtype}): max error {err:.3e} > allowed {allowed:.3e} "
            f"(= {TOLERANCES[dtype].ratio} x eager error {max_error(baseline, ref):.3e} + {TOLERANCES[dtype].floor:.0e});"
            f" worst at index {where}: got {float(out[where]):.6g}, reference {float(ref[where]):.6g}"
        )
