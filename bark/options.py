"""What an engine is built from, and the loading it implies: :class:`EngineOptions` (checkpoint or the built-in random
model, device, dtype, attention backend, decode mode, offload, threads, batch / wait / queue limits) and the steps
that turn them into a loaded model, each checking what it can before any weight is read.

    options = bark.EngineOptions(model="suno/bark-small", device="cuda", attn="triton", max_batch=16)
    engine = bark.Engine.from_options(options)

The steps, in the order a front end runs them (``speak`` prints between them): :func:`resolve_device` (device and
dtype), :func:`locate_model` (checkpoint configuration, tokenizer and voice-preset table; the random model when
there is no checkpoint), :func:`load_voice` (a voice preset checked against the checkpoint's sizes),
:func:`check_attention` (the backend serves every attention op of this model on this device and dtype),
:func:`set_threads`, then :func:`load_model`. Errors are :class:`OptionError` (a ValueError) naming the option by its
label: the field name by default, the flag when a command line passes its own labels (``{"model": "--model", ...}``),
so that the same checks give the same messages everywhere. Nothing here knows argparse.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import config as bark_config
from . import hub
from .loading import load_config
from .model import BarkModel
from .processor import BarkProcessor, load_voice_preset_npz, validate_voice_preset
from .session import DECODE_MODES

__all__ = ["EngineOptions", "OptionError", "ModelSource", "Loaded", "resolve_device", "locate_model", "load_voice",
           "check_attention", "set_threads", "load_model", "DEFAULT_REPO", "RANDOM_MODEL", "ATTN_CHOICES",
           "DTYPE_CHOICES"]

logger = logging.getLogger(__name__)

DEFAULT_REPO = "suno/bark-small"
RANDOM_MODEL = "random"
ATTN_CHOICES = ("auto", "triton", "cuda", "flash_attention_2", "sdpa", "eager")
DTYPE_CHOICES = ("auto", "float32", "float16", "bfloat16")


class OptionError(ValueError):
    """A bad or unusable engine option (or a checkpoint, voice or backend it names): one line naming the option."""


def _label(labels: Mapping[str, str] | None, name: str) -> str:
    return (labels or {}).get(name, name)


@dataclass(frozen=True)
class EngineOptions:
    """Everything an engine is built from (the command line's options, typed).

    ``model``: a checkpoint directory or Hugging Face repo id, ``"random"`` for the built-in random model with
    bark-small's shapes, or None (suno/bark-small when it is in the local Hugging Face cache, else the random model);
    ``device``: "cpu", "cuda", "cuda:N" or None (CUDA when available); ``dtype``: one of DTYPE_CHOICES ("auto":
    float16 on CUDA, float32 on CPU); ``attn``: the attention backend (ATTN_CHOICES); ``decode_mode``: how decode
    steps run ("auto", "eager", "graph", "compile", "fused"; bark.session); ``offload``: keep sub-models in CPU memory, each on
    the GPU for its stage only (a no-op without CUDA); ``threads``: torch's CPU threads (None: torch's choice, or 1 on
    a busy machine); ``max_batch``, ``max_wait``, ``max_queue``: the scheduler's limits (bark.engine);
    ``init_seed``: the random model's weights are drawn after ``torch.manual_seed(init_seed)``; ``generate_kwargs``:
    defaults of every request's ``generate`` (``do_sample``, ``semantic_max_new_tokens`` ...)."""

    model: str | None = None
    device: str | None = None
    dtype: str = "auto"
    attn: str = "auto"
    decode_mode: str = "auto"
    offload: bool = False
    threads: int | None = None
    max_batch: int = 8
    max_wait: float = 0.02
    max_queue: int = 64
    init_seed: int = 0
    generate_kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, choices in (("dtype", DTYPE_CHOICES), ("attn", ATTN_CHOICES), ("decode_mode", DECODE_MODES)):
            if getattr(self, name) not in choices:
                raise OptionError(f"{name}: expected one of {list(choices)}, got {getattr(self, name)!r}")
        for name in ("model", "device"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise OptionError(f"{name}: expected a str or None, got {type(value).__name__}")
        if not isinstance(self.offload, bool):
            raise OptionError(f"offload: expected True or False, got {self.offload!r}")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            raise OptionError(f"threads: expected an int >= 1 or None, got {self.threads!r}")
        if isinstance(self.init_seed, bool) or not isinstance(self.init_seed, int) or self.init_seed < 0:
            raise OptionError(f"init_seed: expected an int >= 0, got {self.init_seed!r}")
        if not isinstance(self.generate_kwargs, Mapping):
            raise OptionError(f"generate_kwargs: expected a mapping, got {type(self.generate_kwargs).__name__}")
        # max_batch, max_wait, max_queue: checked by the Engine that takes them (one place for those rules)


# ----------------------------------------------------------------------------------------------------------------------
# device, threads


def resolve_device(device: str | None, dtype: str = "auto", labels: Mapping[str, str] | None = None):
    """(torch.device, torch.dtype) of the options: None -> CUDA when available, else CPU; "auto" dtype -> float16 on
    CUDA, float32 on CPU."""
    import torch

    from bark_kernels.devices import parse_device

    if device is None:
        resolved = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            resolved = parse_device(device, _label(labels, "device"))
        except ValueError as e:
            raise OptionError(str(e)) from None
    if dtype not in DTYPE_CHOICES:
        raise OptionError(f"{_label(labels, 'dtype')}: expected one of {list(DTYPE_CHOICES)}, got {dtype!r}")
    if dtype == "auto":
        return resolved, torch.float16 if resolved.type == "cuda" else torch.float32
    return resolved, getattr(torch, dtype)


def set_threads(threads: int | None, device, labels: Mapping[str, str] | None = None) -> str | None:
    """``threads``, or on a CPU run of an oversubscribed machine one thread: torch's OpenMP workers then wait on
    descheduled peers at every op (a decode step measured 6x slower with 2 threads than with 1 at load 2x the cores).
    Returns a note to show when it chose for the caller."""
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
        return (f"threads: the machine is busy (load {load:.1f} on {cores} cores), so torch runs on 1 thread; "
                f"pass {_label(labels, 'threads')} N to choose")
    return None


# ----------------------------------------------------------------------------------------------------------------------
# the checkpoint


@dataclass
class ModelSource:
    """Where the model comes from, known and checked before a weight is read: ``name`` (checkpoint directory, repo id
    or RANDOM_MODEL), its ``config`` (bark.BarkConfig), its ``processor`` (tokenizer and voice-preset table; None for
    the random model) and whether the name was chosen for the caller (``defaulted``: no model was named)."""

    name: str
    config: Any
    processor: Any | None
    defaulted: bool = False

    @property
    def random(self) -> bool:
        return self.name == RANDOM_MODEL


@dataclass
class Loaded:
    """A loaded model: ``model`` (eval, on its device), ``source`` (what to show), ``random`` (the built-in random
    model: its audio is noise), ``processor`` (None for the random model)."""

    model: Any
    source: str
    random: bool
    processor: Any | None = None


def locate_model(model: str | None, labels: Mapping[str, str] | None = None) -> ModelSource:
    """The checkpoint's configuration and processor (or the random model's), read without the weights."""
    defaulted = model is None
    name = model
    if name is None:
        name = DEFAULT_REPO if hub.hub_cached(DEFAULT_REPO) else RANDOM_MODEL
    if name == RANDOM_MODEL:
        return ModelSource(name, bark_config.bark_small_config(), None, defaulted)
    flag = _label(labels, "model")
    try:
        config = load_config(name)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise OptionError(f"{flag} {name}: {e}") from None
    try:
        processor = BarkProcessor.from_pretrained(name)
    except (OSError, ValueError, TypeError) as e:
        raise OptionError(f"{flag} {name}: cannot load its tokenizer / voice presets: {e}") from None
    return ModelSource(name, config, processor, defaulted)


def load_voice(processor, voice: str | None, config, labels: Mapping[str, str] | None = None):
    """A voice preset name (with the checkpoint's processor) or an .npz path -> the preset (dict of long tensors),
    checked against this checkpoint's sizes and vocabularies; None -> None."""
    if voice is None:
        return None
    flag = _label(labels, "voice")
    gen = config.generation_config
    bounds = dict(n_coarse_codebooks=gen.coarse_acoustics_config.n_coarse_codebooks,
                  n_fine_codebooks=gen.fine_acoustics_config.n_fine_codebooks,
                  semantic_vocab_size=gen.semantic_config.semantic_vocab_size, codebook_size=gen.codebook_size)
    import torch

    if processor is not None:
        try:
            preset = processor.load_voice_preset(voice)
            validate_voice_preset(preset, source=f"{flag} {voice!r}", **bounds)  # this checkpoint's sizes
            return preset
        except (OSError, ValueError, TypeError) as e:
            raise OptionError(f"{flag}: {e}") from None
    path = voice if voice.endswith(".npz") else voice + ".npz"
    if not os.path.isfile(path):
        raise OptionError(f"{flag}: the built-in random model has no named voice presets; expected an .npz file, "
                          f"{path!r} does not exist")
    try:
        arrays = validate_voice_preset(load_voice_preset_npz(path), source=f"{flag} {path!r}", **bounds)
    except (OSError, ValueError, TypeError) as e:
        raise OptionError(str(e)) from None
    return {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}


def check_attention(attn: str, config, device, dtype, labels: Mapping[str, str] | None = None) -> None:
    """The backend that ``attn`` (or BARK_KERNELS_BACKEND) names serves every attention op of this model on this device
    and dtype; found here rather than at the first attention call, after the load."""
    import torch

    from bark_kernels import BackendUnavailableError, registry

    flag = _label(labels, "attn")
    requested = bark_config.attn_backend_name(attn)
    try:
        env = registry.env_backend()
    except ValueError as e:
        raise OptionError(str(e)) from None
    if requested is not None:
        source = f"{flag} {attn}"
    elif env is not None:
        source = f"{registry.ENV_BACKEND}={env}"
    else:
        source = f"{flag} auto"
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
                    fix = (f"use {flag} auto, sdpa or eager" if requested
                           else f"unset {registry.ENV_BACKEND} or set it to sdpa or eager")
                    note = "; Triton's kernels run on a CPU only under TRITON_INTERPRET=1, slowly" \
                        if name == "triton" else ""
                    hint = f" (on a CPU: {fix}{note})"
                raise OptionError(f"{source}: {e}{hint}") from None


def load_model(source: ModelSource, attn: str, device, dtype, init_seed: int = 0,
               labels: Mapping[str, str] | None = None) -> Loaded:
    """The weights: the checkpoint's, or the random model's (drawn after ``torch.manual_seed(init_seed)``)."""
    import torch

    if source.random:
        torch.manual_seed(init_seed)
        try:
            model = BarkModel(source.config, attn_implementation=attn)
        except (ValueError, TypeError, RuntimeError) as e:
            raise OptionError(f"{_label(labels, 'attn')} {attn}: {e}") from None
        model = model.to(device=device, dtype=dtype).eval()
        return Loaded(model, "built-in random model with bark-small's shapes (NOT trained)", True)
    try:
        model = BarkModel.from_pretrained(source.name, attn_implementation=attn, dtype=dtype, device=device)
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as e:
        raise OptionError(f"{_label(labels, 'model')} {source.name}: {e}") from None
    return Loaded(model.eval(), source.name, False, source.processor)
