"""The whole suite: environment, copy bandwidth, kernel benchmarks, end-to-end, then results.json/.md and plots.

GPU mode budget: 7.5 minutes of wall time in all (kernels at most 3.5 of them); CPU mode: 4.5 minutes (kernels at most
1.25). Cases that would start after their budget is spent are recorded as skipped with that reason, so a run always
finishes and never reports a figure it did not measure.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch

from . import e2e, kernels, report, timing

logger = logging.getLogger("benchmarks")

BUDGETS = {  # mode -> (total seconds, kernel seconds)
    ("gpu", False): (450.0, 210.0),
    ("gpu", True): (150.0, 60.0),
    ("cpu", False): (270.0, 75.0),
    # quick mode is a smoke test of the whole pipeline: generous budgets so that it always covers every section
    ("cpu", True): (300.0, 150.0),
}


def resolve_mode(mode: str) -> str:
    if mode == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if mode == "gpu" and not torch.cuda.is_available():
        raise SystemExit("--mode gpu: no CUDA device is visible to torch (torch.cuda.is_available() is False)")
    if mode not in ("gpu", "cpu"):
        raise SystemExit(f"--mode: expected gpu, cpu or auto, got {mode!r}")
    return mode


def _progress(items, desc):
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, leave=False, mininterval=2.0)


def run(out_dir: str | Path, mode: str = "auto", quick: bool = False, skip_e2e: bool = False,
        budget_seconds: float | None = None, threads: int | None = None, skip_kernels: bool = False) -> dict:
    """Run the suite and write ``out_dir``/results.json, results.md and the PNG plots; returns the payload.

    ``threads``: torch intra-op threads for the whole run (every provider and both e2e implementations alike);
    default: torch's own default.
    """
    t_start = time.monotonic()
    contention = report.CpuContention()
    mode = resolve_mode(mode)
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads: expected an int >= 1, got {threads!r}")
        torch.set_num_threads(threads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda", torch.cuda.current_device()) if mode == "gpu" else torch.device("cpu")
    total_s, kernel_s = BUDGETS[(mode, quick)]
    if budget_seconds is not None:
        kernel_s = kernel_s * budget_seconds / total_s
        total_s = budget_seconds
    total_budget = kernels.Budget(total_s)
    env = report.environment(device)
    plan = kernels.gpu_plan(quick) if mode == "gpu" else kernels.cpu_plan(quick)
    timer = timing.make_timer(device, quick)
    notes = []
    if mode == "cpu":
        notes.append("CPU mode: shape subsets (labelled in the kernel plan), fp32 only; triton is excluded from CPU "
                     "timings (TRITON_INTERPRET runs kernels as numpy, its timings are meaningless).")
    else:
        notes.append("GPU mode: decode and varlen in fp16; prefill in " + ", ".join(kernels._dt(d) for d in plan.dtypes))
    payload = {
        "schema": report.SCHEMA,
        "environment": env,
        "config": {"mode": mode, "quick": quick, "budget_seconds": total_s, "kernel_budget_seconds": kernel_s,
                   "kernel_plan": plan.label, "reference_provider": kernels.reference_provider(device),
                   "excluded_providers": plan.excluded, "notes": notes},
        "timing_method": _timer_method(device, quick),
    }

    # 1. copy bandwidth (the roof for decode)
    copy_bytes = (1 << 30) if mode == "gpu" else (64 << 20 if quick else 256 << 20)
    try:
        figs = timing.copy_bandwidth(device, timer, copy_bytes)
        payload["copy_bandwidth"] = {"section": "copy", "case": f"copy {copy_bytes >> 20} MiB", "provider": "torch:copy_",
                                     "status": "ok", "params": {"bytes_copied": copy_bytes}, "figures": figs}
    except Exception as exc:
        payload["copy_bandwidth"] = {"section": "copy", "case": "copy", "provider": "torch:copy_", "status": "failed",
                                     "reason": f"{type(exc).__name__}: {exc}", "params": {}, "figures": {}}
    copy_bw = payload["copy_bandwidth"]["figures"].get("bandwidth", {}).get("value")

    # 2. kernels
    kernel_budget = kernels.Budget(min(kernel_s, total_budget.left()))
    t0 = time.monotonic()
    records = [] if skip_kernels else kernels.run_kernels(device, plan, timer, kernel_budget, progress=_progress)
    for rec in records:
        bw = rec["figures"].get("bandwidth")
        if bw is not None and copy_bw and rec["section"] == "decode":
            rec["figures"]["fraction_of_copy_bandwidth"] = {"value": bw["value"] / copy_bw,
                                                            "unit": "fraction of copy GB/s measured in this run"}
    payload["kernels"] = records
    payload["kernel_seconds"] = time.monotonic() - t0
    _write_tables(out, payload, t_start, partial="kernels done, end to end not yet run")

    # 3. end to end
    if skip_e2e:
        payload["e2e"] = {"status": "skipped", "reason": "--skip-e2e given", "runs": []}
    else:
        payload["e2e"] = e2e.run_e2e(
            device, quick, total_budget, progress=_progress,
            on_update=lambda res: _write_tables(out, dict(payload, e2e=res), t_start, partial="end to end running"))

    # 4. files
    try:
        env["loadavg_end"] = list(os.getloadavg())
    except OSError:
        env["loadavg_end"] = None
    others = contention.others_cores()
    env["other_processes_cores_avg"] = others
    cores = os.cpu_count() or 1
    if mode == "cpu" and others is not None and others > 0.1 * cores:
        notes.append(f"WARNING: other processes kept {others:.2f} of {cores} cores busy on average during this run: "
                     "they competed for the CPU, so timings are inflated and noisy (a multi-threaded op stalls "
                     "whenever one of its threads is descheduled; look for medians near multiples of the scheduler "
                     "tick). Compare runs only at similar contention; --threads 1 is less sensitive.")
    payload["targets"] = report.targets(payload)
    # the tables first: a plotting error must not lose a measured figure
    _write_tables(out, payload, t_start, partial=None)
    try:
        payload["plots"] = report.write_plots(out, payload)
    except Exception as exc:  # recorded in the JSON, never fatal
        payload["plots"] = []
        payload["plot_error"] = f"{type(exc).__name__}: {exc}"
        logger.warning("benchmarks: plots not written: %s", payload["plot_error"])
    _write_tables(out, payload, t_start, partial=None)
    try:
        rel = out.resolve().relative_to(Path(__file__).resolve().parent.parent).as_posix()
    except ValueError:
        rel = str(out)
    (out / "README-section.md").write_text(report.readme_section(payload, rel))
    return payload


def _write_tables(out: Path, payload: dict, t_start: float, partial: str | None) -> None:
    """results.json and results.md as they stand; ``partial`` says what is still missing (None: complete)."""
    payload["wall_seconds"] = time.monotonic() - t_start
    if partial:
        payload["partial"] = partial
    else:
        payload.pop("partial", None)
    payload.setdefault("plots", [])
    payload.setdefault("e2e", {"status": "not run yet", "runs": []})
    report.write_json(out / "results.json", payload)
    report.write_markdown(out / "results.md", payload)


def _timer_method(device: torch.device, quick: bool) -> str:
    if device.type == "cuda":
        return ("CUDA events around each call, L2 flushed (256 MiB memset, untimed) before each call; warm-up calls "
                f"(>= {10 if quick else 25} ms) excluded; ~{30 if quick else 60} ms of timed calls per provider "
                f"(5 to 200 calls)")
    return (f"time.perf_counter around each call, CPU caches flushed ({8 if quick else 64} MiB write, untimed) before "
            f"each call; warm-up calls excluded; ~{0.02 if quick else 0.3} s of timed calls per provider "
            f"(at most {10 if quick else 100} calls)")
