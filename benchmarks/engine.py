"""Engine benchmark: 8 concurrent one-sentence requests through ``bark.Engine`` vs the same 8 one after another.

``python -m benchmarks.engine [--out DIR] [--pairs 3] [--requests 8] [--layers 4] [--threads 1]
[--semantic-tokens 128] [--greedy]``

The model is the built-in random one with bark-small's widths (768 wide, 12 heads) and ``--layers`` layers per
sub-model, fp32 on the CPU, ``torch.set_num_threads(--threads)``. Each request is one sentence in a random voice preset,
sampled with its own seed (``seed=i``: the engine gives each piece its own random stream, so the rows batch together
and each one's tokens do not depend on the batch). A random model does not stop by itself, so every request runs to
``--semantic-tokens`` semantic tokens: 128 by default, 2.6 s of speech at Bark's 49.9 Hz, what a trained model says
for a sentence of ~40 characters at ~15 characters per second (the sentences here have 39 to 55).

Where the time goes (measured here, one request of 40 semantic tokens on a busy 2-vCPU EPYC): semantic 9%, coarse
30%, fine 60%, codec 1%. The fine stage runs 6 non-causal passes over a 1,024-position window per row, whatever the
row's length (as transformers): compute-bound, so batching saves nothing there on a CPU, while the memory-bound decode
steps of the semantic and coarse stages share their weight reads (at 8 rows: 1.3x semantic, 2.1x coarse). Longer
requests therefore gain more; at 8 semantic tokens the two modes tie (1.01x).

* ``sequential``: one caller submits a request, waits for its audio, then submits the next (the engine runs one row
  per batch: nothing else is waiting);
* ``concurrent``: ``--requests`` threads submit at the same moment and each waits for its own audio; the engine
  batches their pieces (``max_batch`` = the number of requests).

Each pair runs both modes back to back (the order swaps every other pair), with one warm-up run of each first; the
speed-up is taken within a pair (sequential wall time / concurrent wall time), and the median over pairs is reported.
Both modes must give every request the same tokens (checked). Recorded: each run's wall time, the batches the engine
ran, the 1-minute load average (``os.getloadavg``) and ``uptime`` before and after, the process's CPU seconds, and the
versions. Results go to ``DIR/engine.json`` (DIR defaults to benchmarks/results/<date>-cpu-engine).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.report import cpu_model  # noqa: E402

SENTENCES = [
    "The lighthouse keeper woke before dawn.",
    "He climbed the spiral stairs, counting each step.",
    "At the top, the great lens waited in the cold.",
    "Outside, the fog was thick enough to swallow the rocks.",
    "Somewhere out there, a ship was sounding its horn.",
    "He lit the lamp, and the beam swept across the water.",
    "By seven o'clock the fog began to lift.",
    "The keeper finished his tea and rinsed the cup.",
]


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _load() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def build_model(layers: int, seed: int = 0):
    import bark
    from bark import config as bark_config

    config = bark_config.bark_small_config()
    for sub in (config.semantic_config, config.coarse_acoustics_config, config.fine_acoustics_config):
        sub.num_layers = layers
    torch.manual_seed(seed)
    model = bark.BarkModel(config, attn_implementation="sdpa").eval()
    return model


def _voice(model, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    gen = model.generation_config
    return {"semantic_prompt": rng.integers(0, gen.semantic_config.semantic_vocab_size, 60),
            "coarse_prompt": rng.integers(0, gen.codebook_size, (gen.coarse_acoustics_config.n_coarse_codebooks, 90)),
            "fine_prompt": rng.integers(0, gen.codebook_size, (gen.fine_acoustics_config.n_fine_codebooks, 90))}


def run_mode(engine_factory, requests, mode: str) -> dict:
    """One run: every request's tokens, the wall time, the engine's batches, CPU seconds."""
    batches = []
    stages: dict[str, float] = {}  # wall seconds per stage, summed over the run's batches (where the time goes)

    def on_event(info, event):
        if event.kind == "end":
            stages[event.stage] = stages.get(event.stage, 0.0) + event.seconds

    engine = engine_factory(batches.append, on_event)
    results: dict[int, list] = {}
    cpu0, t0 = time.process_time(), time.perf_counter()
    if mode == "sequential":
        for i, request in enumerate(requests):
            results[i] = engine.submit(request).result()
    else:
        start = threading.Barrier(len(requests))

        def caller(i):
            start.wait()
            results[i] = engine.submit(requests[i]).result()

        threads = [threading.Thread(target=caller, args=(i,)) for i in range(len(requests))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    engine.close()
    tokens = [[(p.semantic.tolist(), p.coarse.tolist(), p.fine.tolist()) for p in results[i]]
              for i in range(len(requests))]
    speech = sum(p.duration for i in range(len(requests)) for p in results[i])
    return {"mode": mode, "wall_s": round(wall, 3), "cpu_s": round(cpu, 3), "speech_s": round(speech, 3),
            "batches": [len(b.rows) for b in batches], "stages_s": {k: round(v, 3) for k, v in stages.items()},
            "tokens": tokens}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="bark.Engine: concurrent vs one-after-another requests (CPU)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--semantic-tokens", type=int, default=128)
    parser.add_argument("--greedy", action="store_true", help="greedy decoding instead of seeded sampling")
    args = parser.parse_args(argv)
    import bark
    import transformers

    out = args.out or ROOT / "benchmarks" / "results" / f"{datetime.date.today().isoformat()}-cpu-engine"
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    model = build_model(args.layers)
    processor = bark.longform.ByteTextEncoder()
    kwargs = {"semantic_max_new_tokens": args.semantic_tokens, "do_sample": not args.greedy}
    requests = [bark.SpeechRequest(SENTENCES[i % len(SENTENCES)], voice=_voice(model, i), seed=i)
                for i in range(args.requests)]

    def factory(on_batch, callback):
        return bark.Engine(model, processor, max_batch=args.requests, max_wait=0.05, generate_kwargs=kwargs,
                           on_batch=on_batch, callback=callback)

    record = {
        "benchmark": "engine", "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "settings": {**vars(args), "out": str(out), "model": f"random bark-small widths, {args.layers} layers, fp32",
                     "generate_kwargs": kwargs, "max_batch": args.requests},
        "machine": {"platform": platform.platform(), "processor": cpu_model(), "cpus": os.cpu_count(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "transformers": transformers.__version__, "numpy": np.__version__,
                    "torch_threads": torch.get_num_threads()},
        "uptime_before": _uptime(), "runs": [], "pairs": [],
    }
    print(f"uptime: {record['uptime_before']}", flush=True)
    for mode in ("sequential", "concurrent"):  # warm-up: sessions, allocator, first-call costs
        run_mode(factory, requests[:2], mode)
        print(f"warm-up {mode} done", flush=True)
    reference = None
    for pair in range(args.pairs):
        order = ("sequential", "concurrent") if pair % 2 == 0 else ("concurrent", "sequential")
        walls = {}
        for mode in order:
            load = _load()
            run = run_mode(factory, requests, mode)
            tokens = run.pop("tokens")
            if reference is None:
                reference = tokens
            run["same_tokens_as_first_run"] = tokens == reference
            run.update(pair=pair, load_before=load, load_after=_load())
            record["runs"].append(run)
            walls[mode] = run["wall_s"]
            print(f"pair {pair} {mode:10s} {run['wall_s']:8.2f} s  cpu {run['cpu_s']:8.2f} s  batches "
                  f"{run['batches']}  load {load}  same tokens {run['same_tokens_as_first_run']}  stages "
                  f"{run['stages_s']}", flush=True)
        ratio = walls["sequential"] / walls["concurrent"]
        record["pairs"].append({"pair": pair, "order": order, **walls, "speedup": round(ratio, 3)})
        print(f"pair {pair}: concurrent is {ratio:.2f}x sooner", flush=True)
        (out / "engine.json").write_text(json.dumps(record, indent=1))
    record["median_speedup"] = round(statistics.median(p["speedup"] for p in record["pairs"]), 3)
    record["all_tokens_equal"] = all(r["same_tokens_as_first_run"] for r in record["runs"])
    record["uptime_after"] = _uptime()
    (out / "engine.json").write_text(json.dumps(record, indent=1))
    print(f"median speed-up {record['median_speedup']:.2f}x over {args.pairs} pairs; tokens equal in every run: "
          f"{record['all_tokens_equal']}; uptime after: {record['uptime_after']}")
    return 0 if record["all_tokens_equal"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
