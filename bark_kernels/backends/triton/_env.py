"""Whether Triton runs under its CPU interpreter (``TRITON_INTERPRET=1``), read the way Triton reads it; and the marks
the development tool tools/triton_interpreter.py leaves on Triton's interpreter module (the library only reads them)."""

from __future__ import annotations

import os

BF16_VERIFIED = "_bark_kernels_bf16_verified"  # True once the bf16 fix is applied and its self-test kernel passed
BF16_ERROR = "_bark_kernels_bf16_error"  # why the bf16 fix was not applied (its self-test failed), else None
TOOL = "tools/triton_interpreter.py"


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")
