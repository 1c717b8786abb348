"""The HTTP app over the engine: OpenAI's ``POST /v1/audio/speech`` (plus Bark's ``seed``, ``temperature``,
``greedy``, ``recipe``), ``GET /v1/models``, ``GET /v1/audio/voices``, ``GET /health`` and a page at ``GET /`` (docs/serve.md).

    app = create_app(engine, ServeSettings(model_name="suno/bark-small", voices={"mine": voice_arrays}))
    uvicorn.run(app, host="127.0.0.1", port=8000)

A request becomes one :class:`bark.SpeechRequest`; the engine's worker batches the sentences of every waiting request
(bark.engine). The response starts once the request's first sentence is done, so its status says how that went:

* 200: ``stream_format="audio"`` (default): chunked bytes, the WAV header (``wav``) then each sentence's 16-bit samples
  as it is finished (``pcm``: samples only); ``flac``/``mp3``/``opus`` are written whole when the last sentence is
  done (their containers need the whole signal). ``stream_format="sse"``: ``speech.audio.delta`` events with base64
  chunks of ``wav``/``pcm`` bytes, then ``speech.audio.done`` with the usage.
* 400 (a value the fields' types allow but the server refuses: an unknown voice, ``speed`` other than 1.0 ...) and 422
  (a body that does not parse: a missing, extra or mistyped field), both naming the field (``error.param``);
* 429 with ``Retry-After`` (seconds) when the engine holds ``max_queue`` unfinished requests;
* 500 with a one-line reason when the request's generation fails (that request only: the engine fails only the rows
  that fail alone); 503 while the server is shutting down.

A sentence that fails after the first has gone out cannot change the status any more: an SSE stream then ends with an
``error`` event, an audio stream is cut (no final chunk, so the client sees an incomplete response). A client that goes
away has its request cancelled at once (its waiting sentences never reach a batch).
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoint annotations (the body model is local to
# create_app, so as strings they would not resolve).
import asyncio
import base64
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal


from ..engine import Engine, EngineClosedError, QueueFullError, RequestCancelled, RequestHandle, SpeechRequest
from ..longform import DEFAULT_PAUSE
from .audio import MEDIA_TYPES, STREAMED_FORMATS, WHOLE_FORMATS, StreamEncoder, encode_whole, whole_formats
from .page import page_html

__all__ = ["ServeSettings", "create_app", "MAX_INPUT_CHARS", "MODEL_ALIASES"]

logger = logging.getLogger("bark.serve")

MAX_INPUT_CHARS = 4096  # OpenAI's limit for /v1/audio/speech
MODEL_ALIASES = ("bark", "tts-1", "tts-1-hd", "gpt-4o-mini-tts")  # names OpenAI clients send; all mean this model
MAX_SEED = 2**63 - 1
MIN_TEMPERATURE = 1e-6  # as `speak --temperature`: lower overflows the scores
DISCONNECT_POLL_S = 0.2  # how often a request waiting for its first piece checks that its client is still there


@dataclass
class ServeSettings:
    """What the app says about itself and how it treats requests.

    ``model_name``: the id ``/v1/models`` lists (requests may also name one of MODEL_ALIASES); ``voices``: name ->
    voice prompt (a dict of the three arrays, suno's layout), the voices a request may name beside the processor's
    presets; ``default_voice``: the voice of a request without one (a name in ``voices`` or a preset name; None: the
    first sentence's generation becomes the voice of the rest); ``presets``: preset names the processor loads;
    ``device``, ``dtype``, ``backend``: shown by ``/health``; ``pause``: seconds of silence between sentences."""

    model_name: str = "bark"
    voices: Mapping[str, Any] = field(default_factory=dict)
    presets: tuple[str, ...] = ()
    default_voice: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    backend: str = "unknown"
    pause: float = DEFAULT_PAUSE


class APIError(Exception):
    """An error answered as OpenAI does: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind
        self.headers = dict(headers or {})


def _one_line(error: BaseException) -> str:
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def create_app(engine: Engine, settings: ServeSettings | None = None):
    """The FastAPI app serving ``engine`` (module docstring). Closing the app (its lifespan's end: uvicorn's shutdown
    after the requests in flight are answered) closes the engine, letting anything left finish."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field

    settings = settings or ServeSettings()
    sample_rate = int(engine.model.sampling_rate)
    writable = whole_formats()
    formats = list(STREAMED_FORMATS) + [f for f in WHOLE_FORMATS if writable[f] is None]
    started = time.time()
    stats = {"requests": 0, "served": 0, "failed": 0, "cancelled": 0, "refused_full": 0}

    class SpeechBody(BaseModel):
        """OpenAI's speech request, with Bark's extras (seed, temperature, greedy, recipe)."""

        model_config = ConfigDict(extra="forbid")
        model: str = "bark"
        input: str = Field(min_length=1, max_length=MAX_INPUT_CHARS)
        voice: str | None = None
        response_format: Literal["wav", "pcm", "flac", "mp3", "opus", "aac"] = "wav"
        speed: float = 1.0
        stream_format: Literal["audio", "sse"] = "audio"
        instructions: str | None = None
        seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
        temperature: float | None = Field(default=None, gt=0)
        greedy: bool = False
        recipe: Literal["suno", "transformers"] | None = None

    @asynccontextmanager
    async def lifespan(app):
        yield
        logger.info("serve: shutting down: finishing what the engine holds")
        await asyncio.to_thread(engine.close, False)

    app = FastAPI(title="bark-kernels speech server", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.engine, app.state.settings, app.state.stats = engine, settings, stats

    def error_response(error: APIError) -> JSONResponse:
        body = {"error": {"message": error.message, "type": error.kind, "param": error.param, "code": None}}
        return JSONResponse(body, status_code=error.status, headers=error.headers)

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError):
        problems = error.errors()
        first = problems[0] if problems else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        if first.get("type") == "json_invalid" or param is None:
            message = f"the body is not a JSON object of the speech fields: {first.get('msg', 'invalid')}"
            param = None
        elif first.get("type") == "extra_forbidden":
            message = (f"{param}: unknown field; expected OpenAI's model, input, voice, response_format, speed, "
                       f"stream_format, instructions, or Bark's seed, temperature, greedy, recipe")
        elif first.get("type") == "missing":
            message = f"{param}: required"
        else:
            message = f"{param}: {first.get('msg', 'invalid')}, got {first.get('input')!r}"[:500]
        if len(problems) > 1:
            message += f" (and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''})"
        return error_response(APIError(422, message, param))

    # -- the speech endpoint -------------------------------------------------------------------------------------------

    def resolve_voice(name: str | None):
        name = settings.default_voice if name is None else name
        if name is None:
            return None
        if name in settings.voices:
            return settings.voices[name]
        if name in settings.presets:
            return name  # the engine's processor loads (and checks) the preset: a known name, never a path
        known = list(settings.voices) + list(settings.presets)
        listed = ", ".join(known[:20]) + (" ..." if len(known) > 20 else "")
        raise APIError(400, f"voice: unknown voice {name!r}; expected one of GET /v1/audio/voices"
                       + (f" ({listed})" if known else " (this server has none: leave voice out)"), "voice")

    def check(body: SpeechBody) -> SpeechRequest:
        if body.model not in (settings.model_name, *MODEL_ALIASES):
            raise APIError(400, f"model: expected {settings.model_name!r} (GET /v1/models) or one of "
                           f"{list(MODEL_ALIASES)}, got {body.model!r}", "model")
        if not body.input.strip():
            raise APIError(400, "input: empty; give some words to speak", "input")
        if body.response_format not in formats:
            why = writable.get(body.response_format) or "not supported by this server"
            raise APIError(400, f"response_format: {body.response_format!r} is not available here ({why}); expected "
                           f"one of {formats}", "response_format")
        if body.stream_format == "sse" and body.response_format not in STREAMED_FORMATS:
            raise APIError(400, f"stream_format: 'sse' sends wav or pcm chunks; {body.response_format!r} is written "
                           f"whole (use stream_format 'audio')", "stream_format")
        if not math.isfinite(body.speed) or body.speed != 1.0:
            raise APIError(400, f"speed: only 1.0 is supported (Bark has no speaking-rate control and resampling would "
                           f"change the pitch), got {body.speed!r}", "speed")
        if body.instructions:
            raise APIError(400, "instructions: Bark takes no instructions (put cues such as [laughs] in the input)",
                           "instructions")
        kwargs: dict[str, Any] = {}
        if body.greedy:
            if body.temperature is not None:
                raise APIError(400, f"temperature: greedy decoding uses no temperature, got {body.temperature!r}; "
                               f"drop one of the two", "temperature")
            kwargs["do_sample"] = False
        else:
            kwargs["do_sample"] = True
        if body.temperature is not None:
            if not math.isfinite(body.temperature) or body.temperature < MIN_TEMPERATURE:
                raise APIError(400, f"temperature: expected a finite number >= {MIN_TEMPERATURE:g}, got "
                               f"{body.temperature!r}", "temperature")
            kwargs["semantic_temperature"] = kwargs["coarse_temperature"] = float(body.temperature)
        return SpeechRequest(body.input, voice=resolve_voice(body.voice), seed=body.seed, generate_kwargs=kwargs,
                             recipe=body.recipe)

    def submit(request: SpeechRequest) -> RequestHandle:
        stats["requests"] += 1
        try:
            return engine.submit(request)
        except QueueFullError as e:
            stats["refused_full"] += 1
            raise APIError(429, str(e), None, "rate_limit_error",
                           {"Retry-After": str(max(1, math.ceil(e.retry_after)))}) from None
        except EngineClosedError as e:
            raise APIError(503, f"{e} (the server is shutting down)", None, "server_error") from None
        except (ValueError, TypeError) as e:
            message = _one_line(e).split(": ", 1)[-1]
            field_name = message.split(":", 1)[0] if ":" in message else None
            param = {"text": "input"}.get(field_name, field_name)
            raise APIError(400, message, param if param in SpeechBody.model_fields else None) from None

    async def next_piece(pieces: AsyncIterator, handle: RequestHandle, request: Request):
        """The next piece (None at the end), cancelling the request if its client goes away meanwhile."""
        task = asyncio.ensure_future(pieces.__anext__())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
                if done:
                    try:
                        return task.result()
                    except StopAsyncIteration:
                        return None
                if await request.is_disconnected():
                    handle.cancel()
        except asyncio.CancelledError:
            handle.cancel()
            raise
        finally:
            if not task.done():
                task.cancel()

    def failed(handle: RequestHandle, error: BaseException) -> APIError:
        stats["failed"] += 1
        logger.warning("serve: request %d failed: %s", handle.id, _one_line(error))
        return APIError(500, f"generation failed: {_one_line(error)}", None, "server_error")

    @app.post("/v1/audio/speech")
    async def speech(body: SpeechBody, request: Request):
        handle = submit(check(body))
        pieces = aiter(handle)
        headers = {"X-Request-Id": str(handle.id)}
        t0 = time.perf_counter()
        try:
            first = await next_piece(pieces, handle, request)
        except RequestCancelled:
            stats["cancelled"] += 1
            return Response(status_code=499)  # the client is gone; nobody reads this
        except Exception as error:  # noqa: BLE001 - the request's own generation error
            raise failed(handle, error) from None
        first_s = time.perf_counter() - t0
        headers["X-First-Audio-Seconds"] = f"{first_s:.3f}"
        headers["X-Pieces"] = str(len(handle))

        if body.response_format not in STREAMED_FORMATS:  # written whole: wait for every piece, then encode
            audio = [first.audio]
            try:
                while (piece := await next_piece(pieces, handle, request)) is not None:
                    audio.append(piece.audio)
            except RequestCancelled:
                stats["cancelled"] += 1
                return Response(status_code=499)
            except Exception as error:  # noqa: BLE001
                raise failed(handle, error) from None
            data = await asyncio.to_thread(encode_whole, audio, body.response_format, sample_rate, settings.pause)
            stats["served"] += 1
            return Response(data, media_type=MEDIA_TYPES[body.response_format], headers=headers)

        encoder = StreamEncoder(body.response_format, sample_rate, settings.pause)
        semantic_tokens = [int(first.semantic.shape[0])]

        async def chunks() -> AsyncIterator[bytes]:
            yield encoder.start() + encoder.piece(first.audio)
            async for piece in pieces:
                semantic_tokens.append(int(piece.semantic.shape[0]))
                yield encoder.piece(piece.audio)

        async def sse() -> AsyncIterator[bytes]:
            def event(kind: str, payload: dict) -> bytes:
                return f"event: {kind}\ndata: {json.dumps({'type': kind, **payload})}\n\n".encode()

            try:
                async for data in chunks():
                    yield event("speech.audio.delta", {"audio": base64.b64encode(data).decode("ascii")})
            except RequestCancelled:
                raise
            except Exception as error:  # noqa: BLE001 - after the first piece: an error event, then the end
                stats["failed"] += 1
                logger.warning("serve: request %d failed mid-stream: %s", handle.id, _one_line(error))
                yield event("error", {"error": {"message": f"generation failed: {_one_line(error)}",
                                                "type": "server_error"}})
                return
            input_tokens = sum(engine._encoder.count(t) for t in handle.texts)
            yield event("speech.audio.done", {"usage": {"input_tokens": input_tokens,
                                                        "output_tokens": sum(semantic_tokens),
                                                        "total_tokens": input_tokens + sum(semantic_tokens)},
                                              "seconds": round(encoder.samples / sample_rate, 3)})

        if body.stream_format == "sse":
            return _HandleStream(sse(), handle, stats, media_type="text/event-stream",
                                 headers={**headers, "Cache-Control": "no-cache"})
        return _HandleStream(chunks(), handle, stats, media_type=MEDIA_TYPES[body.response_format], headers=headers)

    # -- the rest ------------------------------------------------------------------------------------------------------

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": int(started),
                                            "owned_by": "bark-kernels"}]}

    @app.get("/v1/audio/voices")
    async def voices():
        return {"voices": list(settings.voices) + [p for p in settings.presets if p not in settings.voices],
                "default": settings.default_voice, "response_formats": formats}

    @app.get("/health")
    async def health():
        return {"status": "closing" if engine._closing else "ok", "model": settings.model_name,
                "device": settings.device, "dtype": settings.dtype, "backend": settings.backend,
                "queue_depth": engine.queue_depth, "max_queue": engine.max_queue, "max_batch": engine.max_batch,
                "max_wait_ms": engine.max_wait * 1000, "batches": engine.batches, "rows": engine.rows,
                "uptime_s": round(time.time() - started, 1), **stats}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return page_html(settings.model_name)

    class _HandleStream(StreamingResponse):
        """A streamed response tied to a request's handle: the client going away (an ``http.disconnect`` while the
        stream waits for the next piece, or a failed send) cancels the request at once."""

        def __init__(self, content, handle: "RequestHandle", stats: dict, **kwargs) -> None:
            super().__init__(content, **kwargs)
            self._handle, self._stats = handle, stats

        async def __call__(self, scope, receive, send) -> None:
            async def watch() -> None:
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        if not self._handle.finished:
                            logger.info("serve: request %d: the client went away; cancelling it", self._handle.id)
                            self._handle.cancel()
                        return

            watcher = asyncio.ensure_future(watch())
            try:
                await self.stream_response(send)
            except RequestCancelled:
                self._stats["cancelled"] += 1
            except OSError:
                self._handle.cancel()
                self._stats["cancelled"] += 1
            except Exception as error:  # noqa: BLE001 - a later sentence failed: cut the stream (no final chunk)
                self._stats["failed"] += 1
                logger.warning("serve: request %d failed mid-stream, the response is cut: %s", self._handle.id,
                               _one_line(error))
            else:
                self._stats["served"] += 1
            finally:
                watcher.cancel()
                if not self._handle.finished:
                    self._handle.cancel()

    return app
