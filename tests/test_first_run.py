"""A newcomer's first run (issue 13): the README's commands as written, a clean repository afterwards, a quiet set-up,
progress that suits a log, Ctrl-C at any moment of start-up, test skips that say why."""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bark.cli import speak as cli
from bark.cli.progress import StageMonitor
from bark.generation import StageEvent

ROOT = Path(__file__).resolve().parent.parent


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _readme_commands() -> list[str]:
    """The command lines of the README's first bash block (the two commands)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


# ----------------------------------------------------------------------------------------------------------------------
# the README


def test_readme_commands_use_the_venv_and_work_on_a_cpu():
    commands = _readme_commands()
    assert len(commands) == 2, commands
    main_job, tests = commands
    assert main_job.startswith("bash scripts/setup.sh && .venv/bin/bark-kernels check")
    assert ".venv/bin/bark-kernels speak" in main_job and "--attn triton" not in main_job
    assert tests == "bash scripts/setup.sh && .venv/bin/python -m pytest"
    # no shell example anywhere calls a bare `bark-kernels` (not on PATH after set-up)
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.splitlines():
            assert not re.match(r"\s*bark-kernels\s", line), line


def test_readme_states_measured_durations():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Set-up and the two commands"):text.index("## The kernel API")]
    for what in ("set-up", "main job", "tests"):
        pattern = what.replace(" ", r"\s+") + r"[^.]*?\d+(\.\d+)?(-\d+(\.\d+)?)?\s*(min|s)\b"  # 3.0 min, 4.2-4.5 min
        assert re.search(pattern, section, re.I), f"no measured duration for {what}"


def test_main_job_output_is_ignored_by_git():
    """The main job's WAV lands in the repository root: it must not show up in `git status`."""
    out = re.search(r"speak .*?-o (\S+)", _readme_commands()[0]).group(1)
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout (or no git): the ignore rule cannot be asked")
    run = subprocess.run(["git", "check-ignore", "-q", out], cwd=ROOT, capture_output=True)
    assert run.returncode == 0, f"{out} is not ignored by .gitignore"


# ----------------------------------------------------------------------------------------------------------------------
# packaging and pytest options


def test_pytest_reports_skip_reasons():
    config = _pyproject()
    assert "-rs" in config["tool"]["pytest"]["ini_options"]["addopts"].split()


def test_set_up_prints_no_license_deprecation_banner(tmp_path):
    """setuptools >= 77 prints a deprecation banner (three times per install) for `license = {text = ...}`, and
    setuptools < 77 refuses `license = "MIT"`: the license is set in setup.py and declared dynamic, which both accept.
    Builds the metadata with this environment's setuptools, as `pip install -e .` does."""
    setuptools = pytest.importorskip("setuptools")
    for name in ("pyproject.toml", "setup.py", "README.md", "bark_kernels_main.py"):
        shutil.copy(ROOT / name, tmp_path / name)
    (tmp_path / "bark_kernels").mkdir()
    shutil.copy(ROOT / "bark_kernels" / "_jit.py", tmp_path / "bark_kernels" / "_jit.py")
    script = "from setuptools import build_meta as b; print(b.prepare_metadata_for_build_wheel('meta'))"
    (tmp_path / "meta").mkdir()
    env = dict(os.environ, BARK_KERNELS_SKIP_CUDA_BUILD="1")
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, env=env,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    output = run.stdout + run.stderr
    assert "deprecat" not in output.lower() and "project.license" not in output, \
        f"setuptools {setuptools.__version__}:\n{output}"
    metadata = next((tmp_path / "meta").glob("*/METADATA")).read_text()
    assert re.search(r"^License(-Expression)?: MIT$", metadata, re.M), metadata


def test_console_script_launcher_imports_nothing_heavy():
    run = subprocess.run([sys.executable, "-c", "import sys, bark_kernels_main; print('torch' in sys.modules)"],
                         capture_output=True, text=True, timeout=60)
    assert run.stdout.strip() == "False", run.stdout + run.stderr
    config = _pyproject()
    assert config["project"]["scripts"]["bark-kernels"] == "bark_kernels_main:run"


# ----------------------------------------------------------------------------------------------------------------------
# Ctrl-C


def _interrupt(after_line: str | None, delay: float = 0.0):
    """`python -m bark_kernels_main check --device cpu`, SIGINT once ``after_line`` starts a line of its output (or
    after ``delay`` seconds): (exit code, stdout, stderr)."""
    proc = subprocess.Popen([sys.executable, "-u", "-m", "bark_kernels_main", "check", "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # as in a terminal: a job started in the background of a script (nohup, `&`) inherits
                            # SIGINT ignored, and Python then installs no handler for it
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = []
    if after_line is None:
        time.sleep(delay)
    else:
        for line in proc.stdout:
            seen.append(line)
            if line.startswith(after_line):
                break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, "".join(seen) + out, err


def test_ctrl_c_during_start_up_is_one_line():
    """SIGINT while torch is still being imported, then while `check` runs: one line, exit code 130."""
    # importing bark_kernels (torch) takes seconds: most likely the signal lands there. (When it lands inside
    # third-party code that turns it into another error, e.g. Triton's interpreter halfway through a kernel, that code
    # may log a line of its own first: the last line and the exit code are still ours.)
    rc, out, err = _interrupt(None, delay=0.5)
    assert rc == 130 and err.splitlines()[-1] in ("bark-kernels: interrupted", "bark-kernels check: interrupted"), \
        (rc, err)
    assert "Traceback" not in err
    rc, out, err = _interrupt("self-test")
    if rc == 0:  # the self-test finished before the signal arrived (a fast machine): nothing to interrupt
        assert out.rstrip().endswith("check passed")
    else:
        assert rc == 130 and err.splitlines()[-1].endswith("interrupted") and "Traceback" not in err, err


def test_an_interrupt_swallowed_by_other_code_still_exits_130(monkeypatch, capsys):
    """A command that returns normally after a SIGINT (something turned the KeyboardInterrupt into another error)."""
    import bark_kernels_main
    from bark_kernels import cli as bk_cli

    def swallowing(argv):
        try:
            bark_kernels_main._on_sigint(signal.SIGINT, None)
        except KeyboardInterrupt:
            pass
        return 1

    monkeypatch.setattr(bark_kernels_main, "_interrupts", [])
    monkeypatch.setattr(bk_cli, "main", swallowing)
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # leave pytest's own SIGINT handler in place
    assert bark_kernels_main.main(["check"]) == 130
    assert capsys.readouterr().err == "bark-kernels: interrupted\n"


def test_interrupt_while_importing_the_package(monkeypatch, capsys):
    """The same, in process: a KeyboardInterrupt raised by the import of bark_kernels.cli."""
    import bark_kernels_main

    class Interrupting:
        def find_spec(self, name, path=None, target=None):
            if name == "bark_kernels.cli":
                raise KeyboardInterrupt
            return None

    monkeypatch.delitem(sys.modules, "bark_kernels.cli", raising=False)
    monkeypatch.setattr(sys, "meta_path", [Interrupting(), *sys.meta_path])
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # leave pytest's own SIGINT handler in place
    assert bark_kernels_main.main(["check"]) == 130
    assert capsys.readouterr().err == "bark-kernels: interrupted\n"


# ----------------------------------------------------------------------------------------------------------------------
# progress outside a terminal


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _events():
    for stage, total in (("semantic", 32), ("coarse", 96), ("fine", 6), ("codec", 1)):
        yield StageEvent(stage, "start", 0, total, 1, 0.0)
        for done in range(1, total, 7):
            yield StageEvent(stage, "progress", done, total, 1, 0.01 * done)
        yield StageEvent(stage, "end", total, total, 1, 1.25)


def test_progress_is_one_line_per_stage_outside_a_terminal():
    log = io.StringIO()
    monitor = StageMonitor(show=True, stream=log)
    for event in _events():
        monitor(event)
    monitor.close()
    assert "\r" not in log.getvalue()
    assert log.getvalue().splitlines() == ["semantic 32/32 steps  1.25 s  (1 row)",
                                           "coarse   96/96 tokens  1.25 s  (1 row)",
                                           "fine     6/6 passes  1.25 s  (1 row)",
                                           "codec    1/1 rows  1.25 s  (1 row)"]

    terminal = _Terminal()
    monitor = StageMonitor(show=True, stream=terminal)
    for event in _events():
        monitor(event)
    monitor.close()
    assert "\r" in terminal.getvalue()  # on a terminal: tqdm's bars

    quiet = io.StringIO()
    monitor = StageMonitor(show=False, stream=quiet)
    for event in _events():
        monitor(event)
    assert quiet.getvalue() == ""


def test_random_model_run_in_a_log(tmp_path, capsys, caplog, monkeypatch):
    """The built-in random model (shrunk), stderr not a terminal: one progress line per stage, no carriage returns.
    A --batch-file line past its 256 bytes is cut with a warning; a text argument of any length is spoken whole, in
    pieces of at most 256 bytes (a 300-byte 'word' is split, and the log says so)."""
    from bark_tiny import tiny_random_bark_config

    import bark.config

    monkeypatch.setattr(bark.hub, "hub_cached", lambda repo_id: False)
    monkeypatch.setattr(bark.config, "bark_small_config", tiny_random_bark_config)
    stage_line = re.compile(r"\w+ +\d+/\d+ \w+ +[\d.]+ s")
    lines = tmp_path / "lines.txt"
    lines.write_text("x" * 300 + "\n")
    out = tmp_path / "noise.wav"
    rc = cli.speak_main(["--batch-file", str(lines), "-o", str(out), "--device", "cpu",
                         "--semantic-max-new-tokens", "6"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "\r" not in err
    assert "line 1 of --batch-file: 300 UTF-8 bytes; the built-in random model reads the first 256" in err
    stages = [line.split()[0] for line in err.splitlines() if stage_line.match(line)]
    assert stages == ["semantic", "coarse", "fine", "codec"], err
    assert out.stat().st_size > 44

    rc = cli.speak_main(["x" * 300, "-o", str(out), "--device", "cpu", "--semantic-max-new-tokens", "6"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "\r" not in captured.err and "reads the first 256" not in captured.err
    assert "a single word of 300 tokens is longer than max_tokens=256" in caplog.text
    assert "300 characters in 2 pieces" in captured.out
    stages = [line.split()[0] for line in captured.err.splitlines() if stage_line.match(line)]
    assert stages == ["semantic", "coarse", "fine", "codec"] * 2, captured.err  # two pieces, one batch each
    assert out.stat().st_size > 44
