"""The ``bark-kernels`` console script: a launcher that imports nothing heavy itself.

``import bark_kernels`` imports torch (seconds on a cold start). Had the script's entry point been in that package, a
Ctrl-C while torch loads would end in a traceback, before any of our code could run. Here the import happens inside
``main``, so an interrupt at any moment of start-up or of a command ends with one line and exit code 130.

While the packages load, an interrupt exits at once (nothing has been written yet): raising KeyboardInterrupt there
could land inside torch's C++ start-up code, which aborts the process on it, or leave a half-imported module behind.
During the command, an interrupt raises KeyboardInterrupt as usual (the commands clean up and say "interrupted"); it can
land inside third-party code that turns it into another error (a C++ callback, a broad ``except``), which the command
then reports as a failure: the handler records every interrupt, so the exit code is 130 and the last line says so
whatever became of the KeyboardInterrupt.
"""

from __future__ import annotations

import os
import signal
import sys

INTERRUPTED = 130  # 128 + SIGINT, as shells report it

_interrupts: list[int] = []


def _on_sigint(signum, frame):
    _interrupts.append(signum)
    raise KeyboardInterrupt


def _exit_at_once(signum, frame):
    sys.stderr.write("bark-kernels: interrupted\n")
    sys.stderr.flush()
    os._exit(INTERRUPTED)


def main(argv: list[str] | None = None) -> int:
    handle = signal.getsignal(signal.SIGINT) is signal.default_int_handler  # not when SIGINT is ignored (nohup, `&`)
    if handle:
        signal.signal(signal.SIGINT, _exit_at_once)
    try:
        from bark_kernels.cli import main as cli_main
    except KeyboardInterrupt:  # when the handler was not ours
        print("bark-kernels: interrupted", file=sys.stderr)
        return INTERRUPTED
    if handle:
        signal.signal(signal.SIGINT, _on_sigint)
    try:
        code = cli_main(argv)
    except KeyboardInterrupt:
        print("bark-kernels: interrupted", file=sys.stderr)
        return INTERRUPTED
    if _interrupts and code != INTERRUPTED:
        print("bark-kernels: interrupted", file=sys.stderr)
        return INTERRUPTED
    return code


def run() -> int:
    """The console script: ``main()``, and after an interrupt an immediate exit with 130. Python's own exit would kill
    the process with SIGINT instead when a library let the KeyboardInterrupt pass through one of its ``PyRun_*`` calls
    (a shell reports 130 either way, a parent process sees -2), and would run the exit hooks of libraries that the
    interrupt may have left half-way."""
    code = main()
    if code == INTERRUPTED:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(run())
