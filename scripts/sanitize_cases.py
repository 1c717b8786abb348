"""A small, named set of kernel calls for compute-sanitizer (memcheck, racecheck): every op of the triton and cuda
backends at the shapes where indexing goes wrong first (odd lengths, empty and one-token sequences, a cache filled to
its last slot, the split-K decode path, strided fused-qkv views), each checked against the float64 reference.

    python scripts/sanitize_cases.py [--backends triton,cuda] [--interpret]
    compute-sanitizer --tool memcheck python scripts/sanitize_cases.py      # PYTORCH_NO_CUDA_MEMORY_CACHING=1

Run it once without the sanitizer first: it compiles every Triton variant (cached on disk), so the sanitized runs only
launch. Prints one line per case and exits 1 if any case fails (wrong result or an exception). With PyTorch's caching
allocator on, an overrun that stays inside a cached block is invisible to memcheck: the GPU command sets
PYTORCH_NO_CUDA_MEMORY_CACHING=1 for the sanitized runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default="triton,cuda", help="comma-separated bark_kernels backends")
    parser.add_argument("--interpret", action="store_true", help="CPU tensors, Triton under its interpreter")
    parser.add_argument("--dtypes", default="float16,bfloat16", help="comma-separated dtypes")
    args = parser.parse_args(argv)
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root: tools/
        from tools import triton_interpreter

        triton_interpreter.apply()  # exact bf16 under the interpreter (else the triton backend refuses bf16)
    import torch

    import bark_kernels as bk
    from bark_kernels import registry, testing

    device = torch.device("cpu" if args.interpret or not torch.cuda.is_available() else "cuda")
    gen = torch.Generator().manual_seed(0)

    def rand(*shape, dtype):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    cases = []

    def case(name):
        def register(fn):
            cases.append((name, fn))
            return fn

        return register

    # Each case: fn(backend, dtype) raises on a wrong answer.
    @case("attention causal Sq<Sk odd, fused-qkv views, D=64")
    def _(backend, dtype):
        qkv = rand(2, 37, 3, 3, 64, dtype=dtype)  # (B, T, 3, H, D)
        q, k, v = qkv.unbind(2)
        q = q[:, -13:]  # Sq=13 < Sk=37, strided
        out = bk.attention(q, k, v, causal=True, backend=backend)
        testing.assert_close_to_reference(out, testing.reference_attention(q, k, v, True),
                                          bk.attention(q, k, v, causal=True, backend="eager"), dtype)

    @case("attention non-causal Sq>Sk, D=128")
    def _(backend, dtype):
        q, k, v = rand(1, 70, 2, 128, dtype=dtype), rand(1, 33, 2, 128, dtype=dtype), rand(1, 33, 2, 128, dtype=dtype)
        out = bk.attention(q, k, v, causal=False, backend=backend)
        testing.assert_close_to_reference(out, testing.reference_attention(q, k, v, False),
                                          bk.attention(q, k, v, causal=False, backend="eager"), dtype)

    @case("attention_varlen lengths 0, 1, 67, 5 (causal)")
    def _(backend, dtype):
        lengths = [0, 1, 67, 5]
        total = sum(lengths)
        cu = torch.tensor([0, 0, 1, 68, 73], dtype=torch.int32, device=device)
        q, k, v = (rand(total, 2, 64, dtype=dtype) for _ in range(3))
        out = bk.attention_varlen(q, k, v, cu, cu, max(lengths), max(lengths), causal=True, backend=backend)
        testing.assert_close_to_reference(
            out, testing.reference_attention_varlen(q, k, v, cu, cu, True),
            bk.attention_varlen(q, k, v, cu, cu, max(lengths), max(lengths), causal=True, backend="eager"), dtype)

    def kvcache_case(batch, s_max, lengths, heads, dim, sq=1):
        def fn(backend, dtype):
            k_cache, v_cache = rand(batch, s_max, heads, dim, dtype=dtype), rand(batch, s_max, heads, dim, dtype=dtype)
            lens = torch.tensor(lengths, dtype=torch.int32, device=device)
            q, k, v = (rand(batch, sq, heads, dim, dtype=dtype) for _ in range(3))
            ref, k_exp, v_exp = testing.reference_attention_with_kvcache(q, k_cache, v_cache, k, v, lens)
            base = bk.attention_with_kvcache(q, k_cache.clone(), v_cache.clone(), k, v, cache_seqlens=lens,
                                             backend="eager")
            out = bk.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=lens, backend=backend)
            testing.assert_close_to_reference(out, ref, base, dtype)
            if not (torch.equal(k_cache, k_exp) and torch.equal(v_cache, v_exp)):
                raise AssertionError("cache contents differ from the expected in-place append")

        return fn

    # lengths: empty row, a row whose append fills the last slot, a long row (split-K on a big GPU)
    case("attention_with_kvcache decode, lengths 0 / S_max-1 / 900, S_max 1024")(
        kvcache_case(3, 1024, [0, 1023, 900], 4, 64))
    case("attention_with_kvcache decode, batch 1, one long row (split-K), D=128")(
        kvcache_case(1, 1024, [1000], 2, 128))
    case("attention_with_kvcache Sq=5 append, lengths 0 / 251, S_max 256")(
        kvcache_case(2, 256, [0, 251], 2, 64, sq=5))

    @case("fused decode kernels (triton only): split-K attention with the in-launch combine, LN+q/k/v append, pick")
    def _(backend, dtype):
        if backend != "triton":  # the fused decode step is Triton's (bark_kernels.backends.triton.decode)
            return
        from bark_kernels.backends.triton import decode

        batch, heads, dim, s_max = 3, 4, 64, 1024
        width = heads * dim
        lens = torch.tensor([0, 1022, 700], dtype=torch.int32, device=device)  # the new key sits at position lens[b]
        k_cache, v_cache = rand(batch, s_max, heads, dim, dtype=dtype), rand(batch, s_max, heads, dim, dtype=dtype)
        q = rand(batch, width, dtype=dtype)
        q4 = q.view(batch, 1, heads, dim)
        ref, _, _ = testing.reference_attention_with_kvcache(q4, k_cache, v_cache, None, None, lens + 1)
        base = bk.attention_with_kvcache(q4, k_cache, v_cache, None, None, cache_seqlens=lens + 1, backend="eager")
        for splits in (1, 5):
            rows = batch * heads
            out = torch.zeros(batch, width, dtype=dtype, device=device)
            counter = torch.zeros(rows, dtype=torch.int32, device=device)
            decode.fused_attention(q, k_cache, v_cache, lens, out,
                                   torch.zeros(splits, rows, decode.head_dim_pad(dim), device=device),
                                   torch.zeros(splits, rows, device=device), torch.zeros(splits, rows, device=device),
                                   counter, dim ** -0.5)
            testing.assert_close_to_reference(out.view(batch, 1, heads, dim), ref, base, dtype)
            if int(counter.abs().sum()) != 0:
                raise AssertionError("an attention counter was not reset by its combining program")
        x, lnw, w = rand(batch, width, dtype=dtype), rand(width, dtype=dtype), rand(3 * width, width, dtype=dtype)
        qo = torch.zeros(batch, width, dtype=dtype, device=device)
        before = k_cache.clone()
        decode.fused_ln_qkv(x, lnw, None, w, None, lens, qo, k_cache, v_cache, 1e-5)
        changed = (k_cache != before).any(dim=(2, 3)).nonzero().tolist()  # (row, position) pairs written
        if sorted(changed) != [[b, int(n)] for b, n in enumerate(lens.tolist())]:
            raise AssertionError(f"the q/k/v kernel wrote cache positions {changed}, expected each row's length")
        logits = rand(batch, 1072, dtype=torch.float32)
        record = torch.zeros(batch, 4, dtype=torch.long, device=device)
        col, tokens = torch.zeros((), dtype=torch.long, device=device), torch.zeros(batch, dtype=torch.long,
                                                                                    device=device)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        seq = lens.clone()
        decode.fused_pick(logits, None, None, finished, record, col, tokens, seq,
                          torch.zeros(1, dtype=torch.int32, device=device), 11024, -1, 0, 0, 0.0, False, 1.0, 0, 1.0)
        if not (torch.equal(tokens, logits.argmax(-1) + 11024) and torch.equal(record[:, 0], tokens)
                and int(col) == 1 and torch.equal(seq, lens + 1)):
            raise AssertionError("pick: the greedy token, the record, col or the lengths are wrong")

    @case("unpad_input / pad_input round trip, left padding")
    def _(backend, dtype):
        hidden = rand(3, 9, 2, 64, dtype=dtype)
        mask = torch.ones(3, 9, dtype=torch.bool, device=device)
        mask[0, :4] = False
        mask[2, :] = False
        mask[2, -1] = True
        packed, idx, cu, max_len = bk.unpad_input(hidden, mask, backend=backend)
        back = bk.pad_input(packed, idx, 3, 9, backend=backend)
        if not torch.equal(back, hidden * mask[..., None, None].to(dtype)):
            raise AssertionError("pad_input(unpad_input(x)) != x * mask")

    failures = 0
    ran = 0
    for backend in [b for b in args.backends.split(",") if b]:
        why = registry.availability(backend)
        if why is not None:
            print(f"SKIP {backend}: unavailable: {why}")
            continue
        for dtype_name in [d for d in args.dtypes.split(",") if d]:
            dtype = getattr(torch, dtype_name)
            if registry.why_not(backend, "attention", device, dtype, 64) is not None:
                print(f"SKIP {backend} {dtype_name}: {registry.why_not(backend, 'attention', device, dtype, 64)}")
                continue
            for name, fn in cases:
                t0 = time.perf_counter()
                try:
                    fn(backend, dtype)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    status = "ok"
                except Exception as exc:  # report every case, keep going
                    failures += 1
                    status = f"FAIL {type(exc).__name__}: {str(exc)[:300]}"
                ran += 1
                print(f"{status.split()[0]:<4} {backend:<7} {dtype_name:<9} {name} ({time.perf_counter() - t0:.2f}s)"
                      + ("" if status == "ok" else f"\n     {status}"), flush=True)
    print(f"sanitize_cases: {ran} cases, {failures} failed, device {device}")
    if ran == 0:
        print("sanitize_cases: no case ran (no backend available)")
        return 1
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
