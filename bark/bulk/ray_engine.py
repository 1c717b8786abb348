"""``--engine ray``: the rows through Ray Data, one model per actor.

    rows (pending only) -> ray.data.from_items -> map_batches(_BulkActor, compute=ActorPoolStrategy(size=N),
                           num_cpus=threads, num_gpus=G, batch_size=B) -> iter_batches in the driver -> the journal

Each actor is a :class:`bark.bulk.worker.Synthesizer`: it loads the model once (in ``__init__``), speaks each batch
of rows it is handed through its own engine, writes those rows' audio files itself (OUT_DIR must be a path every node
sees: a shared file system on a multi-node cluster) and returns their manifest entries; the manifest comes back
through Ray to the driver, which journals each entry as its batch arrives. The driver reads and checks the table
first (bad input in one line, bad rows, duplicate ids) and filters out the rows complete from an earlier run, so only
pending rows enter the pipeline.

``address``: an existing cluster (``ray://...`` or ``auto``); without it a local cluster is started for the run (and
stopped after). Inside a program that already called ``ray.init`` that cluster is used and left running.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence

from .table import BulkError
from .worker import Synthesizer

__all__ = ["run_ray", "ray_available"]


def ray_available() -> str | None:
    """None when Ray Data can be imported, else why not (one line)."""
    try:
        import ray  # noqa: F401
        import ray.data  # noqa: F401
    except ImportError as e:
        return f"--engine ray: needs Ray Data (pip install 'bark-kernels[ray]'): {e}"
    return None


def _first_line(error: BaseException) -> str:
    """The first line that names the problem (Ray wraps it in tracebacks), at most 300 characters."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    wanted = [line for line in lines if "Error" in line and not line.startswith(("File ", "Traceback"))]
    return (wanted[-1] if wanted else lines[0] if lines else type(error).__name__)[:300]


class _BulkActor:
    """A Ray Data callable class: the model once per actor, a batch of rows per call."""

    def __init__(self, options: dict) -> None:
        import ray

        try:
            name = ray.get_runtime_context().get_actor_id()[:12]  # the actor's own bytes (the job id comes last)
        except Exception:  # noqa: BLE001 - a name for the manifest only
            name = str(os.getpid())
        self.synth = Synthesizer({**options, "worker": f"ray-{name}"})

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        rows = [json.loads(item) for item in batch["item"]]
        entries: list[dict] = []
        self.synth.run(rows, entries.append)
        return {"entry": np.array([json.dumps(e) for e in entries], dtype=object)}


def run_ray(rows: Sequence[Mapping], options: Mapping, emit: Callable[[dict], None], workers: int = 1,
            address: str | None = None, gpus_per_worker: float = 0.0, rows_per_call: int | None = None) -> None:
    """Speak ``rows`` on a Ray cluster with ``workers`` actors (``gpus_per_worker`` GPUs and ``options['threads']``
    CPUs each); ``emit(entry)`` each row's manifest entry in this process as its batch comes back."""
    problem = ray_available()
    if problem:
        raise BulkError(problem)
    import ray
    import ray.data

    threads = int(options.get("threads") or 1)
    started = False
    if not ray.is_initialized():
        init: dict = {"log_to_driver": False, "include_dashboard": False}
        if address:
            init["address"] = address  # its nodes must have bark-kernels installed
        else:
            init["num_cpus"] = max(os.cpu_count() or 1, workers * threads)
            # the local actors import the bark that this process imports (a source checkout too)
            init["runtime_env"] = {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}}
            # Ray starts its workers at nice 15 (below its own daemons): on a machine with few cores the actors then
            # lose the CPU to the raylet and half their speed (measured: benchmarks/bulk.py). The local cluster this
            # run starts gives its actors the priority of the run itself, unless the caller set it.
            os.environ.setdefault("RAY_worker_niceness", "0")
        init["logging_level"] = logging.WARNING
        try:
            ray.init(**init)
        except Exception as e:  # ConnectionError, ValueError (bad address) ...
            raise BulkError(f"--ray-address {address}: cannot connect: {e}" if address
                            else f"--engine ray: cannot start a local Ray cluster: {e}") from None
        started = True
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # no per-dataset INFO lines between the progress
        if not rows:
            return
        # rows per actor call: at least one engine batch, at most four, and about four calls per actor, so that an
        # actor that started late still gets its share (each actor takes one call at a time, the next when done)
        batch = int(options.get("batch_size", 8))
        per_call = rows_per_call or max(1, min(4 * batch, max(batch, math.ceil(len(rows) / (4 * workers)))))
        blocks = max(workers, math.ceil(len(rows) / per_call))
        dataset = ray.data.from_items([{"item": json.dumps(dict(row))} for row in rows], override_num_blocks=blocks)
        dataset = dataset.map_batches(
            _BulkActor, fn_constructor_kwargs={"options": dict(options)},
            compute=ray.data.ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=1), num_cpus=threads,
            num_gpus=gpus_per_worker or None,
            batch_size=per_call, batch_format="numpy")
        batches = iter(dataset.iter_batches(batch_size=None, batch_format="numpy"))
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                break
            except Exception as e:  # Ray's: an actor that could not load its model, a lost node, ...
                cause = getattr(e, "cause", None) or e
                raise BulkError(f"--engine ray: a worker failed: {_first_line(cause)} (finished rows are kept; run "
                                f"the command again to resume)") from None
            for item in batch["entry"]:
                emit(json.loads(item))
    finally:
        if started:
            ray.shutdown()
