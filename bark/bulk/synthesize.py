"""``synthesize_table``: a table of texts in, one audio file per row out (docs/bulk.md).

The driver: read and check the table, prepare OUT_DIR, check the model's configuration, tokenizer, voices and
attention backend (all before any weight is read), drop the rows complete from an earlier run, record the bad rows
as failed, sort the rest by length (long first: batches of similar pieces, and the long rows are not the tail), run
them on the local engine or on Ray, journal every finished row, and write the manifest.
"""

from __future__ import annotations

import os
import sys
import dataclasses
from dataclasses import asdict, dataclass, field

from bark_kernels.devices import parse_device

from ..cli.setup import FRONT_END_RECIPE, RECIPES, plan, resolve_device_and_dtype
from ..options import OptionError, load_voice
from ..longform import DEFAULT_PAUSE
from .local import run_local
from .manifest import FORMATS, PARQUET, Journal, completed, prepare_out_dir, read_journal, write_manifest
from .progress import Progress
from .ray_engine import ray_available, run_ray
from .table import BulkError, Row, read_table
from .worker import model_request

__all__ = ["BulkOptions", "BulkSummary", "synthesize_table", "ENGINES"]

ENGINES = ("local", "ray")


@dataclass
class BulkOptions:
    """Everything a bulk run takes besides INPUT and OUT_DIR (the command's flags, same names).

    Model: ``model`` (checkpoint directory, repo id or "random"; None: bark-small if cached, else random), ``device``,
    ``dtype``, ``attn``, ``threads`` (per worker; None: torch's choice, or 1 for several CPU workers).
    Generation defaults (a row's own columns win): ``voice``, ``seed`` (the seed of rows without one), ``greedy``,
    ``temperature``, ``semantic_max_new_tokens``, ``pause`` (seconds between a row's pieces), ``recipe`` ("suno",
    the default as for ``speak``, or "transformers": bark.generation).
    Output: ``format`` ("wav" or "flac"). Engine: ``engine`` ("local" or "ray"), ``batch_size`` (rows of pieces per
    engine batch), ``workers`` (processes or Ray actors), ``devices`` (local: one worker per device),
    ``ray_address``, ``gpus_per_worker`` (Ray). ``progress``: print progress lines to stderr."""

    model: str | None = None
    device: str | None = None
    dtype: str = "auto"
    attn: str = "auto"
    threads: int | None = None
    voice: str | None = None
    seed: int = 0
    greedy: bool = False
    temperature: float | None = None
    semantic_max_new_tokens: int | None = None
    pause: float = DEFAULT_PAUSE
    recipe: str = FRONT_END_RECIPE
    format: str = "wav"
    engine: str = "local"
    batch_size: int = 8
    workers: int = 1
    devices: list[str] | None = None
    ray_address: str | None = None
    gpus_per_worker: float = 0.0
    progress: bool = True


@dataclass
class BulkSummary:
    """What one run did: rows in the table, rows complete from before (skipped), rows run ok / failed this time
    (failed includes the bad rows), seconds of audio written and wall seconds, the manifest's path, the warnings."""

    rows: int
    skipped: int
    ok: int
    failed: int
    audio_seconds: float
    wall_seconds: float
    manifest: str
    warnings: list[str] = field(default_factory=list)
    entries: list[dict] = field(default_factory=list)  # the manifest: one entry per row, table order
    timings: list[tuple] = field(default_factory=list)  # (worker, model ready, row finished) per row run, epoch s

    @property
    def steady_rows_per_second(self) -> float | None:
        """Rows per second with every worker loaded (start-up excluded): the sum over workers of each one's rows over
        the time from its model being loaded to its last row. What a table of thousands of rows sees, where start-up
        is amortised. None when no worker finished a row after it was loaded."""
        spans: dict[str, list] = {}
        for worker, ready, end in self.timings:
            span = spans.setdefault(worker, [ready, ready, 0])
            span[1] = max(span[1], end)
            span[2] += 1
        rates = [rows / (last - ready) for ready, last, rows in spans.values() if last > ready]
        return sum(rates) if rates else None

    @property
    def complete(self) -> bool:
        return self.failed == 0


def _check_options(options: BulkOptions) -> None:
    if options.engine not in ENGINES:
        raise BulkError(f"--engine: expected one of {', '.join(ENGINES)}, got {options.engine!r}")
    if options.format not in FORMATS:
        raise BulkError(f"--format: expected one of {', '.join(FORMATS)}, got {options.format!r}")
    for name, value in (("workers", options.workers), ("batch_size", options.batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise BulkError(f"--{name.replace('_', '-')}: expected an integer >= 1, got {value!r}")
    if options.recipe not in RECIPES:
        raise BulkError(f"--recipe: expected one of {list(RECIPES)}, got {options.recipe!r}")
    if options.greedy and options.temperature is not None:
        raise BulkError(f"--temperature {options.temperature:g}: greedy decoding (--greedy) uses no temperature; "
                        f"drop one of the two")
    if options.devices is not None:
        if options.engine == "ray":
            raise BulkError("--devices: the Ray engine places its actors itself; use --gpus-per-worker and --workers")
        if options.device is not None:
            raise BulkError("--devices and --device: give one of the two")
        if not options.devices:
            raise BulkError("--devices: expected a comma-separated list such as cuda:0,cuda:1, got nothing")
        if options.workers not in (1, len(options.devices)):
            raise BulkError(f"--workers {options.workers} and --devices with {len(options.devices)} devices: one "
                            f"worker runs per device; drop --workers")
        try:
            parsed = [parse_device(d, "--devices") for d in options.devices]
        except ValueError as e:
            raise BulkError(str(e)) from None
        if len({str(d) for d in parsed}) != len(parsed):
            raise BulkError(f"--devices: a device is named twice in {','.join(options.devices)}")
    if options.engine == "ray" and options.device is not None and options.device.startswith("cuda") \
            and not options.gpus_per_worker:
        raise BulkError(f"--device {options.device} with --engine ray: give --gpus-per-worker (e.g. 1) so that Ray "
                        f"gives each actor a GPU")
    if options.engine == "ray":
        problem = ray_available()
        if problem:
            raise BulkError(problem)
    if isinstance(options.gpus_per_worker, bool) or not isinstance(options.gpus_per_worker, (int, float)) \
            or not 0 <= options.gpus_per_worker < float("inf"):
        raise BulkError(f"--gpus-per-worker: expected a number >= 0, got {options.gpus_per_worker!r}")


def synthesize_table(input_path: str, out_dir: str, options: BulkOptions | None = None, **overrides) -> BulkSummary:
    """Speak every row of the table at ``input_path`` into ``out_dir`` (one audio file per id, the journal
    ``manifest.jsonl`` and, with pyarrow, ``manifest.parquet``); resumes a run that stopped. ``options`` (or keyword
    arguments of :class:`BulkOptions`) as the command's flags. Raises :class:`BulkError` (one line) for a bad input,
    output directory or option, before any model is loaded; bad rows are recorded as failed and the rest goes on."""
    options = BulkOptions(**{**(asdict(options) if options is not None else {}), **overrides})
    if isinstance(options.devices, str):  # "cuda:0,cuda:1", as on the command line
        options.devices = [d.strip() for d in options.devices.split(",")]
    _check_options(options)
    rows, warnings = read_table(input_path)
    prepare_out_dir(out_dir, options.format)
    if os.path.realpath(os.path.dirname(os.path.abspath(input_path))) == os.path.realpath(out_dir) and \
            os.path.basename(input_path) in ("manifest.jsonl", PARQUET):
        raise BulkError(f"INPUT {input_path!r} is the output directory's manifest; choose another input")

    request, engine_options = model_request(asdict(options))
    if options.devices:
        engine_options = dataclasses.replace(engine_options, device=options.devices[0])
    device, dtype = resolve_device_and_dtype(engine_options)
    # configuration, tokenizer, attention backend, token cap: before any weight
    setup = plan(request, engine_options, [], device, dtype, announce=False)
    _check_voices(rows, options.voice, setup)

    threads = options.threads
    n_workers = len(options.devices) if options.devices else options.workers
    if threads is None and device.type == "cpu" and (n_workers > 1 or options.engine == "ray"):
        threads = max(1, (os.cpu_count() or 1) // n_workers)  # the workers share the cores
    defaults = {"model": setup.name, "format": options.format, "greedy": options.greedy,
                "temperature": options.temperature, "semantic_max_new_tokens": setup.max_new_tokens,
                "pause": options.pause, "dtype": str(dtype), "recipe": options.recipe}
    entries = read_journal(out_dir)
    done = completed(entries, out_dir)

    final: dict[int, dict] = {}
    bad, todo = [], []
    skipped = 0
    for row in rows:
        seed = row.seed if row.seed is not None else options.seed
        if row.problem is not None:
            bad.append(row)
            continue
        key = row.key({**defaults, "seed": seed})
        previous = done.get(row.id)
        if previous is not None and previous.get("key") == key:
            final[row.number] = {**previous, "row": row.number}
            skipped += 1
            continue
        todo.append({"row": row.number, "id": row.id, "text": row.text, "voice": row.voice, "seed": seed,
                     "settings": row.settings, "key": key})
    todo.sort(key=lambda item: -len(item["text"]))  # by length: batches of similar pieces; the long rows first

    worker_options = {"model": setup.name, "device": options.device, "dtype": options.dtype, "attn": options.attn,
                      "threads": threads, "semantic_max_new_tokens": options.semantic_max_new_tokens,
                      "greedy": options.greedy, "temperature": options.temperature, "recipe": options.recipe,
                      "batch_size": options.batch_size, "format": options.format, "pause": options.pause,
                      "out_dir": os.path.abspath(out_dir)}
    if options.progress:
        if options.engine == "ray":
            where = f"{n_workers} Ray actor{'s' if n_workers > 1 else ''}"
        elif options.devices or n_workers > 1:
            n = len(options.devices) if options.devices else n_workers
            where = (f"{n} workers (this process and {n - 1} worker process{'es' if n > 2 else ''})"
                     + (f" on {','.join(options.devices)}" if options.devices else ""))
        else:
            where = "this process"
        print(f"bulk: {len(rows)} rows: {len(todo)} to run, {skipped} complete from an earlier run, {len(bad)} bad; "
              f"model {setup.name} [{device}, {str(dtype).replace('torch.', '')}, attn={options.attn}] in {where}"
              + (f", {threads} thread{'s' if threads != 1 else ''} each" if threads else ""), file=sys.stderr,
              flush=True)
        if setup.random:
            print("NOTE: the built-in random model (NOT trained): every file is NOISE, not speech; pass --model "
                  "suno/bark-small for real speech", file=sys.stderr, flush=True)
    progress = Progress(total=len(todo) + len(bad), skipped=skipped, show=options.progress)
    timings: list[tuple[str, float, float]] = []
    with Journal(out_dir) as journal:
        def emit(entry: dict) -> None:
            timing = entry.pop("timing", None)  # (worker ready, row finished), epoch seconds: not journaled
            if timing is not None:
                timings.append((entry["worker"], *timing))
            journal.append(entry)
            final[entry["row"]] = entry
            progress.update(entry)

        for row in bad:
            emit({"id": row.id, "row": row.number, "path": None, "status": "failed", "error": row.problem,
                  "audio_seconds": 0.0, "wall_seconds": 0.0, "seed": row.seed, "voice": row.voice,
                  "model": setup.name, "backend": None, "key": None, "worker": "driver"})
        if todo:
            if options.engine == "ray":
                run_ray(todo, worker_options, emit, workers=options.workers, address=options.ray_address,
                        gpus_per_worker=options.gpus_per_worker)
            else:
                run_local(todo, worker_options, emit, workers=options.workers, devices=options.devices)
    manifest_entries = [final[row.number] for row in rows if row.number in final]
    manifest = write_manifest(out_dir, manifest_entries) or os.path.join(out_dir, "manifest.jsonl")
    return BulkSummary(rows=len(rows), skipped=skipped, ok=progress.ok, failed=progress.failed,
                       audio_seconds=progress.audio_seconds, wall_seconds=progress.wall_seconds, manifest=manifest,
                       warnings=warnings, entries=manifest_entries, timings=timings)


def _check_voices(rows: list[Row], default: str | None, setup) -> None:
    """Every voice the table names (and ``default`` for the rows without one) is a preset of the checkpoint or a
    readable .npz with this model's sizes; a row with a bad one fails with the reason. Each voice is read once."""
    verdict: dict[str, str | None] = {}
    for row in rows:
        if row.problem is not None:
            continue
        if row.voice is None:
            row.voice = default
        if row.voice is None:
            continue
        if row.voice not in verdict:
            try:
                load_voice(setup.processor, row.voice, setup.config)
                verdict[row.voice] = None
            except OptionError as e:
                verdict[row.voice] = str(e).removeprefix("voice: ")
        if verdict[row.voice] is not None:
            row.problem = f"voice {row.voice!r}: {verdict[row.voice]}"
