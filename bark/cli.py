"""``bark-kernels speak``: text in, 24 kHz 16-bit mono WAV out.

    bark-kernels speak "Hello there." -o hello.wav [--model ID|PATH|random] [--voice PRESET|FILE.npz]
        [--attn auto|triton|cuda|flash_attention_2|sdpa|eager] [--dtype auto|float32|float16|bfloat16]
        [--device cpu|cuda[:N]] [--seed N] [--batch-file texts.txt] [--greedy] [--temperature T]
        [--semantic-max-new-tokens N] [--threads N] [--quiet]
        [--text-file story.txt] [--pause S] [--continuity preset|previous] [--max-piece-tokens N]
        [--wav-per-piece] [--save-voice PATH.npz] [--offload]

A text (the argument or ``--text-file``) of any length is spoken as one recording: split into sentences, generated
``--batch-size`` pieces at a time and appended to the WAV as each piece is finished (bark.cli_longform).
``--batch-file`` speaks each line as its own short text, one WAV per line (this module).

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

``bark_kernels.cli`` dispatches ``bark-kernels speak`` to :func:`speak_main`; :func:`add_speak_parser` adds the same
options to an ``argparse`` sub-command parser.
"""

from __future__ import annotations

import argparse
import logging
import os
import stat
import sys
import tempfile
import time
import wave
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = ["speak_main", "add_speak_parser", "build_speak_parser", "run_speak", "write_wav_atomic", "SpeakError"]

logger = logging.getLogger(__name__)

DEFAULT_REPO = "suno/bark-small"
RANDOM_MODEL = "random"
ATTN_CHOICES = ("auto", "triton", "cuda", "flash_attention_2", "sdpa", "eager")
DTYPE_CHOICES = ("auto", "float32", "float16", "bfloat16")
RANDOM_MODEL_SEMANTIC_MAX_NEW_TOKENS = 32  # ~0.6 s of audio: keeps the random bark-small run about a minute on CPU
SAMPLE_WIDTH_BYTES = 2  # 16-bit PCM
RANDOM_MODEL_MAX_TEXT_BYTES = 256  # the random model's byte "tokens": as many as Bark's text positions
MAX_SEED = 2**63 - 1  # torch.manual_seed takes up to 2**64 - 1; texts of a --batch-file use seed + their index
MIN_TEMPERATURE = 1e-6  # lower is greedy decoding in all but name, and far lower overflows the scores (NaN)
THREADS_PER_CORE = 4  # --threads cap: more never helps, and torch crashes on absurd counts (10**6 segfaulted)


class SpeakError(Exception):
    """A user-facing error: printed without a traceback, exit code 1."""


# ----------------------------------------------------------------------------------------------------------------------
# argument parsing


def _int_at_least(minimum: int, what: str, maximum: int | None = None):
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


_positive_int = _int_at_least(1, "a positive integer")
_seed = _int_at_least(0, f"an integer from 0 to 2**63 - 1 = {MAX_SEED}", MAX_SEED)
_CORES = os.cpu_count() or 1
_threads = _int_at_least(1, f"an integer from 1 to {THREADS_PER_CORE * _CORES} ({THREADS_PER_CORE} x the {_CORES} "
                            f"CPU cores)", THREADS_PER_CORE * _CORES)


def _positive_float(text: str) -> float:
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
    parser.add_argument("--seed", type=_seed, default=0, help="random seed for sampling (default: 0)")
    parser.add_argument(
        "--batch-file", default=None, help="UTF-8 text file, one text per non-empty line; each line becomes its own WAV"
    )
    parser.add_argument(
        "--batch-size", type=_positive_int, default=8, help="texts generated together with --batch-file (default: 8)"
    )
    parser.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    parser.add_argument(
        "--temperature",
        type=_positive_float,
        default=None,
        help="sampling temperature of the semantic and coarse stages (default: the checkpoint's; not with --greedy)",
    )
    parser.add_argument(
        "--semantic-max-new-tokens",
        type=_positive_int,
        default=None,
        help="cap on semantic tokens (~50 per second of audio); default: the checkpoint's (768), "
        f"{RANDOM_MODEL_SEMANTIC_MAX_NEW_TOKENS} for the built-in random model",
    )
    parser.add_argument(
        "--threads", type=_threads, default=None, help="CPU threads for torch (default: torch's choice)"
    )
    parser.add_argument("--quiet", action="store_true",
                        help="no progress display (on a terminal a bar, else one line per stage)")
    from .cli_longform import add_longform_arguments

    add_longform_arguments(parser)  # --text-file, --pause, --continuity, --save-voice, --offload, ...
    return parser


def build_speak_parser(prog: str = "bark-kernels speak") -> argparse.ArgumentParser:
    from bark_kernels.cli import OneLineArgumentParser  # usage errors on one line

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
# WAV output


def write_wav_atomic(path: str, audio, sample_rate: int = 24_000) -> int:
    """Write mono float audio in [-1, 1] as 16-bit PCM; temp file in the same directory + os.replace.

    Returns the number of samples written. Values outside [-1, 1] are clipped, non-finite values become 0.
    """
    tmp, n = _write_wav_temp(path, audio, sample_rate)
    try:
        os.replace(tmp, os.path.abspath(path))
    except BaseException:
        _remove_quietly(tmp)
        raise
    return n


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _write_wav_temp(path: str, audio, sample_rate: int) -> tuple[str, int]:
    """The WAV for ``path`` written in full to a temporary file next to it: (temp path, samples). Nothing is left
    behind when this fails."""
    samples = np.asarray(audio, dtype=np.float32).reshape(-1)
    if not np.isfinite(samples).all():
        logger.warning("%s: %d non-finite audio samples written as 0", path, int((~np.isfinite(samples)).sum()))
        samples = np.nan_to_num(samples, nan=0.0, posinf=0.0, neginf=0.0)
    pcm = np.round(np.clip(samples, -1.0, 1.0) * 32767.0).astype("<i2")
    target = os.path.abspath(path)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(target) + ".", suffix=".tmp", dir=os.path.dirname(target))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the WAV a normal file's permissions
        with os.fdopen(fd, "wb") as f:
            with wave.open(f, "wb") as w:
                w.setnchannels(1)
                w.setsampwidth(SAMPLE_WIDTH_BYTES)
                w.setframerate(int(sample_rate))
                w.writeframes(pcm.tobytes())
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        _remove_quietly(tmp)
        raise
    return tmp, int(pcm.shape[0])


def _write_outputs(outputs: Sequence[str], rows: Sequence[np.ndarray], sample_rate: int) -> list[tuple[str, int]]:
    """Every WAV written to a temporary file first, then all moved into place: a failure (disk full, a file made
    read-only meanwhile) leaves the previous files as they were and no temporary file behind."""
    temps: list[tuple[str, str, int]] = []
    try:
        for path, samples in zip(outputs, rows, strict=True):
            try:
                tmp, n = _write_wav_temp(path, samples, sample_rate)
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
                _remove_quietly(tmp)


def _output_paths(output: str, count: int) -> list[str]:
    if count == 1:
        return [output]
    stem, ext = os.path.splitext(output)
    return [f"{stem}_{i:03d}{ext or '.wav'}" for i in range(count)]


def _check_output_path(path: str) -> None:
    """Everything that would stop the WAV from being written, found before any work: a directory (also a path ending
    in a separator, existing or not), a missing or unwritable directory, an existing file that cannot be replaced."""
    if not path.strip():
        raise SpeakError("--output: expected a file path such as out.wav, got an empty string")
    if path.endswith(os.sep) or (os.altsep is not None and path.endswith(os.altsep)):
        raise SpeakError(f"--output: {path!r} ends with a path separator, so it names a directory; expected a file "
                         f"path such as {os.path.join(path, 'out.wav')!r}")
    if os.path.isdir(path):
        raise SpeakError(f"--output: {path!r} is a directory; expected a file path such as out.wav")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise SpeakError(f"--output: the directory {parent!r} does not exist")
    if not os.access(parent, os.W_OK):
        raise SpeakError(f"--output: the directory {parent!r} is not writable")
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


def _read_texts(args) -> list[str]:
    if args.text is not None and args.batch_file is not None:
        raise SpeakError("give the text either as an argument or with --batch-file, not both")
    if args.batch_file is not None:
        try:
            with open(args.batch_file, encoding="utf-8") as f:
                texts = [line.strip() for line in f]
        except FileNotFoundError:
            raise SpeakError(f"--batch-file: {args.batch_file!r} does not exist") from None
        except (OSError, UnicodeDecodeError) as e:
            raise SpeakError(f"--batch-file: cannot read {args.batch_file!r} as UTF-8 text: {e}") from None
        texts = [t for t in texts if t]
        if not texts:
            raise SpeakError(f"--batch-file: {args.batch_file!r} has no non-empty line")
        return texts
    if args.text is None:
        raise SpeakError('nothing to speak: give a text (bark-kernels speak "Hello." -o out.wav) or --batch-file')
    if not args.text.strip():
        raise SpeakError("text: empty; give some words to speak")
    return [args.text]


def _check_flags(args, outputs: Sequence[str]) -> None:
    """Flags that contradict each other, or an output that would overwrite an input."""
    if args.greedy and args.temperature is not None:
        raise SpeakError(f"--temperature {args.temperature:g}: greedy decoding (--greedy) uses no temperature; drop "
                         f"one of the two")
    targets = {os.path.realpath(p) for p in outputs}
    for flag, path in (("--batch-file", args.batch_file), ("--voice", args.voice),
                       ("--text-file", getattr(args, "text_file", None))):
        if path is not None and os.path.realpath(path) in targets:
            raise SpeakError(f"--output {args.output!r} would overwrite the {flag} file {path!r}; choose another path")


def _resolve_device_and_dtype(args):
    import torch

    from bark_kernels.devices import parse_device

    if args.device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = parse_device(args.device, "--device")
        except ValueError as e:
            raise SpeakError(str(e)) from None
    if args.dtype == "auto":
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, args.dtype)
    return device, dtype


def _set_threads(threads: int | None, device) -> str | None:
    """--threads, or on a CPU run of an oversubscribed machine one thread: torch's OpenMP workers then wait on
    descheduled peers at every op (a decode step measured 6x slower with 2 threads than with 1 at load 2x the cores)."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
        return None
    if device.type != "cpu" or not hasattr(os, "getloadavg"):
        return None
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0]
    if torch.get_num_threads() > 1 and load > cores:
        torch.set_num_threads(1)
        return (
            f"threads: the machine is busy (load {load:.1f} on {cores} cores), so torch runs on 1 thread; "
            f"pass --threads N to choose"
        )
    return None


def _hub_cached(repo_id: str) -> bool:
    """True when repo_id's config.json is in the local Hugging Face cache (no network access)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # a malformed cache must not stop the random-model fallback
        return False


# ----------------------------------------------------------------------------------------------------------------------
# the model and the text encoding


@dataclass
class _Loaded:
    model: object
    source: str  # what to print
    random: bool
    processor: object | None = None


@dataclass
class _Plan:
    """Everything known and checked before a weight is read: where the model comes from, its configuration, the
    processor (tokenizer and voice preset table), the voice preset, the semantic token cap."""

    name: str  # checkpoint directory, repo id or RANDOM_MODEL
    config: object  # bark.BarkConfig
    processor: object | None
    history_prompt: dict | None
    max_new_tokens: int | None  # None: the checkpoint's

    @property
    def random(self) -> bool:
        return self.name == RANDOM_MODEL


def _plan(args, texts: Sequence[str], device, dtype) -> _Plan:
    # Submodules, not ``bark``'s re-exports: works even where ``bark`` resolves as a namespace package (an editable
    # install made before bark/__init__.py existed).
    from . import config as bark_config

    name = args.model
    if name is None:
        name = DEFAULT_REPO if _hub_cached(DEFAULT_REPO) else RANDOM_MODEL
        if name == RANDOM_MODEL:
            print(
                f"No --model given and {DEFAULT_REPO} is not in the local Hugging Face cache: using the built-in "
                f"random model.",
                flush=True,
            )
    processor = None
    if name == RANDOM_MODEL:
        config = bark_config.bark_small_config()
        for i, text in enumerate(texts):
            size = len(text.encode("utf-8"))
            if size > RANDOM_MODEL_MAX_TEXT_BYTES:
                where = f"line {i + 1} of --batch-file" if args.batch_file is not None else "text"
                print(f"bark-kernels speak: warning: {where}: {size} UTF-8 bytes; the built-in random model reads the "
                      f"first {RANDOM_MODEL_MAX_TEXT_BYTES} (one position per byte, no tokenizer), the rest is cut",
                      file=sys.stderr, flush=True)
    else:
        from .loading import load_config
        from .processor import BarkProcessor

        try:
            config = load_config(name)
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise SpeakError(f"--model {name}: {e}") from None
        try:
            processor = BarkProcessor.from_pretrained(name)
        except (OSError, ValueError, TypeError) as e:
            raise SpeakError(f"--model {name}: cannot load its tokenizer / voice presets: {e}") from None
    history_prompt = _load_voice(processor, args.voice, config)
    _check_attention(args.attn, config, device, dtype)
    return _Plan(name, config, processor, history_prompt, _semantic_max_new_tokens(args, name, config))


def _check_attention(attn: str, config, device, dtype) -> None:
    """The backend that --attn (or BARK_KERNELS_BACKEND) names serves every attention op of this model on this device
    and dtype; found here rather than at the first attention call, after the load."""
    import torch

    from bark_kernels import BackendUnavailableError, registry

    from .config import attn_backend_name

    requested = attn_backend_name(attn)
    try:
        env = registry.env_backend()
    except ValueError as e:
        raise SpeakError(str(e)) from None
    if requested is not None:
        source = f"--attn {attn}"
    elif env is not None:
        source = f"{registry.ENV_BACKEND}={env}"
    else:
        source = "--attn auto"
    head_dims = sorted({c.head_dim for c in (config.semantic_config, config.coarse_acoustics_config,
                                             config.fine_acoustics_config)})
    for op in ("attention", "attention_with_kvcache", "attention_varlen"):
        for head_dim in head_dims:
            try:
                registry.select(op, device, dtype, head_dim, backend=requested)
            except (BackendUnavailableError, ValueError) as e:
                hint = ""
                name = requested or env
                if device.type == "cpu" and name in registry.BACKENDS and \
                        registry.why_not(name, "attention", device, torch.float32, 64) is not None:
                    fix = ("use --attn auto, sdpa or eager" if requested
                           else f"unset {registry.ENV_BACKEND} or set it to sdpa or eager")
                    note = "; Triton's kernels run on a CPU only under TRITON_INTERPRET=1, slowly" \
                        if name == "triton" else ""
                    hint = f" (on a CPU: {fix}{note})"
                raise SpeakError(f"{source}: {e}{hint}") from None


def _semantic_max_new_tokens(args, name: str, config) -> int | None:
    max_new = args.semantic_max_new_tokens
    if max_new is None and name == RANDOM_MODEL:
        max_new = RANDOM_MODEL_SEMANTIC_MAX_NEW_TOKENS
    prompt = config.generation_config.semantic_config.max_input_semantic_length
    limit = config.semantic_config.block_size - prompt
    if max_new is not None and max_new > limit:
        raise SpeakError(f"--semantic-max-new-tokens: expected at most {limit} (the semantic model's block_size "
                         f"{config.semantic_config.block_size} minus its {prompt} text positions), got {max_new}")
    return max_new


def _load_model(args, plan: _Plan, device, dtype) -> _Loaded:
    import torch

    from .model import BarkModel

    if plan.random:
        torch.manual_seed(args.seed)
        try:
            model = BarkModel(plan.config, attn_implementation=args.attn)
        except (ValueError, TypeError, RuntimeError) as e:
            raise SpeakError(f"--attn {args.attn}: {e}") from None
        model = model.to(device=device, dtype=dtype).eval()
        return _Loaded(model, "built-in random model with bark-small's shapes (NOT trained)", True)
    try:
        model = BarkModel.from_pretrained(plan.name, attn_implementation=args.attn, dtype=dtype, device=device)
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as e:
        raise SpeakError(f"--model {plan.name}: {e}") from None
    return _Loaded(model.eval(), plan.name, False, plan.processor)


def _encode_without_tokenizer(texts: Sequence[str], max_length: int = RANDOM_MODEL_MAX_TEXT_BYTES):
    """The random model has no vocabulary: UTF-8 bytes -> ids 1000 + byte (any fixed map is as good as noise)."""
    import torch

    input_ids = torch.zeros(len(texts), max_length, dtype=torch.long)  # (B, 256)
    attention_mask = torch.zeros(len(texts), max_length, dtype=torch.long)  # (B, 256)
    for b, text in enumerate(texts):
        ids = [1000 + byte for byte in text.encode("utf-8")][:max_length]
        if ids:
            input_ids[b, : len(ids)] = torch.tensor(ids)
            attention_mask[b, : len(ids)] = 1
    return input_ids, attention_mask


def _load_voice(processor, voice: str | None, config):
    if voice is None:
        return None
    gen = config.generation_config
    bounds = dict(n_coarse_codebooks=gen.coarse_acoustics_config.n_coarse_codebooks,
                  n_fine_codebooks=gen.fine_acoustics_config.n_fine_codebooks,
                  semantic_vocab_size=gen.semantic_config.semantic_vocab_size, codebook_size=gen.codebook_size)
    import torch

    from .processor import load_voice_preset_npz, validate_voice_preset

    if processor is not None:
        try:
            preset = processor.load_voice_preset(voice)
            validate_voice_preset(preset, source=f"--voice {voice!r}", **bounds)  # this checkpoint's sizes
            return preset
        except (OSError, ValueError, TypeError) as e:
            raise SpeakError(f"--voice: {e}") from None
    path = voice if voice.endswith(".npz") else voice + ".npz"
    if not os.path.isfile(path):
        raise SpeakError(
            f"--voice: the built-in random model has no named voice presets; expected an .npz file, "
            f"{path!r} does not exist"
        )
    try:
        arrays = validate_voice_preset(load_voice_preset_npz(path), source=f"--voice {path!r}", **bounds)
    except (OSError, ValueError, TypeError) as e:
        raise SpeakError(str(e)) from None
    return {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}


# ----------------------------------------------------------------------------------------------------------------------
# per-stage progress and timing


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
class _Monitor:
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


def _backend_report(model, device, dtype) -> str:
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


# ----------------------------------------------------------------------------------------------------------------------
# the command


def run_speak(args: argparse.Namespace) -> int:
    """Run ``speak`` with parsed arguments; returns the exit code. User errors print one line to stderr."""
    import torch

    threads = torch.get_num_threads()
    try:
        return _run(args)
    except SpeakError as e:
        text = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())  # one line, whatever came
        print(f"bark-kernels speak: error: {text}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bark-kernels speak: interrupted (no partial WAV is left behind)", file=sys.stderr)
        return 130
    finally:
        torch.set_num_threads(threads)  # speak_main may run inside a larger program (tests): leave torch as found


def _run(args: argparse.Namespace) -> int:
    from . import cli_longform

    if cli_longform.wanted(args):  # a text of any length (the argument or --text-file): one recording, piece by piece
        return cli_longform.run(args)
    # --batch-file: one WAV per line. Everything that can be checked without the weights is checked first: a mistake
    # costs no model load.
    texts = _read_texts(args)
    outputs = _output_paths(args.output, len(texts))
    _check_flags(args, outputs)
    for path in outputs:
        _check_output_path(path)
    if args.voice is not None and args.voice.endswith(".npz") and not os.path.isfile(args.voice):
        raise SpeakError(f"--voice: {args.voice!r} does not exist")

    import torch

    from bark_kernels import BackendUnavailableError

    device, dtype = _resolve_device_and_dtype(args)
    plan = _plan(args, texts, device, dtype)
    if plan.processor is not None:
        encoded = plan.processor.encode_text(texts)
        all_ids, all_mask = encoded["input_ids"], encoded["attention_mask"]
    else:
        all_ids, all_mask = _encode_without_tokenizer(texts)
    threads_note = _set_threads(args.threads, device)

    t0 = time.perf_counter()
    loaded = _load_model(args, plan, device, dtype)
    model = loaded.model
    load_s = time.perf_counter() - t0
    history_prompt = plan.history_prompt

    gen_kwargs: dict = {"do_sample": not args.greedy}
    if args.temperature is not None:
        gen_kwargs["semantic_temperature"] = args.temperature
        gen_kwargs["coarse_temperature"] = args.temperature
    max_new = plan.max_new_tokens
    if max_new is not None:
        gen_kwargs["semantic_max_new_tokens"] = max_new
    semantic_total = max_new if max_new is not None else model.generation_config.semantic_config.max_new_tokens
    sample_rate = int(model.sampling_rate)

    print(f"model:  {loaded.source}  [{device}, {str(dtype).replace('torch.', '')}, attn={args.attn}]", flush=True)
    if loaded.random:
        print(
            f"NOTE: this model is randomly initialised, so the audio is NOISE, not speech; text is encoded as bytes "
            f"(no tokenizer) and semantic_max_new_tokens defaults to {RANDOM_MODEL_SEMANTIC_MAX_NEW_TOKENS} to keep "
            f"the run short. Pass --model suno/bark-small (downloaded once) for real speech.",
            flush=True,
        )
    if threads_note:
        print(threads_note, flush=True)
    mode = "greedy" if args.greedy else f"sampling (seed {args.seed})"
    print(f"texts:  {len(texts)}  decoding: {mode}  semantic_max_new_tokens: {semantic_total}", flush=True)

    monitor = _Monitor(show=not args.quiet)
    rows: list[np.ndarray] = []
    gen_s = 0.0
    try:
        for start in range(0, len(texts), args.batch_size):
            input_ids = all_ids[start : start + args.batch_size]
            attention_mask = all_mask[start : start + args.batch_size]
            torch.manual_seed(args.seed + start)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t1 = time.perf_counter()
            try:
                audio, lengths = model.generate(
                    input_ids.to(device),
                    attention_mask=attention_mask.to(device),
                    history_prompt=history_prompt,
                    return_output_lengths=True,
                    callback=monitor,
                    **gen_kwargs,
                )
            except (ValueError, TypeError, BackendUnavailableError) as e:
                raise SpeakError(f"generation failed: {e}") from None
            except getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError) as e:
                raise SpeakError(f"generation failed: out of memory on {device} ({str(e).splitlines()[0]}); try a "
                                 f"smaller --batch-size") from None
            gen_s += time.perf_counter() - t1
            audio = audio.float().cpu().numpy()
            rows.extend(audio[b, : int(n)] for b, n in enumerate(lengths))
    finally:
        monitor.close()

    written = _write_outputs(outputs, rows, sample_rate)
    for path, n in written:
        if n == 0:
            logger.warning("%s: the model ended at once: 0 samples written", path)

    total_samples = sum(n for _, n in written)
    audio_s = total_samples / sample_rate
    hop = getattr(model.codec_model, "hop_length", 320)
    frames = total_samples // hop
    n_coarse = model.generation_config.coarse_acoustics_config.n_coarse_codebooks
    n_fine = model.generation_config.fine_acoustics_config.n_fine_codebooks
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
        secs = st.seconds
        rate = st.tokens / secs if secs > 0 else float("inf")
        print(f"  {stage:<11} {secs:8.2f} s  {st.tokens:7d} {what:<6} {rate:9.1f} {what}/s")
    rtf = gen_s / audio_s if audio_s > 0 else float("inf")
    print(
        f"  generate    {gen_s:8.2f} s  for {audio_s:.2f} s of audio: real-time factor {rtf:.2f} "
        f"({'faster' if rtf < 1 else 'slower'} than real time)"
    )
    print(f"  attention   {_backend_report(model, device, dtype)}")
    for path, n in written:
        print(
            f"wrote {path}  ({n} samples, {n / sample_rate:.2f} s, {sample_rate} Hz, 16-bit mono)"
            + ("  [random model: noise]" if loaded.random else "")
        )
    return 0
