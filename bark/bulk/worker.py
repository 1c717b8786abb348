"""One bulk worker: a model loaded once, a :class:`bark.Engine` over it, rows in, audio files and manifest entries out.

The same :class:`Synthesizer` runs in the command's own process (``--engine local``), in each worker process of
``--workers N`` / ``--devices``, and in each Ray actor (``--engine ray``). It submits its rows to the engine (up to
``max_queue`` unfinished at once; a batch's worth when it shares a queue of rows with other workers), so the engine
batches pieces of many rows together; as each row finishes it joins the row's pieces, writes ``{id}.wav`` atomically
and hands back the row's manifest entry (the caller journals it).

Rows are plain dicts (they cross process and Ray boundaries as JSON): ``row`` (1-based number in the table), ``id``,
``text``, ``voice``, ``seed``, ``settings`` (bark.bulk.table.SETTING_COLUMNS), ``key`` (bark.bulk.table.Row.key).

The model is loaded with the pieces ``bark-kernels speak`` uses (bark.cli.setup: checkpoint or built-in random model,
device, dtype, attention backend, token cap); ``options`` holds their values under speak's option names.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping

from ..cli.progress import backend_report
from ..cli.setup import (FRONT_END_RECIPE, SpeakError, SpeakRequest, generate_kwargs, load_model, plan,
                         resolve_device_and_dtype)
from ..engine import Engine, QueueFullError, SpeechRequest
from ..options import EngineOptions
from ..longform import DEFAULT_PAUSE, ByteTextEncoder
from .manifest import audio_path, write_audio

__all__ = ["Synthesizer", "model_request", "request_kwargs", "one_line", "MODEL_SEED"]

logger = logging.getLogger("bark")

MODEL_SEED = 0  # the built-in random model's weights are drawn with this seed in every worker: one model everywhere


def model_request(options: Mapping) -> tuple[SpeakRequest, EngineOptions]:
    """speak's typed request and engine options for bark.cli.setup's plan / load_model, from the bulk options."""
    request = SpeakRequest(output="", seed=MODEL_SEED, greedy=bool(options.get("greedy")),
                           temperature=options.get("temperature"),
                           semantic_max_new_tokens=options.get("semantic_max_new_tokens"),
                           recipe=options.get("recipe") or FRONT_END_RECIPE)
    engine_options = EngineOptions(model=options.get("model"), device=options.get("device"),
                                   dtype=options.get("dtype") or "auto", attn=options.get("attn") or "auto",
                                   threads=options.get("threads"), init_seed=MODEL_SEED)
    return request, engine_options


def request_kwargs(settings: Mapping) -> dict:
    """A row's generation settings -> generate keyword arguments (on top of the run's defaults)."""
    kwargs: dict = {}
    if "greedy" in settings:
        kwargs["do_sample"] = not settings["greedy"]
    if "temperature" in settings:
        kwargs["do_sample"] = True
        kwargs["semantic_temperature"] = kwargs["coarse_temperature"] = settings["temperature"]
    if "semantic_max_new_tokens" in settings:
        kwargs["semantic_max_new_tokens"] = settings["semantic_max_new_tokens"]
    return kwargs


def one_line(error: BaseException) -> str:
    """An exception as one line: its message (lines joined), with the type for anything but a ValueError/TypeError."""
    text = "; ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__
    return text if isinstance(error, (ValueError, TypeError, SpeakError)) else f"{type(error).__name__}: {text}"


class Synthesizer:
    """Load the model once; :meth:`run` speaks rows. ``options``: model, device, dtype, attn, threads,
    semantic_max_new_tokens, greedy, temperature (speak's meanings), batch_size (engine rows per batch), format
    ("wav"/"flac"), pause (seconds between a row's pieces), out_dir, worker (a name for the manifest), parent_pid
    (a worker process stops when its parent is gone)."""

    def __init__(self, options: Mapping) -> None:
        import torch

        self.options = dict(options)
        self.out_dir = options["out_dir"]
        self.format = options.get("format", "wav")
        self.pause = float(options.get("pause", DEFAULT_PAUSE))
        self.worker = str(options.get("worker", "local"))
        self._parent = options.get("parent_pid")
        if options.get("threads"):
            torch.set_num_threads(int(options["threads"]))
        request, engine_options = model_request(options)
        device, dtype = resolve_device_and_dtype(engine_options)
        setup = plan(request, engine_options, [], device, dtype, announce=False)
        loaded = load_model(engine_options, setup, device, dtype)
        self.model = loaded.model
        self.model_name = setup.name
        self.backend = backend_report(self.model, device, dtype)
        self.sample_rate = int(self.model.sampling_rate)
        processor = loaded.processor or setup.processor or ByteTextEncoder()
        batch = int(options.get("batch_size", 8))
        self._finished = threading.Event()
        self.ready_at = time.time()  # the model is loaded (wall clock: comparable across this machine's processes)
        self.engine = Engine(self.model, processor, max_batch=batch, max_queue=max(2 * batch, 16),
                             generate_kwargs=generate_kwargs(request, setup),
                             on_batch=lambda info: self._finished.set(), name=f"bark-bulk-{self.worker}")

    def close(self) -> None:
        self.engine.close(cancel=True)

    def _orphaned(self) -> bool:
        return self._parent is not None and os.getppid() != self._parent

    def run(self, rows: Iterable[Mapping], emit: Callable[[dict], None], window: int | None = None) -> None:
        """Speak ``rows``; ``emit(entry)`` each row's manifest entry as the row finishes (ok or failed). ``rows`` is
        taken lazily, a row at a time as the engine has room for it: at most ``window`` rows unfinished at once
        (default: the engine's queue; a worker that shares its rows with others takes a batch's worth, so that no
        worker holds back rows at the end that an idle one could run)."""
        limit = min(window or self.engine.max_queue, self.engine.max_queue)
        source = iter(rows)
        pending: deque = deque()  # taken from the source, refused by a full engine queue: submitted first next time
        more = True
        inflight: list[tuple[Mapping, object]] = []
        while pending or more or inflight:
            while len(inflight) < limit:
                if not pending:
                    row = next(source, None) if more else None
                    if row is None:
                        more = False
                        break
                    pending.append(row)
                row = pending.popleft()
                try:
                    handle = self.engine.submit(self._request(row))
                except QueueFullError:
                    pending.appendleft(row)
                    break
                except Exception as error:  # a bad row (voice, settings): recorded, the rest goes on
                    emit(self._entry(row, "failed", one_line(error), 0.0, 0.0))
                    continue
                inflight.append((row, handle))
            if self._orphaned():  # nobody would journal what this worker writes: stop, the resume redoes it
                logger.warning("bulk worker %s: the run that started it is gone; stopping", self.worker)
                self.close()
                os._exit(1)
            if not inflight and not pending:
                continue  # nothing was taken: the source is done (the loop ends) or every row failed at submit
            self._finished.clear()
            done = [(row, handle) for row, handle in inflight if handle.finished]
            if not done:
                self._finished.wait(0.5)
                continue
            inflight = [(row, handle) for row, handle in inflight if not handle.finished]
            for row, handle in done:
                emit(self._finish(row, handle))

    def _request(self, row: Mapping) -> SpeechRequest:
        settings = row.get("settings") or {}
        fields = {}
        if "continuity" in settings:
            fields["continuity"] = settings["continuity"]
        if "max_tokens" in settings:
            fields["max_tokens"] = settings["max_tokens"]
        return SpeechRequest(row["text"], voice=row.get("voice"), seed=row.get("seed"),
                             generate_kwargs=request_kwargs(settings), tag=row["id"], **fields)

    def _finish(self, row: Mapping, handle) -> dict:
        wall = (handle.finished_at or time.perf_counter()) - handle.submitted_at
        try:
            audio = handle.audio(self.pause)
        except Exception as error:
            return self._entry(row, "failed", f"generation failed: {one_line(error)}", 0.0, wall)
        path = audio_path(self.out_dir, row["id"], self.format)
        try:
            samples = write_audio(path, audio, self.sample_rate, self.format)
        except OSError as error:
            return self._entry(row, "failed", f"cannot write {path!r}: {error.strerror or error}", 0.0, wall)
        return self._entry(row, "ok", None, samples / self.sample_rate, wall, os.path.basename(path))

    def _entry(self, row: Mapping, status: str, error: str | None, audio_s: float, wall_s: float,
               path: str | None = None) -> dict:
        return {"id": row["id"], "row": row["row"], "path": path, "status": status, "error": error,
                "audio_seconds": round(audio_s, 6), "wall_seconds": round(wall_s, 4), "seed": row.get("seed"),
                "voice": row.get("voice"), "model": self.model_name, "backend": self.backend, "key": row.get("key"),
                "worker": self.worker, "timing": (self.ready_at, time.time())}
