"""Voice prompts from generations: any generation's tokens as a voice preset in suno's layout, saved and loaded.

A voice prompt (suno's ``history_prompt``) is three integer arrays::

    semantic_prompt  (n,)                       semantic tokens
    coarse_prompt    (n_coarse_codebooks, m)    EnCodec codes of the first codebooks (2 for Bark)
    fine_prompt      (n_fine_codebooks, m)      EnCodec codes of every codebook (8 for Bark)

and an ``.npz`` file holding them under those names is what suno's ``generate_audio(..., history_prompt=PATH)`` and
this project's ``--voice PATH`` / ``BarkProcessor.load_voice_preset`` read.

    rec = bark.voice.VoiceRecorder(model)
    audio = model.generate(**inputs, callback=rec)          # any generate call
    bark.voice.save_voice("me.npz", rec.voice(0))           # row 0's generation as a voice
    audio = model.generate(**inputs, history_prompt=bark.voice.load_voice("me.npz"))

Conversions: generate's coarse output is one stream of coarse-model ids with the codebooks interleaved
(``semantic_vocab_size + codebook * codebook_size + code``); :func:`coarse_codebooks` turns it into the
``(n_coarse, frames)`` codes as the fine stage reads them (``remainder(id - semantic_vocab_size, codebook_size)``),
so ``coarse_prompt`` equals ``fine_prompt[:n_coarse]``, and reading the prompt back (``bark.generation``) gives the
generated ids again. (transformers lets the last coarse codebook's logits run to the end of the vocabulary: an id
past it, which only a model that is not trained picks, comes back as the code the fine stage and the audio used.)
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping

import numpy as np
import torch

__all__ = ["VoiceRecorder", "coarse_codebooks", "voice_from_tokens", "save_voice", "load_voice", "VOICE_KEYS"]

VOICE_KEYS = ("semantic_prompt", "coarse_prompt", "fine_prompt")


def _numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def coarse_codebooks(coarse_ids, generation_config) -> np.ndarray:
    """Interleaved coarse-model ids (len,) as generated -> codes (n_coarse_codebooks, len // n_coarse_codebooks)."""
    gen = generation_config
    n_coarse = gen.coarse_acoustics_config.n_coarse_codebooks
    cb = gen.codebook_size
    ids = _numpy(coarse_ids).astype(np.int64).reshape(-1)
    if ids.shape[0] % n_coarse:
        raise ValueError(f"coarse_ids: expected a multiple of {n_coarse} ids (codebooks interleaved), "
                         f"got {ids.shape[0]}")
    codes = ids.reshape(-1, n_coarse).T - gen.semantic_config.semantic_vocab_size  # (n_coarse, frames)
    codes = np.remainder(codes, cb)  # codebook n's offset n * cb off; as the fine stage reads them (see above)
    return np.ascontiguousarray(codes)


def voice_from_tokens(semantic, coarse_ids, fine, generation_config) -> dict[str, np.ndarray]:
    """One row's generation -> a voice prompt (int64 numpy arrays in suno's layout).

    semantic (n,) tokens; coarse_ids (len,) interleaved coarse-model ids (generate's coarse output); fine
    (n_fine_codebooks, frames) codes."""
    fine = _numpy(fine).astype(np.int64)
    n_fine = generation_config.fine_acoustics_config.n_fine_codebooks
    if fine.ndim != 2 or fine.shape[0] != n_fine:
        raise ValueError(f"fine: expected shape ({n_fine}, frames), got {fine.shape}")
    return {"semantic_prompt": _numpy(semantic).astype(np.int64).reshape(-1),
            "coarse_prompt": coarse_codebooks(coarse_ids, generation_config),
            "fine_prompt": np.ascontiguousarray(fine)}


class VoiceRecorder:
    """A ``generate(..., callback=...)`` callback that keeps each row's semantic, coarse and fine tokens of the last
    call, so that any generation can become a voice prompt (:meth:`voice`). ``forward`` (optional) receives every
    event too (chain it with a progress callback)."""

    def __init__(self, model, forward: Callable | None = None) -> None:
        self.generation_config = model.generation_config
        self.forward = forward
        self.outputs: dict[str, list] = {}

    def __call__(self, event) -> None:
        if event.kind == "start" and event.stage == "semantic":
            self.outputs = {}
        if event.kind == "end" and event.output is not None:
            self.outputs[event.stage] = [t.detach().cpu() for t in event.output]
        if self.forward is not None:
            self.forward(event)

    @property
    def rows(self) -> int:
        return len(self.outputs.get("fine", []))

    def voice(self, row: int = 0) -> dict[str, np.ndarray]:
        """Row ``row``'s generation of the last call as a voice prompt (suno's layout, int64 numpy arrays)."""
        missing = [s for s in ("semantic", "coarse", "fine") if s not in self.outputs]
        if missing:
            raise RuntimeError(f"VoiceRecorder: no complete generation recorded yet (missing stages {missing}); pass "
                               f"it as generate(..., callback=recorder) first")
        if not 0 <= row < self.rows:
            raise IndexError(f"row: expected 0 <= row < {self.rows}, got {row}")
        return voice_from_tokens(self.outputs["semantic"][row], self.outputs["coarse"][row],
                                 self.outputs["fine"][row], self.generation_config)


def _check_voice(voice: Mapping, where: str) -> dict[str, np.ndarray]:
    from .processor import validate_voice_preset

    if not isinstance(voice, Mapping) and hasattr(voice, "voice"):
        voice = voice.voice()  # a bark.longform.SpeechPiece
    if not isinstance(voice, Mapping):
        raise TypeError(f"{where}: expected a dict with {list(VOICE_KEYS)} (or a bark.longform.SpeechPiece), got "
                        f"{type(voice).__name__}")
    arrays = validate_voice_preset({k: voice[k] for k in VOICE_KEYS if k in voice}, n_coarse_codebooks=None,
                                   n_fine_codebooks=None, source=where)
    return {k: np.ascontiguousarray(v.astype(np.int64)) for k, v in arrays.items()}


def save_voice(path: str | os.PathLike, voice) -> str:
    """Write a voice prompt (a dict of the three arrays, or a ``SpeechPiece``) as an uncompressed ``.npz`` holding
    exactly semantic_prompt, coarse_prompt, fine_prompt (int64), as suno saves them; ".npz" is appended when the
    path lacks it. Written to a temporary file and moved into place. Returns the path written."""
    arrays = _check_voice(voice, "voice")
    path = os.fspath(path)
    if not path.endswith(".npz"):
        path += ".npz"
    target = os.path.abspath(path)
    directory = os.path.dirname(target)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"path: the directory {directory!r} does not exist")
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(target) + ".", suffix=".tmp", dir=directory)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def load_voice(path: str | os.PathLike, n_coarse_codebooks: int | None = 2,
               n_fine_codebooks: int | None = 8) -> dict[str, np.ndarray]:
    """Read a voice prompt ``.npz`` (this project's or suno's) -> the three arrays, validated (no pickles)."""
    from .processor import load_voice_preset_npz, validate_voice_preset

    path = os.fspath(path)
    return validate_voice_preset(load_voice_preset_npz(path), n_coarse_codebooks=n_coarse_codebooks,
                                 n_fine_codebooks=n_fine_codebooks, source=f"voice {path!r}")
