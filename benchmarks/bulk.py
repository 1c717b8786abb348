"""Bulk synthesis benchmark: rows/s and audio-s per wall-s of ``bark.bulk.synthesize_table`` with 1 vs 2 workers,
local processes and Ray actors, one torch thread each.

``python -m benchmarks.bulk [--out DIR] [--rows 64] [--engines local,ray] [--tokens 24] [--quick]``
(default DIR: ``benchmarks/results/<date>-cpu-bulk/``)

The model is a small random Bark built here (32 wide, 2 layers, Bark's vocabularies, a letter-level tokenizer: the
checkpoint the tests use, a little wider), so the figures measure the bulk machinery and the engine on a cheap model,
not Bark's arithmetic. The table has ``--rows`` rows of 1 to 3 sentences (texts of different lengths, like a real
table), greedy, ``--tokens`` semantic tokens per piece. Each configuration runs the whole table into a fresh output
directory:

* ``local-1``: ``--engine local --workers 1`` (the command's own process),
* ``local-2``: ``--engine local --workers 2`` (the command's process and one worker process, one queue of rows),
* ``ray-1`` / ``ray-2``: ``--engine ray`` with 1 / 2 actors on one local Ray cluster (``num_cpus=2``, started once
  after the local runs and before the Ray runs, as a cluster a user runs on is already up; its own processes would
  otherwise take CPU from the local runs).

Recorded per run: wall seconds of the whole call (model loads, process or actor start-up included: what a user
waits for), rows/s and audio-s per wall-s over that wall time, and a steady-state rows/s
(``BulkSummary.steady_rows_per_second``: the sum over workers of each one's rows over the time from its model being
loaded to its last row; what a table of thousands of rows sees, where start-up is amortised; records before
2026-12-07 12:00 UTC used the rows finished after the last worker was loaded, which overstates once the driver works
while the others load). Derived from the same
record only: scaling (2 workers / 1 worker, steady and end to end) for each engine, and Ray against local at 2
workers; the targets (2 workers >= 1.6x one, Ray within 15% of local) are judged on both. The files of every run
must equal local-1's (greedy rows equal themselves alone): checked. The load
average before and after each run is recorded; on a machine busier than its cores the scaling figures are not
meaningful (the markdown says so).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import wave
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = (("local", 1), ("local", 2), ("ray", 1), ("ray", 2))
LETTERS = "abcdefghijklmnopqrstuvwxyz"
VOCAB = (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(LETTERS) + ["##" + c for c in LETTERS]
         + list(".,;:!?'\""))
SENTENCES = ["the lamp was lit at dawn.", "a ship passed to the north, slowly.", "was anyone watching?",
             "the keeper wrote it in the log.", "birds always know first.", "here we go, he said to nobody."]


def _load() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def build_checkpoint(path: Path) -> str:
    """A small random Bark checkpoint with a letter tokenizer (tests/bark_tiny.py builds the weights)."""
    sys.path.insert(0, str(ROOT / "tests"))
    import bark_tiny

    bark_tiny.save_tiny_bark(path, seed=3, hidden_size=32, num_layers=2, num_heads=2)
    (path / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    (path / "tokenizer_config.json").write_text('{"do_lower_case": true}', encoding="utf-8")
    (path / "speaker_embeddings_path.json").write_text("{}", encoding="utf-8")  # no named presets (and no warning)
    return str(path)


def write_table(path: Path, rows: int) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for i in range(rows):
            text = " ".join(SENTENCES[(i + k) % len(SENTENCES)] for k in range(1 + i % 3))
            f.write(json.dumps({"id": f"row{i:04d}", "text": text}) + "\n")
    return str(path)


def _frames(path: str):
    import numpy as np

    with wave.open(path, "rb") as w:
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.int32)


def _same(a, b) -> bool:
    """The same rows with the same audio: equal lengths, samples within 1 LSB (batched vs alone: the same codes, the
    audio within the model tolerance, 16-bit rounding may flip the last bit)."""
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape and (a[k].size == 0 or abs(a[k] - b[k]).max() <= 1)
                                        for k in a)


def run_config(engine: str, workers: int, table: str, ckpt: str, out: str, tokens: int) -> dict:
    from bark.bulk import synthesize_table

    load_before = _load()
    t0 = time.perf_counter()
    summary = synthesize_table(table, out, model=ckpt, engine=engine, workers=workers, threads=1, greedy=True,
                               semantic_max_new_tokens=tokens, device="cpu", progress=False)
    wall = time.perf_counter() - t0
    steady = summary.steady_rows_per_second
    return {"engine": engine, "workers": workers, "rows": summary.rows, "ok": summary.ok, "failed": summary.failed,
            "wall_s": round(wall, 3), "rows_per_s": round(summary.ok / wall, 4),
            "audio_s": round(summary.audio_seconds, 3), "audio_s_per_wall_s": round(summary.audio_seconds / wall, 4),
            "steady_rows_per_s": None if steady is None else round(steady, 4),
            "workers_seen": len({worker for worker, _, _ in summary.timings}), "load_before": load_before,
            "load_after": _load()}


def derive(runs: dict) -> dict:
    def ratio(a, b, key):
        if a in runs and b in runs and runs[a].get(key) and runs[b].get(key):
            return round(runs[a][key] / runs[b][key], 3)
        return None

    out = {}
    for engine in ("local", "ray"):
        out[f"{engine}_scaling_end_to_end"] = ratio(f"{engine}-2", f"{engine}-1", "rows_per_s")
        out[f"{engine}_scaling_steady"] = ratio(f"{engine}-2", f"{engine}-1", "steady_rows_per_s")
    out["ray_vs_local_2_workers_end_to_end"] = ratio("ray-2", "local-2", "rows_per_s")
    out["ray_vs_local_2_workers_steady"] = ratio("ray-2", "local-2", "steady_rows_per_s")
    out["targets"] = {}
    for how in ("steady", "end_to_end"):
        out["targets"].update({
            f"local 2 workers >= 1.6x one ({how})": _verdict(out[f"local_scaling_{how}"], 1.6),
            f"ray 2 actors >= 1.6x one ({how})": _verdict(out[f"ray_scaling_{how}"], 1.6),
            f"ray within 15% of local at 2 workers ({how})": _verdict(out[f"ray_vs_local_2_workers_{how}"], 0.85),
        })
    return out


def _verdict(value, at_least) -> str:
    return "not measured" if value is None else ("met" if value >= at_least else "not met") + f" ({value})"


def table_md(result: dict) -> str:
    lines = [f"# Bulk synthesis, {result['environment']['date']}", "",
             f"{result['environment']['cpu_count']} CPUs, python {result['environment']['python']}, torch "
             f"{result['environment']['torch']}, ray {result['environment']['ray']}; {result['rows']} rows, "
             f"{result['tokens']} semantic tokens per piece, 1 thread per worker", "",
             "| run | wall s | rows/s | audio-s / wall-s | steady rows/s | load before -> after |",
             "|---|---|---|---|---|---|"]
    for name, r in result["runs"].items():
        lines.append(f"| {name} | {r['wall_s']} | {r['rows_per_s']} | {r['audio_s_per_wall_s']} | "
                     f"{r['steady_rows_per_s']} | {r['load_before']} -> {r['load_after']} |")
    lines += ["", "| derived | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in result["derived"].items() if k != "targets"]
    lines += ["", "| target | verdict |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in result["derived"]["targets"].items()]
    cores = result["environment"]["cpu_count"] or 1
    loads = [r["load_before"] for r in result["runs"].values() if r["load_before"] is not None]
    if loads and max(loads) > cores / 2:
        lines += ["", f"**Warning:** the load average reached {max(loads)} on {cores} cores: other processes took "
                      f"the cores, so the 2-worker scaling figures are not meaningful."]
    if not result["same_files"]:
        lines += ["", "**The runs' files differ from local-1's** (see same_files_detail)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bulk", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="directory for bulk.json and bulk.md (default: "
                                                    "benchmarks/results/<date>-cpu-bulk)")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=48, help="semantic tokens per piece")
    parser.add_argument("--engines", default="local,ray")
    parser.add_argument("--quick", action="store_true", help="smoke test: 8 rows, 8 tokens")
    args = parser.parse_args(argv)
    rows, tokens = (8, 8) if args.quick else (args.rows, args.tokens)
    engines = [e for e in args.engines.split(",") if e]
    import torch

    torch.set_num_threads(1)
    date = datetime.date.today().isoformat()
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"{date}-cpu-bulk")
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bark-bulk-bench-"))
    try:
        ray_version = None
        if "ray" in engines:
            import ray

            ray_version = ray.__version__
        ckpt = build_checkpoint(work / "ckpt")
        table = write_table(work / "table.jsonl", rows)
        result = {"rows": rows, "tokens": tokens, "runs": {}, "environment": {
            "date": date, "python": platform.python_version(), "torch": torch.__version__, "ray": ray_version,
            "cpu_count": os.cpu_count(), "machine": platform.machine(), "processor": platform.processor()}}
        reference = None
        same, detail = True, {}
        for engine, workers in CONFIGS:
            if engine not in engines:
                continue
            name = f"{engine}-{workers}"
            if engine == "ray" and not ray.is_initialized():  # after the local runs: its processes take CPU too
                ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                         runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}})
            run_out = str(work / name)
            result["runs"][name] = run_config(engine, workers, table, ckpt, run_out, tokens)
            files = {f: _frames(os.path.join(run_out, f)) for f in sorted(os.listdir(run_out)) if f.endswith(".wav")}
            if reference is None:
                reference = files
            elif not _same(files, reference):
                same = False
                detail[name] = sorted(f for f in set(files) | set(reference) if f not in files or f not in reference
                                      or not _same({0: files[f]}, {0: reference[f]}))
            print(f"{name}: {result['runs'][name]}", flush=True)
        result["same_files"] = same
        result["same_files_detail"] = detail
        result["derived"] = derive(result["runs"])
        (out / "bulk.json").write_text(json.dumps(result, indent=1) + "\n")
        (out / "bulk.md").write_text(table_md(result))
        print(table_md(result))
        return 0 if same else 1
    finally:
        if "ray" in engines:
            import ray

            ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
