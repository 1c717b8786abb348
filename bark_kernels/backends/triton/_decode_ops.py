"""The fused decode step's kernels (``_decode_kernels``) as torch custom ops with fake implementations, and their
launchers (block sizes from host-known shapes, PDL on where the GPU and the installed Triton have it).

Every op writes into buffers its caller owns (declared in ``mutates_args``) and returns nothing: a decode step is
then a fixed sequence of launches on static memory, capturable as one CUDA graph, and torch.compile(fullgraph=True)
traces it (each op is one opaque node). Nothing here reads a device value on the host.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Optional

import torch
import triton

from . import _decode_kernels as K
from ._env import interpreter_enabled
from ._launchers import choose_num_splits, head_dim_pad

NAMESPACE = "bark_kernels_triton"
LOG2E = 1.4426950408889634
logger = logging.getLogger("bark_kernels")


# -- PDL ---------------------------------------------------------------------------------------------------------------


def _triton_launch_pdl_problem() -> str | None:
    if not K.HAS_GDC:
        return f"triton {triton.__version__} has no tl.extra.cuda.gdc_wait / gdc_launch_dependents"
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except Exception as exc:  # no NVIDIA backend
        return f"triton's NVIDIA backend cannot be imported ({type(exc).__name__})"
    if "launch_pdl" not in getattr(CUDAOptions, "__dataclass_fields__", {}):
        return f"triton {triton.__version__} cannot launch with launch_pdl=True"
    return None


@functools.cache
def pdl_problem(device_type: str, index: int | None) -> str | None:
    """Why the fused decode kernels launch without programmatic dependent launch on this device, or None (PDL on).
    Logged once per device when off (at debug level under the interpreter, where it means nothing)."""
    if interpreter_enabled() or device_type != "cuda":
        reason = "Triton's interpreter (CPU) has no dependent launches"
    else:
        major, _ = torch.cuda.get_device_capability(index)
        reason = None if major >= 9 else f"PDL needs sm_90 or newer, the device is sm_{major}x"
        reason = reason or _triton_launch_pdl_problem()
    if reason is not None:
        level = logging.DEBUG if interpreter_enabled() else logging.INFO
        logger.log(level, "bark_kernels: the fused decode kernels launch without PDL: %s", reason)
    return reason


def _launch_options(device: torch.device) -> dict:
    return {} if pdl_problem(device.type, device.index) is not None else {"launch_pdl": True}


def _use_pdl(device: torch.device) -> bool:
    return pdl_problem(device.type, device.index) is None


# -- block sizes -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinearConfig:
    block_b: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def linear_config(n_rows: int, n_in: int, n_out: int, dtype: torch.dtype) -> LinearConfig:
    """Blocks of the LN/linear kernels: rows padded to tl.dot's 16 (up to 64 per program), narrow column blocks so
    that even batch 1 has many programs reading weights. CUDA values NOT tuned on a GPU yet (aot_check: registers,
    spills); under the interpreter the blocks are large (each loop trip costs milliseconds there)."""
    block_b = max(16, min(64, triton.next_power_of_2(max(n_rows, 1))))
    if interpreter_enabled():  # few programs and trips (the interpreter's cost is per operation); tiles <= 2**20
        return LinearConfig(block_b, min(1024, triton.next_power_of_2(n_out)), min(1024, triton.next_power_of_2(n_in)),
                            4, 1)
    if dtype == torch.float32:
        return LinearConfig(block_b, 16, 32, 4, 2)
    # 2 stages: with 3, ptxas spilled 8 B per thread in the bf16 LN + fc1 + GELU kernel at batch <= 32
    return LinearConfig(block_b, 16, 128 if block_b <= 32 else 64, 4, 2)


def attention_block_n(head_dim: int) -> int:
    if interpreter_enabled():
        return 128
    return 64 if head_dim_pad(head_dim) <= 64 else 32


def attention_warps(head_dim: int, num_splits: int, dtype: torch.dtype) -> int:
    """Warps of the decode attention kernel: 4 up to a padded head_dim of 64, else 8; 2 when it splits the keys of a
    64-wide fp16/bf16 head (with the splits' combine in the same kernel, triton 3.6's ptxas spilled 8 B at 4 warps;
    fp32 spilled at 2: tools/aot_check.py checks the variants for spills)."""
    pad = head_dim_pad(head_dim)
    if num_splits > 1 and pad == 64 and dtype != torch.float32:
        return 2
    return 4 if pad <= 64 else 8


def attention_splits(batch: int, nheads: int, max_seqlen: int, head_dim: int, device: torch.device) -> int:
    """How many programs share one (row, head)'s keys: host-known shapes only (the attention kernels' heuristic)."""
    return choose_num_splits(batch * nheads, max_seqlen, attention_block_n(head_dim), device)


def pick_block(n: int) -> int:
    return triton.next_power_of_2(max(n, 16))


def pick_warps(n: int) -> int:
    """Warps of the pick kernel: the row (up to 16,384 float32 lanes) and its keys stay in registers without spills."""
    return 16 if n > 4096 else 4


def _ieee(dtype: torch.dtype) -> bool:
    return dtype == torch.float32


# -- launchers ---------------------------------------------------------------------------------------------------------


def _ln_linear(x, ln_w, ln_b, w, bias, out, eps, epilogue, k_cache=None, v_cache=None, seqlens=None, head_dim=1):
    n_rows, n_in = x.shape
    n_out = w.shape[0]
    cfg = linear_config(n_rows, n_in, n_out, w.dtype)
    grid = (triton.cdiv(n_out, cfg.block_n), triton.cdiv(n_rows, cfg.block_b))
    kc = k_cache if k_cache is not None else out
    vc = v_cache if v_cache is not None else out
    cache_strides = (kc.stride(0), kc.stride(1), kc.stride(2), vc.stride(0), vc.stride(1), vc.stride(2)) \
        if k_cache is not None else (0,) * 6
    K._ln_linear_kernel[grid](
        x, ln_w, ln_b if ln_b is not None else ln_w, w, bias if bias is not None else ln_w, out, kc, vc,
        seqlens if seqlens is not None else ln_w,
        n_rows, n_in, n_out, float(eps),
        x.stride(0), w.stride(0), w.stride(1), out.stride(0), *cache_strides, head_dim,
        HAS_LN_BIAS=ln_b is not None, HAS_BIAS=bias is not None, EPILOGUE=epilogue,
        BLOCK_B=cfg.block_b, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SINGLE_K=n_in <= cfg.block_k,
        IEEE=_ieee(w.dtype),
        USE_PDL=_use_pdl(x.device), num_warps=cfg.num_warps, num_stages=cfg.num_stages, **_launch_options(x.device),
    )


# -- custom ops --------------------------------------------------------------------------------------------------------


@torch.library.custom_op(f"{NAMESPACE}::fused_embed", mutates_args=("x",))
def fused_embed(tokens: torch.Tensor, seqlens: torch.Tensor, wte: torch.Tensor, wpe: torch.Tensor,
                x: torch.Tensor) -> None:
    """tokens int64 (B,), seqlens int32 (B,), wte (V, C), wpe (P, C) -> x (B, C) = wte[tokens] + wpe[seqlens]."""
    n_rows, n_embd = x.shape
    K._embed_kernel[(n_rows,)](tokens, seqlens, wte, wpe, x, n_embd, wte.stride(0), wpe.stride(0), x.stride(0),
                               BLOCK_C=triton.next_power_of_2(n_embd), USE_PDL=_use_pdl(x.device),
                               num_warps=4, **_launch_options(x.device))


@fused_embed.register_fake
def _fused_embed_fake(tokens, seqlens, wte, wpe, x):
    return None


@torch.library.custom_op(f"{NAMESPACE}::fused_ln_qkv", mutates_args=("q", "k_cache", "v_cache"))
def fused_ln_qkv(x: torch.Tensor, ln_w: torch.Tensor, ln_b: Optional[torch.Tensor],  # noqa: UP045 (schema parser)
                 w: torch.Tensor, bias: Optional[torch.Tensor], seqlens: torch.Tensor, q: torch.Tensor,  # noqa: UP045
                 k_cache: torch.Tensor, v_cache: torch.Tensor, eps: float) -> None:
    """x (B, C) -> LayerNorm -> @ w.T (3C, C) + bias: q (B, C); k, v appended to the caches (B, S_max, H, D) at
    row b's position seqlens[b]."""
    _ln_linear(x, ln_w, ln_b, w, bias, q, eps, K.EPILOGUE_QKV, k_cache, v_cache, seqlens, k_cache.shape[3])


@fused_ln_qkv.register_fake
def _fused_ln_qkv_fake(x, ln_w, ln_b, w, bias, seqlens, q, k_cache, v_cache, eps):
    return None


@torch.library.custom_op(f"{NAMESPACE}::fused_ln_linear", mutates_args=("out",))
def fused_ln_linear(x: torch.Tensor, ln_w: torch.Tensor, ln_b: Optional[torch.Tensor],  # noqa: UP045
                    w: torch.Tensor, bias: Optional[torch.Tensor], out: torch.Tensor, eps: float,  # noqa: UP045
                    gelu: bool) -> None:
    """x (B, C) -> LayerNorm -> @ w.T (N, C) (+ bias), rounded to w's dtype -> exact GELU (``gelu``) -> out (B, N)
    (float32 logits or the model dtype)."""
    _ln_linear(x, ln_w, ln_b, w, bias, out, eps, K.EPILOGUE_GELU if gelu else K.EPILOGUE_LOGITS)


@fused_ln_linear.register_fake
def _fused_ln_linear_fake(x, ln_w, ln_b, w, bias, out, eps, gelu):
    return None


@torch.library.custom_op(f"{NAMESPACE}::fused_linear_residual", mutates_args=("x",))
def fused_linear_residual(a: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor],  # noqa: UP045
                          x: torch.Tensor) -> None:
    """x (B, N) += a (B, K) @ w.T (N, K) + bias, the linear output rounded to w's dtype first (as torch's)."""
    n_rows, n_in = a.shape
    n_out = w.shape[0]
    cfg = linear_config(n_rows, n_in, n_out, w.dtype)
    grid = (triton.cdiv(n_out, cfg.block_n), triton.cdiv(n_rows, cfg.block_b))
    K._linear_residual_kernel[grid](
        a, w, bias if bias is not None else w, x, n_rows, n_in, n_out, a.stride(0), w.stride(0), w.stride(1),
        x.stride(0), HAS_BIAS=bias is not None, BLOCK_B=cfg.block_b, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        SINGLE_K=n_in <= cfg.block_k,
        IEEE=_ieee(w.dtype), USE_PDL=_use_pdl(x.device), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **_launch_options(x.device),
    )


@fused_linear_residual.register_fake
def _fused_linear_residual_fake(a, w, bias, x):
    return None


@torch.library.custom_op(f"{NAMESPACE}::fused_attention",
                         mutates_args=("out", "acc_ws", "m_ws", "l_ws", "counter"))
def fused_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seqlens: torch.Tensor,
                    out: torch.Tensor, acc_ws: torch.Tensor, m_ws: torch.Tensor, l_ws: torch.Tensor,
                    counter: torch.Tensor, softmax_scale: float) -> None:
    """q (B, H * D) over caches (B, S_max, H, D), keys 0..seqlens[b] (the new one included) -> out (B, H * D).
    Splits: acc_ws.shape[0] (workspaces (S, B * H, D_PAD), (S, B * H) float32; counter (B * H,) int32, zero)."""
    batch, _, nheads, head_dim = k_cache.shape
    num_splits = acc_ws.shape[0]
    block_n = attention_block_n(head_dim)
    split_size = triton.cdiv(triton.cdiv(max(k_cache.shape[1], 1), num_splits), block_n) * block_n
    K._decode_attention_kernel[(batch * nheads, num_splits)](
        q, k_cache, v_cache, seqlens, out, acc_ws, m_ws, l_ws, counter, nheads, split_size, softmax_scale * LOG2E,
        q.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), out.stride(0),
        HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad(head_dim), NUM_SPLITS=num_splits,
        SPLITS_POW2=triton.next_power_of_2(num_splits), BLOCK_N=block_n, USE_PDL=_use_pdl(q.device),
        num_warps=attention_warps(head_dim, num_splits, q.dtype), num_stages=2, **_launch_options(q.device),
    )


@fused_attention.register_fake
def _fused_attention_fake(q, k_cache, v_cache, seqlens, out, acc_ws, m_ws, l_ws, counter, softmax_scale):
    return None


@torch.library.custom_op(f"{NAMESPACE}::fused_pick",
                         mutates_args=("finished", "record", "col", "tokens", "seqlens", "counter"))
def fused_pick(logits: torch.Tensor, exp_q: Optional[torch.Tensor], suppressed: Optional[torch.Tensor],  # noqa: UP045
               finished: torch.Tensor, record: torch.Tensor, col: torch.Tensor, tokens: torch.Tensor,
               seqlens: torch.Tensor, counter: torch.Tensor, lo: int, eos: int, pad: int, min_new_tokens: int,
               min_eos_p: float, do_sample: bool, temperature: float, top_k: int, top_p: float) -> None:
    """One next token per row from logits (B, n) float32 of token ids lo..lo+n-1 (see ``_pick_kernel``): written to
    tokens (B,) int64 and record[:, col] (B, W) int64; finished (B,) bool updated when ``eos`` >= 0 (a slice index;
    -1: no EOS logic); seqlens (B,) += 1; col () += 1. exp_q (B, V) float32 (sampling), suppressed (n,) bool."""
    n_rows, n = logits.shape
    K._pick_kernel[(n_rows,)](
        logits, exp_q if exp_q is not None else logits,
        suppressed.view(torch.uint8) if suppressed is not None else finished.view(torch.uint8),
        finished.view(torch.uint8), record, col, tokens, seqlens, counter,
        n_rows, n, lo, eos, pad, min_new_tokens, float(min_eos_p), float(temperature), top_k, float(top_p),
        logits.stride(0), exp_q.stride(0) if exp_q is not None else 0, record.stride(0),
        SEMANTIC=eos >= 0, HAS_SUPPRESS=suppressed is not None, HAS_MIN_NEW=eos >= 0 and min_new_tokens > 0,
        HAS_MIN_EOS_P=eos >= 0 and min_eos_p > 0, DO_SAMPLE=do_sample, HAS_TEMPERATURE=do_sample and temperature != 1.0,
        HAS_TOP_K=do_sample and 0 < top_k < n, HAS_TOP_P=do_sample and top_p < 1.0, BLOCK_V=pick_block(n),
        USE_PDL=_use_pdl(logits.device), num_warps=pick_warps(n), **_launch_options(logits.device),
    )


@fused_pick.register_fake
def _fused_pick_fake(logits, exp_q, suppressed, finished, record, col, tokens, seqlens, counter, lo, eos, pad,
                     min_new_tokens, min_eos_p, do_sample, temperature, top_k, top_p):
    return None
