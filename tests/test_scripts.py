"""The shell scripts under scripts/: they parse, and check_gpu_stack.sh refuses an interpreter that is not a working
Python 3.12 before creating anything (its full run installs ~5 GB: see README, "On a GPU machine")."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


@pytest.mark.parametrize("name", sorted(p.name for p in SCRIPTS.glob("*.sh")))
def test_script_parses(name):
    run = subprocess.run(["bash", "-n", str(SCRIPTS / name)], capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr


def test_check_gpu_stack_refuses_an_interpreter_that_is_not_python_312(tmp_path):
    fake = tmp_path / "python3.12"  # what a pyenv shim does when no 3.12 is selected: exists, does not run
    fake.write_text("#!/bin/sh\necho 'pyenv: python3.12: command not found' >&2\nexit 127\n")
    fake.chmod(0o755)
    venv = tmp_path / "venv"
    env = dict(os.environ, PYTHON=str(fake), VENV=str(venv))
    run = subprocess.run(["bash", str(SCRIPTS / "check_gpu_stack.sh")], capture_output=True, text=True, env=env,
                         timeout=60)
    assert run.returncode == 2, run.stdout + run.stderr
    assert f"{fake} is not a working Python 3.12" in run.stderr
    assert not venv.exists()
