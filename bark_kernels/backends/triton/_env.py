"""Whether Triton runs under its CPU interpreter (``TRITON_INTERPRET=1``), read the way Triton reads it."""

from __future__ import annotations

import os


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")
