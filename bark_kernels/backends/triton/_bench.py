"""Quick GPU benchmark of the Triton kernels against the performance targets (needs CUDA).

    python -m bark_kernels.backends.triton._bench [--dtype fp16] [--json out.json]

- prefill: TFLOP/s of ``attention`` (causal, Sq == Sk) vs PyTorch SDPA's flash backend at Bark's shapes
  (B 1..32, H 12/16, D 64, S 257..1024). Target: triton >= SDPA-flash.
- decode: achieved GB/s of ``attention_with_kvcache`` (Sq 1, append fused) at batch 64, cache 1024, vs the bandwidth
  of a plain device copy of the same bytes. Target: >= 70 % of copy bandwidth.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys

import torch

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def _bench(fn) -> float:
    """Median milliseconds."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def prefill_rows(dtype: torch.dtype) -> list[dict]:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from . import _launchers

    rows = []
    for batch, nheads, seqlen in [(1, 12, 257), (1, 16, 1024), (8, 16, 512), (32, 12, 257), (32, 16, 1024)]:
        head_dim = 64
        qkv = torch.randn(batch, seqlen, 3, nheads, head_dim, device="cuda", dtype=dtype)
        q, k, v = qkv.unbind(2)  # (B, S, H, D) strided views, as Bark produces them
        scale = head_dim ** -0.5
        flops = 4 * batch * nheads * seqlen * seqlen * head_dim / 2  # causal: half the score matrix
        ms_triton = _bench(functools.partial(_launchers.attention_fwd, q, k, v, True, scale))
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, S, D)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            ms_sdpa = _bench(functools.partial(F.scaled_dot_product_attention, qt, kt, vt, is_causal=True,
                                                        scale=scale))
        rows.append(dict(kind="prefill", batch=batch, nheads=nheads, seqlen=seqlen, head_dim=head_dim,
                         triton_tflops=flops / ms_triton / 1e9, sdpa_flash_tflops=flops / ms_sdpa / 1e9,
                         ratio=ms_sdpa / ms_triton))
    return rows


def decode_rows(dtype: torch.dtype) -> list[dict]:
    from . import _launchers

    rows = []
    for batch, nheads, max_seqlen, filled in [(64, 16, 1024, 1023), (64, 16, 1024, 512), (1, 16, 1024, 1023)]:
        head_dim = 64
        k_cache = torch.randn(batch, max_seqlen, nheads, head_dim, device="cuda", dtype=dtype)
        v_cache = torch.randn_like(k_cache)
        q, k, v = torch.randn(batch, 1, 3, nheads, head_dim, device="cuda", dtype=dtype).unbind(2)
        lens = torch.full((batch,), filled, dtype=torch.int32, device="cuda")
        scale = head_dim ** -0.5
        ms = _bench(functools.partial(_launchers.attention_kvcache_fwd, q, k_cache, v_cache, k, v, lens, True,
                                                scale))
        elt = k_cache.element_size()
        bytes_moved = 2 * batch * nheads * (filled + 1) * head_dim * elt  # K and V rows read (the bulk)
        src = torch.empty(bytes_moved // 2, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        ms_copy = _bench(functools.partial(dst.copy_, src))  # reads and writes bytes_moved / 2 each: bytes_moved in total
        gbps, copy_gbps = bytes_moved / ms / 1e6, bytes_moved / ms_copy / 1e6
        rows.append(dict(kind="decode", batch=batch, nheads=nheads, max_seqlen=max_seqlen, filled=filled,
                         head_dim=head_dim, us=ms * 1e3, gbps=gbps, copy_gbps=copy_gbps,
                         fraction_of_copy=gbps / copy_gbps))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype]
    rows = prefill_rows(dtype) + decode_rows(dtype)
    device = torch.cuda.get_device_name()
    for row in rows:
        row.update(device=device, dtype=args.dtype, torch=torch.__version__)
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
