"""Where the argparse namespace of ``speak`` goes: it becomes one typed request and one set of engine options in
bark/cli/speak.py (``request_and_options``) and nothing else reads it. Checked twice: statically (no module of bark
outside bark/cli imports argparse; in bark/cli only the named functions take a Namespace) and by following a real
run (a namespace that records which function reads each of its attributes)."""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

import numpy as np
import pytest

from bark.cli import speak as cli

pytest.importorskip("transformers")
from bark_tiny import random_voice_preset, save_tiny_speak_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
READERS = {("bark/cli/speak.py", "request_and_options"), ("bark/cli/speak.py", "run_speak"),
           ("bark/cli/longform.py", "given_longform"), ("bark/cli/serve.py", "run_serve"),
           ("bark/cli/batch.py", "run_batch")}


def test_no_module_below_the_cli_imports_argparse():
    offenders = []
    for path in sorted((ROOT / "bark").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("bark/cli/"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{rel}: {n}" for n in names if n.split(".")[0] == "argparse"]
    assert offenders == []


def test_only_the_edge_functions_take_a_namespace():
    takers = set()
    for path in sorted((ROOT / "bark" / "cli").glob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for arg in node.args.args + node.args.kwonlyargs:
                    if arg.annotation is not None and "Namespace" in ast.unparse(arg.annotation):
                        takers.add((rel, node.name))
    assert takers == READERS


class _SpyNamespace(argparse.Namespace):
    """Records (file, function) of every read of an option."""

    reads: set = set()

    def __getattribute__(self, name):
        if not name.startswith("_"):
            code = sys._getframe(1).f_code
            path = Path(code.co_filename).resolve()
            rel = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else path.as_posix()
            type(self).reads.add((rel, code.co_name))
        return super().__getattribute__(name)


@pytest.mark.parametrize("mode", ["long text", "batch file"])
def test_a_real_run_reads_the_namespace_only_at_the_edge(tmp_path, mode, capsys):
    ckpt = save_tiny_speak_checkpoint(tmp_path / "ckpt")
    voice = tmp_path / "voice.npz"
    np.savez(voice, **random_voice_preset(seed=1))
    common = ["-o", str(tmp_path / "out.wav"), "--model", str(ckpt), "--voice", str(voice), "--greedy", "--quiet",
              "--device", "cpu", "--semantic-max-new-tokens", "6"]
    if mode == "long text":
        argv = ["One sentence. And another one.", "--pause", "0.1", *common]
    else:
        (tmp_path / "lines.txt").write_text("first line\nsecond line\n", encoding="utf-8")
        argv = ["--batch-file", str(tmp_path / "lines.txt"), *common]
    parsed = cli.build_speak_parser().parse_args(argv)
    _SpyNamespace.reads = set()
    spy = _SpyNamespace(**vars(parsed))
    assert cli.run_speak(spy) == 0, capsys.readouterr().err
    assert _SpyNamespace.reads and _SpyNamespace.reads <= READERS, _SpyNamespace.reads - READERS
