"""Make Triton's CPU interpreter (``TRITON_INTERPRET=1``) run our kernels right: development tooling, not library code.

The library never imports this module. Under the interpreter the Triton backend refuses bfloat16 (and, on an old
interpreter with a new NumPy, every op) with a reason naming this file, until it has been applied: tests/conftest.py,
scripts/sanitize_cases.py --interpret and ``bark-kernels check --interpret`` run from a checkout apply it. ``apply()`` makes
both fixes and returns None when bfloat16 is right, else the reason it is not.

1. Loop bounds (:func:`apply_loop_bounds`). The interpreter keeps every scalar as a 1-element 1-D numpy array, and
   Triton <= 3.6 converts a scalar tensor to a Python int with ``int(array)``, which NumPy 2.4 rejects for arrays with
   ndim > 0 ("only 0-dimensional arrays can be converted to Python scalars"). Every ``for i in range(lo, hi, step)``
   whose bounds are tensors (our kernels' loops over key blocks) then fails. Triton 3.9 converts with
   ``int(array.squeeze())``; this does the same for older versions by wrapping ``interpreter._patch_lang_tensor``
   (which installs ``tl.tensor.__index__`` for each launch).

2. bfloat16 (:func:`apply_bf16`). The interpreter (``triton/runtime/interpreter.py``) keeps bfloat16 values as raw
   ``numpy.uint16`` bits (numpy has no bfloat16). Loads and stores move the bits correctly, but arithmetic, ``tl.dot``
   and most casts then operate on the integers, so any kernel doing bf16 math returns garbage (upstream triton issues
   #4972, #11584). fp32 <-> bf16 casts go through a bit-level converter that truncates instead of rounding to nearest
   even. The fix represents bfloat16 as ``ml_dtypes.bfloat16``, a real numpy floating dtype with the same 2-byte
   layout (so loads/stores of the raw memory stay exact) whose arithmetic and casts round like the hardware:

   - ``_get_np_dtype(tl.bfloat16)`` -> ``ml_dtypes.bfloat16`` (was ``uint16``). Every load, constant, splat, reduction
     and elementwise op of the interpreter picks its numpy dtype through this function, so they all become bf16 math.
     ``create_masked_load`` / ``create_masked_store`` still move uint16 bits through the C++ memory helpers (which
     only know builtin numpy dtypes) and view them as bf16 on the way in / out.
   - ``InterpreterBuilder.cast_impl`` / ``create_fp_to_fp``: any float cast from or to bf16 is a numpy ``astype``
     (round to nearest even), instead of the truncating bit converter.
   - ``InterpreterBuilder.create_dot``: bf16 operands are widened to float32 before ``np.matmul`` (exact products,
     fp32 accumulation, as tensor cores do).

   It patches once, then runs a small self-test kernel (bf16 loads, arithmetic, casts, dot, stores) against PyTorch;
   if anything disagrees (e.g. a Triton version whose interpreter differs) it restores the interpreter as it was and
   returns the reason. Only a passing self-test marks the interpreter (``BF16_VERIFIED``) as one the backend may run
   bfloat16 on. Checked with triton 3.9 and 3.6.
"""

from __future__ import annotations

import logging

from bark_kernels.backends.triton._env import BF16_ERROR, BF16_VERIFIED

logger = logging.getLogger("bark_kernels")

_state: dict = {}  # 'result': None or the reason bf16 is wrong; 'undo': the originals to restore


def _patch() -> None:
    import ml_dtypes
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    if getattr(interpreter, "_bark_kernels_bf16_patched", False):
        return
    bf16_np = np.dtype(ml_dtypes.bfloat16)
    original_get_np_dtype = interpreter._get_np_dtype
    builder_cls = interpreter.InterpreterBuilder
    original_cast_impl = builder_cls.cast_impl
    original_fp_to_fp = builder_cls.create_fp_to_fp
    original_dot = builder_cls.create_dot
    original_masked_load = builder_cls.create_masked_load
    original_masked_store = builder_cls.create_masked_store
    TensorHandle = interpreter.TensorHandle

    def _get_np_dtype(tt_dtype):
        np_dtype = original_get_np_dtype(tt_dtype)
        if np_dtype == np.uint16 and getattr(tt_dtype, "scalar", None) == tl.bfloat16:
            return bf16_np
        return np_dtype

    def _as_bf16(data):
        # values made before the patch (or by code paths that still use uint16) carry the raw bits
        return data.view(bf16_np) if data.dtype == np.uint16 else data

    # the trailing arguments (cache/eviction policy, volatility) differ between Triton versions: pass them through
    def create_masked_load(self, ptrs, mask, other, *rest):
        if ptrs.get_element_ty() != tl.bfloat16:
            return original_masked_load(self, ptrs, mask, other, *rest)
        # the C++ load helper only knows builtin numpy dtypes: move the raw bits as uint16, then view them as bf16
        other_bits = None if other is None else TensorHandle(_as_bf16(other.data).view(np.uint16), tl.uint16)
        bits = np.zeros_like(ptrs.data, dtype=np.uint16) if other_bits is None else other_bits.data
        ret = interpreter._interpreter.load(ptrs.data, mask.data, bits, np.dtype(np.uint16))
        return TensorHandle(ret.view(bf16_np), tl.bfloat16)

    def create_masked_store(self, ptrs, value, mask, *rest):
        if value.data.dtype == bf16_np:
            value = TensorHandle(value.data.view(np.uint16), tl.uint16)
        return original_masked_store(self, ptrs, value, mask, *rest)

    def cast_impl(self, src, dst_type):
        src_ty, dst_ty = src.dtype.scalar, dst_type.scalar
        if tl.bfloat16 in (src_ty, dst_ty):
            data = _as_bf16(src.data) if src_ty == tl.bfloat16 else src.data
            return TensorHandle(data.astype(_get_np_dtype(dst_type)), dst_ty)
        return original_cast_impl(self, src, dst_type)

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        if tl.bfloat16 in (src.dtype.scalar, dst_type.scalar) and src.dtype.scalar.is_floating() and \
                src.dtype.scalar.primitive_bitwidth >= 16 and dst_type.scalar.primitive_bitwidth >= 16:
            return cast_impl(self, src, dst_type)
        return original_fp_to_fp(self, src, dst_type, rounding_mode)

    def create_dot(self, a, b, d, *rest):
        if a.dtype.scalar == tl.bfloat16 or b.dtype.scalar == tl.bfloat16:
            a_data = _as_bf16(a.data).astype(np.float32) if a.dtype.scalar == tl.bfloat16 else a.data
            b_data = _as_bf16(b.data).astype(np.float32) if b.dtype.scalar == tl.bfloat16 else b.data
            out = np.matmul(a_data, b_data, dtype=np.float32).astype(d.data.dtype) + d.data
            return TensorHandle(out, d.dtype.scalar)
        return original_dot(self, a, b, d, *rest)

    originals = [(interpreter, "_get_np_dtype", original_get_np_dtype)]
    originals += [(builder_cls, name, getattr(builder_cls, name)) for name in
                  ("cast_impl", "create_fp_to_fp", "create_dot", "create_masked_load", "create_masked_store")]
    _state["undo"] = originals
    interpreter._get_np_dtype = _get_np_dtype
    builder_cls.cast_impl = cast_impl
    builder_cls.create_fp_to_fp = create_fp_to_fp
    builder_cls.create_dot = create_dot
    builder_cls.create_masked_load = create_masked_load
    builder_cls.create_masked_store = create_masked_store
    interpreter._bark_kernels_bf16_patched = True


def _unpatch() -> None:
    """Put the interpreter back as it was (after a failed self-test: fp16/fp32 must keep working unchanged)."""
    from triton.runtime import interpreter

    for obj, name, original in reversed(_state.pop("undo", [])):
        setattr(obj, name, original)
    interpreter._bark_kernels_bf16_patched = False


def _self_test() -> str | None:
    """Run bf16 loads, arithmetic, casts, a dot and stores through the interpreter; None when all match PyTorch."""
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def _bf16_probe(X, Y, Z, D, F, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tile = offs[:, None] * BLOCK + offs[None, :]
        x = tl.load(X + tile)  # bf16
        y = tl.load(Y + tile)
        tl.store(Z + tile, x * y + x)  # bf16 arithmetic, rounded per op
        tl.store(D + tile, tl.dot(x, y))  # fp32 accumulation of bf16 products
        tl.store(F + tile, (x.to(tl.float32) * 3.0).to(tl.bfloat16))  # casts, round to nearest even

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 16, generator=gen).to(torch.bfloat16)
    y = torch.randn(16, 16, generator=gen).to(torch.bfloat16)
    z = torch.empty_like(x)
    f = torch.empty_like(x)
    d = torch.empty(16, 16, dtype=torch.float32)
    _bf16_probe[(1,)](x, y, z, d, f, BLOCK=16)
    checks = {
        "elementwise x * y + x": (z, (x * y) + x),
        "fp32 -> bf16 cast": (f, (x.float() * 3.0).to(torch.bfloat16)),
    }
    for what, (got, want) in checks.items():
        if not torch.equal(got, want):
            return f"self-test failed: {what} differs from PyTorch"
    dot_ref = x.double() @ y.double()
    if not torch.allclose(d.double(), dot_ref, rtol=1e-5, atol=1e-5):
        return "self-test failed: bf16 tl.dot differs from the float64 product"
    return None


def apply_bf16() -> str | None:
    """Patch the interpreter (idempotent) and self-test it. None when bf16 is right, else the reason it is not."""
    from triton.runtime import interpreter

    if "result" not in _state:
        try:
            _patch()
            import torch

            with torch.device("cpu"):  # this may run inside a `with torch.device("meta")` block
                _state["result"] = _self_test()
        except Exception as exc:  # ml_dtypes missing, or an interpreter layout this patch does not know
            _state["result"] = f"{type(exc).__name__}: {exc}"
        if _state["result"] is not None:
            _unpatch()
            logger.warning("bark_kernels: bfloat16 under the Triton interpreter is disabled: %s", _state["result"])
        setattr(interpreter, BF16_VERIFIED, _state["result"] is None)
        setattr(interpreter, BF16_ERROR, _state["result"])
    return _state["result"]


def apply_loop_bounds() -> None:
    """Idempotent; harmless on a Triton whose interpreter already handles 1-element arrays."""
    from triton.runtime import interpreter

    if getattr(interpreter, "_bark_kernels_index_patched", False) or not hasattr(interpreter, "_patch_lang_tensor"):
        return
    original = interpreter._patch_lang_tensor

    def _patch_lang_tensor(tensor, scope, *rest):
        original(tensor, scope, *rest)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = _patch_lang_tensor
    interpreter._bark_kernels_index_patched = True


def apply() -> str | None:
    """Both fixes, loop bounds first (the bf16 self-test kernel runs after it). Needs ``TRITON_INTERPRET=1`` set before
    triton was imported. None when bfloat16 is right, else the reason it is not (the backend then refuses bf16)."""
    from bark_kernels.backends.triton._env import interpreter_enabled

    if not interpreter_enabled():
        raise RuntimeError("tools.triton_interpreter.apply(): TRITON_INTERPRET=1 is not set (it must be set before "
                           "triton is imported)")
    from bark_kernels.backends.triton import recheck_interpreter

    apply_loop_bounds()
    result = apply_bf16()
    recheck_interpreter()  # the backend judges the interpreter once, at import: tell it that it changed
    return result
