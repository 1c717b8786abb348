"""``--engine local``: the rows run in this process (one worker), or in N workers (``--workers N`` on CPU;
``--devices cuda:0,cuda:1``: one worker per device) that take rows from one shared queue as they have room.

With N workers, this process (the driver) is worker 0 and N - 1 worker processes are spawned beside it. The driver
starts on the rows at once (torch is imported here already) while the other workers import torch and load their
models, which takes seconds; every worker pulls the next rows from the queue when its engine has room, so a worker
that started late, or got the long rows, simply takes fewer, and all end together. The rows come sorted by length, so
the rows a worker takes at once are alike and batch well. Each worker loads the model once and writes its rows' audio
files; the entries of the other workers come back over a queue, and only the driver writes the journal (one writer).
A worker whose driver is gone (the run was killed) stops at its next wait instead of running on unseen.

Which worker runs a row does not change its audio (greedy rows equal themselves alone; a seeded row draws from its own
stream: docs/bulk.md), so the files do not depend on the distribution.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue as queue_module
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence

from .table import BulkError
from .worker import Synthesizer, one_line

__all__ = ["run_local"]

logger = logging.getLogger("bark")


def run_local(rows: Sequence[Mapping], options: Mapping, emit: Callable[[dict], None], workers: int = 1,
              devices: Sequence[str] | None = None, driver_works: bool = True) -> None:
    """Speak ``rows`` (worker dicts, bark.bulk.worker) with ``workers`` workers (1: this process alone), or one per
    device of ``devices``; ``emit(entry)`` each finished row's manifest entry, in this process (one call at a time).
    ``driver_works=False`` leaves this process out of the work: all N workers are spawned processes."""
    n = len(devices) if devices else workers
    driver_options = {**options, "device": devices[0] if devices else options.get("device"), "worker": "local-0"}
    if n <= 1 and driver_works:
        _run_here(rows, driver_options, emit)
        return
    context = multiprocessing.get_context("spawn")  # no fork of a process that holds torch threads (or CUDA)
    tasks = context.Queue()
    for row in rows:
        tasks.put(row)
    for _ in range(n):
        tasks.put(None)  # one end mark per worker: the rows are all taken before any worker sees one
    messages = context.Queue()
    first_child = 1 if driver_works else 0
    processes: dict[int, multiprocessing.process.BaseProcess] = {}
    for i in range(first_child, n):
        worker_options = {**options, "worker": f"local-{i}", "parent_pid": os.getpid()}
        if devices:
            worker_options["device"] = devices[i]
        process = context.Process(target=_worker_main, args=(worker_options, tasks, messages),
                                  name=f"bark-bulk-{i}", daemon=True)
        process.start()
        processes[i] = process
    lock = threading.Lock()
    emitted = [0]

    def locked_emit(entry: dict) -> None:
        with lock:
            emitted[0] += 1
            emit(entry)

    collector = _Collector(processes, messages, locked_emit)
    thread = threading.Thread(target=collector.run, name="bark-bulk-collector", daemon=True)
    thread.start()
    try:
        if driver_works:
            try:
                _run_here(_pull(tasks), driver_options, locked_emit, window=_window(options))
            except Exception as error:  # noqa: BLE001 - as a spawned worker's: the others take the rows left
                with lock:
                    collector.problems.append(f"worker 0: {one_line(error)}")
        thread.join()
    finally:
        collector.stop.set()
        thread.join(timeout=5)
        for process in processes.values():
            if process.is_alive() and not collector.complete:
                process.terminate()
        for process in processes.values():
            process.join(timeout=30)
        tasks.cancel_join_thread()  # rows nobody took (a failed run) must not keep this process from exiting
    if collector.problems:
        if emitted[0] < len(rows):  # a worker's rows were lost with it: the journal has the rest
            raise BulkError("; ".join(collector.problems) + f"; {len(rows) - emitted[0]} rows not done: run the "
                            "command again to resume")
        logger.warning("bulk: %s (the other workers took its rows)", "; ".join(collector.problems))


def _window(options: Mapping) -> int:
    """Rows a worker that shares the queue holds unfinished at once: one batch's worth."""
    return int(options.get("batch_size", 8))


def _run_here(rows, options: dict, emit: Callable[[dict], None], window: int | None = None) -> None:
    """Worker 0 in this process: torch's thread count is set for the run and put back after (this process may be a
    larger program)."""
    import torch

    threads = torch.get_num_threads()
    try:
        synth = Synthesizer(options)
        try:
            synth.run(rows, emit, window=window)
        finally:
            synth.close()
    finally:
        torch.set_num_threads(threads)


def _pull(tasks) -> Iterator[Mapping]:
    """The rows of the shared queue, up to this worker's end mark."""
    while True:
        row = tasks.get()
        if row is None:
            return
        yield row


class _Collector:
    """In the driver: hands the spawned workers' entries to ``emit`` until every worker is done or has failed."""

    def __init__(self, processes: dict, messages, emit: Callable[[dict], None]) -> None:
        self.processes = processes
        self.messages = messages
        self.emit = emit
        self.stop = threading.Event()
        self.finished: set[int] = set()
        self.problems: list[str] = []

    @property
    def complete(self) -> bool:
        return len(self.finished) == len(self.processes)

    def run(self) -> None:
        while not self.complete and not self.stop.is_set():
            try:
                kind, index, payload = self.messages.get(timeout=0.5)
            except queue_module.Empty:
                for i, process in self.processes.items():
                    if i not in self.finished and not process.is_alive():
                        self._drain()  # its last entries may still be on the way
                        if i in self.finished:
                            continue
                        self.finished.add(i)
                        self.problems.append(f"worker {i} ended with exit code {process.exitcode} before its rows "
                                             f"were done (out of memory?)")
                continue
            self._take(kind, index, payload)

    def _drain(self) -> None:
        while True:
            try:
                kind, index, payload = self.messages.get(timeout=0.2)
            except queue_module.Empty:
                return
            self._take(kind, index, payload)

    def _take(self, kind: str, index: int, payload) -> None:
        if kind == "entry":
            self.emit(payload)
        elif kind == "done":
            self.finished.add(index)
        else:  # "error": the worker could not start (its model did not load); the others take its rows
            self.finished.add(index)
            self.problems.append(f"worker {index}: {payload}")


def _worker_main(options: dict, tasks, messages) -> None:
    index = int(options["worker"].rsplit("-", 1)[-1])
    try:
        synth = Synthesizer(options)
    except Exception as error:  # noqa: BLE001 - reported by the parent as one line
        messages.put(("error", index, one_line(error)))
        return
    try:
        synth.run(_pull(tasks), lambda entry: messages.put(("entry", index, entry)), window=_window(options))
    finally:
        synth.close()
    messages.put(("done", index, None))
