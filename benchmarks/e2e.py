"""End to end (placeholder until bark.BarkModel lands)."""

from __future__ import annotations


def run_e2e(device, quick, budget, progress=None) -> dict:
    return {"status": "skipped", "reason": "bark.BarkModel not available", "runs": []}
