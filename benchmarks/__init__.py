"""bark-kernels benchmark suite: kernels at Bark's shapes and end-to-end Bark against transformers.

    python -m benchmarks --out DIR [--mode gpu|cpu|auto] [--quick]

writes DIR/results.json (environment and every figure with its unit), DIR/results.md (tables) and PNG plots.
See docs/benchmarks.md for the conventions (FLOPs, bytes, timing, EOS suppression).
"""

from .suite import run

__all__ = ["run"]
