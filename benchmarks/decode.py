"""Decode-step benchmark: µs per step, tokens/s and achieved GB/s of one causal Bark sub-model's decode step.

``python -m benchmarks.decode --out DIR [--quick] [--budget SECONDS] [--models bark-small,bark] [--batches 1,8]``

A decode step at batch B reads every weight of the layers, the final norm and the lm-head rows it needs once, plus
the KV cache of every row; at small B that is all it should cost. The floor of a step is therefore

    floor = (weight bytes + KV bytes read) / copy bandwidth measured in the same run,

and the report gives each mode's step time as a multiple of that floor. Modes (each from the same prefilled state, the
same random weights; greedy, so every mode must produce the same tokens, which is checked and recorded):

* ``eager``: the model's decode step called from Python, step after step (what generation did before sessions);
* ``graph`` (CUDA): one step captured with ``torch.cuda.CUDAGraph`` and replayed;
* further modes are added by :func:`register_mode` (the decode session of ``bark.generation`` registers its own).

Results are written to ``DIR/decode.json`` after every measured case, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import report, timing

# mode name -> builder(bench) -> (reset(), run(n_steps) -> tokens (n_steps, B) long) or raises
_MODES: dict[str, Callable] = {}


def register_mode(name: str, builder: Callable) -> None:
    _MODES[name] = builder


@dataclass
class DecodeBench:
    """One prefilled model state: the thing every mode starts from."""

    name: str
    model: torch.nn.Module
    batch: int
    prompt_len: int
    steps: int
    n_allowed: int
    device: torch.device
    dtype: torch.dtype
    first_tokens: torch.Tensor = field(default=None)  # (B,) the token after the prompt
    max_seqlen: int = 0
    stage: str = "semantic"
    head_slices: list = field(default_factory=list)  # lm-head rows (lo, hi) of each step variant (alternating)

    def weight_bytes(self) -> int:
        """Bytes of the weights one step reads: every layer, the final norm, the lm-head rows used (on average over
        the step variants)."""
        m = self.model
        total = sum(p.numel() * p.element_size() for p in m.layers.parameters())
        total += sum(p.numel() * p.element_size() for p in m.layernorm_final.parameters())
        head = m.lm_head.weight
        rows = sum(hi - lo for lo, hi in self.head_slices) / len(self.head_slices)
        total += int(rows * head.shape[1] * head.element_size())
        return total

    def kv_bytes(self) -> int:
        """Bytes of keys and values one step reads, averaged over the timed steps (lengths prompt+1 .. prompt+steps)."""
        cfg = self.model.config
        mean_len = self.prompt_len + (self.steps + 1) / 2
        return int(2 * cfg.num_layers * self.batch * mean_len * cfg.hidden_size * self.dtype.itemsize)


PROMPT_LEN = {"semantic": 256, "coarse": 800}  # cached positions at the first step (Bark: 257; coarse up to 887)


def full_config(name: str):
    from bark.config import bark_config, bark_small_config

    if name == "bark":
        return bark_config()
    return bark_small_config()


def model_config(name: str, stage: str = "semantic"):
    """The semantic or coarse sub-model config of bark-small / bark, or a tiny one ('tiny') for smoke runs."""
    from bark.config import BarkSubModelConfig

    if stage not in ("semantic", "coarse"):
        raise ValueError(f"stage: expected semantic or coarse, got {stage!r}")
    if name in ("bark-small", "bark"):
        full = full_config(name)
        return full.semantic_config if stage == "semantic" else full.coarse_acoustics_config
    if name == "tiny":
        return BarkSubModelConfig(block_size=128, input_vocab_size=320, output_vocab_size=320, num_layers=2,
                                  num_heads=2, hidden_size=64, dropout=0.0, bias=False)
    raise ValueError(f"model: expected bark-small, bark or tiny, got {name!r}")


def head_slices(name: str, stage: str, vocab: int) -> list[tuple[int, int]]:
    """The lm-head rows each step variant reads: semantic one slice, coarse one per codebook (alternating)."""
    if name == "tiny":
        return [(0, vocab)] if stage == "semantic" else [(0, vocab // 2), (vocab // 2, vocab)]
    gen = full_config(name).generation_config
    if stage == "semantic":
        cfg = gen.semantic_config
        return [(0, max(cfg.semantic_vocab_size, cfg.semantic_pad_token) + 1)]
    sem, cb = gen.semantic_config.semantic_vocab_size, gen.codebook_size
    n = gen.coarse_acoustics_config.n_coarse_codebooks
    return [(sem + i * cb, sem + (i + 1) * cb if i < n - 1 else vocab) for i in range(n)]


def build(name: str, batch: int, device: torch.device, dtype: torch.dtype, prompt_len: int, steps: int,
          attn: str | None = None, seed: int = 0, stage: str = "semantic") -> DecodeBench:
    from bark.model import BarkCausalModel

    cfg = model_config(name, stage)
    torch.manual_seed(seed)
    with torch.device(device):  # initialised where it runs (seconds on a CPU for bark's 24 layers)
        model = BarkCausalModel(cfg, attn_backend=attn)  # torch's default init: varied greedy tokens
    model = model.to(dtype=dtype).eval()
    slices = head_slices(name, stage, cfg.output_vocab_size)
    n_allowed = slices[0][1]
    prompt_len = min(prompt_len, cfg.block_size - steps - 1)
    bench = DecodeBench(name, model, batch, prompt_len, steps, n_allowed, device, dtype,
                        max_seqlen=prompt_len + steps + 1, stage=stage, head_slices=slices)
    gen = torch.Generator().manual_seed(seed + 1)
    embeds = (torch.randn(batch, prompt_len, cfg.hidden_size, generator=gen) * 0.02).to(device=device, dtype=dtype)
    bench.prompt_embeds = embeds
    return bench


# ----------------------------------------------------------------------------------------------------------------------
# modes on the model's own decode step


def _pick(model, hidden: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Greedy token over lm-head rows lo..hi-1, as a full-vocabulary id (B,)."""
    return torch.argmax(model.lm_logits(hidden, lo, hi).float(), dim=-1) + lo


def _prefilled(bench: DecodeBench):
    """The model as loaded, a cache holding the prompt, and the first token (variant 0's head)."""
    model = bench.model
    model.set_decode_layout(False)  # the model as loaded (what decoding used before sessions)
    cache = model.new_cache(bench.batch, bench.max_seqlen)
    with torch.no_grad():
        hidden = model.prefill(bench.prompt_embeds, cache)
        first = _pick(model, hidden, *bench.head_slices[0])
    return model, cache, first, [bench.prompt_len] * bench.batch


def _eager(bench: DecodeBench):
    """The model's own decode_step called per step (the public attention API per layer): decoding before sessions."""
    model, cache, first, prompt = _prefilled(bench)
    slices = bench.head_slices

    def reset():
        cache.set_lengths(prompt)

    @torch.no_grad()
    def run(n: int) -> torch.Tensor:
        tok = first
        out = []
        for i in range(n):
            hidden = model.decode_step(tok, cache)
            tok = _pick(model, hidden, *slices[(i + 1) % len(slices)])
            out.append(tok)
        return torch.stack(out)  # (n, B)

    return reset, run


def _graph(bench: DecodeBench):
    """The same step captured as CUDA graphs (one per head variant) and replayed."""
    if bench.device.type != "cuda":
        raise RuntimeError("CUDA graphs need a CUDA device")
    model, cache, first, prompt = _prefilled(bench)
    slices = bench.head_slices
    tok = first.clone()  # static input/output of the captured steps

    def step_fn(lo, hi):
        def step():
            hidden = model.decode_step(tok, cache)
            tok.copy_(_pick(model, hidden, lo, hi))

        return step

    graphs = []
    for lo, hi in slices:  # warm every kernel variant on a side stream, then capture one step
        step = step_fn(lo, hi)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.no_grad():
            for _ in range(3):
                cache.set_lengths(prompt)
                tok.copy_(first)
                step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        cache.set_lengths(prompt)
        with torch.no_grad(), torch.cuda.graph(graph):
            step()
        graphs.append(graph)

    def reset():
        cache.set_lengths(prompt)  # host copy is not advanced by replays; the device lengths are what count
        tok.copy_(first)

    def run(n: int) -> torch.Tensor:
        out = []
        for i in range(n):
            graphs[(i + 1) % len(graphs)].replay()
            out.append(tok.clone())
        return torch.stack(out)

    return reset, run


def _session(mode: str):
    """A prepared decode session (bark.session) with the real heads (semantic: logits processing, greedy pick,
    finished mask; coarse: one head per codebook, alternating), exactly what generate runs."""

    def builder(bench: DecodeBench):
        from bark.generation import SamplingParams, _CoarseHead, _SemanticHead, _TokenRecord
        from bark.session import WARMUP_STEPS, DecodeSession

        gen = full_config(bench.name).generation_config
        cfg = gen.semantic_config
        if bench.name == "tiny":  # ids inside the tiny vocabulary (the pad is the EOS)
            cfg.semantic_vocab_size = bench.n_allowed - 1
            cfg.eos_token_id = bench.n_allowed - 1
        bench.model.set_decode_layout(bench.device.type == "cpu")  # as generate does
        width = bench.steps + 1 + WARMUP_STEPS
        if bench.stage == "semantic":
            record = _TokenRecord(bench.batch, width, cfg.semantic_pad_token, bench.device)
            heads = [_SemanticHead(bench.model, record, gen, SamplingParams(), None, 0, None)]
        else:
            record = _TokenRecord(bench.batch, width, 0, bench.device)
            heads = [_CoarseHead(bench.model, record, sl, SamplingParams(), None) for sl in bench.head_slices]
        session = DecodeSession(bench.model, bench.batch, bench.max_seqlen, heads, mode)
        session.prefill(bench.prompt_embeds)
        if session.fallback:
            raise RuntimeError(f"capture fell back to eager: {session.fallback}")
        first = session.tokens.clone()
        prompt = [bench.prompt_len] * bench.batch

        def reset():
            session.cache.set_lengths(prompt)
            session.tokens.copy_(first)
            record.reset()
            record.col.fill_(1)

        def run(n: int) -> torch.Tensor:
            for i in range(n):
                session.step((i + 1) % len(heads))
            return record.tokens[:, 1:n + 1].transpose(0, 1)  # (n, B)

        return reset, run

    return builder


register_mode("eager", _eager)
register_mode("graph", _graph)
register_mode("session-eager", _session("eager"))
register_mode("session-graph", _session("graph"))
register_mode("session-compile", _session("compile"))
register_mode("session-fused", _session("fused"))  # the fused Triton step (5 launches per layer), captured on CUDA


# ----------------------------------------------------------------------------------------------------------------------
# timing


def _time_steps(device: torch.device, reset, run, steps: int, reps: int) -> list[float]:
    """Per-step times in µs of ``reps`` runs of ``steps`` steps each (reset between runs, untimed)."""
    samples = []
    for _ in range(reps):
        reset()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run(steps)
            end.record()
            torch.cuda.synchronize(device)
            samples.append(start.elapsed_time(end) * 1e3 / steps)
        else:
            t0 = time.perf_counter()
            run(steps)
            samples.append((time.perf_counter() - t0) * 1e6 / steps)
    return samples


def read_bandwidth(device: torch.device, dtype: torch.dtype, hidden: int = 768, total_bytes: int = 256 << 20) -> dict:
    """The rate a batch-1 decode step can read weights at, measured: ``F.linear`` of one row against a stream of
    (4C, C) weights (``total_bytes`` in all, far beyond the caches), stored either way ((out, in) contiguous and
    transposed); the faster layout counts. Returns GB/s of weight bytes read, per layout and best."""
    n = max(4, total_bytes // (4 * hidden * hidden * dtype.itemsize))
    weights = [torch.randn(4 * hidden, hidden, device=device).to(dtype) for _ in range(n)]
    layouts = {"contiguous": weights, "transposed": [w.t().contiguous().t() for w in weights]}
    x = torch.randn(1, hidden, device=device).to(dtype)
    nbytes = n * 4 * hidden * hidden * dtype.itemsize
    out = {}
    for _ in range(3):
        for name, ws in layouts.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            for w in ws:
                torch.nn.functional.linear(x, w)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            out[name] = max(out.get(name, 0.0), nbytes / (time.perf_counter() - t0) / 1e9)
    out["best"] = max(out.values())
    out["bytes"] = nbytes
    return out


def measure(bench: DecodeBench, modes: list[str], copy_gbps: float | None, reps: int,
            read_gbps: float | None = None) -> list[dict]:
    """One record per mode: step time (median µs, p20/p80), tokens/s, GB/s, x floor, tokens equal to eager's."""
    records = []
    reference = None
    w_bytes, kv_bytes = bench.weight_bytes(), bench.kv_bytes()
    for mode in modes:
        rec = {"section": "decode-step", "stage": bench.stage, "model": bench.name, "batch": bench.batch, "mode": mode,
               "dtype": str(bench.dtype).replace("torch.", ""), "prompt_len": bench.prompt_len, "steps": bench.steps,
               "attn_backend": bench.model.attn_backend or "auto", "weight_bytes": w_bytes, "kv_bytes": kv_bytes}
        records.append(rec)
        try:
            reset, run = _MODES[mode](bench)
            reset()
            with torch.no_grad():
                tokens = run(bench.steps).cpu()  # also the warm-up
            if reference is None:
                reference = tokens
                rec["tokens_equal_first_mode"] = True
            else:
                same = torch.equal(tokens, reference)
                rec["tokens_equal_first_mode"] = same
                if not same:
                    diff = (tokens != reference).any(dim=1).nonzero()
                    rec["first_differing_step"] = int(diff[0]) if len(diff) else None
            with torch.no_grad():
                samples = _time_steps(bench.device, reset, run, bench.steps, reps)
        except Exception as exc:  # record and go on: one broken mode must not lose the others
            rec.update(status="failed", reason=f"{type(exc).__name__}: {exc}"[:400])
            continue
        us = statistics.median(samples)
        rec.update(status="ok", us_per_step=us, min_us=min(samples), p20_us=_quantile(samples, 0.2),
                   p80_us=_quantile(samples, 0.8), reps=reps, tokens_per_s=bench.batch / (us * 1e-6),
                   achieved_gbps=(w_bytes + kv_bytes) / (us * 1e-6) / 1e9)
        # the floor: on a GPU the bytes at the copy bandwidth (read + write counted); on a CPU at the measured
        # batch-1 weight-read rate (read_bandwidth), which is what a decode step's matmuls can reach there
        bound_gbps = copy_gbps if bench.device.type == "cuda" else (read_gbps or copy_gbps)
        if bound_gbps:
            floor_us = (w_bytes + kv_bytes) / (bound_gbps * 1e9) * 1e6
            rec.update(floor_us=floor_us, x_floor=us / floor_us, fraction_of_bound=floor_us / us,
                       fraction_of_bound_best_rep=floor_us / min(samples), bound_gbps=bound_gbps)
        if copy_gbps:
            rec["fraction_of_copy"] = rec["achieved_gbps"] / copy_gbps
    return records


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def run(out_dir: str | Path, quick: bool = False, budget_seconds: float = 120.0, models: list[str] | None = None,
        batches: list[int] | None = None, modes: list[str] | None = None, dtype: str | None = None,
        attn: str | None = None, stages: list[str] | None = None) -> dict:
    """Measure every (stage, model, batch) in order until the budget is spent; writes DIR/decode.json after each
    case."""
    t_start = time.monotonic()
    deadline = t_start + budget_seconds
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if dtype is None:
        dtype = "float16" if device.type == "cuda" else "float32"
    torch_dtype = getattr(torch, dtype)
    models = models or (["tiny"] if quick else ["bark-small", "bark"])
    batches = batches or ([1, 2] if quick else ([1, 8, 32, 64] if device.type == "cuda" else [1, 8]))
    stages = stages or (["semantic"] if quick else ["semantic", "coarse"])
    modes = modes or (["eager", "session-eager", "graph", "session-graph", "session-fused", "session-compile"]
                      if device.type == "cuda" else ["eager", "session-eager"])
    steps = 8 if quick else (64 if device.type == "cuda" else 16)
    reps = 3 if quick else (10 if device.type == "cuda" else 7)
    timer = timing.make_timer(device, quick=True)
    copy_bytes = (1 << 30) if device.type == "cuda" else (64 << 20)
    copy = timing.copy_bandwidth(device, timer, copy_bytes)
    copy_gbps = copy["bandwidth"]["value"]
    read = read_bandwidth(device, torch_dtype, total_bytes=(64 << 20) if quick else (256 << 20))
    payload = {"schema": "bark-kernels-decode/1", "environment": report.environment(device),
               "copy_bandwidth_gbps": copy_gbps, "copy_bytes": copy_bytes, "weight_read_gbps": read,
               "torch_threads": torch.get_num_threads(), "config": {
                   "quick": quick, "budget_seconds": budget_seconds, "models": models, "batches": batches,
                   "modes": modes, "stages": stages, "steps_per_rep": steps, "reps": reps, "dtype": dtype,
                   "attn": attn or "auto", "prompt_len": PROMPT_LEN},
               "records": [], "skipped": []}
    path = out / "decode.json"
    # most telling first: batch 1 and the first model of every stage, then the rest (a budget cut drops the least)
    cases = [(st, m, b) for b in batches for m in models for st in stages]
    cases.sort(key=lambda c: (c[2] != batches[0] or c[1] != models[0], batches.index(c[2]), models.index(c[1])))
    for stage, name, batch in cases:
        left = deadline - time.monotonic()
        if left < 5:
            payload["skipped"].append({"stage": stage, "model": name, "batch": batch,
                                       "reason": f"budget: {left:.0f} s left"})
            continue
        try:
            bench = build(name, batch, device, torch_dtype, prompt_len=PROMPT_LEN[stage], steps=steps, attn=attn,
                          stage=stage)
        except Exception as exc:
            payload["skipped"].append({"stage": stage, "model": name, "batch": batch,
                                       "reason": f"build failed: {type(exc).__name__}: {exc}"[:400]})
            continue
        # inductor compiles for minutes at real sizes: its mode is measured on the first case only
        case_modes = [m for m in modes if m != "session-compile" or (stage, name, batch) == cases[0]]
        payload["records"].extend(measure(bench, case_modes, copy_gbps, reps, read["best"]))
        del bench
        if device.type == "cuda":
            torch.cuda.empty_cache()
            payload["wall_seconds"] = time.monotonic() - t_start
            path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    payload["wall_seconds"] = time.monotonic() - t_start
    path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    return payload


def table(payload: dict) -> str:
    """A markdown table of the records."""
    read = payload.get("weight_read_gbps", {})
    lines = [f"{payload['environment'].get('device_name')}, {payload.get('torch_threads')} torch threads: copy "
             f"bandwidth {payload['copy_bandwidth_gbps']:.1f} GB/s (read + write); batch-1 weight read "
             f"{read.get('best', float('nan')):.1f} GB/s (contiguous {read.get('contiguous', float('nan')):.1f}, "
             f"transposed {read.get('transposed', float('nan')):.1f}). Floor: (weight + KV bytes) / "
             f"{'copy bandwidth' if payload['environment'].get('device_type') == 'cuda' else 'weight-read rate'}.",
             "", "| stage | model | batch | mode | dtype | µs/step (median) | best rep | floor µs | % of floor | GB/s | "
             "tokens/s | same tokens | status |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in payload["records"]:
        if r.get("status") == "ok":
            lines.append(f"| {r['stage']} | {r['model']} | {r['batch']} | {r['mode']} | {r['dtype']} | "
                         f"{r['us_per_step']:.1f} | {r['min_us']:.1f} | {r.get('floor_us', float('nan')):.1f} | "
                         f"{100 * r.get('fraction_of_bound', float('nan')):.0f}% | {r['achieved_gbps']:.1f} | "
                         f"{r['tokens_per_s']:.0f} | {r['tokens_equal_first_mode']} | ok |")
        else:
            lines.append(f"| {r['stage']} | {r['model']} | {r['batch']} | {r['mode']} | {r['dtype']} | — | — | — | — "
                         f"| — | — | — | {r.get('status')}: {r.get('reason', '')[:120]} |")
    for s in payload["skipped"]:
        lines.append(f"| {s.get('stage', '')} | {s['model']} | {s['batch']} | — | — | — | — | — | — | — | — | — | "
                     f"skipped: {s['reason'][:120]} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.decode", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory for decode.json")
    parser.add_argument("--quick", action="store_true", help="a tiny model and 8 steps (a smoke test)")
    parser.add_argument("--budget", type=float, default=120.0, help="wall-clock budget in seconds")
    parser.add_argument("--models", default=None, help="comma-separated: bark-small, bark, tiny")
    parser.add_argument("--batches", default=None, help="comma-separated batch sizes")
    parser.add_argument("--stages", default=None, help="comma-separated: semantic, coarse")
    parser.add_argument("--modes", default=None, help=f"comma-separated, of {sorted(_MODES)}")
    parser.add_argument("--dtype", default=None, choices=("float16", "bfloat16", "float32"))
    parser.add_argument("--attn", default=None, help="bark_kernels backend (default: automatic)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)

    def split(s):
        return [x for x in s.split(",") if x] if s else None

    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads: expected an int >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    batches = [int(b) for b in split(args.batches)] if args.batches else None
    modes = split(args.modes)
    for m in modes or []:
        if m not in _MODES:
            parser.error(f"--modes: unknown mode {m!r}; known: {sorted(_MODES)}")
    payload = run(args.out, quick=args.quick, budget_seconds=args.budget, models=split(args.models),
                  batches=batches, modes=modes, dtype=args.dtype, attn=args.attn, stages=split(args.stages))
    print(table(payload))
    failed = [r for r in payload["records"] if r.get("status") != "ok" or not r.get("tokens_equal_first_mode")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
