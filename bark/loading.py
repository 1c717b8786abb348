"""Hugging Face Bark checkpoint -> ``bark.BarkModel``.

A checkpoint is a directory (or a Hugging Face repo id, resolved through the local cache first and downloaded with
huggingface_hub only when online) holding:

    config.json               semantic_config, coarse_acoustics_config, fine_acoustics_config, codec_config
    generation_config.json    optional; Bark's defaults when absent
    model.safetensors         or pytorch_model.bin (read with torch.load(weights_only=True)), or a sharded
                              model.safetensors.index.json / pytorch_model.bin.index.json with its shards

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
from collections.abc import Callable, Mapping

import torch

from .config import BarkConfig

__all__ = ["load_bark_model", "load_checkpoint", "load_config", "resolve_checkpoint", "read_state_dict",
           "hub_unreachable_reason", "CheckpointError"]

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
SUBMODELS = ("semantic", "coarse_acoustics", "fine_acoustics")
CODEC_PREFIX = "codec_model."
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_MASK_BUFFER = re.compile(r"(semantic|coarse_acoustics)\.layers\.\d+\.attn\.bias")

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the key."""


# ----------------------------------------------------------------------------------------------------------------------
# locating files


class _Source:
    """Where checkpoint files come from: a local directory or a hub repo (cache first)."""

    def __init__(self, name: str, find: Callable[[str], str | None], where: str, hint: str = "") -> None:
        self.name = name
        self.find = find  # filename -> local path or None when the checkpoint has no such file
        self.where = where
        self.hint = hint  # appended to "file is missing" errors


def _local_source(path: str) -> _Source:
    def find(filename: str) -> str | None:
        full = os.path.join(path, filename)
        return full if os.path.isfile(full) else None

    return _Source(path, find, f"directory {path}")


HUB_PROBE_TIMEOUT_S = 5.0


def hub_unreachable_reason(timeout: float = HUB_PROBE_TIMEOUT_S) -> str | None:
    """None when the Hugging Face Hub endpoint answers (any HTTP status), else why not, in one line.

    One request with a short timeout and no retries, through huggingface_hub's own HTTP client (its proxy and
    certificate settings): without it, a download from an unreachable Hub retries for ~25 s and then reports the file
    as missing from the cache."""
    try:
        from huggingface_hub import constants
        from huggingface_hub.utils import get_session
    except ImportError:  # pragma: no cover - an old huggingface_hub: let the download itself fail
        return None
    endpoint = constants.ENDPOINT
    try:
        get_session().head(endpoint, timeout=timeout)
    except Exception as error:  # connection refused, DNS failure, timeout, proxy error...
        text = " ".join(str(error).split()) or "no answer"
        return f"{endpoint} cannot be reached ({type(error).__name__}: {text})"
    return None


def _hub_source(repo_id: str, revision: str | None = None) -> _Source:
    try:
        import huggingface_hub
        from huggingface_hub import constants, try_to_load_from_cache
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
        from huggingface_hub.file_download import _CACHED_NO_EXIST
    except ImportError as error:
        raise FileNotFoundError(
            f"{repo_id!r} is not a local directory, and huggingface_hub (needed to resolve a repo id) is not "
            f"installed ({error}); pass the path of a checkpoint directory or `pip install huggingface_hub`"
        ) from None

    offline = bool(constants.HF_HUB_OFFLINE)
    todo = (f"On a machine with internet run `hf download {repo_id}` (then copy the cache, or point HF_HOME at it), "
            f"or pass the path of a local checkpoint directory.")
    probed: list[str | None] = []  # the Hub is probed once per source, before its first download

    def unreachable(filename: str, why: str) -> ConnectionError:
        return ConnectionError(f"{repo_id!r} is not a local directory and {filename} is not in the Hugging Face "
                               f"cache ({constants.HF_HUB_CACHE}); the Hugging Face Hub is unreachable: {why}. {todo}")

    def find(filename: str) -> str | None:
        cached = try_to_load_from_cache(repo_id, filename, revision=revision)
        if isinstance(cached, str):
            return cached
        if cached is _CACHED_NO_EXIST:
            return None
        if offline:
            return None
        if not probed:
            probed.append(hub_unreachable_reason())
        if probed[0] is not None:
            raise unreachable(filename, probed[0])
        try:
            return huggingface_hub.hf_hub_download(repo_id, filename, revision=revision)
        except LocalEntryNotFoundError as error:  # a subclass of EntryNotFoundError: the network, not the file
            raise unreachable(filename, " ".join(str(error).split())) from None
        except EntryNotFoundError:
            return None
        except Exception as error:  # unknown repo, gated, server error...
            text = " ".join(str(error).split())
            raise FileNotFoundError(
                f"{repo_id!r} is not a local directory and {filename} is not in the Hugging Face cache "
                f"({constants.HF_HUB_CACHE}); downloading it failed: {type(error).__name__}: {text}. {todo}"
            ) from None

    where = f"Hugging Face repo {repo_id} (cache {constants.HF_HUB_CACHE}{', offline' if offline else ''})"
    hint = ""
    if offline:
        hint = (f"; it is not in the local Hugging Face cache and HF_HUB_OFFLINE is set, so nothing can be "
                f"downloaded: on a machine with internet run `hf download {repo_id}` and copy the cache here (or point "
                f"HF_HOME at it), unset HF_HUB_OFFLINE to download, or pass the path of a local checkpoint directory")
    return _Source(repo_id, find, where, hint)


def resolve_checkpoint(path_or_repo_id, revision: str | None = None) -> _Source:
    if isinstance(path_or_repo_id, os.PathLike):
        path_or_repo_id = os.fspath(path_or_repo_id)
    if not isinstance(path_or_repo_id, str) or not path_or_repo_id:
        raise TypeError(f"path_or_repo_id: expected a directory path or a Hugging Face repo id (str), "
                        f"got {path_or_repo_id!r}")
    if os.path.isdir(path_or_repo_id):
        return _local_source(path_or_repo_id)
    if os.path.exists(path_or_repo_id):
        raise FileNotFoundError(f"path_or_repo_id: {path_or_repo_id} is a file; expected a checkpoint directory "
                                f"holding {CONFIG_NAME} and the weights")
    if not _REPO_ID.fullmatch(path_or_repo_id):
        raise FileNotFoundError(f"path_or_repo_id: directory {path_or_repo_id} does not exist (and it is not a "
                                f"Hugging Face repo id of the form 'owner/name')")
    return _hub_source(path_or_repo_id, revision)


def _read_json(source: _Source, filename: str, required: bool) -> dict | None:
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


def read_state_dict(source: _Source) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
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


def _parse_dtype(dtype) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"dtype: expected a floating-point dtype, got {dtype}")
        return dtype
    if isinstance(dtype, str) and dtype.replace("torch.", "") in _DTYPES:
        return _DTYPES[dtype.replace("torch.", "")]
    raise ValueError(f"dtype: expected a torch dtype or one of {sorted(_DTYPES)}, got {dtype!r}")


def _list(keys, limit: int = 8) -> str:
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
    from .codec import load_codec_state_dict

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
        raise CheckpointError(f"{', '.join(files)}: missing key(s) {_list(missing)}")
    if unexpected:
        raise CheckpointError(f"{file_of(unexpected[0])}: unexpected key(s) {_list(unexpected)}")
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


def _read_config(source: _Source) -> BarkConfig:
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


def load_config(path_or_repo_id, revision: str | None = None) -> BarkConfig:
    """The checkpoint's configuration (config.json, generation_config.json) without reading any weight: what a caller
    needs to check its other arguments (backend, lengths, voice presets) before the expensive part."""
    return _read_config(resolve_checkpoint(path_or_repo_id, revision))


def load_checkpoint(path_or_repo_id, revision: str | None = None):
    """Read a checkpoint: (BarkConfig, tensors, origin) without building a model."""
    source = resolve_checkpoint(path_or_repo_id, revision)
    config = _read_config(source)
    tensors, origin = read_state_dict(source)
    return config, tensors, origin


def load_bark_model(path_or_repo_id, attn_implementation: str = "auto", dtype=None, device=None,
                    revision: str | None = None):
    """Build a ``BarkModel`` from a checkpoint directory or repo id, on ``device`` in ``dtype`` (default fp32).

    Every argument is checked before a file is read (device: cpu, cuda or cuda:N, present), and every weight is
    checked as it is read (names, shapes, dtypes, finite values)."""
    from bark_kernels.devices import parse_device

    from .config import attn_backend_name
    from .model import BarkModel, check_backend

    target_dtype = _parse_dtype(dtype)
    # Resolve the backend (and let bark_kernels import/self-test its backends) outside the meta-device block below.
    check_backend(attn_backend_name(attn_implementation))
    target_device = parse_device(device, "device") if device is not None else torch.device("cpu")
    if revision is not None and not isinstance(revision, str):
        raise TypeError(f"revision: expected a str (a branch, tag or commit of the Hugging Face repo) or None, "
                        f"got {type(revision).__name__}")
    config, tensors, origin = load_checkpoint(path_or_repo_id, revision)
    with torch.device("meta"):
        model = BarkModel(config, attn_implementation=attn_implementation)
    model = model.to_empty(device=target_device)
    model.fine_acoustics.tie_weights() if config.fine_acoustics_config.tie_word_embeddings else None
    ignored = load_state_dict_into(model, tensors, origin)
    if ignored:
        logger.info("ignored %d checkpoint keys by design (mask buffers, tied heads, codec encoder): %s",
                    len(ignored), _list(ignored, 4))
    model = model.to(dtype=target_dtype)
    model.eval()
    return model
