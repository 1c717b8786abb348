"""Compile the Triton kernels ahead of time for a GPU architecture, without a GPU (development check).

The interpreter runs kernels as Python, so it cannot see what only the GPU compiler rejects (shape errors in dead
constexpr branches, unsupported ops, shared memory over the limit). This compiles every variant the launchers would
launch, for sm_90 (H100) by default, with ``triton.compile`` and the ptxas bundled with Triton, and reports each
variant's shared memory. It must run with ``TRITON_INTERPRET`` unset (the kernels are then real JIT functions):

    TRITON_INTERPRET=0 python -m tools.aot_check [--quick] [--arch 90]

Each variant is compiled with the specialization a real launch gets at Bark's shapes: the JIT marks every pointer that
is 16-byte aligned and every integer divisible by 16 with ``tt.divisibility = 16`` (our strides are multiples of
head_dim, our tensors come from the caching allocator). Without those attributes the compiler cannot prove the loads
contiguous and aligned: it emits scalar 2-byte loads, no ``cp.async`` pipeline and a fraction of the shared memory, so
a check without them says nothing about the kernels that will actually run (it reported 24 KB where the real decode
kernel takes 70 KB).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}  # bytes per block (opt-in maximum)
# register spills above this (bytes of spill stores per thread) fail the check: a few words spilled to L1 cost little,
# hundreds of bytes (the fp32 FMA dot at D = 128 reached 30 KB) make a kernel several times slower
MAX_SPILL_BYTES = 256
_TL_NAME = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _attn_variants(quick: bool):
    from bark_kernels.backends.triton import _launchers as L
    from bark_kernels.backends.triton._attention_kernels import MODE_DENSE, MODE_KVCACHE, MODE_VARLEN

    dtypes = [torch.float16] if quick else [torch.float16, torch.bfloat16, torch.float32]
    # every mode for the unpadded head dims; for the padded ones (8 -> 16, 40 -> 64, 80 and 96 -> 128, 160 -> 256)
    # and the widest (256, its own tiles) the causal prefill, varlen and the split decode with append
    head_dims = [64, 40] if quick else [16, 32, 64, 128, 8, 40, 80, 96, 160, 256]
    for dtype in dtypes:
        for head_dim in head_dims:
            cases = [(MODE_DENSE, True, False, False, L.prefill_config(head_dim, dtype, 1024, 1024))]
            if not quick and head_dim not in (16, 32, 64, 128):
                cases.append((MODE_VARLEN, True, False, False, L.prefill_config(head_dim, dtype, 512, 512)))
            elif not quick:
                cases += [
                    (MODE_DENSE, False, False, False, L.prefill_config(head_dim, dtype, 32, 32)),
                    (MODE_VARLEN, True, False, False, L.prefill_config(head_dim, dtype, 512, 512)),
                    (MODE_KVCACHE, True, True, False, L.decode_config(head_dim, dtype, 1, 1024)),
                    (MODE_KVCACHE, False, False, True, L.decode_config(head_dim, dtype, 1, 1024)),
                    (MODE_KVCACHE, True, True, True, L.decode_config(head_dim, dtype, 64, 1024)),
                    (MODE_KVCACHE, True, True, True, L.decode_config(head_dim, dtype, 1024, 1024)),
                ]
            cases.append((MODE_KVCACHE, True, True, True, L.decode_config(head_dim, dtype, 1, 1024)))
            for mode, causal, has_new, split, cfg in cases:
                yield dtype, head_dim, mode, causal, has_new, split, cfg


def _signature(fn, pointer_types: dict[str, str], floats: tuple[str, ...], consts: dict) -> dict[str, str]:
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in pointer_types:
            sig[name] = pointer_types[name]
        elif name in floats:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def _aligned_args(fn, sig) -> dict:
    """``tt.divisibility = 16`` on every pointer and stride (and the split size, a multiple of BLOCK_N), as the JIT
    specializes them at a real launch with aligned tensors and strides that are multiples of 16 elements."""
    return {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
            if sig[name].startswith("*") or name.startswith("stride_") or name == "split_size"}


def _ptxas_usage(ptx: str, arch: int) -> tuple[int, int] | None:
    """(registers per thread, spill-store bytes) from Triton's bundled ptxas -v, or None if it cannot tell."""
    import os
    import re
    import subprocess
    import tempfile

    try:
        from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "kernel.ptx")
            with open(src, "w") as f:
                f.write(ptx)
            run = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name={sm_arch_from_capability(arch)}", src,
                                  "-o", os.path.join(tmp, "kernel.o")], capture_output=True, text=True, timeout=300)
    except Exception:
        return None
    regs = re.search(r"Used (\d+) registers", run.stderr)
    spills = re.search(r"(\d+) bytes spill stores", run.stderr)
    if run.returncode != 0 or regs is None or spills is None:
        return None
    return int(regs.group(1)), int(spills.group(1))


def _compile(fn, sig, consts, target, num_warps, num_stages, aligned: bool = True, attrs: dict | None = None,
             launch_pdl: bool = False):
    import triton
    from triton.compiler import ASTSource

    if attrs is None:
        attrs = _aligned_args(fn, sig) if aligned else {}
    options = dict(num_warps=num_warps, num_stages=num_stages)
    if launch_pdl:
        options["launch_pdl"] = True
    return triton.compile(ASTSource(fn, sig, consts, attrs), target=target, options=options)


def _decode_variants(quick: bool, arch: int):
    """The fused decode step's kernels (bark_kernels/backends/triton/_decode_kernels.py) as their launchers configure
    them at Bark's shapes: bark-small (768 wide, 12 heads) and bark (1024, 16 heads), batch 1 and 64, semantic
    (10,001 logits) and coarse (1,024 / 1,072) heads; PDL on for sm_90+. Yields (label, kernel, pointer types, float
    args, constexprs, args divisible by 16, num_warps, num_stages, launch_pdl). A weight's unit stride is a constexpr 1,
    as the JIT specializes it."""
    from bark_kernels.backends.triton import _decode_kernels as K
    from bark_kernels.backends.triton import _decode_ops as O

    pdl = arch >= 90 and K.HAS_GDC
    dtypes = [torch.float16] if quick else [torch.float16, torch.bfloat16, torch.float32]
    widths = [768] if quick else [768, 1024]
    batches = [1] if quick else [1, 64]
    for dtype in dtypes:
        t = _TL_NAME[dtype]
        for width in widths:
            for batch in batches:
                for epilogue, n_out, out_t in ((K.EPILOGUE_QKV, 3 * width, t), (K.EPILOGUE_GELU, 4 * width, t),
                                               (K.EPILOGUE_LOGITS, 10_001, "fp32")):
                    if quick and epilogue != K.EPILOGUE_QKV:
                        continue
                    cfg = O.linear_config(batch, width, n_out, dtype)
                    consts = dict(HAS_LN_BIAS=True, HAS_BIAS=epilogue != K.EPILOGUE_LOGITS, EPILOGUE=epilogue,
                                  BLOCK_B=cfg.block_b, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                                  SINGLE_K=width <= cfg.block_k, IEEE=dtype == torch.float32, USE_PDL=pdl,
                                  stride_wk=1)
                    pointers = {n: f"*{t}" for n in ("X", "LnW", "LnB", "W", "Bias", "K_cache", "V_cache")}
                    pointers.update(Out=f"*{out_t}", Seqlens="*i32")
                    divisible = {"X", "LnW", "LnB", "W", "Bias", "Out", "K_cache", "V_cache", "Seqlens", "n_in",
                                 "stride_xb", "stride_wn", "stride_kb", "stride_ks", "stride_kh", "stride_vb",
                                 "stride_vs", "stride_vh", "head_dim"}
                    if epilogue != K.EPILOGUE_LOGITS:
                        divisible |= {"n_out", "stride_ob"}
                    yield (f"decode ln_linear {t} C={width} B={batch} epilogue={epilogue} N={n_out} BB={cfg.block_b} "
                           f"BN={cfg.block_n} BK={cfg.block_k} pdl={pdl}", K._ln_linear_kernel, pointers, ("eps",),
                           consts, divisible, cfg.num_warps, cfg.num_stages, pdl)
                for n_in, n_out in ((width, width), (4 * width, width)):
                    cfg = O.linear_config(batch, n_in, n_out, dtype)
                    consts = dict(HAS_BIAS=True, BLOCK_B=cfg.block_b, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                                  SINGLE_K=n_in <= cfg.block_k, IEEE=dtype == torch.float32, USE_PDL=pdl, stride_wk=1)
                    pointers = {n: f"*{t}" for n in ("A", "W", "Bias", "X")}
                    divisible = {"A", "W", "Bias", "X", "n_in", "n_out", "stride_ab", "stride_wn", "stride_xb"}
                    yield (f"decode linear_residual {t} K={n_in} N={n_out} B={batch} BB={cfg.block_b} "
                           f"BN={cfg.block_n} BK={cfg.block_k} pdl={pdl}", K._linear_residual_kernel, pointers, (),
                           consts, divisible, cfg.num_warps, cfg.num_stages, pdl)
        for head_dim in ([64] if quick else [64, 16, 128, 40, 256]):
            for splits in (1, 8):
                pad = O.head_dim_pad(head_dim)
                block_n = 64 if pad <= 64 else 32
                consts = dict(HEAD_DIM=head_dim, HEAD_DIM_PAD=pad, NUM_SPLITS=splits,
                              SPLITS_POW2=triton_next_pow2(splits), BLOCK_N=block_n, USE_PDL=pdl)
                pointers = {n: f"*{t}" for n in ("Q", "K_cache", "V_cache", "Out")}
                pointers.update(Seqlens="*i32", Acc_ws="*fp32", M_ws="*fp32", L_ws="*fp32", Counter="*i32")
                divisible = set(pointers) | {"split_size", "stride_qb", "stride_kb", "stride_ks", "stride_kh",
                                             "stride_vb", "stride_vs", "stride_vh", "stride_ob"}
                yield (f"decode attention {t} D={head_dim} splits={splits} BN={block_n} pdl={pdl}",
                       K._decode_attention_kernel, pointers, ("qk_scale",), consts, divisible,
                       O.attention_warps(head_dim, splits, dtype), 2, pdl)
        consts = dict(BLOCK_C=1024, USE_PDL=pdl)
        pointers = {"Tokens": "*i64", "Seqlens": "*i32", "Wte": f"*{t}", "Wpe": f"*{t}", "X": f"*{t}"}
        yield (f"decode embed {t} C=1024 pdl={pdl}", K._embed_kernel, pointers, (), consts,
               set(pointers) | {"n_embd", "stride_te", "stride_pe", "stride_xb"}, 4, 1, pdl)
    for n, sample in ((10_001, True), (10_001, False), (1_072, True)):
        semantic = n == 10_001
        consts = dict(SEMANTIC=semantic, HAS_SUPPRESS=semantic, HAS_MIN_NEW=semantic, HAS_MIN_EOS_P=semantic,
                      DO_SAMPLE=sample, HAS_TEMPERATURE=sample, HAS_TOP_K=sample, HAS_TOP_P=sample,
                      BLOCK_V=O.pick_block(n), USE_PDL=pdl)
        pointers = {"Logits": "*fp32", "ExpQ": "*fp32", "Suppressed": "*u8", "Finished": "*u8", "Record": "*i64",
                    "Col": "*i64", "Tokens": "*i64", "Seqlens": "*i32", "Counter": "*i32"}
        yield (f"decode pick n={n} sample={sample} BV={O.pick_block(n)} pdl={pdl}", K._pick_kernel, pointers,
               ("min_eos_p", "temperature", "top_p"), consts, set(pointers), O.pick_warps(n), 1, pdl)


def triton_next_pow2(n: int) -> int:
    import triton

    return triton.next_power_of_2(n)


def run(arch: int = 90, quick: bool = False, out=sys.stdout, decode_only: bool = False) -> list[str]:
    """Compile the variants; returns the failures (empty when every variant compiled within the shared limit)."""
    from triton.backends.compiler import GPUTarget

    from bark_kernels.backends.triton import _launchers as L
    from bark_kernels.backends.triton._attention_kernels import _attn_fwd_kernel, _combine_splits_kernel
    from bark_kernels.backends.triton._rows_kernels import _gather_rows_kernel, _scatter_rows_kernel

    if not hasattr(_attn_fwd_kernel, "arg_names"):
        return ["kernels are interpreted (TRITON_INTERPRET=1): run with TRITON_INTERPRET=0"]
    target = GPUTarget("cuda", arch, 32)
    _last_ptx: dict[str, str] = {}
    limit = SHARED_LIMIT.get(arch, 101376)
    failures = []

    def check(label, fn, sig, consts, warps, stages, attrs=None, launch_pdl=False):
        t0 = time.time()
        _last_ptx["ptx"] = ""
        try:
            kernel = _compile(fn, sig, consts, target, warps, stages, attrs=attrs, launch_pdl=launch_pdl)
        except Exception as exc:
            failures.append(f"{label}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            print(f"FAIL {label}: {exc}", file=out)
            return
        shared = kernel.metadata.shared
        status = "ok" if shared <= limit else "OVER"
        if shared > limit:
            failures.append(f"{label}: shared memory {shared} > {limit}")
        # the attention kernels stream K/V through an asynchronous copy pipeline; scalar loads instead mean the
        # compiler could not prove the tiles contiguous and aligned (a bandwidth loss of several times)
        ptx = kernel.asm.get("ptx", "")
        _last_ptx["ptx"] = ptx
        if label.startswith("attn") and "cp.async" not in ptx:
            status = "SLOW"
            failures.append(f"{label}: no cp.async in the PTX (K/V loads are not pipelined)")
        usage = _ptxas_usage(ptx, arch)
        regs = "registers ?" if usage is None else f"{usage[0]} registers, {usage[1]} B spilled"
        # the fused decode kernels must not spill at all (each runs once per layer per step, at ~1-3 µs)
        limit_spill = 0 if label.startswith("decode") else MAX_SPILL_BYTES
        if usage is not None and usage[1] > limit_spill:
            status = "SPILL"
            failures.append(f"{label}: {usage[1]} bytes of register spills > {limit_spill}")
        print(f"{status:4s} {label}: shared {shared} B, {regs}, {time.time() - t0:.1f}s", file=out)

    for dtype, head_dim, mode, causal, has_new, split, cfg in ([] if decode_only else _attn_variants(quick)):
        tl_dtype = _TL_NAME[dtype]
        consts = dict(MODE=mode, CAUSAL=causal, HAS_NEW=has_new, FROM_NEW=has_new, SPLIT=split,
                      BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, HEAD_DIM=head_dim,
                      HEAD_DIM_PAD=L.head_dim_pad(head_dim), IEEE=dtype == torch.float32)
        pointers = {n: f"*{tl_dtype}" for n in ("Q", "K", "V", "Out", "K_new", "V_new")}
        pointers.update({n: "*i32" for n in ("cu_seqlens_q", "cu_seqlens_k", "cache_seqlens")})
        pointers.update({n: "*fp32" for n in ("Acc_ws", "M_ws", "L_ws")})
        label = (f"attn {tl_dtype} D={head_dim} mode={mode} causal={causal} new={has_new} split={split} "
                 f"BM={cfg.block_m} BN={cfg.block_n} warps={cfg.num_warps} stages={cfg.num_stages}")
        check(label, _attn_fwd_kernel, _signature(_attn_fwd_kernel, pointers, ("qk_scale",), consts), consts,
              cfg.num_warps, cfg.num_stages)
    for head_dim in ([] if decode_only else [64, 40] if quick else [16, 64, 128, 8, 80, 256]):
        consts = dict(NUM_SPLITS=5, SPLITS_POW2=8, HEAD_DIM=head_dim, HEAD_DIM_PAD=L.head_dim_pad(head_dim))
        pointers = {"Acc_ws": "*fp32", "M_ws": "*fp32", "L_ws": "*fp32", "Out": "*fp16"}
        check(f"combine D={head_dim}", _combine_splits_kernel,
              _signature(_combine_splits_kernel, pointers, (), consts), consts, 1 if head_dim <= 64 else 2, 1)
    for fn in (() if decode_only else (_gather_rows_kernel, _scatter_rows_kernel)):
        consts = dict(BLOCK_R=4, BLOCK_F=1024)
        pointers = {"X": "*bf16", "Indices": "*i64", "Out": "*bf16"}
        check(f"{fn.__name__} BLOCK_F=1024", fn, _signature(fn, pointers, (), consts), consts, 4, 1)
    for label, fn, pointers, floats, consts, divisible, warps, stages, pdl in _decode_variants(quick, arch):
        sig = _signature(fn, pointers, floats, consts)
        attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
                 if name in divisible and sig[name] != "constexpr"}
        check(label, fn, sig, consts, warps, stages, attrs=attrs, launch_pdl=pdl)
        if pdl and "griddepcontrol.wait" not in _last_ptx.get("ptx", ""):
            failures.append(f"{label}: PDL on but no griddepcontrol.wait in the PTX")
    return failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability as an int (90 = H100, 80 = A100)")
    parser.add_argument("--quick", action="store_true", help="a few representative variants only")
    parser.add_argument("--decode-only", action="store_true", help="only the fused decode step's kernels")
    args = parser.parse_args(argv)
    failures = run(args.arch, args.quick, decode_only=args.decode_only)
    print(f"{len(failures)} failure(s)")
    for f in failures:
        print("  " + f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
