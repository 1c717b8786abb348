"""Engine benchmark: 8 concurrent one-sentence requests through ``bark.Engine`` vs the same 8 one after another.

``python -m benchmarks.engine [--out DIR] [--pairs 3] [--requests 8] [--layers 4] [--threads 1]
[--semantic-tokens 128] [--greedy] [--device cpu|cuda] [--dtype float32|float16|bfloat16] [--max-wait 0.05]``

The model is the built-in random one with bark-small's widths (768 wide, 12 heads) and ``--layers`` layers per
sub-model, fp32 on the CPU, ``torch.set_num_threads(--threads)`` (on a GPU: fp16 unless ``--dtype``; the GPU
first-light command runs it with 12 layers, bark-small itself, as its ``engine`` step). The server's batching
(bark.serve) is this engine's: concurrent vs one-after-another here is the server's ``--max-batch 8`` vs 1 without
HTTP. Each request is one sentence in a random voice preset,
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
Both modes must give every request the same tokens (checked; on a GPU in half precision a batch of another size may
run other kernels, so a flip is recorded, not a failure). Recorded: each run's wall time, the batches the engine
ran, the 1-minute load average (``os.getloadavg``) and ``uptime`` before and after, the process's CPU seconds, and the
versions. Results go to ``DIR/engine.json`` (DIR defaults to benchmarks/results/<date>-cpu-engine, or -gpu-engine).
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


def build_model(layers: int, seed: int = 0, hidden: int = 768):
    """The random model: bark-small's config with ``layers`` layers per sub-model (and ``hidden`` wide, 64 per head:
    the CPU rehearsal of the GPU command uses a narrow one)."""
    import bark
    from bark import config as bark_config

    config = bark_config.bark_small_config()
    for sub in (config.semantic_config, config.coarse_acoustics_config, config.fine_acoustics_config):
        sub.num_layers = layers
        if hidden != sub.hidden_size:
            sub.hidden_size, sub.num_heads = hidden, max(1, hidden // 64)
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
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    parser.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"),
                        help="the model's dtype (default: float32 on a CPU, float16 on a GPU)")
    parser.add_argument("--hidden", type=int, default=768, help="model width (default 768, bark-small's; 64 per head)")
    parser.add_argument("--max-wait", type=float, default=0.05,
                        help="seconds the engine waits to fill a batch (default 0.05)")
    args = parser.parse_args(argv)
    for name in ("pairs", "requests", "layers", "threads", "semantic_tokens", "hidden"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: expected an integer >= 1, got {getattr(args, name)}")
    import bark
    import transformers
    from bark_kernels.devices import parse_device

    try:
        device = parse_device(args.device, "--device")
    except (ValueError, TypeError, RuntimeError) as error:
        parser.error(str(error))
    dtype = getattr(torch, args.dtype or ("float32" if device.type == "cpu" else "float16"))
    where = "cpu" if device.type == "cpu" else "gpu"
    out = args.out or ROOT / "benchmarks" / "results" / f"{datetime.date.today().isoformat()}-{where}-engine"
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    if args.hidden % 64:
        parser.error(f"--hidden: expected a multiple of 64, got {args.hidden}")
    model = build_model(args.layers, hidden=args.hidden).to(device=device, dtype=dtype)
    processor = bark.longform.ByteTextEncoder()
    kwargs = {"semantic_max_new_tokens": args.semantic_tokens, "do_sample": not args.greedy}
    requests = [bark.SpeechRequest(SENTENCES[i % len(SENTENCES)], voice=_voice(model, i), seed=i)
                for i in range(args.requests)]

    def factory(on_batch, callback):
        return bark.Engine(model, processor, max_batch=args.requests, max_wait=args.max_wait, generate_kwargs=kwargs,
                           on_batch=on_batch, callback=callback)

    record = {
        "benchmark": "engine", "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "settings": {**vars(args), "out": str(out), "device": str(device), "dtype": str(dtype).replace("torch.", ""),
                     "model": f"random bark-small config, {args.hidden} wide, {args.layers} layers, "
                              f"{str(dtype).replace('torch.', '')}",
                     "generate_kwargs": kwargs, "max_batch": args.requests},
        "machine": {"platform": platform.platform(), "processor": cpu_model(), "cpus": os.cpu_count(),
                    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                    "torch_cuda": torch.version.cuda,
                    "python": platform.python_version(), "torch": torch.__version__,
                    "transformers": transformers.__version__, "numpy": np.__version__,
                    "torch_threads": torch.get_num_threads()},
        "uptime_before": _uptime(), "runs": [], "pairs": [],
    }
    print(f"uptime: {record['uptime_before']}", flush=True)
    # warm-up: sessions, allocator, first-call costs; on a GPU with every request, so that the batch sizes measured
    # below have their CUDA graphs captured and their kernels compiled already (a CPU run keeps it short)
    warm = requests[:2] if device.type == "cpu" else requests
    for mode in ("sequential", "concurrent"):
        run_mode(factory, warm, mode)
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
    if record["all_tokens_equal"] or device.type == "cpu":
        return 0 if record["all_tokens_equal"] else 1
    # On a GPU a batch of another size may run other matmul kernels (another summation order): in half precision
    # a sampled token can then flip where two candidates are within rounding. Recorded, not a failure of the run.
    print("note: on this GPU a request batched with others did not always get the tokens it gets alone "
          "(half-precision rounding of other kernels); see engine.json", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
