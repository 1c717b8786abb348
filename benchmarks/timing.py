"""Timers: CUDA events on a GPU (L2 flushed before every timed call), ``time.perf_counter`` on a CPU.

Both exclude warm-up calls and return every timed sample, so the caller reports the median and the p20/p80 of the
same samples. Nothing here invents a number: a timer either returns the samples it measured or raises.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Timing:
    """Times of one callable, in milliseconds; ``samples`` are the timed calls (warm-up excluded)."""

    samples_ms: list[float]
    warmup_calls: int
    method: str

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_ms)

    def quantile_ms(self, q: float) -> float:
        """Linear-interpolated quantile of the samples, q in [0, 1]."""
        xs = sorted(self.samples_ms)
        if len(xs) == 1:
            return xs[0]
        pos = q * (len(xs) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(xs) - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    def figures(self) -> dict:
        return {
            "median": {"value": self.median_ms, "unit": "ms"},
            "p20": {"value": self.quantile_ms(0.2), "unit": "ms"},
            "p80": {"value": self.quantile_ms(0.8), "unit": "ms"},
            "min": {"value": min(self.samples_ms), "unit": "ms (fastest timed call; robust to interference)"},
            "timed_calls": {"value": len(self.samples_ms), "unit": "count"},
        }


class CudaTimer:
    """CUDA-event timer: each timed call is preceded by an L2 flush (a 256 MiB memset) that is NOT timed.

    Warm-up: calls until ``warmup_ms`` of GPU time (at least 2) are run and discarded. Then up to ``max_calls`` calls
    are timed, stopping early once ``rep_ms`` of GPU time has been spent (at least ``min_calls``).
    """

    def __init__(self, device: torch.device, warmup_ms: float = 25.0, rep_ms: float = 100.0, min_calls: int = 5,
                 max_calls: int = 200):
        self.device = device
        self.warmup_ms, self.rep_ms = warmup_ms, rep_ms
        self.min_calls, self.max_calls = min_calls, max_calls
        self._flush = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device=device)

    def __call__(self, fn: Callable[[], object]) -> Timing:
        # Estimate one call's time from a few calls (these count as warm-up).
        fn()
        torch.cuda.synchronize(self.device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(3):
            fn()
        end.record()
        torch.cuda.synchronize(self.device)
        estimate = max(start.elapsed_time(end) / 3, 1e-3)
        warmup = max(2, int(self.warmup_ms / estimate))
        for _ in range(warmup):
            fn()
        n = int(min(self.max_calls, max(self.min_calls, self.rep_ms / estimate)))
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        for i in range(n):
            self._flush.zero_()
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize(self.device)
        samples = [s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)]
        return Timing(samples, warmup + 4, "cuda-events, L2 flushed before each call")


class CpuTimer:
    """perf_counter timer: ``warmup_calls`` discarded calls, then calls timed one by one until ``rep_s`` seconds of
    timed calls (at least ``min_calls``, at most ``max_calls``). Before each timed call the CPU caches are flushed by
    writing a ``flush_mib`` buffer (not timed), so small working sets are not served from cache."""

    def __init__(self, warmup_calls: int = 2, rep_s: float = 0.3, min_calls: int = 3, max_calls: int = 100,
                 flush_mib: int = 64):
        self.warmup_calls, self.rep_s = warmup_calls, rep_s
        self.min_calls, self.max_calls = min_calls, max_calls
        self.flush_mib = flush_mib
        self._flush = torch.empty(flush_mib * 1024 * 1024, dtype=torch.int8) if flush_mib else None

    def __call__(self, fn: Callable[[], object]) -> Timing:
        for _ in range(self.warmup_calls):
            fn()
        samples = []
        while len(samples) < self.max_calls:
            if self._flush is not None:
                self._flush.fill_(len(samples) & 0x7F)
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
            if len(samples) >= self.min_calls and sum(samples) >= self.rep_s * 1e3:
                break
        flushed = f", caches flushed ({self.flush_mib} MiB write, untimed) before each" if self._flush is not None else ""
        return Timing(samples, self.warmup_calls, f"perf_counter, one call per sample{flushed}")


def make_timer(device: torch.device, quick: bool = False):
    if device.type == "cuda":
        return CudaTimer(device, warmup_ms=10 if quick else 25, rep_ms=30 if quick else 60)
    if quick:
        return CpuTimer(warmup_calls=1, rep_s=0.02, min_calls=2, max_calls=10, flush_mib=8)
    return CpuTimer(warmup_calls=2, rep_s=0.3, min_calls=3, max_calls=100, flush_mib=64)


def copy_bandwidth(device: torch.device, timer, nbytes: int) -> dict:
    """Device copy bandwidth: ``dst.copy_(src)`` of ``nbytes``; counts bytes read + written. Returns figures."""
    n = nbytes // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)

    def copy():
        dst.copy_(src)

    t = timer(copy)
    moved = 2 * n * 4
    figs = t.figures()
    figs["bandwidth"] = {"value": moved / (t.median_ms * 1e-3) / 1e9, "unit": "GB/s"}
    figs["bytes"] = {"value": moved, "unit": "B"}
    return figs
