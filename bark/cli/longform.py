"""``bark-kernels speak`` for a text of any length (the argument or ``--text-file``): one recording, piece by piece.

    bark-kernels speak --text-file story.txt -o story.wav [--voice PRESET|FILE.npz] [--batch-size 8]
        [--continuity preset|previous] [--pause 0.25] [--max-piece-tokens 256] [--wav-per-piece]
        [--save-voice me.npz] [--offload] [every speak option]

The text is one request to a ``bark.Engine`` (``--batch-size`` rows per batch): split into sentences (and overlong
sentences into clauses), generated in batches and written as it arrives: the WAV grows after each finished piece and
is a complete, playable file
at every moment, so an interrupted run (Ctrl-C, a crash, a kill) keeps every piece finished before it. A progress bar
counts pieces; the summary gives each stage's time and the real-time factor of the whole text. ``--batch-file``
(one WAV per line) is bark.cli's path and takes none of these options.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from bark_kernels import BackendUnavailableError

from . import setup
from .progress import StageMonitor, backend_report, print_stage_summary
from .setup import SpeakError, SpeakRequest
from ..engine import Engine, SpeechRequest
from ..longform import CONTINUITY, DEFAULT_PAUSE, ByteTextEncoder
from ..offload import offload_reason
from ..options import EngineOptions
from ..voice import save_voice
from ..wav import WavAppender, write_wav_atomic

__all__ = ["add_longform_arguments", "wanted", "run"]

LONGFORM_ONLY = ("text_file", "pause", "continuity", "max_piece_tokens", "wav_per_piece", "save_voice", "offload")
DEFAULT_CONTINUITY = "preset"


def _seconds_at_least_zero(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {text!r}")
    return value


_piece_tokens = setup.int_at_least(1, "an integer in [1, 256] (Bark reads at most 256 text tokens)", 256)


def add_longform_arguments(parser: argparse.ArgumentParser) -> None:
    """The long-form options of ``speak`` (defaults None: the run tells given from default)."""
    group = parser.add_argument_group("long text (the text argument or --text-file; not with --batch-file); "
                                      "--batch-size pieces are generated together")
    group.add_argument("--text-file", default=None,
                       help="UTF-8 text file spoken as one text of any length (instead of the text argument)")
    group.add_argument("--pause", type=_seconds_at_least_zero, default=None,
                       help=f"seconds of silence between pieces (default: {DEFAULT_PAUSE})")
    group.add_argument("--continuity", choices=CONTINUITY, default=None,
                       help="preset: every piece conditioned on --voice (or, without one, on the first piece's "
                            "generation), batched; previous: each piece on the one before (suno's long-form "
                            f"recipe), sequential (default: {DEFAULT_CONTINUITY})")
    group.add_argument("--max-piece-tokens", type=_piece_tokens, default=None,
                       help="longest piece in text tokens; longer sentences split at clauses, then words "
                            "(default: 256, all Bark reads)")
    group.add_argument("--wav-per-piece", action="store_true", default=None,
                       help="one WAV per piece (OUT_000.wav, OUT_001.wav, ...) instead of one recording")
    group.add_argument("--save-voice", default=None, metavar="PATH",
                       help="save the last piece's generation as a voice prompt .npz (semantic_prompt, "
                            "coarse_prompt, fine_prompt; suno's layout) for --voice PATH later")
    group.add_argument("--offload", action="store_true", default=None,
                       help="small GPUs: keep the sub-models in CPU memory, each on the GPU only for its stage "
                            "(a no-op without CUDA)")


def given_longform(args: argparse.Namespace) -> tuple[str, ...]:
    """The long-form options given on the command line (their dests)."""
    given = []
    for name in LONGFORM_ONLY:
        if getattr(args, name, None) is not None:
            given.append(name)
    return tuple(given)


def wanted(request: SpeakRequest) -> bool:
    """Whether this path runs (everything but --batch-file). Raises SpeakError for long-form options with
    --batch-file."""
    if request.batch_file is None:
        return True
    given = request.given_longform
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise SpeakError(f"{flags}: long-text options; --batch-file speaks each line as its own short text, so give "
                         f"the text as an argument or with --text-file instead")
    return False


def _read_text(request: SpeakRequest) -> str:
    if request.text_file is None:
        return setup.read_texts(request)[0]
    if request.text is not None:
        raise SpeakError("give the text either as an argument or with --text-file, not both")
    try:
        with open(request.text_file, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise SpeakError(f"--text-file: {request.text_file!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SpeakError(f"--text-file: cannot read {request.text_file!r} as UTF-8 text: {e}") from None
    if not text.strip():
        raise SpeakError(f"--text-file: {request.text_file!r} is empty; give some words to speak")
    return text


def _check_save_voice(path: str | None) -> None:
    if path is None:
        return
    if os.path.isdir(path):
        raise SpeakError(f"--save-voice: {path!r} is a directory; expected a file path such as voice.npz")
    setup.check_parent_directory("--save-voice", path)


class _Progress:
    """A tqdm bar counting pieces (created by :meth:`start`), the current chunk's stage in its postfix. Every stage
    event also goes to the stage monitor (bark.cli's: time and tokens per stage); ``calls`` counts generate calls."""

    def __init__(self, monitor, show: bool) -> None:
        self.monitor = monitor
        self.show = show
        self.bar = None
        self.calls = 0

    def start(self, total: int) -> None:
        if self.show:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="pieces", unit="piece", file=sys.stderr, dynamic_ncols=True)

    def __call__(self, event) -> None:
        self.monitor(event)
        if event.stage == "codec" and event.kind == "end":
            self.calls += 1
        if self.bar is not None and event.kind != "end":
            self.bar.set_postfix_str(f"{event.rows} rows: {event.stage} {event.done}/{event.total}", refresh=False)
            self.bar.refresh()

    def piece_done(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def run(request: SpeakRequest, options: EngineOptions) -> int:
    """The long-text ``speak``: one request to an engine; user errors raise bark.cli.setup.SpeakError, Ctrl-C returns
    130 after saying what the WAV keeps."""
    # Everything that can be checked without the weights is checked first: a mistake costs no model load.
    text = _read_text(request)
    setup.check_output_path(request.output)
    setup.check_flags(request, [request.output])
    _check_save_voice(request.save_voice)
    if request.save_voice is not None and os.path.realpath(request.save_voice) == os.path.realpath(request.output):
        raise SpeakError(f"--save-voice {request.save_voice!r} is the --output path; choose another path")
    setup.check_voice_file(request.voice)

    device, dtype = setup.resolve_device_and_dtype(options)
    plan = setup.plan(request, options, [], device, dtype)  # no 256-byte warning: the pieces are each read whole
    threads_note = setup.set_threads(options.threads, device)
    offload_note = None
    load_device = device
    if options.offload:
        offload_note = offload_reason(None, device)
        if offload_note is None:
            load_device = torch.device("cpu")  # the weights live in CPU memory; each stage borrows the GPU
            offload_note = f"offload: sub-models wait in CPU memory and move to {device} for their stage only"

    t0 = time.perf_counter()
    loaded = setup.load_model(options, plan, load_device, dtype)
    model = loaded.model
    load_s = time.perf_counter() - t0
    history_prompt = plan.history_prompt
    encoder = plan.processor if plan.processor is not None else ByteTextEncoder()

    gen_kwargs = setup.generate_kwargs(request, plan)
    max_new = plan.max_new_tokens
    semantic_total = max_new if max_new is not None else model.generation_config.semantic_config.max_new_tokens
    sample_rate = int(model.sampling_rate)
    pause = DEFAULT_PAUSE if request.pause is None else request.pause
    continuity = request.continuity or DEFAULT_CONTINUITY
    offload = device if (options.offload and load_device != device) else False

    # On a terminal a bar counts pieces (the stage in its postfix); in a log, one line per stage, never \r updates.
    terminal = StageMonitor(show=True)._terminal()
    monitor = StageMonitor(show=not request.quiet and not terminal)
    progress = _Progress(monitor, show=not request.quiet and terminal)
    engine = Engine(model, encoder, max_batch=options.max_batch, max_wait=options.max_wait, generate_kwargs=gen_kwargs,
                    callback=lambda info, event: progress(event), decode_mode=options.decode_mode, offload=offload)
    try:
        pieces = engine.submit(SpeechRequest(text, voice=history_prompt, seed=request.seed, continuity=continuity,
                                             max_tokens=request.max_piece_tokens))
    except (ValueError, TypeError) as e:
        engine.close(cancel=True)
        raise SpeakError(str(e)) from None
    n_pieces = len(pieces)
    outputs = setup.output_paths(request.output, n_pieces) if request.wav_per_piece else [request.output]
    try:
        for path in outputs:
            setup.check_output_path(path)
    except SpeakError:
        engine.close(cancel=True)
        raise

    setup.print_model(loaded, device, dtype, options.attn)
    for note in (threads_note, offload_note):
        if note:
            print(note, flush=True)
    mode = "greedy" if request.greedy else f"sampling (seed {request.seed})"
    print(f"text:   {len(text)} characters in {n_pieces} piece{'s' * (n_pieces != 1)} (continuity {continuity}, "
          f"batch size {options.max_batch}, pause {pause:g} s)", flush=True)
    print(f"decoding: {mode}  semantic_max_new_tokens: {semantic_total}", flush=True)

    progress.start(n_pieces)
    appender = None
    finished = []  # the pieces written so far
    written_files = []
    gen_s = 0.0
    interrupted = False
    try:
        appender = None if request.wav_per_piece else WavAppender(request.output, sample_rate)
        while True:
            t1 = time.perf_counter()
            try:
                piece = pieces.next_piece()
            except (ValueError, TypeError, BackendUnavailableError) as e:
                kept = (f"; {request.output} keeps the {len(finished)} finished piece(s)"
                        if finished and appender is not None else "")
                raise SpeakError(f"generation failed: {e}{kept}") from None
            if piece is None:
                break
            gen_s += time.perf_counter() - t1
            if appender is not None:
                appender.append(piece.audio, pause=pause)
            else:
                path = outputs[piece.index]
                write_wav_atomic(path, piece.audio, sample_rate)
                written_files.append((path, piece.audio.shape[0]))
            finished.append(piece)
            progress.piece_done()
    except KeyboardInterrupt:
        interrupted = True
        progress.close()
        engine.close(cancel=True, timeout=5)  # a running batch is not waited for long: its rows are thrown away
        if appender is not None:
            appender.close()
        if not finished:
            print("bark-kernels speak: interrupted before the first piece was finished; no WAV written",
                  file=sys.stderr)
        elif appender is not None:
            print(f"bark-kernels speak: interrupted; {request.output} is a complete WAV of the {len(finished)} "
                  f"finished piece(s) of {n_pieces} ({appender.samples / sample_rate:.2f} s)", file=sys.stderr)
        else:
            print(f"bark-kernels speak: interrupted; the WAVs of the {len(finished)} finished piece(s) of {n_pieces} "
                  f"are written", file=sys.stderr)
        return 130
    finally:
        progress.close()
        if not interrupted:
            engine.close(cancel=True)  # after the last piece: nothing left; after an error: stop the rest
        if appender is not None:
            appender.close()

    voice_path = None
    if request.save_voice is not None:
        usable = [p for p in finished if p.semantic.shape[0] > 0 and p.fine.shape[1] > 0]
        if not usable:
            raise SpeakError("--save-voice: no piece produced any audio, so there is no voice to save")
        voice_path = save_voice(request.save_voice, usable[-1])
        voice_piece = usable[-1].index

    speech_s = sum(p.duration for p in finished)
    file_samples = appender.samples if appender is not None else sum(n for _, n in written_files)
    hop = getattr(model.codec_model, "hop_length", 320)
    frames = sum(p.audio.shape[0] for p in finished) // hop
    print_stage_summary(monitor, model, frames, load_s)
    rtf = gen_s / speech_s if speech_s > 0 else float("inf")
    print(f"  pieces      {n_pieces} in {progress.calls} generate call(s) of up to {options.max_batch} rows")
    print(f"  generate    {gen_s:8.2f} s  for {speech_s:.2f} s of speech: real-time factor {rtf:.2f} "
          f"({'faster' if rtf < 1 else 'slower'} than real time)")
    print(f"  attention   {backend_report(model, device, dtype)}")
    noise = "  [random model: noise]" if loaded.random else ""
    if appender is not None:
        joined = (f"{n_pieces} pieces with {pause:g} s pauses" if n_pieces != 1 else "1 piece")
        print(f"wrote {request.output}  ({file_samples} samples, {file_samples / sample_rate:.2f} s, {joined}, "
              f"{sample_rate} Hz, 16-bit mono){noise}")
    else:
        for path, n in written_files:
            print(f"wrote {path}  ({n} samples, {n / sample_rate:.2f} s, {sample_rate} Hz, 16-bit mono){noise}")
    if voice_path is not None:
        print(f"saved voice {voice_path}  (piece {voice_piece + 1} of {n_pieces}: semantic_prompt, coarse_prompt, "
              f"fine_prompt; use it with --voice {voice_path})")
    return 0
