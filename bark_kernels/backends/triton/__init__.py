"""Triton backend: our flash-attention kernels (dense, varlen, KV-cache decode with fused append and split-K) and the
unpad/pad row kernels, registered as torch custom ops in the ``bark_kernels_triton`` namespace.

Runs on CUDA tensors, and on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1`` set before triton is
imported; that is how CI tests it). Triton's interpreter computes bfloat16 on raw uint16 bits (wrong values), and
Triton <= 3.6's interpreter cannot run our loops under NumPy >= 2.4: the development tool tools/triton_interpreter.py
fixes both, and is applied by its users (the tests, ``bark-kernels check --interpret``), never by this package. Until
it is, ``supports()`` refuses what would go wrong (bfloat16; every op on such an old interpreter) and names the tool.
The registry imports this module lazily; without triton installed the import still succeeds and availability() says
why the backend is unusable.
"""

from __future__ import annotations

import torch

from .._common import head_dim_capability, kernel_capability
from ._env import BF16_ERROR, BF16_VERIFIED, TOOL, interpreter_enabled

NAME = "triton"

# any head_dim up to 256: the kernels pad the head block to a power of two (16, 32, 64, 128, 256 need no padding)
HEAD_DIMS = range(1, 257)
ATTENTION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ROWS_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # not installed, or broken
        return f"triton cannot be imported ({type(exc).__name__}: {exc})"
    return None


_IMPORT_ERROR = _triton_import_error()
if _IMPORT_ERROR is None:
    # registers the custom ops (namespace bark_kernels_triton); kernels compile on first launch
    from . import _ops


def _loop_bounds_problem(interpreter) -> str | None:
    """Why this interpreter cannot run loops with tensor bounds (``range(lo, tl.minimum(...))``), or None. Asks the
    interpreter for the ``__index__`` it gives tensors at a launch (through a scope that only records) and converts a
    1-element bound with it, as a loop does: no kernel runs."""
    import warnings

    import numpy as np

    patch_lang_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    if patch_lang_tensor is None:  # a layout this check does not know: nothing to judge
        return None
    installed: dict = {}

    class _Recorder:
        def set_attr(self, obj, name, value):
            installed[name] = value

    class _Scalar:
        class handle:  # noqa: N801 (the interpreter's TensorHandle: .data, a 1-element array)
            data = np.array([3], dtype=np.int32)

    try:
        patch_lang_tensor(type("tensor", (), {}), _Recorder())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # NumPy 1.25-2.3 only warn
            index = installed["__index__"](_Scalar())
    except Exception as exc:
        import triton

        return (f"triton {triton.__version__}'s interpreter cannot run loops with tensor bounds under NumPy "
                f"{np.__version__} ({type(exc).__name__}: {exc}); apply {TOOL} first")
    return None if index == 3 else f"the interpreter's tensor __index__ gave {index!r} for 3; apply {TOOL} first"


def _bf16_problem(interpreter) -> str | None:
    """Why bfloat16 would come out wrong on this interpreter, or None once tools/triton_interpreter.py made it right."""
    if getattr(interpreter, BF16_VERIFIED, False):
        return None
    error = getattr(interpreter, BF16_ERROR, None)
    if error is not None:
        return f"bfloat16 under the Triton interpreter would compute wrong values: the fix of {TOOL} failed ({error})"
    return ("bfloat16 under the Triton interpreter would compute wrong values (it does bf16 math on the raw uint16 bits; "
            f"triton issues #4972, #11584) unless {TOOL} is applied first (tests/conftest.py and "
            "`bark-kernels check --interpret` from a checkout apply it)")


_interpreter_problems: dict[str, str | None] = {"loop_bounds": None, "bf16": None}


def recheck_interpreter() -> None:
    """Judge Triton's interpreter again: at import, and by tools/triton_interpreter.py once it has patched it.
    ``supports()`` only reads the verdict (it may run while torch.compile traces a call)."""
    if _IMPORT_ERROR is None and interpreter_enabled():
        from triton.runtime import interpreter

        _interpreter_problems["loop_bounds"] = _loop_bounds_problem(interpreter)
        _interpreter_problems["bf16"] = _bf16_problem(interpreter)


recheck_interpreter()


def availability() -> str | None:
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    if interpreter_enabled() or torch.cuda.is_available():
        return None
    return "no CUDA device, and TRITON_INTERPRET=1 (Triton's CPU interpreter) is not set"


def supports_head_dim(head_dim: int) -> str | None:
    """None when the attention kernels serve ``head_dim`` (on some device and dtype): checked when a model is built."""
    return head_dim_capability(head_dim, HEAD_DIMS)


def supports(op: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    reason = availability()
    if reason is not None:
        return reason
    if device.type == "cpu":
        if not interpreter_enabled():
            return "CPU tensors need Triton's interpreter (TRITON_INTERPRET=1 set before triton is imported)"
    elif device.type != "cuda":
        return f"device type {device.type!r} is not supported (cuda, or cpu under TRITON_INTERPRET=1)"
    elif not interpreter_enabled() and not torch.cuda.is_available():
        return "CUDA is not available"
    reason = kernel_capability(op, dtype, head_dim, ATTENTION_DTYPES, HEAD_DIMS, ROWS_DTYPES)
    if reason is not None:
        return reason
    if interpreter_enabled():
        reason = _interpreter_problems["loop_bounds"]
        if reason is None and dtype == torch.bfloat16:
            reason = _interpreter_problems["bf16"]
    return reason


def attention(q, k, v, causal, softmax_scale):
    return _ops.attention(q, k, v, bool(causal), float(softmax_scale))


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale):
    return _ops.attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k),
                                   bool(causal), float(softmax_scale))


def attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, causal, softmax_scale):
    return _ops.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, bool(causal), float(softmax_scale))


def gather_rows(x, indices):
    return _ops.gather_rows(x, indices)


def scatter_rows(x, indices, n):
    return _ops.scatter_rows(x, indices, int(n))


OPS = {
    "attention": attention,
    "attention_varlen": attention_varlen,
    "attention_with_kvcache": attention_with_kvcache,
    "gather_rows": gather_rows,
    "scatter_rows": scatter_rows,
}
