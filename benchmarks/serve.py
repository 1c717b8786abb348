"""Serving benchmark: requests/s and time to first / last audio of ``bark-kernels serve``'s app under 1, 4, 8 and 16
concurrent clients, with batching (``--max-batch``, default 8) and without (``--max-batch 1``).

``python -m benchmarks.serve --out DIR [--model small|small4|tiny|bark-small] [--clients 1,4,8,16]
[--requests-per-client 2] [--max-batch 8] [--max-wait-ms 20] [--semantic-tokens 96] [--threads 1] [--quick]``

The app (bark.serve.create_app over one bark.Engine) runs under uvicorn on 127.0.0.1 and a free port in this process;
each client is a thread with its own HTTP connection that sends its requests one after the other (a new one as soon
as the last has ended) and reads each response as a stream: the time to first audio is when the first audio bytes of
the response arrive (after the WAV header), the time to last audio when its last byte does. Every request is a two-
sentence text (its own per client and request), spoken greedily with one voice prompt, so the two sentences are
ready at once and batch with those of the other clients. A random model does not know when to stop: every sentence
runs to ``--semantic-tokens`` semantic tokens (the stage caps), so every mode does the same work.

The default model, ``small`` (benchmarks.e2e: bark-small's vocabularies, windows and codec, 4 layers of width 256 in
every sub-model, as the long-form benchmark uses), keeps a CPU run in minutes; ``small4`` has bark-small's widths (768,
12 heads) with 4 layers (about 5x slower on a CPU), ``bark-small`` the real shapes. For each concurrency the two modes
run back to back (batching first, then without; the order alternates between concurrencies). Recorded: requests/s
(requests / wall time of the level), p50/p95 of both times, batches and rows the engine ran, the machine's 1-minute
load before and after each level, the CPU time other processes took (benchmarks.report.CpuContention), and versions.
Results go to ``DIR/serve.json`` and ``DIR/serve.md``; the target (docs/serve.md): at 8 clients, batching serves
>= 1.4x the requests/s of ``--max-batch 1`` on a CPU (>= 4x on a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

TARGET_CLIENTS = 8
TARGET_SPEEDUP = {"cpu": 1.4, "cuda": 4.0}
SENTENCES = ["The lighthouse keeper woke before dawn.", "He climbed the spiral stairs again.",
             "The fog was thick over the rocks.", "A ship was sounding its horn.", "He lit the lamp at five.",
             "The beam swept across the water.", "Was anyone watching out there?", "He never knew for sure."]


def build_model(name: str, device: torch.device, dtype: torch.dtype, seed: int = 0):
    import bark

    if name == "small4":
        real = bark.bark_small_config().to_dict()
        for sub in ("semantic_config", "coarse_acoustics_config", "fine_acoustics_config"):
            real[sub].update(num_layers=4)
        config = bark.BarkConfig.from_dicts(real, real["generation_config"])
    else:
        from .e2e import bark_config_for

        config = bark_config_for(name)
    torch.manual_seed(seed)
    return bark.BarkModel(config).to(device=device, dtype=dtype).eval()


def _voice(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"semantic_prompt": rng.integers(0, 10_000, size=(40,), dtype=np.int64),
            "coarse_prompt": rng.integers(0, 1024, size=(2, 60), dtype=np.int64),
            "fine_prompt": rng.integers(0, 1024, size=(8, 60), dtype=np.int64)}


def _load() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


class _Server:
    def __init__(self, model, max_batch: int, max_wait: float, semantic_tokens: int, max_queue: int = 256) -> None:
        import uvicorn

        import bark
        from bark.longform import ByteTextEncoder
        from bark.serve import ServeSettings, create_app

        self.engine = bark.Engine(model, ByteTextEncoder(), max_batch=max_batch, max_wait=max_wait,
                                  max_queue=max_queue, generate_kwargs={"semantic_max_new_tokens": semantic_tokens,
                                                                        "do_sample": False})
        app = create_app(self.engine, ServeSettings(model_name="bench", voices={"v": _voice()}))
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(256)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)
        self.engine.close(cancel=True, timeout=30)
        self.sock.close()


def _client(url: str, index: int, requests: int, out: list, errors: list, start: threading.Barrier) -> None:
    import httpx

    with httpx.Client(timeout=600) as client:
        start.wait()
        for r in range(requests):
            text = f"{SENTENCES[(index + r) % len(SENTENCES)]} {SENTENCES[(index + r + 3) % len(SENTENCES)]}"
            body = {"model": "bench", "input": text, "voice": "v", "response_format": "wav", "greedy": True}
            t0 = time.perf_counter()
            first = None
            size = 0
            try:
                with client.stream("POST", f"{url}/v1/audio/speech", json=body) as response:
                    if response.status_code != 200:
                        errors.append(f"{response.status_code}: {response.read()[:200]!r}")
                        continue
                    for chunk in response.iter_raw():
                        size += len(chunk)
                        if first is None and size > 44:
                            first = time.perf_counter() - t0
            except Exception as e:  # noqa: BLE001 - reported, the level counts it
                errors.append(f"{type(e).__name__}: {e}")
                continue
            end = time.perf_counter()
            out.append({"ttfa": first, "ttla": end - t0, "bytes": size, "start": t0, "end": end})


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 6) if values else None


def run_level(model, clients: int, requests_per_client: int, max_batch: int, max_wait: float,
              semantic_tokens: int) -> dict:
    from .report import CpuContention

    server = _Server(model, max_batch, max_wait, semantic_tokens)
    try:
        load_before = _load()
        contention = CpuContention()
        results: list = []
        errors: list = []
        barrier = threading.Barrier(clients + 1)
        threads = [threading.Thread(target=_client, args=(server.url, i, requests_per_client, results, errors,
                                                          barrier)) for i in range(clients)]
        for t in threads:
            t.start()
        barrier.wait()
        for t in threads:
            t.join()
        # the level's wall time: from the first request's start to the last one's end (the clients' own clocks)
        wall = (max(r["end"] for r in results) - min(r["start"] for r in results)) if results else 0.0
        others = contention.others_cores()
        batches, rows = server.engine.batches, server.engine.rows
    finally:
        server.close()
    ttfa = [r["ttfa"] for r in results if r["ttfa"] is not None]
    ttla = [r["ttla"] for r in results]
    return {"clients": clients, "max_batch": max_batch, "requests": len(results), "errors": errors,
            "wall_s": round(wall, 6), "requests_per_s": round(len(results) / wall, 6) if wall > 0 else None,
            "ttfa_p50_s": _pct(ttfa, 50), "ttfa_p95_s": _pct(ttfa, 95), "ttla_p50_s": _pct(ttla, 50),
            "ttla_p95_s": _pct(ttla, 95), "batches": batches, "rows": rows,
            "rows_per_batch": round(rows / batches, 2) if batches else None,
            "load_before": load_before, "load_after": _load(),
            "other_processes_cores": None if others is None else round(others, 2)}


def table(result: dict) -> str:
    lines = [f"# serve benchmark ({result['environment']['device_name']}, model {result['config']['model']})", "",
             f"{result['config']['requests_per_client']} requests per client (two sentences each, "
             f"{result['config']['semantic_tokens']} semantic tokens per sentence), max wait "
             f"{result['config']['max_wait_ms']} ms. Times in seconds.", "",
             "| clients | max batch | requests/s | first audio p50 | p95 | last audio p50 | p95 | rows/batch | "
             "load before/after | others' cores |", "|---|---|---|---|---|---|---|---|---|---|"]
    def f(x, spec=".3f"):
        return "-" if x is None else format(x, spec)

    for r in result["runs"]:
        lines.append(f"| {r['clients']} | {r['max_batch']} | {f(r['requests_per_s'], '.4g')} | {f(r['ttfa_p50_s'])} | "
                     f"{f(r['ttfa_p95_s'])} | {f(r['ttla_p50_s'])} | {f(r['ttla_p95_s'])} | {r['rows_per_batch']} | "
                     f"{r['load_before']}/{r['load_after']} | {r['other_processes_cores']} |")
    lines += ["", "| clients | batching / max-batch 1 (requests/s) |", "|---|---|"]
    lines += [f"| {c} | {s} |" for c, s in result["speedup"].items()]
    target = result["target"]
    lines += ["", f"Target: at {target['clients']} clients >= {target['min_speedup']}x: "
              f"{'met' if target['met'] else 'NOT met'} ({target['speedup']}x)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory for serve.json and serve.md")
    parser.add_argument("--model", default="small", choices=("small", "small4", "tiny", "bark-small"))
    parser.add_argument("--clients", default="1,4,8,16", help="comma-separated concurrency levels")
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--max-batch", type=int, default=8, help="the batching mode's --max-batch (the other is 1)")
    parser.add_argument("--max-wait-ms", type=float, default=20.0)
    parser.add_argument("--semantic-tokens", type=int, default=96,
                        help="semantic tokens per sentence (default 96: ~1.9 s of speech, a short sentence)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the CPU target's)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 1 request per client, clients 1,4, the tiny model, 24 semantic tokens")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests_per_client, args.clients, args.model, args.semantic_tokens = 1, "1,4", "tiny", 24
    clients = [int(c) for c in args.clients.split(",")]
    if any(c < 1 for c in clients) or args.requests_per_client < 1 or args.max_batch < 2:
        parser.error("--clients and --requests-per-client: expected integers >= 1; --max-batch: >= 2")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    from .report import environment

    environment_info = environment(device)
    import fastapi
    import uvicorn

    environment_info.update(fastapi=fastapi.__version__, uvicorn=uvicorn.__version__)
    model = build_model(args.model, device, dtype)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"config": {"model": args.model, "clients": clients, "requests_per_client": args.requests_per_client,
                         "max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms,
                         "semantic_tokens": args.semantic_tokens, "threads": torch.get_num_threads(),
                         "device": str(device), "dtype": str(dtype).replace("torch.", "")},
              "environment": environment_info, "runs": [], "speedup": {}}
    # warm-up (first-call allocations, lazy imports): one request, not recorded
    run_level(model, 1, 1, args.max_batch, args.max_wait_ms / 1000, args.semantic_tokens)
    for i, c in enumerate(clients):
        modes = [args.max_batch, 1] if i % 2 == 0 else [1, args.max_batch]
        level = {}
        for max_batch in modes:
            run = run_level(model, c, args.requests_per_client, max_batch, args.max_wait_ms / 1000,
                            args.semantic_tokens)
            level[max_batch] = run
            result["runs"].append(run)
            print(json.dumps(run), flush=True)
        on, off = level[args.max_batch]["requests_per_s"], level[1]["requests_per_s"]
        result["speedup"][str(c)] = round(on / off, 3) if on and off else None
        (out / "serve.json").write_text(json.dumps(result, indent=2) + "\n")
    speedup = result["speedup"].get(str(TARGET_CLIENTS))
    minimum = TARGET_SPEEDUP["cuda" if device.type == "cuda" else "cpu"]
    result["target"] = {"clients": TARGET_CLIENTS, "min_speedup": minimum, "speedup": speedup,
                        "met": speedup is not None and speedup >= minimum}
    (out / "serve.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "serve.md").write_text(table(result))
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
