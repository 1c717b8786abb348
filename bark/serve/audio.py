"""Audio bytes for the speech endpoint: 16-bit PCM and WAV that can be sent sentence by sentence, and FLAC, MP3 and
Opus written whole by soundfile (libsndfile) where it is installed and can write them.

    encoder = StreamEncoder("wav", 24_000)
    yield encoder.start()                     # the WAV header (sizes unknown yet: 0xFFFFFFFF, as streamed WAV does)
    for piece in handle:
        yield encoder.piece(piece.audio)      # a pause of silence first (not before the first piece), then the piece

``pcm``: raw little-endian int16 mono samples at the model's rate (24 kHz), OpenAI's ``pcm`` layout. Samples are
converted as every WAV of the project is (bark.wav.to_pcm16: clipped to [-1, 1], non-finite -> 0).
"""

from __future__ import annotations

import io
import struct
from collections.abc import Sequence

import numpy as np

from ..longform import DEFAULT_PAUSE
from ..wav import to_pcm16

__all__ = ["STREAMED_FORMATS", "WHOLE_FORMATS", "MEDIA_TYPES", "StreamEncoder", "encode_whole", "whole_formats",
           "streaming_wav_header"]

STREAMED_FORMATS = ("wav", "pcm")  # bytes go out as each piece is finished
# format -> (libsndfile's major format, subtype): written once every piece is done (the container wants the whole)
WHOLE_FORMATS = {"flac": ("FLAC", "PCM_16"), "mp3": ("MP3", "MPEG_LAYER_III"), "opus": ("OGG", "OPUS")}
MEDIA_TYPES = {"wav": "audio/wav", "pcm": "audio/pcm", "flac": "audio/flac", "mp3": "audio/mpeg", "opus": "audio/ogg"}
UNKNOWN_SIZE = 0xFFFFFFFF


def streaming_wav_header(sample_rate: int) -> bytes:
    """A 16-bit mono PCM WAV header whose RIFF and data sizes say "unknown" (0xFFFFFFFF): the length of a streamed
    response is not known when its first bytes go out; readers take the data to the end of the stream."""
    return (b"RIFF" + struct.pack("<I", UNKNOWN_SIZE) + b"WAVE"
            + b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, 2 * sample_rate, 2, 16)
            + b"data" + struct.pack("<I", UNKNOWN_SIZE))


class StreamEncoder:
    """``wav`` or ``pcm`` bytes, piece by piece: :meth:`start` (the WAV header, nothing for pcm), then :meth:`piece`
    for each piece in order (``pause`` seconds of silence before every piece but the first)."""

    def __init__(self, fmt: str, sample_rate: int, pause: float = DEFAULT_PAUSE) -> None:
        if fmt not in STREAMED_FORMATS:
            raise ValueError(f"response_format: {fmt!r} cannot be streamed; expected one of {list(STREAMED_FORMATS)}")
        self.format, self.sample_rate = fmt, sample_rate
        self._silence = np.zeros(int(round(pause * sample_rate)), dtype="<i2").tobytes()
        self.pieces = 0
        self.samples = 0

    def start(self) -> bytes:
        return streaming_wav_header(self.sample_rate) if self.format == "wav" else b""

    def piece(self, audio: np.ndarray) -> bytes:
        samples = to_pcm16(audio)
        gap = self._silence if self.pieces else b""
        self.pieces += 1
        self.samples += samples.shape[0] + len(gap) // 2
        return gap + samples.tobytes()


def whole_formats() -> dict[str, str | None]:
    """Each of flac/mp3/opus -> None when soundfile can write it here, else why not (one line)."""
    try:
        import soundfile
    except ImportError as e:
        return {fmt: f"soundfile is not installed ({e}); pip install 'bark-kernels[serve]'" for fmt in WHOLE_FORMATS}
    out: dict[str, str | None] = {}
    for fmt, (major, subtype) in WHOLE_FORMATS.items():
        try:
            if major not in soundfile.available_formats() or subtype not in soundfile.available_subtypes(major):
                raise ValueError(f"libsndfile {soundfile.__libsndfile_version__} has no {major}/{subtype} writer")
            soundfile.write(io.BytesIO(), np.zeros(480, dtype=np.float32), 24_000, format=major, subtype=subtype)
            out[fmt] = None
        except Exception as e:  # noqa: BLE001 - any failure means: not available here, and why
            out[fmt] = f"{type(e).__name__}: {e}".splitlines()[0]
    return out


def encode_whole(pieces: Sequence[np.ndarray], fmt: str, sample_rate: int, pause: float = DEFAULT_PAUSE) -> bytes:
    """Every piece in order with ``pause`` seconds between them, as one ``flac``/``mp3``/``opus`` file (16-bit PCM
    samples first, as the streamed formats carry)."""
    import soundfile

    major, subtype = WHOLE_FORMATS[fmt]
    gap = np.zeros(int(round(pause * sample_rate)), dtype="<i2")
    parts: list[np.ndarray] = []
    for i, audio in enumerate(pieces):
        if i:
            parts.append(gap)
        parts.append(to_pcm16(audio))
    samples = np.concatenate(parts) if parts else np.zeros(0, dtype="<i2")
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, sample_rate, format=major, subtype=subtype)
    return buffer.getvalue()
