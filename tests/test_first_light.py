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


def test_engine_step_measures_batching_across_callers(tmp_path):
    """The engine step (CPU rehearsal: a narrow 1-layer model, 2 requests): the pairs' speed-up, each run's batches
    (one batch of 2 concurrent, two of 1 one after another) and that each request got the tokens it gets alone."""
    res = _run(tmp_path, "--budget", "120", "--steps", "engine", "--caps", "engine=100", timeout=200)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    steps = _check_complete(tmp_path, ["engine"])
    figures = steps["engine"]["figures"]
    assert steps["engine"]["status"] == "ok" and figures["same_tokens"] is True
    assert len(figures["pairs"]) == 1 and figures["median_speedup"] == figures["pairs"][0]["speedup"] > 0
    assert sorted(x["batches"] for x in figures["runs"]) == [[1, 1], [2]]
    summary = (tmp_path / "summary.md").read_text()
    assert "### Engine: 2 concurrent requests vs one after another" in summary and "GPU target: >= 4x" in summary


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


def _first_light():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import first_light
    finally:
        sys.path.pop(0)
    return first_light


def test_version_2_measures_the_headline_first():
    """The order of the GPU command, version 2: env, build, then the decode step (session-fused among the modes,
    bark-small and bark, batch 1 and 8), end to end, the tests (GPU-only first), kernels, sanitize, long-form."""
    fl = _first_light()
    order = fl.STEP_NAMES
    assert order[:5] == ["env", "build", "decode", "e2e", "tests"] and order[-2:] == ["sanitize", "longform"]
    assert order.index("kernels") < order.index("sanitize")
    assert order.index("tests") < order.index("engine") < order.index("kernels")  # correct first, then the engine
    engine = " ".join(fl.GPU_ENGINE_ARGS)
    assert "--device cuda" in engine and "--layers 12" in engine and "--requests 8" in engine
    args = " ".join(fl.GPU_DECODE_ARGS)
    assert "bark-small,bark" in args and "1,8" in args
    assert "eager,graph,session-graph,session-fused,session-compile" in args
    assert "session-fused" in " ".join(fl.CPU_DECODE_ARGS)
    assert fl.GPU_TEST_FILES[:2] == ["tests/test_session.py", "tests/test_fused_decode.py"]


def test_build_is_skipped_when_a_prebuilt_extension_loads(tmp_path, monkeypatch):
    """A _C built ahead for the exact stack: the build step only proves that it loads (no pip install); one that does
    not load is rejected (said in the summary) and the extension is built as before."""
    fl = _first_light()
    s = fl.Session(tmp_path / "out", 100.0, False, sys.executable)
    monkeypatch.setattr(fl, "_prebuilt_c", lambda: [Path("bark_kernels/_C.cpython-312-x86_64-linux-gnu.so")])
    calls = []

    def loads(name, argv, log, deadline, env=None, cwd=None):
        calls.append(argv)
        return 0, False, "_C /x/_C.so\ncuda backend: available\n"

    monkeypatch.setattr(s, "run", loads)
    r = fl.step_build(s, 60.0)
    assert r.status == "ok" and "build skipped" in r.note and len(calls) == 1 and "pip" not in calls[0]
    s2 = fl.Session(tmp_path / "out2", 100.0, False, sys.executable)
    calls.clear()

    def broken(name, argv, log, deadline, env=None, cwd=None):
        calls.append(argv)
        return (1, False, "ImportError: undefined symbol") if len(calls) == 1 else (1, False, "pip failed")

    monkeypatch.setattr(s2, "run", broken)
    r2 = fl.step_build(s2, 60.0)
    assert "undefined symbol" in r2.figures["prebuilt_rejected"] and r2.status == "failed"
    assert calls[1][2:4] == ["pip", "install"]
    assert "Prebuilt _C rejected" in fl.summary_markdown(s2)


def test_junit_phases_merge_into_one_file(tmp_path):
    fl = _first_light()
    a, b = tmp_path / "a.xml", tmp_path / "b.xml"
    a.write_text('<testsuites><testsuite name="pytest"><testcase classname="g" name="gpu1"/></testsuite></testsuites>')
    b.write_text('<testsuite name="pytest"><testcase classname="r" name="x"><failure message="m"/></testcase>'
                 '</testsuite>')
    out = tmp_path / "junit.xml"
    fl._merge_junit([a, b, tmp_path / "missing.xml"], out)
    counts = fl.junit_counts(out)
    assert counts["tests"] == 2 and counts["passed"] == 1 and counts["failures"] == 1


@pytest.mark.slow
def test_full_rehearsal_passes(tmp_path):
    """Every step's code path at tiny sizes, under the interpreter (what .ci/run runs)."""
    res = _run(tmp_path, "--budget", "240", timeout=400)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    _check_complete(tmp_path, ["env", "build", "decode", "e2e", "tests", "engine", "kernels", "check", "sanitize",
                               "longform"])
