"""The ``bark-kernels`` console script: a launcher that imports nothing heavy itself.

``import bark_kernels`` imports torch (seconds on a cold start). Had the script's entry point been in that package, a
Ctrl-C while torch loads would end in a traceback, before any of our code could run. Here the import happens inside
``main``, so an interrupt at any moment of start-up or of a command ends with one line and exit code 130.
"""

from __future__ import annotations

import sys

INTERRUPTED = 130  # 128 + SIGINT, as shells report it


def main(argv: list[str] | None = None) -> int:
    try:
        from bark_kernels.cli import main as cli_main

        return cli_main(argv)
    except KeyboardInterrupt:
        print("bark-kernels: interrupted", file=sys.stderr)
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
