"""Make older Triton interpreters (<= 3.6) work with NumPy >= 2.4 (applied only under ``TRITON_INTERPRET=1``).

The interpreter keeps every scalar as a 1-element 1-D numpy array, and Triton <= 3.6 converts a scalar tensor to a
Python int with ``int(array)``, which NumPy 2.4 rejects for arrays with ndim > 0 ("only 0-dimensional arrays can be
converted to Python scalars"). Every ``for i in range(lo, hi, step)`` whose bounds are tensors (our kernels' loops
over key blocks) then fails. Triton 3.9 converts with ``int(array.squeeze())``; this does the same for older versions
by wrapping ``interpreter._patch_lang_tensor`` (which installs ``tl.tensor.__index__`` for each launch).
"""

from __future__ import annotations


def apply() -> None:
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
