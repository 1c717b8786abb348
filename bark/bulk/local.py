"""``--engine local``: the rows run in this process (one worker), or in N worker processes over disjoint shards
(``--workers N`` on CPU; ``--devices cuda:0,cuda:1``: one process per device).

The rows come sorted by length; shard ``i`` of N takes rows ``i, i + N, ...``, so every shard holds the same mix of
long and short rows and the workers end together. Each worker loads the model once and writes its rows' audio files;
the entries come back to this process through a queue, and only this process writes the journal (one writer). A
worker whose parent is gone (the run was killed) stops at its next wait instead of running on unseen.
"""

from __future__ import annotations

import multiprocessing
import os
import queue as queue_module
from collections.abc import Callable, Mapping, Sequence

from .table import BulkError
from .worker import Synthesizer, one_line

__all__ = ["run_local", "shards"]


def shards(rows: Sequence, n: int) -> list[list]:
    """``rows`` dealt round robin into ``n`` shards (disjoint, together every row)."""
    return [list(rows[i::n]) for i in range(n)]


def run_local(rows: Sequence[Mapping], options: Mapping, emit: Callable[[dict], None], workers: int = 1,
              devices: Sequence[str] | None = None) -> None:
    """Speak ``rows`` (worker dicts, bark.bulk.worker) with ``workers`` processes (1: this process), or one per
    device of ``devices``; ``emit(entry)`` each finished row's manifest entry, in this process."""
    n = len(devices) if devices else workers
    if n <= 1:
        import torch

        threads = torch.get_num_threads()
        try:
            synth = Synthesizer({**options, "device": devices[0] if devices else options.get("device"),
                                 "worker": "local-0"})
            try:
                synth.run(rows, emit)
            finally:
                synth.close()
        finally:
            torch.set_num_threads(threads)  # this process may be a larger program: leave torch as found
        return
    context = multiprocessing.get_context("spawn")  # no fork of a process that holds torch threads (or CUDA)
    messages = context.Queue()
    processes = []
    for i, shard in enumerate(shards(rows, n)):
        worker_options = {**options, "worker": f"local-{i}", "parent_pid": os.getpid()}
        if devices:
            worker_options["device"] = devices[i]
        process = context.Process(target=_worker_main, args=(worker_options, shard, messages),
                                  name=f"bark-bulk-{i}", daemon=True)
        process.start()
        processes.append(process)
    finished: set[int] = set()
    try:
        while len(finished) < n:
            try:
                kind, index, payload = messages.get(timeout=1.0)
            except queue_module.Empty:
                for i, process in enumerate(processes):
                    if i not in finished and not process.is_alive() and process.exitcode not in (None, 0):
                        raise BulkError(f"worker {i} ended with exit code {process.exitcode} before its rows were "
                                        f"done (out of memory?); run the command again to resume")
                continue
            if kind == "entry":
                emit(payload)
            elif kind == "done":
                finished.add(index)
            else:  # "error": the worker could not start (its model did not load)
                raise BulkError(f"worker {index}: {payload}")
    finally:
        for process in processes:
            if process.is_alive() and len(finished) < n:
                process.terminate()
        for process in processes:
            process.join(timeout=30)


def _worker_main(options: dict, rows: list, messages) -> None:
    index = int(options["worker"].rsplit("-", 1)[-1])
    try:
        synth = Synthesizer(options)
    except Exception as error:  # noqa: BLE001 - reported by the parent as one line
        messages.put(("error", index, one_line(error)))
        return
    try:
        synth.run(rows, lambda entry: messages.put(("entry", index, entry)))
    finally:
        synth.close()
    messages.put(("done", index, None))
