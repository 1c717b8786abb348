"""Bulk synthesis: a table of texts in, one audio file per row out; resumable, batched, on one machine or a Ray
cluster (docs/bulk.md).

    from bark.bulk import synthesize_table
    summary = synthesize_table("texts.jsonl", "out/", model="suno/bark-small", greedy=True)   # out/{id}.wav, manifest

Modules, bottom to top: ``table`` (reading and checking the input), ``manifest`` (OUT_DIR: atomic audio files, the
journal, the manifest, resume), ``progress``; ``worker`` (one model, one bark.Engine, rows in, files and entries out);
``local`` (this process, or it and N - 1 worker processes) and ``ray_engine`` (Ray Data actors);
``synthesize`` (the driver).
The command is ``bark-kernels batch`` (bark.cli.batch).
"""

from .synthesize import ENGINES, BulkOptions, BulkSummary, synthesize_table
from .table import BulkError, read_table

__all__ = ["synthesize_table", "BulkOptions", "BulkSummary", "BulkError", "read_table", "ENGINES"]
