"""``bark-kernels speak``'s progress and report: generate's stage events -> a bar per stage on a terminal, one line per
stage elsewhere; each stage's time and tokens; the summary (tokens/s per stage, the real-time factor, the attention
backend that ran).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

__all__ = ["StageMonitor", "backend_report", "print_stage_summary"]


_STAGES = ("semantic", "coarse", "fine", "codec")


@dataclass
class _StageStats:
    seconds: float = 0.0  # summed over the batches of texts
    segment_start: float | None = None
    ran: bool = False
    forwards: int = 0
    tokens: int = 0


_UNITS = {"semantic": ("step", "steps"), "coarse": ("token", "tokens"), "fine": ("pass", "passes"),
          "codec": ("row", "rows")}


@dataclass
class StageMonitor:
    """generate's stage events (its ``callback``) -> on a terminal one tqdm bar per stage, elsewhere (a log, a pipe)
    one line per stage when it ends, never ``\\r`` updates; and each stage's time and tokens summed over the batches of
    texts."""

    show: bool
    stream: object = None  # where the progress goes; None: sys.stderr at the time of each event
    stats: dict = field(default_factory=lambda: {s: _StageStats() for s in _STAGES})
    _bar: object = None

    def _out(self):
        return self.stream if self.stream is not None else sys.stderr

    def _terminal(self) -> bool:
        isatty = getattr(self._out(), "isatty", None)
        try:
            return bool(isatty is not None and isatty())
        except (OSError, ValueError):  # a closed stream
            return False

    def __call__(self, event) -> None:
        st = self.stats[event.stage]
        unit, units = _UNITS[event.stage]
        if event.kind == "start":
            st.ran = True
            self.close()
            if self.show and self._terminal():
                from tqdm.auto import tqdm

                self._bar = tqdm(total=event.total, desc=f"{event.stage:<8}", unit=unit, leave=True,
                                 file=self._out(), dynamic_ncols=True)
        elif event.kind == "progress":
            if self._bar is not None:
                self._bar.update(max(0, event.done - self._bar.n))
        else:
            st.seconds += event.seconds
            st.forwards += event.done
            if event.output is not None and event.stage in ("semantic", "coarse"):
                st.tokens += sum(int(t.shape[-1]) for t in event.output)
            if self._bar is not None:
                self._bar.update(max(0, min(event.done, self._bar.total or event.done) - self._bar.n))
            elif self.show:
                rows = f"{event.rows} row{'s' if event.rows != 1 else ''}"
                print(f"{event.stage:<8} {event.done}/{event.total} {units}  {event.seconds:.2f} s  ({rows})",
                      file=self._out(), flush=True)
            self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def backend_report(model, device, dtype) -> str:
    """The bark_kernels backend each attention op resolves to for this model (explicit choice or automatic)."""
    try:
        from bark_kernels import registry
    except ImportError:  # pragma: no cover
        return "unknown"
    requested = getattr(model, "attn_backend", None)
    head_dim = model.config.semantic_config.head_dim
    chosen = {}
    for op in ("attention", "attention_with_kvcache", "attention_varlen"):
        try:
            chosen[op] = registry.select(op, device, dtype, head_dim, backend=requested)[0]
        except Exception as e:  # noqa: BLE001 - report, do not fail after the audio is written
            chosen[op] = f"unavailable ({type(e).__name__})"
    names = set(chosen.values())
    how = f"--attn {model.attn_implementation}" if requested is not None else "auto"
    if len(names) == 1:
        return f"{names.pop()} ({how})"
    return (
        f"prefill/fine: {chosen['attention']}, decode: {chosen['attention_with_kvcache']}, "
        f"varlen prefill: {chosen['attention_varlen']} ({how})"
    )


def print_stage_summary(monitor: StageMonitor, model, frames: int, load_s: float) -> None:
    """The summary's first lines: the load, then each stage's seconds, tokens and rate (``frames``: the code frames of
    all the audio written, from which the fine and codec counts follow)."""
    gen = model.generation_config
    n_coarse = gen.coarse_acoustics_config.n_coarse_codebooks
    n_fine = gen.fine_acoustics_config.n_fine_codebooks
    stats = monitor.stats
    stats["fine"].tokens = frames * (n_fine - n_coarse)  # codes predicted by the fine stage
    stats["codec"].tokens = frames
    print("summary:")
    print(f"  load        {load_s:8.2f} s")
    for stage, what in (("semantic", "tokens"), ("coarse", "tokens"), ("fine", "codes"), ("codec", "frames")):
        st = stats[stage]
        if not st.ran:
            print(f"  {stage:<11} (did not run)")
            continue
        rate = st.tokens / st.seconds if st.seconds > 0 else float("inf")
        print(f"  {stage:<11} {st.seconds:8.2f} s  {st.tokens:7d} {what:<6} {rate:9.1f} {what}/s")
