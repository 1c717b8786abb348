"""The GPU first-light command (scripts/first_light.py): its CPU rehearsal leaves a complete summary, also when the
global deadline cuts steps short. The full rehearsal of every step runs in CI (.ci/run) and under ``-m slow``."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "first_light.py"


def _run(out: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--cpu", "--out", str(out), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def _check_complete(out: Path, selected: list[str]) -> dict:
    """Every file a first-light run promises, each step accounted for."""
    summary = (out / "summary.md").read_text()
    steps = json.loads((out / "steps.json").read_text())["steps"]
    assert (out / "logs.tar.gz").exists()
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = tar.getnames()
    for name, rec in steps.items():
        assert f"| {name} | {rec['status']} |" in summary
        if name in selected:
            assert rec["status"] != "skipped" and rec["status"] != "not run", (name, rec)
            assert f"{name}.log" in names or rec["status"] == "cut", (name, names)
        else:
            assert rec["status"] == "skipped"
    assert len(list(out.iterdir())) <= 8, sorted(p.name for p in out.iterdir())
    return steps


def test_deadline_cut_still_leaves_a_complete_summary(tmp_path):
    """A global budget far too short for the steps: each is interrupted at its deadline or not started; the run
    fails (exit 1), and summary.md lists every step with what happened, failures first."""
    res = _run(tmp_path, "--budget", "12", "--steps", "env,tests,decode", "--tests", "tests/test_padding.py",
               timeout=120)
    assert res.returncode == 1, res.stdout + res.stderr
    steps = _check_complete(tmp_path, ["env", "tests", "decode"])
    assert {steps[n]["status"] for n in ("env", "tests", "decode")} <= {"timeout", "cut", "ok", "failed"}
    assert any(steps[n]["status"] in ("timeout", "cut") for n in ("env", "tests", "decode"))
    summary = (tmp_path / "summary.md").read_text()
    assert summary.index("## Failures and gaps (first)") < summary.index("## Steps")
    assert "full summary:" in res.stdout


def test_bad_arguments_are_refused(tmp_path):
    res = _run(tmp_path, "--steps", "env,frobnicate", timeout=60)
    assert res.returncode == 2 and "--steps: unknown ['frobnicate']" in res.stderr
    res = _run(tmp_path, "--budget", "3", timeout=60)
    assert res.returncode == 2 and "--budget" in res.stderr


def test_junit_counts_reads_failures_and_skips(tmp_path):
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import first_light
    finally:
        sys.path.pop(0)
    xml = tmp_path / "j.xml"
    xml.write_text('<testsuites><testsuite><testcase classname="a" name="ok"/>'
                   '<testcase classname="a" name="bad"><failure message="boom"/></testcase>'
                   '<testcase classname="a" name="skip"><skipped message="why"/></testcase>'
                   '<testcase classname="b" name="err"><error message="E"/></testcase></testsuite></testsuites>')
    counts = first_light.junit_counts(xml)
    assert {k: counts[k] for k in ("tests", "passed", "failures", "errors", "skipped")} == \
        {"tests": 4, "passed": 1, "failures": 1, "errors": 1, "skipped": 1}
    assert counts["failed_names"][0].startswith("a::bad (boom")
    assert first_light.junit_counts(tmp_path / "missing.xml") == {}


@pytest.mark.slow
def test_full_rehearsal_passes(tmp_path):
    """Every step's code path at tiny sizes, under the interpreter (what .ci/run runs)."""
    res = _run(tmp_path, "--budget", "240", timeout=400)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    _check_complete(tmp_path, ["env", "build", "check", "tests", "decode", "bench", "sanitize", "longform"])
