"""16-bit mono WAV output: a file written whole and moved into place (:func:`write_wav_atomic`), and a WAV file that
grows piece by piece and is a complete, playable file after every piece (:class:`WavAppender`).

    with WavAppender("story.wav", 24_000) as wav:
        for piece in bark.stream(...):
            wav.append(piece.audio, pause=0.25)     # silence first (not before the first piece), then the piece

The first :meth:`WavAppender.append` writes a temporary file next to the target and moves it into place
(``os.replace``): the target appears already holding the first piece. Each later append writes its samples at the end
(fsync) and only then patches the two sizes in the header (fsync): at every moment the header describes samples that
are all on disk, so a run killed at any point leaves a valid WAV of the pieces finished before (an append cut between
the two steps leaves extra bytes after the data chunk, which readers ignore). Ctrl-C during an append is held back
until the append is complete. 16-bit mono PCM, samples as ``write_wav_atomic`` converts them (clip to [-1, 1],
non-finite -> 0, round(x * 32767)).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import struct
import tempfile
import threading
import wave

import numpy as np

__all__ = ["WavAppender", "to_pcm16", "wav_header", "write_wav_atomic", "write_wav_temp"]

logger = logging.getLogger(__name__)

HEADER_BYTES = 44


def to_pcm16(audio) -> np.ndarray:
    """float audio in [-1, 1] -> little-endian int16 samples (clipped; NaN and inf become 0)."""
    samples = np.asarray(audio, dtype=np.float32).reshape(-1)
    samples = np.nan_to_num(samples, nan=0.0, posinf=0.0, neginf=0.0)
    return np.round(np.clip(samples, -1.0, 1.0) * 32767.0).astype("<i2")


def wav_header(n_samples: int, sample_rate: int) -> bytes:
    """The 44-byte header of a 16-bit mono PCM WAV holding ``n_samples`` samples."""
    data = 2 * n_samples
    return (b"RIFF" + struct.pack("<I", 36 + data) + b"WAVE"
            + b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, 2 * sample_rate, 2, 16)
            + b"data" + struct.pack("<I", data))


def write_wav_atomic(path: str, audio, sample_rate: int = 24_000) -> int:
    """Write mono float audio in [-1, 1] as 16-bit PCM; temp file in the same directory + os.replace.

    Returns the number of samples written. Values outside [-1, 1] are clipped, non-finite values become 0.
    """
    tmp, n = write_wav_temp(path, audio, sample_rate)
    try:
        os.replace(tmp, os.path.abspath(path))
    except BaseException:
        remove_quietly(tmp)
        raise
    return n


def remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def write_wav_temp(path: str, audio, sample_rate: int) -> tuple[str, int]:
    """The WAV for ``path`` written in full to a temporary file next to it: (temp path, samples). Nothing is left
    behind when this fails."""
    samples = np.asarray(audio, dtype=np.float32).reshape(-1)
    bad = int((~np.isfinite(samples)).sum())
    if bad:
        logger.warning("%s: %d non-finite audio samples written as 0", path, bad)
    pcm = to_pcm16(samples)
    target = os.path.abspath(path)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(target) + ".", suffix=".tmp", dir=os.path.dirname(target))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the WAV a normal file's permissions
        with os.fdopen(fd, "wb") as f:
            with wave.open(f, "wb") as w:
                w.setnchannels(1)
                w.setsampwidth(2)
                w.setframerate(int(sample_rate))
                w.writeframes(pcm.tobytes())
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        remove_quietly(tmp)
        raise
    return tmp, int(pcm.shape[0])


@contextlib.contextmanager
def _hold_interrupts():
    """Delay SIGINT until the block is done (main thread only; elsewhere signals cannot arrive in Python code)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append((signum, frame)))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            if callable(previous):
                previous(*received[0])
            elif previous == signal.SIG_DFL:
                os.kill(os.getpid(), signal.SIGINT)


class WavAppender:
    """Append audio to a 16-bit mono WAV at ``path``; see the module docstring. ``samples`` counts what is written."""

    def __init__(self, path: str | os.PathLike, sample_rate: int = 24_000) -> None:
        self.path = os.path.abspath(os.fspath(path))
        self.sample_rate = int(sample_rate)
        self.samples = 0
        self.pieces = 0
        self._file = None

    def append(self, audio, pause: float = 0.0) -> int:
        """Write ``pause`` seconds of silence (skipped before the first piece) and then ``audio``; returns the number
        of samples now in the file."""
        pcm = to_pcm16(audio)
        if self.pieces and pause > 0:
            pcm = np.concatenate([np.zeros(int(round(pause * self.sample_rate)), dtype="<i2"), pcm])
        with _hold_interrupts():
            if self._file is None:
                self._create(pcm)
            else:
                f = self._file
                f.seek(HEADER_BYTES + 2 * self.samples)
                f.write(pcm.tobytes())
                f.flush()
                os.fsync(f.fileno())
                total = self.samples + pcm.shape[0]
                f.seek(4)
                f.write(struct.pack("<I", 36 + 2 * total))
                f.seek(40)
                f.write(struct.pack("<I", 2 * total))
                f.flush()
                os.fsync(f.fileno())
                self.samples = total
            self.pieces += 1
        return self.samples

    def _create(self, pcm: np.ndarray) -> None:
        directory = os.path.dirname(self.path)
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(self.path) + ".", suffix=".tmp", dir=directory)
        try:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
            with os.fdopen(fd, "wb") as f:
                f.write(wav_header(pcm.shape[0], self.sample_rate))
                f.write(pcm.tobytes())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        self.samples = pcm.shape[0]
        self._file = open(self.path, "r+b")  # noqa: SIM115 - kept open for the appends, closed by close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> WavAppender:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
