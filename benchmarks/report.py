"""Environment capture, results.json, results.md (markdown tables) and PNG plots (matplotlib, Agg backend).

Everything written here is read from the records of the same run; a cell with no measured figure says why.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path

import torch

from .targets import TARGETS

SCHEMA = "bark-kernels-benchmarks/1"


def _version(module: str) -> str:
    try:
        mod = __import__(module)
    except Exception as exc:  # absent or broken: say which
        return f"not importable ({type(exc).__name__})"
    return str(getattr(mod, "__version__", "unknown"))


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> str:
    try:
        root = Path(__file__).resolve().parent.parent
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:
        return ""


def _nvidia_driver() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip()
        return out.splitlines()[0] if out else "unknown (nvidia-smi gave nothing)"
    except Exception as exc:
        return f"unknown ({type(exc).__name__})"


class CpuContention:
    """CPU time used by OTHER processes while this one runs: (busy jiffies of the whole machine from /proc/stat minus
    this process's own CPU time) / wall time = the average number of cores others kept busy. Unlike the load average
    it does not count this run's own threads."""

    def __init__(self):
        self.t0 = time.monotonic()
        self.busy0 = self._busy()
        self.own0 = time.process_time()

    @staticmethod
    def _busy() -> float | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        busy = sum(fields[:8]) - idle  # user nice system idle iowait irq softirq steal
        return busy / os.sysconf("SC_CLK_TCK")

    def others_cores(self) -> float | None:
        busy = self._busy()
        wall = time.monotonic() - self.t0
        if busy is None or self.busy0 is None or wall <= 0:
            return None
        return max(0.0, (busy - self.busy0) - (time.process_time() - self.own0)) / wall


def environment(device: torch.device) -> dict:
    """Device, driver, versions, git commit, threads, load: what is needed to read the figures."""
    env = OrderedDict()
    env["date_utc"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    env["device_type"] = device.type
    env["cpu_model"] = cpu_model()
    env["cpu_count"] = os.cpu_count()
    env["torch_threads"] = torch.get_num_threads()
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["device_name"] = torch.cuda.get_device_name(device)
        env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        env["gpu_capability"] = f"{props.major}.{props.minor}"
        env["gpu_sm_count"] = props.multi_processor_count
        env["driver"] = _nvidia_driver()
        env["cuda_runtime"] = torch.version.cuda
        env["cudnn"] = str(torch.backends.cudnn.version())
        env["matmul_allow_tf32"] = bool(torch.backends.cuda.matmul.allow_tf32)
    else:
        threads = env["torch_threads"]
        env["device_name"] = (f"CPU: {env['cpu_model']} ({env['cpu_count']} cores, {threads} torch "
                              f"thread{'s' if threads != 1 else ''})")
        env["driver"] = "n/a (CPU)"
    env["python"] = sys.version.split()[0]
    env["platform"] = platform.platform()
    env["torch"] = torch.__version__
    env["triton"] = _version("triton")
    env["transformers"] = _version("transformers")
    env["numpy"] = _version("numpy")
    env["bark_kernels"] = _version("bark_kernels")
    env["git_commit"] = _git("rev-parse", "HEAD") or "unknown"
    # uncommitted changes to the code being measured (results directories excluded)
    env["git_dirty"] = bool(_git("status", "--porcelain", "--untracked-files=no", "--", "bark_kernels", "bark",
                                 "benchmarks", "csrc", "setup.py", ":(exclude)benchmarks/results"))
    env["triton_interpret"] = os.environ.get("TRITON_INTERPRET", "")
    try:
        env["loadavg_start"] = list(os.getloadavg())
    except OSError:
        env["loadavg_start"] = None
    return env


def short_device(env: dict) -> str:
    """A short name for directories: 'h100', 'cpu-epyc', ..."""
    if env["device_type"] == "cuda":
        name = env["device_name"].lower()
        for tag in ("h200", "h100", "a100", "l40s", "l4", "a10g", "4090", "3090"):
            if tag in name:
                return tag
        return "".join(c if c.isalnum() else "-" for c in name)[:24].strip("-")
    words = [w for w in env["cpu_model"].lower().replace("(r)", "").replace("(tm)", "").split() if w.isalnum()]
    return "cpu-" + "-".join(words[:2] or ["unknown"])


# ----------------------------------------------------------------------------------------------------------------------
# JSON


def write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=1, default=str) + "\n")


# ----------------------------------------------------------------------------------------------------------------------
# markdown


def _fmt(x: float) -> str:
    if x is None:
        return "—"
    ax = abs(x)
    if ax >= 100:
        return f"{x:.0f}"
    if ax >= 10:
        return f"{x:.1f}"
    if ax >= 1:
        return f"{x:.2f}"
    if ax >= 0.01:
        return f"{x:.3f}"
    return f"{x:.2e}"


def _cell_time(rec: dict) -> str:
    f = rec["figures"]
    return f"{_fmt(f['median']['value'])} ({_fmt(f['p20']['value'])}–{_fmt(f['p80']['value'])})"


def _wrong(rec: dict) -> str:
    c = rec["figures"].get("correct")
    return " **WRONG**" if c is not None and not c["value"] else ""


def _pivot(records: list[dict], cell, providers: list[str]) -> list[str]:
    cases = list(OrderedDict.fromkeys(r["case"] for r in records))
    by = {(r["case"], r["provider"]): r for r in records}
    used = [p for p in providers if any((c, p) in by for c in cases)]
    lines = ["| case | " + " | ".join(used) + " |", "|---|" + "---|" * len(used)]
    for c in cases:
        cells = []
        for p in used:
            r = by.get((c, p))
            if r is None:
                cells.append("")
            elif r["status"] == "ok":
                cells.append(cell(r) + _wrong(r))
            else:
                cells.append(r["status"])
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return lines


def _reasons(records: list[dict]) -> list[str]:
    seen = OrderedDict()
    for r in records:
        if r["status"] != "ok":
            seen.setdefault((r["provider"], r["status"], r.get("reason", "")), 0)
            seen[(r["provider"], r["status"], r.get("reason", ""))] += 1
    if not seen:
        return []
    lines = ["", "Not measured (provider: status, reason, number of cases):", ""]
    for (p, s, why), n in seen.items():
        lines.append(f"- `{p}`: {s} ({n}x): {why}")
    return lines


SECTION_TITLES = OrderedDict([
    ("prefill", "Causal prefill (Sq = Sk)"),
    ("prefill_noncausal", "Non-causal attention (the fine model)"),
    ("decode", "Decode: one query over a KV cache"),
    ("varlen", "Varlen: causal packs of mixed lengths"),
    ("unpad", "unpad_input"),
    ("pad", "pad_input"),
])


def _prefill_triton_vs_flash_fp16(kernels, runs):
    ratios = [r["figures"]["speedup_vs_reference"]["value"] for r in kernels
              if r["section"] == "prefill" and r["provider"] == "bk:triton" and r["params"]["dtype"] == "float16"
              and "speedup_vs_reference" in r["figures"]]
    return (min(ratios) if ratios else None), f"min over {len(ratios)} prefill cases of bk:triton / torch-sdpa:flash"


def _decode_fraction_of_copy(kernels, runs, model):
    frac = [r["figures"]["fraction_of_copy_bandwidth"]["value"] for r in kernels
            if r["section"] == "decode" and r["provider"] == "bk:triton" and r["params"]["batch"] == 64
            and r["params"]["cache_len"] == 1024 and r["params"]["model"] == model
            and "fraction_of_copy_bandwidth" in r["figures"]]
    return (frac[0] if frac else None), "bk:triton achieved GB/s / copy GB/s of this run"


def _e2e_figure(kernels, runs, dtype, key, model="bark-small", batch=1):
    for r in runs:
        p = r["params"]
        if (r["provider"], p["model"], p["dtype"], p["batch"]) == ("ours", model, dtype, batch) and key in r["figures"]:
            return r["figures"][key]["value"], f"ours {dtype} vs transformers, {model} B={batch}, same torch threads"
    return None, f"ours {dtype} vs transformers, {model} B={batch}"


def _e2e_best_vs_transformers_fp32(kernels, runs):
    values = [_e2e_figure(kernels, runs, d, "speedup_vs_transformers_fp32")[0] for d in ("float16", "bfloat16",
                                                                                          "float32")]
    return (max((v for v in values if v is not None), default=None),
            "best of ours fp16/bf16/fp32 total s vs transformers fp32 total s, same batch")


MEASURES = {"prefill_triton_vs_flash_fp16": _prefill_triton_vs_flash_fp16,
            "decode_fraction_of_copy": _decode_fraction_of_copy, "e2e_figure": _e2e_figure,
            "e2e_best_vs_transformers_fp32": _e2e_best_vs_transformers_fp32}


def targets(payload: dict, table: list[dict] | None = None) -> list[dict]:
    """Each goal of benchmarks/targets.py for this run's device, with the figure of this run that measures it (or
    why it is not measured)."""
    kernels = [r for r in payload.get("kernels", []) if r.get("status") == "ok"]
    runs = [r for r in payload.get("e2e", {}).get("runs", []) if r.get("status") == "ok"]
    device = payload["environment"]["device_type"]
    out = []
    for target in TARGETS if table is None else table:
        if target["device"] != device:
            continue
        value, how = MEASURES[target["measure"]](kernels, runs, **target["args"])
        row = {"goal": target["goal"], "threshold": target["threshold"], "how": how, "source": target["source"]}
        if value is None:
            row.update(status="not measured in this run")
        else:
            row.update(value=value, unit=target["unit"], status="met" if value >= target["threshold"] else "not met")
        out.append(row)
    return out


def write_markdown(path: Path, payload: dict) -> None:
    env, cfg = payload["environment"], payload["config"]
    out = [f"# bark-kernels benchmarks: {env['device_name']}", ""]
    out.append(f"- date (UTC): {env['date_utc']}; git {env['git_commit'][:12]}{' (dirty)' if env['git_dirty'] else ''}")
    out.append(f"- torch {env['torch']}, triton {env['triton']}, transformers {env['transformers']}, "
               f"python {env['python']}; driver {env['driver']}")
    out.append(f"- mode: {cfg['mode']}{' (quick)' if cfg['quick'] else ''}; kernel plan: {cfg['kernel_plan']}; "
               f"torch threads {env['torch_threads']}; load average at start {env.get('loadavg_start')}, "
               f"at end {env.get('loadavg_end')}; other processes kept "
               f"{_fmt(env.get('other_processes_cores_avg'))} cores busy on average during the run")
    out.append(f"- wall time of this run: {payload.get('wall_seconds', float('nan')):.0f} s "
               f"(budget {cfg['budget_seconds']:.0f} s)")
    copy = payload.get("copy_bandwidth")
    if copy and copy.get("status") == "ok":
        out.append(f"- device copy bandwidth measured in this run: {_fmt(copy['figures']['bandwidth']['value'])} GB/s "
                   f"(copy of {copy['figures']['bytes']['value'] / 2**21:.0f} MiB, read + write counted)")
    out.append(f"- timing: {payload.get('timing_method', '')}; cells are median ms (p20–p80) or a throughput; "
               f"ratios are the reference provider's median time / this provider's (> 1 is faster). "
               f"**WRONG** marks an output outside the tolerance rule against float64.")
    for note in cfg.get("notes", []):
        out.append(f"- {note}")
    goals = payload.get("targets", [])
    if goals:
        out += ["", "## Targets (benchmarks/targets.py)", "", "| goal | measured | target | status |", "|---|---|---|---|"]
        for g in goals:
            measured = f"{_fmt(g['value'])} {g['unit']}" if "value" in g else "—"
            out.append(f"| {g['goal']} | {measured} | {g['threshold']} | {g['status']} |")
    kernels = payload.get("kernels", [])
    reference = cfg.get("reference_provider", "")
    providers = list(OrderedDict.fromkeys(r["provider"] for r in kernels if r["provider"] != "*"))
    for section, title in SECTION_TITLES.items():
        recs = [r for r in kernels if r["section"] == section]
        if not recs:
            continue
        out += ["", f"## {title}", ""]
        params = next((r["params"] for r in recs if r["params"]), {})
        reference = next((r["reference_provider"] for r in recs if "reference_provider" in r),
                         cfg.get("reference_provider", ""))
        if "flop_convention" in params:
            out += [f"Throughput in TFLOP/s, FLOPs = {params['flop_convention']}; (ratio to `{reference}`).", ""]
            out += _pivot(recs, lambda r: f"{_fmt(r['figures']['throughput']['value'])} "
                                          f"({_fmt(r['figures'].get('speedup_vs_reference', {}).get('value'))}x)",
                          providers)
        elif "bandwidth" in next((r["figures"] for r in recs if r["status"] == "ok"), {}):
            conv = params.get("byte_convention", "")
            out += [f"Achieved GB/s (bytes: {conv}) and % of the copy bandwidth; (ratio to `{reference}`).", ""]

            def bw(r):
                f = r["figures"]
                frac = f.get("fraction_of_copy_bandwidth")
                pct = f" {100 * frac['value']:.0f}%" if frac else ""
                ratio = f.get("speedup_vs_reference")
                return f"{_fmt(f['bandwidth']['value'])}{pct}" + (f" ({_fmt(ratio['value'])}x)" if ratio else "")

            out += _pivot(recs, bw, providers)
        out += ["", "Median ms (p20–p80):", ""]
        out += _pivot(recs, _cell_time, providers)
        out += _reasons(recs)
    e2e = payload.get("e2e", {})
    out += ["", "## End to end: bark.BarkModel (ours) vs transformers BarkModel, same random weights", ""]
    if e2e.get("status") != "ok":
        out.append(f"{e2e.get('status', 'skipped')}: {e2e.get('reason', 'not run')}")
    else:
        out.append(f"Plan: {e2e.get('plan', '')}; torch threads {e2e.get('torch_threads')}. {e2e.get('method', '')}")
        if e2e.get("note"):
            out += ["", f"Note: {e2e['note']}"]
        out.append("")
        out.append("speedup = transformers total s / ours in the same dtype and batch; "
                   "tok/s count all batch rows; s per 10 s audio = total s x 10 / measured audio s per row.")
        out.append("")
        cols = [("semantic tok/s", "semantic_tokens_per_s"), ("coarse tok/s", "coarse_tokens_per_s"),
                ("semantic s", "semantic_s"), ("coarse s", "coarse_s"), ("fine s", "fine_s"), ("codec s", "codec_s"),
                ("total s", "total_s"), ("s per 10 s audio", "seconds_per_10s_audio"),
                ("peak GPU GiB", "peak_gpu_memory"), ("speedup", "speedup_vs_transformers"),
                ("vs transformers fp32", "speedup_vs_transformers_fp32"),
                ("same tokens", "same_semantic_tokens_as_transformers"),
                ("audio max diff", "audio_max_abs_diff_vs_transformers")]
        out.append("| model | dtype | batch | impl | " + " | ".join(c for c, _ in cols) + " |")
        out.append("|---|---|---|---|" + "---|" * len(cols))
        for r in e2e.get("runs", []):
            f = r["figures"]
            attn = r["params"].get("attn_implementation", "")
            impl = f"{r['provider']} ({attn.split(' (')[0]})" if r["provider"] == "ours" and attn else r["provider"]
            head = f"| {r['params'].get('model')} | {r['params'].get('dtype')} | {r['params'].get('batch')} | " \
                   f"{impl} |"
            if r["status"] != "ok":
                out.append(head + f" {r['status']}: {r.get('reason', '')} |" + "|" * (len(cols) - 1))
                continue

            def g(k, f=f):
                if k not in f:
                    return "—"
                v = f[k]["value"]
                return ("yes" if v else "no") if isinstance(v, bool) else _fmt(v)

            out.append(head + " " + " | ".join(g(k) for _, k in cols) + " |")
    plots = payload.get("plots", [])
    if plots:
        out += ["", "## Plots", ""]
        out += [f"![{p}]({p})" for p in plots]
    path.write_text("\n".join(out) + "\n")


def readme_section(payload: dict, results_dir: str) -> str:
    """A short markdown section for the project README: device, command, the headline figures of this run."""
    env, cfg = payload["environment"], payload["config"]
    mode = cfg["mode"]
    threads = f" --threads {env['torch_threads']}" if mode == "cpu" else ""
    lines = [f"### Benchmarks: {env['device_name']}", "",
             f"Measured {env['date_utc'][:10]} at git {env['git_commit'][:7]} (torch {env['torch']}, transformers "
             f"{env['transformers']}; other processes kept {_fmt(env.get('other_processes_cores_avg'))} of "
             f"{env['cpu_count']} cores busy on average during the run) with:", "",
             "```bash", f"python -m benchmarks --out auto --mode {mode}{threads}", "```", "",
             f"Full tables, JSON and plots: [{results_dir}]({results_dir}/results.md). "
             f"Kernel shapes: {cfg['kernel_plan']}.", ""]
    runs = [r for r in payload.get("e2e", {}).get("runs", []) if r.get("status") == "ok"]
    if runs:
        lines += ["End to end (same random weights, EOS suppressed identically; "
                  f"{payload['e2e'].get('plan', '')}):", "",
                  "| model | dtype | batch | implementation | semantic tok/s | coarse tok/s | fine s | codec s | "
                  "total s | s per 10 s audio | speedup |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in runs:
            f, p = r["figures"], r["params"]

            def g(k, f=f):
                return _fmt(f[k]["value"]) if k in f else "—"

            attn = p.get("attn_implementation", "")
            impl = f"{r['provider']} ({attn.split(' (')[0]})" if r["provider"] == "ours" else r["provider"]
            lines.append(f"| {p['model']} | {p['dtype']} | {p['batch']} | {impl} | {g('semantic_tokens_per_s')} | "
                         f"{g('coarse_tokens_per_s')} | {g('fine_s')} | {g('codec_s')} | {g('total_s')} | "
                         f"{g('seconds_per_10s_audio')} | {g('speedup_vs_transformers')} |")
        lines.append("")
    kernels = [r for r in payload.get("kernels", []) if r.get("status") == "ok"]
    pick = []
    for section, key in (("prefill", "throughput"), ("prefill_noncausal", "throughput"), ("decode", "bandwidth")):
        recs = [r for r in kernels if r["section"] == section]
        if not recs:
            continue
        if section == "decode":
            top = max(recs, key=lambda r: (r["params"]["batch"], r["params"]["cache_len"]))
            case = top["case"]
        else:
            top = max(recs, key=lambda r: (r["params"]["seqlen_q"], r["params"]["batch"]))
            case = top["case"]
        pick.append((section, key, case, [r for r in recs if r["case"] == case]))
    if pick:
        ref = cfg.get("reference_provider", "")
        lines += [f"Attention kernels (ratio to `{ref}`; prefill TFLOP/s count only the unmasked causal half):", "",
                  "| case | provider | median ms | throughput | vs reference |", "|---|---|---|---|---|"]
        for _section, key, case, recs in pick:
            for r in sorted(recs, key=lambda r: r["figures"]["median"]["value"]):
                f = r["figures"]
                thr = f"{_fmt(f[key]['value'])} {f[key]['unit']}"
                if "fraction_of_copy_bandwidth" in f:
                    thr += f" ({100 * f['fraction_of_copy_bandwidth']['value']:.0f}% of copy)"
                ratio = _fmt(f["speedup_vs_reference"]["value"]) + "x" if "speedup_vs_reference" in f else "—"
                lines.append(f"| {case} | {r['provider']}{_wrong(r)} | {_fmt(f['median']['value'])} | {thr} | "
                             f"{ratio} |")
        lines.append("")
    goals = payload.get("targets", [])
    if goals:
        lines += ["Targets: " + "; ".join(
            f"{g['goal']}: {(_fmt(g['value']) + ' ' + g['unit']) if 'value' in g else 'not measured'} "
            f"({g['status']})" for g in goals) + "."]
    if mode == "cpu":
        lines += ["", "Triton is not timed on CPU (under TRITON_INTERPRET its timings are meaningless)."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------------
# plots


def _grid(plt, panels):
    """One subplot per (model, batch): a row per model, a column per batch. Returns (figure, {panel: axes})."""
    models = list(OrderedDict.fromkeys(m for m, _ in panels))
    batches = sorted({b for _, b in panels})
    fig, axes = plt.subplots(len(models), len(batches), squeeze=False,
                             figsize=(max(6.5, 4.0 * len(batches)), 0.6 + 3.3 * len(models)))
    grid = {}
    for i, m in enumerate(models):
        for j, b in enumerate(batches):
            if (m, b) in panels:
                grid[(m, b)] = axes[i][j]
            else:
                axes[i][j].set_visible(False)
    return fig, grid


def write_plots(out_dir: Path, payload: dict) -> list[str]:
    """PNG plots; returns the file names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    env = payload["environment"]
    kernels = [r for r in payload.get("kernels", []) if r["status"] == "ok"]

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        written.append(name)

    # prefill: TFLOP/s vs seqlen, one panel per (model, batch) of the first dtype measured
    pre = [r for r in kernels if r["section"] == "prefill"]
    if pre:
        dtype = pre[0]["params"]["dtype"]
        panels = list(OrderedDict.fromkeys((r["params"]["model"], r["params"]["batch"]) for r in pre
                                           if r["params"]["dtype"] == dtype))
        fig, grid = _grid(plt, panels)
        for (model, batch), ax in grid.items():
            rs = [r for r in pre if r["params"]["model"] == model and r["params"]["batch"] == batch
                  and r["params"]["dtype"] == dtype]
            for p in OrderedDict.fromkeys(r["provider"] for r in rs):
                pts = sorted((r["params"]["seqlen_q"], r["figures"]["throughput"]["value"]) for r in rs
                             if r["provider"] == p)
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=p)
            ax.set_title(f"{model} B={batch} {dtype}", fontsize=9)
            ax.set_xlabel("seqlen (Sq = Sk)")
            ax.set_ylabel("TFLOP/s (causal: unmasked half)")
            ax.grid(alpha=0.3)
        next(iter(grid.values())).legend(fontsize=7)
        fig.suptitle(f"Causal prefill, head_dim 64 — {env['device_name']}", fontsize=10)
        save(fig, "prefill_tflops.png")

    dec = [r for r in kernels if r["section"] == "decode"]
    if dec:
        panels = list(OrderedDict.fromkeys((r["params"]["model"], r["params"]["batch"]) for r in dec))
        fig, grid = _grid(plt, panels)
        copy = payload.get("copy_bandwidth", {})
        copy_bw = copy.get("figures", {}).get("bandwidth", {}).get("value") if copy.get("status") == "ok" else None
        for (model, batch), ax in grid.items():
            rs = [r for r in dec if r["params"]["model"] == model and r["params"]["batch"] == batch]
            for p in OrderedDict.fromkeys(r["provider"] for r in rs):
                pts = sorted((r["params"]["cache_len"], r["figures"]["bandwidth"]["value"]) for r in rs
                             if r["provider"] == p)
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=p)
            if copy_bw:
                ax.axhline(copy_bw, color="k", ls="--", lw=1, label="copy bandwidth (this run)")
            ax.set_title(f"{model} B={batch} {rs[0]['params']['dtype']}", fontsize=9)
            ax.set_xlabel("cache length")
            ax.set_ylabel("achieved GB/s")
            ax.grid(alpha=0.3)
        next(iter(grid.values())).legend(fontsize=7)
        fig.suptitle(f"Decode (one query) — {env['device_name']}", fontsize=10)
        save(fig, "decode_bandwidth.png")

    e2e = payload.get("e2e", {})
    runs = [r for r in e2e.get("runs", []) if r["status"] == "ok"]
    if runs:
        stages = ("semantic_s", "coarse_s", "fine_s", "codec_s")
        labels = [f"{r['params']['model']} {r['params']['dtype']} B={r['params']['batch']}  {r['provider']}"
                  for r in runs]
        fig, ax = plt.subplots(figsize=(9.0, 1.6 + 0.32 * len(runs)))
        left = [0.0] * len(runs)
        ys = list(range(len(runs)))[::-1]  # first run at the top
        for stage in stages:
            vals = [r["figures"].get(stage, {}).get("value", 0.0) for r in runs]
            ax.barh(ys, vals, left=left, height=0.6, label=stage.replace("_s", ""))
            left = [a + v for a, v in zip(left, vals, strict=True)]
        for y, r, x in zip(ys, runs, left, strict=True):
            ax.text(x, y, f" {r['figures']['total_s']['value']:.2f} s", va="center", fontsize=7)
        ax.set_yticks(ys)
        ax.set_yticklabels(labels, fontsize=7)
        ax.set_xlabel("seconds (stacked per stage)")
        ax.set_xlim(0, max(left) * 1.18 if max(left) > 0 else 1)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        ax.set_title(f"End to end per stage, ours vs transformers — {env['device_name']}", fontsize=9)
        save(fig, "e2e_stages.png")
    return written
