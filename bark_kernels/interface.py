"""The public attention API: validate the inputs, pick a backend, call its op.

Layout is (batch, seqlen, nheads, headdim) everywhere, as in flash-attn. Causal masks are aligned bottom-right: query
i of a row with Lq queries and Lk keys sees key j <= i + Lk - Lq; a query that sees no key returns 0.

Checks that need the values of device tensors (cache overflow, cu_seqlens monotonicity, mask values) synchronise with
the device. They run by default and are skipped during CUDA-graph capture and torch.compile tracing, and when the
caller passes ``check_bounds=False`` (a decoder that tracks its lengths on the host, like ``bark``'s, does this so a
decode step never syncs). The kernels themselves never write outside the cache.
"""

from __future__ import annotations

import math
import numbers

import torch

from . import registry

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_HEAD_DIM = registry.MAX_HEAD_DIM


# ----------------------------------------------------------------------------------------------------------------------
# validation helpers


def _may_sync() -> bool:
    """False while tracing for torch.compile or capturing a CUDA graph: no value-dependent checks then."""
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling():
        return False
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return False
    return True


def _tensor(name: str, t, ndim: int, layout: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor {layout}, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor {layout}, got shape {tuple(t.shape)}")
    return t


def _float_like(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(f"{name}: expected dtype {ref.dtype} (the dtype of {ref_name}), got {t.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name}: expected device {ref.device} (the device of {ref_name}), got {t.device}")


def _check_qkv_dtype(name: str, t: torch.Tensor) -> None:
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name}: expected one of {[str(d) for d in SUPPORTED_DTYPES]}, got {t.dtype}")


def _check_head_dim(head_dim: int) -> None:
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"q: expected head_dim between 1 and {MAX_HEAD_DIM}, got {head_dim}")


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """Kernels take any strides but need the last one to be 1; copy only when it is not (and the dim is > 1)."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _scale(softmax_scale, head_dim: int) -> float:
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real):
        raise TypeError(f"softmax_scale: expected a float or None, got {type(softmax_scale).__name__}")
    value = float(softmax_scale)
    if not math.isfinite(value):
        raise ValueError(f"softmax_scale: expected a finite number, got {value}")
    return value


def _flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")
    return value


def _int_arg(name: str, value, minimum: int = 0) -> int:
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
    return int(value)


def _index_vector(name: str, t, length: int, device: torch.device, what: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected an int32 torch.Tensor of shape ({length},) ({what}), got {type(t).__name__}")
    if t.dtype != torch.int32:
        raise TypeError(f"{name}: expected dtype torch.int32 ({what}), got {t.dtype}")
    if t.dim() != 1 or t.shape[0] != length:
        raise ValueError(f"{name}: expected shape ({length},) ({what}), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name}: expected device {device} (the device of q), got {t.device}")
    return t if t.is_contiguous() else t.contiguous()


# ----------------------------------------------------------------------------------------------------------------------
# attention


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              softmax_scale: float | None = None, dropout_p: float = 0.0, return_attn_weights: bool = False,
              backend: str | None = None):
    """Scaled dot-product attention over dense batches.

    Args:
        q: (batch, seqlen_q, nheads, headdim).
        k, v: (batch, seqlen_k, nheads, headdim). q, k, v may be strided views (for example of one fused projection,
            ``qkv.view(B, T, 3, H, D).unbind(2)``); only the last stride must be 1 or it is copied.
        causal: bottom-right aligned causal mask: query i sees keys j <= i + seqlen_k - seqlen_q. Rows that see no
            key return 0.
        softmax_scale: defaults to 1 / sqrt(headdim).
        dropout_p: dropout on the attention probabilities (eager, sdpa and flash_attn only).
        return_attn_weights: also return the probabilities (batch, nheads, seqlen_q, seqlen_k) (eager only).
        backend: a name from ``available_backends()``; default: ``BARK_KERNELS_BACKEND``, then automatic.

    Returns:
        out (batch, seqlen_q, nheads, headdim) in q's dtype, or ``(out, weights)``.
    """
    layout = "(batch, seqlen, nheads, headdim)"
    _tensor("q", q, 4, layout)
    _tensor("k", k, 4, layout)
    _tensor("v", v, 4, layout)
    _check_qkv_dtype("q", q)
    _float_like("k", k, "q", q)
    _float_like("v", v, "q", q)
    batch, _, nheads, head_dim = q.shape
    if k.shape[0] != batch or v.shape[0] != batch:
        raise ValueError(f"k, v: expected batch {batch} (the batch of q), got {k.shape[0]} and {v.shape[0]}")
    if k.shape[2] != nheads or v.shape[2] != nheads:
        raise ValueError(f"k, v: expected nheads {nheads} (the nheads of q), got {k.shape[2]} and {v.shape[2]}")
    if k.shape[3] != head_dim or v.shape[3] != head_dim:
        raise ValueError(f"k, v: expected headdim {head_dim} (the headdim of q), got {k.shape[3]} and {v.shape[3]}")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"v: expected seqlen {k.shape[1]} (the seqlen of k), got {v.shape[1]}")
    _check_head_dim(head_dim)
    causal = _flag("causal", causal)
    return_attn_weights = _flag("return_attn_weights", return_attn_weights)
    scale = _scale(softmax_scale, head_dim)
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p: expected a float in [0, 1), got {dropout_p!r}")
    _, op = registry.select("attention", q.device, q.dtype, head_dim, backend,
                            dropout=dropout_p > 0.0, attn_weights=return_attn_weights)
    q, k, v = _unit_last_stride(q), _unit_last_stride(k), _unit_last_stride(v)
    extra = {}
    if dropout_p > 0.0:
        extra["dropout_p"] = float(dropout_p)
    if return_attn_weights:
        extra["return_attn_weights"] = True
    return op(q, k, v, causal, scale, **extra)


def _check_cu_seqlens(name: str, cu: torch.Tensor, total: int, total_name: str, max_seqlen: int,
                      max_name: str) -> None:
    """Value checks of one cu_seqlens vector (syncs with the device)."""
    values = cu.tolist()
    if values[0] != 0:
        raise ValueError(f"{name}: expected first entry 0, got {values[0]}")
    steps = [b - a for a, b in zip(values[:-1], values[1:], strict=True)]
    if any(s < 0 for s in steps):
        raise ValueError(f"{name}: expected a non-decreasing sequence, got {values}")
    if values[-1] != total:
        raise ValueError(f"{name}: expected last entry {total} (the packed length of {total_name}), got {values[-1]}")
    if steps and max(steps) > max_seqlen:
        raise ValueError(f"{max_name}: expected at least the longest sequence {max(steps)}, got {max_seqlen}")


def attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, *, causal: bool = False,
                     softmax_scale: float | None = None, backend: str | None = None,
                     check_bounds: bool = True) -> torch.Tensor:
    """Attention over a ragged batch packed without padding.

    Args:
        q: (total_q, nheads, headdim), the queries of every sequence one after the other.
        k, v: (total_k, nheads, headdim).
        cu_seqlens_q, cu_seqlens_k: int32 (batch + 1,), cumulative lengths starting at 0; sequence b owns packed rows
            cu_seqlens[b] .. cu_seqlens[b+1]-1.
        max_seqlen_q, max_seqlen_k: host ints, at least the longest sequence.
        causal: per sequence, aligned bottom-right with that sequence's own lengths.
        check_bounds: verify the cu_seqlens values (syncs with the device); skipped under capture/compile.

    Returns:
        out (total_q, nheads, headdim).
    """
    layout = "(total, nheads, headdim)"
    _tensor("q", q, 3, layout)
    _tensor("k", k, 3, layout)
    _tensor("v", v, 3, layout)
    _check_qkv_dtype("q", q)
    _float_like("k", k, "q", q)
    _float_like("v", v, "q", q)
    _, nheads, head_dim = q.shape
    if k.shape[1] != nheads or v.shape[1] != nheads:
        raise ValueError(f"k, v: expected nheads {nheads} (the nheads of q), got {k.shape[1]} and {v.shape[1]}")
    if k.shape[2] != head_dim or v.shape[2] != head_dim:
        raise ValueError(f"k, v: expected headdim {head_dim} (the headdim of q), got {k.shape[2]} and {v.shape[2]}")
    if k.shape[0] != v.shape[0]:
        raise ValueError(f"v: expected total {k.shape[0]} (the packed length of k), got {v.shape[0]}")
    _check_head_dim(head_dim)
    if not isinstance(cu_seqlens_q, torch.Tensor) or cu_seqlens_q.dim() != 1 or cu_seqlens_q.shape[0] < 2:
        got = tuple(cu_seqlens_q.shape) if isinstance(cu_seqlens_q, torch.Tensor) else type(cu_seqlens_q).__name__
        raise ValueError(f"cu_seqlens_q: expected an int32 tensor of shape (batch + 1,) with batch >= 1, got {got}")
    nseq = cu_seqlens_q.shape[0]
    cu_seqlens_q = _index_vector("cu_seqlens_q", cu_seqlens_q, nseq, q.device, "cumulative query lengths")
    cu_seqlens_k = _index_vector("cu_seqlens_k", cu_seqlens_k, nseq, q.device,
                                 "cumulative key lengths, as many as cu_seqlens_q")
    max_seqlen_q = _int_arg("max_seqlen_q", max_seqlen_q)
    max_seqlen_k = _int_arg("max_seqlen_k", max_seqlen_k)
    causal = _flag("causal", causal)
    scale = _scale(softmax_scale, head_dim)
    if check_bounds and _may_sync():
        _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], "q", max_seqlen_q, "max_seqlen_q")
        _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], "k", max_seqlen_k, "max_seqlen_k")
    _, op = registry.select("attention_varlen", q.device, q.dtype, head_dim, backend)
    q, k, v = _unit_last_stride(q), _unit_last_stride(k), _unit_last_stride(v)
    return op(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale)


def attention_with_kvcache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           k: torch.Tensor | None = None, v: torch.Tensor | None = None, *,
                           cache_seqlens: torch.Tensor, causal: bool = True, softmax_scale: float | None = None,
                           backend: str | None = None, check_bounds: bool = True) -> torch.Tensor:
    """Attention against a static, preallocated KV cache, with an optional in-place append.

    Args:
        q: (batch, seqlen_q, nheads, headdim); seqlen_q = 1 for a decode step.
        k_cache, v_cache: (batch, max_seqlen, nheads, headdim), preallocated; written in place when k/v are given.
        k, v: (batch, seqlen_q, nheads, headdim) or None. When given they are written to rows
            cache_seqlens[b] .. cache_seqlens[b] + seqlen_q - 1 of batch row b (the append).
        cache_seqlens: int32 (batch,), how many keys each row held before this call. Not modified.
        causal: bottom-right aligned: query i of row b sees keys j <= i + L_b - seqlen_q, where
            L_b = cache_seqlens[b] (+ seqlen_q when k is given) is the number of keys row b attends to.
        check_bounds: verify cache_seqlens >= 0 and cache_seqlens + seqlen_q <= max_seqlen (syncs with the device);
            skipped under capture/compile. Kernels never write outside the cache either way.

    Returns:
        out (batch, seqlen_q, nheads, headdim).
    """
    layout = "(batch, seqlen, nheads, headdim)"
    _tensor("q", q, 4, layout)
    _tensor("k_cache", k_cache, 4, "(batch, max_seqlen, nheads, headdim)")
    _tensor("v_cache", v_cache, 4, "(batch, max_seqlen, nheads, headdim)")
    _check_qkv_dtype("q", q)
    _float_like("k_cache", k_cache, "q", q)
    _float_like("v_cache", v_cache, "q", q)
    batch, seqlen_q, nheads, head_dim = q.shape
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"v_cache: expected shape {tuple(k_cache.shape)} (the shape of k_cache), "
                         f"got {tuple(v_cache.shape)}")
    cb, max_seqlen, ch, cd = k_cache.shape
    if (cb, ch, cd) != (batch, nheads, head_dim):
        raise ValueError(f"k_cache: expected (batch, max_seqlen, nheads, headdim) = ({batch}, *, {nheads}, "
                         f"{head_dim}) to match q, got {tuple(k_cache.shape)}")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if cache.stride(-1) != 1 and cd > 1:
            raise ValueError(f"{name}: expected last stride 1 (it is written in place, so it cannot be copied), "
                             f"got strides {cache.stride()}")
    if (k is None) != (v is None):
        raise ValueError(f"k, v: expected both or neither, got k={'None' if k is None else 'tensor'} and "
                         f"v={'None' if v is None else 'tensor'}")
    if k is not None:
        _tensor("k", k, 4, layout)
        _tensor("v", v, 4, layout)
        _float_like("k", k, "q", q)
        _float_like("v", v, "q", q)
        expected = (batch, seqlen_q, nheads, head_dim)
        for name, t in (("k", k), ("v", v)):
            if tuple(t.shape) != expected:
                raise ValueError(f"{name}: expected shape {expected} (batch, seqlen_q, nheads, headdim of q), "
                                 f"got {tuple(t.shape)}")
        k, v = _unit_last_stride(k), _unit_last_stride(v)
    _check_head_dim(head_dim)
    cache_seqlens = _index_vector("cache_seqlens", cache_seqlens, batch, q.device, "keys held per batch row")
    causal = _flag("causal", causal)
    scale = _scale(softmax_scale, head_dim)
    seqlen_new = seqlen_q if k is not None else 0
    if seqlen_new > max_seqlen:
        raise ValueError(f"k: appending {seqlen_new} rows cannot fit a cache of max_seqlen {max_seqlen}")
    if check_bounds and _may_sync():
        lo, hi = (int(x) for x in torch.aminmax(cache_seqlens))
        if lo < 0:
            raise ValueError(f"cache_seqlens: expected values >= 0, got a minimum of {lo}")
        if hi + seqlen_new > max_seqlen:
            raise ValueError(f"cache_seqlens: cache overflow: cache_seqlens + {seqlen_new} new rows must be <= "
                             f"max_seqlen {max_seqlen}, got a maximum of {hi} + {seqlen_new} = {hi + seqlen_new}")
    _, op = registry.select("attention_with_kvcache", q.device, q.dtype, head_dim, backend)
    return op(_unit_last_stride(q), k_cache, v_cache, k, v, cache_seqlens, causal, scale)


# ----------------------------------------------------------------------------------------------------------------------
# unpad / pad


def unpad_input(hidden: torch.Tensor, attention_mask: torch.Tensor, *, backend: str | None = None):
    """Remove padding: keep the positions where ``attention_mask`` is 1 (left or right padding alike).

    Args:
        hidden: (batch, seqlen, ...).
        attention_mask: (batch, seqlen), bool or integer 0/1.

    Returns:
        hidden_unpad (nnz, ...), indices int64 (nnz,) into the flattened (batch * seqlen) positions, cu_seqlens int32
        (batch + 1,), max_seqlen (host int). Syncs with the device (nnz is data-dependent).
    """
    if not isinstance(hidden, torch.Tensor) or hidden.dim() < 2:
        got = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
        raise ValueError(f"hidden: expected a tensor of shape (batch, seqlen, ...), got {got}")
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask: expected a torch.Tensor (batch, seqlen), got {type(attention_mask).__name__}")
    batch, seqlen = hidden.shape[0], hidden.shape[1]
    if tuple(attention_mask.shape) != (batch, seqlen):
        raise ValueError(f"attention_mask: expected shape ({batch}, {seqlen}) (batch, seqlen of hidden), "
                         f"got {tuple(attention_mask.shape)}")
    if attention_mask.device != hidden.device:
        raise ValueError(f"attention_mask: expected device {hidden.device} (the device of hidden), "
                         f"got {attention_mask.device}")
    if attention_mask.is_floating_point() or attention_mask.is_complex():
        raise TypeError(f"attention_mask: expected a bool or integer tensor, got {attention_mask.dtype}")
    if attention_mask.dtype != torch.bool:
        if attention_mask.numel() and not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
            raise ValueError("attention_mask: expected values 0 or 1, got other values")
        attention_mask = attention_mask != 0
    seqlens = attention_mask.sum(dim=-1, dtype=torch.int32)  # (B,)
    indices = torch.nonzero(attention_mask.flatten(), as_tuple=False).flatten()  # (nnz,)
    max_seqlen = int(seqlens.max()) if batch else 0
    cu_seqlens = torch.zeros(batch + 1, dtype=torch.int32, device=hidden.device)
    torch.cumsum(seqlens, dim=0, dtype=torch.int32, out=cu_seqlens[1:])
    flat = hidden.reshape(batch * seqlen, -1)  # (B * S, F)
    _, op = registry.select("gather_rows", hidden.device, hidden.dtype, 1, backend)
    unpadded = op(flat.contiguous(), indices)  # (nnz, F)
    return unpadded.view((indices.shape[0],) + tuple(hidden.shape[2:])), indices, cu_seqlens, max_seqlen


def pad_input(hidden_unpad: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int, *,
              backend: str | None = None, check_bounds: bool = True) -> torch.Tensor:
    """Inverse of :func:`unpad_input`: scatter (nnz, ...) rows back to (batch, seqlen, ...), zeros elsewhere."""
    if not isinstance(hidden_unpad, torch.Tensor) or hidden_unpad.dim() < 1:
        got = tuple(hidden_unpad.shape) if isinstance(hidden_unpad, torch.Tensor) else type(hidden_unpad).__name__
        raise ValueError(f"hidden_unpad: expected a tensor of shape (nnz, ...), got {got}")
    batch = _int_arg("batch", batch)
    seqlen = _int_arg("seqlen", seqlen)
    nnz = hidden_unpad.shape[0]
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"indices: expected an int64 torch.Tensor of shape ({nnz},), got {type(indices).__name__}")
    if indices.dtype != torch.int64:
        raise TypeError(f"indices: expected dtype torch.int64, got {indices.dtype}")
    if indices.dim() != 1 or indices.shape[0] != nnz:
        raise ValueError(f"indices: expected shape ({nnz},) (the rows of hidden_unpad), got {tuple(indices.shape)}")
    if indices.device != hidden_unpad.device:
        raise ValueError(f"indices: expected device {hidden_unpad.device}, got {indices.device}")
    n = batch * seqlen
    if nnz > n:
        raise ValueError(f"hidden_unpad: {nnz} rows cannot fit batch * seqlen = {n} positions")
    if check_bounds and nnz and _may_sync():
        lo, hi = (int(x) for x in torch.aminmax(indices))
        if lo < 0 or hi >= n:
            raise ValueError(f"indices: expected values in [0, {n}) (batch * seqlen), got [{lo}, {hi}]")
    flat = hidden_unpad.reshape(nnz, -1).contiguous()  # (nnz, F)
    _, op = registry.select("scatter_rows", hidden_unpad.device, hidden_unpad.dtype, 1, backend)
    out = op(flat, indices.contiguous(), n)  # (B * S, F)
    return out.view((batch, seqlen) + tuple(hidden_unpad.shape[1:]))
