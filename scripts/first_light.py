"""GPU first light, version 2: one command that answers, in order of what is still unknown, what a short GPU slot can.

    python3 scripts/first_light.py --out "$OUT"                     # on the GPU machine: <= 9 minutes by default
    python3 scripts/first_light.py --cpu --out /tmp/fl --budget 240  # the CPU rehearsal (CI runs it)

Steps, in order (the headline first, so that a run cut short still answers it); each runs as a subprocess under its
own deadline, taken from one global budget (``--budget``), and each step's result lands in the output folder as soon
as it finishes:

  env       machine facts and the two ceilings measured here (device copy GB/s, bf16 matmul TFLOP/s)
  build     skipped when a bark_kernels._C built ahead (on a CPU machine, for this exact stack) is in the working tree
            and loads with its ops registered; else ``pip install --no-build-isolation --no-deps -e .`` with _C for
            sm_90 only, parallel nvcc, and the import of _C proved (CPU: ``pip wheel`` of the project)
  decode    decode-step benchmark (benchmarks/decode.py): eager, graph, session-graph, session-fused (the fused Triton
            step, 5 launches per layer), session-compile; bark-small and bark, batch 1 and 8: µs/step, x floor, tokens
  e2e       end to end vs transformers (``python -m benchmarks --skip-kernels``): seconds per clip, real-time factor
  tests     the GPU-only tests first (``-m gpu``: session replay = eager for every backend, the fused kernels, the CUDA
            backend), then the rest of the suite (``-m "not gpu"``) on the time left; one JUnit XML; the run fails if a
            backend that should be there (triton and cuda on a GPU) is not; a test that kills its worker is rerun
            alone under cuda-gdb
  engine    batching across callers (benchmarks/engine.py): 8 concurrent one-sentence requests through bark.Engine vs
            the same 8 one after another, bark-small fp16 (random weights, 128 semantic tokens each): the speed-up, the
            stage seconds, and whether each request got the tokens it gets alone
  kernels   kernel timings vs SDPA's kernels at Bark's shapes (``python -m benchmarks --skip-e2e``)
  check     ``bark-kernels check`` on every device (CPU: ``--interpret``)
  sanitize  compute-sanitizer memcheck (PYTORCH_NO_CUDA_MEMORY_CACHING=1) and racecheck over
            scripts/sanitize_cases.py (Triton, the fused decode kernels and CUDA); CPU: the cases without the sanitizer
  longform  long-form benchmark (benchmarks/longform.py): a ~2,000-character paragraph, batched vs one piece at a
            time (bark-small fp16), and the peak GPU memory with and without offload; last, on what time is left

At most 8 files land in the output folder: summary.md (every failure first, then every figure), steps.json,
junit.xml, decode.json, results.json, results.md (end to end and kernels), sanitize.log and logs.tar.gz (every
step's full log, plots, the environment). A step cut by its deadline is interrupted (SIGINT, so pytest still writes
its JUnit XML), then terminated; the summary says so and the later steps still run with the time that is left.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STEP_NAMES = ["env", "build", "decode", "e2e", "tests", "engine", "kernels", "check", "sanitize", "longform"]
# Share of the GPU budget each step may take at most (and the least it needs to be worth starting), seconds at the
# default 540 s budget; scaled with --budget. Unused time flows to the later steps.
CAPS = {"env": (30, 5), "build": (150, 20), "decode": (150, 15), "e2e": (120, 20), "tests": (210, 20),
        "engine": (60, 20), "kernels": (90, 20), "check": (60, 10), "sanitize": (150, 20), "longform": (90, 30)}
# the engine step on a GPU: 8 concurrent one-sentence requests vs the same 8 one after another, bark-small's shapes in
# fp16 (benchmarks/engine.py); the server's batching without HTTP (issue 20's GPU target: >= 4x at 8 clients)
GPU_ENGINE_ARGS = ["--device", "cuda", "--dtype", "float16", "--layers", "12", "--pairs", "2", "--requests", "8",
                   "--semantic-tokens", "128", "--max-wait", "0.02"]
CPU_ENGINE_ARGS = ["--layers", "1", "--hidden", "64", "--pairs", "1", "--requests", "2", "--semantic-tokens", "8",
                   "--threads", "1"]
# the decode step on a GPU: the modes and cases the headline needs (benchmarks/decode.py)
GPU_DECODE_ARGS = ["--models", "bark-small,bark", "--batches", "1,8",
                   "--modes", "eager,graph,session-graph,session-fused,session-compile"]
CPU_DECODE_ARGS = ["--quick", "--batches", "1", "--modes", "session-eager,session-fused"]
# the GPU-relevant test files, first within the GPU-only phase
GPU_TEST_FILES = ["tests/test_session.py", "tests/test_fused_decode.py", "tests/test_triton_backend.py",
                  "tests/test_cuda_backend.py", "tests/test_kvcache.py", "tests/test_attention.py"]
OVERRIDES: dict[str, float] = {}  # --caps
DEFAULT_BUDGET = 540.0
SUMMARY_RESERVE = 6.0  # seconds kept for the last summary and the tarball
GRACE = 8.0  # seconds between SIGINT and SIGTERM when a step overruns


@dataclass
class StepResult:
    name: str
    status: str = "not run"  # ok | failed | timeout (cut by its deadline) | cut (no time left) | skipped (not selected)
    seconds: float = 0.0
    deadline: float = 0.0
    rc: int | None = None
    command: str = ""
    note: str = ""
    figures: dict = field(default_factory=dict)


class Session:
    def __init__(self, out: Path, budget: float, cpu: bool, python: str):
        self.out = out
        # full logs and artefacts live outside the output folder (only 8 files come back from it) and are packed
        # into logs.tar.gz after every step
        self.work = Path(tempfile.mkdtemp(prefix="first_light_"))
        self.start = time.monotonic()
        self.budget = budget
        self.cpu = cpu
        self.python = python
        self.results: dict[str, StepResult] = {n: StepResult(n) for n in STEP_NAMES}
        self.env_facts: dict = {}
        self.env = dict(os.environ)
        self.env["PYTHONUNBUFFERED"] = "1"
        if cpu:
            self.env["TRITON_INTERPRET"] = "1"
            self.env.setdefault("CUDA_VISIBLE_DEVICES", "")

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.start)

    def cap(self, name: str) -> tuple[float, float]:
        cap, least = CAPS[name]
        if name in OVERRIDES:
            return OVERRIDES[name], min(least, OVERRIDES[name])
        scale = self.budget / DEFAULT_BUDGET
        return cap * scale if self.cpu else max(cap * scale, least), least * min(scale, 1.0)

    # -- running -------------------------------------------------------------------------------------------------------

    def run(self, name: str, argv: list[str], log_name: str, deadline: float, env: dict | None = None,
            cwd: Path = ROOT) -> tuple[int | None, bool, str]:
        """Run argv with output to work/log_name; returns (rc, timed_out, output)."""
        log = self.work / log_name
        t_end = time.monotonic() + deadline
        with open(log, "ab") as fh:
            fh.write(f"$ {' '.join(argv)}\n".encode())
            fh.flush()
            proc = subprocess.Popen(argv, cwd=cwd, env=env or self.env, stdout=fh, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            timed_out = False
            while proc.poll() is None:
                if time.monotonic() > t_end:
                    timed_out = True
                    _stop(proc)
                    break
                time.sleep(0.2)
            rc = proc.wait()
            fh.write(f"\n[exit {rc}{', cut by its deadline' if timed_out else ''}]\n".encode())
        return rc, timed_out, log.read_text(errors="replace")

    # -- reporting -----------------------------------------------------------------------------------------------------

    def write(self) -> None:
        """summary.md, steps.json and logs.tar.gz, rewritten after every step."""
        steps = {n: asdict(r) for n, r in self.results.items()}
        (self.out / "steps.json").write_text(json.dumps({"environment": self.env_facts, "steps": steps,
                                                         "budget_seconds": self.budget, "cpu_rehearsal": self.cpu,
                                                         "elapsed_seconds": time.monotonic() - self.start},
                                                        indent=1, default=str) + "\n")
        (self.out / "summary.md").write_text(summary_markdown(self))
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            for path in sorted(self.work.rglob("*")):
                if path.is_file() and path.stat().st_size < 8 << 20:
                    tar.add(path, arcname=str(path.relative_to(self.work)))
        (self.out / "logs.tar.gz").write_bytes(buf.getvalue())


def _stop(proc: subprocess.Popen) -> None:
    """SIGINT the step's process group (pytest then writes JUnit XML), then SIGTERM, then SIGKILL."""
    for sig, wait in ((signal.SIGINT, GRACE), (signal.SIGTERM, 3.0), (signal.SIGKILL, 2.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


# ----------------------------------------------------------------------------------------------------------------------
# steps

ENV_SNIPPET = r"""
import json, os, platform, shutil, subprocess, sys, time
facts = {"python": sys.version.split()[0], "platform": platform.platform(), "cpu_count": os.cpu_count()}
def ver(name):
    try:
        module = __import__(name)
    except Exception as exc:
        return f"not importable ({type(exc).__name__})"
    return getattr(module, "__version__", "importable (no __version__)")
for name in ("torch", "triton", "transformers", "numpy", "xdist", "pytest_timeout", "matplotlib"):
    facts[name] = ver(name)
def sh(*argv):
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception as exc:
        return f"not available ({type(exc).__name__})"
facts["git"] = os.environ.get("FIRST_LIGHT_GIT") or sh("git", "rev-parse", "--short", "HEAD") or "unknown"
facts["git_dirty_files"] = len([l for l in sh("git", "status", "--porcelain", "--untracked-files=no").splitlines() if l])
facts["nvcc"] = sh("nvcc", "--version").splitlines()[-1:] if shutil.which("nvcc") else "not found"
facts["compute_sanitizer"] = shutil.which("compute-sanitizer") or "not found"
facts["ncu"] = shutil.which("ncu") or "not found"
import torch
facts["torch_cuda"] = torch.version.cuda
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    facts["gpu"] = torch.cuda.get_device_name(0)
    facts["capability"] = f"{p.major}.{p.minor}"
    facts["sm_count"] = p.multi_processor_count
    facts["gpu_memory_gib"] = round(p.total_memory / 2**30, 1)
    facts["l2_mib"] = round(getattr(p, "L2_cache_size", 0) / 2**20, 1)
    facts["nvidia_smi"] = sh("nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.mem,clocks.max.sm,"
                             "power.draw,temperature.gpu,utilization.gpu", "--format=csv,noheader")
    dev = torch.device("cuda")
    def timed(fn, reps):
        fn(); torch.cuda.synchronize()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(reps):
            s.record(); fn(); e.record(); torch.cuda.synchronize(); times.append(s.elapsed_time(e))
        times.sort(); return times[len(times) // 2] * 1e-3
    n = (1 << 30) // 4
    src = torch.randn(n, device=dev); dst = torch.empty_like(src)
    t = timed(lambda: dst.copy_(src), 10)
    facts["copy_gbps"] = round(2 * n * 4 / t / 1e9, 1)
    del src, dst
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16); b = torch.randn_like(a)
    t = timed(lambda: a @ b, 10)
    facts["bf16_matmul_tflops"] = round(2 * 8192**3 / t / 1e12, 1)
else:
    facts["gpu"] = "none (CPU rehearsal)"
    n = (64 << 20) // 4
    src = torch.randn(n); dst = torch.empty_like(src)
    t0 = time.perf_counter()
    for _ in range(5): dst.copy_(src)
    facts["copy_gbps"] = round(5 * 2 * n * 4 / (time.perf_counter() - t0) / 1e9, 1)
print(json.dumps(facts))
"""


def step_env(s: Session, deadline: float) -> StepResult:
    r = s.results["env"]
    r.command = f"{s.python} -c <facts and ceilings>"
    rc, timed_out, out = s.run("env", [s.python, "-c", ENV_SNIPPET], "env.log", deadline)
    r.rc = rc
    line = next((ln for ln in reversed(out.splitlines()) if ln.startswith("{")), None)
    if line:
        s.env_facts = json.loads(line)
        (s.work / "env.json").write_text(json.dumps(s.env_facts, indent=1) + "\n")
        r.figures = {k: s.env_facts.get(k) for k in ("gpu", "copy_gbps", "bf16_matmul_tflops", "torch", "triton")}
    r.status = "timeout" if timed_out else ("ok" if rc == 0 and line else "failed")
    if r.status != "ok":
        r.note = _tail(out)
    return r


BUILD_PROBE = ("import bark_kernels, bark_kernels._C as C; from bark_kernels import registry; "
               "print('_C', C.__file__); print('cuda backend:', registry.availability('cuda') or 'available')")


def _prebuilt_c() -> list[Path]:
    return sorted((ROOT / "bark_kernels").glob("_C*.so"))


def step_build(s: Session, deadline: float) -> StepResult:
    r = s.results["build"]
    env = dict(s.env)
    prebuilt = _prebuilt_c()
    if prebuilt and not s.cpu:  # built ahead for this exact stack: use it when it loads and registers its ops
        r.command = f"{s.python} -c <import bark_kernels._C> (prebuilt {prebuilt[0].name})"
        rc, timed_out, out = s.run("build", [s.python, "-c", BUILD_PROBE], "build.log", min(60.0, deadline))
        if rc == 0 and "cuda backend: available" in out:
            r.rc, r.status = rc, "ok"
            r.figures["build_seconds"] = 0.0
            r.note = f"build skipped: the prebuilt {prebuilt[0].name} loads\n" + _tail(out, 4)
            return r
        r.figures["prebuilt_rejected"] = _tail(out, 4)  # then build it here
    if s.cpu:
        wheel_dir = s.work / "wheel"
        argv = [s.python, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                "-w", str(wheel_dir), "."]
        env["BARK_KERNELS_SKIP_CUDA_BUILD"] = "1"
    else:
        argv = [s.python, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-v", "-e", "."]
        env["BARK_KERNELS_CUDA_ARCHS"] = "90"
        env["MAX_JOBS"] = str(min(16, os.cpu_count() or 4))
    r.command = " ".join(argv)
    t0 = time.monotonic()
    rc, timed_out, out = s.run("build", argv, "build.log", deadline, env=env)
    r.rc = rc
    r.figures["build_seconds"] = round(time.monotonic() - t0, 1)
    if timed_out or rc != 0:
        r.status = "timeout" if timed_out else "failed"
        r.note = _tail(out, 25)
        return r
    # prove what was built: the extension imports and registers its ops (GPU); the wheel exists (CPU)
    if s.cpu:
        wheels = list((s.work / "wheel").glob("bark_kernels-*.whl"))
        r.status = "ok" if wheels else "failed"
        r.note = f"wheel: {wheels[0].name}" if wheels else "pip wheel produced no bark_kernels wheel"
        shutil.rmtree(s.work / "wheel", ignore_errors=True)
        return r
    left = max(5.0, deadline - (time.monotonic() - t0))
    rc2, timed_out2, out2 = s.run("build", [s.python, "-c", BUILD_PROBE], "build.log", left)
    ok = rc2 == 0 and "cuda backend: available" in out2
    r.status = "ok" if ok else "failed"
    r.note = _tail(out2, 6)
    return r


def step_check(s: Session, deadline: float) -> StepResult:
    r = s.results["check"]
    argv = [s.python, "-m", "bark_kernels.cli", "check"] + (["--interpret"] if s.cpu else [])
    r.command = " ".join(argv)
    rc, timed_out, out = s.run("check", argv, "check.log", deadline)
    r.rc = rc
    rows = [ln.strip() for ln in out.splitlines() if re.match(r"\s+(cpu|cuda)\s+\S+\s+(float|bfloat)", ln)]
    r.figures = {"rows_ok": sum(1 for x in rows if " ok " in f" {x} "),
                 "rows_failed": sum(1 for x in rows if "FAILED" in x),
                 "rows_skipped": sum(1 for x in rows if " skip:" in x)}
    r.status = "timeout" if timed_out else ("ok" if rc == 0 and "check passed" in out else "failed")
    failed_lines = [ln for ln in out.splitlines() if "FAIL" in ln]
    r.note = "\n".join(failed_lines[:20]) if failed_lines else (_tail(out, 10) if r.status != "ok" else "")
    (s.work / "check.txt").write_text(out)
    return r


def _has_module(python: str, module: str, env: dict) -> bool:
    return subprocess.run([python, "-c", f"import {module}"], env=env, capture_output=True).returncode == 0


def step_tests(s: Session, deadline: float, selection: list[str] | None) -> StepResult:
    r = s.results["tests"]
    junit = s.out / "junit.xml"
    # the backends that must be there: a GPU run whose cuda backend silently vanished must not pass
    expect = ["eager", "sdpa"] + (["triton"] if not s.cpu else []) + ([] if s.cpu else ["cuda"])
    probe = ("from bark_kernels import registry; import sys; missing = {n: registry.availability(n) for n in "
             f"{expect!r} if registry.availability(n) is not None}}; print('missing backends:', missing); "
             "sys.exit(1 if missing else 0)")
    rc0, _, out0 = s.run("tests", [s.python, "-c", probe], "tests.log", min(30.0, deadline))
    base = [s.python, "-m", "pytest", "-v", "-rs", "-p", "no:cacheprovider", "-o", "junit_family=xunit1"]
    if _has_module(s.python, "xdist", s.env):
        workers = 2 if s.cpu else min(12, max(2, (os.cpu_count() or 4) - 2))
        base += ["-n", str(workers)]
    if _has_module(s.python, "pytest_timeout", s.env):
        base += ["--timeout", "150"]
    files = selection if selection else GPU_TEST_FILES + ["tests"]  # pytest drops the duplicates
    rest = selection if selection else ["tests"]
    phases = [("gpu", ["-m", "gpu"] + files), ("rest", ["-m", "not gpu"] + rest)]
    t_end = time.monotonic() + max(5.0, deadline - 2)
    spent = time.monotonic()
    parts, commands, rc, timed_out, out = [], [], 0, False, ""
    for phase, args in phases:
        left = t_end - time.monotonic()
        if left < 5:
            timed_out = True
            break
        xml = s.work / f"junit-{phase}.xml"
        argv = base + [f"--junitxml={xml}"] + args
        commands.append(" ".join(argv))
        rc_p, to_p, out_p = s.run("tests", argv, "tests.log", left)
        out += out_p
        parts.append(xml)
        rc = rc if rc_p == 5 else max(rc, rc_p or 0) if rc_p is not None else 1  # 5: the phase selected nothing
        timed_out = timed_out or to_p
        r.figures[f"{phase}_phase"] = {k: v for k, v in junit_counts(xml).items() if k != "failed_names"}
        if to_p:
            break
    _merge_junit(parts, junit)
    r.command = " && ".join(commands)
    r.rc = rc
    r.figures.update(junit_counts(junit))
    r.figures["pytest_seconds"] = round(time.monotonic() - spent, 1)
    failed = r.figures.pop("failed_names", [])
    notes = []
    if rc0 != 0:
        notes.append(next((ln for ln in out0.splitlines() if ln.startswith("missing backends")), _tail(out0, 3)))
    if failed:
        notes.append("failed: " + "; ".join(failed[:40]))
    if not junit.exists():
        notes.append("no JUnit XML was written\n" + _tail(out, 15))
    if timed_out:
        r.status = "timeout"
    elif rc == 0 and rc0 == 0 and junit.exists():
        r.status = "ok"
    else:
        r.status = "failed"
    crashed = [n for n in failed if "crashed" in n]
    if crashed and not s.cpu:
        notes.append(_diagnose_crash(s, crashed[0]))
    r.note = "\n".join(notes)
    return r


def _merge_junit(parts: list[Path], out: Path) -> None:
    """One JUnit XML from the phases' files (their test suites side by side); nothing when no phase wrote one."""
    root = ET.Element("testsuites", name="pytest tests")
    for path in parts:
        if not path.exists():
            continue
        try:
            tree = ET.parse(path).getroot()
        except ET.ParseError:
            continue
        for suite in ([tree] if tree.tag == "testsuite" else list(tree.iter("testsuite"))):
            root.append(suite)
    if len(root):
        ET.ElementTree(root).write(out, encoding="utf-8", xml_declaration=True)


def _diagnose_crash(s: Session, failed_name: str) -> str:
    """A test that killed its worker: run it alone under cuda-gdb (batch mode) for the native backtrace."""
    gdb = shutil.which("cuda-gdb")
    m = re.search(r"crashed while running '([^']+)'", failed_name)
    if gdb is None or m is None:
        return "crash: no cuda-gdb or no test id to rerun"
    node = m.group(1)
    argv = [gdb, "-batch", "-ex", "set pagination off", "-ex", "run", "-ex", "bt 25", "--args", s.python, "-m",
            "pytest", "-x", "-q", "-p", "no:cacheprovider", node]
    rc, timed_out, out = s.run("tests", argv, "crash-gdb.log", 90.0)
    frames = [ln for ln in out.splitlines() if ln.startswith("#") or "SIG" in ln]
    return f"crash rerun under cuda-gdb ({node}, exit {rc}{', deadline' if timed_out else ''}):\n" + \
        "\n".join(frames[:30])


def junit_counts(path: Path) -> dict:
    """Totals from a JUnit XML file: tests, failures, errors, skipped, passed, and the failing test names."""
    if not path.exists():
        return {}
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        return {"junit_error": str(exc)}
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    names = []
    for case in root.iter("testcase"):
        counts["tests"] += 1
        kinds = {child.tag for child in case}
        label = f"{case.get('classname', '')}::{case.get('name', '')}"
        if "failure" in kinds:
            counts["failures"] += 1
            msg = next(c.get("message", "") for c in case if c.tag == "failure")
            names.append(f"{label} ({msg[:160]})")
        elif "error" in kinds:
            counts["errors"] += 1
            msg = next(c.get("message", "") for c in case if c.tag == "error")
            names.append(f"{label} [error] ({msg[:160]})")
        elif "skipped" in kinds:
            counts["skipped"] += 1
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["failed_names"] = names
    return counts


def step_decode(s: Session, deadline: float) -> StepResult:
    r = s.results["decode"]
    internal = max(5.0, deadline - 15)
    argv = [s.python, "-m", "benchmarks.decode", "--out", str(s.out), "--budget", f"{internal:.0f}"]
    argv += CPU_DECODE_ARGS if s.cpu else GPU_DECODE_ARGS
    r.command = " ".join(argv)
    rc, timed_out, out = s.run("decode", argv, "decode.log", deadline)
    r.rc = rc
    path = s.out / "decode.json"
    if path.exists():
        payload = json.loads(path.read_text())
        r.figures["records"] = [{k: rec.get(k) for k in ("model", "batch", "mode", "dtype", "status", "us_per_step",
                                                         "min_us", "floor_us", "x_floor", "achieved_gbps",
                                                         "tokens_per_s", "tokens_equal_first_mode", "reason")}
                                for rec in payload.get("records", [])]
        r.figures["copy_gbps"] = payload.get("copy_bandwidth_gbps")
        r.figures["skipped"] = payload.get("skipped", [])
    bad = [x for x in r.figures.get("records", []) if x["status"] != "ok" or not x["tokens_equal_first_mode"]]
    r.status = "timeout" if timed_out else ("ok" if rc == 0 and path.exists() and not bad else "failed")
    if r.status != "ok":
        r.note = _tail(out, 12)
    return r


def _bench_run(s: Session, name: str, deadline: float, skip: str) -> tuple[int | None, bool, str, dict]:
    """``python -m benchmarks`` with ``skip`` ("--skip-kernels" or "--skip-e2e") into work/NAME; its payload."""
    bench_dir = s.work / name
    internal = max(5.0, deadline - 20)
    argv = [s.python, "-m", "benchmarks", "--out", str(bench_dir), "--budget", f"{internal:.0f}",
            "--mode", "cpu" if s.cpu else "gpu", skip] + (["--quick", "--threads", "1"] if s.cpu else [])
    s.results[name].command = " ".join(argv)
    rc, timed_out, out = s.run(name, argv, f"{name}.log", deadline)
    path = bench_dir / "results.json"
    payload = json.loads(path.read_text()) if path.exists() else {}
    _write_results(s)
    return rc, timed_out, out, payload


def _write_results(s: Session) -> None:
    """results.json / results.md of the output folder: the kernels' payload with the end-to-end runs in it, and the
    two steps' tables one after the other (whichever of the two has run)."""
    payloads, tables = {}, []
    for name in ("e2e", "kernels"):
        d = s.work / name
        if (d / "results.json").exists():
            payloads[name] = json.loads((d / "results.json").read_text())
        if (d / "results.md").exists():
            tables.append((d / "results.md").read_text())
    if not payloads:
        return
    merged = dict(payloads.get("kernels") or payloads["e2e"])
    if "e2e" in payloads:
        merged["e2e"] = payloads["e2e"].get("e2e", {})
    (s.out / "results.json").write_text(json.dumps(merged, indent=1, default=str) + "\n")
    (s.out / "results.md").write_text("\n\n".join(tables))


def step_e2e(s: Session, deadline: float) -> StepResult:
    r = s.results["e2e"]
    rc, timed_out, out, payload = _bench_run(s, "e2e", deadline, "--skip-kernels")
    r.rc = rc
    e2e = payload.get("e2e", {})
    r.figures["e2e_status"] = e2e.get("status")
    r.figures["e2e"] = [_e2e_digest(run) for run in e2e.get("runs", [])]
    bad = [x for x in r.figures["e2e"] if x["status"] not in ("ok", "skipped")]
    r.status = "timeout" if timed_out else ("ok" if rc == 0 and payload and not bad else "failed")
    if r.status != "ok":
        r.note = "".join(f"{x['model']} {x['impl']} b{x['batch']}: {x['reason']}\n" for x in bad[:8]) + _tail(out, 12)
    return r


def step_kernels(s: Session, deadline: float) -> StepResult:
    r = s.results["kernels"]
    rc, timed_out, out, payload = _bench_run(s, "kernels", deadline, "--skip-e2e")
    r.rc = rc
    kernels = payload.get("kernels", [])
    r.figures["kernel_records"] = {st: sum(1 for k in kernels if k.get("status") == st)
                                   for st in ("ok", "failed", "skipped")}
    failures = [f"{k['case']} / {k['provider']}: {k.get('reason', '')[:160]}" for k in kernels
                if k.get("status") == "failed"]
    r.figures["kernel_failures"] = failures
    r.figures["kernels"] = _kernel_digest(kernels)
    if payload.get("partial"):
        r.figures["partial"] = payload["partial"]
    r.status = "timeout" if timed_out else ("ok" if rc == 0 and payload and not failures else "failed")
    if r.status != "ok":
        r.note = ("\n".join(failures[:15]) + "\n" if failures else "") + _tail(out, 12)
    return r


def _kernel_digest(kernels: list[dict]) -> list[dict]:
    rows = []
    for k in kernels:
        if k.get("status") != "ok":
            continue
        figs = k.get("figures", {})
        rows.append({"section": k.get("section"), "case": k.get("case"), "provider": k.get("provider"),
                     "median_ms": figs.get("median", {}).get("value"),
                     "tflops": figs.get("throughput", {}).get("value"),
                     "gbps": figs.get("bandwidth", {}).get("value"),
                     "speedup": figs.get("speedup_vs_reference", {}).get("value")})
    return rows


def _e2e_digest(run: dict) -> dict:
    p, figs = run.get("params", {}), run.get("figures", {})

    def val(name):
        return figs.get(name, {}).get("value")

    return {"model": p.get("model"), "impl": run.get("provider"), "batch": p.get("batch"), "dtype": p.get("dtype"),
            "attn": p.get("attn_implementation"), "status": run.get("status"), "reason": run.get("reason"),
            "total_s": val("total_s"), "s_per_10s_audio": val("seconds_per_10s_audio"),
            "speedup": val("speedup_vs_transformers"), "same_tokens": val("same_semantic_tokens_as_transformers")}


def step_sanitize(s: Session, deadline: float) -> StepResult:
    r = s.results["sanitize"]
    log = s.out / "sanitize.log"
    cases = [s.python, "scripts/sanitize_cases.py"] + (["--interpret"] if s.cpu else [])
    r.command = " ".join(cases) + " (plain, then under memcheck and racecheck)"
    t_end = time.monotonic() + deadline
    # 1. plain run: correctness of every case, and it compiles every Triton variant for the sanitized runs
    rc, timed_out, out = s.run("sanitize", cases, "sanitize.log", max(5.0, t_end - time.monotonic()))
    r.figures["cases_plain"] = _last_line(out, "sanitize_cases:")
    ok = rc == 0 and not timed_out
    notes = [] if ok else ["plain run: " + _tail(out, 8)]
    sanitizer = shutil.which("compute-sanitizer") or next(iter(sorted(Path("/usr/local").glob(
        "cuda*/bin/compute-sanitizer"))), None)
    if s.cpu or sanitizer is None:
        r.figures["sanitizer"] = "not run: " + ("CPU rehearsal" if s.cpu else "compute-sanitizer not found")
        if not s.cpu:
            ok = False
            notes.append("compute-sanitizer not found")
    else:
        env = dict(s.env)
        env["PYTORCH_NO_CUDA_MEMORY_CACHING"] = "1"  # overruns inside PyTorch's cached blocks are otherwise unseen
        env["TORCHINDUCTOR_COMPILE_THREADS"] = "1"
        for tool, share in (("memcheck", 0.55), ("racecheck", 1.0)):
            left = t_end - time.monotonic()
            if left < 10:
                r.figures[tool] = "not run: deadline"
                ok = False
                notes.append(f"{tool}: cut by the deadline before it started")
                continue
            argv = [str(sanitizer), "--tool", tool, "--error-exitcode", "17", "--print-limit", "50"]
            if tool == "memcheck":
                argv += ["--leak-check", "no"]
            argv += cases
            rc_t, to_t, out_t = s.run("sanitize", argv, "sanitize.log", left * share)
            summary = _last_line(out_t, "ERROR SUMMARY") or "no ERROR SUMMARY line"
            r.figures[tool] = ("cut by the deadline; " if to_t else "") + summary + \
                f"; cases: {_last_line(out_t, 'sanitize_cases:')}"
            if rc_t != 0 or to_t:
                ok = False
                notes.append(f"{tool}: exit {rc_t}{' (deadline)' if to_t else ''}; {summary}")
    shutil.copy(s.work / "sanitize.log", log)
    r.status = "ok" if ok else ("timeout" if time.monotonic() > t_end else "failed")
    r.note = "\n".join(notes)
    return r


def step_longform(s: Session, deadline: float) -> StepResult:
    r = s.results["longform"]
    out_dir = s.work / "longform"
    internal = max(5.0, deadline - 25)  # no new run starts after this; a started one finishes
    argv = [s.python, "-m", "benchmarks.longform", "--out", str(out_dir), "--budget", f"{internal:.0f}",
            "--pairs", "1", "--modes", "sequential,batched"] + (["--quick", "--threads", "1"] if s.cpu else [])
    r.command = " ".join(argv)
    rc, timed_out, out = s.run("longform", argv, "longform.log", deadline)
    r.rc = rc
    path = out_dir / "longform.json"
    if path.exists():
        payload = json.loads(path.read_text())
        r.figures.update({k: v for k, v in payload.items() if k in ("model", "dtype", "pieces", "characters",
                                                                     "batch_size", "cut")
                          or k.startswith("speedup_median")})
        r.figures["pairs"] = payload.get("pairs", [])
        r.figures["runs"] = [{"mode": x["mode"], "wall_s": x["figures"]["wall_s"],
                              "peak_gpu_allocated_gib": x["figures"].get("peak_gpu_allocated_gib")}
                             for x in payload.get("runs", [])]
    same = all(p.get("same_tokens") for p in r.figures.get("pairs", []))
    r.status = "timeout" if timed_out else ("ok" if rc == 0 and path.exists() and same else "failed")
    if r.status != "ok":
        r.note = _tail(out, 12)
    return r


def step_engine(s: Session, deadline: float) -> StepResult:
    r = s.results["engine"]
    out_dir = s.work / "engine"
    argv = [s.python, "-m", "benchmarks.engine", "--out", str(out_dir)] + (CPU_ENGINE_ARGS if s.cpu
                                                                            else GPU_ENGINE_ARGS)
    r.command = " ".join(argv)
    rc, timed_out, out = s.run("engine", argv, "engine.log", deadline)
    r.rc = rc
    path = out_dir / "engine.json"
    if path.exists():  # written after every pair: a run cut short still has its finished pairs
        payload = json.loads(path.read_text())
        r.figures["model"] = payload.get("settings", {}).get("model")
        r.figures["requests"] = payload.get("settings", {}).get("requests")
        r.figures["pairs"] = payload.get("pairs", [])
        speedups = [p["speedup"] for p in r.figures["pairs"]]
        if speedups:
            r.figures["median_speedup"] = round(statistics.median(speedups), 3)
        runs = payload.get("runs", [])
        r.figures["same_tokens"] = all(x.get("same_tokens_as_first_run") for x in runs) if runs else None
        r.figures["runs"] = [{"mode": x["mode"], "pair": x["pair"], "wall_s": x["wall_s"], "batches": x["batches"],
                              "stages_s": x.get("stages_s"), "same_tokens": x.get("same_tokens_as_first_run")}
                             for x in runs]
    measured = bool(r.figures.get("pairs"))
    r.status = "timeout" if timed_out else ("ok" if rc == 0 and measured else "failed")
    if r.status != "ok" or r.figures.get("same_tokens") is False:
        r.note = _tail(out, 12)
    return r


def _last_line(text: str, marker: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if marker in ln]
    return lines[-1] if lines else ""


# ----------------------------------------------------------------------------------------------------------------------
# summary


def summary_markdown(s: Session) -> str:
    f = s.env_facts
    elapsed = time.monotonic() - s.start
    title = "CPU rehearsal of the GPU first-light command" if s.cpu else "GPU first light"
    lines = [f"# {title}", "",
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; git {f.get('git', '?')}"
             f"{' (+' + str(f.get('git_dirty_files')) + ' modified files)' if f.get('git_dirty_files') else ''}; "
             f"{f.get('gpu', '?')}; {f.get('sm_count', '-')} SMs; python {f.get('python', '?')}, torch "
             f"{f.get('torch', '?')} (CUDA {f.get('torch_cuda', '-')}), triton {f.get('triton', '?')}, transformers "
             f"{f.get('transformers', '?')}, numpy {f.get('numpy', '?')}; budget {s.budget:.0f} s, elapsed "
             f"{elapsed:.0f} s.", ""]
    bad = [r for r in s.results.values() if r.status not in ("ok", "skipped")]
    lines.append("## Failures and gaps (first)")
    lines.append("")
    if not bad:
        lines.append("None: every step passed.")
    for r in bad:
        lines.append(f"- **{r.name}: {r.status}**" + (f" (exit {r.rc})" if r.rc not in (None, 0) else ""))
        if r.note:
            lines += ["", "```", r.note.strip()[:4000], "```", ""]
    lines += ["", "## Steps", "", "| step | status | seconds | deadline s | command |", "|---|---|---|---|---|"]
    for r in s.results.values():
        lines.append(f"| {r.name} | {r.status} | {r.seconds:.0f} | {r.deadline:.0f} | `{r.command[:90]}` |")
    lines += ["", "## Figures", ""]
    if f:
        lines.append(f"Ceilings measured here: device copy {f.get('copy_gbps', '—')} GB/s (read + write)"
                     + (f", bf16 matmul 8192³ {f.get('bf16_matmul_tflops')} TFLOP/s" if 'bf16_matmul_tflops' in f
                        else "") + ".")
        if f.get("nvidia_smi"):
            lines.append(f"nvidia-smi: {f['nvidia_smi']}")
        lines.append("")
    b = s.results["build"].figures
    if b:
        lines.append(f"Build: {b.get('build_seconds')} s.")
    c = s.results["check"].figures
    if c:
        lines.append(f"check: {c.get('rows_ok')} backend/dtype rows ok, {c.get('rows_failed')} failed, "
                     f"{c.get('rows_skipped')} skipped.")
    t = s.results["tests"].figures
    if t:
        lines.append(f"Tests: {t.get('passed')} passed, {t.get('failures')} failed, {t.get('errors')} errors, "
                     f"{t.get('skipped')} skipped of {t.get('tests')} ({t.get('pytest_seconds')} s; GPU-only phase "
                     f"first: {t.get('gpu_phase', {}).get('passed', '—')} passed, then the rest: "
                     f"{t.get('rest_phase', {}).get('passed', '—')} passed).")
    if b.get("prebuilt_rejected"):
        lines.append(f"Prebuilt _C rejected (built here instead): {b['prebuilt_rejected']}")
    lines.append("")
    d = s.results["decode"].figures
    if d.get("records"):
        lines += [f"### Decode step (copy bandwidth {d.get('copy_gbps') or 0:.0f} GB/s; floor = weight + KV bytes "
                  "at the copy bandwidth on a GPU, at the measured weight-read rate on a CPU)", "",
                  "| model | batch | mode | dtype | µs/step | best rep µs | floor µs | x floor | GB/s | tokens/s | "
                  "same tokens |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for x in d["records"]:
            if x["status"] == "ok":
                lines.append(f"| {x['model']} | {x['batch']} | {x['mode']} | {x['dtype']} | {x['us_per_step']:.1f} "
                             f"| {_num(x.get('min_us'), 1)} | {_num(x.get('floor_us'), 1)} | {_num(x.get('x_floor'))} "
                             f"| {_num(x.get('achieved_gbps'), 0)} | {_num(x.get('tokens_per_s'), 0)} | "
                             f"{x['tokens_equal_first_mode']} |")
            else:
                lines.append(f"| {x['model']} | {x['batch']} | {x['mode']} | {x['dtype']} | {x['status']}: "
                             f"{(x.get('reason') or '')[:150]} | | | | | | |")
        for sk in d.get("skipped", []):
            lines.append(f"| {sk['model']} | {sk['batch']} | skipped: {sk['reason'][:150]} | | | | | | | | |")
        lines.append("")
    k = s.results["kernels"].figures
    if k.get("kernels"):
        lines += ["### Kernels (speed-up: reference provider's median / this one's)", "",
                  "| section | case | provider | median ms | TFLOP/s | GB/s | speed-up |", "|---|---|---|---|---|---|---|"]
        for x in k["kernels"]:
            lines.append(f"| {x['section']} | {x['case']} | {x['provider']} | {_num(x['median_ms'], 4)} | "
                         f"{_num(x['tflops'])} | {_num(x['gbps'], 0)} | {_num(x['speedup'])} |")
        lines.append("")
    k = s.results["e2e"].figures
    if k.get("e2e"):
        lines += [f"### End to end ({k.get('e2e_status')})", "",
                  "| model | impl | batch | dtype | attention | status | total s | s per 10 s audio | speed-up vs "
                  "transformers | same semantic tokens |", "|---|---|---|---|---|---|---|---|---|---|"]
        for x in k["e2e"]:
            lines.append(f"| {x['model']} | {x['impl']} | {x['batch']} | {x['dtype']} | {x['attn'] or ''} | "
                         f"{x['status']} {(x.get('reason') or '')[:100]} | {_num(x.get('total_s'), 3)} | "
                         f"{_num(x.get('s_per_10s_audio'), 3)} | {_num(x.get('speedup'))} | "
                         f"{'' if x.get('same_tokens') is None else x['same_tokens']} |")
        lines.append("")
    z = s.results["sanitize"].figures
    if z:
        lines += ["### compute-sanitizer", ""] + [f"- {key}: {val}" for key, val in z.items()] + [""]
    en = s.results["engine"].figures
    if en.get("pairs"):
        lines += [f"### Engine: {en.get('requests')} concurrent requests vs one after another ({en.get('model')})", "",
                  "| pair | mode | wall s | batches | stage seconds | same tokens as alone |",
                  "|---|---|---|---|---|---|"]
        for x in en.get("runs", []):
            stages = ", ".join(f"{k} {v}" for k, v in (x.get("stages_s") or {}).items())
            lines.append(f"| {x['pair']} | {x['mode']} | {_num(x['wall_s'], 3)} | {x['batches']} | {stages} | "
                         f"{x['same_tokens']} |")
        lines.append(f"\nConcurrent {_num(en.get('median_speedup'))}x sooner (median over {len(en['pairs'])} pairs; "
                     "issue 20's GPU target: >= 4x).")
        lines.append("")
    lf = s.results["longform"].figures
    if lf.get("runs"):
        lines += [f"### Long-form ({lf.get('characters')} characters, {lf.get('pieces')} pieces, {lf.get('model')} "
                  f"{lf.get('dtype')}, batch size {lf.get('batch_size')})", "",
                  "| mode | wall s | peak GPU GiB |", "|---|---|---|"]
        for x in lf["runs"]:
            lines.append(f"| {x['mode']} | {_num(x['wall_s'], 1)} | {_num(x['peak_gpu_allocated_gib'])} |")
        for p in lf.get("pairs", []):
            lines.append(f"\n{p.get('mode')} {_num(p.get('speedup'))}x faster than one piece at a time (RTF "
                         f"{_num(p.get('rtf_sequential'), 3)} -> {_num(p.get('rtf_batched'), 3)}); same tokens: "
                         f"{p.get('same_tokens')}")
        lines.append("")
    lines += ["Files: summary.md (this), steps.json, junit.xml, decode.json, results.json, results.md, sanitize.log, "
              "logs.tar.gz (every step's full log, env.json, bench plots).", ""]
    return "\n".join(lines)


def short_report(s: Session) -> str:
    """What the terminal shows at the end (the GPU tool returns only the output's tail): steps and failures."""
    lines = ["", "first light: " + ("CPU rehearsal" if s.cpu else s.env_facts.get("gpu", "?"))
             + f", {time.monotonic() - s.start:.0f} s of {s.budget:.0f}"]
    for r in s.results.values():
        figs = {k: v for k, v in r.figures.items() if isinstance(v, (int, float, str)) and k != "partial"}
        lines.append(f"  {r.name:<9} {r.status:<8} {r.seconds:6.0f} s  {json.dumps(figs)[:200]}")
    for r in s.results.values():
        if r.status not in ("ok", "skipped") and r.note:
            lines += [f"--- {r.name}: {r.status}", r.note[:1500]]
    d = s.results["decode"].figures.get("records") or []
    for x in d:
        if x["status"] == "ok":
            lines.append(f"  decode {x['model']} B={x['batch']} {x['mode']}: {x['us_per_step']:.1f} us/step, "
                         f"x floor {_num(x.get('x_floor'))}, same tokens {x['tokens_equal_first_mode']}")
    lines.append(f"full summary: {s.out / 'summary.md'}")
    return "\n".join(lines)


def _num(x, digits: int = 2) -> str:
    if x is None:
        return "—"
    try:
        return f"{float(x):.{digits}f}"
    except (TypeError, ValueError):
        return str(x)


# ----------------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="first_light.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT"), help="output folder (default: $OUT)")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET, help="global wall-clock budget in seconds")
    parser.add_argument("--cpu", action="store_true", help="CPU rehearsal: tiny sizes, TRITON_INTERPRET=1")
    parser.add_argument("--steps", default=",".join(STEP_NAMES), help=f"comma-separated subset of {STEP_NAMES}")
    parser.add_argument("--tests", default=None, help="space-separated pytest selection (default: the whole suite; "
                                                      "CPU rehearsal: a small named one)")
    parser.add_argument("--caps", default="", help="per-step deadlines in seconds overriding the defaults, e.g. "
                                                   "'tests=120,kernels=60' (still bounded by the global budget)")
    parser.add_argument("--python", default=sys.executable, help="the interpreter that runs every step")
    args = parser.parse_args(argv)
    if not args.out:
        parser.error("--out: no output folder given and $OUT is unset")
    steps = [x for x in args.steps.split(",") if x]
    unknown = [x for x in steps if x not in STEP_NAMES]
    if unknown:
        parser.error(f"--steps: unknown {unknown}; known: {STEP_NAMES}")
    if args.budget <= SUMMARY_RESERVE:
        parser.error(f"--budget: expected seconds > {SUMMARY_RESERVE}, got {args.budget}")
    for item in [x for x in args.caps.split(",") if x]:
        name, _, value = item.partition("=")
        if name not in STEP_NAMES:
            parser.error(f"--caps: unknown step {name!r}; known: {STEP_NAMES}")
        try:
            seconds = float(value)
        except ValueError:
            parser.error(f"--caps: expected STEP=SECONDS, got {item!r}")
        if seconds <= 0:
            parser.error(f"--caps: expected seconds > 0 for {name}, got {value}")
        OVERRIDES[name] = seconds
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    s = Session(out, args.budget, args.cpu, args.python)
    if not args.cpu and not _has_module(s.python, "torch", s.env):
        print("first_light: torch is not importable by", s.python, file=sys.stderr)
    selection = args.tests.split() if args.tests else (
        ["tests/test_padding.py", "tests/test_kvcache.py", "-k", "not slow and (round_trip or decode)"]
        if args.cpu else None)
    runners = {"env": step_env, "build": step_build, "check": step_check,
               "tests": lambda s_, d: step_tests(s_, d, selection), "decode": step_decode, "e2e": step_e2e,
               "kernels": step_kernels, "sanitize": step_sanitize, "longform": step_longform, "engine": step_engine}
    for name in STEP_NAMES:
        r = s.results[name]
        if name not in steps:
            r.status, r.note = "skipped", "not selected (--steps)"
            continue
        cap, least = s.cap(name)
        deadline = min(cap, s.left() - SUMMARY_RESERVE)
        r.deadline = deadline
        if deadline < least:
            r.status, r.note = "cut", f"global budget: {s.left():.0f} s left, this step needs >= {least:.0f} s"
            print(f"[first_light] {name}: cut ({r.note})", flush=True)
            s.write()
            continue
        print(f"[first_light] {name}: start, deadline {deadline:.0f} s, {s.left():.0f} s left", flush=True)
        t0 = time.monotonic()
        try:
            runners[name](s, deadline)
        except Exception as exc:  # the orchestrator itself must never lose the summary
            r.status, r.note = "failed", f"orchestrator error: {type(exc).__name__}: {exc}"
        r.seconds = time.monotonic() - t0
        print(f"[first_light] {name}: {r.status} in {r.seconds:.0f} s", flush=True)
        s.write()
    s.write()
    shutil.rmtree(s.work, ignore_errors=True)
    print(short_report(s))
    selected = [s.results[n] for n in STEP_NAMES if n in steps]
    return 0 if all(r.status == "ok" for r in selected) else 1


if __name__ == "__main__":
    sys.exit(main())
