"""Long-form benchmark: a ~2,000-character paragraph spoken in ragged batches vs one piece at a time.

``python -m benchmarks.longform --out DIR [--model small|tiny|bark-small|bark] [--batch-size 8] [--pairs 2]
[--modes sequential,batched,batched-text-order] [--threads N] [--budget S] [--quick]``

Every mode speaks the same paragraph through ``bark.stream`` (what ``bark.synthesize`` runs) with a random voice
preset, greedy; its pieces come from ``bark.text.split_text`` with byte-level token counts (the models here are
random and have no tokenizer):

* ``sequential``: one piece per generate call (``batch_size=1``), as a loop over sentences does;
* ``batched``: ``batch_size`` pieces per call, chunks of similar length (``order="length"``, synthesize's default);
* ``batched-text-order``: ``batch_size`` consecutive pieces per call (``order="text"``, stream's and the CLI's).

Speech length. A random model does not know when to stop, so each piece ends where a trained model would roughly end
it: after ``ceil(len(piece) * TOKENS_PER_CHAR)`` semantic tokens (Bark's 49.9 Hz semantic rate at ~15 characters per
second of speech), emulated by forcing EOS at that step of each row and suppressing it before (``speech_lengths``:
a benchmark-only patch of the semantic head's scores, device-side, so it works under CUDA graphs too). Rows of a
batch therefore end at their own steps, as they would with a trained model: a batch runs until its longest row is
done (finished rows stay in the batch, masked), and the coarse, fine and codec stages work on each row's own length.
Every piece's semantic, coarse and fine tokens must be the same in every mode (greedy rows equal alone): checked.

Each pair runs every mode back to back (the order reverses every other pair); speed-ups are taken within a pair.
Recorded with every run: wall time, stage times, real-time factor (wall time / seconds of speech), peak memory (CUDA:
peak allocated; CPU: peak resident set size above the start of the run, sampled every 10 ms), the machine's 1-minute
load average before and after, and the process's CPU seconds (well below wall time x torch threads means other
processes took the cores; the ratio of CPU seconds is a second, load-independent measure of the work saved). On CUDA
a last run, ``batched+offload`` (bark.offload, the model in CPU memory), gives the peak GPU memory with sub-models
offloaded. Results go to ``DIR/longform.json`` and ``DIR/longform.md`` after every run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import threading
import time
from pathlib import Path

import torch

MODES = ("sequential", "batched", "batched-text-order")
TOKENS_PER_CHAR = 49.9 / 15.0  # semantic tokens per character: 49.9 Hz at ~15 characters per second of speech

PARAGRAPH = (
    "The lighthouse keeper woke before dawn, as he had every morning for thirty years. He climbed the spiral "
    "stairs, one hundred and twelve of them, counting each step under his breath. At the top, the great lens "
    "waited, cold and silent, its brass frame beaded with sea mist. He wiped it clean with a soft cloth and "
    "checked the oil. Outside, the fog was thick enough to swallow the rocks below. Somewhere out there, a ship "
    "was sounding its horn, low and patient, like an animal calling for its herd. He lit the lamp, and the beam "
    "swept out across the water. Was anyone watching? He never knew. Dr. Ellis, who came twice a year from the "
    "mainland, said the light had saved more lives than any hospital on the coast; the keeper only smiled and "
    "said that lamps do not save anyone, people who keep them burning do. By seven o'clock the fog began to lift. "
    "The ship, a rusty freighter with a red hull, passed safely to the north. Its captain raised a hand from the "
    "bridge, a small gesture, almost nothing at all. The keeper raised his in return. Then he went down the stairs "
    "again, all one hundred and twelve, and made himself a cup of tea. The radio said a storm would arrive by "
    "evening, with winds of more than sixty miles per hour. He wrote it in the log, in the same careful hand he "
    "had used since the first day. Lamp lit at five forty. Fog heavy. One vessel passed, north, no trouble. He "
    "closed the book and looked out of the small kitchen window at the gulls. They were already flying inland. "
    "Birds always know first, his father used to say. The keeper finished his tea, rinsed the cup, and began to "
    "prepare for the long night ahead. He filled the spare tank, tightened the shutters, and carried a box of "
    "candles up to the watch room, just in case. At noon the sky turned the color of old pewter. The first gusts "
    "rattled the windows an hour later, and the sea, which had been so calm at breakfast, began to throw itself "
    "against the rocks. \"Here we go,\" he said to nobody, and sat down by the lamp to wait."
)


def _load() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


class _PeakRSS:
    """Peak resident set size of this process (bytes) while running, sampled every 10 ms (Linux /proc)."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self.start_rss = self._rss()

    def _rss(self) -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * self._page
        except (OSError, ValueError, IndexError):
            return 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            self._stop.wait(0.01)

    def __enter__(self) -> _PeakRSS:
        self.peak = self.start_rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


def build_model(name: str, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """Our BarkModel with random weights (seeded) in one of the benchmark configurations (benchmarks.e2e)."""
    import bark

    from .e2e import bark_config_for

    torch.manual_seed(seed)
    model = bark.BarkModel(bark_config_for(name))
    return model.to(device=device, dtype=dtype).eval()


def pieces_of(text: str, model) -> list[str]:
    from bark.longform import ByteTextEncoder
    from bark.text import split_text

    limit = model.generation_config.semantic_config.max_input_semantic_length
    return split_text(text, limit, ByteTextEncoder().count)


def speech_tokens(piece: str, tokens_per_char: float, cap: int) -> int:
    return max(1, min(cap, math.ceil(len(piece) * tokens_per_char)))


def _voice(seed: int = 0) -> dict:
    import numpy as np

    rng = np.random.default_rng(seed)
    return {"semantic_prompt": rng.integers(0, 10_000, size=(120,)),
            "coarse_prompt": rng.integers(0, 1024, size=(2, 180)),
            "fine_prompt": rng.integers(0, 1024, size=(8, 180))}


@contextlib.contextmanager
def speech_lengths():
    """Emulate a trained model's end of speech on a random model: while active, row r of a generate call picks EOS
    exactly when it has ``targets[(batch, device)][r]`` semantic tokens (EOS is -inf before, forced then). Patches
    ``bark.generation._SemanticHead.scores`` with device-side ops only (no host read: CUDA graphs capture it); the
    targets tensor of each batch size is updated in place, so a captured graph keeps reading it."""
    from bark import generation

    head = getattr(generation, "_SemanticHead", None)
    if head is None or not callable(getattr(head, "scores", None)):
        raise RuntimeError("benchmarks.longform: bark.generation._SemanticHead.scores not found; the EOS emulation "
                           "needs updating")
    original = head.scores
    targets: dict = {}

    def scores(self, hidden):
        out = original(self, hidden)  # (B, vocab) float32
        target = targets.get((out.shape[0], out.device))
        if target is not None:
            out[:, self.eos] = torch.where(self.record.col >= target, 1e4, float("-inf"))
        return out

    head.scores = scores
    try:
        yield targets
    finally:
        head.scores = original


def _set_targets(targets: dict, values: list[int], device: torch.device) -> None:
    key = (len(values), device)
    if key not in targets:
        targets[key] = torch.zeros(len(values), dtype=torch.long, device=device)
    targets[key].copy_(torch.tensor(values, dtype=torch.long))


def run_mode(mode: str, model, text: str, lengths: list[int], batch_size: int, device: torch.device, voice: dict,
             targets: dict, offload_device=None) -> dict:
    """One timed run of ``mode`` (bark.stream over the whole text, joined as bark.synthesize joins) -> figures and
    each piece's tokens."""
    import bark
    from bark.longform import ByteTextEncoder

    rows = 1 if mode == "sequential" else batch_size
    order = "text" if mode in ("sequential", "batched-text-order") else "length"
    stage_s: dict[str, float] = {}
    calls: list[list[int]] = []
    holder: dict = {}

    def on_event(event) -> None:
        if event.stage == "semantic" and event.kind == "start":  # before the call's prefill: its rows' lengths
            chunk = holder["stream"].chunks[len(calls)]
            calls.append(chunk)
            _set_targets(targets, [lengths[i] for i in chunk], device)
        if event.kind == "end":
            stage_s[event.stage] = stage_s.get(event.stage, 0.0) + event.seconds

    tokens, audio_s = [], 0.0
    load_before = _load()
    cpu0 = time.process_time()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    with _PeakRSS() as rss:
        holder["stream"] = bark.stream(model, text, processor=ByteTextEncoder(), voice=voice, batch_size=rows,
                                       order=order, offload=offload_device if offload_device is not None else False,
                                       callback=on_event, do_sample=False)
        pieces = list(holder["stream"])
        bark.longform.join_pieces(pieces, bark.longform.DEFAULT_PAUSE, int(model.sampling_rate))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - t0
    for p in pieces:
        tokens.append((p.semantic, p.coarse, p.fine))
        audio_s += p.duration
    figures = {"wall_s": wall, "generate_calls": len(calls), "rows_per_call": rows, "order": order,
               "audio_s": audio_s, "rtf": wall / audio_s if audio_s else None, "stage_s": stage_s,
               "load_before": load_before, "load_after": _load(), "process_cpu_s": time.process_time() - cpu0,
               "peak_rss_increase_mib": (rss.peak - rss.start_rss) / 2**20,
               "semantic_tokens_stepped": sum(max(lengths[i] for i in c) * len(c) for c in calls)}
    if device.type == "cuda":
        figures["peak_gpu_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return {"mode": mode, "figures": figures, "tokens": tokens}


def _same_tokens(a: list, b: list) -> bool:
    """Every piece's (semantic, coarse, fine) tokens equal."""
    return len(a) == len(b) and all(x.shape == y.shape and bool((x == y).all())
                                    for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True))


def measure(model_name: str = "small", batch_size: int = 8, pairs: int = 2, device: str | None = None,
            dtype: str | None = None, text: str = PARAGRAPH, tokens_per_char: float = TOKENS_PER_CHAR,
            budget: float = 1e9, offload: bool | None = None, modes: tuple[str, ...] = MODES, on_update=None) -> dict:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dt = getattr(torch, dtype) if dtype else (torch.float16 if dev.type == "cuda" else torch.float32)
    t_start = time.monotonic()
    model = build_model(model_name, dev, dt)
    pieces = pieces_of(text, model)
    cap = model.generation_config.semantic_config.max_new_tokens - 1
    lengths = [speech_tokens(p, tokens_per_char, cap) for p in pieces]
    rate = model.generation_config.semantic_config.semantic_rate_hz
    voice = _voice()
    result = {
        "model": model_name, "device": str(dev), "dtype": str(dt).replace("torch.", ""), "batch_size": batch_size,
        "characters": len(text), "pieces": len(pieces), "piece_chars": [len(p) for p in pieces],
        "semantic_tokens_per_piece": lengths, "tokens_per_char": tokens_per_char,
        "nominal_speech_s": sum(lengths) / rate, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "torch": torch.__version__, "python": platform.python_version(),
        "machine": platform.processor() or platform.machine(), "runs": [], "pairs": [],
        "method": __doc__.split("\n\n", 2)[2].strip()}
    if dev.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(dev)
    with speech_lengths() as targets:
        # warm-up, not timed: one short call of each batch size (first calls; Triton compiles on a GPU)
        short = " ".join(pieces[:min(batch_size, len(pieces))])
        for rows in sorted({1, min(batch_size, len(pieces))}):
            run_mode("sequential" if rows == 1 else "batched", model, short if rows > 1 else pieces[0],
                     [4] * len(pieces), rows, dev, voice, targets)
        for k in range(pairs):
            order = list(modes) if k % 2 == 0 else list(reversed(modes))
            runs = {}
            for mode in order:
                if time.monotonic() - t_start > budget:
                    result["cut"] = f"budget {budget:.0f} s reached after {len(result['runs'])} runs"
                    break
                run = run_mode(mode, model, text, lengths, batch_size, dev, voice, targets)
                run["pair"] = k
                runs[mode] = run
                result["runs"].append({x: run[x] for x in ("mode", "pair", "figures")})
                if on_update:
                    on_update(result)
            if "sequential" in runs:
                seq = runs["sequential"]
                for mode, run in runs.items():
                    if mode == "sequential":
                        continue
                    result["pairs"].append({
                        "pair": k, "mode": mode, "first": order[0], "sequential_s": seq["figures"]["wall_s"],
                        "batched_s": run["figures"]["wall_s"],
                        "speedup": seq["figures"]["wall_s"] / run["figures"]["wall_s"],
                        "cpu_time_ratio": seq["figures"]["process_cpu_s"]
                        / max(run["figures"]["process_cpu_s"], 1e-9),
                        "speech_s": seq["figures"]["audio_s"], "rtf_sequential": seq["figures"]["rtf"],
                        "rtf_batched": run["figures"]["rtf"],
                        "same_tokens": _same_tokens(seq["tokens"], run["tokens"])})
                if on_update:
                    on_update(result)
            if "cut" in result:
                break
        if (offload if offload is not None else dev.type == "cuda") and dev.type == "cuda" and "cut" not in result:
            model.to("cpu")
            torch.cuda.empty_cache()
            try:
                run = run_mode("batched+offload", model, text, lengths, batch_size, dev, voice, targets,
                               offload_device=dev)
                result["runs"].append({"mode": run["mode"], "pair": None, "figures": run["figures"]})
            finally:
                model.to(dev)
            if on_update:
                on_update(result)
    for mode in modes:
        ratios = sorted(p["speedup"] for p in result["pairs"] if p["mode"] == mode)
        if ratios:
            mid = len(ratios) // 2
            result[f"speedup_median[{mode}]"] = ratios[mid] if len(ratios) % 2 else (ratios[mid - 1] + ratios[mid]) / 2
    return result


def table(result: dict) -> str:
    lines = [f"### Long-form: {result['characters']} characters, {result['pieces']} pieces, "
             f"{result['nominal_speech_s']:.0f} s of speech, model {result['model']} ({result['dtype']}, "
             f"{result['device']}{', ' + result['gpu'] if 'gpu' in result else ''}), batch size "
             f"{result['batch_size']}, torch {result['torch']}, {result['torch_threads']} torch thread(s) on "
             f"{result['cpu_count']} cores", "",
             "| pair | mode | chunk order | calls | semantic steps x rows | wall s | RTF | semantic / coarse / fine / "
             "codec s | peak memory | load before -> after | process CPU s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in result["runs"]:
        f = run["figures"]
        st = f["stage_s"]
        stages = " / ".join(f"{st.get(s, 0.0):.1f}" for s in ("semantic", "coarse", "fine", "codec"))
        mem = (f"{f['peak_gpu_allocated_gib']:.2f} GiB GPU" if "peak_gpu_allocated_gib" in f
               else f"+{f['peak_rss_increase_mib']:.0f} MiB RSS")
        load = f"{f['load_before']:.2f} -> {f['load_after']:.2f}" if f["load_before"] is not None else "-"
        rtf = f"{f['rtf']:.3f}" if f["rtf"] is not None else "-"
        lines.append(f"| {run['pair'] if run['pair'] is not None else '-'} | {run['mode']} | {f['order']} | "
                     f"{f['generate_calls']} | {f['semantic_tokens_stepped']} | {f['wall_s']:.1f} | {rtf} | "
                     f"{stages} | {mem} | {load} | {f['process_cpu_s']:.1f} |")
    lines.append("")
    for p in result["pairs"]:
        lines.append(f"- pair {p['pair']} ({p['first']} first): {p['mode']} {p['speedup']:.2f}x faster than "
                     f"sequential ({p['sequential_s']:.1f} s -> {p['batched_s']:.1f} s for {p['speech_s']:.1f} s of "
                     f"speech; process CPU time {p['cpu_time_ratio']:.2f}x less); every piece's semantic, coarse and "
                     f"fine tokens equal: {p['same_tokens']}")
    for key, value in result.items():
        if key.startswith("speedup_median["):
            lines.append(f"- median speed-up, {key[len('speedup_median['):-1]} vs sequential: {value:.2f}x")
    if "cut" in result:
        lines.append(f"- cut: {result['cut']}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.longform", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory for longform.json and longform.md")
    parser.add_argument("--model", default=None, help="small (default on CPU), bark-small (default on CUDA), bark, "
                                                      "tiny")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=2, help="interleaved sequential/batched pairs")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--budget", type=float, default=1e9, help="seconds after which no new run starts")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {list(MODES)}; sequential "
                                                                 "is the baseline of the speed-ups")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: tiny model, the paragraph's first 300 characters, few tokens, one pair")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    model = args.model or ("tiny" if args.quick else ("bark-small" if cuda else "small"))
    text = PARAGRAPH[:300].rsplit(". ", 1)[0] + "." if args.quick else PARAGRAPH
    tokens_per_char = 0.1 if args.quick else TOKENS_PER_CHAR
    pairs = 1 if args.quick else args.pairs

    def write(result: dict) -> None:
        (out / "longform.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
        (out / "longform.md").write_text(table(result))

    modes = tuple(m for m in args.modes.split(",") if m)
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"--modes: unknown {unknown}; known: {list(MODES)}")
    result = measure(model, args.batch_size, pairs, args.device, args.dtype, text, tokens_per_char, args.budget,
                     modes=modes, on_update=write)
    write(result)
    print(table(result))
    ok = bool(result["pairs"]) and all(p["same_tokens"] for p in result["pairs"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
