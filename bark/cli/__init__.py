"""bark's command line, one module per command: ``speak`` (bark.cli.speak; a long text through bark.cli.longform),
with the checks before the model loads in bark.cli.setup and progress in bark.cli.progress. Commands are found by
``bark-kernels`` through the entry-point group ``bark_kernels.commands`` (pyproject.toml)."""

from .speak import add_speak_parser, speak_main, write_wav_atomic

__all__ = ["add_speak_parser", "speak_main", "write_wav_atomic"]
