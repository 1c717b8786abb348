"""Bulk synthesis's progress line and summary: rows done / failed of the rows to run, audio seconds per wall second,
an ETA; at most one line every ``every`` seconds (and one at the end), never ``\\r`` updates, so logs stay readable."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

__all__ = ["Progress", "format_seconds"]


def format_seconds(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


@dataclass
class Progress:
    """Counts the rows of one run. ``total``: rows to run this time; ``skipped``: rows complete from an earlier run;
    ``show``: print progress lines to ``stream`` (default sys.stderr)."""

    total: int
    skipped: int = 0
    show: bool = True
    every: float = 2.0
    stream: object = None
    ok: int = 0
    failed: int = 0
    ran: int = 0  # rows that went through a worker (the rate and the ETA count these, not the rows failed up front)
    audio_seconds: float = 0.0
    start: float = field(default_factory=time.perf_counter)
    _last: float = 0.0

    @property
    def done(self) -> int:
        return self.ok + self.failed

    @property
    def wall_seconds(self) -> float:
        return time.perf_counter() - self.start

    def update(self, entry: dict) -> None:
        if entry.get("worker") != "driver":
            self.ran += 1
        if entry.get("status") == "ok":
            self.ok += 1
            self.audio_seconds += float(entry.get("audio_seconds") or 0.0)
        else:
            self.failed += 1
        now = time.perf_counter()
        if self.show and (now - self._last >= self.every or self.done == self.total):
            self._last = now
            print(self.line(), file=self.stream or sys.stderr, flush=True)

    def line(self) -> str:
        wall = self.wall_seconds
        rate = self.ran / wall if wall > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        return (f"rows {self.done}/{self.total} ({self.ok} ok, {self.failed} failed)  "
                f"{self.audio_seconds / wall if wall > 0 else 0.0:.2f} audio-s/s  {rate:.2f} rows/s  "
                f"elapsed {format_seconds(wall)}  ETA {format_seconds(eta) if self.done < self.total else '0:00:00'}")
