"""Kernel benchmarks at Bark's shapes: causal/non-causal prefill, decode over a KV cache, varlen packs, unpad/pad.

Providers (a provider is one way to compute the same op on the same tensors):

- ``bk:<backend>``: ``bark_kernels`` through its public API with ``backend=<name>`` (triton, cuda, flash_attn, sdpa,
  eager). Inputs are Bark's real layout: q, k, v are views of one fused projection ``(B, S, 3, H, D).unbind(2)``.
- ``torch-sdpa:<flash|efficient|cudnn|math>``: ``torch.nn.functional.scaled_dot_product_attention`` called directly on
  the (B, H, S, D) transposes of the same views, restricted with ``torch.nn.attention.sdpa_kernel`` to one kernel.
  ``torch-sdpa:auto`` lets torch choose (CPU mode only: it is the CPU reference).

Every provider's output is checked once per case against a float64 reference (batch row 0) with the project's
tolerance rule (``bark_kernels.testing``); the result is recorded next to its timing, so a fast wrong kernel shows.
A provider that is unavailable, cannot serve a shape, or raises is recorded as skipped/failed with the reason.

FLOP convention (prefill, varlen): 4 * H * D * (number of query-key pairs the mask lets through), summed over the batch.
Causal attention with Sq = Sk = S counts S * (S + 1) / 2 pairs per head, not S^2: the masked half is not work.

Byte convention (decode): bytes the op must move at least: K and V rows of the L attended keys, q read, out written,
and for ``bk:*`` (which append the new k/v in place, as Bark's decode step does) the new k, v read and written.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import bark_kernels as bk
from bark_kernels import registry, testing

logger = logging.getLogger("benchmarks")

HEAD_DIM = 64
MODEL_HEADS = {"bark-small": 12, "bark": 16}
SDPA_KERNELS = ("flash", "efficient", "cudnn", "math")


def _sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend

    return {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[name]


def _sdpa_context(kernel: str):
    if kernel == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import sdpa_kernel

    return sdpa_kernel([_sdpa_backend(kernel)])


# ----------------------------------------------------------------------------------------------------------------------
# plans


@dataclass
class Plan:
    """Which shapes to run. ``label`` says how it differs from the full GPU plan (CPU subsets are labelled)."""

    label: str
    dtypes: tuple[torch.dtype, ...]
    models: tuple[str, ...]
    prefill_seqlens: tuple[int, ...]
    prefill_noncausal_seqlens: tuple[int, ...]
    prefill_batches: tuple[int, ...]
    decode_cache_lens: tuple[int, ...]
    decode_batches: tuple[int, ...]
    decode_dtypes: tuple[torch.dtype, ...]
    varlen_packs: tuple[tuple[int, ...], ...]
    unpad_shapes: tuple[tuple[int, int], ...]  # (batch, seqlen); half the rows padded
    excluded: dict[str, str] = field(default_factory=dict)  # provider -> why it is left out in this mode


def gpu_plan(quick: bool = False) -> Plan:
    if quick:
        return Plan("gpu quick: one shape per section", (torch.float16,), ("bark-small",), (513,), (1024,), (8,),
                    (1024,), (16,), (torch.float16,), ((257, 513, 887, 1024),), ((16, 1024),))
    return Plan(
        "gpu full: Bark's shapes",
        dtypes=(torch.float16, torch.bfloat16),
        models=("bark-small", "bark"),
        prefill_seqlens=(257, 513, 887, 1024),
        prefill_noncausal_seqlens=(1024,),
        prefill_batches=(1, 8, 32),
        decode_cache_lens=(257, 513, 769, 1024),
        decode_batches=(1, 4, 16, 64),
        decode_dtypes=(torch.float16,),
        varlen_packs=((257, 300, 513, 887, 1024, 640, 400, 257), tuple([257, 513, 887, 1024] * 8)),
        unpad_shapes=((16, 1024), (64, 1024)),
    )


def cpu_plan(quick: bool = False) -> Plan:
    excluded = {"bk:triton": "TRITON_INTERPRET runs Triton kernels as numpy on the CPU: its timings are meaningless, "
                             "so triton is excluded from CPU timings",
                "bk:cuda": "CPU mode: the CUDA extension runs on CUDA tensors only",
                "torch-sdpa:efficient": "CPU mode: torch has no CPU memory-efficient SDPA kernel",
                "torch-sdpa:cudnn": "CPU mode: cuDNN attention runs on CUDA tensors only"}
    if quick:
        return Plan("cpu quick: tiny shapes (smoke test, not Bark's shapes)", (torch.float32,), ("bark-small",),
                    (64,), (64,), (1,), (64,), (2,), (torch.float32,), ((17, 64, 33),), ((2, 64),), excluded)
    return Plan(
        "cpu subset: bark-small heads, batch 1 prefill, fp32",
        dtypes=(torch.float32,),
        models=("bark-small",),
        prefill_seqlens=(257, 513, 1024),
        prefill_noncausal_seqlens=(1024,),
        prefill_batches=(1,),
        decode_cache_lens=(257, 513, 1024),
        decode_batches=(1, 8),
        decode_dtypes=(torch.float32,),
        varlen_packs=((257, 513, 300),),
        unpad_shapes=((8, 1024),),
        excluded=excluded,
    )


# ----------------------------------------------------------------------------------------------------------------------
# providers


def attention_providers(device: torch.device, plan: Plan) -> list[str]:
    """Every provider of the attention sections; the torch-sdpa kernels the plan excludes are left out (bk:* ones
    stay, recorded as skipped with the plan's reason)."""
    names = [f"bk:{b}" for b in registry.BACKENDS]
    names += [f"torch-sdpa:{k}" for k in SDPA_KERNELS if f"torch-sdpa:{k}" not in plan.excluded]
    if device.type == "cpu":
        names.append("torch-sdpa:auto")
    return names


def reference_provider(device: torch.device) -> str:
    """The provider every other is compared to: SDPA's FlashAttention-2 kernel on a GPU, torch's own choice on CPU."""
    return "torch-sdpa:flash" if device.type == "cuda" else "torch-sdpa:auto"


def bk_reason(provider: str, op: str, device: torch.device, dtype: torch.dtype, plan: Plan) -> str | None:
    """None when a ``bk:*`` provider can run ``op`` here, else why not."""
    if provider in plan.excluded:
        return plan.excluded[provider]
    return registry.why_not(provider.split(":", 1)[1], op, device, dtype, HEAD_DIM)


# ----------------------------------------------------------------------------------------------------------------------
# the case runner


@dataclass
class Case:
    section: str
    name: str
    params: dict
    calls: dict[str, Callable[[], torch.Tensor] | str]  # provider -> callable returning the output, or skip reason
    check: Callable[[str, torch.Tensor], dict] | None = None  # provider, output -> figures about correctness
    flops: int | None = None
    bytes_for: Callable[[str], int] | None = None  # provider -> bytes moved
    reference: str | None = None  # the provider ratios are taken against (default: the section's reference)


class Budget:
    """A wall-clock deadline; sections ask it before each case."""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def exhausted(self) -> bool:
        return self.left() <= 0


def _error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().replace("\n", " ")
    return text[:300]


def run_case(case: Case, timer, reference: str, budget: Budget, device: torch.device) -> list[dict]:
    """Time every provider of one case; returns one record per provider (ok, skipped or failed)."""
    reference = case.reference or reference
    records = []
    for provider, call in case.calls.items():
        rec = {"section": case.section, "case": case.name, "provider": provider, "params": dict(case.params),
               "reference_provider": reference, "figures": {}}
        records.append(rec)
        if isinstance(call, str):
            rec.update(status="skipped", reason=call)
            continue
        if budget.exhausted():
            rec.update(status="skipped", reason="time budget of this run exhausted before this case")
            continue
        try:
            out = call()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if case.check is not None:
                rec["figures"].update(case.check(provider, out))
            del out
            timing = timer(call)
        except Exception as exc:  # a provider that cannot serve a shape (or breaks) is reported, not fatal
            rec.update(status="failed", reason=_error_text(exc), figures={})
            logger.info("%s %s %s failed: %s", case.section, case.name, provider, rec["reason"])
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        rec["status"] = "ok"
        rec["timing_method"] = timing.method
        rec["warmup_calls_excluded"] = timing.warmup_calls
        figs = rec["figures"]
        figs.update(timing.figures())
        seconds = timing.median_ms * 1e-3
        if case.flops is not None:
            figs["flops"] = {"value": case.flops, "unit": "FLOP"}
            figs["throughput"] = {"value": case.flops / seconds / 1e12, "unit": "TFLOP/s"}
        if case.bytes_for is not None:
            nbytes = case.bytes_for(provider)
            figs["bytes"] = {"value": nbytes, "unit": "B"}
            figs["bandwidth"] = {"value": nbytes / seconds / 1e9, "unit": "GB/s"}
    ref = next((r for r in records if r["provider"] == reference and r.get("status") == "ok"), None)
    for rec in records:
        if rec.get("status") == "ok" and ref is not None:
            rec["figures"]["speedup_vs_reference"] = {
                "value": ref["figures"]["median"]["value"] / rec["figures"]["median"]["value"],
                "unit": f"x (median time of {reference} / this provider's; > 1 is faster)"}
    return records


def _checker(ref64: torch.Tensor, baseline: torch.Tensor, dtype: torch.dtype, row0: Callable[[torch.Tensor], torch.Tensor]):
    """A check: max error of the provider's batch row 0 against the float64 reference, within the tolerance rule."""
    allowed = testing.allowed_error(baseline, ref64, dtype)

    def check(provider: str, out: torch.Tensor) -> dict:
        err = testing.max_error(row0(out), ref64)
        return {"max_abs_error_row0": {"value": err, "unit": "abs"},
                "allowed_error_row0": {"value": allowed, "unit": "abs"},
                "correct": {"value": bool(err <= allowed), "unit": "bool"}}

    return check


# ----------------------------------------------------------------------------------------------------------------------
# prefill


def _fused_qkv(batch: int, seqlen: int, heads: int, dtype, device, generator):
    """q, k, v (B, S, H, D) as views of one fused (B, S, 3, H, D) projection, Bark's layout."""
    qkv = torch.randn(batch, seqlen, 3, heads, HEAD_DIM, dtype=torch.float32, device=device, generator=generator)
    return qkv.to(dtype).unbind(2)  # 3 x (B, S, H, D), strided views


def prefill_case(model: str, batch: int, seqlen: int, causal: bool, dtype, device, plan: Plan, generator) -> Case:
    heads = MODEL_HEADS[model]
    q, k, v = _fused_qkv(batch, seqlen, heads, dtype, device, generator)
    calls: dict[str, Callable | str] = {}
    for provider in attention_providers(device, plan):
        kind, name = provider.split(":", 1)
        if kind == "bk":
            reason = bk_reason(provider, "attention", device, dtype, plan)
            calls[provider] = reason if reason else (
                lambda b=name: bk.attention(q, k, v, causal=causal, backend=b))
        else:
            qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, S, D)

            def call(kernel=name, qt=qt, kt=kt, vt=vt):
                with _sdpa_context(kernel):
                    return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)

            calls[provider] = call
    pairs = seqlen * (seqlen + 1) // 2 if causal else seqlen * seqlen
    ref64 = testing.reference_attention(q[:1], k[:1], v[:1], causal=causal)
    baseline = bk.attention(q[:1], k[:1], v[:1], causal=causal, backend="eager")

    def row0(out):
        return out[:1] if out.shape[1] == seqlen else out[:1].transpose(1, 2)  # torch-sdpa gives (B, H, S, D)

    return Case(
        "prefill" if causal else "prefill_noncausal",
        f"{model} B={batch} S={seqlen} {'causal' if causal else 'non-causal'} {_dt(dtype)}",
        {"model": model, "batch": batch, "seqlen_q": seqlen, "seqlen_k": seqlen, "nheads": heads,
         "headdim": HEAD_DIM, "causal": causal, "dtype": _dt(dtype),
         "flop_convention": "4*H*D*unmasked (q,k) pairs; causal S=Sq=Sk counts S(S+1)/2 pairs"},
        calls, _checker(ref64, baseline, dtype, row0), flops=4 * batch * heads * HEAD_DIM * pairs)


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ----------------------------------------------------------------------------------------------------------------------
# decode


def decode_case(model: str, batch: int, cache_len: int, dtype, device, plan: Plan, generator) -> Case:
    """One query per row over a cache of ``cache_len`` keys, all rows the same length (so dense SDPA is a fair anchor).

    ``bk:*`` providers call ``attention_with_kvcache`` with the new k/v appended in place at row cache_len - 1 (the
    cache holds cache_len - 1 keys before the call) and attend to cache_len keys, as Bark's decode step does;
    ``torch-sdpa:*`` attend to the first cache_len rows of the same cache (dense, no append).
    """
    heads = MODEL_HEADS[model]
    max_seqlen = cache_len  # the cache is exactly full after the append: every row read is a row attended
    k_cache = torch.randn(batch, max_seqlen, heads, HEAD_DIM, device=device, generator=generator).to(dtype)
    v_cache = torch.randn(batch, max_seqlen, heads, HEAD_DIM, device=device, generator=generator).to(dtype)
    q, k_new, v_new = _fused_qkv(batch, 1, heads, dtype, device, generator)
    # Write the new row once so the dense providers see the same keys as the appending ones.
    k_cache[:, cache_len - 1] = k_new[:, 0]
    v_cache[:, cache_len - 1] = v_new[:, 0]
    cache_seqlens = torch.full((batch,), cache_len - 1, dtype=torch.int32, device=device)
    calls: dict[str, Callable | str] = {}
    for provider in attention_providers(device, plan):
        kind, name = provider.split(":", 1)
        if kind == "bk":
            reason = bk_reason(provider, "attention_with_kvcache", device, dtype, plan)
            calls[provider] = reason if reason else (
                lambda b=name: bk.attention_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=cache_seqlens,
                                                         causal=True, backend=b, check_bounds=False))
        else:
            qt = q.transpose(1, 2)  # (B, H, 1, D)
            kt, vt = k_cache[:, :cache_len].transpose(1, 2), v_cache[:, :cache_len].transpose(1, 2)  # (B, H, L, D)

            def call(kernel=name, qt=qt, kt=kt, vt=vt):
                with _sdpa_context(kernel):
                    return F.scaled_dot_product_attention(qt, kt, vt)

            calls[provider] = call
    elt = torch.tensor([], dtype=dtype).element_size()
    row = heads * HEAD_DIM * elt  # one (H, D) row

    def bytes_for(provider: str) -> int:
        base = batch * row * (2 * cache_len + 2)  # K, V of L keys; q in, out
        return base + (batch * row * 4 if provider.startswith("bk:") else 0)  # new k, v read and written

    ref64 = testing.reference_attention(q[:1], k_cache[:1, :cache_len], v_cache[:1, :cache_len], causal=True)
    baseline = bk.attention(q[:1], k_cache[:1, :cache_len], v_cache[:1, :cache_len], causal=True, backend="eager")

    def row0(out):
        return out[:1] if out.shape[1] == 1 and out.shape[2] == heads else out[:1].transpose(1, 2)

    return Case(
        "decode", f"{model} B={batch} L={cache_len} {_dt(dtype)}",
        {"model": model, "batch": batch, "cache_len": cache_len, "seqlen_q": 1, "nheads": heads, "headdim": HEAD_DIM,
         "dtype": _dt(dtype),
         "byte_convention": "K,V of L keys + q + out (+ new k,v read and written for bk:* which append in place)"},
        calls, _checker(ref64, baseline, dtype, row0), bytes_for=bytes_for)


# ----------------------------------------------------------------------------------------------------------------------
# varlen


def varlen_case(model: str, seqlens: tuple[int, ...], dtype, device, plan: Plan, generator) -> Case:
    """Causal self-attention over a pack of sequences of mixed lengths. ``torch-sdpa:*`` providers run the same
    sequences padded to the longest (right padding, is_causal; the padded rows are computed and wasted), which is what
    one does without a varlen kernel; their FLOP count is the same useful work, so TFLOP/s shows the waste."""
    heads = MODEL_HEADS[model]
    total = sum(seqlens)
    max_seqlen = max(seqlens)
    qkv = torch.randn(total, 3, heads, HEAD_DIM, device=device, generator=generator).to(dtype)
    q, k, v = qkv.unbind(1)  # 3 x (total, H, D)
    cu = torch.zeros(len(seqlens) + 1, dtype=torch.int32, device=device)
    cu[1:] = torch.cumsum(torch.tensor(seqlens, dtype=torch.int32, device=device), 0)
    # padded copies for the dense providers
    padded = torch.zeros(len(seqlens), max_seqlen, 3, heads, HEAD_DIM, dtype=dtype, device=device)  # (B, M, 3, H, D)
    starts = [0]
    for n in seqlens:
        starts.append(starts[-1] + n)
    for b, n in enumerate(seqlens):
        padded[b, :n] = qkv[starts[b]:starts[b] + n]
    pq, pk, pv = (t.transpose(1, 2) for t in padded.unbind(2))  # (B, H, M, D)
    calls: dict[str, Callable | str] = {}
    for provider in attention_providers(device, plan):
        kind, name = provider.split(":", 1)
        if kind == "bk":
            reason = bk_reason(provider, "attention_varlen", device, dtype, plan)
            calls[provider] = reason if reason else (
                lambda b=name: bk.attention_varlen(q, k, v, cu, cu, max_seqlen, max_seqlen, causal=True, backend=b))
        else:
            def call(kernel=name):
                with _sdpa_context(kernel):
                    return F.scaled_dot_product_attention(pq, pk, pv, is_causal=True)

            calls[provider] = call
    n0 = seqlens[0]
    ref64 = testing.reference_attention(q[None, :n0], k[None, :n0], v[None, :n0], causal=True)
    baseline = bk.attention(q[None, :n0], k[None, :n0], v[None, :n0], causal=True, backend="eager")

    def row0(out):
        if out.dim() == 3:  # packed (total, H, D)
            return out[None, :n0]
        return out[:1, :, :n0].transpose(1, 2)  # padded (B, H, M, D) -> (1, n0, H, D)

    pairs = sum(n * (n + 1) // 2 for n in seqlens)
    return Case(
        "varlen", f"{model} {len(seqlens)} seqs total={total} max={max_seqlen} {_dt(dtype)}",
        {"model": model, "seqlens": list(seqlens), "total": total, "max_seqlen": max_seqlen, "nheads": heads,
         "headdim": HEAD_DIM, "causal": True, "dtype": _dt(dtype),
         "flop_convention": "4*H*D*sum_i S_i(S_i+1)/2 (useful work only, also for padded torch-sdpa)"},
        calls, _checker(ref64, baseline, dtype, row0), flops=4 * heads * HEAD_DIM * pairs)


# ----------------------------------------------------------------------------------------------------------------------
# unpad / pad


def unpad_pad_cases(model: str, batch: int, seqlen: int, dtype, device, plan: Plan, generator) -> list[Case]:
    """unpad_input and pad_input of hidden states (B, S, H*D) with row b keeping a length between S/2 and S."""
    hidden_size = MODEL_HEADS[model] * HEAD_DIM
    hidden = torch.randn(batch, seqlen, hidden_size, device=device, generator=generator).to(dtype)
    lens = torch.linspace(seqlen // 2, seqlen, batch, device=device).round().to(torch.int64)
    mask = torch.arange(seqlen, device=device)[None, :] < lens[:, None]  # (B, S) right padding
    nnz = int(lens.sum())
    elt = hidden.element_size()
    ref_unpad, indices, _, _ = bk.unpad_input(hidden, mask, backend="eager")
    ref_pad = bk.pad_input(ref_unpad, indices, batch, seqlen, backend="eager")
    unpad_calls: dict[str, Callable | str] = {}
    pad_calls: dict[str, Callable | str] = {}
    for backend in registry.BACKENDS:
        provider = f"bk:{backend}"
        reason = bk_reason(provider, "gather_rows", device, dtype, plan)
        unpad_calls[provider] = reason or (lambda b=backend: bk.unpad_input(hidden, mask, backend=b)[0])
        reason = bk_reason(provider, "scatter_rows", device, dtype, plan)
        pad_calls[provider] = reason or (
            lambda b=backend: bk.pad_input(ref_unpad, indices, batch, seqlen, backend=b, check_bounds=False))
    # torch's own indexing as the anchor
    unpad_calls["torch:index_select"] = lambda: hidden.reshape(batch * seqlen, -1).index_select(0, indices)

    def torch_pad():
        out = hidden.new_zeros(batch * seqlen, hidden_size)
        out.index_copy_(0, indices, ref_unpad)
        return out.view(batch, seqlen, hidden_size)

    pad_calls["torch:index_copy"] = torch_pad

    def exact(expected):
        def check(provider, out):
            ok = out.shape == expected.shape and bool(torch.equal(out, expected))
            return {"correct": {"value": ok, "unit": "bool"}}
        return check

    params = {"model": model, "batch": batch, "seqlen": seqlen, "hidden": hidden_size, "nnz": nnz, "dtype": _dt(dtype)}
    unpad_bytes = 2 * nnz * hidden_size * elt + batch * seqlen
    pad_bytes = (nnz + batch * seqlen) * hidden_size * elt
    name = f"{model} B={batch} S={seqlen} nnz={nnz} {_dt(dtype)}"
    return [Case("unpad", name, dict(params, byte_convention="nnz rows read and written, plus the (B, S) bool mask"),
                 unpad_calls, exact(ref_unpad), bytes_for=lambda p: unpad_bytes, reference="torch:index_select"),
            Case("pad", name, dict(params, byte_convention="nnz rows read, B*S rows written"),
                 pad_calls, exact(ref_pad), bytes_for=lambda p: pad_bytes, reference="torch:index_copy")]


# ----------------------------------------------------------------------------------------------------------------------
# the section


def run_kernels(device: torch.device, plan: Plan, timer, budget: Budget, progress=None) -> list[dict]:
    """Run every case of ``plan``; returns the records. Cases past the budget are recorded as skipped."""
    generator = torch.Generator(device=device).manual_seed(0)
    reference = reference_provider(device)
    builders: list[tuple[str, Callable[[], Case | list[Case]]]] = []

    def add_prefill(dtype):
        for model in plan.models:
            for seqlen in plan.prefill_seqlens:
                for batch in plan.prefill_batches:
                    builders.append((f"prefill {model} B={batch} S={seqlen} {_dt(dtype)}",
                                     lambda m=model, b=batch, s=seqlen, d=dtype: prefill_case(
                                         m, b, s, True, d, device, plan, generator)))
            for seqlen in plan.prefill_noncausal_seqlens:
                for batch in plan.prefill_batches:
                    builders.append((f"prefill_noncausal {model} B={batch} S={seqlen} {_dt(dtype)}",
                                     lambda m=model, b=batch, s=seqlen, d=dtype: prefill_case(
                                         m, b, s, False, d, device, plan, generator)))

    # Order of importance, so that a budget cut drops the least telling cases: prefill in the first dtype, decode,
    # varlen, unpad/pad, then prefill in the other dtypes.
    add_prefill(plan.dtypes[0])
    for dtype in plan.decode_dtypes:
        for model in plan.models:
            for cache_len in plan.decode_cache_lens:
                for batch in plan.decode_batches:
                    builders.append((f"decode {model} B={batch} L={cache_len} {_dt(dtype)}",
                                     lambda m=model, b=batch, n=cache_len, d=dtype: decode_case(
                                         m, b, n, d, device, plan, generator)))
    dtype = plan.decode_dtypes[0]
    for pack in plan.varlen_packs:
        builders.append((f"varlen {len(pack)} seqs", lambda p=pack: varlen_case(
            plan.models[0], p, dtype, device, plan, generator)))
    for batch, seqlen in plan.unpad_shapes:
        builders.append((f"unpad/pad B={batch} S={seqlen}", lambda b=batch, s=seqlen: unpad_pad_cases(
            plan.models[0], b, s, dtype, device, plan, generator)))
    for other in plan.dtypes[1:]:
        add_prefill(other)

    records: list[dict] = []
    for label, build in (progress(builders, desc="kernels") if progress else builders):
        if budget.exhausted():
            records.append({"section": label.split()[0], "case": label, "provider": "*", "params": {},
                            "figures": {}, "status": "skipped",
                            "reason": "time budget of this run exhausted before this case"})
            continue
        try:
            cases = build()
        except Exception as exc:  # building inputs failed (e.g. out of memory): record it
            records.append({"section": label.split()[0], "case": label, "provider": "*", "params": {},
                            "figures": {}, "status": "failed", "reason": _error_text(exc)})
            continue
        for case in cases if isinstance(cases, list) else [cases]:
            records.extend(run_case(case, timer, reference, budget, device))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return records


__all__ = ["Plan", "gpu_plan", "cpu_plan", "run_kernels", "Budget", "reference_provider"]
