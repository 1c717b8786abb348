"""The project's performance goals: one row per goal, evaluated against a run by ``benchmarks.report.targets``.

Change a goal here, never in the report's code. ``measure`` names a figure that ``report.MEASURES`` computes from a
run's records (with ``args``); ``device`` is the device type the goal is for ("cuda" or "cpu"); a goal is met when
the figure is >= ``threshold``. ``source`` says where the goal was set.
"""

from __future__ import annotations

TARGETS: list[dict] = [
    dict(goal="triton causal prefill fp16 at or above SDPA-flash (worst Bark shape)", device="cuda",
         measure="prefill_triton_vs_flash_fp16", args={}, unit="x SDPA-flash TFLOP/s", threshold=1.0,
         source="issue 5"),
    dict(goal="triton decode bark-small B=64 L=1024 at >= 70% of copy bandwidth", device="cuda",
         measure="decode_fraction_of_copy", args={"model": "bark-small"}, unit="fraction of copy GB/s", threshold=0.7,
         source="issue 5"),
    dict(goal="triton decode bark B=64 L=1024 at >= 70% of copy bandwidth", device="cuda",
         measure="decode_fraction_of_copy", args={"model": "bark"}, unit="fraction of copy GB/s", threshold=0.7,
         source="issue 5"),
    dict(goal="end to end bark-small B=1 >= 10x transformers fp32 eager", device="cuda",
         measure="e2e_best_vs_transformers_fp32", args={}, unit="x", threshold=10.0, source="issue 5"),
    dict(goal="end to end bark-small B=1 >= 3x transformers in fp16", device="cuda",
         measure="e2e_figure", args={"dtype": "float16", "key": "speedup_vs_transformers"}, unit="x", threshold=3.0,
         source="issue 5"),
    dict(goal="end to end on CPU >= 1.5x transformers, same threads", device="cpu",
         measure="e2e_figure", args={"dtype": "float32", "key": "speedup_vs_transformers"}, unit="x", threshold=1.5,
         source="issue 5"),
]
