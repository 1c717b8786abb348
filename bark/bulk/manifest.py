"""Bulk synthesis's output directory: the audio files, the journal, the manifest, resume.

``OUT_DIR/{id}.wav`` (or ``.flac``): each written to a temporary file next to it (``.{id}.wav.XXXX.tmp``), flushed to
disk and moved into place with ``os.replace``: a file under its real name is always complete. A run killed mid-write
leaves at most a temporary file, which the next run removes (:func:`prepare_out_dir`).

``OUT_DIR/manifest.jsonl``, the journal: one JSON object per finished row (ok or failed), appended by one process
(the run's driver) with a single ``write`` and an ``fsync`` per row, so a SIGKILL loses at most the rows in flight and
never a recorded one. A line cut by a kill is dropped when the next run opens the journal. Rows run again (a resume
that redoes a failed row) append a new line: the last line of a row wins.

``OUT_DIR/manifest.parquet`` (when pyarrow is installed), written at the end of every run, atomically: the table of the
journal's last entry of each row of the input. Columns: :data:`FIELDS`.

Resume: a row is *complete* when the journal's last ``ok`` entry for its id has the same key (a digest of the text,
voice, seed, settings, model and format: an edited row is redone) and its file exists. Everything else runs.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections.abc import Iterable, Mapping

import numpy as np

from ..wav import remove_quietly, write_wav_atomic
from .table import BulkError

__all__ = ["FIELDS", "JOURNAL", "PARQUET", "Journal", "read_journal", "completed",
           "write_manifest", "write_audio", "prepare_out_dir", "audio_path", "FORMATS"]

logger = logging.getLogger("bark")

JOURNAL = "manifest.jsonl"
PARQUET = "manifest.parquet"
FORMATS = ("wav", "flac")
FIELDS = ("id", "row", "path", "status", "error", "audio_seconds", "wall_seconds", "seed", "voice", "model",
          "backend", "key", "worker")
_TEMP = re.compile(r"^\..+\.(wav|flac|parquet)\.[^.]+\.tmp$")


def audio_path(out_dir: str, row_id: str, fmt: str) -> str:
    return os.path.join(out_dir, f"{row_id}.{fmt}")


def prepare_out_dir(out_dir: str, fmt: str) -> None:
    """Create ``out_dir`` if needed and prove files can be made in it (a one-line :class:`BulkError` otherwise);
    remove temporary files a killed run left; drop a journal line a kill cut short."""
    if fmt not in FORMATS:
        raise BulkError(f"--format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "flac":
        try:
            import soundfile  # noqa: F401
        except (ImportError, OSError) as e:
            raise BulkError(f"--format flac: needs the soundfile package (pip install soundfile): {e}") from None
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise BulkError(f"--output-dir: {out_dir!r} exists and is not a directory")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise BulkError(f"--output-dir: cannot create {out_dir!r}: {e.strerror or e}") from None
    try:  # what os.access cannot tell: a read-only file system, a quota
        fd, probe = tempfile.mkstemp(prefix=".bark-kernels-probe.", dir=out_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise BulkError(f"--output-dir: cannot create files in {out_dir!r}: {e.strerror or e}") from None
    journal = os.path.join(out_dir, JOURNAL)
    if os.path.exists(journal) and not os.access(journal, os.W_OK):
        raise BulkError(f"--output-dir: the journal {journal!r} is not writable")
    for name in os.listdir(out_dir):
        if _TEMP.match(name):
            remove_quietly(os.path.join(out_dir, name))
    _repair(journal)


def _repair(path: str) -> None:
    """Cut a last line that a kill left without its newline (the next append would join it)."""
    if not os.path.exists(path):
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)
            f.flush()
            os.fsync(f.fileno())


def read_journal(out_dir: str) -> list[dict]:
    """Every complete entry of the journal, in order (a line that is not a JSON object is skipped with a warning)."""
    path = os.path.join(out_dir, JOURNAL)
    if not os.path.exists(path):
        return []
    entries = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.endswith("\n"):
                    break  # cut by a kill
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    logger.warning("%s line %d: not a JSON object; ignored", path, n)
                    continue
                if isinstance(entry, dict):
                    entries.append(entry)
    except (OSError, UnicodeDecodeError) as e:
        raise BulkError(f"--output-dir: cannot read the journal {path!r}: {e}") from None
    return entries


class Journal:
    """Appends entries to ``OUT_DIR/manifest.jsonl``: one ``write`` and one ``fsync`` per entry."""

    def __init__(self, out_dir: str) -> None:
        self.path = os.path.join(out_dir, JOURNAL)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)

    def append(self, entry: Mapping) -> None:
        data = (json.dumps({k: entry.get(k) for k in FIELDS}, ensure_ascii=False) + "\n").encode("utf-8")
        written = os.write(self._fd, data)
        if written != len(data):  # a full disk: never leave half a line for the next append to join
            raise OSError(f"{self.path}: short write ({written} of {len(data)} bytes)")
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def completed(entries: Iterable[dict], out_dir: str) -> dict[str, dict]:
    """id -> its last ok entry, for the ids whose file exists (the key is compared by the caller, who knows each
    row's)."""
    last: dict[str, dict] = {}
    for entry in entries:
        if entry.get("id") is not None and entry.get("status") == "ok" and entry.get("path"):
            last[str(entry["id"])] = entry
    return {i: e for i, e in last.items() if os.path.isfile(os.path.join(out_dir, e["path"]))}


def write_manifest(out_dir: str, entries: list[dict]) -> str | None:
    """``OUT_DIR/manifest.parquet`` from ``entries`` (written atomically); None when pyarrow is not installed (the
    journal is then the manifest)."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return None
    schema = pa.schema([("id", pa.string()), ("row", pa.int64()), ("path", pa.string()), ("status", pa.string()),
                        ("error", pa.string()), ("audio_seconds", pa.float64()), ("wall_seconds", pa.float64()),
                        ("seed", pa.int64()), ("voice", pa.string()), ("model", pa.string()),
                        ("backend", pa.string()), ("key", pa.string()), ("worker", pa.string())])
    columns = {name: [e.get(name) for e in entries] for name in FIELDS}
    columns["id"] = [None if v is None else str(v) for v in columns["id"]]
    table = pa.table(columns, schema=schema)
    target = os.path.join(out_dir, PARQUET)
    fd, tmp = tempfile.mkstemp(prefix="." + PARQUET + ".", suffix=".tmp", dir=out_dir)
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        remove_quietly(tmp)
        raise
    return target


def write_audio(path: str, audio: np.ndarray, sample_rate: int, fmt: str) -> int:
    """``audio`` (float32 mono in [-1, 1]) -> ``path`` as 16-bit WAV or FLAC, atomically; returns the samples."""
    if fmt == "wav":
        return write_wav_atomic(path, audio, sample_rate)
    import soundfile

    from ..wav import to_pcm16

    pcm = to_pcm16(audio)
    target = os.path.abspath(path)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(target) + ".", suffix=".tmp",
                               dir=os.path.dirname(target))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            soundfile.write(f, pcm, int(sample_rate), format="FLAC", subtype="PCM_16")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        remove_quietly(tmp)
        raise
    return int(pcm.shape[0])
