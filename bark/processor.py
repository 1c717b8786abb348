"""Bark's processor: text -> BERT (multilingual, cased) token ids padded to 256, plus voice presets.

Gives what transformers' ``BarkProcessor`` gives (tokenizer called with ``padding="max_length"``, ``max_length=256``,
``add_special_tokens=False``, attention mask, no token type ids), using the ``tokenizers`` library directly:

* the WordPiece vocabulary comes from the checkpoint's ``tokenizer.json`` when present, else ``vocab.txt``;
* the pipeline is the one transformers (5.x) builds for ``BertTokenizer``: ``BertNormalizer(clean_text=True,
  handle_chinese_chars=tokenize_chinese_chars, strip_accents=strip_accents, lowercase=do_lower_case)``, the BERT
  pre-tokenizer and WordPiece with ``[UNK]``; the options are read from ``tokenizer_config.json`` (Bark's tokenizer is
  cased: ``do_lower_case`` defaults to False when the file does not say);
* the special tokens ([PAD] [UNK] [CLS] [SEP] [MASK]) are added tokens, so typed in a text they map to their ids.

One deliberate difference: text longer than ``max_length`` tokens is truncated (``truncation=True``), where
transformers returns the longer row (and fails on a batch). Bark's semantic model reads only the first 256 ids, so the
generated audio is the same.

Voice presets: a name from the checkpoint's ``speaker_embeddings_path.json`` (each maps semantic_prompt, coarse_prompt,
fine_prompt to .npy files), a path to an ``.npz`` holding those three arrays, or a dict of them. They are validated
and returned under ``history_prompt`` as a dict of torch tensors.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from .hub import resolve_checkpoint

__all__ = ["BarkProcessor", "VOICE_PRESET_KEYS", "load_voice_preset_npz", "validate_voice_preset"]

logger = logging.getLogger(__name__)

VOICE_PRESET_KEYS = ("semantic_prompt", "coarse_prompt", "fine_prompt")
# Number of dimensions of each prompt: semantic (X,), coarse (n_coarse_codebooks, X), fine (n_fine_codebooks, X).
_PRESET_NDIM = {"semantic_prompt": 1, "coarse_prompt": 2, "fine_prompt": 2}

_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")
_SPECIAL_TOKEN_NAMES = ("unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_SPECIAL_TOKEN_DEFAULTS = {
    "unk_token": "[UNK]",
    "sep_token": "[SEP]",
    "pad_token": "[PAD]",
    "cls_token": "[CLS]",
    "mask_token": "[MASK]",
}


def _resolve_file(path_or_repo: str, filename: str) -> str | None:
    """Local path of ``filename`` in a checkpoint directory or Hugging Face repo (bark.hub); None when it has none."""
    return resolve_checkpoint(path_or_repo).find(filename)


def _read_json(path: str, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{what}: cannot read JSON from {path}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{what}: expected a JSON object in {path}, got {type(data).__name__}")
    return data


# --------------------------------------------------------------------------------------------------------------------
# Voice presets
# --------------------------------------------------------------------------------------------------------------------


def validate_voice_preset(
    preset: Mapping,
    n_coarse_codebooks: int | None = 2,
    n_fine_codebooks: int | None = 8,
    source: str = "voice_preset",
    semantic_vocab_size: int | None = 10_000,
    codebook_size: int | None = 1024,
) -> dict[str, np.ndarray]:
    """Check a voice preset and return it as a dict of the three numpy arrays.

    semantic_prompt (X,) with ids in [0, semantic_vocab_size), coarse_prompt (n_coarse_codebooks, X2) and fine_prompt
    (n_fine_codebooks, X3) with codes in [0, codebook_size) (transformers checks the number of dimensions; the codebook
    counts, dtype and ranges are checked here too since anything else fails later inside generation, as an index error
    of an embedding). The defaults are Bark's (every suno checkpoint); pass None to skip a check.
    """
    if not isinstance(preset, Mapping):
        raise TypeError(f"{source}: expected a mapping with keys {VOICE_PRESET_KEYS}, got {type(preset).__name__}")
    out: dict[str, np.ndarray] = {}
    expected_rows = {"coarse_prompt": n_coarse_codebooks, "fine_prompt": n_fine_codebooks}
    for key in VOICE_PRESET_KEYS:
        if key not in preset:
            raise ValueError(f"{source}: missing {key!r}; a voice preset needs {list(VOICE_PRESET_KEYS)}")
        value = preset[key]
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        if not isinstance(value, np.ndarray):
            raise TypeError(
                f"{source}[{key!r}]: expected a {_PRESET_NDIM[key]}D numpy array, got {type(value).__name__}"
            )
        if value.ndim != _PRESET_NDIM[key]:
            raise ValueError(
                f"{source}[{key!r}]: expected a {_PRESET_NDIM[key]}D array, got shape {value.shape} ({value.ndim}D)"
            )
        if not np.issubdtype(value.dtype, np.integer):
            raise ValueError(f"{source}[{key!r}]: expected integer token ids, got dtype {value.dtype}")
        rows = expected_rows.get(key)
        if rows is not None and value.shape[0] != rows:
            raise ValueError(f"{source}[{key!r}]: expected shape ({rows}, X) (one row per codebook), got {value.shape}")
        if value.size and value.min() < 0:
            raise ValueError(f"{source}[{key!r}]: expected non-negative token ids, got min {value.min()}")
        limit = semantic_vocab_size if key == "semantic_prompt" else codebook_size
        what = "semantic token ids" if key == "semantic_prompt" else "codebook codes"
        if limit is not None and value.size and value.max() >= limit:
            raise ValueError(f"{source}[{key!r}]: expected {what} in [0, {limit}), got max {value.max()}")
        out[key] = value
    return out


def _load_error(error: Exception) -> str:
    """numpy's reason in one line, without its invitation to load pickles "unsafely": voice presets are plain integer
    arrays, and pickles are never loaded (they can run code)."""
    text = " ".join(str(error).split())
    if "allow_pickle" in text or "pickle" in text.lower():
        return "it holds pickled Python objects, which are never loaded (unsafe); expected plain integer arrays"
    return f"{type(error).__name__}: {text}"


def _load_npy(path: str, what: str) -> np.ndarray:
    """One .npy array (no pickles); ValueError naming ``what`` and the file otherwise."""
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
    except OSError as e:
        raise ValueError(f"{what}: cannot read {path!r}: {e.strerror or e}") from None
    if magic != b"\x93NUMPY":
        raise ValueError(f"{what}: {path!r} is not a .npy array file (it starts with {magic!r})")
    try:
        value = np.load(path, allow_pickle=False)
    except Exception as e:
        raise ValueError(f"{what}: cannot read {path!r}: {_load_error(e)}") from None
    if not isinstance(value, np.ndarray):
        raise ValueError(f"{what}: {path!r} does not hold an array")
    return value


def load_voice_preset_npz(path: str) -> dict[str, np.ndarray]:
    """Read an .npz voice preset (no pickles). Raises FileNotFoundError / ValueError naming the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"voice_preset: file {path!r} does not exist")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise ValueError(f"voice_preset: cannot read {path!r}: {e.strerror or e}") from None
    if not head.startswith(b"PK"):  # an .npz is a zip archive of .npy files
        shown = "an empty file" if not head else f"a file starting with {head!r}"
        kind = " (a single .npy array)" if head.startswith(b"\x93NUMPY") else ""
        raise ValueError(f"voice_preset: {path!r} is not an .npz archive (a zip of .npy arrays with "
                         f"{', '.join(VOICE_PRESET_KEYS)}); got {shown}{kind}")
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as e:  # zipfile.BadZipFile (a truncated archive), OSError ...
        raise ValueError(f"voice_preset: cannot read {path!r} as an .npz archive: {_load_error(e)}") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(
            f"voice_preset: {path!r} holds a single array, expected an .npz archive with {VOICE_PRESET_KEYS}"
        )
    try:
        with data:
            return {k: data[k] for k in data.files}
    except Exception as e:
        raise ValueError(f"voice_preset: cannot read the arrays of {path!r}: {_load_error(e)}") from None


# --------------------------------------------------------------------------------------------------------------------
# The processor
# --------------------------------------------------------------------------------------------------------------------


class BarkProcessor:
    """Text tokenizer + voice presets for Bark. Build with :meth:`from_pretrained`.

    ``processor(text, voice_preset=None)`` -> ``{"input_ids": (B, max_length) long, "attention_mask": (B, max_length)
    long[, "history_prompt": {"semantic_prompt", "coarse_prompt", "fine_prompt"} torch tensors]}``.
    """

    def __init__(
        self,
        tokenizer,
        speaker_embeddings: Mapping | None = None,
        speaker_embeddings_root: str | None = None,
        pad_token: str = "[PAD]",
        padding_side: str = "right",
        truncation_side: str = "right",
    ) -> None:
        from tokenizers import Tokenizer

        if not isinstance(tokenizer, Tokenizer):
            raise TypeError(f"tokenizer: expected a tokenizers.Tokenizer, got {type(tokenizer).__name__}")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side: expected 'left' or 'right', got {padding_side!r}")
        if truncation_side not in ("left", "right"):
            raise ValueError(f"truncation_side: expected 'left' or 'right', got {truncation_side!r}")
        self.tokenizer = tokenizer
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        pad_id = tokenizer.token_to_id(pad_token)
        if pad_id is None:
            raise ValueError(f"pad_token: {pad_token!r} is not in the tokenizer's vocabulary")
        self.pad_token = pad_token
        self.pad_token_id = pad_id
        self.padding_side = padding_side
        self.truncation_side = truncation_side
        self.speaker_embeddings = dict(speaker_embeddings) if speaker_embeddings is not None else None
        self.speaker_embeddings_root = speaker_embeddings_root

    # -- construction -------------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls, path_or_dir: str | os.PathLike, speaker_embeddings_dict_path: str | None = "speaker_embeddings_path.json"
    ) -> BarkProcessor:
        """Load the tokenizer (tokenizer.json, else vocab.txt; options from tokenizer_config.json) and the voice
        preset table (``speaker_embeddings_dict_path`` in the checkpoint; None to skip) from a checkpoint directory or
        a Hugging Face repo id (local cache, or a download when online)."""
        if not isinstance(path_or_dir, (str, os.PathLike)):
            raise TypeError(f"path_or_dir: expected a directory path or repo id, got {type(path_or_dir).__name__}")
        root = os.fspath(path_or_dir)
        tokenizer_json = _resolve_file(root, "tokenizer.json")
        vocab_txt = None if tokenizer_json else _resolve_file(root, "vocab.txt")
        if tokenizer_json is None and vocab_txt is None:
            hint = (
                ""
                if os.path.isdir(root)
                else " (as a Hugging Face repo id: not in the local cache, and HF_HUB_OFFLINE is set or the Hub "
                f"lacks them; download it once online, e.g. `huggingface-cli download {root}`, or pass a directory)"
            )
            raise FileNotFoundError(
                f"path_or_dir: no tokenizer in {root!r}: expected tokenizer.json or vocab.txt (a BERT WordPiece "
                f"vocab){hint}"
            )
        config_path = _resolve_file(root, "tokenizer_config.json")
        config = _read_json(config_path, "tokenizer_config.json") if config_path else {}
        special_map_path = _resolve_file(root, "special_tokens_map.json")
        special_map = _read_json(special_map_path, "special_tokens_map.json") if special_map_path else {}
        tokenizer, pad_token = _build_bert_tokenizer(tokenizer_json, vocab_txt, config, special_map)

        speaker_embeddings = None
        speaker_root = None
        if speaker_embeddings_dict_path is not None:
            emb_path = _resolve_file(root, speaker_embeddings_dict_path)
            if emb_path is None:
                logger.warning(
                    "%s not found in %r: no named voice presets (an .npz voice preset path still works)",
                    speaker_embeddings_dict_path,
                    root,
                )
            else:
                speaker_embeddings = _read_json(emb_path, speaker_embeddings_dict_path)
                speaker_embeddings.pop("repo_or_path", None)  # the files are resolved against this checkpoint
                speaker_root = root
        return cls(
            tokenizer,
            speaker_embeddings=speaker_embeddings,
            speaker_embeddings_root=speaker_root,
            pad_token=pad_token,
            padding_side=config.get("padding_side", "right") or "right",
            truncation_side=config.get("truncation_side", "right") or "right",
        )

    # -- voice presets --------------------------------------------------------------------------------------------------

    @property
    def available_voice_presets(self) -> list[str]:
        return sorted(self.speaker_embeddings) if self.speaker_embeddings else []

    def _load_named_preset(self, name: str) -> dict[str, np.ndarray]:
        entry = self.speaker_embeddings[name]
        if not isinstance(entry, Mapping):
            raise ValueError(f"voice_preset {name!r}: the speaker embeddings entry must map prompt names to files")
        root = self.speaker_embeddings_root
        local_root = os.path.abspath(root) if root is not None and os.path.isdir(root) else None
        arrays = {}
        for key in VOICE_PRESET_KEYS:
            if key not in entry:
                raise ValueError(f"voice_preset {name!r}: missing {key!r} in the speaker embeddings table")
            rel = entry[key]
            if not isinstance(rel, str) or os.path.isabs(rel) or ".." in rel.replace("\\", "/").split("/"):
                raise ValueError(f"voice_preset {name!r}: invalid {key} path {rel!r} (must stay inside the checkpoint)")
            if local_root is not None:
                path = os.path.join(local_root, rel)
                path = path if os.path.isfile(path) else None
            else:
                path = _resolve_file(root, rel)
            if path is None:
                raise FileNotFoundError(f"voice_preset {name!r}: {key} file {rel!r} not found in {root!r}")
            arrays[key] = _load_npy(path, f"voice_preset {name!r} ({key})")
        return arrays

    def load_voice_preset(self, voice_preset) -> dict[str, torch.Tensor]:
        """A preset name, an .npz path (".npz" appended when missing, as transformers) or a dict -> torch tensors."""
        if isinstance(voice_preset, Mapping):
            source = "voice_preset"
            arrays = voice_preset
        elif isinstance(voice_preset, (str, os.PathLike)):
            name = os.fspath(voice_preset)
            if self.speaker_embeddings is not None and name in self.speaker_embeddings:
                source = f"voice_preset {name!r}"
                arrays = self._load_named_preset(name)
            else:
                path = name if name.endswith(".npz") else name + ".npz"
                if not os.path.isfile(path):
                    known = self.available_voice_presets
                    hint = (
                        f"known presets: {known[:10]}{' ...' if len(known) > 10 else ''}"
                        if known
                        else ("this checkpoint has no named presets")
                    )
                    raise ValueError(f"voice_preset: {name!r} is neither a known preset name nor an .npz file ({hint})")
                source = f"voice_preset {path!r}"
                arrays = load_voice_preset_npz(path)
        else:
            raise TypeError(
                f"voice_preset: expected a preset name, an .npz path or a dict of arrays, got {type(voice_preset).__name__}"
            )
        checked = validate_voice_preset(arrays, source=source)
        return {k: torch.from_numpy(np.array(v, copy=True)) for k, v in checked.items()}

    # -- text -----------------------------------------------------------------------------------------------------------

    def encode_text(
        self, text: str | Sequence[str], max_length: int = 256, truncation: bool = True
    ) -> dict[str, torch.Tensor]:
        """text -> input_ids, attention_mask (B, max_length) long, right-padded with the [PAD] id."""
        if isinstance(text, str):
            texts = [text]
        elif isinstance(text, Sequence) and len(text) > 0 and all(isinstance(t, str) for t in text):
            texts = list(text)
        else:
            raise TypeError(
                f"text: expected a str or a non-empty list of str, got {type(text).__name__}"
                + (" (empty)" if isinstance(text, Sequence) and len(text) == 0 else "")
            )
        if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1:
            raise ValueError(f"max_length: expected a positive int, got {max_length!r}")
        encodings = self.tokenizer.encode_batch(texts, add_special_tokens=False)
        rows = []
        for i, enc in enumerate(encodings):
            ids = list(enc.ids)
            if len(ids) > max_length:
                if not truncation:
                    raise ValueError(
                        f"text[{i}]: {len(ids)} tokens is longer than max_length={max_length} and truncation=False"
                    )
                logger.warning(
                    "text[%d]: %d tokens, truncated to max_length=%d (Bark reads at most 256)", i, len(ids), max_length
                )
                ids = ids[:max_length] if self.truncation_side == "right" else ids[-max_length:]
            rows.append(ids)
        batch = len(rows)
        input_ids = torch.full((batch, max_length), self.pad_token_id, dtype=torch.long)  # (B, max_length)
        attention_mask = torch.zeros((batch, max_length), dtype=torch.long)  # (B, max_length)
        for b, ids in enumerate(rows):
            n = len(ids)
            if n == 0:
                continue
            if self.padding_side == "right":
                input_ids[b, :n] = torch.tensor(ids, dtype=torch.long)
                attention_mask[b, :n] = 1
            else:
                input_ids[b, max_length - n :] = torch.tensor(ids, dtype=torch.long)
                attention_mask[b, max_length - n :] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def __call__(
        self,
        text: str | Sequence[str],
        voice_preset=None,
        max_length: int = 256,
        truncation: bool = True,
        return_attention_mask: bool = True,
    ) -> dict:
        """Tokenize ``text`` (a str or a list of str) and load ``voice_preset`` (name, .npz path, dict or None).

        Returns {"input_ids": (B, max_length) long, "attention_mask": (B, max_length) long, and, with a voice preset,
        "history_prompt": {"semantic_prompt": (X,), "coarse_prompt": (2, X), "fine_prompt": (8, X)} long tensors}.
        """
        history_prompt = self.load_voice_preset(voice_preset) if voice_preset is not None else None
        out = self.encode_text(text, max_length=max_length, truncation=truncation)
        if not return_attention_mask:
            del out["attention_mask"]
        if history_prompt is not None:
            out["history_prompt"] = history_prompt
        return out


def _token_content(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"tokenizer config: a special token must be a string or {{'content': ...}}, got {value!r}")


def _build_bert_tokenizer(tokenizer_json: str | None, vocab_txt: str | None, config: Mapping, special_map: Mapping):
    """The tokenizers pipeline transformers builds for BertTokenizer, from tokenizer.json's vocab or vocab.txt."""
    from tokenizers import AddedToken, Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordPiece

    specials = {}
    for name in _SPECIAL_TOKEN_NAMES:
        value = config.get(name, special_map.get(name, _SPECIAL_TOKEN_DEFAULTS[name]))
        specials[name] = _token_content(value)

    wordpiece_kwargs: dict = {}
    json_added: list = []
    json_lowercase = None
    if tokenizer_json is not None:
        data = _read_json(tokenizer_json, "tokenizer.json")
        model = data.get("model") or {}
        if model.get("type", "WordPiece") != "WordPiece" or not isinstance(model.get("vocab"), dict):
            raise ValueError(
                f"tokenizer.json: expected a WordPiece model with a vocab dict (BERT), got model type "
                f"{model.get('type')!r} in {tokenizer_json}"
            )
        vocab = {str(k): int(v) for k, v in model["vocab"].items()}
        for key in ("max_input_chars_per_word", "continuing_subword_prefix"):
            if model.get(key) is not None:
                wordpiece_kwargs[key] = model[key]
        json_added = list(data.get("added_tokens") or [])
        norm = data.get("normalizer") or {}
        if norm.get("type") == "BertNormalizer":
            json_lowercase = norm.get("lowercase")
    else:
        vocab = {}
        with open(vocab_txt, encoding="utf-8") as f:
            for index, line in enumerate(f):
                vocab[line.rstrip("\n")] = index
        if not vocab:
            raise ValueError(f"vocab.txt: {vocab_txt} is empty")

    unk = specials["unk_token"] or "[UNK]"
    tokenizer = Tokenizer(WordPiece(vocab, unk_token=unk, **wordpiece_kwargs))
    do_lower_case = config.get("do_lower_case")
    if do_lower_case is None:
        do_lower_case = bool(json_lowercase) if json_lowercase is not None else False  # Bark's BERT is cased
    tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True,
        handle_chinese_chars=bool(config.get("tokenize_chinese_chars", True)),
        strip_accents=config.get("strip_accents"),
        lowercase=bool(do_lower_case),
    )
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()

    # Added tokens, in id order: tokenizer_config's added_tokens_decoder, tokenizer.json's added_tokens, then the
    # named special tokens (transformers adds all of them as special AddedTokens).
    added: list[AddedToken] = []
    seen: set[str] = set()
    decoder = config.get("added_tokens_decoder") or {}
    entries = [v for _, v in sorted(decoder.items(), key=lambda kv: int(kv[0]))] + json_added
    for entry in entries:
        if not isinstance(entry, Mapping) or not isinstance(entry.get("content"), str):
            continue
        content = entry["content"]
        if content in seen:
            continue
        seen.add(content)
        special = bool(entry.get("special", False))
        added.append(
            AddedToken(
                content,
                single_word=bool(entry.get("single_word", False)),
                lstrip=bool(entry.get("lstrip", False)),
                rstrip=bool(entry.get("rstrip", False)),
                normalized=bool(entry.get("normalized", not special)),
                special=special,
            )
        )
    for name in _SPECIAL_TOKEN_NAMES:
        content = specials[name]
        if content is not None and content not in seen:
            seen.add(content)
            added.append(AddedToken(content, special=True, normalized=False))
    if added:
        tokenizer.add_tokens(added)
    pad = specials["pad_token"] or "[PAD]"
    return tokenizer, pad
