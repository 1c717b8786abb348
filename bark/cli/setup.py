"""What ``bark-kernels speak`` knows and checks before any weight is read, and how it loads the model: the options'
value types, the output paths, the texts, the device and dtype, the thread count on a busy machine, the checkpoint's
configuration, tokenizer and voice preset, the attention backend, the token cap; then the load itself and the final
write of every WAV. Shared by the short-text path (bark.cli) and the long-text path (bark.cli.longform). User errors
raise :class:`SpeakError` (one line, exit code 1).
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .. import config as bark_config
from .. import hub
from ..loading import load_config
from ..model import BarkModel
from ..processor import BarkProcessor, load_voice_preset_npz, validate_voice_preset
from ..wav import remove_quietly, write_wav_temp

__all__ = ["SpeakError", "Plan", "Loaded", "plan", "load_model", "check_output_path", "check_parent_directory",
           "check_voice_file", "output_paths", "read_texts", "check_flags", "resolve_device_and_dtype", "set_threads",
           "write_outputs", "generate_kwargs", "print_model"]

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


def read_texts(args) -> list[str]:
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


def check_flags(args, outputs: Sequence[str]) -> None:
    """Flags that contradict each other, or an output that would overwrite an input."""
    if args.greedy and args.temperature is not None:
        raise SpeakError(f"--temperature {args.temperature:g}: greedy decoding (--greedy) uses no temperature; drop "
                         f"one of the two")
    targets = {os.path.realpath(p) for p in outputs}
    for flag, path in (("--batch-file", args.batch_file), ("--voice", args.voice),
                       ("--text-file", getattr(args, "text_file", None))):
        if path is not None and os.path.realpath(path) in targets:
            raise SpeakError(f"--output {args.output!r} would overwrite the {flag} file {path!r}; choose another path")


def resolve_device_and_dtype(args):
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


def set_threads(threads: int | None, device) -> str | None:
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


# ----------------------------------------------------------------------------------------------------------------------
# the model


@dataclass
class Loaded:
    model: object
    source: str  # what to print
    random: bool
    processor: object | None = None


@dataclass
class Plan:
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


def plan(args, texts: Sequence[str], device, dtype) -> Plan:
    name = args.model
    if name is None:
        name = DEFAULT_REPO if hub.hub_cached(DEFAULT_REPO) else RANDOM_MODEL
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
        try:
            config = load_config(name)
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise SpeakError(f"--model {name}: {e}") from None
        try:
            processor = BarkProcessor.from_pretrained(name)
        except (OSError, ValueError, TypeError) as e:
            raise SpeakError(f"--model {name}: cannot load its tokenizer / voice presets: {e}") from None
    history_prompt = load_voice(processor, args.voice, config)
    check_attention(args.attn, config, device, dtype)
    return Plan(name, config, processor, history_prompt, semantic_max_new_tokens(args, name, config))


def check_attention(attn: str, config, device, dtype) -> None:
    """The backend that --attn (or BARK_KERNELS_BACKEND) names serves every attention op of this model on this device
    and dtype; found here rather than at the first attention call, after the load."""
    import torch

    from bark_kernels import BackendUnavailableError, registry

    requested = bark_config.attn_backend_name(attn)
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


def semantic_max_new_tokens(args, name: str, config) -> int | None:
    max_new = args.semantic_max_new_tokens
    if max_new is None and name == RANDOM_MODEL:
        max_new = RANDOM_MODEL_SEMANTIC_MAX_NEW_TOKENS
    prompt = config.generation_config.semantic_config.max_input_semantic_length
    limit = config.semantic_config.block_size - prompt
    if max_new is not None and max_new > limit:
        raise SpeakError(f"--semantic-max-new-tokens: expected at most {limit} (the semantic model's block_size "
                         f"{config.semantic_config.block_size} minus its {prompt} text positions), got {max_new}")
    return max_new


def load_model(args, plan: Plan, device, dtype) -> Loaded:
    import torch

    if plan.random:
        torch.manual_seed(args.seed)
        try:
            model = BarkModel(plan.config, attn_implementation=args.attn)
        except (ValueError, TypeError, RuntimeError) as e:
            raise SpeakError(f"--attn {args.attn}: {e}") from None
        model = model.to(device=device, dtype=dtype).eval()
        return Loaded(model, "built-in random model with bark-small's shapes (NOT trained)", True)
    try:
        model = BarkModel.from_pretrained(plan.name, attn_implementation=args.attn, dtype=dtype, device=device)
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as e:
        raise SpeakError(f"--model {plan.name}: {e}") from None
    return Loaded(model.eval(), plan.name, False, plan.processor)


def load_voice(processor, voice: str | None, config):
    if voice is None:
        return None
    gen = config.generation_config
    bounds = dict(n_coarse_codebooks=gen.coarse_acoustics_config.n_coarse_codebooks,
                  n_fine_codebooks=gen.fine_acoustics_config.n_fine_codebooks,
                  semantic_vocab_size=gen.semantic_config.semantic_vocab_size, codebook_size=gen.codebook_size)
    import torch

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


def generate_kwargs(args, plan: Plan) -> dict:
    """generate's keyword arguments from the options: sampling or greedy, the temperature of the semantic and coarse
    stages, the semantic token cap."""
    kwargs: dict = {"do_sample": not args.greedy}
    if args.temperature is not None:
        kwargs["semantic_temperature"] = args.temperature
        kwargs["coarse_temperature"] = args.temperature
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
